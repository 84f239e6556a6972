"""FP32 vs simulated (fake-quant) vs integer-only (I-ViT) accuracy of the zoo ViT on MNIST.

Trains the zoo ViT in float32 on the bundled 4,000-image MNIST training split, then fine-tunes
a copy with I-ViT's quantizers (:func:`precsim.ivit_config`: int8 weights per channel and
activations, int16 residual stream, uint16 softmax output) and converts it with
:func:`precsim.convert` to an integer-only model (dyadic requantization, Shiftmax, ShiftGELU,
I-LayerNorm). Prints test accuracy on the 1,000 test images for the three, how often the
integer model's argmax agrees with the simulation's, model sizes and CPU latency.

    python benchmarks/ivit_accuracy.py [--dim 64 --depth 4 --heads 4] [--fp32-epochs 10]
        [--qat-epochs 2] [--checkpoint /tmp/vit_fp32.pt] [--qat-checkpoint /tmp/vit_qat.pt]

``--checkpoint`` / ``--qat-checkpoint``: the FP32 weights / the QAT model's state dict (observer
ranges included) are loaded from there if the file exists, else trained and saved there, so the
QAT half, or just the evaluation and timing, can be rerun alone.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import io
import json
import platform
import time
from collections.abc import Callable
from pathlib import Path

import torch
from _timing import timeit
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import precsim
from precsim.zoo import get_model, load_dataset


def train(model: nn.Module, data: TensorDataset, epochs: int, lr: float, batch: int, seed: int) -> float:
    """Adam with a cosine learning-rate decay; returns the wall time in seconds."""
    loader = DataLoader(data, batch_size=batch, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * len(loader)))
    start = time.perf_counter()
    for epoch in range(epochs):
        model.train()
        total = 0.0
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item()
        print(f"  epoch {epoch + 1}/{epochs}: loss {total / len(loader):.4f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    model.eval()
    return time.perf_counter() - start


def load_or_train(model: nn.Module, path: Path | None, what: str, plan: str, fit: Callable[[], float]) -> float:
    """Load ``model``'s state dict from ``path`` if that file exists (0 s), else print ``plan``, run ``fit``
    (returns its wall time) and save the state dict there when a ``path`` is given. ``model`` ends in eval mode."""
    if path is not None and path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        model.eval()
        print(f"{what} loaded from {path}")
        return 0.0
    print(plan)
    seconds = fit()
    if path is not None:
        torch.save(model.state_dict(), path)
    model.eval()
    return seconds


def predictions(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = 250) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([fn(x[i:i + chunk]) for i in range(0, len(x), chunk)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--patch", type=int, default=4)
    ap.add_argument("--fp32-epochs", type=int, default=10)
    ap.add_argument("--qat-epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--qat-lr", type=float, default=1e-4)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--checkpoint", type=Path, default=None)
    ap.add_argument("--qat-checkpoint", type=Path, default=None)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    train_set, test_set = load_dataset("mnist5k")
    x, labels = test_set.tensors
    started = time.perf_counter()

    model = get_model("vit", patch_size=args.patch, dim=args.dim, depth=args.depth, heads=args.heads)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ViT patch {args.patch}, width {args.dim}, depth {args.depth}, {args.heads} heads: {n_params} parameters")
    fp32_time = load_or_train(
        model, args.checkpoint, "FP32 weights",
        f"FP32 training: {args.fp32_epochs} epochs, Adam lr {args.lr} (cosine), batch {args.batch}",
        lambda: train(model, train_set, args.fp32_epochs, args.lr, args.batch, seed=0))
    acc_fp32 = (predictions(model, x).argmax(1) == labels).float().mean().item() * 100
    print(f"FP32 test accuracy {acc_fp32:.1f}%")

    qmodel = copy.deepcopy(model)
    precsim.prepare(qmodel, precsim.ivit_config(qmodel))
    qat_time = load_or_train(  # the QAT state dict holds the observer ranges too
        qmodel, args.qat_checkpoint, "QAT weights and quantizer state",
        f"QAT: {args.qat_epochs} epochs, Adam lr {args.qat_lr} (cosine), batch {args.batch}",
        lambda: train(qmodel, train_set, args.qat_epochs, args.qat_lr, args.batch, seed=1))
    sim = predictions(qmodel, x)
    acc_sim = (sim.argmax(1) == labels).float().mean().item() * 100
    print(f"simulated (fake-quant) test accuracy {acc_sim:.1f}%")

    t = time.perf_counter()
    imodel = precsim.convert(qmodel)
    convert_s = time.perf_counter() - t
    t = time.perf_counter()
    out = predictions(imodel, x)
    int_eval_s = time.perf_counter() - t
    acc_int = (out.argmax(1) == labels).float().mean().item() * 100
    agree = (out.argmax(1) == sim.argmax(1)).float().mean().item() * 100
    qp = imodel.output_qp
    code_diff = ((out - sim) / qp.scale).round().abs()
    print(f"integer-only test accuracy {acc_int:.1f}% (argmax agrees with the simulation on {agree:.1f}%; "
          f"logit codes differ by {code_diff.mean():.1f} on average, {code_diff.max():.0f} at most, "
          f"of a range of {out.abs().max() / qp.scale:.0f})")

    fp32_bytes = sum(p.numel() * 4 for p in model.parameters())
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fp32_file = buf.tell()
    buf = io.BytesIO()
    torch.save(imodel.state(), buf)
    int_file = buf.tell()

    lat = {}
    for batch in (1, 64):
        xb = x[:batch]
        with torch.no_grad():
            lat[batch] = (timeit(lambda xb=xb: model(xb), args.repeats), timeit(lambda xb=xb: imodel(xb), args.repeats))

    rows = [("FP32", acc_fp32), ("simulated (fake-quant, I-ViT quantizers)", acc_sim), ("integer-only", acc_int)]
    print()
    print(f"{platform.machine()} {platform.processor() or ''}, torch {torch.__version__}, {args.threads} threads, "
          f"{datetime.date.today()}")
    print("| model | test accuracy (%) |")
    print("|---|---|")
    for name, acc in rows:
        print(f"| {name} | {acc:.1f} |")
    print()
    print(f"| size | FP32 | integer |\n|---|---|---|\n| parameters / integer constants | {fp32_bytes:,} B | "
          f"{imodel.nbytes():,} B |\n| saved file | {fp32_file:,} B | {int_file:,} B |")
    print()
    print("| batch | FP32 torch | integer model, torch CPU | integer / FP32 |\n|---|---|---|---|")
    for batch, (f, i) in lat.items():
        print(f"| {batch} | {f:.2f} ms | {i:.2f} ms | {i / f:.1f}x |")
    total = time.perf_counter() - started
    print(f"\nFP32 training {fp32_time:.0f} s, QAT {qat_time:.0f} s, convert {convert_s:.1f} s, integer eval of "
          f"{len(x)} images {int_eval_s:.1f} s, total {total:.0f} s")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "dim": args.dim, "depth": args.depth, "heads": args.heads, "patch": args.patch, "params": n_params,
            "fp32_epochs": args.fp32_epochs, "qat_epochs": args.qat_epochs, "acc_fp32": acc_fp32,
            "acc_sim": acc_sim, "acc_int": acc_int, "argmax_agree": agree, "code_diff_max": float(code_diff.max()),
            "fp32_bytes": fp32_bytes, "int_bytes": imodel.nbytes(), "fp32_file": fp32_file, "int_file": int_file,
            "latency_ms": {str(b): v for b, v in lat.items()}, "fp32_time_s": fp32_time, "qat_time_s": qat_time,
            "total_s": total}, indent=1))


if __name__ == "__main__":
    main()
