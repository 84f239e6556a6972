"""Quantization-aware fine-tuning of the real all-MiniLM-L6-v2, with quantized GEMM operands and
quantized stochastic gradients, against FP32: the loss curve and the held-out accuracy.

The task is real and small: tell which topic of the Python Language Reference a sentence comes
from (the 8 topics with the most sentences; :func:`precsim.zoo.text.topic_sentences`), from the
mean-pooled embedding through one linear layer. Every 4th sentence is held out. The loop is a
plain PyTorch loop; precsim enters through one ``precsim.prepare`` call:

    model = precsim.prepare(model, {"points": "operands", "activation": "int8", "weight": "int8",
                                    "gradient": {"format": "fp8_e5m2", "rounding": "stochastic"}})

Writes ``transformer_qat.csv`` (step, scheme, loss) and ``transformer_qat.png`` to ``--out``
and prints a markdown table.

    python benchmarks/transformer_qat.py [--steps 200] [--length 48] [--out docs]
"""

from __future__ import annotations

import argparse
import copy
import csv
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import precsim
from precsim.zoo.text import embed, load_minilm, tokenize, topic_sentences


def operands(fmt: str, gradient: str) -> dict[str, Any]:
    """Operand points in ``fmt``, every gradient in ``gradient`` with stochastic rounding."""
    sr = {"format": gradient, "rounding": "stochastic"}
    return {"points": "operands", "activation": fmt, "weight": fmt, "gradient": sr, "weight_gradient": sr}


SCHEMES: list[tuple[str, dict[str, Any] | None]] = [
    ("fp32", None),
    ("int8 operands, SR fp8_e5m2 gradients", operands("int8", "fp8_e5m2")),
    ("mxfp8 operands, SR mxfp8_e5m2 gradients", operands("mxfp8_e4m3", "mxfp8_e5m2")),
    ("mxfp4 operands, SR mxfp8_e5m2 gradients", operands("mxfp4", "mxfp8_e5m2")),
]


def train(base: nn.Module, cfg: dict[str, Any] | None, data: dict[str, Any], steps: int, batch: int,
          seed: int = 0) -> tuple[list[float], float]:
    """(training loss per step, held-out accuracy) of one fine-tuning run."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base).train()
    head = nn.Linear(384, data["classes"])
    if cfg is not None:
        precsim.prepare(model, cfg, seed=seed)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": 5e-5}, {"params": head.parameters(), "lr": 2e-3}])
    inputs, labels = data["train"]
    g = torch.Generator().manual_seed(seed)
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, len(labels), (batch,), generator=g)
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(head(embed(model, {k: v[idx] for k, v in inputs.items()})) * 20, labels[idx])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    model.eval()
    test_inputs, test_labels = data["test"]
    with torch.no_grad():
        pred = torch.cat([head(embed(model, {k: v[i:i + 64] for k, v in test_inputs.items()})).argmax(-1)
                          for i in range(0, len(test_labels), 64)])
    return losses, (pred == test_labels).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--out", type=Path, default=Path("docs"))
    args = parser.parse_args()
    torch.set_num_threads(min(os.cpu_count() or 1, 2))
    base, tokenizer = load_minilm()
    texts, labels, names = topic_sentences(8)
    enc = tokenize(tokenizer, texts, args.length)
    held = torch.arange(len(texts)) % 4 == 0
    data = {"classes": len(names), "train": ({k: v[~held] for k, v in enc.items()}, labels[~held]),
            "test": ({k: v[held] for k, v in enc.items()}, labels[held])}
    print(f"all-MiniLM-L6-v2 fine-tuned on {int((~held).sum())} sentences ({len(names)} topics), "
          f"{int(held.sum())} held out; {args.steps} steps of batch {args.batch} x {args.length} tokens; "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}\n")
    print("| scheme | loss, first 20 steps | loss, last 20 steps | held-out accuracy | time (s) |")
    print("|---|---:|---:|---:|---:|")
    curves = {}
    for name, cfg in SCHEMES:
        t = time.perf_counter()
        losses, acc = train(base, cfg, data, args.steps, args.batch)
        curves[name] = losses
        first, last = sum(losses[:20]) / 20, sum(losses[-20:]) / 20
        print(f"| {name} | {first:.3f} | {last:.3f} | {acc:.3f} | {time.perf_counter() - t:.0f} |", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "transformer_qat.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "scheme", "loss"])
        for name, losses in curves.items():
            w.writerows((i, name, f"{v:.5f}") for i, v in enumerate(losses))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, losses in curves.items():
        k = 10
        smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
        ax.plot(smooth, label=name)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (mean of 10 steps)")
    ax.set_title("all-MiniLM-L6-v2 fine-tuning: quantized operands and gradients vs FP32")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "transformer_qat.png", dpi=120)


if __name__ == "__main__":
    main()
