"""int32 bias quantization (config ``bias: int32``): the bias an integer kernel adds, in the simulation.

An integer conv/linear adds its bias to the int32 accumulator, so the bias is stored as int32
codes at the accumulator's scale ``S_in * S_w`` (Jacob et al. 2018, section 2.4; TFLite's QAT
does the same): ``b_q = S_in S_w round(b / (S_in S_w))``, per output channel when the weights
are per channel. Plain fake quantization would otherwise add the exact float bias, and the
integer model's bias rounding (up to ``M/2`` output codes, ``M = S_in S_w / S_out``) would be
an error the simulation does not see.

``S_in`` is the scale of the quantizer that produced the layer's input codes: its own
``input`` quantizer, else the activation quantizer upstream, found once in the fx graph
through the ops that keep codes and scale (their rules are in :mod:`precsim.qat.graph`): pure layout ops (flatten, reshape/view,
transpose/permute, unflatten, squeeze, contiguous, indexing, unbind/chunk/split and their
pieces, concatenation of equally quantized tensors), max pooling, ReLU clamps, dropout and
identity. A multiplication or division by a positive constant number (``x * c``, ``x / c``)
keeps the codes and scales ``S_in`` by ``c`` (or ``1/c``), as :func:`precsim.convert` treats
it. Anything else (a product of tensors, a negative factor, an unquantized sum) makes new
values with another scale; then there is no ``S_in`` and :func:`quantize_biases` names the
layer and the op in the way. ``S_w`` comes from the weight quantizer's observer, exactly as the weight
codes are made (:func:`precsim.convert` makes the same choices). Both are read at every
forward, so the bias follows the ranges during QAT.

The rounding is half away from zero on ``b / (S_in S_w)`` computed in float64, the rule
:func:`precsim.convert` uses, so the integer model re-derives the same int32 codes from the
already-rounded bias (``round(b_q / (S_in S_w))`` is the code itself while ``|code| < 2^23``,
where float32 holds ``b_q`` to better than half a code).

The bias is a parametrization (:class:`IntBias`), like the weights: the stored parameter stays
float and trainable, its gradient passes straight through the rounding. With ``fold_bn`` the
added bias is the folded one, ``b' = beta + (b - mean) gamma / sqrt(var + eps)``, applied by the
BatchNorm; then BatchNorm's ``beta`` is parametrized so the chain adds ``b'_q`` exactly when
the BatchNorm uses its running statistics (eval, or training after ``freeze_after``). While it
normalizes with batch statistics no folded bias exists (the batch mean cancels any constant),
and the bias is left alone.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from precsim.formats import IntFormat
from precsim.qat.accumulator import INPUT_SOURCE
from precsim.qat.config import QuantConfig
from precsim.qat.fold import FoldedWeight, bn_scale, folded_weight_input
from precsim.qat.graph import KEEP_CODES_FUNCS, KEEP_CODES_METHODS, KEEP_CODES_MODULES, constant_factor, trace
from precsim.qat.markers import WEIGHT_TYPES
from precsim.qat.quantizer import BYPASS, Quantizer

__all__ = ["IntBias", "accumulator_scale", "accumulator_scale_of", "bias_codes", "bias_setting", "input_quantizer",
           "int32_bias_layers", "int_bias_of", "layer_bias_codes", "quantize_biases", "round_half_away", "weight_quantizer"]


# --------------------------------------------------------------------------------------------
# The rounding (pure)
# --------------------------------------------------------------------------------------------


def round_half_away(x: Tensor) -> Tensor:
    """Round to the nearest integer, ties away from zero (C ``round``, TFLite's bias rounding)."""
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


def accumulator_scale_of(s_in: Tensor | float, s_w: Tensor) -> Tensor:
    """``S_in * S_w`` in float64: the scale of the accumulator and of the int32 bias (per channel with ``S_w``)."""
    return torch.as_tensor(s_in, dtype=torch.float64, device=s_w.device) * s_w.double()


def bias_codes(bias: Tensor, scale: Tensor) -> Tensor:
    """The int32 bias codes ``round_half_away(b / (S_in S_w))``, as float64 (exact integers).

    The one bias rounding rule: the simulation (:class:`IntBias`) and :func:`precsim.convert` both call it.
    """
    return round_half_away(bias.double() / scale.double())


# --------------------------------------------------------------------------------------------
# Where S_in and S_w come from
# --------------------------------------------------------------------------------------------


def _is_point(q: Any) -> bool:
    return isinstance(q, Quantizer) and q.spec is not None


def _describe_node(n: fx.Node) -> str:
    what = n.target if n.op == "call_module" else getattr(n.target, "__name__", str(n.target))
    return f"{what!r} (graph node {n.name!r})"


def _trace_input(node: fx.Node, modules: dict[str, nn.Module]) -> tuple[Quantizer | None, str, tuple[float, ...]]:
    """The quantizer whose codes reach ``node``'s first input and the constant factors on the way
    (in the order they apply), or None and the op where the search stopped."""
    if node.op == "call_module" and _is_point(getattr(modules[str(node.target)], "precsim_input", None)):
        return modules[str(node.target)].precsim_input, "", ()  # type: ignore[return-value]
    arg = node.args[0] if node.args else None

    factors: list[float] = []  # upstream order: reversed at the end
    while isinstance(arg, fx.Node):
        if arg.op == "call_module":
            m = modules[str(arg.target)]
            act, inp = getattr(m, "precsim_activation", None), getattr(m, "precsim_input", None)
            if _is_point(act):
                return act, "", tuple(reversed(factors))  # type: ignore[return-value]
            if not isinstance(m, KEEP_CODES_MODULES):
                return None, f"{_describe_node(arg)}, a {type(m).__name__} with no activation quantizer", ()
            if _is_point(inp):
                return inp, "", tuple(reversed(factors))  # type: ignore[return-value]
        elif arg.op == "placeholder":
            return None, f"the model input {arg.name!r}, not quantized", ()
        elif (scaled := constant_factor(arg)) is not None:
            arg = scaled[0]
            factors.append(scaled[1])
            continue
        elif not ((arg.op == "call_function" and arg.target in KEEP_CODES_FUNCS)
                  or (arg.op == "call_method" and arg.target in KEEP_CODES_METHODS)
                  or (arg.op == "call_function" and arg.target is torch.cat)):
            return None, f"{_describe_node(arg)}, which makes new values at another scale", ()
        first = arg.args[0] if arg.args else None
        if arg.op == "call_function" and arg.target is torch.cat:
            first = first[0] if isinstance(first, (list, tuple)) and first else None  # equal scales for a cat
        arg = first
    return None, "a constant", ()


def input_quantizer(node: fx.Node, modules: dict[str, nn.Module]) -> Quantizer | None:
    """The quantizer whose codes reach ``node``'s first input (None: the input is not quantized).

    Follows the graph upstream through ops that keep codes and scale (layout ops such as
    transpose/flatten/reshape/indexing, max pooling, ReLU, dropout) and through positive
    constant factors, which keep the codes and scale ``S_in`` (:func:`accumulator_scale`);
    stops at the first quantizer (an activation quantizer, or a module's own ``input``
    quantizer) or at anything that computes new values.
    """
    return _trace_input(node, modules)[0]


def weight_quantizer(layer: nn.Module) -> Quantizer | None:
    """The weight :class:`Quantizer` of a conv/linear (inside a :class:`FoldedWeight` with fold_bn)."""
    if not parametrize.is_parametrized(layer, "weight"):
        return None
    p = layer.parametrizations.weight[0]
    q = p.quant if isinstance(p, FoldedWeight) else p
    return q if _is_point(q) else None


def _act_scale(q: Quantizer) -> Tensor | None:
    """The scale the input quantizer uses now (None: it has seen no data yet)."""
    obs = q.observer
    if obs is None or not bool(obs.initialized):
        return None
    return q.spec.format.qparams(obs.min_val, obs.max_val)[0]  # type: ignore[union-attr]


def _weight_scale(layer: nn.Module, q: Quantizer) -> Tensor:
    """The weight scale(s), as the weight quantizer has them: a minmax observer measures the current weight."""
    obs = q.observer
    assert obs is not None
    if obs.kind == "minmax" or not bool(obs.initialized):
        lo, hi = obs.measure(folded_weight_input(layer).detach().float())
    else:
        lo, hi = obs.min_val, obs.max_val
    return q.spec.format.qparams(lo, hi)[0]  # type: ignore[union-attr]


def accumulator_scale(layer: nn.Module, source: Quantizer, factors: tuple[float, ...] = ()) -> Tensor | None:
    """``S_in * S_w`` in float64, per output channel for per-channel weights (None: no input range yet).

    ``factors``: the constants the source's values are multiplied by on their way to the layer,
    in that order; ``S_in`` is the source's scale times each, in double precision, as
    :func:`precsim.convert` scales the codes' ``S``."""
    s_act = _act_scale(source)
    q = weight_quantizer(layer)
    if s_act is None or q is None:
        return None
    s_in: Tensor | float = s_act
    if factors:
        s_in = float(s_act)
        for f in factors:
            s_in = s_in * f
    return accumulator_scale_of(s_in, _weight_scale(layer, q))


# --------------------------------------------------------------------------------------------
# The parametrization
# --------------------------------------------------------------------------------------------


class IntBias(nn.Module):
    """Bias parametrization ``b -> S_in S_w round(b / (S_in S_w))`` with a straight-through gradient.

    ``layer`` is the conv/linear whose accumulator the bias joins, ``source`` the quantizer of its
    input; with ``bn`` (fold_bn) this parametrizes the BatchNorm's ``beta`` so that the folded bias
    comes out rounded. All three are references, not sub-modules: their state is saved once.
    """

    def __init__(self, layer: nn.Module, source: Quantizer, bn: nn.Module | None = None,
                 factors: tuple[float, ...] = ()) -> None:
        super().__init__()
        self.__dict__["layer"] = layer
        self.__dict__["source"] = source
        self.__dict__["bn"] = bn
        self.factors = factors  # constants between the source and the layer (see accumulator_scale)

    def effective(self, b: Tensor) -> Tensor:
        """The bias the accumulator receives: ``b`` itself, or the folded ``beta + (b_conv - mean) s``."""
        bn = self.bn
        if bn is None:
            return b
        conv_bias = self.layer.bias
        s = bn_scale(bn)
        return b + ((torch.zeros_like(s) if conv_bias is None else conv_bias) - bn.running_mean) * s

    def codes(self, b: Tensor) -> Tensor | None:
        """The int32 codes of the effective bias (float64; None: no input range observed yet)."""
        scale = accumulator_scale(self.layer, self.source, self.factors)
        return None if scale is None else bias_codes(self.effective(b), scale)

    def forward(self, b: Tensor) -> Tensor:
        if BYPASS.get():  # a graph capture: the float model's bias
            return b
        if self.bn is not None and self.bn.training:
            return b  # batch statistics: no folded bias exists (the batch mean cancels any constant)
        with torch.no_grad():
            scale = accumulator_scale(self.layer, self.source, self.factors)
            if scale is None:
                return b
            real = self.effective(b)
            residual = (bias_codes(real, scale) * scale).to(b.dtype) - real
        return b + residual  # unfolded: exactly the rounded bias (Sterbenz); gradient 1 to b

    def extra_repr(self) -> str:
        times = "".join(f"*{f:g}" for f in self.factors)
        return f"int32 at S_in{times}*S_w" + (" (folded BatchNorm bias)" if self.bn is not None else "")


def int_bias_of(layer: nn.Module) -> tuple[IntBias, nn.Module] | None:
    """The :class:`IntBias` rounding ``layer``'s bias and the module owning it (the BatchNorm with fold_bn)."""
    owner = layer
    if parametrize.is_parametrized(layer, "weight") and isinstance(layer.parametrizations.weight[0], FoldedWeight):
        owner = layer.parametrizations.weight[0].bn
    if parametrize.is_parametrized(owner, "bias") and isinstance(owner.parametrizations.bias[0], IntBias):
        return owner.parametrizations.bias[0], owner
    return None


def layer_bias_codes(layer: nn.Module) -> Tensor | None:
    """The int32 codes (int64 tensor) the simulation adds to ``layer``'s accumulator now.

    None when the bias is not rounded (``bias: fp32``, no bias at all, or no input range
    observed yet). :func:`precsim.convert` derives the same codes (tested).
    """
    found = int_bias_of(layer)
    if found is None:
        return None
    p, owner = found
    with torch.no_grad():
        codes = p.codes(owner.parametrizations.bias.original)
    return None if codes is None else codes.to(torch.int64)


# --------------------------------------------------------------------------------------------
# prepare(): which layers, and installing the parametrizations
# --------------------------------------------------------------------------------------------


def int32_bias_layers(model: nn.Module, config: QuantConfig) -> list[str]:
    """The conv/linear layers ``config`` gives ``bias: int32``."""
    return [n for n, m in model.named_modules() if isinstance(m, WEIGHT_TYPES) and bias_setting(n, m, config) == "int32"]


def bias_setting(name: str, module: nn.Module, config: QuantConfig) -> str:
    """``fp32`` or ``int32`` for one module: the global ``bias``, then rules in order (later win)."""
    setting = config.bias
    mro = tuple(c.__name__ for c in type(module).__mro__)
    for rule in config.rules:
        if rule.bias is not None and rule.selects(name, mro):
            setting = rule.bias
    return setting


def _check_format(q: Quantizer, what: str, name: str, per_channel_ok: bool) -> None:
    fmt = q.spec.format  # type: ignore[union-attr]
    ok = isinstance(fmt, IntFormat) and fmt.group_size is None and (
        fmt.axis is None or (per_channel_ok and fmt.axis == 0))
    if not ok:
        allowed = "per tensor or per output channel (axis 0)" if per_channel_ok else "per tensor"
        raise ValueError(f"bias: int32 for {name!r}: {what} is quantized to {fmt.name}; an int32 bias at "
                         f"S_in*S_w needs an integer format, {allowed}; or set a rule {{match: {name}, bias: fp32}}")


def _load_plain_bias(module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """A checkpoint saved with ``bias: fp32`` holds ``bias``; the parametrized module stores it as ``original``."""
    plain, original = prefix + "bias", prefix + "parametrizations.bias.original"
    if plain in state_dict and original not in state_dict:
        state_dict[original] = state_dict.pop(plain)


def quantize_biases(model: nn.Module, config: QuantConfig, graph: fx.Graph | None = None) -> list[str]:
    """Install :class:`IntBias` on every conv/linear that ``config`` gives ``bias: int32``.

    Called by :func:`precsim.prepare` after the quantizers (and BN folding) are in place.
    Returns the names of the layers whose bias is rounded. Raises ``ValueError`` naming the
    layer when its input or weights are not integer-quantized (no ``S_in`` or ``S_w``).
    """
    modules = dict(model.named_modules())
    wanted = int32_bias_layers(model, config)
    if not wanted:
        return []
    sources: dict[str, tuple[Quantizer, tuple[float, ...]]] = {}
    for node in (trace(model) if graph is None else graph).nodes:
        name = str(node.target)
        if node.op != "call_module" or name not in wanted:
            continue
        q, stop, factors = _trace_input(node, modules)
        if q is None:
            raise ValueError(f"bias: int32 for {name!r}: its input is not integer-quantized, so there is no S_in "
                             f"(past the layout ops that keep codes and scale, its input is {stop}); give {name!r} an "
                             f"input quantizer (a rule {{match: {name}, input: uint8}}), quantize the module feeding it, "
                             f"or set {{match: {name}, bias: fp32}}")
        if sources.setdefault(name, (q, factors)) != (q, factors):
            raise ValueError(f"bias: int32 for {name!r}: the module is called on inputs from different quantizers "
                             "or scales")
    done = []
    for name in wanted:
        if name not in sources:
            continue  # never called in forward()
        layer, (source, factors) = modules[name], sources[name]
        _check_format(source, "its input", name, per_channel_ok=False)
        layer.__dict__[INPUT_SOURCE] = (source, factors)  # a plain reference (not a sub-module)
        wq = weight_quantizer(layer)
        if wq is None:
            raise ValueError(f"bias: int32 for {name!r}: its weights are not quantized, so there is no S_w; "
                             f"give it an integer weight format or set {{match: {name}, bias: fp32}}")
        _check_format(wq, "its weight", name, per_channel_ok=True)
        p = layer.parametrizations.weight[0]
        bn = p.bn if isinstance(p, FoldedWeight) else None
        if bn is not None:
            if bn.bias is None:
                raise ValueError(f"bias: int32 for {name!r}: its folded BatchNorm has no bias (affine=False) to "
                                 f"carry the rounded bias; set {{match: {name}, bias: fp32}}")
            owner = bn
        elif layer.bias is not None:
            owner = layer
        else:
            continue  # no bias: zero is exact
        parametrize.register_parametrization(owner, "bias", IntBias(layer, source, bn, factors))
        owner.register_load_state_dict_pre_hook(_load_plain_bias)
        done.append(name)
    return done

