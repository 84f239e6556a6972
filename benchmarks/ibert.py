"""The integer-only all-MiniLM-L6-v2 (I-BERT): accuracy against FP32 and the simulation, per-layer
agreement, size and latency, on real text (sentences of the Python Language Reference, offline).

    python benchmarks/ibert.py [--calibration 128] [--test 256] [--length 64] [--batch 16]

For each config (``ibert_config`` as it is: int8 GEMM operands; and ``wide``: LayerNorm and GELU
outputs, hence the Linear inputs they feed, at int16) it calibrates the simulation (PTQ), converts
it with ``precsim.convert`` and prints: mean and minimum cosine of the sentence embeddings to
FP32 and integer-vs-simulation; nearest-neighbour retrieval agreement with FP32 (each test
sentence's nearest other sentence); per layer, how far the integer model's LayerNorm/GELU output
codes are from the simulation's (mean |difference| in output LSBs and the share equal); the size
of the integer model; the latency of one batch (``--batch`` sentences of ``--length`` tokens) of
the integer model's torch kernels vs FP32 torch.
"""

from __future__ import annotations

import argparse
import copy
import functools
import statistics
import time
from typing import Any

import torch

import precsim
from precsim.zoo.text import SentenceEncoder, load_minilm, sentences, tokenize


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a, b, dim=-1)


def _neighbours(e: torch.Tensor) -> torch.Tensor:
    sim = torch.nn.functional.normalize(e, dim=-1) @ torch.nn.functional.normalize(e, dim=-1).T
    sim.fill_diagonal_(-2)
    return sim.argmax(-1)


def _median_time(fn: Any, repeat: int = 5) -> float:
    fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def per_layer(sim: torch.nn.Module, imodel: precsim.IntegerModel, batch: dict[str, torch.Tensor]) -> list[tuple[str, float, float]]:
    """(layer, mean |int - sim| in output LSBs, share equal) for every LayerNorm and GELU output."""
    record: list[tuple[str, str, torch.Tensor]] = []
    imodel.run_integer(record=record, **batch)
    got = {name: t for name, what, t in record if what == "output"}
    seen: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, name=name: seen.__setitem__(name, o.detach()))
             for name, m in sim.named_modules() if type(m).__name__ in ("LayerNorm", "GELUActivation")]
    with torch.no_grad():
        sim(**batch)
    for h in hooks:
        h.remove()
    ops = {op.name: op for op in imodel.ops}
    rows = []
    for name, out in seen.items():
        qp = ops[name].out_qp  # type: ignore[attr-defined]
        d = (got[name].float() - (torch.round(out / qp.scale) + qp.zero_point)).abs()
        rows.append((name.removeprefix("encoder.encoder.").removeprefix("encoder."), d.mean().item(),
                     (d == 0).float().mean().item()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", type=int, default=128, help="calibration sentences")
    ap.add_argument("--test", type=int, default=256, help="test sentences (after the calibration ones)")
    ap.add_argument("--length", type=int, default=64, help="tokens per sentence (padded/truncated)")
    ap.add_argument("--batch", type=int, default=16)
    args = ap.parse_args()
    torch.manual_seed(0)
    base, tokenizer = load_minilm()
    texts = [s for _, s in sentences()]
    fp32 = SentenceEncoder(base).eval()
    b = args.batch
    calib = [tokenize(tokenizer, texts[i:i + b], args.length) for i in range(0, args.calibration, b)]
    start = args.calibration
    test = [tokenize(tokenizer, texts[i:i + b], args.length) for i in range(start, start + args.test, b)]
    with torch.no_grad():
        ref = torch.cat([fp32(**t) for t in test])
    print(f"all-MiniLM-L6-v2, {len(calib) * b} calibration and {len(test) * b} test sentences of {args.length} "
          f"tokens, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| config | sim cos to FP32 mean / min | integer cos to FP32 mean / min | integer cos to sim mean / min "
          "| NN agreement sim / integer | integer MB (FP32 MB) | torch int / FP32 latency |")
    print("|---|---|---|---|---|---|---|")
    layers = {}
    for label in ("ibert_config (int8 operands)", "wide (LayerNorm, GELU outputs int16)"):
        wide = label.startswith("wide")
        cfg = precsim.ibert_config(fp32, layer_norm="int16" if wide else None, gelu="int16" if wide else None)
        sim = precsim.calibrate(copy.deepcopy(fp32), calib, cfg)
        imodel = precsim.convert(sim, example=calib[0])
        with torch.no_grad():
            s = torch.cat([sim(**t) for t in test])
        out = torch.cat([imodel(**t) for t in test])
        nn_ref = _neighbours(ref)
        agree = [(_neighbours(e) == nn_ref).float().mean().item() * 100 for e in (s, out)]
        with torch.no_grad():
            t_fp32 = _median_time(lambda: fp32(**test[0]))
        t_int = _median_time(functools.partial(imodel.run_integer, **test[0]))
        mb = imodel.nbytes() / 2**20
        mb32 = sum(p.numel() * p.element_size() for p in fp32.parameters()) / 2**20
        pairs = [(s, ref), (out, ref), (out, s)]
        cos = " | ".join(f"{_cos(x, y).mean():.4f} / {_cos(x, y).min():.4f}" for x, y in pairs)
        print(f"| {label} | {cos} | {agree[0]:.1f}% / {agree[1]:.1f}% | {mb:.1f} ({mb32:.1f}) | "
              f"{t_int * 1e3:.0f} / {t_fp32 * 1e3:.0f} ms ({t_int / t_fp32:.1f}x) |")
        layers[label] = per_layer(sim, imodel, test[0])
    print("\nInteger vs simulation per layer: mean |difference| in output LSBs (share of codes equal)\n")
    names = list(layers)
    print("| layer | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    for i, (layer, _, _) in enumerate(layers[names[0]]):
        print(f"| {layer} | " + " | ".join(f"{layers[n][i][1]:.2f} ({layers[n][i][2] * 100:.0f}%)" for n in names) + " |")


if __name__ == "__main__":
    main()
