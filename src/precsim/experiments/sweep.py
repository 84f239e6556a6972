"""Run a sweep: own the output folder, skip finished schemes, resume the interrupted one.

The output folder holds ``spec.json`` (the resolved spec, its fingerprint, and every scheme
ever run there). A rerun with a spec that would give different numbers (another model, epochs,
seed, batch size, world size, ...) is refused, as is a scheme whose name is known in the
folder with a different config; ``--fresh`` deletes precsim's files there first. Schemes can
be added to a folder later (``--schemes`` with new names). Only rank 0 writes.

The folder is locked for the whole run (:mod:`precsim.experiments.lock`), so no two sweeps
write it at once. Under the lock the rows are merged by scheme from results.json, results.csv
and the checkpoints (:class:`~precsim.experiments.results.ResultStore`), so that no row a run
wrote is dropped, and a damaged file is set aside and rebuilt; a damaged spec.json or
checkpoint stops the run with a message naming it and the way out.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from precsim.experiments import distributed as D
from precsim.experiments.checkpoint import (
    CHECKPOINT_DIR,
    CorruptFileError,
    atomic_write_json,
    load_checkpoint,
    read_checkpoint,
    remove_temp_files,
)
from precsim.experiments.lock import LOCK_NAME, FolderBusyError, FolderLock, acquire
from precsim.experiments.report import CURVES_PNG, REPORT_MD, format_table, write_report
from precsim.experiments.results import CORRUPT_SUFFIX, CURVES_CSV, RESULTS_CSV, RESULTS_JSON, ResultStore
from precsim.experiments.spec import SweepSpec
from precsim.experiments.telemetry import STATS_DIR
from precsim.experiments.train import load_data, train_scheme, warm_up
from precsim.runtime.backend import compiling

SPEC_JSON = "spec.json"
DEBUG_DIR = "debug"
OWNED_FILES = (SPEC_JSON, RESULTS_JSON, RESULTS_CSV, CURVES_CSV, CURVES_PNG, REPORT_MD)
# Debug knob for tests: sleep this many seconds after each epoch's checkpoint (widens the window
# in which a test can kill the sweep between two epochs).
EPOCH_SLEEP_ENV = "PRECSIM_SWEEP_EPOCH_SLEEP"


def checkpoint_path(out: Path, scheme: str) -> Path:
    return out / CHECKPOINT_DIR / f"{scheme}.pt"


def clear_outputs(out: Path) -> None:
    """Delete precsim's own files in ``out`` (and nothing else): what ``--fresh`` does."""
    for name in OWNED_FILES:
        (out / name).unlink(missing_ok=True)
        (out / f"{name}{CORRUPT_SUFFIX}").unlink(missing_ok=True)
    for sub in (CHECKPOINT_DIR, DEBUG_DIR, STATS_DIR):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)


def read_record(path: Path) -> dict[str, Any]:
    """spec.json, checked; ValueError naming the file, what is wrong and the way out."""
    try:
        record = json.loads(path.read_bytes().decode("utf-8"))
        problem = None
    except (UnicodeDecodeError, ValueError) as err:
        record, problem = None, f"is not valid JSON ({str(err).splitlines()[0][:160]})"
    except OSError as err:
        record, problem = None, f"cannot be read ({err.strerror})"
    if problem is None:
        if not isinstance(record, dict):
            problem = f"holds a {type(record).__name__}, not a spec record"
        elif not isinstance(record.get("fingerprint"), str) or not isinstance(record.get("schemes"), dict):
            problem = "lacks its 'fingerprint' or 'schemes'"
        elif not all(isinstance(v, dict) and isinstance(v.get("fingerprint"), str) and "config" in v
                     for v in record["schemes"].values()):
            problem = "has a malformed 'schemes' entry"
    if problem is not None:
        raise CorruptFileError(
            f"{str(path)!r} is corrupt: it {problem}. It records which sweep the folder holds, so this run "
            f"cannot be checked against it. Delete it and run again (precsim rebuilds it when every checkpoint "
            "in the folder belongs to this sweep), or use --fresh to start the folder over", path, problem)
    return record


