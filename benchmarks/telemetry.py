"""Telemetry: its cost in a training step.

The zoo ResNet (batch 128, MNIST-shaped), int8 activations/weights/gradients and MXFP8
e4m3/e5m2, one training step inside ``precsim.collect_stats(model, every=50)`` against the same
step without it, interleaved call by call; ratio = mean / mean over a multiple of 50 steps, so
that sampled steps count at their share.

(Where a diverged run broke is for the sweep to say: it replays the run with every call
recorded; see docs/sweep.md.)

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
from precsim.qat.quantizer import STATS
from precsim.zoo import get_model


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(min(os.cpu_count() or 1, 2))
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}\n")
    cost(args.steps)


if __name__ == "__main__":
    main()
