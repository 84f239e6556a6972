"""prepare(model, config): attach quantizers to a model, keeping the user's training loop.

- Activations (and gradients): a forward hook on the module rounds its output through a
  :class:`Quantizer` stored as the child ``precsim_activation``; the same quantizer rounds the
  gradient flowing back through that point. ``input`` uses a forward pre-hook.
- Weights (and weight gradients): a parametrization (``torch.nn.utils.parametrize``) returns the
  rounded weight; its backward rounds the gradient of the stored weight.
- Biases, with ``bias: int32``: a parametrization rounds them to int32 codes at ``S_in S_w``
  (:mod:`precsim.qat.bias`).

Default placement (``points: outputs``) follows Tamiya et al.: outputs of Conv, Linear,
BatchNorm, ReLU/ReLU6 and :class:`QuantPoint`, weights of Conv and Linear. Other modules take
part when a rule selects them by ``type`` (or names them with ``match``). ``points: operands``
instead puts the points on the operands of every GEMM the model runs (:mod:`precsim.qat.operands`).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from torch import Tensor, nn
from torch.nn.utils import parametrize

from precsim.formats.random import mix_seed
from precsim.qat.accumulator import Accumulator
from precsim.qat.batches import feed
from precsim.qat.bias import int32_bias_layers, quantize_biases
from precsim.qat.config import ROLES, AccumulatorSpec, QuantConfig, RoleSpec
from precsim.qat.fingerprint import EXTRA_STATE, checking, decode, mismatch_message
from precsim.qat.fold import fold_batchnorms
from precsim.qat.graph import trace
from precsim.qat.markers import CONTAINERS, WEIGHT_TYPES, QuantPoint
from precsim.qat.operands import ACCUMULATOR, CONTAINER, POINT_KEY, attach, discover, mode_of
from precsim.qat.quantizer import Quantizer

DEFAULT_TYPES: tuple[type[nn.Module], ...] = (
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.ReLU, nn.ReLU6,
)
GEMM_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)  # take an accumulator (points: outputs)


def _is_float(x: Any) -> bool:
    return isinstance(x, Tensor) and x.is_floating_point()  # never round indices or masks


def _output_hook(module: nn.Module, args: Any, output: Any) -> Any:
    q = module.precsim_activation
    if isinstance(output, tuple):
        return (q(output[0]), *output[1:]) if output and _is_float(output[0]) else output
    return q(output) if _is_float(output) else output


def _input_hook(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    if args and _is_float(args[0]):
        return (module.precsim_input(args[0]), *args[1:])
    return args


def _weight_names(module: nn.Module) -> list[str]:
    """Directly owned parameters that are weights: ``weight`` and ``*_weight`` (MHA's in_proj)."""
    return [n for n, p in module.named_parameters(recurse=False)
            if p is not None and (n == "weight" or n.endswith("_weight"))]


def resolve(model: nn.Module, config: QuantConfig) -> dict[str, dict[str, RoleSpec | None]]:
    """Module name -> role -> spec for every module that takes part; warns on idle rules."""
    plan: dict[str, dict[str, RoleSpec | None]] = {}
    used = [False] * len(config.rules)
    for name, module in model.named_modules():
        if isinstance(module, (*CONTAINERS, Quantizer)) or name.split(".")[-1].startswith("precsim_"):
            continue
        type_name = tuple(c.__name__ for c in type(module).__mro__)  # a rule's type matches subclasses
        default = isinstance(module, (*DEFAULT_TYPES, QuantPoint))
        roles: dict[str, RoleSpec | None] = {}
        if default:
            roles = {r: config.roles.get(r) for r in ("activation", "gradient", "input")}
            if isinstance(module, WEIGHT_TYPES):
                roles["weight"] = config.roles.get("weight")
                roles["weight_gradient"] = config.roles.get("weight_gradient")
        selected = default
        leaf = not any(True for _ in module.children())
        for i, rule in enumerate(config.rules):
            if not rule.selects(name, type_name):
                continue
            if not rule.types and not (default or leaf):
                continue  # a bare glob reaches leaf modules, not their containers
            used[i] = True
            if not selected and not rule.roles and (rule.bias is not None or rule.accumulators):
                continue  # a rule that only sets ``bias`` or an accumulator adds no quantizers
            if not selected:
                selected = True
                roles = {r: config.roles.get(r) for r in ("activation", "gradient", "input")}
                if _weight_names(module):  # Embedding, LayerNorm, MHA's in_proj_weight, ...
                    roles["weight"] = config.roles.get("weight")
                    roles["weight_gradient"] = config.roles.get("weight_gradient")
            roles.update(rule.roles)
        if selected and any(v is not None for v in roles.values()):
            plan[name] = roles
    for rule, hit in zip(config.rules, used, strict=True):
        if not hit:
            warnings.warn(f"precsim: rule {rule.text} matches no module", stacklevel=3)
    return plan


def resolve_accumulators(model: nn.Module, config: QuantConfig) -> dict[str, tuple[AccumulatorSpec | None, ...]]:
    """points: outputs: module name -> (accumulator, gradient accumulator) for every Linear and
    Conv1d/2d/3d module that has one (the global keys, then every rule that selects it)."""
    plan: dict[str, tuple[AccumulatorSpec | None, ...]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, GEMM_TYPES) or name.split(".")[-1].startswith("precsim_"):
            continue
        types = tuple(c.__name__ for c in type(module).__mro__)
        specs = config.accumulators_for(name, types)
        if any(v is not None for v in specs):
            plan[name] = tuple(specs)
    return plan


def _check_fingerprints(model: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook of a prepared model: one error for every saved quantization point prepared
    with another config (:mod:`precsim.qat.fingerprint`), raised before anything loads."""
    if not checking():
        return
    points = quantizers(model)
    differing = []
    for name, q in points:
        key = f"{prefix}{name}.{EXTRA_STATE}"
        if key in state_dict and (saved := decode(state_dict[key])) != q.fingerprint:
            differing.append((prefix + name, saved, q.fingerprint))
    if differing:
        raise RuntimeError(mismatch_message(type(model).__name__, differing, len(points)))


def prepare(model: nn.Module, config: QuantConfig | dict[str, Any] | str | Path, *, seed: int | None = None,
            example_inputs: Any = None) -> nn.Module:
    """Attach quantizers to ``model`` in place and return it.

    ``config`` is a dict, a YAML file path or a :class:`QuantConfig`. ``seed`` (default: the
    config's, else 0) makes stochastic rounding reproducible. Calling prepare twice is an error.
    ``example_inputs`` (a batch: tensor, pair or dict of keyword inputs): with ``points:
    operands``, one forward pass that creates every operand point now, rounding nothing (do it,
    or run one batch, before wrapping the model in DDP); with module outputs, BN folding and
    bias quantization read the model's dataflow by ``torch.export`` on it instead of torch.fx.
    """
    cfg = QuantConfig.from_any(config)
    if any(isinstance(m, Quantizer) for m in model.modules()) or mode_of(model) is not None:
        raise ValueError("this model is already prepared (it holds precsim quantizers)")
    base_seed = cfg.seed if seed is None else seed
    if cfg.points == "operands":
        attach(model, cfg, base_seed)
        model.register_load_state_dict_pre_hook(_check_fingerprints)
        if example_inputs is not None:
            discover(model, lambda: feed(model, example_inputs))
        return model
    plan = resolve(model, cfg)
    modules = dict(model.named_modules())
    for index, (name, roles) in enumerate(plan.items()):
        module = modules[name]
        s = mix_seed(base_seed, index)
        act, grad = roles.get("activation"), roles.get("gradient")
        if act is not None or grad is not None:
            module.precsim_activation = Quantizer("activation", act, grad, seed=mix_seed(s, 0))
            module.register_forward_hook(_output_hook)
        if roles.get("input") is not None:
            module.precsim_input = Quantizer("input", roles["input"], None, seed=mix_seed(s, 1))
            module.register_forward_pre_hook(_input_hook)
        wspec, wgrad = roles.get("weight"), roles.get("weight_gradient")
        if wspec is not None or wgrad is not None:
            for k, pname in enumerate(_weight_names(module)):
                q = Quantizer("weight", wspec, wgrad, seed=mix_seed(s, 2 + k))
                parametrize.register_parametrization(module, pname, q)
    # one capture for both (folding adds no module calls); torch.export needs the example batch
    graph = None
    if example_inputs is not None and (cfg.fold_bn or int32_bias_layers(model, cfg)):
        graph = trace(model, example_inputs)
    if cfg.fold_bn:  # Conv/Linear+BN chains: the weight quantizer sees the folded weight
        fold_batchnorms(model, freeze_after=cfg.freeze_bn_after, graph=graph)
    quantize_biases(model, cfg, graph)  # bias: int32 -- after folding, which decides where the bias is added
    accumulators = resolve_accumulators(model, cfg) if cfg.has_accumulators else {}
    if accumulators:  # their GEMM calls run through the operand mode, which rounds no operand here
        attach(model, cfg, base_seed, accumulators=accumulators)  # type: ignore[arg-type]
    model.register_load_state_dict_pre_hook(_check_fingerprints)
    return model


def quantizers(model: nn.Module) -> list[tuple[str, Quantizer]]:
    """Every quantizer in ``model`` with its qualified name."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, Quantizer)]


def summary_rows(model: nn.Module) -> list[dict[str, str]]:
    """One dict per point: ``module``, ``op`` (the op kind of an operand point, else ``output``,
    ``input`` or ``weight``), ``call`` (which call of that op in the module's forward, from 0;
    empty for module points), ``operand``, ``role``, ``format``, ``observer``, ``rounding``,
    ``gradient``."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, Accumulator):
            rows.append(_accumulator_row(name, module))
            continue
        if not isinstance(module, Quantizer):
            continue
        parts = name.split(".")
        if "parametrizations" in parts:
            i = parts.index("parametrizations")
            owner, role, op, operand = ".".join(parts[:i]), parts[i + 1], "weight", parts[i + 1]
            call = ""
        elif CONTAINER in parts:
            i = parts.index(CONTAINER)
            owner, role = ".".join(parts[:i]), module.role
            op, call, operand = POINT_KEY.match(parts[i + 1]).group("op", "k", "operand")  # type: ignore[union-attr]
        else:
            owner, role, call = ".".join(parts[:-1]), module.role, ""
            op = operand = "input" if role == "input" else "output"
        fmt, obs, rnd, grad = module.describe()
        rows.append({"module": owner or "(model)", "op": op, "call": call, "operand": operand, "role": role,
                     "format": fmt, "observer": obs, "rounding": rnd, "gradient": grad})
    return rows


def point_rows(model: nn.Module) -> list[tuple[str, Quantizer, dict[str, str]]]:
    """(name, quantizer, summary row) of every quantization point, in model order (accumulator
    points, which have rows but are not quantizers, left out)."""
    rows = [r for r in summary_rows(model) if r["role"] != "accumulator"]
    return [(n, q, r) for (n, q), r in zip(quantizers(model), rows, strict=True)]


def _accumulator_row(name: str, acc: Accumulator) -> dict[str, str]:
    """An accumulator point's summary row: role ``accumulator``; its format column says the
    format, block and promotion; rounding, or overflow and the overflow events counted so far."""
    parts = name.split(".")
    if CONTAINER in parts:
        i = parts.index(CONTAINER)
        owner = ".".join(parts[:i])
        op, call = POINT_KEY.match(parts[i + 1]).group("op", "k")  # type: ignore[union-attr]
    else:  # points: outputs: the GEMM of a Linear or Conv module
        owner, call = ".".join(p for p in parts if p != ACCUMULATOR), ""
        op = "linear" if acc.owner_kind == "Linear" else "conv"
    spec, grad = acc.spec, acc.grad_spec
    fmt = "fp32" if spec is None else f"{spec.name} (block {spec.block}" + (
        f", promote {spec.promote})" if spec.promote else ")")
    rnd = "-" if spec is None else (f"{spec.overflow}, {int(acc.overflows)} overflows" if acc.integer
                                    else spec.rounding)
    return {"module": owner or "(model)", "op": op, "call": call, "operand": "accumulator", "role": "accumulator",
            "format": fmt, "observer": "-", "rounding": rnd, "gradient": "-" if grad is None else grad.describe()}


def summary(model: nn.Module) -> str:
    """A table: module, op, operand, role (activation/input/weight name), format, observer,
    rounding, gradient."""
    rows = summary_rows(model)
    if not rows:
        if (mode := mode_of(model)) is not None and mode.operands:
            return "(no quantizers yet: points: operands creates them on the first forward pass)"
        return "(no quantizers)"
    cols = ["module", "op", "call", "operand", "role", "format", "observer", "rounding", "gradient"]
    width = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    line = "  ".join(c.ljust(width[c]) for c in cols)
    out = [line, "  ".join("-" * width[c] for c in cols)]
    out += ["  ".join(r[c].ljust(width[c]) for c in cols) for r in rows]
    return "\n".join(out)


__all__ = ["ROLES", "QuantPoint", "prepare", "quantizers", "resolve", "summary", "summary_rows"]
