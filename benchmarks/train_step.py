"""Training-step cost: precsim schemes vs the FP32 step, and vs peers, in one process.

Same model (the zoo's ResNet), same MNIST-shaped batch of 128, same optimizer. Steps of all
schemes are interleaved, so drifting machine load hits every scheme alike; the ratio is the
median step time over the FP32 median. Warm-up (the first two steps, compilation included;
Inductor caches it on disk for later runs) is reported separately. Peers: torch.ao.quantization
QAT (deprecated; here only as a baseline) and QPyTorch when it is installed. Prints a markdown
table ready for docs/benchmarks.md.

The defaults are a user's: compiled kernels, glibc's malloc as it is, no environment variable.
``--tune-allocator`` applies ``precsim.tune_allocator()`` (keep freed memory, no page faults for
new tensors) to every row alike; ``--eager`` times the eager reference.

    python benchmarks/train_step.py [--quick] [--steps 25] [--rounds 3] [--batch 128] [--eager]
                                    [--device cpu] [--threads N] [--tune-allocator]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

import precsim
from precsim.runtime.backend import set_compile
from precsim.zoo import get_model

SR = "stochastic"
# name -> (config, issue target as x FP32): 1.3 for act+weight with FP32 gradients, 1.5 otherwise
SCHEMES: dict[str, tuple[dict | None, float | None]] = {
    "fp32": (None, None),
    "int8 act+weight, fp32 grad": ({"activation": "int8", "weight": "int8"}, 1.3),
    "int8 act+weight, fp32 grad, delayed act range": ({"activation": {"format": "int8", "delayed": True},
                                                       "weight": "int8"}, 1.3),
    "int8 act+weight+grad": ({"activation": "int8", "weight": "int8", "gradient": "int8"}, 1.5),
    "int8 act+weight+grad, delayed act+grad ranges": ({"activation": {"format": "int8", "delayed": True},
                                                        "weight": "int8", "gradient": {"format": "int8", "delayed": True}},
                                                       1.5),
    "bf16 act+weight+grad": ({"activation": "bf16", "weight": "bf16", "gradient": "bf16"}, 1.5),
    "fp8 e4m3 act+weight, fp32 grad": ({"activation": "fp8_e4m3", "weight": "fp8_e4m3"}, 1.3),
    "hfp8 1-4-3/1-5-2, SR grad": ({"activation": "hfp8_fwd", "weight": "hfp8_fwd",
                                   "gradient": {"format": "hfp8_bwd", "rounding": SR}}, 1.5),
    "DSE 1-4-3/1-5-2": ({"activation": "dse(e=4,m=3)", "weight": "dse(e=4,m=3)", "gradient": "dse(e=5,m=2)"},
                        1.5),
    "DSE 1-4-3/1-5-2, delayed shift": ({"activation": "dse(e=4,m=3,delayed=true)",
                                        "weight": "dse(e=4,m=3,delayed=true)",
                                        "gradient": "dse(e=5,m=2,delayed=true)"}, 1.5),
    "MXFP8 act+weight, fp32 grad": ({"activation": "mxfp8_e4m3", "weight": "mxfp8_e4m3"}, 1.3),
    "MXFP8 e4m3/e5m2 grad": ({"activation": "mxfp8_e4m3", "weight": "mxfp8_e4m3", "gradient": "mxfp8_e5m2"},
                             1.5),
}


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()

    return step


def torch_ao_qat(model: nn.Module, x: torch.Tensor) -> nn.Module:
    """torch.ao.quantization FX QAT with its default x86 qconfig (baseline only)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from torch.ao.quantization import get_default_qat_qconfig_mapping
        from torch.ao.quantization.quantize_fx import prepare_qat_fx

        return prepare_qat_fx(model.train(), get_default_qat_qconfig_mapping("x86"), (x,))