def checkpoints_match(out: Path, spec_fingerprint: str) -> tuple[bool, str]:
    """Whether the folder's checkpoints (at least one) all belong to a sweep with this fingerprint."""
    folder = out / CHECKPOINT_DIR
    paths = sorted(folder.glob("*.pt")) if folder.is_dir() else []
    if not paths:
        return False, "it has no checkpoints to check it against"
    for p in paths:
        try:
            state = read_checkpoint(p)
        except (CorruptFileError, FileNotFoundError) as err:
            return False, f"checkpoint {str(p)!r} cannot be checked ({getattr(err, 'problem', err)})"
        if state["spec_fingerprint"] != spec_fingerprint:
            return False, f"checkpoint {str(p)!r} belongs to another sweep"
    return True, f"its {len(paths)} checkpoint(s) all belong to this sweep"


def check_out_folder(out: Path, spec: SweepSpec, world_size: int) -> dict[str, Any] | None:
    """The folder's stored spec record, or None for a new folder; ValueError on a conflict."""
    record_path = out / SPEC_JSON
    if not record_path.is_file():
        leftovers = [n for n in (RESULTS_JSON, RESULTS_CSV, CHECKPOINT_DIR) if (out / n).exists()]
        if leftovers:
            ok, why = checkpoints_match(out, spec.fingerprint(world_size))
            if ok:
                return None  # spec.json is rebuilt from this spec (see docs/sweep.md)
            raise ValueError(f"output folder {str(out)!r} holds {', '.join(leftovers)} but no {SPEC_JSON}, and "
                             f"{why}, so it cannot be checked against this sweep; use another --out, or --fresh "
                             "to overwrite")
        return None
    record = read_record(record_path)
    fingerprint = spec.fingerprint(world_size)
    if record.get("fingerprint") != fingerprint:
        old = record.get("fields", {})
        new = spec.fingerprint_fields(world_size)
        diffs = [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(set(old) | set(new))
                 if old.get(k) != new.get(k)]
        raise ValueError(
            f"output folder {str(out)!r} holds a sweep with a different spec ({'; '.join(diffs) or 'fingerprint'}). "
            "Its results would not be comparable: use another --out, or --fresh to overwrite it.")
    known = record.get("schemes", {})
    for s in spec.schemes:
        if s.name in known and known[s.name]["fingerprint"] != s.fingerprint:
            raise ValueError(
                f"output folder {str(out)!r} already has a scheme {s.name!r} with a different config "
                f"({known[s.name]['config']} vs {s.config}); rename the scheme, use another --out, or --fresh")
    return record


def write_record(out: Path, spec: SweepSpec, world_size: int, previous: dict[str, Any] | None) -> None:
    """spec.json: resolved spec, fingerprint, and every scheme known to the folder."""
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    schemes = dict(previous.get("schemes", {})) if previous else {}
    for s in spec.schemes:
        schemes[s.name] = {**s.to_dict(), "fingerprint": s.fingerprint}
    from precsim import __version__

    atomic_write_json(out / SPEC_JSON, {
        "fingerprint": spec.fingerprint(world_size),
        "world_size": world_size,
        "spec": spec.to_dict(),
        "fields": spec.fingerprint_fields(world_size),
        "schemes": schemes,
        "precsim_version": __version__,
        "torch_version": torch.__version__,
        "created": previous.get("created", now) if previous else now,
        "updated": now,
    })


def known_schemes(spec: SweepSpec, previous: dict[str, Any] | None) -> list[str]:
    """Every scheme name of the folder: earlier ones in their order, then this spec's new ones."""
    names = list(previous.get("schemes", {})) if previous else []
    return names + [s.name for s in spec.schemes if s.name not in names]


