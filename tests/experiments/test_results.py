"""Atomic files, checkpoints, the results store and the report, without training."""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

import pytest
import torch

from precsim.experiments.checkpoint import (
    CorruptFileError,
    atomic_write_json,
    atomic_write_text,
    capture_rng,
    load_checkpoint,
    read_checkpoint,
    restore_rng,
    save_checkpoint,
)
from precsim.experiments.report import format_table, markdown_table, write_report
from precsim.experiments.results import RESULT_COLUMNS, ResultStore, row_problem, with_time_ratios
from precsim.experiments.spec import load_spec
from precsim.experiments.train import epoch_order, lr_at

from ._helpers import tiny_config


def _row(name: str, time_s: float, baseline: bool = False, acc: float = 0.9) -> dict:
    return {"scheme": name, "accuracy": acc, "loss": 0.3, "time_s": time_s, "epochs": 2, "baseline": baseline,
            "formats": "act=int8", "train_loss": 0.2}


def _curves(name: str) -> list[dict]:
    return [{"scheme": name, "epoch": e, "step": 4 * e, "train_loss": 1.0 / e, "train_accuracy": 0.5,
             "test_loss": 1.1 / e, "test_accuracy": 0.4 + 0.1 * e, "lr": 0.1, "interval_s": 1.0, "time_s": float(e)}
            for e in (1, 2)]


def test_atomic_write_leaves_no_temp_files_and_normal_permissions(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "a.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert [p.name for p in path.parent.iterdir()] == ["a.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"a": object()})
    assert json.loads(path.read_text()) == {"a": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]


def test_json_nan_becomes_null(tmp_path: Path) -> None:
    atomic_write_json(tmp_path / "x.json", [{"loss": float("nan")}])
    assert json.loads((tmp_path / "x.json").read_text()) == [{"loss": None}]


def test_time_ratio_to_fp32_row_or_blank() -> None:
    rows = with_time_ratios([_row("fp32", 10.0, baseline=True), _row("bf16", 25.0)])
    assert [r["time_ratio"] for r in rows] == [1.0, 2.5]
    assert [r["time_ratio"] for r in with_time_ratios([_row("bf16", 25.0)])] == [None]
    # A scheme stopped early (diverged) is compared per training step.
    rows = with_time_ratios([_row("fp32", 10.0, baseline=True) | {"steps": 100},
                             _row("flexfp8", 5.0) | {"steps": 20}])
    assert rows[1]["time_ratio"] == 2.5


