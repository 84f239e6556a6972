"""Telemetry: its cost in a training step, and what it says about the default sweep's FlexFP8.

1. Cost: the zoo ResNet (batch 128, MNIST-shaped), int8 activations/weights/gradients and MXFP8
   e4m3/e5m2, one training step inside ``precsim.collect_stats(model, every=50)`` against the
   same step without it, interleaved call by call; ratio = median / median over a multiple of 50
   steps, so that sampled steps count at their share.
2. Diagnosis: the default sweep's ``flexfp8`` scheme (HFP8 1-4-3 with exponent bias 11 forward,
   1-5-2 gradients) on the real MNIST digits, with the sweep's model, seed, optimizer and batch,
   recorded on every call (``every=1``) until the first NaN/Inf: which point, role and direction
   it appeared at, and that point's numbers.

    python benchmarks/telemetry.py [--steps 200]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import precsim
from precsim.experiments.schemes import BUILTIN_SCHEMES
from precsim.qat.quantizer import STATS
from precsim.zoo import get_model, load_dataset


def cost(steps: int) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    print("| scheme | step (ms) | with collect_stats(every=50) (ms) | ratio |")
    print("|---|---:|---:|---:|")
    for name, cfg in (("int8 act+weight+grad", {"activation": "int8", "weight": "int8", "gradient": "int8"}),
                      ("MXFP8 e4m3/e5m2 grad", {"activation": "mxfp8_e4m3", "weight": "mxfp8_e4m3",
                                                "gradient": "mxfp8_e5m2"})):
        model = precsim.prepare(get_model("resnet"), cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)

        def step(model: torch.nn.Module = model, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            opt.step()

        for _ in range(3):
            step()  # compile
        plain, recorded = [], []
        with precsim.collect_stats(model, every=50):
            for _ in range(steps):
                t = time.perf_counter()
                step()
                recorded.append(time.perf_counter() - t)
                token = STATS.set(None)  # the same step, not recorded
                t = time.perf_counter()
                step()
                plain.append(time.perf_counter() - t)
                STATS.reset(token)
        # mean, not median: 1 step in 50 pays for the sample, and the mean is what training pays
        p, r = statistics.mean(plain) * 1e3, statistics.mean(recorded) * 1e3
        print(f"| {name} | {p:.1f} | {r:.1f} | {r / p:.3f} |", flush=True)


def diagnose() -> None:
    train, _ = load_dataset("mnist5k")
    xs, ys = train.tensors
    torch.manual_seed(0)
    model = precsim.prepare(get_model("resnet"), BUILTIN_SCHEMES["flexfp8"], seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9, weight_decay=5e-4)  # the sweep's
    g = torch.Generator().manual_seed(0)
    model.train()
    step = 0
    with precsim.collect_stats(model, every=1) as stats:
        while step < 100:
            step += 1
            idx = torch.randint(0, len(ys), (64,), generator=g)
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(xs[idx]), ys[idx])
            loss.backward()
            opt.step()
            if stats.first_nonfinite is not None or not torch.isfinite(loss):
                break
    print(f"\nflexfp8 (hfp8_fwd / hfp8_bwd), zoo ResNet on MNIST-5k, batch 64, SGD 0.2 m0.9: stopped at step {step}, "
          f"loss {loss.item():.4g}")
    print(f"first non-finite: {stats.first_nonfinite}")
    if stats.first_nonfinite is None:
        return
    _, point, role, direction = stats.first_nonfinite
    module = point.split(".output")[0].split(".input")[0].split(".weight")[0]
    print(f"\nthe rows of {module} (every call of the {step} steps):")
    print("\n| module | op | role | direction | samples | qsnr_db | saturated_pct | nonfinite_pct | amax |")
    print("|---|---|---|---|---:|---:|---:|---:|---:|")
    for r in stats.rows():
        if r["module"] == module:
            print(f"| {r['module']} | {r['op']} | {r['role']} | {r['direction']} | {r['samples']} | "
                  f"{r['qsnr_db']:.1f} | {r['saturated_pct']:.3g} | {r['nonfinite_pct']:.3g} | {r['amax']:.4g} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(min(os.cpu_count() or 1, 2))
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}\n")
    cost(args.steps)
    diagnose()


if __name__ == "__main__":
    main()
