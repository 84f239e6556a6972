"""StudySpec: what ``precsim analyze`` and ``precsim search`` read (one YAML layout for both).

Every key is optional; with no file the default studies the default sweep's ResNet on MNIST-5k::

    model: resnet              # resnet | mlp | vit (zoo, trained in FP32 first) | minilm
    dataset: mnist5k           # mnist5k | digits (zoo models); sentences (minilm)
    metric: accuracy           # accuracy (zoo models) | cosine (minilm: sentence embeddings vs FP32)
    train: {epochs: 3, batch_size: 64, lr: 0.2, seed: 0}   # the FP32 training of a zoo model
    eval_size: 1000            # examples in each of the search and held-out splits
    calibration_batches: 4     # batches that fill integer formats' observers before each evaluation
    points: outputs            # outputs | operands (where the points are; see prepare)
    roles: [activation, weight]                # the point groups: each module's roles
    modules: "*"               # only the modules whose name matches this glob (e.g. "encoder.layer.0.*")
    candidates: [int8, fp8_e4m3, mxfp8_e4m3, mxfp4, nvfp4]   # format specs or role dicts
    qat_steps: 0               # > 0: fine-tune this many steps before each evaluation (gradient roles need it)
    budgets: [4.5, 5.0, 6.0]   # search: average cost per element (bits by default); --budget overrides
    cost: bits                 # or {<candidate label>: cost per element, ...}, every candidate and fp32 named

A candidate is what a role of ``prepare()`` takes: ``fp8_e4m3``, or ``{format: fp8_e5m2,
rounding: stochastic}`` (its label is then ``fp8_e5m2/stochastic``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from precsim.experiments.spec import read_yaml
from precsim.experiments.task import DATASETS, METRICS, MODELS, TaskSpec
from precsim.formats import parse_format
from precsim.qat.config import POINTS, parse_role

STUDY_ROLES: tuple[str, ...] = ("activation", "weight", "gradient", "weight_gradient")
GRADIENT_ROLES: tuple[str, ...] = ("gradient", "weight_gradient")
DEFAULT_CANDIDATES: tuple[str, ...] = ("int8", "fp8_e4m3", "mxfp8_e4m3", "mxfp4", "nvfp4")
DEFAULT_BUDGETS: tuple[float, ...] = (4.5, 5.0, 6.0)  # where the uniform 4-bit formats lose accuracy
_KEYS = ("model", "dataset", "metric", "train", "eval_size", "calibration_batches", "points", "roles", "modules",
         "candidates", "qat_steps", "budgets", "cost")
_TRAIN_KEYS = ("epochs", "batch_size", "lr", "seed")
FP32 = "fp32"


@dataclass(frozen=True)
class StudySpec:
    """A validated study (see the module doc). ``candidates``: label -> role value."""

    task: TaskSpec
    points: str = "outputs"
    roles: tuple[str, ...] = ("activation", "weight")
    candidates: dict[str, Any] = field(default_factory=dict)
    qat_steps: int = 0
    budgets: tuple[float, ...] = DEFAULT_BUDGETS
    cost: dict[str, float] | None = None  # None: bits per element (Format.storage_bits)
    modules: str = "*"  # a glob: the modules whose points are studied

    def fingerprint(self) -> str:
        """Of what changes a measurement (not the budgets or the cost table)."""
        d = {"task": self.task.fingerprint(), "points": self.points, "roles": self.roles, "modules": self.modules,
             "candidates": self.candidates, "qat_steps": self.qat_steps}
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def to_dict(self) -> dict[str, Any]:
        t = self.task
        return {"model": t.model, "dataset": t.dataset, "metric": t.metric,
                "train": {"epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr, "seed": t.seed},
                "eval_size": t.eval_size, "calibration_batches": t.calibration_batches, "points": self.points,
                "roles": list(self.roles), "modules": self.modules, "candidates": list(self.candidates.values()), "qat_steps": self.qat_steps,
                "budgets": list(self.budgets), "cost": "bits" if self.cost is None else dict(self.cost)}


def label_of(value: Any) -> str:
    """``int8``; ``fp8_e5m2/stochastic``; ``int8/per_channel``: a candidate's short name."""
    if isinstance(value, str):
        return value
    extra = [str(v) for k, v in sorted(value.items()) if k != "format"]
    return "/".join([str(value["format"]), *extra])


def bits_of(value: Any) -> float:
    """Bits per element of a candidate (its format's storage, shared scales included)."""
    fmt = parse_format(value if isinstance(value, str) else value["format"])
    bits = getattr(fmt, "storage_bits", None)
    if bits is None:
        raise ValueError(f"format {fmt.name!r} does not say its bits per element (storage_bits); give a cost table "
                         "(cost: {label: cost per element})")
    return float(bits)


