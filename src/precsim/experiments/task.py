"""What ``precsim analyze`` and ``precsim search`` measure: a trained FP32 model, its data, a metric.

A :class:`Task` holds the FP32 model, calibration batches, and two evaluation splits: ``search``
(what sensitivities are measured and assignments chosen on) and ``held_out`` (what the chosen
assignments are checked on, seen by nothing before). For zoo models the search split is the last
``eval_size`` training examples (calibration uses the first ones): the FP32 model fits them, but
what a format costs on them still ranks the points, and the 1,000 test images then all stay
held out. For MiniLM both are disjoint sets of sentences. :meth:`Task.evaluate` gives the
metric users read (accuracy in %, or the mean cosine of sentence embeddings to FP32's) and a
smooth *score* that a search can add up over points (lower is better: the cross-entropy loss, or
1 - cosine), since a few hundred test images move accuracy only in steps of 0.2 points.

Zoo models (``resnet``, ``mlp``, ``vit``) are trained in FP32 first, seeded, on the bundled
MNIST-5k or digits, and the weights are kept in the output folder (``fp32.pt``), so a resumed run
does not train again. ``minilm`` is the real pretrained all-MiniLM-L6-v2 (the ``hf`` extra) on
real sentences of the Python Language Reference; it needs no training.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from precsim.experiments.checkpoint import atomic_torch_save
from precsim.experiments.spec import zoo_kwargs

ZOO_MODELS: tuple[str, ...] = ("resnet", "mlp", "vit")
MODELS: tuple[str, ...] = (*ZOO_MODELS, "minilm")
DATASETS: dict[str, tuple[str, ...]] = {"resnet": ("mnist5k", "digits"), "mlp": ("mnist5k", "digits"),
                                       "vit": ("mnist5k", "digits"), "minilm": ("sentences",)}
METRICS: dict[str, str] = {"resnet": "accuracy", "mlp": "accuracy", "vit": "accuracy", "minilm": "cosine"}
FP32_WEIGHTS = "fp32.pt"


@dataclass(frozen=True)
class TaskSpec:
    """Which model, data and metric; how a zoo model is trained first."""

    model: str = "resnet"
    dataset: str = "mnist5k"
    metric: str = "accuracy"
    epochs: int = 3  # FP32 training of a zoo model (SGD, cosine schedule, as the default sweep)
    batch_size: int = 64
    lr: float = 0.2
    seed: int = 0
    eval_size: int = 1000  # examples in each of the search and held-out splits
    calibration_batches: int = 4
    model_kwargs: dict[str, Any] = field(default_factory=dict)

    def fingerprint(self) -> str:
        text = json.dumps(self.__dict__, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass
class Task:
    """A trained FP32 model with its data (see the module doc)."""

    spec: TaskSpec
    model: nn.Module
    train: list[Any]  # batches for fine-tuning (qat_steps)
    calibration: list[Any]
    splits: dict[str, list[Any]]  # "search", "held_out": batches of (inputs, target)
    example: Any  # one example, to count the elements of each point's tensor

    def evaluate(self, model: nn.Module, split: str) -> tuple[float, float]:
        """(metric, score) of ``model`` on a split: accuracy % and mean cross-entropy, or mean
        cosine to FP32's embeddings and 1 - that."""
        model.eval()
        total = hits = loss = 0.0
        with torch.no_grad():
            for inputs, target in self.splits[split]:
                if self.spec.metric == "cosine":
                    from precsim.zoo.text import embed

                    cos = (embed(model, inputs) * target).sum(-1)
                    hits += float(cos.sum())
                    loss += float((1 - cos).sum())
                    total += len(cos)
                else:
                    out = model(inputs)
                    hits += float((out.argmax(1) == target).sum())
                    loss += float(F.cross_entropy(out, target, reduction="sum"))
                    total += len(target)
        metric = hits / total
        return (metric if self.spec.metric == "cosine" else 100 * metric), loss / total


