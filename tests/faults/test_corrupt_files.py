"""Damaged files of each kind precsim reads back: truncated, empty, garbage (and a flipped byte).

Results files (results.json, results.csv, curves.csv) are rebuilt from the other files and
the checkpoints, with a warning naming the damaged file, which is kept as ``<name>.corrupt``.
spec.json, a checkpoint a run needs, a YAML config and a young unreadable lock stop the run
with a message naming the file and the way out; following it gives the uninterrupted result.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from precsim.experiments.lock import LOCK_NAME, UNREADABLE_STALE_S

from ._helpers import assert_complete, assert_subset, fault, read_rows, run_here, sweep_args, write_config


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":  # mid-line: a cut that ends a line leaves a valid file with fewer rows
        n = len(data) // 2
        path.write_bytes(data[: n - 1 if data[n - 1:n] == b"\n" else n])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "garbage":
        path.write_bytes(bytes(range(256)) * 4)
    elif how == "flipped":
        i = len(data) // 3
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x20]) + data[i + 1:])
    else:
        raise AssertionError(how)


HOW = ("truncated", "empty", "garbage")


@pytest.mark.parametrize("how", HOW)
@pytest.mark.parametrize("name", ["results.json", "results.csv", "curves.csv"])
def test_results_files_rebuilt(tmp_path: Path, reference, name: str, how: str) -> None:
    out = reference.copy(tmp_path / "out")
    with fault(f"damaged {name}"):
        damage(out / name, how)
        rc, err = run_here(sweep_args(write_config(tmp_path), out))
        assert rc == 0, err
        assert f"warning: {str(out / name)!r}" in err and f"kept as {name}.corrupt" in err
        assert "accuracy" not in err.split("skipped")[-1]  # nothing was trained again
        assert_complete(out, reference.out)
        assert (out / f"{name}.corrupt").exists()


def test_issue_case_truncated_checkpoint_and_no_results_json(tmp_path: Path, reference) -> None:
    """`truncate -s 5000 checkpoints/qint8.pt; rm results.json; precsim sweep`: qint8's row comes
    back from results.csv, and its damaged checkpoint is not even read."""
    out = reference.copy(tmp_path / "out")
    with fault("damaged checkpoint"):
        os.truncate(out / "checkpoints" / "qint8.pt", 5000)
        (out / "results.json").unlink()
        rc, err = run_here(sweep_args(write_config(tmp_path), out))
        assert rc == 0, err
        assert "qint8 from results.csv" in err
        assert_complete(out, reference.out)


@pytest.mark.parametrize("how", ("truncated", "empty", "flipped"))
def test_damaged_checkpoint_a_run_needs(tmp_path: Path, reference, how: str) -> None:
    """Every results file gone and fp32's checkpoint damaged: the others' rows come back from their
    checkpoints; fp32 stops the run, naming the file; deleting it (as told) retrains fp32 exactly."""
    out = reference.copy(tmp_path / "out")
    ckpt = out / "checkpoints" / "fp32.pt"
    args = sweep_args(write_config(tmp_path), out)
    with fault("damaged checkpoint") as f:
        damage(ckpt, how)
        for name in ("results.json", "results.csv", "curves.csv"):
            (out / name).unlink()
        rc, err = run_here(args)
        assert rc == 2, err
        assert f"error: checkpoint {str(ckpt)!r} is corrupt: " in err and "Traceback" not in err
        assert "delete it to train scheme 'fp32' again" in err and "--fresh" in err
        assert {"qint8", "q_sr"} <= assert_subset(out, reference.out)  # not lost to fp32's damage
        ckpt.unlink()
        rc, err = run_here(args)
        assert rc == 0, err
        assert_complete(out, reference.out)
        f["rows_lost"] = 3 - len(read_rows(out))


@pytest.mark.parametrize("how", HOW)
def test_damaged_spec_json(tmp_path: Path, reference, how: str) -> None:
    out = reference.copy(tmp_path / "out")
    args = sweep_args(write_config(tmp_path), out)
    with fault("damaged spec.json"):
        damage(out / "spec.json", how)
        rc, err = run_here(args)
        assert rc == 2, err
        assert f"{str(out / 'spec.json')!r} is corrupt: it " in err and "--fresh" in err and "Delete it" in err
        assert_subset(out, reference.out)
        (out / "spec.json").unlink()  # the way out: the checkpoints show the folder is this sweep's
        rc, err = run_here(args)
        assert rc == 0 and "spec.json was missing" in err, err
        assert_complete(out, reference.out)


@pytest.mark.parametrize("how", HOW)
def test_damaged_yaml_config(tmp_path: Path, reference, how: str) -> None:
    out = reference.copy(tmp_path / "out")
    cfg = write_config(tmp_path)
    with fault("damaged YAML"):
        damage(cfg, how)
        rc, err = run_here(sweep_args(cfg, out))
        assert rc == 2, err
        # named, or (a truncated file that is still valid YAML) refused as another sweep by the folder
        assert str(cfg) in err or "different spec" in err, err
        assert_complete(out, reference.out)  # nothing touched


@pytest.mark.parametrize("how", HOW)
def test_damaged_scheme_yaml(tmp_path: Path, how: str) -> None:
    quant = tmp_path / "quant.yaml"
    quant.write_text("activation: int8\nweight: int8\n")
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text().replace("- fp32\n", f"- {{name: mine, config: {quant}}}\n"))
    with fault("damaged YAML"):
        damage(quant, how)
        rc, err = run_here(sweep_args(cfg, tmp_path / "out", "--dry-run"))
        assert rc == 2 and str(quant) in err, err


@pytest.mark.parametrize("how", HOW)
def test_unreadable_lock(tmp_path: Path, reference, how: str) -> None:
    out = reference.copy(tmp_path / "out")
    args = sweep_args(write_config(tmp_path), out)
    with fault("damaged lock"):
        (out / LOCK_NAME).write_text('{"pid": 12')
        damage(out / LOCK_NAME, how)
        rc, err = run_here(args)  # young: perhaps a sweep is just starting
        assert rc == 2 and f"delete {str(out / LOCK_NAME)!r}" in err, err
        old = time.time() - UNREADABLE_STALE_S - 1
        os.utime(out / LOCK_NAME, (old, old))
        rc, err = run_here(args)
        assert rc == 0 and "taking over" in err, err
        assert_complete(out, reference.out)