def _int(value: Any, what: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{what} must be a number > 0, got {value!r}")
    return float(value)


def load_study(config: str | Path | dict[str, Any] | None = None, budget: float | None = None,
               search: bool = True) -> StudySpec:
    """Read a YAML path (or a dict, or None for the default study) and validate it; ``budget``
    replaces the budgets; ``search`` False (analyze) leaves them unchecked. Raises ValueError
    naming the bad key or value."""
    if config is None:
        raw: dict[str, Any] = {}
    elif isinstance(config, dict):
        raw = dict(config)
    else:
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"study config {str(path)!r} does not exist")
        raw = read_yaml(path, "study config", "leave out --config for the default study") or {}
        if not isinstance(raw, dict):
            raise ValueError(f"study config {str(path)!r} must hold a mapping, got {type(raw).__name__}")
    bad = [k for k in raw if k not in _KEYS]
    if bad:
        raise ValueError(f"unknown study key {bad[0]!r}; allowed: {', '.join(_KEYS)}")
    model = raw.get("model", "resnet")
    if model not in MODELS:
        raise ValueError(f"model {model!r} not allowed; allowed: {', '.join(MODELS)}")
    dataset = raw.get("dataset", DATASETS[model][0])
    if dataset not in DATASETS[model]:
        raise ValueError(f"dataset {dataset!r} not allowed for model {model!r}; allowed: {', '.join(DATASETS[model])}")
    if "metric" in raw and raw["metric"] is None:
        raise ValueError(f"metric is missing; allowed for model {model!r}: {METRICS[model]}")
    metric = raw.get("metric", METRICS[model])
    if metric != METRICS[model]:
        raise ValueError(f"metric {metric!r} not allowed for model {model!r}; allowed: {METRICS[model]}")
    train = raw.get("train") or {}
    if not isinstance(train, dict) or any(k not in _TRAIN_KEYS for k in train):
        raise ValueError(f"train must be a mapping with keys {', '.join(_TRAIN_KEYS)}, got {train!r}")
    task = TaskSpec(model=model, dataset=dataset, metric=metric,
                    epochs=_int(train.get("epochs", 3), "train.epochs", 1),
                    batch_size=_int(train.get("batch_size", 64), "train.batch_size", 1),
                    lr=_number(train.get("lr", 0.2), "train.lr"), seed=_int(train.get("seed", 0), "train.seed", 0),
                    eval_size=_int(raw.get("eval_size", 1000 if model != "minilm" else 64), "eval_size", 1),
                    calibration_batches=_int(raw.get("calibration_batches", 4), "calibration_batches", 1),
                    model_kwargs={"widths": [8, 16, 32]} if model == "resnet" else {})
    points = raw.get("points", "outputs")
    if points not in POINTS:
        raise ValueError(f"points {points!r} not allowed; allowed: {', '.join(POINTS)}")
    roles = raw.get("roles", ["activation", "weight"])
    roles = [roles] if isinstance(roles, str) else roles
    if not isinstance(roles, list) or not roles or any(r not in STUDY_ROLES for r in roles):
        raise ValueError(f"roles {raw.get('roles')!r} not allowed; allowed: a list of {', '.join(STUDY_ROLES)}")
    qat_steps = _int(raw.get("qat_steps", 0), "qat_steps", 0)
    if any(r in GRADIENT_ROLES for r in roles) and qat_steps == 0:
        raise ValueError("gradient roles are measured by training: they need qat_steps > 0 (e.g. qat_steps: 20)")
    if qat_steps and model == "minilm":
        raise ValueError("qat_steps needs a model with a training set; allowed for: resnet, mlp, vit")
    values = raw.get("candidates", list(DEFAULT_CANDIDATES))
    if not isinstance(values, list) or not values:
        raise ValueError(f"candidates must be a non-empty list of formats, got {values!r}")
    candidates: dict[str, Any] = {}
    for value in values:
        for role in roles:  # every candidate must suit every role it may take
            parse_role(role, value, "candidates")
        label = label_of(value)
        if label == FP32 or label in candidates:
            raise ValueError(f"candidate {label!r} given twice (fp32, the baseline, is always a choice)")
        candidates[label] = value
    budgets_raw = [budget] if budget is not None else raw.get("budgets", list(DEFAULT_BUDGETS))
    budgets_raw = [budgets_raw] if isinstance(budgets_raw, (int, float)) else budgets_raw
    if not isinstance(budgets_raw, list) or not budgets_raw:
        raise ValueError(f"budgets must be a list of numbers > 0, got {budgets_raw!r}")
    budgets = tuple(sorted(_number(b, "budget") for b in budgets_raw))
    cost = _parse_cost(raw.get("cost", "bits"), candidates)
    cheapest = min(costs_per_element(candidates, cost).values())
    if search and budgets[0] < cheapest:
        raise ValueError(f"budget {budgets[0]:g} is below the cheapest candidate ({cheapest:g} per element); "
                         f"allowed: budgets >= {cheapest:g}")
    modules = raw.get("modules", "*")
    if not isinstance(modules, str) or not modules:
        raise ValueError(f"modules {modules!r} not allowed; allowed: a module-name glob such as 'layer1.*'")
    return StudySpec(task, points, tuple(roles), candidates, qat_steps, budgets, cost, modules)


def _parse_cost(value: Any, candidates: dict[str, Any]) -> dict[str, float] | None:
    if value == "bits":
        return None
    if not isinstance(value, dict):
        raise ValueError(f"cost {value!r} not allowed; allowed: bits, or a mapping {{candidate label: cost per "
                         "element}} naming every candidate and fp32")
    missing = [label for label in (*candidates, FP32) if label not in value]
    if missing:
        raise ValueError(f"cost table lacks {', '.join(missing)}; it must name every candidate and fp32")
    extra = [k for k in value if k not in candidates and k != FP32]
    if extra:
        raise ValueError(f"cost table names {extra[0]!r}, which is not a candidate; allowed: "
                         f"{', '.join([*candidates, FP32])}")
    return {k: _number(v, f"cost of {k}") for k, v in value.items()}


def costs_per_element(candidates: dict[str, Any], table: dict[str, float] | None) -> dict[str, float]:
    """Label -> cost per element (fp32 included): the table's, or bits per element."""
    if table is not None:
        return dict(table)
    return {FP32: 32.0, **{label: bits_of(v) for label, v in candidates.items()}}


__all__ = ["DEFAULT_BUDGETS", "DEFAULT_CANDIDATES", "FP32", "GRADIENT_ROLES", "STUDY_ROLES", "StudySpec", "bits_of",
           "costs_per_element", "label_of", "load_study"]
