"""results.csv / results.json / curves.csv: one row per finished scheme, rewritten atomically.

The store is rewritten in full after every scheme, so the files on disk always describe a set of
finished schemes (never a half-written row) and a rerun reads them back to know what to skip.
Everything read back is checked (types of every cell, curves whole, fingerprints): a damaged
file is set aside and its rows come back from the other files or from the checkpoints, which
hold each finished scheme's row.
``time_ratio`` is each row's ``time_s`` over the baseline's (the row that quantizes nothing,
``fp32`` in the default sweep), per training step for a scheme stopped early; it is empty when
the folder holds no baseline row.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from precsim.experiments.checkpoint import CorruptFileError, atomic_write_json, atomic_write_text
from precsim.experiments.train import CURVE_COLUMNS

RESULT_COLUMNS: tuple[str, ...] = (
    "scheme", "accuracy", "auc", "loss", "time_s", "time_ratio", "compile_s", "epochs", "best_accuracy", "train_loss",
    "train_accuracy", "train_time_s", "cpu_time_s", "steps", "diverged", "stopped_early", "first_nonfinite", "formats",
    "description", "world_size", "device", "allreduce", "replicas_in_sync", "baseline", "scheme_fingerprint",
)
RESULTS_JSON = "results.json"
RESULTS_CSV = "results.csv"
CURVES_CSV = "curves.csv"
CORRUPT_SUFFIX = ".corrupt"


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


_FLOAT, _INT, _BOOL, _STR = "float", "int", "bool", "str"
_OPT_BOOL, _OPT_STR = "bool|None", "str|None"
# The type of each column, to check rows read back (floats may be None: NaN is written as null).
COLUMN_TYPES: dict[str, str] = {
    "scheme": _STR, "accuracy": _FLOAT, "auc": _FLOAT, "first_nonfinite": _OPT_STR, "loss": _FLOAT, "time_s": _FLOAT, "time_ratio": _FLOAT,
    "compile_s": _FLOAT, "epochs": _INT, "best_accuracy": _FLOAT, "train_loss": _FLOAT, "train_accuracy": _FLOAT,
    "train_time_s": _FLOAT, "cpu_time_s": _FLOAT, "steps": _INT, "diverged": _BOOL, "stopped_early": _BOOL,
    "formats": _STR, "description": _STR, "world_size": _INT, "device": _STR, "allreduce": _OPT_STR,
    "replicas_in_sync": _OPT_BOOL, "baseline": _BOOL, "scheme_fingerprint": _STR,
}
REQUIRED_COLUMNS = ("scheme", "accuracy", "loss", "epochs")
CURVE_TYPES: dict[str, str] = {"scheme": _STR, "epoch": _INT, "step": _INT, **{c: _FLOAT for c in CURVE_COLUMNS[3:]}}
_BAD, _MISSING = object(), object()


def _typed(value: Any, kind: str) -> Any:
    """``value`` if it has type ``kind``, else _BAD (bool is not an int here)."""
    if kind == _FLOAT:
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
    elif kind == _INT:
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif kind == _BOOL:
        ok = isinstance(value, bool)
    elif kind == _OPT_BOOL:
        ok = value is None or isinstance(value, bool)
    elif kind == _OPT_STR:
        ok = value is None or isinstance(value, str)
    else:
        ok = isinstance(value, str)
    return value if ok else _BAD


def _from_csv(text: str | None, kind: str) -> Any:
    """A CSV cell back in its column's type, or _BAD."""
    if text is None:
        return _BAD  # the line has fewer cells than the header: cut short
    if text == "" and kind in (_FLOAT, _OPT_BOOL, _OPT_STR):
        return None
    if text == "" and kind in (_INT, _BOOL):
        return _MISSING  # the row had no such value (rows written by hand or older versions)
    try:
        if kind == _FLOAT:
            return float(text)
        if kind == _INT:
            return _typed(int(text), _INT)
    except ValueError:
        return _BAD
    if kind in (_BOOL, _OPT_BOOL):
        return {"True": True, "False": False}.get(text, _BAD)
    return text