def run_sweep(spec: SweepSpec, *, fresh: bool = False, progress: bool = True,
              log: Callable[[str], None] | None = None, command: str | None = None) -> list[dict[str, Any]]:
    """Train every scheme of ``spec`` not yet finished in ``spec.out``; their rows.

    Works single-process and under torchrun (every rank calls it; rank 0 writes). Rounding
    runs through the compiled kernels unless ``spec.compile`` is off (identical bits; the first
    call of each format compiles for a few seconds, cached on disk across runs). ``command``:
    how this run was started, shown to a second sweep that finds the folder locked (default:
    this process's argv).
    """
    start = time.perf_counter()
    if command is None:
        command = shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]])
    with compiling(spec.compile):
        return _run_sweep(spec, start, fresh, progress, log, command)


def _run_sweep(spec: SweepSpec, start: float, fresh: bool, progress: bool,
               log: Callable[[str], None] | None, command: str) -> list[dict[str, Any]]:
    ctx = D.init_distributed(spec.device)
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if not ctx.is_main:
        def say(m: str) -> None:
            return None
    out = Path(spec.out)
    lock: FolderLock | None = None
    try:
        lock = lock_folder(out, ctx, say, command)
        record = None if fresh else check_out_folder(out, spec, ctx.world_size)
        D.barrier(ctx)  # every rank has read the folder before rank 0 changes it
        if ctx.is_main:
            if fresh:
                clear_outputs(out)
            if record is None and not fresh and (out / CHECKPOINT_DIR).is_dir():
                say(f"precsim sweep: {SPEC_JSON} was missing in {str(out)!r}: rebuilt from this sweep, to which "
                    "every checkpoint there belongs")
            for p in remove_temp_files(out, *(out / sub for sub in (CHECKPOINT_DIR, DEBUG_DIR, STATS_DIR))):
                say(f"precsim sweep: removed {str(p)!r}, left by a run that was stopped while writing it")
            write_record(out, spec, ctx.world_size, record)
        D.barrier(ctx)
        data = load_data(spec)
        order = known_schemes(spec, record)  # the table order: stable across reruns
        current = {s.name for s in spec.schemes}
        spec_fp = spec.fingerprint(ctx.world_size)
        known = {name: v["fingerprint"] for name, v in (record or {}).get("schemes", {}).items()}
        known.update({s.name: s.fingerprint for s in spec.schemes})
        store = ResultStore(out, known=known, spec_fingerprint=spec_fp)
        D.barrier(ctx)  # every rank has read the results before rank 0 repairs them
        pending = [s for s in spec.schemes if not store.has(s.name)]
        if ctx.is_main:
            repair_results(store, out, order, spec, ctx.world_size, {s.name for s in pending}, say)
        for s in pending:  # a damaged checkpoint stops the run now, not after the schemes before it
            load_checkpoint(checkpoint_path(out, s.name), scheme_fingerprint=s.fingerprint,
                            spec_fingerprint=spec_fp)
        debug_dir = out / DEBUG_DIR if spec.debug_digests else None
        sleep = float(os.environ.get(EPOCH_SLEEP_ENV, "0") or 0)
        say(f"precsim sweep: {len(spec.schemes)} schemes, {spec.model} on {spec.dataset} "
            f"({len(data.train_x)} train / {len(data.test_x)} test), {spec.epochs} epochs, batch {spec.batch_size}, "
            f"{ctx.world_size} process(es) on {ctx.device.type}; writing to {out.resolve()}")
        n = len(spec.schemes)
        if any(not store.has(s.name) for s in spec.schemes):
            warm_up(spec, data, ctx)
        for k, scheme in enumerate(spec.schemes, start=1):
            if store.has(scheme.name):
                say(f"[{k}/{n}] {scheme.name}: finished earlier, skipped")
                continue
            ckpt = checkpoint_path(out, scheme.name)
            row, curves = train_scheme(
                spec, scheme, data, ctx, checkpoint_path=ckpt, spec_fingerprint=spec_fp,
                label=f"[{k}/{n}] {scheme.name}", show_progress=progress, debug_dir=debug_dir,
                after_epoch=(lambda e: time.sleep(sleep)) if sleep > 0 else None, log=say,
                stats_dir=out / STATS_DIR)
            if ctx.is_main:
                store.add(row, curves, order)
                rows = store.ordered(order)
                write_report(out, rows, store.ordered_curves(order), spec.to_dict(), ctx.world_size,
                             sum(r["time_s"] for r in rows if r.get("time_s")))
                say(f"[{k}/{n}] {scheme.name}: accuracy {100 * row['accuracy']:.2f}%  auc {100 * row['auc']:.2f}%  "
                    f"loss {row['loss']:.4f}  {row['time_s']:.1f} s")
                if row.get("first_nonfinite"):
                    say(f"[{k}/{n}] {scheme.name}: first NaN/Inf at {row['first_nonfinite']}")
            D.barrier(ctx)
        rows = store.ordered(order) if ctx.is_main else []
        if ctx.is_main:
            print(format_table([r for r in rows if r["scheme"] in current]), flush=True)
            say(f"precsim sweep: done in {time.perf_counter() - start:.1f} s; results in {out.resolve()}: "
                f"{RESULTS_CSV}, {RESULTS_JSON}, {CURVES_CSV}, {CURVES_PNG}, {REPORT_MD}")
        return [r for r in rows if r["scheme"] in current]
    finally:
        if lock is not None:
            lock.release()
        D.shutdown(ctx)