def test_store_round_trip_and_order(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.add(_row("bf16", 30.0), _curves("bf16"), order=["fp32", "bf16"])
    store.add(_row("fp32", 10.0, baseline=True), _curves("fp32"), order=["fp32", "bf16"])
    again = ResultStore(tmp_path)
    assert again.has("fp32") and again.has("bf16") and not again.has("mxfp8")
    with (tmp_path / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["scheme"] for r in rows] == ["fp32", "bf16"]
    assert tuple(rows[0]) == RESULT_COLUMNS
    assert float(rows[1]["time_ratio"]) == 3.0
    assert again.ordered_curves(["fp32", "bf16"]) == _curves("fp32") + _curves("bf16")
    assert json.loads((tmp_path / "results.json").read_text())[1]["time_ratio"] == 3.0


def test_tables_and_report(tmp_path: Path) -> None:
    rows = with_time_ratios([_row("fp32", 10.0, baseline=True, acc=0.98), _row("flexfp8", 12.0, acc=0.1)])
    rows[1]["loss"] = float("nan")
    text = format_table(rows)
    assert "98.00" in text and "10.00" in text and "1.20" in text
    md = markdown_table(rows)
    assert md.splitlines()[0].startswith("| scheme | acc %") and "| fp32 |" in md
    curves = _curves("fp32") + _curves("flexfp8")
    spec = load_spec(tiny_config()).to_dict()
    write_report(tmp_path, rows, curves, spec, world_size=1, total_time_s=22.0)
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = (tmp_path / "report.md").read_text()
    assert "![accuracy and loss per epoch](curves.png)" in report and md in report


def test_checkpoint_round_trip_and_rng(tmp_path: Path) -> None:
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    path = tmp_path / "c.pt"
    torch.manual_seed(5)
    save_checkpoint(path, scheme="s", scheme_fingerprint="a", spec_fingerprint="b", epoch=1, model=model,
                    optimizer=opt, curves=_curves("s")[:1], progress={"elapsed_s": 1.5, "stopped": False})
    expected = torch.rand(3)
    state = load_checkpoint(path, scheme_fingerprint="a", spec_fingerprint="b")
    assert state is not None and state["epoch"] == 1 and state["curves"] == _curves("s")[:1]
    assert state["progress"] == {"elapsed_s": 1.5, "stopped": False}
    restore_rng(state["rng"])
    assert torch.equal(torch.rand(3), expected)
    assert load_checkpoint(tmp_path / "none.pt", scheme_fingerprint="a", spec_fingerprint="b") is None
    with pytest.raises(ValueError, match="different sweep"):
        load_checkpoint(path, scheme_fingerprint="other", spec_fingerprint="b")
    restore_rng(capture_rng())


def test_data_order_and_lr_are_functions_of_seed_and_step() -> None:
    spec = load_spec(tiny_config())
    assert torch.equal(epoch_order(spec, 100, 3), epoch_order(spec, 100, 3))
    assert not torch.equal(epoch_order(spec, 100, 0), epoch_order(spec, 100, 1))
    assert lr_at(spec, 0, 10) == spec.lr and math.isclose(lr_at(spec, 5, 10), spec.lr / 2)


def _save(path: Path, **extra) -> None:  # type: ignore[no-untyped-def]
    model = torch.nn.Linear(3, 2)
    save_checkpoint(path, scheme=path.stem, scheme_fingerprint="a", spec_fingerprint="b", epoch=2, model=model,
                    optimizer=torch.optim.SGD(model.parameters(), lr=0.1), curves=_curves(path.stem),
                    progress={"stopped": False}, **extra)


def test_checkpoint_checksum_catches_damage_and_names_the_way_out(tmp_path: Path) -> None:
    path = tmp_path / "s.pt"
    _save(path)
    assert torch.load(path, weights_only=True)["epoch"] == 2  # still a plain torch file
    data = path.read_bytes()
    damages = {"empty": b"", "truncated": data[:5000], "garbage": os.urandom(3000),
               "flipped": data[:700] + bytes([data[700] ^ 1]) + data[701:]}
    for how, bad in damages.items():
        path.write_bytes(bad)
        with pytest.raises(CorruptFileError) as err:
            read_checkpoint(path)
        assert str(path) in str(err.value), how
        with pytest.raises(ValueError, match="delete it to train scheme 's' again") as err:
            load_checkpoint(path, scheme_fingerprint="a", spec_fingerprint="b")
        assert f"checkpoint {str(path)!r} is corrupt: " in str(err.value)
    assert "SHA-256 does not match" in str(err.value)


def test_store_merges_rows_from_csv_and_checkpoints(tmp_path: Path) -> None:
    rows = {n: _row(n, 1.0 + i) | {"steps": 4, "diverged": False, "scheme_fingerprint": "a"}
            for i, n in enumerate(("x", "y", "z"))}
    store = ResultStore(tmp_path)
    for n in ("x", "y"):
        store.add(rows[n], _curves(n))
    (tmp_path / "checkpoints").mkdir()
    _save(tmp_path / "checkpoints" / "z.pt", row=rows["z"])  # finished, but its results were never written
    _save(tmp_path / "checkpoints" / "w.pt")  # unfinished: no row inside
    (tmp_path / "results.json").write_text('[{"scheme": "x", "accuracy": "high"')  # damaged
    again = ResultStore(tmp_path, known={"x": "a", "y": "a", "z": "a"}, spec_fingerprint="b")
    assert again.recovered == {"x": "results.csv", "y": "results.csv", "z": "checkpoints/z.pt"}
    assert again.needs_write and again.damaged == ["results.json"] and "is not valid JSON" in again.problems[0]
    assert again.ordered_curves(["x", "y", "z"]) == _curves("x") + _curves("y") + _curves("z")
    for n in ("x", "y", "z"):
        assert {k: again.rows[n][k] for k in rows[n]} == rows[n]  # typed back from the CSV exactly
    assert again.repair(["x", "y", "z"]) == ["results.json.corrupt"]
    final = ResultStore(tmp_path, known={"x": "a", "y": "a", "z": "a"}, spec_fingerprint="b")
    assert not final.needs_write and not final.problems and list(final.rows) == ["x", "y", "z"]
    # A row of another config of a scheme (its fingerprint differs from spec.json's) is not taken.
    assert "another config" in ResultStore(tmp_path, known={"x": "other"}).problems[0]


@pytest.mark.parametrize("row,problem", [
    ({"scheme": "x", "accuracy": 0.5, "loss": 1.0}, "lacks epochs"),
    ({"scheme": "x", "accuracy": "0.5", "loss": 1.0, "epochs": 2}, "bad values in accuracy"),
    ({"scheme": "x", "accuracy": 0.5, "loss": 1.0, "epochs": True}, "bad values in epochs"),
    (["x"], "a list where a row should be"),
])
def test_row_problems(row, problem: str) -> None:
    assert problem in row_problem(row)


def test_cut_csv_line_is_dropped(tmp_path: Path) -> None:
    store = ResultStore(tmp_path)
    store.add(_row("x", 1.0), _curves("x"))
    text = (tmp_path / "curves.csv").read_text()
    (tmp_path / "curves.csv").write_text(text[:-3])  # the last value cut short: no newline at the end
    again = ResultStore(tmp_path)
    assert "is cut short" in again.problems[0] and "x" not in again.curves and again.has("x")
