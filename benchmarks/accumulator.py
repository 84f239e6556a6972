"""Accumulators: what simulating the sums inside every GEMM costs, and what it does to accuracy.

1. ``gemm``: a 1024x1024x1024 float32 GEMM with an fp16 accumulator (blocks 128, 32, 16, 8;
   stochastic rounding at 32) and with an int16 one on integer codes (block 32) against the plain GEMM, called alternately
   in one process, with the fused kernel (the default) and the torch path; ratio = median /
   median.
2. ``step``: a training step of the zoo ResNet (batch 128, MNIST-shaped) with an fp16 block-32
   accumulator on every conv, against the FP32 step, interleaved step by step.
3. ``accuracy``: PTQ of a float zoo ResNet trained on MNIST-5k (the small widths of
   ``ptq_vs_qat.py``), test accuracy with an accumulator on every conv and Linear: float
   accumulators of shrinking precision (fp32 operands: only the sums are rounded), blocks of 32
   and of 1 (every product rounded), with and without promotion; integer accumulators on int8
   codes (weights per channel, Conv/Linear inputs uint8), wrap and saturate, with their
   overflow events.
4. ``transformer``: the real all-MiniLM-L6-v2 with an accumulator on every GEMM (``points:
   operands``), its sentence embeddings against FP32's.

    python benchmarks/accumulator.py [--only gemm|step|accuracy|ptq|qat|transformer] [--threads 2] [--quick]
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import precsim
from precsim.formats import parse_format
from precsim.qat.accumulator import overflows
from precsim.runtime import accumulate, native
from precsim.runtime.accumulate import exact_dtype, matmul_float, matmul_int
from precsim.runtime.backend import compile_seconds
from precsim.zoo import get_model, load_dataset, train_steps


def interleaved(fns: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Median ms of each function, called in turn ``rounds`` times (after one warm-up each), so
    that drifting machine load hits them alike."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def gemm(rounds: int, size: int) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(size, size), torch.randn(size, size)
    fp16 = parse_format("fp16")
    start = time.perf_counter()
    lib = accumulate.fused_kernel(fp16, "nearest")  # built on first use (a fresh PRECSIM_CACHE_DIR: a build), then probed
    ready = time.perf_counter() - start
    print(f"\n### GEMM {size}x{size}x{size} float32, fp16 accumulator ({torch.get_num_threads()} threads)\n")
    state = "NOT AVAILABLE: " + native.why_missing() if lib is None else (
        "ready" + ("" if native.threaded(lib[0]) else " (no OpenMP: one thread)"))
    print(f"fused kernel: {state} in {ready:.2f} s (cache {native.cache_dir()}); torch path: the fallback, "
          "compiled kernels, compilation not timed\n")
    print("| block | plain (ms) | accumulated (ms) | ratio | torch path (ms) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|")

    def torch_path(block: int, a: torch.Tensor = a, b: torch.Tensor = b) -> torch.Tensor:
        accumulate.FUSED = False
        try:
            return matmul_float(a, b, fp16, block)
        finally:
            accumulate.FUSED = True
    for block in (128, 32, 16, 8):
        t = interleaved({"plain": lambda: a @ b, "acc": lambda b_=block: matmul_float(a, b, fp16, b_),
                         "torch": lambda b_=block: torch_path(b_)}, rounds)
        print(f"| {block} | {t['plain']:.1f} | {t['acc']:.1f} | {t['acc'] / t['plain']:.2f} | {t['torch']:.1f} | "
              f"{t['torch'] / t['plain']:.2f} |", flush=True)
    small = 256
    a2, b2 = a[:small, :small].contiguous(), b[:small, :small].contiguous()
    t = interleaved({"plain": lambda: a2 @ b2, "acc": lambda: matmul_float(a2, b2, fp16, 1),
                     "torch": lambda: torch_path(1, a2, b2)}, rounds)
    print(f"| 1 ({small}^3) | {t['plain']:.2f} | {t['acc']:.1f} | {t['acc'] / t['plain']:.0f} | {t['torch']:.1f} | "
          f"{t['torch'] / t['plain']:.0f} |")
    seed = torch.tensor([1, 2], dtype=torch.int32)

    def stochastic(fused: bool) -> object:
        accumulate.FUSED = fused
        try:
            return matmul_float(a, b, fp16, 32, rounding="stochastic", seed=seed)
        finally:
            accumulate.FUSED = True
    t = interleaved({"plain": lambda: a @ b, "acc": lambda: stochastic(True), "torch": lambda: stochastic(False)},
                    rounds)
    print(f"| 32, stochastic rounding | {t['plain']:.1f} | {t['acc']:.1f} | {t['acc'] / t['plain']:.2f} | "
          f"{t['torch']:.1f} | {t['torch'] / t['plain']:.2f} |")
    ca, cb = torch.randint(-128, 128, (size, size)).float(), torch.randint(0, 256, (size, size)).float()
    exact = exact_dtype(128, 255, 32)

    def int16(fused: bool) -> object:
        accumulate.FUSED = fused
        try:
            return matmul_int(ca, cb, 16, 32, dtype=exact)
        finally:
            accumulate.FUSED = True
    t = interleaved({"plain": lambda: a @ b, "acc": lambda: int16(True), "torch": lambda: int16(False)}, rounds)
    print(f"| 32, int16 wrap (int8 x uint8 codes) | {t['plain']:.1f} | {t['acc']:.1f} | {t['acc'] / t['plain']:.2f} | "
          f"{t['torch']:.1f} | {t['torch'] / t['plain']:.2f} |")


def step(rounds: int) -> None:
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    steps = {}
    conv = {"rules": [{"type": "Conv2d", "accumulator": {"format": "fp16", "block": 32}}]}
    for name, cfg, fused in (("fp32", None, True),
                             ("fp16 block 32 on every conv", conv, True),
                             ("same, torch path (no fused kernel)", conv, False),
                             ("fp16 block 32 promote 128, every conv and Linear",
                              {"accumulator": {"format": "fp16", "block": 32, "promote": 128}}, True)):
        model = get_model("resnet")
        if cfg is not None:
            precsim.prepare(model, cfg)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

        def run(model: nn.Module = model, opt: torch.optim.Optimizer = opt, fused: bool = fused) -> None:
            accumulate.FUSED = fused
            try:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(model(x), y).backward()
                opt.step()
            finally:
                accumulate.FUSED = True
        steps[name] = run
    before = compile_seconds()
    t = interleaved(steps, rounds)
    print(f"\n### Training step, zoo ResNet, batch 128 ({torch.get_num_threads()} threads; compiling: "
          f"{compile_seconds() - before:.0f} s, not timed)\n")
    print("| scheme | step (ms) | x FP32 |")
    print("|---|---:|---:|")
    for name, ms in t.items():
        print(f"| {name} | {ms:.0f} | {ms / t['fp32']:.2f} |")


# (row, format): float accumulators of shrinking precision; e4m3 (max 448) saturates
FLOATS: list[tuple[str, str]] = [
    ("fp16 (e5m10)", "fp16"), ("bf16 (e8m7)", "bf16"), ("e5m8", "flexfp(e=5,m=8)"), ("e5m6", "flexfp(e=5,m=6)"),
    ("e5m4", "flexfp(e=5,m=4)"), ("e5m3", "flexfp(e=5,m=3)"), ("e5m2 (fp8_e5m2)", "fp8_e5m2"),
    ("e5m1", "flexfp(e=5,m=1)"), ("e4m3 (fp8_e4m3, saturates at 448)", "fp8_e4m3"),
]
# (column, block, promote)
COLUMNS: list[tuple[str, int, int | None]] = [("block 32", 32, None), ("block 32, promote 128", 32, 128),
                                              ("block 1", 1, None), ("block 1, promote 32", 1, 32)]
INTS = ["int32", "int24", "int20", "int18", "int16", "int14"]


@torch.no_grad()
def accuracy_of(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    return (model(x).argmax(1) == y).float().mean().item() * 100


QAT_ROWS: list[tuple[str, dict[str, Any]]] = [
    ("e5m2, block 1", {"accumulator": {"format": "fp8_e5m2", "block": 1}}),
    ("e5m1, block 1", {"accumulator": {"format": "flexfp(e=5,m=1)", "block": 1}}),
    ("e5m1, block 32", {"accumulator": {"format": "flexfp(e=5,m=1)", "block": 32}}),
    ("int16 saturate, block 32 (int8 codes)", {"accumulator": {"format": "int16", "block": 32,
                                                               "overflow": "saturate"}}),
]


def accuracy(float_steps: int, calib: int, widths: tuple[int, ...], qat_steps: int, ptq: bool = True,
             qat: bool = True) -> None:
    train_set, test_set = load_dataset("mnist5k")
    torch.manual_seed(0)
    base = get_model("resnet", in_channels=1, num_classes=10, widths=widths)
    train_steps(base, train_set, float_steps, 5e-3, seed=0)
    base.eval()
    def loader() -> DataLoader:  # the same calibration batches for every setting
        return DataLoader(train_set, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(1))
    start = time.perf_counter()
    operands = {"weight": {"format": "int8", "granularity": "per_channel"},
                "rules": [{"type": ["Conv2d", "Linear"], "input": "uint8"}]}
    if ptq:
        ptq_tables(base, test_set, loader, operands, calib, widths, start)
    if qat:
        qat_table(base, train_set, test_set, loader, operands, calib, qat_steps)
    print(f"\n(accuracy part: {time.perf_counter() - start:.0f} s)")


def ptq_tables(base: nn.Module, test_set: TensorDataset, loader: Callable[[], DataLoader], operands: dict[str, Any],
               calib: int, widths: tuple[int, ...], start: float) -> None:
    print(f"\n### PTQ accuracy on MNIST-5k test (1000 digits), ResNet widths {widths}, accumulator on every "
          "conv and Linear\n")
    plain = precsim.prepare(copy.deepcopy(base), {}).eval()
    print(f"fp32 operands; float32 sums (the plain GEMM): {accuracy_of(plain, test_set):.1f}\n")
    print("| float accumulator | " + " | ".join(c for c, _, _ in COLUMNS) + " |")
    print("|---|" + "---:|" * len(COLUMNS))
    for name, fmt in FLOATS:
        cells = []
        for _, block, promote in COLUMNS:
            acc = {"format": fmt, "block": block, **({"promote": promote} if promote else {})}
            model = precsim.prepare(copy.deepcopy(base), {"accumulator": acc}).eval()
            cells.append(f"{accuracy_of(model, test_set):.1f}")
        print(f"| {name} | " + " | ".join(cells) + f" |  ({time.perf_counter() - start:.0f} s)", flush=True)
    print("\n| integer accumulator (int8 codes) | wrap | overflow events | saturate | overflow events |")
    print("|---|---:|---:|---:|---:|")
    ref = precsim.calibrate(copy.deepcopy(base), loader(), operands, batches=calib)
    print(f"| none (int8 operands, float32 sums) | {accuracy_of(ref, test_set):.1f} | | | |")
    for width in INTS:
        cells = []
        for overflow in ("wrap", "saturate"):
            cfg = {**operands, "accumulator": {"format": width, "block": 32, "overflow": overflow}}
            model = precsim.calibrate(copy.deepcopy(base), loader(), cfg, batches=calib)
            for m in model.modules():
                if hasattr(m, "overflows"):
                    m.overflows.zero_()
            cells += [f"{accuracy_of(model, test_set):.1f}", str(sum(overflows(model).values()))]
        print(f"| {width} | " + " | ".join(cells) + " |", flush=True)


def qat_table(base: nn.Module, train_set: TensorDataset, test_set: TensorDataset, loader: Callable[[], DataLoader],
              operands: dict[str, Any], calib: int, qat_steps: int) -> None:
    print(f"\n### Short QAT ({qat_steps} steps of fine-tuning from the float model, Adam 5e-4) where PTQ lost "
          "accuracy\n")
    print("| setting | PTQ | QAT |")
    print("|---|---:|---:|")
    for name, cfg in QAT_ROWS:
        full = {**(operands if "int" in name else {}), **cfg}
        ptq = precsim.calibrate(copy.deepcopy(base), loader(), full, batches=calib)
        qat = precsim.calibrate(copy.deepcopy(base), loader(), full, batches=calib)
        train_steps(qat, train_set, qat_steps, 5e-4, seed=2)
        qat.eval()
        print(f"| {name} | {accuracy_of(ptq, test_set):.1f} | {accuracy_of(qat, test_set):.1f} |", flush=True)


TRANSFORMER: list[tuple[str, dict[str, Any] | None]] = [
    ("fp32 (plain GEMMs)", None),
    ("fp16, block 32", {"format": "fp16", "block": 32}),
    ("bf16, block 32", {"format": "bf16", "block": 32}),
    ("e5m3, block 32", {"format": "flexfp(e=5,m=3)", "block": 32}),
    ("e5m3, block 32, promote 128", {"format": "flexfp(e=5,m=3)", "block": 32, "promote": 128}),
    ("e5m2, block 32", {"format": "fp8_e5m2", "block": 32}),
    ("e5m2, block 32, promote 128", {"format": "fp8_e5m2", "block": 32, "promote": 128}),
    ("e5m2, block 4", {"format": "fp8_e5m2", "block": 4}),
    ("e5m2, block 4, promote 128", {"format": "fp8_e5m2", "block": 4, "promote": 128}),
]


def transformer(count: int, length: int) -> None:
    """The real all-MiniLM-L6-v2 (``points: operands``: every Linear, matmul and attention GEMM;
    K = 384, 1536 in the FFN's second Linear, 32 and 64 in attention): sentence embeddings
    against FP32's, as in ``transformer_ptq.py``."""
    from precsim.zoo.text import embed, load_minilm, sentences, tokenize

    base, tokenizer = load_minilm()
    texts = [s for _, s in sentences()]
    texts = texts[::max(1, len(texts) // count)][:count]
    batches = [tokenize(tokenizer, texts[i:i + 32], length) for i in range(0, len(texts), 32)]
    with torch.no_grad():
        ref = torch.cat([embed(base, b) for b in batches])
    print(f"\n### all-MiniLM-L6-v2, {len(texts)} sentences, {length} tokens: accumulator on every GEMM "
          "(points: operands), fp32 operands\n")
    print("| accumulator | mean cos to FP32 | min cos | NN agreement |")
    print("|---|---:|---:|---:|")
    for name, acc in TRANSFORMER:
        model = precsim.prepare(copy.deepcopy(base), {"points": "operands", **({"accumulator": acc} if acc else {})})
        with torch.no_grad():
            emb = torch.cat([embed(model, b) for b in batches])
        cos = (emb * ref).sum(-1)
        same = (_nearest(emb) == _nearest(ref)).float().mean()
        print(f"| {name} | {cos.mean():.4f} | {cos.min():.4f} | {same:.3f} |", flush=True)


def _nearest(e: torch.Tensor) -> torch.Tensor:
    sim = e @ e.t()
    sim.fill_diagonal_(-2.0)
    return sim.argmax(1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", choices=("gemm", "step", "accuracy", "ptq", "qat", "transformer"),
                   help="accuracy: ptq and qat")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--float-steps", type=int, default=120)
    p.add_argument("--qat-steps", type=int, default=30)
    p.add_argument("--sentences", type=int, default=32, help="transformer part (64: 6 min on 2 threads)")
    p.add_argument("--quick", action="store_true", help="a smoke run")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{datetime.date.today()}, {platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, "
          f"{args.threads} threads")
    if args.only in (None, "gemm"):
        gemm(2 if args.quick else args.rounds, 256 if args.quick else 1024)
    if args.only in (None, "step"):
        step(2 if args.quick else args.rounds)
    if args.only in (None, "accuracy", "ptq", "qat"):
        accuracy(10 if args.quick else args.float_steps, 1 if args.quick else 4, (4, 8) if args.quick else (8, 16, 32),
                 2 if args.quick else args.qat_steps, ptq=args.only != "qat", qat=args.only != "ptq")


    if args.only in (None, "transformer"):
        transformer(8 if args.quick else args.sentences, 64)


if __name__ == "__main__":
    main()
