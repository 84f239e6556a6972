"""Fault injection helpers: the tiny sweep, runs in this process or in forked ones, comparisons.

A fault test injects one fault (a kill, a second sweep, a damaged file, a failing write), then
checks that the folder's results are a subset of the uninterrupted run's, identical where
present, that the message is clear, and that the way out (usually: run again) gives the whole
uninterrupted result. Every fault is counted in ``FAULTS``; ``conftest.py`` prints the totals.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import multiprocessing
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import yaml

from experiments._helpers import tiny_config
from precsim.experiments import command

# Stochastic rounding in the last scheme: a resumed run must also continue its random stream.
SCHEMES = ["fp32", "qint8", {"name": "q_sr", "activation": "int8",
                             "gradient": {"format": "bf16", "rounding": "stochastic"}}]
NAMES = ("fp32", "qint8", "q_sr")
EXACT = ("accuracy", "loss", "best_accuracy", "train_loss", "train_accuracy", "epochs", "steps", "diverged",
         "stopped_early", "baseline", "formats", "scheme_fingerprint")
CURVE_EXACT = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy", "lr")

FAULTS: list[dict[str, Any]] = []


@contextlib.contextmanager
def fault(kind: str, count: int = 1) -> Iterator[dict[str, Any]]:
    """Count ``count`` injected faults; they survived if the block ends without an assertion error."""
    entry: dict[str, Any] = {"kind": kind, "count": count, "survived": False, "rows_lost": 0}
    FAULTS.append(entry)
    yield entry
    entry["survived"] = True


def write_config(folder: Path, **changes: Any) -> Path:
    path = folder / "sweep.yaml"
    path.write_text(yaml.safe_dump(tiny_config(epochs=2, schemes=SCHEMES, **changes)))
    return path


def sweep_args(config: Path, out: Path, *extra: str) -> list[str]:
    return ["sweep", "--config", str(config), "--out", str(out), "--no-progress", *extra]


def run_here(args: list[str]) -> tuple[int, str]:
    """``precsim sweep`` in this process: (exit status, what it wrote to stderr)."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = command.main(args)
    return rc, err.getvalue()


def _child(args: list[str], log: str, setup: Callable[[], None] | None) -> None:
    sys.stdout = sys.stderr = open(log, "w", buffering=1)  # noqa: SIM115 - the process ends with it
    if setup is not None:
        setup()
    sys.exit(command.main(args))


def start_forked(args: list[str], log: Path, setup: Callable[[], None] | None = None) -> Any:
    """``precsim sweep`` in a forked process (a real process to kill, without a second torch import);
    ``setup`` runs in the child first (to install a fault). Returns the started Process."""
    proc = multiprocessing.get_context("fork").Process(target=_child, args=(args, str(log), setup))
    proc.start()
    return proc


def read_rows(out: Path) -> dict[str, dict[str, Any]]:
    path = out / "results.json"
    return {r["scheme"]: r for r in json.loads(path.read_text())} if path.exists() else {}


def read_curves(out: Path) -> dict[str, list[dict[str, str]]]:
    path = out / "curves.csv"
    curves: dict[str, list[dict[str, str]]] = {}
    if path.exists():
        with path.open(newline="") as f:
            for c in csv.DictReader(f):
                curves.setdefault(c["scheme"], []).append(c)
    return curves


def assert_subset(out: Path, ref: Path) -> set[str]:
    """The folder's rows and curves are a subset of the reference's, identical where present
    (results.json, results.csv and curves.csv alike); the schemes present."""
    rows, ref_rows = read_rows(out), read_rows(ref)
    assert set(rows) <= set(ref_rows), sorted(rows)
    for name, row in rows.items():
        assert {k: row.get(k) for k in EXACT} == {k: ref_rows[name].get(k) for k in EXACT}, name
    if (out / "results.csv").exists():
        with (out / "results.csv").open(newline="") as f:
            csv_names = [r["scheme"] for r in csv.DictReader(f)]
        assert set(csv_names) <= set(ref_rows) and len(csv_names) == len(set(csv_names))
    curves, ref_curves = read_curves(out), read_curves(ref)
    assert set(curves) <= set(rows) | set(ref_rows)
    for name, cs in curves.items():
        want = [{k: c[k] for k in CURVE_EXACT} for c in ref_curves[name]]
        assert [{k: c[k] for k in CURVE_EXACT} for c in cs] == want, name
    return set(rows)


def assert_complete(out: Path, ref: Path) -> None:
    """Everything the uninterrupted run has, nothing left over (no lock, no temporary file)."""
    assert assert_subset(out, ref) == set(NAMES)
    assert set(read_curves(out)) == set(NAMES)
    assert not (out / ".precsim.lock").exists()
    assert not [p for p in out.rglob("*.tmp")]
