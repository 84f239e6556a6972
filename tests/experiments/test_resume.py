"""Interrupt a sweep (Ctrl-C or a hard kill) and check the rerun resumes exactly.

The sweep sleeps after each epoch checkpoint (``PRECSIM_SWEEP_EPOCH_SLEEP``) so the test can
stop it reliably between epoch 1 and epoch 2 of the second scheme.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from precsim.experiments import command
from precsim.experiments.sweep import EPOCH_SLEEP_ENV

from ._helpers import CLI_MODULE, cli_env, single_thread, tiny_config

EXACT = ("accuracy", "auc", "loss", "best_accuracy", "train_loss", "train_accuracy", "epochs", "steps", "diverged")
CURVE_EXACT = ("epoch", "step", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr")


def _config(directory: Path) -> Path:
    # Stochastic rounding in the second scheme: resume must also continue its random stream.
    cfg = tiny_config(epochs=3, schemes=["fp32", {"name": "q_sr", "activation": "int8",
                                                   "gradient": {"format": "bf16", "rounding": "stochastic"}}])
    path = directory / "sweep.yaml"
    import yaml

    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[dict], list[dict], str]:
    """The same sweep, uninterrupted."""
    d = tmp_path_factory.mktemp("reference")
    with single_thread():  # module fixtures start before the autouse one
        assert command.main(["sweep", "--config", str(_config(d)), "--out", str(d / "out"), "--no-progress"]) == 0
    return (json.loads((d / "out" / "results.json").read_text()), _curves(d / "out"),
            (d / "out" / "stats" / "q_sr.csv").read_text())


def _curves(out: Path) -> list[dict]:
    import csv

    with (out / "curves.csv").open() as f:
        return list(csv.DictReader(f))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "kill"])
def test_interrupted_sweep_resumes_bit_identically(tmp_path: Path, reference, sig: signal.Signals, capsys) -> None:
    cfg = _config(tmp_path)
    out = tmp_path / "out"
    args = ["sweep", "--config", str(cfg), "--out", str(out), "--no-progress"]
    # SIGINT as a terminal delivers it: a shell that starts a job in the background (as a CI
    # runner may) sets SIGINT to ignored, and the child would inherit that and never see Ctrl-C
    proc = subprocess.Popen([sys.executable, "-m", CLI_MODULE, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(**{EPOCH_SLEEP_ENV: "1"}),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    ckpt = out / "checkpoints" / "q_sr.pt"
    deadline = time.monotonic() + 100
    while not ckpt.exists():  # the second scheme has finished its first epoch
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the sweep did not reach its second scheme in time"
        time.sleep(0.05)
    proc.send_signal(sig)
    _, stderr = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130 and "interrupted" in stderr and "run the same command again" in stderr
    else:
        assert proc.returncode == -signal.SIGKILL

    rows = json.loads((out / "results.json").read_text())
    assert [r["scheme"] for r in rows] == ["fp32"]  # the finished scheme is saved ...
    stopped_at = torch.load(ckpt, weights_only=True)["epoch"]
    assert 1 <= stopped_at < 3  # ... and so is the interrupted one's last finished epoch

    assert command.main(args) == 0  # rerun: skip fp32, resume q_sr
    err = capsys.readouterr().err
    assert "fp32: finished earlier, skipped" in err
    assert f"q_sr: resuming after epoch {stopped_at}/3" in err

    rows = json.loads((out / "results.json").read_text())
    curves = _curves(out)
    assert [r["scheme"] for r in rows] == ["fp32", "q_sr"]  # no lost or duplicated rows
    assert [(c["scheme"], c["epoch"], c["step"]) for c in curves] == [  # two evaluations per epoch, none lost
        (s, str(e), str(k)) for s in ("fp32", "q_sr") for e in (1, 2, 3) for k in (2 * e - 1, 2 * e)]
    ref_rows, ref_curves, ref_stats = reference
    # the telemetry continued from the checkpoint: the same calls sampled, the same numbers
    assert (out / "stats" / "q_sr.csv").read_text() == ref_stats
    assert not (out / "stats" / "fp32.csv").exists()  # nothing quantized, nothing recorded
    for row, ref in zip(rows, ref_rows, strict=True):
        assert {k: row[k] for k in EXACT} == {k: ref[k] for k in EXACT}, row["scheme"]
    for c, ref in zip(curves, ref_curves, strict=True):
        assert {k: c[k] for k in CURVE_EXACT} == {k: ref[k] for k in CURVE_EXACT}
    assert not list(out.rglob("*.tmp"))