def load_average() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--quick", action="store_true", help="5 timed steps per scheme")
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat the timed steps this many times and add a table of each round's ratios "
                        "(a ratio moves by a few hundredths between rounds)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's). On a shared VM, 1 avoids timing the wait for a "
                        "second OpenMP thread that another process keeps off its core")
    p.add_argument("--eager", action="store_true", help="precsim's eager reference kernels (PRECSIM_COMPILE=0)")
    p.add_argument("--tune-allocator", action="store_true",
                   help="precsim.tune_allocator() for every row alike (default: glibc's malloc as a user has it)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.steps = min(args.steps, 5)
    if args.eager:
        set_compile(False)
    allocator = "glibc default" if not args.tune_allocator else (
        "tuned (precsim.tune_allocator)" if precsim.tune_allocator() else "default (tuning unavailable)")
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, 28, 28, device=args.device)
    y = torch.randint(0, 10, (args.batch,), device=args.device)

    steps: dict[str, Callable[[], None]] = {}
    targets: dict[str, float | None] = {}
    for name, (cfg, target) in SCHEMES.items():
        torch.manual_seed(0)
        model = get_model("resnet").to(args.device)
        if cfg is not None:
            precsim.prepare(model, cfg)
        label = "precsim " + name if cfg else name
        steps[label], targets[label] = make_step(model, x, y), target
    notes = []
    try:
        torch.manual_seed(0)
        label = "peer: torch.ao QAT int8 act+weight (FX, x86 qconfig)"
        steps[label] = make_step(torch_ao_qat(get_model("resnet").to(args.device), x), x, y)
        targets[label] = None
    except Exception as err:  # the deprecated peer may not trace every model
        notes.append(f"torch.ao QAT unavailable: {type(err).__name__}: {err}")
    try:
        import qtorch  # noqa: F401
        notes.append("QPyTorch is installed but not wired here yet")
    except ImportError:
        notes.append("QPyTorch not installed (it compiles C++ at import): skipped")

    first: dict[str, float] = {}
    for name, step in steps.items():  # warm-up; compile time counted here
        t = time.perf_counter()
        step()
        step()
        first[name] = time.perf_counter() - t
    load_before = load_average()
    rounds = [timed_round(steps, args.steps, args.device) for _ in range(args.rounds)]
    med = rounds[0]
    base = med["fp32"]
    print(f"<!-- benchmarks/train_step.py: zoo ResNet, batch {args.batch}, {args.device}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"precsim kernels {'eager' if args.eager else 'compiled'}, malloc {allocator}, "
          f"median of {args.steps} interleaved steps; "
          f"load average {load_before} (timed steps start) / {load_average()} (end) -->")
    for note in notes:
        print(f"<!-- {note} -->")
    print()
    print("| scheme | ms/step | x FP32 | target | warm-up s (2 steps, compile incl.) |")
    print("|---|---|---|---|---|")
    for name in steps:
        target = targets[name]
        ratio = med[name] / base
        goal = "—" if target is None else f"<= {target}" + (" met" if ratio <= target else " not met")
        print(f"| {name} | {med[name] * 1e3:.1f} | {ratio:.2f} | {goal} | {first[name]:.1f} |")
    if len(rounds) > 1:
        print()
        print(f"<!-- {len(rounds)} rounds of {args.steps} interleaved steps each, one after another -->")
        print()
        print("| scheme | x FP32 per round | range | target |")
        print("|---|---|---|---|")
        for name in steps:
            ratios = [r[name] / r["fp32"] for r in rounds]
            target = targets[name]
            goal = "—" if target is None else f"<= {target}: met in {sum(v <= target for v in ratios)} of {len(ratios)}"
            print(f"| {name} | {', '.join(f'{v:.2f}' for v in ratios)} | {min(ratios):.2f}-{max(ratios):.2f} | {goal} |")


def timed_round(steps: dict[str, Callable[[], None]], n: int, device: str) -> dict[str, float]:
    """Median seconds per step of each scheme over ``n`` steps, the schemes' steps interleaved,
    so that drift in machine load hits every scheme alike."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(n):
        for name, step in steps.items():
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            step()
            if device == "cuda":
                torch.cuda.synchronize()
            times[name].append(time.perf_counter() - t)
    return {name: sorted(v)[len(v) // 2] for name, v in times.items()}


if __name__ == "__main__":
    main()