def _batches(x: Tensor, y: Tensor, size: int) -> list[tuple[Tensor, Tensor]]:
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def build_task(spec: TaskSpec, out: Path, log: Any = print) -> Task:
    """The task of ``spec``; a zoo model's FP32 weights are trained once and kept in ``out``."""
    if spec.model == "minilm":
        return _minilm_task(spec)
    from precsim.zoo import get_model, load_dataset

    train, test = load_dataset(spec.dataset, seed=0)
    tx, ty = train.tensors
    vx, vy = test.tensors
    n = spec.eval_size
    calib = spec.calibration_batches * spec.batch_size
    if n > len(vx) or calib + n > len(tx):
        raise ValueError(f"eval_size {n} not allowed for {spec.dataset} ({len(tx)} train / {len(vx)} test examples, "
                         f"{calib} of the train ones for calibration); allowed: eval_size <= "
                         f"{min(len(vx), len(tx) - calib)}")
    kwargs = zoo_kwargs(spec.model, spec.dataset, spec.model_kwargs)
    torch.manual_seed(spec.seed)
    model = get_model(spec.model, **kwargs)
    weights = out / FP32_WEIGHTS
    saved = torch.load(weights, weights_only=True) if weights.is_file() else None
    if saved is not None and saved.get("fingerprint") == spec.fingerprint():
        model.load_state_dict(saved["model"])
    else:
        log(f"training the FP32 {spec.model} on {spec.dataset} ({spec.epochs} epochs) ...")
        _train(model, tx, ty, spec)
        atomic_torch_save({"fingerprint": spec.fingerprint(), "model": model.state_dict()}, weights)
    model.eval()
    # search: the last training examples (calibration takes the first); held-out: the test split
    search = _batches(tx[len(tx) - n:], ty[len(ty) - n:], 500)
    return Task(spec, model, _batches(tx, ty, spec.batch_size), _batches(tx[:calib], ty[:calib], spec.batch_size),
                {"search": search, "held_out": _batches(vx[:n], vy[:n], 500)}, tx[:1])


def _train(model: nn.Module, x: Tensor, y: Tensor, spec: TaskSpec) -> None:
    """SGD with momentum and a cosine schedule, seeded: the default sweep's FP32 recipe."""
    opt = torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=0.9, weight_decay=5e-4)
    g = torch.Generator().manual_seed(spec.seed)
    steps = len(x) // spec.batch_size
    total = steps * spec.epochs
    model.train()
    for epoch in range(spec.epochs):
        order = torch.randperm(len(x), generator=g)
        for i in range(steps):
            k = epoch * steps + i
            for group in opt.param_groups:
                group["lr"] = spec.lr * 0.5 * (1 + math.cos(math.pi * k / total))
            idx = order[i * spec.batch_size:(i + 1) * spec.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    model.eval()


def _minilm_task(spec: TaskSpec) -> Task:
    try:
        from precsim.zoo.text import embed, load_minilm, sentences, tokenize
    except ImportError as err:  # pragma: no cover - the hf extra is missing
        raise ValueError(f"model 'minilm' needs the hf extra (pip install 'precsim[hf]'): {err}") from None
    model, tokenizer = load_minilm()
    texts = [s for _, s in sentences()]
    n, size = spec.eval_size, 32
    if spec.calibration_batches * size + 2 * n > len(texts):
        raise ValueError(f"eval_size {n} with {spec.calibration_batches} calibration batches needs more than the "
                         f"{len(texts)} sentences; allowed: eval_size <= {(len(texts) - spec.calibration_batches * size) // 2}")
    chunks = [tokenize(tokenizer, texts[i:i + size], length=64) for i in range(0, len(texts), size)]
    calib = chunks[:spec.calibration_batches]
    start = spec.calibration_batches * size

    def split(lo: int) -> list[Any]:
        out = []
        for i in range(lo, lo + n, size):
            inputs = tokenize(tokenizer, texts[i:min(i + size, lo + n)], length=64)
            with torch.no_grad():
                out.append((inputs, embed(model, inputs)))
        return out

    example = {k: v[:1] for k, v in chunks[0].items()}
    return Task(spec, model, [], calib, {"search": split(start), "held_out": split(start + n)}, example)


__all__ = ["DATASETS", "FP32_WEIGHTS", "METRICS", "MODELS", "Task", "TaskSpec", "build_task"]
