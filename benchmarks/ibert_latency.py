"""Latency of the integer-only all-MiniLM-L6-v2: onnxruntime on the exported integer ONNX graph vs
FP32 torch (the model's forward) vs the integer model's torch kernels, for one batch.

    python benchmarks/ibert_latency.py [--batch 16] [--length 64] [--threads 2] [--repeats 10] [--profile]
                                       [--model minilm.int]

Calibrates ``ibert_config`` (PTQ on ``--calibration`` sentences of the Python Language Reference),
converts with ``precsim.convert`` (or loads the integer model saved at ``--model``, saving it
there after a conversion), exports with ``precsim.export_onnx`` and checks that
onnxruntime's output codes equal ``run_integer``'s. Each path runs on ``--threads`` threads
(``torch.set_num_threads``; onnxruntime ``intra_op_num_threads``, one inter-op thread), after a
warm-up run; the three are interleaved, one run of each per round, ``--repeats`` rounds: the
median time of each, and the median over rounds of each one's ratio to FP32 torch. The load
average is printed before and after: timings taken while other work runs are not comparable. ``--profile`` adds onnxruntime's kernel
time per integer op kind and per ONNX op type (node names are ``<op kind>:<op name>/<tensor>``).
"""

from __future__ import annotations

import argparse
import collections
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import precsim
from precsim.zoo.text import SentenceEncoder, load_minilm, sentences, tokenize


def interleaved(paths: dict[str, Callable[[], object]], rounds: int) -> dict[str, list[float]]:
    """Wall times in ms: one run of each path per round, after one warm-up run of each."""
    for fn in paths.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for _ in range(rounds):
        for name, fn in paths.items():
            t = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t) * 1e3)
    return times


def profile(path: Path, feed: dict[str, np.ndarray], threads: int, runs: int = 5) -> None:
    import onnxruntime as ort  # noqa: PLC0415 - optional dependency

    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = threads, 1
    so.enable_profiling = True
    so.profile_file_prefix = str(path.with_suffix(""))
    session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(["output_codes"], feed)
    events = json.loads(Path(session.end_profiling()).read_text())
    by_kind: collections.Counter[str] = collections.Counter()
    by_type: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            by_kind[e["name"].split("/")[0].split(":")[0]] += e["dur"]
            by_type[e["args"]["op_name"]] += e["dur"]
    total = sum(by_kind.values())
    print(f"\nonnxruntime kernel time per run: {total / runs / 1e3:.1f} ms")
    for title, counts in (("integer op", by_kind), ("ONNX op", by_type)):
        print(f"\n| {title} | ms | share |\n|---|---|---|")
        for name, us in counts.most_common(12):
            print(f"| {name} | {us / runs / 1e3:.1f} | {100 * us / total:.0f}% |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--calibration", type=int, default=64, help="calibration sentences")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--length", type=int, default=64, help="tokens per sentence (padded/truncated)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--model", type=Path, help="integer model file: loaded if it exists, else written")
    args = ap.parse_args()
    import onnxruntime as ort  # noqa: PLC0415 - optional dependency

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    base, tokenizer = load_minilm()
    texts = [s for _, s in sentences()]
    fp32 = SentenceEncoder(base).eval()
    b = args.batch
    calib = [tokenize(tokenizer, texts[i:i + b], args.length) for i in range(0, args.calibration, b)]
    batch = tokenize(tokenizer, texts[args.calibration:args.calibration + b], args.length)
    if args.model is not None and args.model.exists():
        imodel = precsim.IntegerModel.load(args.model)
    else:
        sim = precsim.calibrate(copy.deepcopy(fp32), calib, precsim.ibert_config(fp32))
        imodel = precsim.convert(sim, example=calib[0])
        if args.model is not None:
            imodel.save(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "minilm_int.onnx"
        precsim.export_onnx(imodel, path, calib[0])
        so = ort.SessionOptions()
        so.intra_op_num_threads, so.inter_op_num_threads = args.threads, 1
        session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        feed = {k: v.numpy() for k, v in batch.items()}
        (codes,) = session.run(["output_codes"], feed)
        if not torch.equal(torch.from_numpy(codes), imodel.run_integer(**batch)):
            sys.exit("onnxruntime's codes differ from run_integer's")
        load_before = os.getloadavg()
        with torch.no_grad():
            times = interleaved({"onnxruntime, integer ONNX graph": lambda: session.run(["output_codes"], feed),
                                 "FP32 torch": lambda: fp32(**batch),
                                 "integer model, torch kernels": lambda: imodel.run_integer(**batch)}, args.repeats)
        load_after = os.getloadavg()
        print(f"all-MiniLM-L6-v2, one batch of {b} sentences x {args.length} tokens, {args.threads} threads, "
              f"median of {args.repeats} runs; torch {torch.__version__}, onnxruntime {ort.__version__}, "
              f"{os.cpu_count()} CPUs; load average (1, 5, 15 min) before {load_before[0]:.2f} {load_before[1]:.2f} "
              f"{load_before[2]:.2f}, after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}\n")
        print("| path | ms (median) | x FP32 torch (median of per-round ratios) |\n|---|---|---|")
        fp = times["FP32 torch"]
        for name, ts in times.items():
            ratio = statistics.median(t / f for t, f in zip(ts, fp, strict=True))
            print(f"| {name} | {statistics.median(ts):.0f} | {ratio:.2f} |")
        if args.profile:
            profile(path, feed, args.threads)


if __name__ == "__main__":
    main()
