"""Sensitivity (``precsim analyze``): one point group at a time in each candidate format.

A *group* is one role of one module: ``layer1.0.conv2``'s activation, its weight, the gradient
through its output. For each group and candidate, the FP32 model is prepared with that group
alone quantized (a ``match`` rule; everything else stays FP32), calibrated on a few training
batches, optionally fine-tuned (``qat_steps``; gradient roles need it), and evaluated on the
search split. The change of the metric and of the score against FP32 is that group's
sensitivity. Each measurement is kept in ``measurements.json`` as it is made, so an interrupted
run restarts where it stopped; the folder is locked against a second run.

Outputs: ``sensitivity.csv`` (every group x candidate), ``sensitivity.png`` (groups ranked by
their score change, one bar per candidate) and ``sensitivity.md`` (the most sensitive groups).
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import io
import itertools
import json
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from precsim.experiments.checkpoint import (
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_temp_files,
)
from precsim.experiments.study import FP32, StudySpec, costs_per_element
from precsim.experiments.task import Task
from precsim.qat.batches import feed
from precsim.qat.calibrate import calibrate
from precsim.qat.prepare import point_rows, prepare, quantizers

MEASUREMENTS = "measurements.json"
SENSITIVITY_CSV = "sensitivity.csv"
SENSITIVITY_PNG = "sensitivity.png"
SENSITIVITY_MD = "sensitivity.md"
# the point rows that carry each studied role: a gradient flows back through an activation point
_ROW_ROLE = {"activation": "activation", "gradient": "activation", "weight": "weight", "weight_gradient": "weight"}

Assignment = dict[tuple[str, str], str]  # (module, role) -> candidate label; absent: fp32


@dataclass(frozen=True)
class Group:
    """One role of one module, and the elements its tensors hold in one forward pass of one example."""

    module: str
    role: str
    elements: int

    @property
    def key(self) -> tuple[str, str]:
        return self.module, self.role


def point_groups(task: Task, study: StudySpec) -> list[Group]:
    """Every (module, role) of the study, in model order, with its element count."""
    probe = copy.deepcopy(task.model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        prepare(probe, {"points": study.points, **{r: "bf16" for r in study.roles}}, example_inputs=task.example)
    sizes: dict[int, int] = {}

    def count(q: nn.Module, args: Any, out: Tensor) -> None:
        sizes[id(q)] = sizes.get(id(q), 0) + out.numel()

    handles = [q.register_forward_hook(count) for _, q in quantizers(probe)]
    probe.eval()
    try:
        with torch.no_grad():
            feed(probe, task.example)
    finally:
        for h in handles:
            h.remove()
    elements: dict[tuple[str, str], int] = {}
    for _, q, row in point_rows(probe):
        module = "" if row["module"] == "(model)" else row["module"]
        if not fnmatch.fnmatchcase(module, study.modules):
            continue
        for role in study.roles:
            if row["role"] == _ROW_ROLE[role] and id(q) in sizes:
                elements[(module, role)] = elements.get((module, role), 0) + sizes[id(q)]
    if not elements:
        raise ValueError(f"no point of roles {', '.join(study.roles)} in modules matching {study.modules!r}; check "
                         "'modules' and 'roles' against precsim.summary(prepare(model, config))")
    order = {m: i for i, (m, _) in enumerate(task.model.named_modules())}
    keys = sorted(elements, key=lambda k: (order.get(k[0], -1), study.roles.index(k[1])))
    return [Group(m, r, elements[(m, r)]) for m, r in keys]


def _glob(name: str) -> str:
    """A module name as a glob that matches it alone."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def config_for(study: StudySpec, assignment: Assignment) -> dict[str, Any]:
    """The ``prepare()`` config of an assignment: one rule per module with a quantized group."""
    by_module: dict[str, dict[str, Any]] = {}
    for (m, role), label in sorted(assignment.items()):
        if label != FP32:
            by_module.setdefault(m, {"match": _glob(m)})[role] = study.candidates[label]
    return {"points": study.points, "rules": list(by_module.values())}


