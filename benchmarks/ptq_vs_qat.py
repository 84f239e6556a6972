"""PTQ vs QAT on the MNIST subset: 8/6/4 bits, weights vs activations vs both, ReLU vs ReLU6.

For each activation function one float ResNet (zoo, small widths) is trained; then every
setting is quantized two ways from those same float weights:

* PTQ: ``precsim.calibrate`` (observers filled from a few training batches, no training),
* QAT: ``precsim.prepare`` + a short fine-tuning run (BatchNorm folded, statistics frozen
  half-way through).

Weights are signed, symmetric, per output channel; activations are unsigned with a zero point
(the model input too). BatchNorm is folded in every setting. Where both weights and
activations are integers the model is also converted, and the integer model's accuracy is
reported next to the simulation's, with gemmlowp's double-rounding requantization (the
default) and with TFLite's single rounding (``convert(model, rounding="single")``).

    python benchmarks/ptq_vs_qat.py            # about 5 minutes on 2 CPU cores
    python benchmarks/ptq_vs_qat.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import copy
import datetime
import platform
import time
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import precsim
from precsim.zoo import get_model, load_dataset, train_steps


def recalibrate_bn(model: nn.Module, data: TensorDataset, batches: int = 8) -> None:
    """Exact BatchNorm statistics for the final float weights."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(data.tensors[0][i * 256:(i + 1) * 256])
    for m in bns:
        m.momentum = 0.1


@torch.no_grad()
def accuracy(fn: Any, data: TensorDataset) -> float:
    x, y = data.tensors
    return (fn(x).argmax(1) == y).float().mean().item() * 100


def config(model: nn.Module, bits: int, what: str, fold: Any) -> dict[str, Any]:
    weight = {"format": f"int{bits}", "granularity": "per_channel"}
    cfg = precsim.integer_config(model, activation=f"uint{bits}", weight=weight, fold_bn=fold)
    if what == "W":  # weights only: no activation, input or pooling quantizers
        return {"weight": weight, "fold_bn": fold}
    if what == "A":
        cfg["weight"] = "fp32"
        cfg["bias"] = "fp32"  # an int32 bias needs the weight scale S_w
    return cfg


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="8,16,32")
    parser.add_argument("--float-steps", type=int, default=120)
    parser.add_argument("--qat-steps", type=int, default=20)
    parser.add_argument("--calib-batches", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="tiny run to check the script works")
    args = parser.parse_args()
    if args.quick:
        args.widths, args.float_steps, args.qat_steps, args.calib_batches = "4,8", 10, 3, 2
    torch.set_num_threads(args.threads)
    widths = tuple(int(w) for w in args.widths.split(","))
    train_set, test_set = load_dataset("mnist5k")
    start = time.perf_counter()
    rows = []
    for act in ("relu", "relu6"):
        torch.manual_seed(0)
        base = get_model("resnet", in_channels=1, num_classes=10, widths=widths, activation=act)
        train_steps(base, train_set, args.float_steps, 5e-3, seed=0)
        recalibrate_bn(base, train_set)
        base.eval()
        fp32 = accuracy(base, test_set)
        for bits in (8, 6, 4):
            for what in ("W", "A", "W+A"):
                loader = DataLoader(train_set, batch_size=128, shuffle=True,
                                    generator=torch.Generator().manual_seed(1))
                ptq = precsim.calibrate(copy.deepcopy(base), loader, config(base, bits, what, True),
                                        batches=args.calib_batches)
                qat = precsim.prepare(copy.deepcopy(base),
                                      config(base, bits, what, {"freeze_after": args.qat_steps // 2}))
                train_steps(qat, train_set, args.qat_steps, 5e-4, seed=2)
                qat.eval()
                row = {"act": act, "bits": bits, "quantized": what, "fp32": fp32,
                       "ptq": accuracy(ptq, test_set), "qat": accuracy(qat, test_set), "ptq_int": None, "qat_int": None,
                       "ptq_int1": None, "qat_int1": None}
                if what == "W+A":
                    row["ptq_int"] = accuracy(precsim.convert(ptq), test_set)
                    row["qat_int"] = accuracy(precsim.convert(qat), test_set)
                    row["ptq_int1"] = accuracy(precsim.convert(ptq, rounding="single"), test_set)
                    row["qat_int1"] = accuracy(precsim.convert(qat, rounding="single"), test_set)
                rows.append(row)
                print(f"  {act} {bits}-bit {what}: PTQ {row['ptq']:.1f}  QAT {row['qat']:.1f}  "
                      f"({time.perf_counter() - start:.0f} s)", flush=True)
    elapsed = time.perf_counter() - start

    def cell(v: float | None) -> str:
        return "-" if v is None else f"{v:.1f}"

    print()
    print(f"MNIST subset (4,000 train / 1,000 test), zoo ResNet widths {widths}, {args.float_steps} float steps, "
          f"{args.qat_steps} QAT steps, PTQ from {args.calib_batches} batches of 128")
    print(f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} threads, "
          f"{datetime.date.today()}, {elapsed:.0f} s")
    print()
    print("| act   | bits | quantized | FP32 | PTQ  | QAT  | PTQ integer | QAT integer | PTQ int, single | "
          "QAT int, single |")
    print("|-------|------|-----------|------|------|------|-------------|-------------|-----------------|"
          "-----------------|")
    for r in rows:
        print(f"| {r['act']:<5} | {r['bits']:>4} | {r['quantized']:<9} | {r['fp32']:.1f} | {cell(r['ptq']):>4} | "
              f"{cell(r['qat']):>4} | {cell(r['ptq_int']):>11} | {cell(r['qat_int']):>11} | "
              f"{cell(r['ptq_int1']):>15} | {cell(r['qat_int1']):>15} |")


if __name__ == "__main__":
    main()
