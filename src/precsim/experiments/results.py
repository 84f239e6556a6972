"""results.csv / results.json / curves.csv: one row per finished scheme, rewritten atomically.

The store is rewritten in full after every scheme, so the files on disk always describe a set of
finished schemes (never a half-written row) and a rerun reads them back to know what to skip.
``time_ratio`` is each row's ``time_s`` over the baseline's (the row that quantizes nothing,
``fp32`` in the default sweep), per training step for a scheme stopped early; it is empty when
the folder holds no baseline row.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from precsim.experiments.checkpoint import atomic_write_json, atomic_write_text
from precsim.experiments.train import CURVE_COLUMNS

RESULT_COLUMNS: tuple[str, ...] = (
    "scheme", "accuracy", "loss", "time_s", "time_ratio", "compile_s", "epochs", "best_accuracy", "train_loss",
    "train_accuracy", "train_time_s", "cpu_time_s", "steps", "diverged", "stopped_early", "formats", "description", "world_size", "device",
    "allreduce", "replicas_in_sync", "baseline", "scheme_fingerprint",
)
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
CURVES_CSV = "curves.csv"


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)  # shortest round-trip form: the CSV holds the exact float
    return v


def to_csv(rows: list[dict[str, Any]], columns: tuple[str, ...]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _csv_value(row.get(c)) for c in columns})
    return buf.getvalue()


def baseline_row(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The row time ratios refer to: a baseline named ``fp32`` if any, else the first baseline."""
    base = [r for r in rows if r.get("baseline")]
    named = [r for r in base if r["scheme"] == "fp32"]
    return (named or base or [None])[0]


def time_ratio(row: dict[str, Any], base: dict[str, Any] | None) -> float | None:
    """Time per training step over the baseline's: ``time_s / base time_s`` when both trained the
    same number of steps; a scheme stopped early (diverged) is compared per step."""
    if base is None or not base.get("time_s") or row.get("time_s") is None:
        return None
    steps, base_steps = row.get("steps"), base.get("steps")
    if not steps or not base_steps or steps == base_steps:
        return row["time_s"] / base["time_s"]
    return (row["time_s"] / steps) / (base["time_s"] / base_steps)


def with_time_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    base = baseline_row(rows)
    return [{**r, "time_ratio": time_ratio(r, base)} for r in rows]


class ResultStore:
    """The finished rows and curves of one output folder."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.rows: dict[str, dict[str, Any]] = {}
        self.curves: dict[str, list[dict[str, Any]]] = {}
        self._load()

    def _load(self) -> None:
        path = self.out / RESULTS_JSON
        if not path.is_file():
            return
        rows = json.loads(path.read_text())
        if not isinstance(rows, list):
            raise ValueError(f"{path} is not a list of result rows; use --fresh to start over")
        for r in rows:
            self.rows[r["scheme"]] = r
        curves_path = self.out / CURVES_CSV
        if curves_path.is_file():
            with curves_path.open(newline="") as f:
                for c in csv.DictReader(f):
                    if c["scheme"] in self.rows:
                        self.curves.setdefault(c["scheme"], []).append(_parse_curve(c))

    def has(self, scheme: str) -> bool:
        return scheme in self.rows

    def ordered(self, order: list[str] | None = None) -> list[dict[str, Any]]:
        """Rows (with time ratios) in ``order`` first, then any others in the order they finished."""
        names = [n for n in (order or []) if n in self.rows]
        names += [n for n in self.rows if n not in names]
        return with_time_ratios([self.rows[n] for n in names])

    def ordered_curves(self, order: list[str] | None = None) -> list[dict[str, Any]]:
        return [c for r in self.ordered(order) for c in self.curves.get(r["scheme"], [])]

    def add(self, row: dict[str, Any], curves: list[dict[str, Any]], order: list[str] | None = None) -> None:
        """Record a finished scheme and rewrite every results file (atomically)."""
        self.rows[row["scheme"]] = row
        self.curves[row["scheme"]] = list(curves)
        self.write(order)

    def write(self, order: list[str] | None = None) -> None:
        rows = self.ordered(order)
        atomic_write_json(self.out / RESULTS_JSON, rows)
        atomic_write_text(self.out / RESULTS_CSV, to_csv(rows, RESULT_COLUMNS))
        atomic_write_text(self.out / CURVES_CSV, to_csv(self.ordered_curves(order), CURVE_COLUMNS))


def _parse_curve(c: dict[str, str]) -> dict[str, Any]:
    out: dict[str, Any] = {"scheme": c["scheme"], "epoch": int(c["epoch"])}
    for k in CURVE_COLUMNS[2:]:
        out[k] = float(c[k]) if c.get(k) not in (None, "") else float("nan")
    return out


__all__ = ["CURVES_CSV", "RESULTS_CSV", "RESULTS_JSON", "RESULT_COLUMNS", "ResultStore", "baseline_row", "to_csv",
           "with_time_ratios"]