def row_problem(row: Any, types: dict[str, str] = COLUMN_TYPES, required: tuple[str, ...] = REQUIRED_COLUMNS,
                known: dict[str, str] | None = None) -> str | None:
    """What is wrong with a row read back, or None. ``known``: scheme name -> fingerprint."""
    if not isinstance(row, dict):
        return f"a {type(row).__name__} where a row should be"
    missing = [c for c in required if c not in row]
    if missing:
        return f"row {row.get('scheme')!r} lacks {', '.join(missing)}"
    bad = [c for c, kind in types.items() if c in row and _typed(row[c], kind) is _BAD]
    if bad or not row["scheme"]:
        return f"row {row.get('scheme')!r} has bad values in {', '.join(bad or ['scheme'])}"
    fp = known.get(row["scheme"]) if known else None
    if fp is not None and row.get("scheme_fingerprint") not in (None, fp):
        return (f"row {row['scheme']!r} belongs to another config of that scheme "
                "(its fingerprint differs from spec.json's)")
    return None


def read_rows_json(path: Path, known: dict[str, str] | None = None
                   ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """The valid rows of results.json by scheme, and what is wrong with the file (if anything)."""
    if not path.is_file():
        return {}, []
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as err:
        return {}, [f"is not valid JSON ({_short(err)})"]
    if not isinstance(data, list):
        return {}, [f"holds a {type(data).__name__}, not a list of result rows"]
    rows: dict[str, dict[str, Any]] = {}
    problems = []
    for r in data:
        problem = row_problem(r, known=known)
        if problem is None:
            rows[r["scheme"]] = r
        else:
            problems.append(problem)
    return rows, problems


def read_csv_records(path: Path, types: dict[str, str]) -> tuple[list[dict[str, Any]], list[str]]:
    """Typed records of a CSV file precsim wrote, and what is wrong with it.

    A last line without its newline was cut short (precsim ends every line), so it is dropped."""
    if not path.is_file():
        return [], []
    try:
        text = path.read_bytes().decode("utf-8")
    except (OSError, UnicodeDecodeError) as err:
        return [], [f"cannot be read as text ({_short(err)})"]
    problems = []
    if text and not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]
        problems.append("is cut short (its last line is incomplete)")
    reader = csv.DictReader(io.StringIO(text))
    if not text or reader.fieldnames is None or "scheme" not in reader.fieldnames:
        return [], problems + ["has no header line with a 'scheme' column"]
    records = []
    try:
        for raw in reader:
            rec = {c: _from_csv(raw.get(c), kind) for c, kind in types.items() if c in reader.fieldnames}
            rec = {c: v for c, v in rec.items() if v is not _MISSING}
            bad = [c for c, v in rec.items() if v is _BAD]
            if bad or None in raw:  # None key: more cells than the header
                cells = ", ".join(bad or ["(extra cells)"])
                problems.append(f"line {reader.line_num} has bad values in {cells}")
            else:
                records.append(rec)
    except csv.Error as err:
        problems.append(f"is not valid CSV ({_short(err)})")
    return records, problems


