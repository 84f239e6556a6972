"""convert(prepared model) -> IntegerModel: lower the simulated model to integer-only ops.

The prepared model's dataflow comes from ``torch.fx`` (module-level trace; quantizer hooks are
not traced, so their settings are read from the modules). Every value in the graph is in one of
these states while lowering:

* the model input before its quantization point (``_Float``): only shape ops may touch it;
* integer codes with a per-tensor scale and zero point (``Codes``);
* an op whose result is not yet quantized (``Pending*``): a conv/linear accumulator (a folded
  BatchNorm and a ReLU/ReLU6 can join it), a residual add, a window sum, an activation product
  (a constant factor such as attention's ``1/sqrt(d)`` joins its multiplier), tokens plus real
  constants (class token, position embedding: ``_Affine``). It becomes integer codes at the
  next activation quantizer, which fixes the output scale: that is where the fixed-point
  multiplier ``M = S_in S_w / S_out`` and the clamp are made;
* a tensor attribute of the model (``_Const``: class token, position embedding), a shape
  (``_Shape``) or the pieces of ``unbind`` (``_Unbound``), which only the ops that use them
  turn into integer ops.

Softmax, GELU and LayerNorm become I-ViT's Shiftmax, ShiftGELU and I-LayerNorm
(:mod:`precsim.integer.vit_ops`); their output quantizer fixes the output scale.

Anything else -- an unsupported module, a float or per-channel activation format, an output
nobody quantized -- raises :class:`ConversionError` naming the module.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from precsim.formats import IntFormat
from precsim.integer.fixedpoint import (
    INT32_MAX,
    check_requant_rounding,
    quantize_multiplier,
)
from precsim.integer.gemm import (
    Codes,
    ConversionError,
    Pending,
    PendingConv,
    activation_qparams,
    add_op,
    conv_op,
    source_line,
    weight_codes,
)
from precsim.integer.ivit_ops import prepare_i_layernorm, prepare_shift_gelu, prepare_shiftmax
from precsim.integer.lower import lower
from precsim.integer.model import IntegerModel
from precsim.integer.ops import (
    AddOp,
    AvgPoolOp,
    CatOp,
    ClampOp,
    ConvOp,
    FlattenOp,
    MaxPoolOp,
    Op,
    QParams,
    RequantOp,
    ReshapeOp,
)
from precsim.integer.vit_ops import (
    AddConstOp,
    ILayerNormOp,
    LayoutOp,
    MatMulOp,
    ShiftGeluOp,
    ShiftmaxOp,
    consts_state,
    encode_index,
)
from precsim.qat.accumulator import Accumulator
from precsim.qat.bias import round_half_away
from precsim.qat.fold import FoldedWeight, fold_conv_bn, folded_weight_input
from precsim.qat.graph import (
    DIV_FUNCS,
    IDENTITY_MODULES,
    LAYOUT_FUNCS,
    LAYOUT_METHODS,
    MUL_FUNCS,
    RELU_FUNCS,
    RELU_MODULES,
    constant_factor,
    trace,
)
from precsim.qat.markers import Add, MatMul, QuantPoint
from precsim.qat.operands import mode_of
from precsim.qat.quantizer import Quantizer

__all__ = ["ConversionError", "convert", "integer_config"]

SUPPORTED = ("Conv2d, Linear, BatchNorm (folded into the preceding conv: fold_bn), ReLU, ReLU6, "
             "precsim.zoo.Add / a + b, AvgPool2d, AdaptiveAvgPool2d(1), MaxPool2d, Flatten, torch.cat, "
             "Identity, Dropout, QuantPoint; for transformers: precsim.qat.markers.MatMul / a @ b (times a constant), "
             "Softmax (Shiftmax), GELU (ShiftGELU), LayerNorm (I-LayerNorm), a class token concatenated and a "
             "position embedding added, permute/transpose/unflatten/unbind/indexing")
# The ops that keep codes and scale are defined in precsim.qat.graph; convert lowers the subsets named here and
# raises "no integer implementation" for the rest (which the bias walker still sees through).
# Identity modules it passes through: Dropout3d is not among them (not lowered).
_IDENTITY_MODULES = tuple(m for m in IDENTITY_MODULES if m is not nn.Dropout3d)
_PASS_MODULES = (*_IDENTITY_MODULES, QuantPoint)
# Layout methods that become a LayoutOp of the same name with constant arguments (flatten, view/reshape,
# contiguous and unbind have their own lowering; squeeze, chunk, split, ... have none).
_LAYOUT_OP_METHODS = tuple(m for m in LAYOUT_METHODS if m in ("permute", "transpose", "unflatten"))
_ADD_FUNCS = (operator.add, torch.add, operator.iadd)
_MATMUL_FUNCS = (operator.matmul, torch.matmul)


# --------------------------------------------------------------------------------------------
# Value states while lowering
# --------------------------------------------------------------------------------------------


@dataclass
class _Float:
    """The model input, not quantized yet in the simulation; ``deferred`` shape ops wait for it."""

    tensor: str
    deferred: list[Op] = field(default_factory=list)


@dataclass
class _PendingAdd(Pending):
    a: Codes | None = None
    b: Codes | None = None


@dataclass
class _PendingPool(Pending):
    src: Codes | None = None
    kernel: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None


@dataclass
class _PendingCodes(Pending):
    """Codes with a ReLU applied, waiting for the ReLU's own quantizer (one requantization)."""

    src: Codes | None = None


