"""Kernel cost: precsim.quantize on 2^24 float32 values, as a ratio to x.clone().

Rounding is element-wise, so its floor is one read and one write of the tensor: the traffic of
``clone()``. Every format family and rounding mode is timed side by side with clone in this
process, eager (the reference) and compiled (the fast path), plus torch's own fake-quant op
as a peer. First-call (compile) time is reported separately.

    python benchmarks/kernels.py [--numel 16777216] [--repeat 10] [--device cpu]
"""

from __future__ import annotations

import argparse
import time

import torch

from precsim.formats import parse_format
from precsim.formats.backend import run_quantize, set_compile
from precsim.formats.random import draw_seed

FAMILIES = [
    ("bf16", "bf16"),
    ("FlexFP/OCP fp8", "fp8_e4m3"),
    ("HFP8 fwd (b=-4)", "hfp8_fwd"),
    ("int8 per-tensor", "int8"),
    ("int8 per-channel", "int8(axis=0)"),
    ("DSE 1-4-3", "dse(e=4,m=3)"),
    ("MXFP8 E4M3", "mxfp8_e4m3"),
    ("MXFP4", "mxfp4"),
]


def timed(fn, repeat: int, device: str) -> float:
    """Median seconds per call."""
    times = []
    for _ in range(repeat):
        if device == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--numel", type=int, default=2**24)
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--device", default="cpu")
    p.add_argument("--eager", action="store_true", help="also time the eager reference path")
    args = p.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.numel, device=args.device)
    x2d = x.view(-1, 4096)
    seed = draw_seed(None, args.device)
    clone = timed(lambda: x.clone(), args.repeat, args.device)
    print(f"# {args.numel} float32 values on {args.device}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; clone = {clone * 1e3:.2f} ms")
    peer = timed(lambda: torch.fake_quantize_per_tensor_affine(x, 0.02, 0, -128, 127), args.repeat, args.device)
    print(f"peer torch.fake_quantize_per_tensor_affine: {peer / clone:.2f}x clone")
    print(f"{'family':18s} {'spec':14s} {'nearest':>8s} {'stoch.':>8s} {'eager':>8s} {'compile s':>9s}")
    for family, spec in FAMILIES:
        fmt = parse_format(spec)
        t = x2d if "axis" in spec else x
        set_compile(True)
        start = time.perf_counter()
        run_quantize(fmt, t, "nearest")
        run_quantize(fmt, t, "stochastic", seed)
        first = time.perf_counter() - start
        near = timed(lambda fmt=fmt, t=t: run_quantize(fmt, t, "nearest"), args.repeat, args.device)
        sr = timed(lambda fmt=fmt, t=t: run_quantize(fmt, t, "stochastic", seed), args.repeat, args.device)
        eager = float("nan")
        if args.eager:
            set_compile(False)
            eager = timed(lambda fmt=fmt, t=t: run_quantize(fmt, t, "nearest"), 3, args.device) / clone
        print(f"{family:18s} {spec:14s} {near / clone:7.2f}x {sr / clone:7.2f}x {eager:7.1f}x {first:9.1f}")


if __name__ == "__main__":
    main()