def _short(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return (text[0] if text else type(err).__name__)[:160]


def curves_problem(curves: list[dict[str, Any]], row: dict[str, Any]) -> str | None:
    """Whether a scheme's curves are whole: evaluations in step order through epochs 1..n (each
    epoch at least once), n the row's ``epochs``."""
    epochs = [c["epoch"] for c in curves]
    steps = [c.get("step") for c in curves]
    whole = sorted(set(epochs)) == list(range(1, row.get("epochs", 0) + 1)) and epochs == sorted(epochs)
    if not whole or any(s is None for s in steps) or steps != sorted(set(steps)):
        return (f"curves of {row['scheme']!r} have epochs {sorted(set(epochs))} at steps {steps}, expected epochs "
                f"1..{row.get('epochs')} in step order")
    return None


class ResultStore:
    """The finished rows and curves of one output folder, merged by scheme from every source.

    Rows come from results.json, else results.csv, else the scheme's checkpoint (which holds its
    row once it finished); curves from curves.csv, else the checkpoint. A damaged file costs no
    row that another source still has: ``problems`` says what was wrong, ``damaged`` which files
    to set aside, ``recovered`` where rows not in results.json came from, and ``needs_write``
    whether the files on disk should be rewritten (:meth:`repair`). ``known``: scheme name ->
    fingerprint (spec.json), so that a row of another config is not taken; ``spec_fingerprint``:
    the sweep's, so that only its checkpoints are used (None: checkpoints are not read).
    """

    def __init__(self, out: str | Path, *, known: dict[str, str] | None = None,
                 spec_fingerprint: str | None = None) -> None:
        self.out = Path(out)
        self.rows: dict[str, dict[str, Any]] = {}
        self.curves: dict[str, list[dict[str, Any]]] = {}
        self.problems: list[str] = []
        self.damaged: list[str] = []
        self.recovered: dict[str, str] = {}
        self.checkpoint_problems: dict[str, str] = {}
        self.needs_write = False
        self._load(known, spec_fingerprint)

    def _note(self, name: str, problems: list[str]) -> None:
        if problems:
            self.problems += [f"{str(self.out / name)!r} {p}" for p in problems]
            self.damaged.append(name)
            self.needs_write = True

    def _load(self, known: dict[str, str] | None, spec_fingerprint: str | None) -> None:
        rows, problems = read_rows_json(self.out / RESULTS_JSON, known)
        self._note(RESULTS_JSON, problems)
        self.rows.update(rows)
        csv_rows, problems = read_csv_records(self.out / RESULTS_CSV, COLUMN_TYPES)
        for r in csv_rows:
            problem = row_problem(r, known=known)
            if problem is not None:
                problems.append(problem)
            elif r["scheme"] not in self.rows:
                self.rows[r["scheme"]] = r
                self.recovered[r["scheme"]] = RESULTS_CSV
        self._note(RESULTS_CSV, problems)
        if set(self.recovered) or set(rows) - {r["scheme"] for r in csv_rows}:
            self.needs_write = True  # one file lacks rows the other has (a run stopped between the two)
        records, problems = read_csv_records(self.out / CURVES_CSV, CURVE_TYPES)
        by_scheme: dict[str, list[dict[str, Any]]] = {}
        for c in records:
            by_scheme.setdefault(c["scheme"], []).append(c)
        for name, row in self.rows.items():
            if name in by_scheme:
                problem = curves_problem(by_scheme[name], row)
                if problem is None:
                    self.curves[name] = by_scheme[name]
                else:
                    problems.append(problem)
        self._note(CURVES_CSV, problems)
        if spec_fingerprint is not None:
            self._from_checkpoints(known, spec_fingerprint)

    def _from_checkpoints(self, known: dict[str, str] | None, spec_fingerprint: str) -> None:
        """Rows and curves still missing, from the checkpoints of finished schemes."""
        from precsim.experiments.checkpoint import CHECKPOINT_DIR, read_checkpoint

        folder = self.out / CHECKPOINT_DIR
        paths = sorted(folder.glob("*.pt")) if folder.is_dir() else []
        for path in paths:
            name = path.stem
            if name in self.rows and name in self.curves:
                continue
            try:
                state = read_checkpoint(path)
            except CorruptFileError as err:
                self.checkpoint_problems[name] = err.problem
                continue
            except FileNotFoundError:
                continue
            row, curves = state.get("row"), state["curves"]
            fp = known.get(name) if known else None
            other_config = fp is not None and state["scheme_fingerprint"] != fp
            if state["spec_fingerprint"] != spec_fingerprint or other_config:
                continue  # another sweep's or config's: check_out_folder / load_checkpoint say so
            if name not in self.rows:
                if row is None or row_problem(row, known=known) is not None:
                    continue  # not finished (or no row inside): the sweep trains or resumes it
                self.rows[name] = row
                self.recovered[name] = f"{CHECKPOINT_DIR}/{path.name}"
                self.needs_write = True
            if name not in self.curves and curves_problem(curves, self.rows[name]) is None:
                self.curves[name] = list(curves)
                self.needs_write = True

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

    def repair(self, order: list[str] | None = None) -> list[str]:
        """Keep each damaged file as ``<name>.corrupt`` and rewrite the files from the merged rows;
        the names set aside. Call it only while holding the folder's lock."""
        kept = []
        for name in dict.fromkeys(self.damaged):
            path = self.out / name
            if path.is_file():
                os.replace(path, self.out / f"{name}{CORRUPT_SUFFIX}")
                kept.append(f"{name}{CORRUPT_SUFFIX}")
        self.write(order)
        self.needs_write = False
        self.damaged = []
        return kept

    def write(self, order: list[str] | None = None) -> None:
        rows = self.ordered(order)
        atomic_write_json(self.out / RESULTS_JSON, rows)
        atomic_write_text(self.out / RESULTS_CSV, to_csv(rows, RESULT_COLUMNS))
        atomic_write_text(self.out / CURVES_CSV, to_csv(self.ordered_curves(order), CURVE_COLUMNS))


__all__ = ["CORRUPT_SUFFIX", "CURVES_CSV", "RESULTS_CSV", "RESULTS_JSON", "RESULT_COLUMNS", "ResultStore",
           "baseline_row", "curves_problem", "read_csv_records", "read_rows_json", "row_problem", "to_csv",
           "with_time_ratios"]