class Measurements:
    """(split, assignment) -> (metric, score), kept in ``measurements.json`` after each one."""

    def __init__(self, out: Path, fingerprint: str, fresh: bool = False) -> None:
        self.path, self.fingerprint = out / MEASUREMENTS, fingerprint
        self.results: dict[str, list[float]] = {}
        if self.path.is_file() and not fresh:
            try:
                saved = json.loads(self.path.read_text())
                ok = isinstance(saved, dict) and isinstance(saved.get("results"), dict)
            except (ValueError, UnicodeDecodeError):
                saved, ok = None, False
            if not ok:
                raise ValueError(f"{str(self.path)!r} is damaged; delete it (its measurements are made again) or "
                                 "use --fresh")
            if saved["fingerprint"] != fingerprint:
                raise ValueError(f"{str(self.path)!r} holds measurements of another study (other model, data, "
                                 "candidates, roles or qat_steps); use another --out, or --fresh")
            self.results = saved["results"]

    @staticmethod
    def key(split: str, assignment: Assignment) -> str:
        return split + "|" + ";".join(f"{m}:{r}={label}" for (m, r), label in sorted(assignment.items())
                                      if label != FP32)

    def get(self, split: str, assignment: Assignment) -> tuple[float, float] | None:
        value = self.results.get(self.key(split, assignment))
        return None if value is None else (value[0], value[1])

    def put(self, split: str, assignment: Assignment, value: tuple[float, float]) -> None:
        self.results[self.key(split, assignment)] = list(value)
        atomic_write_json(self.path, {"fingerprint": self.fingerprint, "results": self.results})


def evaluate(task: Task, study: StudySpec, assignment: Assignment, split: str,
             store: Measurements | None = None) -> tuple[float, float]:
    """(metric, score) of the FP32 model with ``assignment`` applied, on ``split`` (cached in ``store``)."""
    if store is not None and (hit := store.get(split, assignment)) is not None:
        return hit
    model = copy.deepcopy(task.model)
    if any(label != FP32 for label in assignment.values()):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a rule for a module the points do not reach
            prepare(model, config_for(study, assignment), seed=task.spec.seed, example_inputs=task.example)
        calibrate(model, task.calibration, None, batches=len(task.calibration))
    if study.qat_steps:
        _fine_tune(model, task, study.qat_steps)
    value = task.evaluate(model, split)
    if store is not None:
        store.put(split, assignment, value)
    return value


