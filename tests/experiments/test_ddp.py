"""Two-process DDP (gloo on CPU) through torchrun: replicas stay identical, rank 0 writes once."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from precsim.experiments import command

from ._helpers import CLI_MODULE, cli_env, tiny_config


def test_two_process_gloo_sweep(tmp_path: Path, write_config, capsys) -> None:
    cfg = write_config(tiny_config(epochs=2, debug_digests=True, schemes=[
        "fp32",
        {"name": "fp32_ar", "builtin": "fp32", "allreduce": "bf16"},  # quantized gradient all-reduce
        "qint8_grad8",
        # operand points are made by a forward pass: the sweep makes them before DDP wraps the model
        {"name": "operands_int8", "points": "operands", "activation": "int8", "weight": "int8", "gradient": "int8"},
    ]))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", CLI_MODULE, "sweep", "--config", str(cfg), "--out", str(out), "--no-progress"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert proc.stdout.count("x fp32") == 1  # one table: only rank 0 prints

    rows = json.loads((out / "results.json").read_text())
    assert [r["scheme"] for r in rows] == ["fp32", "fp32_ar", "qint8_grad8", "operands_int8"]  # written once per scheme
    for r in rows:
        assert r["world_size"] == 2 and r["replicas_in_sync"] is True, r
        # Global batch 32 = 2 ranks x 16; 2 steps per epoch as in one process.
        assert r["steps"] == 4
    lines = (out / "curves.csv").read_text().splitlines()
    assert len(lines) == 1 + 4 * 2 * 2 and len(set(lines)) == len(lines)  # 4 schemes, 2 epochs, 2 evaluations each

    # Each rank's own parameter checksum (debug mode): identical across ranks, per scheme.
    digests = {}
    for scheme in ("fp32", "fp32_ar", "qint8_grad8", "operands_int8"):
        r0 = (out / "debug" / f"{scheme}.rank0.sha256").read_text()
        r1 = (out / "debug" / f"{scheme}.rank1.sha256").read_text()
        assert r0 == r1, scheme
        digests[scheme] = r0
    assert digests["fp32"] != digests["fp32_ar"]  # the bf16 all-reduce changed the training
    assert len(list((out / "debug").iterdir())) == 8

    # The folder belongs to a 2-process sweep: a 1-process run there is refused before training.
    assert command.main(["sweep", "--config", str(cfg), "--out", str(out)]) == 2
    assert "world_size: 2 -> 1" in capsys.readouterr().err
