"""Kernel cost: the public ``precsim.quantize`` on 2^24 float32 values, as a ratio to x.clone().

Rounding is element-wise, so its floor is one read and one write of the tensor: the traffic of
``clone()`` (which also pays for a fresh output allocation, as quantize does). Every format
family x rounding mode is timed against clone with the two interleaved call by call, so that
drifting machine load hits both alike; the ratio is median / median. The call is what a user
makes, with default settings: ``precsim.quantize(x, spec, rounding=...)`` (format parsing,
checks, a seed drawn per stochastic call, the automatic integer scale). First-call time
(compilation, cached on disk by Inductor for later runs) is reported separately: run once with
``TORCHINDUCTOR_CACHE_DIR=$(mktemp -d)`` for a fresh cache, then again for a warm one. Prints a
markdown table ready for docs/benchmarks.md.

    python benchmarks/kernels.py [--quick] [--numel 16777216] [--repeat 9] [--eager] [--device cpu]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable

import torch

import precsim
from precsim.runtime.backend import set_compile

# (family, format spec): every family of the issue; the delayed DSE gets a given shift
FAMILIES: list[tuple[str, str]] = [
    ("bf16", "bf16"),
    ("FlexFP/OCP fp8 e4m3", "fp8_e4m3"),
    ("HFP8 fwd 1-4-3 (b=-4)", "hfp8_fwd"),
    ("int8 per-tensor", "int8"),
    ("int8 per-channel", "int8(axis=0)"),
    ("DSE 1-4-3", "dse(e=4,m=3)"),
    ("DSE 1-4-3, delayed shift", "dse(e=4,m=3,delayed=true)"),
    ("MXFP8 E4M3", "mxfp8_e4m3"),
    ("MXFP4", "mxfp4"),
    ("NVFP4", "nvfp4"),
]
TARGETS = {"nearest": 1.5, "stochastic": 2.0}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def ratio_to_clone(fn: Callable[[], object], x: torch.Tensor, repeat: int, device: str) -> tuple[float, float]:
    """(median kernel s, median clone s), the two calls interleaved."""
    kernel, clone = [], []
    for _ in range(repeat):
        for store, call in ((clone, x.clone), (kernel, fn)):
            sync(device)
            t = time.perf_counter()
            call()
            sync(device)
            store.append(time.perf_counter() - t)
    return sorted(kernel)[repeat // 2], sorted(clone)[repeat // 2]


def cache_state() -> str:
    """Where Inductor's disk cache is, and whether it held anything when the run started."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    path = cache_dir()
    fresh = not os.path.isdir(path) or not os.listdir(path)
    return f"{path} ({'fresh' if fresh else 'warm'})"


def load_average() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--numel", type=int, default=2**24)
    p.add_argument("--repeat", type=int, default=9)
    p.add_argument("--quick", action="store_true",
                   help="5 repeats instead of 9 (same 2^24 values: smaller tensors stay in cache and "
                        "change the ratios)")
    p.add_argument("--eager", action="store_true", help="also time the eager reference (slow: ~40 passes)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: torch's). On a shared VM, 1 avoids timing the wait for a "
                        "second OpenMP thread that another process keeps off its core")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quick:
        args.repeat = min(args.repeat, 5)
    torch.manual_seed(0)
    x = torch.randn(args.numel, device=args.device)
    print(f"<!-- benchmarks/kernels.py: precsim.quantize, defaults; {args.numel} float32 values on {args.device}; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; Inductor cache {cache_state()}; load average before: {load_average()} -->")
    print()
    head = "| family | spec | nearest x clone | stochastic x clone |"
    rule = "|---|---|---|---|"
    if args.eager:
        head += " eager nearest x clone |"
        rule += "---|"
    print(head + " first call s (nearest + stochastic) |")
    print(rule + "---|")
    fq = lambda: torch.fake_quantize_per_tensor_affine(x, 0.02, 0, -128, 127)  # noqa: E731
    k, c = ratio_to_clone(fq, x, args.repeat, args.device)
    peer = f"| peer: torch.fake_quantize_per_tensor_affine | int8 | {k / c:.2f} | — |"
    for family, spec in FAMILIES:
        t = x.view(-1, 4096) if "axis" in spec else x
        params = {"shift": -3} if "delayed" in spec else {}
        cells, first = [], 0.0
        for rounding in ("nearest", "stochastic"):
            def fn(spec=spec, t=t, rounding=rounding, params=params) -> torch.Tensor:
                return precsim.quantize(t, spec, rounding=rounding, **params)
            start = time.perf_counter()
            fn()
            sync(args.device)
            first += time.perf_counter() - start
            k, c = ratio_to_clone(fn, t, args.repeat, args.device)
            mark = "" if k / c <= TARGETS[rounding] else " (over target)"
            cells.append(f"{k / c:.2f}{mark}")
        row = f"| {family} | `{spec}` | {cells[0]} | {cells[1]} |"
        if args.eager:
            set_compile(False)
            k, c = ratio_to_clone(lambda spec=spec, t=t, params=params: precsim.quantize(t, spec, **params),
                                  t, 3, args.device)
            set_compile(True)
            row += f" {k / c:.0f} |"
        print(f"{row} {first:.1f} |", flush=True)
    print(peer + (" — |" if args.eager else "") + " — |")
    print()
    print(f"<!-- load average after: {load_average()}; targets: nearest <= {TARGETS['nearest']}x, "
          f"stochastic <= {TARGETS['stochastic']}x clone -->")


if __name__ == "__main__":
    main()
