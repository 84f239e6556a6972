"""Run a sweep: own the output folder, skip finished schemes, resume the interrupted one.

The output folder holds ``spec.json`` (the resolved spec, its fingerprint, and every scheme
ever run there). A rerun with a spec that would give different numbers (another model, epochs,
seed, batch size, world size, ...) is refused, as is a scheme whose name is known in the
folder with a different config; ``--fresh`` deletes precsim's files there first. Schemes can
be added to a folder later (``--schemes`` with new names). Only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from precsim.experiments import distributed as D
from precsim.experiments.checkpoint import atomic_write_json
from precsim.experiments.report import CURVES_PNG, REPORT_MD, format_table, write_report
from precsim.experiments.results import CURVES_CSV, RESULTS_CSV, RESULTS_JSON, ResultStore
from precsim.experiments.spec import SweepSpec
from precsim.experiments.train import load_data, train_scheme, warm_up
from precsim.runtime.backend import compiling

SPEC_JSON = "spec.json"
CHECKPOINT_DIR = "checkpoints"
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
    for sub in (CHECKPOINT_DIR, DEBUG_DIR):
        if (out / sub).is_dir():
            shutil.rmtree(out / sub)


def check_out_folder(out: Path, spec: SweepSpec, world_size: int) -> dict[str, Any] | None:
    """The folder's stored spec record, or None for a new folder; ValueError on a conflict."""
    record_path = out / SPEC_JSON
    if not record_path.is_file():
        leftovers = [n for n in (RESULTS_JSON, CHECKPOINT_DIR) if (out / n).exists()]
        if leftovers:
            raise ValueError(f"output folder {str(out)!r} holds {', '.join(leftovers)} but no {SPEC_JSON}, so it "
                             "cannot be checked against this sweep; use another --out, or --fresh to overwrite")
        return None
    record = json.loads(record_path.read_text())
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
              log: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Train every scheme of ``spec`` not yet finished in ``spec.out``; their rows.

    Works single-process and under torchrun (every rank calls it; rank 0 writes). Rounding
    runs through the compiled kernels unless ``spec.compile`` is off (identical bits; the first
    call of each format compiles for a few seconds, cached on disk across runs).
    """
    start = time.perf_counter()
    with compiling(spec.compile):
        return _run_sweep(spec, start, fresh, progress, log)


def _run_sweep(spec: SweepSpec, start: float, fresh: bool, progress: bool,
               log: Callable[[str], None] | None) -> list[dict[str, Any]]:
    ctx = D.init_distributed(spec.device)
    say = log or (lambda m: print(m, file=sys.stderr, flush=True))
    if not ctx.is_main:
        def say(m: str) -> None:
            return None
    out = Path(spec.out)
    try:
        record = None if fresh else check_out_folder(out, spec, ctx.world_size)
        D.barrier(ctx)  # every rank has read the folder before rank 0 changes it
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if fresh:
                clear_outputs(out)
            write_record(out, spec, ctx.world_size, record)
        D.barrier(ctx)
        data = load_data(spec)
        store = ResultStore(out)
        order = known_schemes(spec, record)  # the table order: stable across reruns
        current = {s.name for s in spec.schemes}
        spec_fp = spec.fingerprint(ctx.world_size)
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
                after_epoch=(lambda e: time.sleep(sleep)) if sleep > 0 else None, log=say)
            if ctx.is_main:
                store.add(row, curves, order)
                rows = store.ordered(order)
                write_report(out, rows, store.ordered_curves(order), spec.to_dict(), ctx.world_size,
                             sum(r["time_s"] for r in rows if r.get("time_s")))
                say(f"[{k}/{n}] {scheme.name}: accuracy {100 * row['accuracy']:.2f}%  loss {row['loss']:.4f}  "
                    f"{row['time_s']:.1f} s")
            D.barrier(ctx)
        rows = store.ordered(order) if ctx.is_main else []
        if ctx.is_main:
            print(format_table([r for r in rows if r["scheme"] in current]), flush=True)
            say(f"precsim sweep: done in {time.perf_counter() - start:.1f} s; results in {out.resolve()}: "
                f"{RESULTS_CSV}, {RESULTS_JSON}, {CURVES_CSV}, {CURVES_PNG}, {REPORT_MD}")
        return [r for r in rows if r["scheme"] in current]
    finally:
        D.shutdown(ctx)


__all__ = ["CHECKPOINT_DIR", "EPOCH_SLEEP_ENV", "SPEC_JSON", "check_out_folder", "checkpoint_path",
           "clear_outputs", "run_sweep", "write_record"]
