"""SweepSpec: what a sweep trains, read from YAML plus command-line overrides.

Everything is validated here, before any data is loaded or any step is trained, so a typo costs
a second instead of the first scheme's minutes. The YAML layout (every key optional)::

    model: {name: resnet, widths: [8, 16, 32]}  # or `model: vit` (zoo defaults); absent: this one
    dataset: {name: mnist5k, seed: 0, test_fraction: 0.2}   # cifar10 also needs root: DIR
    optimizer: {name: sgd, lr: 0.2, momentum: 0.9, weight_decay: 0.0005, schedule: cosine}
                            # adam: lr default 0.001, momentum = beta1 (default 0.9)
    epochs: 3
    batch_size: 64
    eval_batch_size: 500
    seed: 0                 # model init, data order, stochastic-rounding seeds
    device: cpu             # cpu | cuda | auto
    train_subset: null      # first N training images only (tests, smoke runs)
    test_subset: null
    max_steps: null         # at most N optimizer steps per epoch
    evals_per_epoch: 4      # test-set evaluations per epoch (the curves; auc is their mean)
    telemetry: 50           # per-point stats on every 50th call of each point (0: off); stats/
    stop_on_divergence: true  # stop a scheme once its weights are Inf/NaN (they stay so)
    out: precsim-out        # relative to the current directory
    schemes:                # default: every built-in scheme
      - fp32                                 # a built-in name
      - {name: int4w, weight: int4}          # inline prepare() config
      - {name: mine, config: quant.yaml}     # a prepare() YAML (relative to this file)
      - {name: bf16_ar, builtin: bf16, allreduce: bf16}   # built-in + quantized all-reduce

Paths inside the YAML (``dataset.root``, scheme ``config`` files) are relative to the YAML file
(to the current directory when the config is given as a dict).
The resolved spec (``to_dict()``) is itself a valid YAML/JSON config.
"""

from __future__ import annotations

import copy
import hashlib
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from precsim.experiments.schemes import BUILTIN_SCHEMES, DEFAULT_SCHEMES, DESCRIPTIONS
from precsim.qat.config import CONFIG_KEYS
from precsim.zoo.data import SHAPES

NUM_CLASSES = 10
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
SCHEDULES: tuple[str, ...] = ("cosine", "constant")
DEVICES: tuple[str, ...] = ("cpu", "cuda", "auto")

_TOP_KEYS = ("model", "dataset", "optimizer", "epochs", "batch_size", "eval_batch_size", "seed", "device",
             "train_subset", "test_subset", "max_steps", "stop_on_divergence", "out", "schemes", "debug_digests",
             "compile", "evals_per_epoch", "telemetry")
_DATASET_KEYS = ("name", "root", "seed", "test_fraction")
_OPTIMIZER_KEYS = ("name", "lr", "momentum", "weight_decay", "schedule")
_SCHEME_ROLE_KEYS = CONFIG_KEYS  # an inline scheme is a prepare() config
_SCHEME_KEYS = ("name", "description", "builtin", "config", "allreduce", *_SCHEME_ROLE_KEYS)
# Keys that change no number in the results: left out of the fingerprint.
# compile: same bits, only faster; telemetry: reads tensors, changes none
_NOT_FINGERPRINTED = ("out", "schemes", "debug_digests", "compile", "telemetry")

# The default sweep: sized to take about 5-8 minutes on a 2-core CPU (see docs/sweep.md).
DEFAULT_MODEL_KWARGS: dict[str, Any] = {"widths": [8, 16, 32]}
DEFAULT_EPOCHS = 3
DEFAULT_BATCH_SIZE = 64
# Four evaluations per epoch: 3 epochs saturate MNIST-5k, so the final accuracies of the schemes
# that train at all end within a point; the early curve (and its mean, auc) is where they differ.
DEFAULT_EVALS_PER_EPOCH = 4
DEFAULT_TELEMETRY = 50
DEFAULT_OUT = "precsim-out"