@dataclass
class _PendingMatMul(Pending):
    a: Codes | None = None
    b: Codes | None = None
    factor: float = 1.0  # a constant the float model multiplies the product by


@dataclass
class _Affine(Pending):
    """Token codes ``src`` plus real constants: ``prefix`` rows prepended along ``dim`` (a class
    token, with its share of an added constant), ``offset`` added to the token rows (position
    embedding). Both are float64 real values until the output quantizer fixes the scale."""

    src: Codes | None = None
    dim: int = 1
    prefix: Tensor | None = None
    offset: Tensor | None = None


@dataclass
class _Const:
    """A tensor attribute of the model (parameter or buffer) used in forward()."""

    tensor: Tensor
    origin: str


@dataclass
class _Shape:
    """``x.shape``, ``x.shape[i]`` or ``x.size(i)``: only usable as an ``expand`` size."""

    origin: str


@dataclass
class _Unbound:
    """``x.unbind(dim)``: indexing it selects one slice."""

    src: Codes | _Float
    dim: int
    origin: str


Value = _Float | Codes | Pending | _Const | _Shape | _Unbound


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


# --------------------------------------------------------------------------------------------
# Lowering
# --------------------------------------------------------------------------------------------


class _Lowering:
    def __init__(self, model: nn.Module, rounding: str = "gemmlowp", example: Tensor | None = None) -> None:
        self.rounding = check_requant_rounding(rounding)
        if not any(isinstance(m, Quantizer) for m in model.modules()):
            raise ConversionError(
                f"{type(model).__name__} is not prepared: run precsim.prepare(model, config) (or precsim.calibrate) "
                "with integer formats for activations and weights first"
            )
        self.model = model
        self.modules = dict(model.named_modules())
        self.names_by_id = {id(m): n for n, m in self.modules.items()}
        try:
            self.graph = trace(model, example)
        except ValueError as err:
            raise ConversionError(str(err)) from err
        self.ops: list[Op] = []
        self.values: dict[str, Value] = {}
        self.input_qp: QParams | None = None
        self.input_tensor: str | None = None
        self.output: Codes | None = None
        self.notes: list[str] = []
        self.emitted: set[str] = set()

    # --- helpers -------------------------------------------------------------------------------
    def emit(self, op: Op) -> None:
        if op.output not in self.emitted:
            self.ops.append(op)
            self.emitted.add(op.output)

    def value(self, arg: Any, user: str) -> Value:
        if not isinstance(arg, fx.Node):
            raise ConversionError(f"{user}: expected a tensor input, got the constant {arg!r}")
        return self.values[arg.name]

    def act_qparams(self, q: Quantizer, where: str) -> QParams | None:
        """Scale/zero point an activation (or input) quantizer uses in eval mode; None: not quantized."""
        return activation_qparams(q, where)

    def codes(self, v: Value, user: str) -> Codes:
        if isinstance(v, Codes):
            return v
        if isinstance(v, _Const):
            raise ConversionError(
                f"the tensor attribute {v.origin!r} reaches {user}: convert() supports model constants only as "
                "a class token concatenated in front of the tokens (torch.cat) and as an added constant "
                "(position embedding) before an activation quantizer")
        if isinstance(v, (_Shape, _Unbound)):
            raise ConversionError(f"{user}: uses {v.origin!r} ({'a shape' if isinstance(v, _Shape) else 'unbind'}) "
                                  "as a tensor; only expand() sizes and indexing are supported")
        if isinstance(v, _Affine):
            raise ConversionError(
                f"the tokens plus constants of {v.origin!r} (class token / position embedding) reach {user} "
                f"without being quantized: give {v.origin!r} an activation quantizer (precsim.ivit_config adds one)")
        if isinstance(v, _Float):
            raise ConversionError(
                f"the model input reaches {user} unquantized: give {user} an 'input' quantizer "
                f"(a rule {{match: {user}, input: uint8}}) or start the model with precsim.QuantPoint(); "
                "precsim.integer_config(model) writes such a config")
        raise ConversionError(
            f"the output of {v.origin!r} reaches {user} without being quantized: give {v.origin!r} an activation "
            "quantizer (a rule selecting it, e.g. {match: ..., activation: uint8}; precsim.integer_config(model) adds them)")

    # --- quantization points -------------------------------------------------------------------
    def quantize(self, v: Value, qp: QParams, out: str, where: str) -> Codes:
        """The value ``v`` rounded to ``qp`` (an activation or input quantizer), as integer ops."""
        if isinstance(v, (_Const, _Shape, _Unbound)):
            self.codes(v, where)  # raises
        if isinstance(v, _Float):
            if self.input_qp is not None and self.input_qp != qp:
                raise ConversionError(f"the model input is quantized at several points with different scales "
                                      f"(again at {where}); the integer model needs one input quantization")
            self.input_qp = qp
            for op in v.deferred:
                self.emit(op)
            return Codes(v.tensor, qp, where)
        if isinstance(v, Codes):
            if v.qp == qp:
                return v
            m0, shift = quantize_multiplier(v.qp.scale / qp.scale)
            self.emit(RequantOp(where, [v.tensor], out, v.qp, qp, m0, shift, qp.qmin, qp.qmax, self.rounding))
            return Codes(out, qp, where)
        lo, hi = self.bounds(qp, v.lower, v.upper, where)
        if isinstance(v, _PendingCodes):
            src = v.src
            assert src is not None
            if src.qp == qp:
                self.emit(ClampOp(where, [src.tensor], out, qp, lo, hi))
            else:
                m0, shift = quantize_multiplier(src.qp.scale / qp.scale)
                self.emit(RequantOp(where, [src.tensor], out, src.qp, qp, m0, shift, lo, hi, self.rounding))
        elif isinstance(v, PendingConv):
            self.emit(self.conv_op(v, qp, out, lo, hi))
        elif isinstance(v, _PendingAdd):
            self.emit(self.add_op(v, qp, out, lo, hi))
        elif isinstance(v, _PendingMatMul):
            self.emit(self.matmul_op(v, qp, out, lo, hi))
        elif isinstance(v, _Affine):
            self.emit(self.affine_op(v, qp, out, lo, hi))
        elif isinstance(v, _PendingPool):
            assert v.src is not None
            self.emit(AvgPoolOp(v.origin, [v.src.tensor], out, v.src.qp, qp, lo, hi, v.kernel, v.stride,
                                rounding=self.rounding))
        else:  # pragma: no cover - every state is handled above
            raise AssertionError(type(v))
        return Codes(out, qp, where)

    @staticmethod
    def bounds(qp: QParams, lower: float | None, upper: float | None, where: str) -> tuple[int, int]:
        """Clamp bounds with ReLU (lower 0) / ReLU6 (upper 6) folded in, rounded as the simulation does."""
        lo, hi = qp.qmin, qp.qmax
        if lower is not None:
            lo = max(lo, qp.zero_point)
        if upper is not None:
            top = int(torch.round(torch.tensor(upper, dtype=torch.float32) / qp.scale_tensor()))
            hi = min(hi, qp.zero_point + top)
        if lo > hi:
            raise ConversionError(f"{where}: the clamp range is empty (scale {qp.scale}, zero point {qp.zero_point})")
        return lo, hi

    # --- weights -------------------------------------------------------------------------------
    def weight(self, m: nn.Module, name: str) -> tuple[Tensor, Tensor, Tensor, IntFormat]:
        """Weight codes, per-channel scale (float32) and zero point (int32) as the weight quantizer had them."""
        q = None
        if parametrize.is_parametrized(m, "weight"):
            p = m.parametrizations.weight[0]
            q = p.quant if isinstance(p, FoldedWeight) else p
        if not isinstance(q, Quantizer) or q.spec is None:
            raise ConversionError(f"the weights of {name!r} ({type(m).__name__}) are not quantized: give the config "
                                  "a weight role with an integer format (e.g. weight: int8)")
        return weight_codes(q, folded_weight_input(m), repr(name))

    def conv_op(self, p: PendingConv, qp: QParams, out: str, lo: int, hi: int) -> ConvOp:
        return conv_op(p, qp, out, lo, hi, self.rounding, self.notes)

    def add_op(self, p: _PendingAdd, qp: QParams, out: str, lo: int, hi: int) -> AddOp:
        assert p.a is not None and p.b is not None
        return add_op(p.origin, p.a, p.b, qp, out, lo, hi, self.rounding)

    def matmul_op(self, p: _PendingMatMul, qp: QParams, out: str, lo: int, hi: int) -> MatMulOp:
        """Dyadic requantization of an activation product: ``M = S_a S_b factor / S_out``."""
        a, b = p.a, p.b
        assert a is not None and b is not None
        m0, shift = quantize_multiplier(a.qp.scale * b.qp.scale * p.factor / qp.scale)
        return MatMulOp(p.origin, [a.tensor, b.tensor], out, a.qp, b.qp, qp, m0, shift, lo, hi, factor=p.factor,
                        rounding=self.rounding)

    def affine_op(self, p: _Affine, qp: QParams, out: str, lo: int, hi: int) -> AddConstOp:
        """Tokens rescaled to ``S_out 2^-L`` plus the constants rounded once to that grid."""
        src = p.src
        assert src is not None
        m0, shift = quantize_multiplier(src.qp.scale / qp.scale)
        r = src.qp.max_abs_centred
        left = next((n for n in range(20, -1, -1) if (r << n << max(shift, 0)) <= INT32_MAX), None)
        if left is None:
            raise ConversionError(f"{p.origin!r}: input scale too far above the output scale for an integer add")
        grid = qp.scale / 2.0**left

        def on_grid(t: Tensor | None) -> Tensor:
            return torch.zeros(0, dtype=torch.int64) if t is None else round_half_away(t / grid).to(torch.int64)

        return AddConstOp(p.origin, [src.tensor], out, src.qp, qp, m0, shift, left, on_grid(p.prefix),
                          on_grid(p.offset), p.dim, lo, hi, self.rounding)

    # --- graph nodes ---------------------------------------------------------------------------
    def run(self) -> IntegerModel:
        for node in self.graph.nodes:
            getattr(self, f"_node_{node.op}")(node)
        if self.output is None or self.input_qp is None or self.input_tensor is None:
            raise ConversionError("the model has no quantized input or output")
        return IntegerModel(self.ops, self.input_tensor, self.output.tensor, self.input_qp, self.output.qp,
                            source=type(self.model).__name__, notes=self.notes, rounding=self.rounding)

    def _node_placeholder(self, node: fx.Node) -> None:
        if self.input_tensor is not None:
            raise ConversionError("convert() supports models with one tensor input")
        self.input_tensor = node.name
        self.values[node.name] = _Float(node.name)

    def _node_get_attr(self, node: fx.Node) -> None:
        obj: Any = self.model
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        if not isinstance(obj, Tensor):
            raise ConversionError(f"the model uses the attribute {node.target!r} ({type(obj).__name__}) in forward(); "
                                  "convert() supports tensor attributes only")
        self.values[node.name] = _Const(obj.detach().double().cpu(), str(node.target))

    def _node_output(self, node: fx.Node) -> None:
        arg = node.args[0]
        if not isinstance(arg, fx.Node):
            raise ConversionError("convert() supports models returning one tensor")
        v = self.values[arg.name]
        if isinstance(v, _Float):
            raise ConversionError("the model output is never quantized")
        if not isinstance(v, Codes):
            raise ConversionError(f"the model output (from {v.origin!r}) is not quantized: give {v.origin!r} an "
                                  "activation quantizer with an integer format")
        self.output = v

    def _shape_op(self, v: Value, op: Op, user: str) -> Value:
        if isinstance(v, _Float):
            return _Float(op.output, [*v.deferred, op])
        c = self.codes(v, user)
        self.emit(op)
        return Codes(op.output, c.qp, user)

    def _relu(self, v: Value, upper: float | None, name: str, own_quantizer: bool) -> Value:
        if isinstance(v, Pending):
            return v.with_relu(upper)
        c = self.codes(v, repr(name))
        if own_quantizer:
            return _PendingCodes(origin=name, src=c).with_relu(upper)
        lo, hi = self.bounds(c.qp, 0.0, upper, name)
        out = f"{name}:relu"
        self.emit(ClampOp(name, [c.tensor], out, c.qp, lo, hi))
        return Codes(out, c.qp, name)

    def _node_call_module(self, node: fx.Node) -> None:
        name = str(node.target)
        m = self.modules[name]
        user = repr(name)
        args = node.args
        v = self.value(args[0], user) if args else None
        qin = getattr(m, "precsim_input", None)
        if isinstance(qin, Quantizer) and v is not None:
            qp = self.act_qparams(qin, f"the input of {user}")
            if qp is not None:
                v = self.quantize(v, qp, f"{node.name}:in", name)
        qact = getattr(m, "precsim_activation", None)
        act_qp = self.act_qparams(qact, f"the output of {user}") if isinstance(qact, Quantizer) else None
        result: Value
        if isinstance(m, nn.Conv2d) and not isinstance(m, nn.ConvTranspose2d):
            if isinstance(m.padding, str) or m.padding_mode != "zeros":
                raise ConversionError(f"{user}: Conv2d padding {m.padding!r}/{m.padding_mode!r} is not supported; "
                                      "use numeric zero padding")
            result = self._conv(m, name, v)
        elif isinstance(m, nn.Linear):
            result = self._conv(m, name, v)
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            if not (isinstance(v, PendingConv) and v.await_bn == name):
                raise ConversionError(
                    f"BatchNorm {user} is not folded into a preceding conv: prepare with fold_bn: true (the conv's "
                    "output must feed only this BatchNorm); an integer model has no separate BatchNorm")
            v.await_bn = None
            result = v
        elif isinstance(m, RELU_MODULES):
            assert v is not None
            result = self._relu(v, 6.0 if isinstance(m, nn.ReLU6) else None, name, act_qp is not None)
        elif isinstance(m, Add):
            result = self._add(node, name)
        elif isinstance(m, MatMul):
            result = self._matmul(node, name)
        elif isinstance(m, nn.Softmax):
            result = self._shiftmax(m, name, node.name, v, act_qp)
        elif isinstance(m, nn.GELU):
            result = self._shift_gelu(name, node.name, v, act_qp)
        elif isinstance(m, nn.LayerNorm):
            result = self._i_layernorm(m, name, node.name, v, act_qp)
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            if _pair(m.output_size) != (1, 1):
                raise ConversionError(f"{user}: AdaptiveAvgPool2d supports output_size 1 only, got {m.output_size}")
            result = _PendingPool(origin=name, src=self.codes(v, user))  # type: ignore[arg-type]
        elif isinstance(m, nn.AvgPool2d):
            if _pair(m.padding) != (0, 0) or m.ceil_mode or m.divisor_override is not None:
                raise ConversionError(f"{user}: AvgPool2d supports padding=0, ceil_mode=False, no divisor_override")
            stride = _pair(m.stride) if m.stride is not None else _pair(m.kernel_size)
            result = _PendingPool(origin=name, src=self.codes(v, user),  # type: ignore[arg-type]
                                  kernel=_pair(m.kernel_size), stride=stride)
        elif isinstance(m, nn.MaxPool2d):
            if _pair(m.dilation) != (1, 1) or m.ceil_mode or m.return_indices:
                raise ConversionError(f"{user}: MaxPool2d supports dilation=1, ceil_mode=False only")
            c = self.codes(v, user)  # type: ignore[arg-type]
            stride = _pair(m.stride) if m.stride is not None else _pair(m.kernel_size)
            self.emit(MaxPoolOp(name, [c.tensor], node.name, c.qp, _pair(m.kernel_size), stride, _pair(m.padding)))
            result = Codes(node.name, c.qp, name)
        elif isinstance(m, nn.Flatten):
            result = self._shape_op(v, FlattenOp(name, [self._tensor(v)], node.name, m.start_dim, m.end_dim), user)  # type: ignore[arg-type]
        elif isinstance(m, _PASS_MODULES):
            assert v is not None
            result = v
        else:
            raise ConversionError(f"cannot convert {user}: {type(m).__name__} has no integer implementation "
                                  f"(supported: {SUPPORTED})")
        if act_qp is not None:
            result = self.quantize(result, act_qp, node.name, name)
        self.values[node.name] = result

    def _tensor(self, v: Value) -> str:
        if isinstance(v, (_Float, Codes)):
            return v.tensor
        raise ConversionError(f"the output of {v.origin!r} is used before it is quantized")

    def _conv(self, m: nn.Module, name: str, v: Value | None) -> PendingConv:
        assert v is not None
        src = self.codes(v, repr(name))
        weight, w_scale, w_zp, fmt = self.weight(m, name)
        p = m.parametrizations.weight[0]
        await_bn = None
        with torch.no_grad():
            if isinstance(p, FoldedWeight):
                await_bn = self.names_by_id.get(id(p.bn))
                bias = fold_conv_bn(m.parametrizations.weight.original, m.bias, p.bn)[1].detach().float().cpu()
            else:
                bias = m.bias.detach().float().cpu() if m.bias is not None else torch.zeros(weight.shape[0])
        return PendingConv(origin=name, module=m, src=src, weight=weight, w_scale=w_scale, w_zero_point=w_zp,
                            fmt=fmt, bias_real=bias, await_bn=await_bn)

    def _add(self, node: fx.Node, name: str) -> _PendingAdd | _Affine:
        if len(node.args) != 2 or node.kwargs:
            raise ConversionError(f"{name!r}: an add of exactly two tensors is supported")
        va, vb = self.value(node.args[0], repr(name)), self.value(node.args[1], repr(name))
        if isinstance(va, _Const) != isinstance(vb, _Const):
            const, other = (va, vb) if isinstance(va, _Const) else (vb, va)
            return self._add_const(other, const, name)  # type: ignore[arg-type]
        return _PendingAdd(origin=name, a=self.codes(va, repr(name)), b=self.codes(vb, repr(name)))

    def _add_const(self, v: Value, const: _Const, name: str) -> _Affine:
        """Codes (or codes with a class token in front) plus a constant such as a position embedding."""
        if isinstance(v, _Affine):
            aff = _Affine(origin=name, src=v.src, dim=v.dim, prefix=v.prefix, offset=v.offset)
        else:
            aff = _Affine(origin=name, src=self.codes(v, repr(name)), dim=1)
        c, d = const.tensor, aff.dim
        tokens = c
        if aff.prefix is not None:
            if c.dim() != aff.prefix.dim():
                raise ConversionError(f"{name!r}: the constant {const.origin!r} {tuple(c.shape)} and the class token "
                                      f"{tuple(aff.prefix.shape)} have different ranks")
            rows = aff.prefix.shape[d]
            if c.shape[d] == 1:  # broadcast along the token rows: every row gets it
                aff.prefix = aff.prefix + c
            else:
                aff.prefix = aff.prefix + c.narrow(d, 0, rows)
                tokens = c.narrow(d, rows, c.shape[d] - rows)
        aff.offset = tokens if aff.offset is None else aff.offset + tokens
        return aff

    def _matmul(self, node: fx.Node, name: str) -> _PendingMatMul:
        if len(node.args) != 2 or node.kwargs:
            raise ConversionError(f"{name!r}: a product of exactly two tensors is supported")
        a = self.codes(self.value(node.args[0], repr(name)), repr(name))
        b = self.codes(self.value(node.args[1], repr(name)), repr(name))
        return _PendingMatMul(origin=name, a=a, b=b)

    @staticmethod
    def _signed_out(out_qp: QParams | None, user: str, what: str) -> QParams:
        """I-ViT's GELU and LayerNorm produce signed symmetric codes: the output quantizer must be one."""
        if out_qp is None:
            raise ConversionError(f"cannot convert {user}: {what} needs an activation quantizer on its output with a "
                                  "signed symmetric integer format (e.g. int8); precsim.ivit_config adds it")
        if out_qp.zero_point != 0 or out_qp.qmin >= 0:
            raise ConversionError(f"cannot convert {user}: {what} produces signed symmetric codes (zero point 0); its "
                                  f"output quantizer is {out_qp.dtype} with zero point {out_qp.zero_point}: use a "
                                  "signed symmetric format such as int8")
        return out_qp

    def _shiftmax(self, m: nn.Softmax, name: str, out: str, v: Value | None,
                  out_qp: QParams | None) -> Codes:
        user = repr(name)
        if m.dim not in (-1,):
            raise ConversionError(f"cannot convert {user}: Softmax over dim={m.dim}; Shiftmax normalises the last "
                                  "dimension only (use dim=-1)")
        c = self.codes(v, user)  # type: ignore[arg-type]
        if out_qp is None:
            raise ConversionError(f"cannot convert {user}: Softmax (Shiftmax) needs an activation quantizer on its "
                                  "output (e.g. uint8 or uint16) to fix the output bits; precsim.ivit_config adds it")
        try:  # at 16 bits, finer than (or as fine as) any quantizer's grid on [0, 1]; one requantization follows
            k = prepare_shiftmax(c.qp.scale, 16)
        except ValueError as err:
            raise ConversionError(f"cannot convert {user}: Shiftmax: {err}") from None
        op = ShiftmaxOp.make(name, [c.tensor], f"{out}:shiftmax", c.qp, k)
        self.emit(op)
        return Codes(op.output, op.out_qp, name)  # requantized to the quantizer's scale if it differs

    def _shift_gelu(self, name: str, out: str, v: Value | None, out_qp: QParams | None) -> Codes:
        user = repr(name)
        c = self.codes(v, user)  # type: ignore[arg-type]
        if c.qp.zero_point != 0:
            raise ConversionError(f"cannot convert {user}: GELU (ShiftGELU) needs symmetric codes (zero point 0) on its "
                                  f"input; {c.origin!r} gives {c.qp.dtype} codes with zero point {c.qp.zero_point}: "
                                  "quantize it with a signed symmetric format such as int8")
        qp = self._signed_out(out_qp, user, "GELU (ShiftGELU)")
        try:
            k = prepare_shift_gelu(c.qp.scale, qp.scale, qp.qmax.bit_length() + 1)
        except ValueError as err:
            raise ConversionError(f"cannot convert {user}: ShiftGELU: {err}") from None
        self.emit(ShiftGeluOp(name, [c.tensor], out, c.qp, qp, consts_state(k)))
        return Codes(out, qp, name)

    def _i_layernorm(self, m: nn.LayerNorm, name: str, out: str, v: Value | None,
                     out_qp: QParams | None) -> Codes:
        user = repr(name)
        if len(m.normalized_shape) != 1:
            raise ConversionError(f"cannot convert {user}: LayerNorm over {tuple(m.normalized_shape)}; I-LayerNorm "
                                  "normalises the last dimension only")
        c = self.codes(v, user)  # type: ignore[arg-type]
        qp = self._signed_out(out_qp, user, "LayerNorm (I-LayerNorm)")
        in_bits = max(c.qp.qmax.bit_length(), (-c.qp.qmin - 1).bit_length() if c.qp.qmin < 0 else 0) + 1
        with torch.no_grad():  # the affine parameters as the simulation uses them (quantized if it quantizes them)
            weight = m.weight.detach().float().cpu() if m.weight is not None else None
            bias = m.bias.detach().float().cpu() if m.bias is not None else None
        try:
            k = prepare_i_layernorm(c.qp.scale, m.normalized_shape[0], qp.scale, weight, bias, eps=m.eps,
                                    in_bits=max(2, in_bits), out_bits=qp.qmax.bit_length() + 1)
        except ValueError as err:
            raise ConversionError(f"cannot convert {user}: I-LayerNorm: {err}") from None
        self.emit(ILayerNormOp(name, [c.tensor], out, c.qp, qp, consts_state(k)))
        return Codes(out, qp, name)

    def _node_call_function(self, node: fx.Node) -> None:
        fn = node.target
        where = f"{getattr(fn, '__name__', fn)} (graph node {node.name!r}{_at(node)})"
        if fn in _ADD_FUNCS:
            if "alpha" in node.kwargs:
                raise ConversionError(f"{where}: torch.add with alpha is not supported")
            result: Value = self._add(node, node.name)
        elif fn is torch.flatten:
            v = self.value(node.args[0], where)
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            result = self._shape_op(v, FlattenOp(node.name, [self._tensor(v)], node.name, int(start), int(end)), where)
        elif fn is torch.cat and any(isinstance(self.value(t, where), _Const) for t in node.args[0]):  # type: ignore[union-attr]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            result = self._cat_const([self.value(t, where) for t in node.args[0]], int(dim), node.name, where)  # type: ignore[union-attr, arg-type]
        elif fn is torch.cat:
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            cs = [self.codes(self.value(t, where), where) for t in tensors]  # type: ignore[union-attr]
            if any(c.qp != cs[0].qp for c in cs):
                raise ConversionError(f"{where}: concatenated tensors have different scales/zero points "
                                      f"({', '.join(f'{c.origin}: S={c.qp.scale:.4g}, Z={c.qp.zero_point}' for c in cs)}); "
                                      "an integer concatenation needs them to match")
            self.emit(CatOp(node.name, [c.tensor for c in cs], node.name, cs[0].qp, int(dim)))
            result = Codes(node.name, cs[0].qp, node.name)
        elif fn in RELU_FUNCS:
            result = self._relu(self.value(node.args[0], where), RELU_FUNCS[fn], node.name, False)
        elif fn in _MATMUL_FUNCS:
            result = self._matmul(node, node.name)
        elif fn in MUL_FUNCS or fn in DIV_FUNCS:
            result = self._times_constant(node, where)
        elif fn is getattr and len(node.args) == 2 and node.args[1] == "shape":
            self.value(node.args[0], where)
            result = _Shape(node.name)
        elif fn is operator.getitem:
            result = self._getitem(node, where)
        else:
            raise ConversionError(f"cannot convert {where}: no integer implementation (supported: {SUPPORTED})")
        self.values[node.name] = result

    def _cat_const(self, items: list[Value], dim: int, name: str, where: str) -> _Affine:
        """``torch.cat([constant(s), tokens])``: a class token in front of the tokens."""
        k = 0
        while k < len(items) and isinstance(items[k], _Const):
            k += 1
        consts = [c.tensor for c in items[:k]]  # type: ignore[union-attr]
        if len(items) - k != 1 or any(c.dim() != consts[0].dim() for c in consts):
            raise ConversionError(f"{where}: convert() supports constants (a class token) concatenated in front of "
                                  "one token tensor only")
        src = self.codes(items[k], where)
        d = dim % consts[0].dim()
        return _Affine(origin=name, src=src, dim=d, prefix=torch.cat(consts, dim=d))

    def _times_constant(self, node: fx.Node, where: str) -> Value:
        """``x * c`` or ``x / c`` with a positive constant: a new scale for codes, a factor for a product."""
        scaled = constant_factor(node)
        if scaled is None:
            raise ConversionError(f"cannot convert {where}: only a multiplication or division by a positive "
                                  "constant number is supported")
        x, factor = scaled
        v = self.value(x, where)
        if isinstance(v, _PendingMatMul):
            return _PendingMatMul(origin=v.origin, lower=v.lower, upper=v.upper, a=v.a, b=v.b, factor=v.factor * factor)
        cv = self.codes(v, where)
        qp = QParams(cv.qp.scale * factor, cv.qp.zero_point, cv.qp.qmin, cv.qp.qmax)
        return Codes(cv.tensor, qp, cv.origin)  # the codes are unchanged: only their scale is

    def _getitem(self, node: fx.Node, where: str) -> Value:
        base, index = self.value(node.args[0], where), node.args[1]
        if isinstance(base, _Shape):
            return _Shape(node.name)
        if isinstance(base, _Unbound):
            if isinstance(index, bool) or not isinstance(index, int):
                raise ConversionError(f"{where}: unbind() results are indexed by an integer only")
            src = base.src
            return self._shape_op(src, LayoutOp(node.name, [src.tensor], node.name, "select", [base.dim, index]), where)
        try:
            key = encode_index(index)
        except TypeError as err:
            raise ConversionError(f"cannot convert {where}: {err}; integer models support indexing by ints, slices, "
                                  "... and None") from None
        return self._shape_op(base, LayoutOp(node.name, [self._tensor(base)], node.name, "getitem", key), where)

    @staticmethod
    def _expand_const(c: _Const, sizes: tuple[Any, ...], where: str) -> _Const:
        """``const.expand(batch, -1, -1)``: the constant stays as it is and broadcasts at run time."""
        if len(sizes) == 1 and isinstance(sizes[0], (tuple, list)):
            sizes = tuple(sizes[0])
        if len(sizes) != c.tensor.dim():
            raise ConversionError(f"{where}: expand() of {c.origin!r} must keep its rank {c.tensor.dim()}")
        for size, have in zip(sizes, c.tensor.shape, strict=True):
            if isinstance(size, fx.Node) and have != 1 or isinstance(size, int) and size not in (-1, have):
                raise ConversionError(f"{where}: expand() of {c.origin!r} may only broadcast its size-1 dimensions")
        return c

    def _node_call_method(self, node: fx.Node) -> None:
        method = str(node.target)
        where = f"Tensor.{method} (graph node {node.name!r}{_at(node)})"
        v = self.value(node.args[0], where)
        if method == "flatten":
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            result: Value = self._shape_op(v, FlattenOp(node.name, [self._tensor(v)], node.name, int(start), int(end)),
                                           where)
        elif method in ("view", "reshape") and all(isinstance(a, int) for a in node.args[1:]):
            shape = tuple(int(a) for a in node.args[1:])  # type: ignore[arg-type]
            result = self._shape_op(v, ReshapeOp(node.name, [self._tensor(v)], node.name, shape), where)
        elif method == "contiguous":
            result = v
        elif method in _LAYOUT_OP_METHODS and not node.kwargs and not any(
                isinstance(a, fx.Node) for a in fx.node.map_aggregate(node.args[1:], lambda a: a)):
            result = self._shape_op(v, LayoutOp(node.name, [self._tensor(v)], node.name, method, list(node.args[1:])),
                                    where)
        elif method == "unbind" and len(node.args) <= 2 and set(node.kwargs) <= {"dim"}:
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            if isinstance(v, Pending) or not isinstance(v, (_Float, Codes)):
                self.codes(v, where)  # raises
            result = _Unbound(v, int(dim), node.name)  # type: ignore[arg-type]
        elif method == "size":
            result = _Shape(node.name)
        elif method == "expand" and isinstance(v, _Const):
            result = self._expand_const(v, node.args[1:], where)
        elif method == "relu":
            result = self._relu(v, None, node.name, False)
        else:
            raise ConversionError(f"cannot convert {where}: no integer implementation (supported: {SUPPORTED})")
        self.values[node.name] = result