def lock_folder(out: Path, ctx: D.DistContext, say: Callable[[str], None], command: str) -> FolderLock | None:
    """Rank 0 locks ``out``; every rank raises if that failed (so that none waits for the others)."""
    lock, error = None, None
    if ctx.is_main:
        try:
            lock = acquire(out, command=command[:300], log=say)
        except Exception as err:  # noqa: BLE001 - shared with the other ranks, then raised
            error = err
    message = D.broadcast_object(ctx, None if error is None else str(error))
    if error is not None:
        raise error
    if message is not None:
        raise FolderBusyError(message)
    return lock


def repair_results(store: ResultStore, out: Path, order: list[str], spec: SweepSpec, world_size: int,
                   pending: set[str], say: Callable[[str], None]) -> None:
    """Say what was damaged, and rewrite the results files (and report) from the merged rows."""
    for problem in store.problems:
        say(f"precsim sweep: warning: {problem}")
    for name, problem in store.checkpoint_problems.items():
        if name in pending:
            continue  # this run needs it: load_checkpoint stops with the way out
        what = ("keeps its row, but its curves are lost" if store.has(name) else
                f"has no row: delete the file and run the scheme again (--schemes {name})")
        say(f"precsim sweep: warning: checkpoint {str(out / CHECKPOINT_DIR / (name + '.pt'))!r} is corrupt "
            f"({problem}); scheme {name!r} {what}")
    if not store.needs_write:
        return
    kept = store.repair(order)
    rebuilt = ", ".join(f"{name} from {where}" for name, where in store.recovered.items())
    say(f"precsim sweep: rewrote {RESULTS_JSON}, {RESULTS_CSV} and {CURVES_CSV} from every source of rows"
        + (f"; rows rebuilt: {rebuilt}" if rebuilt else "")
        + (f"; the damaged file(s) kept as {', '.join(kept)}" if kept else ""))
    rows = store.ordered(order)
    if rows:
        write_report(out, rows, store.ordered_curves(order), spec.to_dict(), world_size,
                     sum(r["time_s"] for r in rows if r.get("time_s")))


__all__ = ["CHECKPOINT_DIR", "EPOCH_SLEEP_ENV", "LOCK_NAME", "SPEC_JSON", "check_out_folder", "checkpoint_path",
           "clear_outputs", "lock_folder", "read_record", "repair_results", "run_sweep",
           "write_record"]