@dataclass(frozen=True)
class SchemeSpec:
    """One row of the sweep: a name, a prepare() config, and an optional all-reduce format."""

    name: str
    config: dict[str, Any]
    allreduce: str | None = None
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "config": copy.deepcopy(self.config)}
        if self.allreduce is not None:
            d["allreduce"] = self.allreduce
        if self.description:
            d["description"] = self.description
        return d

    @property
    def fingerprint(self) -> str:
        """Hash of what changes this scheme's numbers (config and all-reduce format)."""
        return _hash({"config": self.config, "allreduce": self.allreduce})

    @property
    def is_baseline(self) -> bool:
        """True when nothing is quantized (the FP32 row that time ratios refer to)."""
        from precsim.qat.config import QuantConfig

        cfg = QuantConfig.from_any(self.config)
        quantized_rule = any(v is not None for r in cfg.rules for v in r.roles.values())
        return self.allreduce is None and all(v is None for v in cfg.roles.values()) and not quantized_rule


@dataclass(frozen=True)
class SweepSpec:
    """A validated sweep. Build it with :func:`load_spec`; the constructor does not validate."""

    model: str = "resnet"
    model_kwargs: dict[str, Any] = field(default_factory=lambda: copy.deepcopy(DEFAULT_MODEL_KWARGS))
    dataset: str = "mnist5k"
    dataset_root: str | None = None
    split_seed: int = 0
    test_fraction: float = 0.2
    optimizer: str = "sgd"
    lr: float = 0.2
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    epochs: int = DEFAULT_EPOCHS
    batch_size: int = DEFAULT_BATCH_SIZE
    eval_batch_size: int = 500
    seed: int = 0
    device: str = "cpu"
    train_subset: int | None = None
    test_subset: int | None = None
    max_steps: int | None = None
    stop_on_divergence: bool = True
    out: str = DEFAULT_OUT
    debug_digests: bool = False
    compile: bool = True
    evals_per_epoch: int = DEFAULT_EVALS_PER_EPOCH
    telemetry: int = DEFAULT_TELEMETRY  # sample every N-th call of each point; 0: no telemetry
    schemes: tuple[SchemeSpec, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec in the YAML layout (a valid config file again)."""
        return {
            "model": {"name": self.model, **copy.deepcopy(self.model_kwargs)},
            "dataset": {"name": self.dataset, "root": self.dataset_root, "seed": self.split_seed,
                        "test_fraction": self.test_fraction},
            "optimizer": {"name": self.optimizer, "lr": self.lr, "momentum": self.momentum,
                          "weight_decay": self.weight_decay, "schedule": self.schedule},
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "eval_batch_size": self.eval_batch_size,
            "seed": self.seed,
            "device": self.device,
            "train_subset": self.train_subset,
            "test_subset": self.test_subset,
            "max_steps": self.max_steps,
            "stop_on_divergence": self.stop_on_divergence,
            "out": self.out,
            "debug_digests": self.debug_digests,
            "compile": self.compile,
            "evals_per_epoch": self.evals_per_epoch,
            "telemetry": self.telemetry,
            "schemes": [s.to_dict() for s in self.schemes],
        }

    def fingerprint(self, world_size: int = 1) -> str:
        """Hash of everything shared by all schemes that changes results (not out/schemes)."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_FINGERPRINTED}
        d["world_size"] = world_size
        return _hash(d)

    def fingerprint_fields(self, world_size: int = 1) -> dict[str, Any]:
        """The fingerprinted fields, flattened, for saying *what* differs between two specs."""
        d = {k: v for k, v in self.to_dict().items() if k not in _NOT_FINGERPRINTED}
        d["world_size"] = world_size
        return _flatten(d)

    def scheme(self, name: str) -> SchemeSpec:
        for s in self.schemes:
            if s.name == name:
                return s
        raise KeyError(name)


def _hash(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


# ---------------------------------------------------------------------------- parsing helpers


def _mapping(value: Any, what: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ValueError(f"{what} must be a mapping, got {type(value).__name__}: {value!r}")
    return value


def _check_keys(d: dict[str, Any], allowed: tuple[str, ...], what: str) -> None:
    bad = [k for k in d if k not in allowed]
    if bad:
        raise ValueError(f"{what}: unknown key {bad[0]!r}; allowed: {', '.join(allowed)}")


def _int(value: Any, what: str, minimum: int = 1, optional: bool = False) -> int | None:
    if value is None and optional:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{what} must be an integer >= {minimum}, got {value!r}")
    return value


def _float(value: Any, what: str, minimum: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{what} must be a number, got {value!r}")
    if value < minimum or (strict and value == minimum):
        raise ValueError(f"{what} must be {'>' if strict else '>='} {minimum}, got {value!r}")
    return float(value)


def _resolve_path(path: str, base: Path | None) -> str:
    p = Path(path).expanduser()
    if not p.is_absolute() and base is not None:
        p = base / p
    return str(p.resolve())


def parse_scheme(raw: Any, index: int, base: Path | None = None) -> SchemeSpec:
    """A ``schemes:`` entry -> SchemeSpec, checking its prepare() config now."""
    from precsim.formats import parse_format
    from precsim.qat.config import QuantConfig

    where = f"scheme {index}"
    if isinstance(raw, str):
        if raw not in BUILTIN_SCHEMES:
            raise ValueError(f"{where}: unknown built-in scheme {raw!r}; built-in: {', '.join(BUILTIN_SCHEMES)}; "
                             "or write a mapping {name: ..., <prepare() config keys>}")
        return SchemeSpec(raw, copy.deepcopy(BUILTIN_SCHEMES[raw]), None, DESCRIPTIONS[raw])
    if not isinstance(raw, dict):
        raise ValueError(f"{where}: expected a built-in scheme name or a mapping, got {raw!r}")
    _check_keys(raw, _SCHEME_KEYS, where)
    name = raw.get("name")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"{where}: needs a 'name' (a non-empty string), got {name!r}")
    if not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"{where}: name {name!r} may only hold letters, digits, '-', '_' and '.' "
                         "(it names files in the output folder)")
    where = f"scheme {name!r}"
    inline = {k: raw[k] for k in _SCHEME_ROLE_KEYS if k in raw}
    sources = [k for k in ("builtin", "config") if k in raw] + (["inline role keys"] if inline else [])
    if len(sources) > 1:
        raise ValueError(f"{where}: give only one of 'builtin', 'config' or inline role keys, got {' and '.join(sources)}")
    description = raw.get("description", "")
    if not isinstance(description, str):
        raise ValueError(f"{where}: description must be a string")
    if "builtin" in raw:
        builtin = raw["builtin"]
        if builtin not in BUILTIN_SCHEMES:
            raise ValueError(f"{where}: unknown built-in scheme {builtin!r}; built-in: {', '.join(BUILTIN_SCHEMES)}")
        config = copy.deepcopy(BUILTIN_SCHEMES[builtin])
        description = description or DESCRIPTIONS[builtin]
    elif "config" in raw:
        config = raw["config"]
        if isinstance(config, str):
            path = Path(_resolve_path(config, base))
            if not path.is_file():
                raise ValueError(f"{where}: config file {str(path)!r} does not exist")
            config = read_yaml(path, f"{where}: config file", "write {} in it for a scheme that quantizes nothing")
            where = f"{where} (config file {str(path)!r})"
        if config is None:
            config = {}
        if not isinstance(config, dict):
            raise ValueError(f"{where}: 'config' must be a prepare() config mapping or a YAML path, got {config!r}")
        config = copy.deepcopy(config)
    else:
        config = copy.deepcopy(inline)
    try:
        QuantConfig.from_any(config)
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from None
    allreduce = raw.get("allreduce")
    if allreduce is not None:
        if not isinstance(allreduce, str):
            raise ValueError(f"{where}: allreduce must be a format string, got {allreduce!r}")
        try:
            parse_format(allreduce)
        except ValueError as err:
            raise ValueError(f"{where}: allreduce: {err}") from None
    return SchemeSpec(name, config, allreduce, description)


def _parse_model(raw: Any) -> tuple[str, dict[str, Any]]:
    from precsim.zoo import MODELS

    if raw is None:
        return "resnet", copy.deepcopy(DEFAULT_MODEL_KWARGS)
    if isinstance(raw, str):
        name, kwargs = raw, {}
    elif isinstance(raw, dict):
        kwargs = dict(raw)
        name = kwargs.pop("name", None)
    else:
        raise ValueError(f"model must be a name or a mapping {{name: ..., <kwargs>}}, got {raw!r}")
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; available: {', '.join(sorted(MODELS))}")
    sig = inspect.signature(MODELS[name].__init__)
    accepted = [p for p in sig.parameters if p != "self"]
    bad = [k for k in kwargs if k not in accepted]
    if bad:
        raise ValueError(f"model {name!r}: unknown argument {bad[0]!r}; accepted: {', '.join(accepted)}")
    return name, kwargs


def model_kwargs_for(spec: SweepSpec) -> dict[str, Any]:
    """The model's kwargs with the dataset's shape and class count filled in where not given."""
    return zoo_kwargs(spec.model, spec.dataset, spec.model_kwargs)


def zoo_kwargs(model: str, dataset: str, given: dict[str, Any]) -> dict[str, Any]:
    """A zoo model's kwargs: ``given``, and the dataset's shape and class count where not given."""
    from precsim.zoo import MODELS

    c, h, w = SHAPES[dataset]
    accepted = inspect.signature(MODELS[model].__init__).parameters
    fill = {"in_channels": c, "num_classes": NUM_CLASSES, "image_size": h, "in_shape": [c, h, w]}
    kwargs = {k: v for k, v in fill.items() if k in accepted}
    kwargs.update(given)
    return kwargs


def read_yaml(path: Path, what: str, if_empty: str) -> Any:
    """A YAML file's content; ValueError naming the file and what is wrong with it.

    An empty file (0 bytes or only blanks: a truncated copy, most likely) is an error, not
    "all defaults": ``if_empty`` says what to write instead. A file of comments is kept."""
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{what} {str(path)!r} is not UTF-8 text ({err}); is it the right file?") from None
    except OSError as err:
        raise ValueError(f"{what} {str(path)!r} cannot be read: {err.strerror}") from None
    if not text.strip():
        raise ValueError(f"{what} {str(path)!r} is empty; {if_empty}")
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise ValueError(f"{what} {str(path)!r} is not valid YAML: {err}") from None


def load_spec(config: str | Path | dict[str, Any] | None = None, **overrides: Any) -> SweepSpec:
    """Read a YAML path (or a dict, or None for the default sweep), apply overrides, validate.

    ``overrides`` (None means "not given"): ``schemes`` (names, or a comma-separated string),
    ``epochs``, ``out``, ``seed``, ``device``, ``batch_size``, ``train_subset``, ``max_steps``,
    ``compile`` (False: the eager reference kernels).
    Raises ValueError with the offending key before anything is trained.
    """
    base: Path | None = None
    if config is None:
        raw: dict[str, Any] = {}
    elif isinstance(config, dict):
        raw = copy.deepcopy(config)
    else:
        path = Path(config)
        if not path.is_file():
            raise ValueError(f"sweep config {str(path)!r} does not exist")
        loaded = read_yaml(path, "sweep config", "leave out --config for the default sweep")
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ValueError(f"sweep config {str(path)!r} must hold a mapping, got {type(loaded).__name__}")
        raw, base = loaded, path.resolve().parent
        try:
            return _build_spec(raw, base, overrides)
        except ValueError as err:  # say which file: a damaged copy may still be valid YAML
            raise ValueError(f"{err} (sweep config {str(path)!r})") from None
    return _build_spec(raw, base, overrides)


def _build_spec(raw: dict[str, Any], base: Path | None, overrides: dict[str, Any]) -> SweepSpec:
    _check_keys(raw, _TOP_KEYS, "sweep config")

    model, model_kwargs = _parse_model(raw.get("model"))

    ds = raw.get("dataset", "mnist5k")
    ds = {"name": ds} if isinstance(ds, str) else _mapping(ds, "dataset")
    _check_keys(ds, _DATASET_KEYS, "dataset")
    dataset = ds.get("name", "mnist5k")
    if dataset not in SHAPES:
        raise ValueError(f"unknown dataset {dataset!r}; available: {', '.join(SHAPES)}")
    root = ds.get("root")
    if root is not None:
        if not isinstance(root, str):
            raise ValueError(f"dataset.root must be a path string, got {root!r}")
        root = _resolve_path(root, base)
    if dataset == "cifar10":
        _check_cifar_root(root)
    split_seed = _int(ds.get("seed", 0), "dataset.seed", minimum=0)
    test_fraction = _float(ds.get("test_fraction", 0.2), "dataset.test_fraction", 0.0, strict=True)
    if test_fraction >= 1:
        raise ValueError(f"dataset.test_fraction must be < 1, got {test_fraction}")

    opt = raw.get("optimizer", "sgd")
    opt = {"name": opt} if isinstance(opt, str) else _mapping(opt, "optimizer")
    _check_keys(opt, _OPTIMIZER_KEYS, "optimizer")
    optimizer = opt.get("name", "sgd")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; available: {', '.join(OPTIMIZERS)}")
    default_lr = 0.2 if optimizer == "sgd" else 1e-3
    schedule = opt.get("schedule", "cosine")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown optimizer.schedule {schedule!r}; available: {', '.join(SCHEDULES)}")

    # Command-line overrides replace the YAML values.
    given = {k: v for k, v in overrides.items() if v is not None}
    allowed_overrides = ("schemes", "epochs", "out", "seed", "device", "batch_size", "train_subset", "max_steps",
                         "compile")
    _check_keys(given, allowed_overrides, "overrides")
    for key in allowed_overrides:
        if key in given and key not in ("schemes", "compile"):
            raw[key] = given[key]

    device = raw.get("device", "cpu")
    if device not in DEVICES:
        raise ValueError(f"unknown device {device!r}; available: {', '.join(DEVICES)}")
    if device in ("cuda", "auto"):
        import torch

        if device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' asked for, but torch sees no CUDA GPU; use --device cpu")
        device = "cuda" if torch.cuda.is_available() else "cpu"

    out = raw.get("out", DEFAULT_OUT)
    if not isinstance(out, str) or not out:
        raise ValueError(f"out must be a folder path, got {out!r}")
    debug_digests = raw.get("debug_digests", False)
    stop_on_divergence = raw.get("stop_on_divergence", True)
    compile_kernels = given.get("compile", raw.get("compile", True))
    for key, flag in (("debug_digests", debug_digests), ("stop_on_divergence", stop_on_divergence),
                      ("compile", compile_kernels)):
        if not isinstance(flag, bool):
            raise ValueError(f"{key} must be true or false, got {flag!r}")

    raw_schemes = raw.get("schemes")
    if raw_schemes is None:
        raw_schemes = list(DEFAULT_SCHEMES)
    if not isinstance(raw_schemes, list) or not raw_schemes:
        raise ValueError(f"schemes must be a non-empty list, got {raw_schemes!r}")
    schemes = [parse_scheme(s, i, base) for i, s in enumerate(raw_schemes)]
    names = [s.name for s in schemes]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"scheme names must be unique; repeated: {', '.join(dup)}")
    if "schemes" in given:
        schemes = _select(schemes, given["schemes"], base)

    spec = SweepSpec(
        model=model,
        model_kwargs=model_kwargs,
        dataset=dataset,
        dataset_root=root,
        split_seed=split_seed,  # type: ignore[arg-type]
        test_fraction=test_fraction,
        optimizer=optimizer,
        lr=_float(opt.get("lr", default_lr), "optimizer.lr", 0.0, strict=True),
        momentum=_float(opt.get("momentum", 0.9), "optimizer.momentum"),
        weight_decay=_float(opt.get("weight_decay", 5e-4), "optimizer.weight_decay"),
        schedule=schedule,
        epochs=_int(raw.get("epochs", DEFAULT_EPOCHS), "epochs"),  # type: ignore[arg-type]
        batch_size=_int(raw.get("batch_size", DEFAULT_BATCH_SIZE), "batch_size"),  # type: ignore[arg-type]
        eval_batch_size=_int(raw.get("eval_batch_size", 500), "eval_batch_size"),  # type: ignore[arg-type]
        seed=_int(raw.get("seed", 0), "seed", minimum=0),  # type: ignore[arg-type]
        device=device,
        train_subset=_int(raw.get("train_subset"), "train_subset", optional=True),
        test_subset=_int(raw.get("test_subset"), "test_subset", optional=True),
        max_steps=_int(raw.get("max_steps"), "max_steps", optional=True),
        stop_on_divergence=stop_on_divergence,
        out=out,
        debug_digests=debug_digests,
        compile=compile_kernels,
        evals_per_epoch=_int(raw.get("evals_per_epoch", DEFAULT_EVALS_PER_EPOCH), "evals_per_epoch"),  # type: ignore[arg-type]
        telemetry=_int(raw.get("telemetry", DEFAULT_TELEMETRY), "telemetry", minimum=0),  # type: ignore[arg-type]
        schemes=tuple(schemes),
    )
    check_buildable(spec)
    return spec


def _select(schemes: list[SchemeSpec], wanted: Any, base: Path | None) -> list[SchemeSpec]:
    """``--schemes a,b``: a subset of the config's schemes (built-in names are also accepted)."""
    names = [n.strip() for n in wanted.split(",")] if isinstance(wanted, str) else list(wanted)
    names = [n for n in names if n]
    if not names:
        raise ValueError("--schemes needs at least one scheme name")
    by_name = {s.name: s for s in schemes}
    chosen: list[SchemeSpec] = []
    for i, n in enumerate(names):
        if n in by_name:
            chosen.append(by_name[n])
        elif n in BUILTIN_SCHEMES:
            chosen.append(parse_scheme(n, i, base))
        else:
            raise ValueError(f"--schemes: unknown scheme {n!r}; this sweep has: {', '.join(by_name)} "
                             f"(built-in: {', '.join(BUILTIN_SCHEMES)})")
    if len({s.name for s in chosen}) != len(chosen):
        raise ValueError(f"--schemes names a scheme twice: {wanted!r}")
    return chosen


def _check_cifar_root(root: str | None) -> None:
    from precsim.zoo.data import CIFAR10_TEST_FILE, CIFAR10_TRAIN_FILES

    expected = [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]
    if root is None:
        raise ValueError(f"dataset 'cifar10' needs dataset.root: a folder with {', '.join(expected)} "
                         "(the CIFAR-10 python version; nothing is downloaded)")
    folder = Path(root)
    if not folder.is_dir():
        raise ValueError(f"dataset path {root!r} does not exist (dataset.root for cifar10)")
    if not (folder / CIFAR10_TEST_FILE).exists() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    missing = [n for n in expected if not (folder / n).is_file()]
    if missing:
        raise ValueError(f"dataset path {str(folder)!r} is missing {', '.join(missing)}")


def check_buildable(spec: SweepSpec) -> None:
    """Build the model and prepare it under every scheme, and run one tiny forward pass.

    Catches bad model arguments, shape mismatches and configs that prepare() rejects, before
    any data is loaded.
    """
    import warnings

    import torch

    from precsim.qat.prepare import prepare
    from precsim.runtime.backend import compiling
    from precsim.zoo import get_model

    kwargs = model_kwargs_for(spec)
    shape = SHAPES[spec.dataset]
    try:
        base = get_model(spec.model, **kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"model {spec.model!r}: {err}") from None
    try:
        base.eval()
        with torch.no_grad():
            base(torch.zeros(2, *shape))
    except RuntimeError as err:
        raise ValueError(f"model {spec.model!r} with {kwargs} cannot take {spec.dataset} images "
                         f"{shape}: {err}") from None
    for s in spec.schemes:
        model = copy.deepcopy(base)
        try:  # eager: a check on two zero images is no reason to compile kernels before the run says so
            with compiling(False):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    prepare(model, s.config, seed=spec.seed)
                for w in caught:  # a rule that matches no module, say: said now, --dry-run included
                    if str(w.message).startswith("precsim:"):
                        warnings.warn(f"scheme {s.name!r}: {w.message}", UserWarning, stacklevel=2)
                model.eval()
                with torch.no_grad():
                    model(torch.zeros(2, *shape))
        except (ValueError, TypeError, RuntimeError) as err:
            raise ValueError(f"scheme {s.name!r}: {err}") from None


__all__ = ["SchemeSpec", "SweepSpec", "check_buildable", "load_spec", "model_kwargs_for",
           "parse_scheme", "read_yaml", "zoo_kwargs"]