def _check_accumulators(model: nn.Module) -> None:
    """The integer model sums each GEMM exactly (int32 accumulators, wide enough by construction):
    a simulation whose sums were rounded otherwise would not agree with it code for code."""
    for name, m in model.named_modules():
        if not isinstance(m, Accumulator) or m.spec is None:
            continue
        spec = m.spec
        if spec.bits is None or spec.bits < 32 or int(m.overflows) > 0:
            why = (f"{int(m.overflows)} overflow events" if spec.bits is not None and spec.bits >= 32
                   else "sums the integer model does not round")
            raise ConversionError(f"{name!r} simulates an accumulator ({spec.describe()}: {why}); the integer model "
                                  "sums every GEMM exactly in int32, so it would not agree with the simulation. "
                                  "Allowed: no accumulator, or an integer accumulator of 32 bits or more that never "
                                  "overflowed")


def _at(node: fx.Node) -> str:
    """Where a node of a torch.export capture came from (torch.fx's traces carry no source)."""
    return f", {source_line(node)}" if node.meta.get("stack_trace") else ""


def convert(model: nn.Module, example: Tensor | dict[str, Tensor] | None = None, *,
            rounding: str = "gemmlowp") -> IntegerModel:
    """Lower a prepared (QAT-trained or calibrated) model to an integer-only :class:`IntegerModel`.

    The integer model matches the simulated model in ``eval()`` mode: the same weight codes and
    activation scales, requantization by fixed-point multipliers. ``rounding``: how requantization
    rounds, ``"gemmlowp"`` (default: SaturatingRoundingDoublingHighMul then RoundingDivideByPOT,
    the double rounding of Jacob et al. and gemmlowp) or ``"single"`` (TFLite's
    ``TFLITE_SINGLE_ROUNDING``: one rounding, which plain fake quantization predicts more closely).

    A model with operand points (``points: operands``, e.g. a Hugging Face encoder prepared with
    :func:`precsim.ibert_config`) is captured with ``torch.export`` (:mod:`precsim.integer.lower`):
    ``example`` is then required, a dict of keyword inputs (one batch). A model with module-output
    points is captured with ``torch.export`` on ``example`` (one input batch; it is also run once
    so that shape-dependent constants such as global-pool multipliers are resolved and shown by
    :func:`describe`); without ``example`` it is traced with ``torch.fx``, which needs a
    ``forward()`` free of data-dependent Python.
    Raises :class:`ConversionError` naming the offending module, ValueError for an unknown ``rounding``.
    """
    _check_accumulators(model)
    mode = mode_of(model)
    if mode is not None and mode.operands:
        if not isinstance(example, dict):
            raise ConversionError(f"{type(model).__name__} has operand points: convert() captures it with "
                                  "torch.export and needs example keyword inputs, e.g. convert(model, example="
                                  "{'input_ids': ..., 'attention_mask': ...})")
        return lower(model, example, rounding=rounding)
    if isinstance(example, dict):
        raise ConversionError("example: a dict of keyword inputs is for models with operand points; this model "
                              "takes one input tensor")
    imodel = _Lowering(model, rounding, example).run()
    if example is not None:
        imodel(example[:1])
    return imodel


