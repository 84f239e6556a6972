"""Mixed-format search (``precsim search``): the best assignment of formats to point groups under
a cost budget, found on measured sensitivities and then validated.

1. **Measure** each group alone in each candidate (:mod:`precsim.experiments.sensitivity`): its
   score change d(g, c) on the search split (cross-entropy, or 1 - cosine).
2. **Solve** the multiple-choice knapsack: choose one option per group (a candidate, or fp32) to
   minimize the summed score change subject to the average cost per element being at most the
   budget. Costs are weighted by each group's elements in one forward pass of one example, so the
   average over all groups of the study is sum_g n_g cost(c_g) / sum_g n_g (bits per element by
   default: mxfp8 8.25, mxfp4 4.25, nvfp4 4.5, int8 8, bf16 16, fp32 32). Solved exactly by
   dynamic programming over the cost, in steps of 1/200 of a bit per element (each group's cost
   rounded up, so a solution's true cost is within its budget); this is the integer program
   HAWQ-V3 and ModelOpt's auto_quantize solve, over measured changes instead of Hessian traces.
   A measured improvement (d < 0: noise of one group on a few hundred examples) counts as 0.
   The optimum for every cost is the Pareto front (``pareto.csv``).
3. **Validate**: the sum of single-group changes ignores interactions between groups. So for each
   budget the optimum and the two front points just below it are evaluated whole on the search
   split, together with every uniform assignment (one candidate everywhere) within the budget;
   the best is chosen, then it and the uniform ones are evaluated on the held-out split, which no
   choice looked at. The report says, per budget, whether the chosen assignment beats every
   uniform one of equal or lower cost there.

Outputs: ``budget-<B>.yaml`` (a ``prepare()`` config per budget), ``pareto.csv``, ``pareto.png``,
``report.md``, with what ``precsim analyze`` writes (``sensitivity.*``, ``measurements.json``).
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from precsim.experiments.checkpoint import atomic_write_bytes, atomic_write_text
from precsim.experiments.sensitivity import Assignment, Group, config_for, evaluate, measured
from precsim.experiments.study import FP32, StudySpec, costs_per_element
from precsim.experiments.task import Task

STEP = 1 / 200  # the cost grid of the dynamic program, per element
PARETO_CSV = "pareto.csv"
PARETO_PNG = "pareto.png"
NEIGHBOURS = 2  # front points below each budget's optimum that are validated too


@dataclass(frozen=True)
class Choice:
    """An assignment with its cost and what is known of it."""

    assignment: Assignment
    cost: float
    predicted: float  # summed single-group score changes
    kind: str  # "mixed" or "uniform"
    label: str = ""  # the candidate of a uniform assignment


def assignment_cost(groups: list[Group], assignment: Assignment, costs: dict[str, float]) -> float:
    """Average cost per element: sum_g n_g cost(c_g) / sum_g n_g (absent groups are fp32)."""
    total = sum(g.elements for g in groups)
    return sum(g.elements * costs[assignment.get(g.key, FP32)] for g in groups) / total


def pareto_front(groups: list[Group], deltas: dict[tuple[tuple[str, str], str], float],
                 costs: dict[str, float], labels: list[str]) -> list[Choice]:
    """Every assignment on the front of (cost, summed score change), cheapest first: the exact
    optimum of the multiple-choice knapsack at each cost on the grid (see the module doc)."""
    total = sum(g.elements for g in groups)
    options = [FP32, *labels]
    width = int(math.ceil(max(costs.values()) / STEP)) + len(groups) + 1
    best = np.full(width, np.inf)
    best[0] = 0.0
    picks = np.zeros((len(groups), width), dtype=np.int16)
    for gi, g in enumerate(groups):
        new = np.full(width, np.inf)
        pick = np.zeros(width, dtype=np.int16)
        for oi, label in enumerate(options):
            w = int(math.ceil(g.elements * costs[label] / total / STEP - 1e-9))
            d = 0.0 if label == FP32 else max(deltas[(g.key, label)], 0.0)
            cand = np.full(width, np.inf)
            cand[w:] = best[:width - w] + d
            better = cand < new
            new[better], pick[better] = cand[better], oi
        best, picks[gi] = new, pick
    front: list[Choice] = []
    lowest = np.inf
    for w in range(width):
        if best[w] < lowest - 1e-12:
            lowest = best[w]
            assignment: Assignment = {}
            rest = w
            for gi in range(len(groups) - 1, -1, -1):
                label = options[picks[gi, rest]]
                if label != FP32:
                    assignment[groups[gi].key] = label
                rest -= int(math.ceil(groups[gi].elements * costs[label] / total / STEP - 1e-9))
            front.append(Choice(assignment, assignment_cost(groups, assignment, costs), float(best[w]), "mixed"))
    return front


def uniform(groups: list[Group], labels: list[str], costs: dict[str, float],
            deltas: dict[tuple[tuple[str, str], str], float]) -> list[Choice]:
    """One candidate everywhere, for each candidate."""
    out = []
    for label in labels:
        a = {g.key: label for g in groups}
        out.append(Choice(a, assignment_cost(groups, a, costs), sum(max(deltas[(g.key, label)], 0) for g in groups),
                          "uniform", label))
    return out


def _to_yaml(study: StudySpec, choice: Choice, note: str) -> str:
    header = "".join(f"# {line}\n" for line in note.splitlines())
    return header + yaml.safe_dump(config_for(study, choice.assignment), sort_keys=False)


def run_search(study: StudySpec, out: Path, *, fresh: bool = False, progress: bool = True,
               log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """The whole of ``precsim search`` (see the module doc); one summary row per budget."""
    from tqdm import tqdm

    with measured(study, out, "search", fresh, progress, log) as done:
        task, store, groups, base, rows = done.task, done.store, done.groups, done.base, done.rows
        costs = costs_per_element(study.candidates, study.cost)
        labels = list(study.candidates)
        deltas = {(r["key"], r["candidate"]): r["delta_score"] for r in rows}
        front = pareto_front(groups, deltas, costs, labels)
        uniforms = uniform(groups, labels, costs, deltas)
        plan = []
        for b in study.budgets:
            within = [c for c in front if c.cost <= b + 1e-9]
            mixed = within[-1 - NEIGHBOURS:] if within else []
            plan.append((b, mixed, [u for u in uniforms if u.cost <= b + 1e-9]))
        jobs = {id(c): c for _, m, u in plan for c in [*m, *u]}
        with tqdm(total=len(jobs) + sum(1 + len(u) for _, _, u in plan), desc="validation", unit="eval",
                  disable=not progress, dynamic_ncols=True) as bar:
            search_value = {}
            for key, c in jobs.items():
                search_value[key] = evaluate(task, study, c.assignment, "search", store)
                bar.update(1)
            summary = []
            for b, mixed, unis in plan:
                pool = [*mixed, *unis]
                chosen = min(pool, key=lambda c: (search_value[id(c)][1], -search_value[id(c)][0]))
                held = evaluate(task, study, chosen.assignment, "held_out", store)
                bar.update(1)
                held_u = []
                for u in unis:
                    held_u.append((u, evaluate(task, study, u.assignment, "held_out", store)))
                    bar.update(1)
                summary.append(_summarize(b, chosen, held, held_u, search_value[id(chosen)]))
        held_fp32 = evaluate(task, study, {}, "held_out", store)
        _write(out, study, task, front, uniforms, search_value, summary, held_fp32, base)
        log(f"precsim search: wrote {', '.join(f'budget-{b:g}.yaml' for b in study.budgets)}, {PARETO_CSV}, "
            f"{PARETO_PNG} and report.md in {out}")
        return summary


def _summarize(budget: float, chosen: Choice, held: tuple[float, float],
               held_u: list[tuple[Choice, tuple[float, float]]], search: tuple[float, float]) -> dict[str, Any]:
    best_u = max(held_u, key=lambda t: (t[1][0], -t[1][1]), default=None)
    return {"budget": budget, "kind": chosen.kind, "label": chosen.label, "cost": chosen.cost,
            "assignment": chosen.assignment, "search_metric": search[0], "metric": held[0], "score": held[1],
            "best_uniform": best_u[0].label if best_u else None, "best_uniform_cost": best_u[0].cost if best_u else None,
            "best_uniform_metric": best_u[1][0] if best_u else None,
            "best_uniform_score": best_u[1][1] if best_u else None,
            "uniform": {u.label: {"cost": u.cost, "metric": v[0], "score": v[1]} for u, v in held_u},
            "quantized_groups": len(chosen.assignment)}


def _write(out: Path, study: StudySpec, task: Task, front: list[Choice], uniforms: list[Choice],
           search_value: dict[int, tuple[float, float]], summary: list[dict[str, Any]],
           held_fp32: tuple[float, float], base: tuple[float, float]) -> None:
    metric = study.task.metric
    for s in summary:
        note = (f"precsim search: budget {s['budget']:g} per element; cost {s['cost']:.4f}; "
                f"{metric} on the held-out split {s['metric']:.4f}"
                + (f" (best uniform within budget: {s['best_uniform']} at {s['best_uniform_metric']:.4f})"
                   if s["best_uniform"] else ""))
        choice = Choice(s["assignment"], s["cost"], 0.0, s["kind"], s["label"])
        atomic_write_text(out / f"budget-{s['budget']:g}.yaml", _to_yaml(study, choice, note))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["kind", "candidate", "cost", "predicted_delta_score", "quantized_groups", "search_metric",
                "search_score"])
    for c in [*front, *uniforms]:
        sv = search_value.get(id(c))
        w.writerow([c.kind, c.label, f"{c.cost:.6g}", f"{c.predicted:.6g}", len(c.assignment),
                    "" if sv is None else f"{sv[0]:.6g}", "" if sv is None else f"{sv[1]:.6g}"])
    atomic_write_text(out / PARETO_CSV, buf.getvalue())
    atomic_write_bytes(out / PARETO_PNG, _plot(study, front, uniforms, search_value, summary))
    lines = [f"# precsim search: {study.task.model} on {study.task.dataset}", "",
             f"FP32: {metric} {base[0]:.4f} on the search split, {held_fp32[0]:.4f} on the held-out split "
             f"({study.task.eval_size} examples each). Cost: "
             + ("bits per element, shared scales included" if study.cost is None else "the given cost table")
             + ", averaged over the groups' elements in one forward pass of one example.", "",
             "| budget | chosen | cost | groups quantized | held-out " + metric + " | best uniform within budget | "
             "its cost | its held-out " + metric + " | at least as good |", "|---:|---|---:|---:|---:|---|---:|---:|---|"]
    for s in summary:
        chosen = "uniform " + s["label"] if s["kind"] == "uniform" else "mixed"
        if s["best_uniform"] is None:
            verdict, u = "yes (no uniform fits)", ("-", "-", "-")
        else:
            ok = (s["metric"], -s["score"]) >= (s["best_uniform_metric"], -s["best_uniform_score"])
            verdict = ("yes" if ok else "no") + (", strictly" if s["metric"] > s["best_uniform_metric"] else "")
            u = (s["best_uniform"], f"{s['best_uniform_cost']:.3f}", f"{s['best_uniform_metric']:.4f}")
        lines.append(f"| {s['budget']:g} | {chosen} (`budget-{s['budget']:g}.yaml`) | {s['cost']:.3f} | "
                     f"{s['quantized_groups']} | {s['metric']:.4f} | {u[0]} | {u[1]} | {u[2]} | {verdict} |")
    lines += ["", "How: the single-group score changes (`sensitivity.csv`) are summed and the multiple-choice "
              "knapsack over them is solved exactly for every cost (`pareto.csv`); per budget the optimum, the "
              f"{NEIGHBOURS} front points below it and the uniform assignments within it are evaluated whole on the "
              "search split and the one of lowest score is kept; the held-out split then checks it. Limits: the sum ignores "
              "interactions between groups (which the whole evaluation catches only for the few assignments it "
              "tries), and a few hundred examples resolve the metric only so finely.", "",
              f"![pareto]({PARETO_PNG})", ""]
    atomic_write_text(out / "report.md", "\n".join(lines))


def _plot(study: StudySpec, front: list[Choice], uniforms: list[Choice], search_value: dict[int, tuple[float, float]],
          summary: list[dict[str, Any]]) -> bytes:
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, (ax_p, ax_v) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_p.step([c.cost for c in front], [c.predicted for c in front], where="post", label="front (predicted)")
    ax_p.scatter([u.cost for u in uniforms], [u.predicted for u in uniforms], marker="s", color="C1",
                 label="uniform (predicted)")
    for u in uniforms:
        ax_p.annotate(u.label, (u.cost, u.predicted), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax_p.set(xlabel="cost per element", ylabel="summed single-group score change", yscale="symlog",
             title="Pareto front of the measured changes")
    metric = study.task.metric
    tried = [c for c in front if id(c) in search_value]
    ax_v.scatter([c.cost for c in tried], [search_value[id(c)][0] for c in tried], marker="o", color="C0",
                 label="mixed, search split")
    ax_v.scatter([s["cost"] for s in summary], [s["metric"] for s in summary], marker="*", s=140, color="C3",
                 label="chosen, held-out split")
    for name, v in {u: v for s in summary for u, v in s["uniform"].items()}.items():
        ax_v.scatter([v["cost"]], [v["metric"]], marker="s", color="C1")
        ax_v.annotate(name, (v["cost"], v["metric"]), fontsize=7, xytext=(3, -9), textcoords="offset points")
    for s in summary:
        ax_v.axvline(s["budget"], color="grey", linestyle=":", linewidth=1)
    ax_v.set(xlabel="cost per element", ylabel=metric, title="validated (squares: uniform, held-out)")
    for ax in (ax_p, ax_v):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


__all__ = ["PARETO_CSV", "PARETO_PNG", "STEP", "Choice", "assignment_cost", "pareto_front", "run_search", "uniform"]