def _fine_tune(model: nn.Module, task: Task, steps: int) -> None:
    """``steps`` SGD steps at a small learning rate, the same batches for every assignment."""
    torch.manual_seed(task.spec.seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model.train()
    for x, y in itertools.islice(itertools.cycle(task.train), steps):
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()


def sensitivities(task: Task, study: StudySpec, groups: list[Group], store: Measurements,
                  progress: bool = True) -> tuple[tuple[float, float], list[dict[str, Any]]]:
    """The FP32 (metric, score) and one row per group x candidate on the search split."""
    from tqdm import tqdm

    base = evaluate(task, study, {}, "search", store)
    costs = costs_per_element(study.candidates, study.cost)
    jobs = [(g, label) for g in groups for label in study.candidates]
    rows = []
    with tqdm(total=len(jobs), desc="sensitivity", unit="eval", disable=not progress, dynamic_ncols=True) as bar:
        for g, label in jobs:
            metric, score = evaluate(task, study, {g.key: label}, "search", store)
            rows.append({"key": g.key, "module": g.module or "(model)", "role": g.role, "elements": g.elements,
                         "candidate": label, "cost": costs[label], "metric": metric, "delta_metric": metric - base[0],
                         "score": score, "delta_score": score - base[1]})
            bar.update(1)
    return base, rows


def rank(rows: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """Groups, most sensitive first: by the mean score change over the candidates."""
    by: dict[tuple[str, str], list[float]] = {}
    for r in rows:
        by.setdefault((r["module"], r["role"]), []).append(r["delta_score"])
    return sorted(by, key=lambda k: -sum(by[k]) / len(by[k]))


def write_analysis(out: Path, study: StudySpec, base: tuple[float, float], rows: list[dict[str, Any]]) -> None:
    """sensitivity.csv, sensitivity.png and sensitivity.md."""
    import csv

    order = {k: i for i, k in enumerate(rank(rows))}
    rows = sorted(rows, key=lambda r: (order[(r["module"], r["role"])], r["candidate"]))
    buf = io.StringIO()
    cols = ["module", "role", "elements", "candidate", "cost", "metric", "delta_metric", "score", "delta_score"]
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n", extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: f"{v:.6g}" if isinstance(v, float) else v for k, v in r.items()})
    atomic_write_text(out / SENSITIVITY_CSV, buf.getvalue())
    atomic_write_bytes(out / SENSITIVITY_PNG, _chart(rows, study))
    metric = study.task.metric
    top = rank(rows)[:15]
    lines = [f"# precsim analyze: {study.task.model} on {study.task.dataset}", "",
             f"FP32 on the search split ({study.task.eval_size} examples): {metric} {base[0]:.4f}, score "
             f"{base[1]:.4f} ({'cross-entropy' if metric == 'accuracy' else '1 - cosine'}). Each row quantizes "
             "one group alone; the change is against FP32 (score: lower is better).", "",
             "Most sensitive groups (mean score change over the candidates):", "",
             "| module | role | " + " | ".join(f"{c}: d{metric} / dscore" for c in study.candidates) + " |",
             "|---|---|" + "---:|" * len(study.candidates)]
    cell = {(r["module"], r["role"], r["candidate"]): r for r in rows}
    for m, role in top:
        vals = [cell[(m, role, c)] for c in study.candidates]
        lines.append(f"| {m} | {role} | " + " | ".join(f"{v['delta_metric']:+.3g} / {v['delta_score']:+.3g}"
                                                      for v in vals) + " |")
    lines += ["", f"All groups: `{SENSITIVITY_CSV}`.", "", f"![sensitivity]({SENSITIVITY_PNG})", ""]
    atomic_write_text(out / SENSITIVITY_MD, "\n".join(lines))


def _chart(rows: list[dict[str, Any]], study: StudySpec) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    groups = rank(rows)
    cands = list(study.candidates)
    cell = {(r["module"], r["role"], r["candidate"]): r["delta_score"] for r in rows}
    fig, ax = plt.subplots(figsize=(8, 1.5 + 0.28 * len(groups)))
    h = 0.8 / len(cands)
    colors = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]
    for j, c in enumerate(cands):
        ys = [i + j * h for i in range(len(groups))]
        ax.barh(ys, [max(cell[(m, r, c)], 1e-6) for m, r in groups], height=h, label=c, color=colors[j % 10])
    ax.set_yticks([i + 0.4 - h / 2 for i in range(len(groups))], [f"{m} {r}" for m, r in groups], fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel(f"score change vs FP32 ({'cross-entropy' if study.task.metric == 'accuracy' else '1 - cosine'}),"
                  " one group quantized alone; <= 0 drawn at 1e-6")
    ax.set_title(f"precsim analyze: {study.task.model} on {study.task.dataset}, most sensitive first", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


@dataclass
class Study:
    """What a study measured: the task, its groups, the FP32 (metric, score), the rows."""

    task: Task
    store: Measurements
    groups: list[Group]
    base: tuple[float, float]
    rows: list[dict[str, Any]]


@contextlib.contextmanager
def measured(study: StudySpec, out: Path, name: str, fresh: bool, progress: bool,
             log: Callable[[str], None]) -> Iterator[Study]:
    """Lock ``out``, build the task, measure every group (resuming), write the analysis; the
    folder stays locked inside (``precsim search`` goes on measuring)."""
    from precsim.experiments.lock import acquire
    from precsim.experiments.task import build_task

    lock = acquire(out, command=f"precsim {name}", log=log)
    try:
        for p in remove_temp_files(out):
            log(f"precsim {name}: removed {str(p)!r}, left by a run that was stopped while writing it")
        task = build_task(study.task, out, log)
        store = Measurements(out, study.fingerprint(), fresh)
        groups = point_groups(task, study)
        log(f"precsim {name}: {len(groups)} groups x {len(study.candidates)} candidates on {study.task.model}; "
            f"{len(store.results)} measurements from an earlier run reused")
        base, rows = sensitivities(task, study, groups, store, progress)
        write_analysis(out, study, base, rows)
        yield Study(task, store, groups, base, rows)
    finally:
        lock.release()


def run_analyze(study: StudySpec, out: Path, *, fresh: bool = False, progress: bool = True,
                log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The whole of ``precsim analyze``: lock ``out``, measure (resuming), write the outputs."""
    with measured(study, out, "analyze", fresh, progress, log) as done:
        log(f"precsim analyze: wrote {SENSITIVITY_CSV}, {SENSITIVITY_PNG} and {SENSITIVITY_MD} in {out}")
        return done.rows


__all__ = ["MEASUREMENTS", "SENSITIVITY_CSV", "SENSITIVITY_MD", "SENSITIVITY_PNG", "Assignment", "Group", "Measurements", "Study", "config_for", "evaluate", "measured", "point_groups", "rank", "run_analyze",
           "sensitivities", "write_analysis"]
