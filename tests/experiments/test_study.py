"""precsim analyze / search: the Pareto solver, the written configs and costs, resume, errors,
and the quality bar on bundled data (digits)."""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import precsim
from precsim.experiments.search import STEP, assignment_cost, pareto_front
from precsim.experiments.sensitivity import Group
from precsim.experiments.study import load_study

from ._helpers import cli_env


def run_cli(args: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``python -m precsim <args>``, one thread (as the other CLI tests)."""
    return subprocess.run([sys.executable, "-m", "precsim", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=cli_env())


def test_pareto_front_is_the_exact_optimum_at_every_cost() -> None:
    """Against brute force over every assignment of 4 groups x (fp32 + 3 candidates)."""
    g = torch.Generator().manual_seed(0)
    groups = [Group(f"m{i}", "activation", int(n)) for i, n in enumerate(torch.randint(10, 1000, (4,), generator=g))]
    labels = ["int8", "mxfp4", "nvfp4"]
    costs = {"fp32": 32.0, "int8": 8.0, "mxfp4": 4.25, "nvfp4": 4.5}
    deltas = {(grp.key, lab): float(torch.rand((), generator=g)) * (3.0 if lab == "mxfp4" else 1.0)
              for grp in groups for lab in labels}
    front = pareto_front(groups, deltas, costs, labels)
    everything = []
    for combo in itertools.product(["fp32", *labels], repeat=len(groups)):
        a = {grp.key: lab for grp, lab in zip(groups, combo, strict=True) if lab != "fp32"}
        everything.append((assignment_cost(groups, a, costs), sum(deltas[(k, v)] for k, v in a.items())))
    assert [c.cost for c in front] == sorted(c.cost for c in front)
    assert all(a.predicted > b.predicted for a, b in itertools.pairwise(front))  # each costs more, gains
    slack = len(groups) * STEP  # each group's cost is rounded up to the grid
    for c in front:
        assert math.isclose(c.predicted, sum(deltas[(k, v)] for k, v in c.assignment.items()))
        assert min((d for cost, d in everything if cost <= c.cost - slack), default=math.inf) >= c.predicted - 1e-12
    assert front[0].cost == 4.25 and front[-1].predicted == 0.0  # all mxfp4 ... up to a lossless one


TINY = {"model": "resnet", "dataset": "digits", "train": {"epochs": 4, "batch_size": 32, "lr": 0.1},
        "eval_size": 300, "calibration_batches": 2, "candidates": ["int8", "mxfp4"], "budgets": [5.0, 6.0]}


@pytest.fixture(scope="module")
def searched(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    d = tmp_path_factory.mktemp("search")
    (d / "study.yaml").write_text(yaml.safe_dump(TINY))
    proc = run_cli(["search", "--config", str(d / "study.yaml"), "--out", str(d / "out"), "--no-progress"], d,
                   timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d / "out", proc.stdout


def test_search_writes_configs_that_prepare_loads_at_the_cost_it_reports(searched: tuple[Path, str]) -> None:
    out, stdout = searched
    for name in ("pareto.csv", "pareto.png", "report.md", "sensitivity.csv", "sensitivity.png", "sensitivity.md",
                 "measurements.json"):
        assert (out / name).is_file(), name
    study = load_study(TINY)
    for budget in (5.0, 6.0):
        path = out / f"budget-{budget:g}.yaml"
        reported = float(next(line for line in stdout.splitlines() if line.startswith(f"budget {budget:g}:"))
                         .split("cost ")[1].split(",")[0])
        # the cost, recomputed here: bits of each point's format x the elements it rounds for one
        # example, over every activation and weight point of the default placement (fp32 where unset)
        from precsim.experiments.spec import zoo_kwargs
        from precsim.zoo import get_model

        model = precsim.prepare(get_model("resnet", **zoo_kwargs("resnet", "digits", study.task.model_kwargs)),
                                {"activation": "fp32", "weight": "fp32", **yaml.safe_load(path.read_text())})
        every = precsim.prepare(get_model("resnet", **zoo_kwargs("resnet", "digits", study.task.model_kwargs)),
                                {"activation": "bf16", "weight": "bf16"})
        fmt = {(r["module"], r["role"]): r["format"] for r in precsim.summary_rows(model)}
        sizes: dict[tuple[str, str], int] = {}
        for (_, q), r in zip(precsim.quantizers(every), precsim.summary_rows(every), strict=True):
            q.register_forward_hook(lambda m, a, o, k=(r["module"], r["role"]), s=sizes: s.__setitem__(k, o.numel()))
        every.eval()
        with torch.no_grad():
            every(torch.zeros(1, 1, 8, 8))
        bits = {"fp32": 32.0, "int8": 8.0, "mxfp4": 4.25}
        cost = sum(n * bits[fmt.get(k, "fp32")] for k, n in sizes.items()) / sum(sizes.values())
        assert cost == pytest.approx(reported, abs=1e-3) and cost <= budget
        assert "rules" in yaml.safe_load(path.read_text())


def test_search_meets_the_quality_bar_on_held_out_digits(searched: tuple[Path, str]) -> None:
    """Per budget, the chosen assignment is at least as good on the held-out split as every uniform
    assignment within the budget (here: all-mxfp4), and the report says so."""
    out, _ = searched
    report = (out / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith("| 5 ") or line.startswith("| 6 ")]
    assert len(rows) == 2
    for line in rows:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[5] == "mxfp4" and float(cells[4]) >= float(cells[7]), line
        assert cells[8].startswith("yes"), line
    assert any("strictly" in line for line in rows)


def test_a_second_run_reuses_every_measurement(searched: tuple[Path, str], tmp_path: Path) -> None:
    out, stdout = searched
    before = json.loads((out / "measurements.json").read_text())
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(TINY))
    torn = out / ".measurements.json.x1y2.tmp"  # what a run killed inside an atomic write leaves
    torn.write_text('{"fingerprint": ')
    proc = run_cli(["search", "--config", str(tmp_path / "study.yaml"), "--out", str(out), "--no-progress"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not torn.exists() and f"removed {str(torn)!r}" in proc.stderr
    assert f"{len(before['results'])} measurements from an earlier run reused" in proc.stderr
    assert "training the FP32" not in proc.stderr  # its weights are kept too
    assert json.loads((out / "measurements.json").read_text()) == before and proc.stdout == stdout


def test_an_interrupted_analysis_keeps_what_it_measured(tmp_path: Path) -> None:
    """Measurements are written one by one: a store cut short is continued, not started over."""
    from precsim.experiments.sensitivity import Measurements

    study = load_study(TINY)
    store = Measurements(tmp_path, study.fingerprint())
    store.put("search", {("fc", "weight"): "int8"}, (90.0, 0.3))
    again = Measurements(tmp_path, study.fingerprint())
    assert again.get("search", {("fc", "weight"): "int8"}) == (90.0, 0.3)
    with pytest.raises(ValueError, match="holds measurements of another study"):
        Measurements(tmp_path, "another")
    (tmp_path / "measurements.json").write_text('{"fingerprint": ')  # damaged: say so
    with pytest.raises(ValueError, match="is damaged; delete it"):
        Measurements(tmp_path, study.fingerprint())


@pytest.mark.parametrize(("change", "message"), [
    ({"candidates": ["int8", "fp9_e4m3"]}, "fp9_e4m3"),
    ({"budgets": [3.0]}, "budget 3 is below the cheapest candidate (4.25 per element); allowed: budgets >= 4.25"),
    ({"metric": None}, "metric is missing; allowed for model 'resnet': accuracy"),
    ({"metric": "f1"}, "metric 'f1' not allowed for model 'resnet'; allowed: accuracy"),
    ({"roles": ["gradient"]}, "gradient roles are measured by training: they need qat_steps > 0"),
    ({"colour": 1}, "unknown study key 'colour'; allowed: model, dataset"),
    ({"cost": {"int8": 1.0}}, "cost table lacks mxfp4, fp32"),
    ({"model": "resnet", "dataset": "sentences"}, "dataset 'sentences' not allowed for model 'resnet'"),
])
def test_bad_study_configs_are_refused_with_the_value_and_what_is_allowed(change: dict, message: str) -> None:
    with pytest.raises(ValueError) as err:
        load_study({**TINY, **change})
    assert message in str(err.value)


def test_a_bad_config_stops_the_command_before_anything_is_written(tmp_path: Path) -> None:
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({**TINY, "candidates": ["int8", "fp9_e4m3"]}))
    proc = run_cli(["search", "--config", str(tmp_path / "study.yaml"), "--out", str(tmp_path / "out")], tmp_path)
    assert proc.returncode == 2 and "precsim search: error: " in proc.stderr and "fp9_e4m3" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_analyze_ranks_the_real_transformers_weights_by_embedding_cosine(tmp_path: Path) -> None:
    """all-MiniLM-L6-v2 with operand points: each Linear weight alone in int4 per tensor, measured
    as the cosine of sentence embeddings to FP32's."""
    pytest.importorskip("transformers")
    (tmp_path / "study.yaml").write_text(yaml.safe_dump({
        "model": "minilm", "points": "operands", "roles": ["weight"], "modules": "encoder.layer.[05].*",
        "candidates": ["int4"], "eval_size": 32, "calibration_batches": 1}))
    proc = run_cli(["analyze", "--config", str(tmp_path / "study.yaml"), "--out", str(tmp_path / "out"),
                    "--no-progress"], tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import csv

    with (tmp_path / "out" / "sensitivity.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12  # layers 0 and 5 x (q, k, v, attention output, intermediate, output) weights
    assert all(0.5 < float(r["metric"]) < 1.0 for r in rows)  # a cosine, below FP32's 1
    changes = [float(r["delta_score"]) for r in rows]
    assert changes == sorted(changes, reverse=True) and changes[0] > 5 * changes[-1] > 0  # ranked, and they differ


def test_gradient_roles_and_the_rounding_mode_are_measured_by_short_training(tmp_path: Path) -> None:
    """With qat_steps, each evaluation fine-tunes first: the gradient through a point, in fp8 with
    nearest or stochastic rounding, then changes the weights, and so the score."""
    from precsim.experiments.sensitivity import run_analyze

    study = load_study({**TINY, "roles": ["gradient"], "modules": "layer3.0.conv*", "qat_steps": 3,
                        "candidates": ["fp8_e5m2", {"format": "fp8_e5m2", "rounding": "stochastic"}]}, search=False)
    rows = run_analyze(study, tmp_path, progress=False, log=lambda m: None)
    assert {(r["module"], r["candidate"]) for r in rows} == {
        (m, c) for m in ("layer3.0.conv1", "layer3.0.conv2") for c in ("fp8_e5m2", "fp8_e5m2/stochastic")}
    assert all(r["role"] == "gradient" and math.isfinite(r["score"]) for r in rows)
    scores = {(r["module"], r["candidate"]): r["score"] for r in rows}
    assert scores[("layer3.0.conv1", "fp8_e5m2")] != scores[("layer3.0.conv1", "fp8_e5m2/stochastic")]