# --------------------------------------------------------------------------------------------
# A config that gives a model everything convert() needs
# --------------------------------------------------------------------------------------------

_SHAPE_ONLY = (nn.Flatten, *_IDENTITY_MODULES)


def integer_config(model: nn.Module, activation: Any = "uint8",
                   weight: Any = None, *, fold_bn: bool | dict[str, int] = True,
                   input: Any = None, bias: str = "int32", example_inputs: Any = None) -> dict[str, Any]:
    """A :func:`precsim.prepare` config for an integer model of ``model``.

    ``activation``/``weight`` are role values (default: uint8 activations, int8 per-channel
    weights). Adds the rules convert() needs: an ``input`` quantizer (``input``, default the
    activation format) on the first module(s) the model input reaches, and output quantizers
    for average pools and for residual adds that no ReLU follows. ``bias``: ``int32`` (default)
    rounds the simulated biases to the int32 codes the integer model adds (:mod:`precsim.qat.bias`).
    ``example_inputs``: a batch, to read the model's dataflow by torch.export instead of torch.fx
    (:func:`precsim.qat.graph.trace`).
    """
    weight = {"format": "int8", "granularity": "per_channel"} if weight is None else weight
    graph = trace(model, example_inputs)
    modules = dict(model.named_modules())
    rules: list[dict[str, Any]] = []
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    frontier, firsts = list(placeholder.users), []
    while frontier:
        node = frontier.pop(0)
        if node.op == "call_module" and isinstance(modules[node.target], _SHAPE_ONLY) or (
                node.op == "call_function" and node.target in LAYOUT_FUNCS) or (
                node.op == "call_method" and node.target in LAYOUT_METHODS):
            frontier.extend(node.users)
        elif node.op == "call_module" and str(node.target) not in firsts:
            firsts.append(str(node.target))
    for name in firsts:
        rules.append({"match": name, "input": activation if input is None else input})
    for node in graph.nodes:
        if node.op != "call_module":
            continue
        m = modules[node.target]
        needs = isinstance(m, (nn.AvgPool2d, nn.AdaptiveAvgPool2d))
        if isinstance(m, Add):
            users = list(node.users)
            relu_next = len(users) == 1 and users[0].op == "call_module" and isinstance(
                modules[users[0].target], RELU_MODULES)
            needs = not relu_next
        if needs:
            rules.append({"match": str(node.target), "activation": activation})
    return {"activation": activation, "weight": weight, "fold_bn": fold_bn, "bias": bias, "rules": rules}

