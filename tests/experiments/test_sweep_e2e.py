"""End to end through the CLI: a tiny 2-scheme sweep, its files, reruns, refusals and --fresh."""

from __future__ import annotations

import csv
import json
from pathlib import Path

from precsim.experiments import command
from precsim.experiments.results import RESULT_COLUMNS
from precsim.experiments.train import CURVE_COLUMNS

from ._helpers import run_cli, tiny_config

REQUIRED = ("scheme", "accuracy", "loss", "time_s", "time_ratio", "epochs")


def _csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_tiny_sweep_through_cli(tmp_path: Path, write_config, capsys) -> None:
    cfg = write_config(tiny_config(epochs=2))
    proc = run_cli(["sweep", "--config", str(cfg), "--out", "out"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "out"
    for name in ("results.csv", "results.json", "curves.csv", "curves.png", "report.md", "spec.json"):
        assert (out / name).is_file(), name
    # The terminal table and the progress bars.
    assert "scheme" in proc.stdout and "fp32" in proc.stdout and "qint8" in proc.stdout
    assert "[1/2] fp32" in proc.stderr and "[2/2] qint8" in proc.stderr
    assert "compiling kernels for qint8 (first run only, cached)" in proc.stderr

    rows = _csv(out / "results.csv")
    assert tuple(rows[0]) == RESULT_COLUMNS and set(REQUIRED) <= set(rows[0])
    assert [r["scheme"] for r in rows] == ["fp32", "qint8"]
    for r in rows:
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and float(r["loss"]) > 0 and float(r["time_s"]) > 0
        assert r["epochs"] == "2" and r["steps"] == "4" and r["world_size"] == "1"
    assert float(rows[0]["time_ratio"]) == 1.0 and float(rows[1]["time_ratio"]) > 0
    data = json.loads((out / "results.json").read_text())
    assert [d["scheme"] for d in data] == ["fp32", "qint8"]
    assert all(set(REQUIRED) <= set(d) for d in data)
    assert data[1]["time_ratio"] == data[1]["time_s"] / data[0]["time_s"]

    curves = _csv(out / "curves.csv")
    assert tuple(curves[0]) == CURVE_COLUMNS
    # 2 steps per epoch: the default 4 evaluations per epoch fall after steps 1 and 2 of each
    assert [(c["scheme"], c["epoch"], c["step"]) for c in curves] == [
        (s, str(e), str(k)) for s in ("fp32", "qint8") for e, k in ((1, 1), (1, 2), (2, 3), (2, 4))]
    assert data[1]["auc"] == sum(float(c["test_accuracy"]) for c in curves[4:]) / 4
    assert float(curves[-1]["test_accuracy"]) == data[1]["accuracy"]
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "![accuracy and loss per epoch](curves.png)" in report
    assert "| scheme | acc % | auc % | loss | time s | x fp32 | compile s | epochs |" in report and "| qint8 |" in report
    assert not list(out.rglob("*.tmp"))

    # A rerun skips both finished schemes and leaves the results as they were.
    before = (out / "results.json").read_text()
    assert command.main(["sweep", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 0
    assert "fp32: finished earlier, skipped" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before

    # A scheme added later runs alone and joins the same files.
    assert command.main(["sweep", "--config", str(cfg), "--out", str(out), "--no-progress",
                         "--schemes", "qint8_grad8"]) == 0
    assert [d["scheme"] for d in json.loads((out / "results.json").read_text())] == ["fp32", "qint8",
                                                                                     "qint8_grad8"]
    capsys.readouterr()

    # A different spec in the same folder is refused, naming what changed.
    assert command.main(["sweep", "--config", str(cfg), "--out", str(out), "--epochs", "3"]) == 2
    err = capsys.readouterr().err
    assert "different spec" in err and "epochs: 2 -> 3" in err and "--fresh" in err
    # So is a known scheme name with another config.
    other = write_config(tiny_config(epochs=2, schemes=["fp32", {"name": "qint8", "weight": "int4"}]), "b.yaml")
    assert command.main(["sweep", "--config", str(other), "--out", str(out)]) == 2
    assert "already has a scheme 'qint8' with a different config" in capsys.readouterr().err

    # --fresh overwrites deliberately (and only precsim's own files).
    (out / "notes.txt").write_text("mine")
    assert command.main(["sweep", "--config", str(cfg), "--out", str(out), "--no-progress", "--fresh",
                         "--epochs", "1", "--schemes", "fp32"]) == 0
    data = json.loads((out / "results.json").read_text())
    assert [(d["scheme"], d["epochs"]) for d in data] == [("fp32", 1)]
    assert (out / "notes.txt").read_text() == "mine"
    assert not (out / "checkpoints" / "qint8.pt").exists()


def test_diverged_scheme_stops_early(tmp_path: Path, capsys) -> None:
    """A scheme whose weights turn Inf/NaN stops at once and is marked, and the sweep goes on."""
    from precsim.experiments.spec import load_spec
    from precsim.experiments.sweep import run_sweep

    spec = load_spec(tiny_config(epochs=3, optimizer={"name": "sgd", "lr": 1e38},
                                 schemes=["fp32", {"name": "fp32_again"}]), out=str(tmp_path / "out"))
    rows = run_sweep(spec, progress=False)
    assert [r["scheme"] for r in rows] == ["fp32", "fp32_again"]
    for r in rows:
        assert r["diverged"] and r["stopped_early"] and r["epochs"] == 1 and r["steps"] < 6, r
        assert r["accuracy"] is not None
    assert "weights became Inf/NaN in epoch 1" in capsys.readouterr().err
    # Its checkpoint remembers the stop and the row: a rerun that lost the results rebuilds it, no training.
    (tmp_path / "out" / "results.json").unlink()
    (tmp_path / "out" / "results.csv").unlink()
    again = run_sweep(spec, progress=False)
    assert [(r["steps"], r["epochs"], r["time_s"]) for r in again] == [(r["steps"], r["epochs"], r["time_s"])
                                                                       for r in rows]
    err = capsys.readouterr().err
    assert "rows rebuilt: fp32 from checkpoints/fp32.pt, fp32_again from checkpoints/fp32_again.pt" in err
    assert "fp32_again: finished earlier, skipped" in err


def test_evaluations_within_an_epoch_change_no_weight(tmp_path: Path) -> None:
    """Evaluating 1 or 4 times per epoch (and recording telemetry or not) trains the same weights:
    evaluation rounds to nearest and leaves observers, BatchNorm and random streams alone."""
    from precsim.experiments.spec import load_spec
    from precsim.experiments.sweep import run_sweep

    scheme = {"name": "q", "activation": "int8", "gradient": {"format": "bf16", "rounding": "stochastic"}}
    digests = []
    for k, (evals, telemetry) in enumerate(((1, 0), (4, 1))):
        out = tmp_path / f"out{k}"
        spec = load_spec(tiny_config(epochs=2, max_steps=4, evals_per_epoch=evals, telemetry=telemetry,
                                     debug_digests=True, schemes=[scheme]), out=str(out))
        (row,) = run_sweep(spec, progress=False)
        digests.append((out / "debug" / "q.rank0.sha256").read_text())
        assert row["steps"] == 8 and len(_csv(out / "curves.csv")) == 2 * evals
    assert digests[0] == digests[1]


def test_a_diverged_scheme_is_replayed_to_name_its_first_nonfinite_point(tmp_path: Path) -> None:
    """hfp8_fwd (1-4-3, bias 11) tops out at 15. With a large learning rate the activations pass it
    after the first update; the report names that point, direction and its numbers, found by an
    exact replay of the run with every call recorded (sampling every 50th call missed it)."""
    from precsim.experiments.spec import load_spec
    from precsim.experiments.sweep import run_sweep

    spec = load_spec(tiny_config(epochs=2, optimizer={"name": "sgd", "lr": 50.0},
                                 schemes=[{"name": "hfp8", "activation": "hfp8_fwd"}]), out=str(tmp_path / "out"))
    (row,) = run_sweep(spec, progress=False)
    assert row["diverged"] and row["stopped_early"]
    first = row["first_nonfinite"]
    assert first is not None and first.startswith("step 2, ") and "(activation, forward): overflow: hfp8_fwd " \
        "tops out at 15, inputs up to " in first, first
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Diverged schemes" in report and f"`hfp8`: first NaN/Inf at {first}." in report
    stats = (tmp_path / "out" / "stats" / "hfp8.csv").read_text().splitlines()
    assert stats[0].startswith("module,op,call,operand,role,direction,samples,qsnr_db") and len(stats) > 1
    assert (tmp_path / "out" / "stats" / "hfp8.png").read_bytes()[:4] == b"\x89PNG"
    replay = (tmp_path / "out" / "stats" / "hfp8.replay.csv").read_text()  # every call up to the break
    assert "stem.conv,output,,output,activation,forward,2," in replay  # steps 1 and 2


def test_sweep_with_compiled_kernels_matches_eager(tmp_path: Path) -> None:
    """``compile: true`` (the default outside these tests) trains to the same bits as eager kernels,
    and leaves the process's compile setting as it found it."""
    from precsim.experiments.spec import load_spec
    from precsim.experiments.sweep import run_sweep
    from precsim.runtime.backend import compile_enabled

    scheme = {"name": "fp8_sr", "activation": "fp8_e4m3", "weight": "fp8_e4m3",
              "gradient": {"format": "fp8_e5m2", "rounding": "stochastic"}}
    rows, digests = {}, {}
    for compiled in (True, False):
        out = tmp_path / f"compile_{compiled}"
        spec = load_spec(tiny_config(schemes=[scheme], debug_digests=True, compile=compiled), out=str(out))
        assert spec.compile is compiled
        before = compile_enabled()
        rows[compiled] = run_sweep(spec, progress=False)[0]
        assert compile_enabled() == before
        digests[compiled] = (out / "debug" / "fp8_sr.rank0.sha256").read_text()
    assert digests[True] == digests[False]
    assert (rows[True]["accuracy"], rows[True]["loss"]) == (rows[False]["accuracy"], rows[False]["loss"])


def test_compile_time_is_left_out_of_the_timed_run(tmp_path: Path, monkeypatch) -> None:
    """Kernel compile time inside a scheme's epochs (a kernel first needed there, say when values
    first clip) goes to ``compile_s``, not ``time_s``. Simulated: every evaluation sleeps 0.5 s,
    counted as compile time in one run and not in the other."""
    import time

    import yaml

    from precsim.experiments import spec as spec_mod
    from precsim.experiments import sweep, train

    cfg = tmp_path / "s.yaml"
    cfg.write_text(yaml.safe_dump(tiny_config(epochs=2, schemes=["qint8"])))
    evaluate = train.evaluate
    rows = {}
    for counted in (False, True):
        compiled = [0.0]

        def slow_evaluate(*args, counted=counted, compiled=compiled):  # type: ignore[no-untyped-def]
            time.sleep(0.5)
            compiled[0] += 0.5 if counted else 0.0
            return evaluate(*args)

        monkeypatch.setattr(train, "evaluate", slow_evaluate)
        monkeypatch.setattr(train, "compile_seconds", lambda compiled=compiled: compiled[0])
        spec = spec_mod.load_spec(cfg, out=str(tmp_path / f"out{counted}"))
        (rows[counted],) = sweep.run_sweep(spec, progress=False, log=lambda m: None)
    assert rows[False]["time_s"] - rows[True]["time_s"] > 0.7  # 1.0 s taken out, give or take the noise
    assert rows[True]["compile_s"] - rows[False]["compile_s"] > 0.7
    stored = json.loads((tmp_path / "outTrue" / "results.json").read_text())
    assert stored[0]["compile_s"] == rows[True]["compile_s"]
