"""A training step of the real all-MiniLM-L6-v2 with quantized GEMM operands, as a ratio to FP32.

The step is what a user runs: forward (mean-pooled embeddings, a linear head, cross-entropy),
backward and AdamW, batch 16 x 64 tokens, with the model ``precsim.prepare``d by default
settings (compiled kernels on by default; no environment variable, no extra call). Every row is
timed interleaved with the FP32 step, call by call, so that drifting machine load hits both
alike; ratio = median / median. First-call time (kernel compilation) is reported separately.

Rows: operand points (every Linear operand and both attention GEMMs) in int8 / fp8 / MXFP8,
then with stochastic FP8 gradients; module-output points (the paper's placement) for
comparison; and torchao's QAT (int8 per-token activations, int8 per-channel weights, Linear
only) when torchao is installed (``pip install -c constraints.txt -e '.[bench]'``).

    python benchmarks/transformer_step.py [--repeat 15] [--batch 16] [--length 64]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import precsim
from precsim.zoo.text import embed, load_minilm, tokenize, topic_sentences


def operands(fmt: str, weight: Any = None, gradient: str | None = None) -> dict[str, Any]:
    """Operand points in ``fmt`` (weights in ``weight``), gradients in ``gradient`` (stochastic)."""
    cfg = {"points": "operands", "activation": fmt, "weight": weight or fmt}
    if gradient is not None:
        cfg["gradient"] = cfg["weight_gradient"] = {"format": gradient, "rounding": "stochastic"}
    return cfg


ROWS: list[tuple[str, dict[str, Any] | None]] = [
    ("operands int8 (W per-channel)", operands("int8", {"format": "int8", "granularity": "per_channel"})),
    ("operands fp8_e4m3", operands("fp8_e4m3")),
    ("operands mxfp8_e4m3", operands("mxfp8_e4m3")),
    ("operands int8 + SR fp8 gradients", operands("int8", gradient="fp8_e5m2")),
    ("operands mxfp8 + SR mxfp8_e5m2 gradients", operands("mxfp8_e4m3", gradient="mxfp8_e5m2")),
    ("outputs int8 (Linear outputs and weights)", {"activation": "int8", "weight": "int8"}),
]


def torchao_qat(model: nn.Module) -> nn.Module | None:
    """torchao's QAT on every Linear: int8 per-token activations, int8 per-channel weights."""
    try:
        from torchao.quantization import quantize_
        from torchao.quantization.qat import IntxFakeQuantizeConfig, QATConfig
    except ImportError:
        return None
    act = IntxFakeQuantizeConfig(torch.int8, "per_token", is_symmetric=False)
    weight = IntxFakeQuantizeConfig(torch.int8, "per_channel")
    quantize_(model, QATConfig(activation_config=act, weight_config=weight, step="prepare"))
    return model


def make_step(model: nn.Module, head: nn.Module, inputs: dict[str, torch.Tensor],
              labels: torch.Tensor) -> Callable[[], None]:
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=1e-5)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(head(embed(model, inputs)) * 20, labels).backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--only", default="", help="run the rows whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(min(os.cpu_count() or 1, 2))
    base, tokenizer = load_minilm()
    texts, labels, names = topic_sentences(8)
    inputs = tokenize(tokenizer, texts[:args.batch], args.length)
    y = labels[:args.batch]
    torch.manual_seed(0)
    head = nn.Linear(384, len(names))

    def fresh() -> nn.Module:
        return copy.deepcopy(base).train()

    fp32 = make_step(fresh(), copy.deepcopy(head), inputs, y)
    fp32()
    print(f"all-MiniLM-L6-v2 training step, batch {args.batch} x {args.length} tokens, torch {torch.__version__}, "
          f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"{time.strftime('%Y-%m-%d')}, median of {args.repeat} interleaved with FP32\n")
    print("| row | points | first step (s) | step (ms) | FP32 step (ms) | x FP32 |")
    print("|---|---:|---:|---:|---:|---:|")
    rows: list[tuple[str, Callable[[], nn.Module | None]]] = [
        (name, lambda cfg=cfg: precsim.prepare(fresh(), cfg, example_inputs=inputs)) for name, cfg in ROWS]
    rows.append(("torchao QAT int8 per-token A / per-channel W (Linear only)", lambda: torchao_qat(fresh())))
    for name, build in rows:
        if args.only not in name:
            continue
        model = build()
        if model is None:
            print(f"| {name} | - | - | - | - | (torchao not installed) |")
            continue
        step = make_step(model, copy.deepcopy(head), inputs, y)
        t = time.perf_counter()
        step()  # first step: kernel compilation (cached on disk for later runs)
        first = time.perf_counter() - t
        mine, ref = [], []
        for _ in range(args.repeat):
            for fn, out in ((step, mine), (fp32, ref)):
                t = time.perf_counter()
                fn()
                out.append((time.perf_counter() - t) * 1e3)
        m, r = statistics.median(mine), statistics.median(ref)
        n = len(precsim.quantizers(model))
        print(f"| {name} | {n or '-'} | {first:.1f} | {m:.1f} | {r:.1f} | {m / r:.2f} |", flush=True)


if __name__ == "__main__":
    main()
