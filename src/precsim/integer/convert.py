"""convert(prepared model) -> IntegerModel: lower the simulated model to integer-only ops.

The prepared model's dataflow comes from ``torch.fx`` (module-level trace; quantizer hooks are
not traced, so their settings are read from the modules). Every value in the graph is in one of
these states while lowering:

* the model input before its quantization point (``_Float``): only shape ops may touch it;
* integer codes with a per-tensor scale and zero point (``_Codes``);
* an op whose result is not yet quantized (``_Pending*``): a conv/linear accumulator (a folded
  BatchNorm and a ReLU/ReLU6 can join it), a residual add, a window sum. It becomes integer
  codes at the next activation quantizer, which fixes the output scale: that is where the
  fixed-point multiplier ``M = S_in S_w / S_out`` and the clamp are made.

Anything else -- an unsupported module, a float or per-channel activation format, an output
nobody quantized -- raises :class:`ConversionError` naming the module.
"""

from __future__ import annotations

import operator
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.nn.utils import parametrize

from precsim.fold import FoldedWeight, fold_conv_bn, folded_weight_input, trace
from precsim.formats import IntFormat
from precsim.formats.integer import quantize_codes
from precsim.integer.fixedpoint import INT32_MAX, quantize_multiplier, quantize_multipliers
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
    storage_dtype,
)
from precsim.prepare import QuantPoint
from precsim.quantizer import Quantizer
from precsim.zoo.layers import Add

__all__ = ["ConversionError", "convert", "integer_config"]

SUPPORTED = ("Conv2d, Linear, BatchNorm (folded into the preceding conv: fold_bn), ReLU, ReLU6, "
             "precsim.zoo.Add / a + b, AvgPool2d, AdaptiveAvgPool2d(1), MaxPool2d, Flatten, torch.cat, "
             "Identity, Dropout, QuantPoint")
_PASS_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, QuantPoint)
_RELU_FUNCS = {F.relu: None, torch.relu: None, F.relu6: 6.0}
_ADD_FUNCS = (operator.add, torch.add, operator.iadd)


class ConversionError(ValueError):
    """The prepared model cannot become an integer model; the message names the module and why."""


# --------------------------------------------------------------------------------------------
# Value states while lowering
# --------------------------------------------------------------------------------------------


@dataclass
class _Float:
    """The model input, not quantized yet in the simulation; ``deferred`` shape ops wait for it."""

    tensor: str
    deferred: list[Op] = field(default_factory=list)


@dataclass
class _Codes:
    tensor: str
    qp: QParams
    origin: str


@dataclass
class _Pending:
    origin: str  # the module whose result this is
    lower: float | None = None  # ReLU: 0
    upper: float | None = None  # ReLU6: 6

    def with_relu(self, upper: float | None) -> _Pending:
        self.lower = 0.0
        self.upper = upper if self.upper is None else (self.upper if upper is None else min(self.upper, upper))
        return self


@dataclass
class _PendingConv(_Pending):
    module: nn.Module | None = None
    src: _Codes | None = None
    weight: Tensor | None = None
    w_scale: Tensor | None = None
    w_zero_point: Tensor | None = None
    fmt: IntFormat | None = None
    bias_real: Tensor | None = None
    await_bn: str | None = None


@dataclass
class _PendingAdd(_Pending):
    a: _Codes | None = None
    b: _Codes | None = None


@dataclass
class _PendingPool(_Pending):
    src: _Codes | None = None
    kernel: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None


@dataclass
class _PendingCodes(_Pending):
    """Codes with a ReLU applied, waiting for the ReLU's own quantizer (one requantization)."""

    src: _Codes | None = None


Value = _Float | _Codes | _Pending


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _round_half_away(x: Tensor) -> Tensor:
    return torch.sign(x) * torch.floor(x.abs() + 0.5)


# --------------------------------------------------------------------------------------------
# Lowering
# --------------------------------------------------------------------------------------------


class _Lowering:
    def __init__(self, model: nn.Module) -> None:
        if not any(isinstance(m, Quantizer) for m in model.modules()):
            raise ConversionError(
                f"{type(model).__name__} is not prepared: run precsim.prepare(model, config) (or precsim.calibrate) "
                "with integer formats for activations and weights first"
            )
        self.model = model
        self.modules = dict(model.named_modules())
        self.names_by_id = {id(m): n for n, m in self.modules.items()}
        self.graph = trace(model)
        self.ops: list[Op] = []
        self.values: dict[str, Value] = {}
        self.input_qp: QParams | None = None
        self.input_tensor: str | None = None
        self.output: _Codes | None = None
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
        spec = q.spec
        if spec is None:
            return None
        fmt = spec.format
        if not isinstance(fmt, IntFormat):
            raise ConversionError(f"{where} is quantized to {fmt.name}, not an integer format; convert() needs "
                                  "integer formats (e.g. int8, uint8) for activations and weights")
        if fmt.axis is not None or fmt.group_size is not None:
            raise ConversionError(f"{where} uses {fmt.name} ({fmt.granularity}); integer activations must be "
                                  "quantized per tensor")
        obs = q.observer
        if obs is None or obs.kind == "minmax":
            raise ConversionError(f"{where} uses the 'minmax' observer, which takes the range of every batch anew; "
                                  "an integer model needs a fixed range: use moving_average or running_minmax")
        if not bool(obs.initialized):
            raise ConversionError(f"{where} has not observed any data: train the model, or calibrate it with "
                                  "precsim.calibrate, before convert()")
        scale, zp = fmt.qparams(obs.min_val.cpu(), obs.max_val.cpu())
        return QParams(float(scale), int(zp), fmt.qmin, fmt.qmax)

    def codes(self, v: Value, user: str) -> _Codes:
        if isinstance(v, _Codes):
            return v
        if isinstance(v, _Float):
            raise ConversionError(
                f"the model input reaches {user} unquantized: give {user} an 'input' quantizer "
                f"(a rule {{match: {user}, input: uint8}}) or start the model with precsim.QuantPoint(); "
                "precsim.integer_config(model) writes such a config")
        raise ConversionError(
            f"the output of {v.origin!r} reaches {user} without being quantized: give {v.origin!r} an activation "
            "quantizer (a rule selecting it, e.g. {match: ..., activation: uint8}; precsim.integer_config(model) adds them)")

    # --- quantization points -------------------------------------------------------------------
    def quantize(self, v: Value, qp: QParams, out: str, where: str) -> _Codes:
        """The value ``v`` rounded to ``qp`` (an activation or input quantizer), as integer ops."""
        if isinstance(v, _Float):
            if self.input_qp is not None and self.input_qp != qp:
                raise ConversionError(f"the model input is quantized at several points with different scales "
                                      f"(again at {where}); the integer model needs one input quantization")
            self.input_qp = qp
            for op in v.deferred:
                self.emit(op)
            return _Codes(v.tensor, qp, where)
        if isinstance(v, _Codes):
            if v.qp == qp:
                return v
            m0, shift = quantize_multiplier(v.qp.scale / qp.scale)
            self.emit(RequantOp(where, [v.tensor], out, v.qp, qp, m0, shift, qp.qmin, qp.qmax))
            return _Codes(out, qp, where)
        lo, hi = self.bounds(qp, v.lower, v.upper, where)
        if isinstance(v, _PendingCodes):
            src = v.src
            assert src is not None
            if src.qp == qp:
                self.emit(ClampOp(where, [src.tensor], out, qp, lo, hi))
            else:
                m0, shift = quantize_multiplier(src.qp.scale / qp.scale)
                self.emit(RequantOp(where, [src.tensor], out, src.qp, qp, m0, shift, lo, hi))
        elif isinstance(v, _PendingConv):
            self.emit(self.conv_op(v, qp, out, lo, hi))
        elif isinstance(v, _PendingAdd):
            self.emit(self.add_op(v, qp, out, lo, hi))
        elif isinstance(v, _PendingPool):
            assert v.src is not None
            self.emit(AvgPoolOp(v.origin, [v.src.tensor], out, v.src.qp, qp, lo, hi, v.kernel, v.stride))
        else:  # pragma: no cover - every state is handled above
            raise AssertionError(type(v))
        return _Codes(out, qp, where)

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
        fmt = q.spec.format
        if not isinstance(fmt, IntFormat):
            raise ConversionError(f"the weights of {name!r} are quantized to {fmt.name}, not an integer format")
        if fmt.group_size is not None or fmt.axis not in (None, 0):
            raise ConversionError(f"the weights of {name!r} use {fmt.granularity}; convert() supports per-tensor "
                                  "and per-output-channel (axis 0) weight scales")
        with torch.no_grad():
            w = folded_weight_input(m).detach().float().cpu()  # the integer model lives on the CPU
            obs = q.observer
            assert obs is not None
            if obs.kind == "minmax" or not bool(obs.initialized):
                lo, hi = obs.measure(w)
            else:
                lo, hi = obs.min_val.cpu(), obs.max_val.cpu()
            scale, zp = fmt.qparams(lo, hi)
            cout = w.shape[0]
            shape = (-1,) + (1,) * (w.dim() - 1)
            sb = scale.reshape(shape) if scale.dim() else scale
            zb = zp.reshape(shape) if zp.dim() else zp
            codes = quantize_codes(w, sb, zb, fmt.qmin, fmt.qmax).to(storage_dtype(fmt.qmin, fmt.qmax))
            w_scale = scale.float().expand(cout).clone() if scale.dim() == 0 else scale.float().clone()
            w_zp = zp.expand(cout).clone() if zp.dim() == 0 else zp.clone()
        return codes, w_scale, w_zp.round().to(torch.int32), fmt

    def conv_op(self, p: _PendingConv, qp: QParams, out: str, lo: int, hi: int) -> ConvOp:
        m, src = p.module, p.src
        assert m is not None and src is not None and p.weight is not None and p.w_scale is not None
        assert p.w_zero_point is not None and p.bias_real is not None
        if p.await_bn is not None:
            raise ConversionError(f"{p.origin!r} was prepared with fold_bn but its output reaches {out!r} before "
                                  f"its BatchNorm {p.await_bn!r}")
        s_in = torch.tensor(src.qp.scale, dtype=torch.float64)
        s_acc = s_in * p.w_scale.double()  # scale of the accumulator and of the int32 bias: S_in S_w
        m0, shift = quantize_multipliers(s_acc / qp.scale)
        bias64 = _round_half_away(p.bias_real.double() / s_acc)
        if bool((bias64.abs() > INT32_MAX).any()):
            raise ConversionError(f"{p.origin!r}: the bias does not fit int32 at scale S_in*S_w "
                                  f"(max |bias/scale| = {float(bias64.abs().max()):.3g})")
        bias = bias64.to(torch.int32)
        # Worst-case accumulator magnitudes: the centred sum and the raw-code matmul of the kernel.
        cout = p.weight.shape[0]
        w64 = p.weight.to(torch.int64).reshape(cout, -1)
        z2 = p.w_zero_point.to(torch.int64)
        k = w64.shape[1]
        b64 = bias.to(torch.int64)
        centred = src.qp.max_abs_centred * (w64 - z2[:, None]).abs().sum(1) + b64.abs()
        q1max = max(abs(src.qp.qmin), abs(src.qp.qmax))
        z1 = src.qp.zero_point
        offset = k * z1 * z2 - z1 * w64.sum(1) + b64
        raw = q1max * w64.abs().sum(1) + z2.abs() * k * q1max + offset.abs()
        bound = int(centred.max())
        worst = max(bound, int(raw.max()))
        acc_dtype, pre_shift = "int32", 0
        if worst > INT32_MAX:
            acc_dtype = "int64"
            pre_shift = max(0, bound.bit_length() - 30) if bound > INT32_MAX else 0
            note = (f"{p.origin}: worst-case accumulator {worst} exceeds int32 ({k} products of "
                    f"{src.qp.bits}-bit x {p.fmt.bits if p.fmt else '?'}-bit codes); accumulating in int64"
                    + (f", rounding {pre_shift} bits off before requantization" if pre_shift else ""))
            self.notes.append(note)
            warnings.warn(f"precsim.convert: {note}", stacklevel=4)
        shift = shift.to(torch.int64) + pre_shift
        if bool((shift > 31).any()):
            raise ConversionError(f"{p.origin!r}: requantization multiplier out of range")
        common = dict(name=p.origin, inputs=[src.tensor], output=out, weight=p.weight, w_zero_point=p.w_zero_point,
                      bias=bias, multiplier=m0, shift=shift.to(torch.int32), in_qp=src.qp, out_qp=qp, lo=lo, hi=hi,
                      in_scale=src.qp.scale, w_scale=p.w_scale, acc_dtype=acc_dtype, acc_bound=bound,
                      pre_shift=pre_shift)
        if isinstance(m, nn.Linear):
            return ConvOp(op_type="linear", **common)  # type: ignore[arg-type]
        return ConvOp(op_type="conv2d", stride=tuple(m.stride), padding=tuple(m.padding),  # type: ignore[arg-type]
                      dilation=tuple(m.dilation), groups=m.groups, **common)

    def add_op(self, p: _PendingAdd, qp: QParams, out: str, lo: int, hi: int) -> AddOp:
        a, b = p.a, p.b
        assert a is not None and b is not None
        ra_real, rb_real = a.qp.scale / qp.scale, b.qp.scale / qp.scale
        (ma, sa), (mb, sb) = quantize_multiplier(ra_real), quantize_multiplier(rb_real)
        ra, rb = a.qp.max_abs_centred, b.qp.max_abs_centred
        for left in range(20, -1, -1):
            one = 1 << left
            fits = (ra * one << max(sa, 0)) <= INT32_MAX and (rb * one << max(sb, 0)) <= INT32_MAX
            if fits and ra * one * ra_real + rb * one * rb_real + 4 <= INT32_MAX:
                break
        else:
            raise ConversionError(f"{p.origin!r}: input scales too far apart for an int32 residual add")
        return AddOp(p.origin, [a.tensor, b.tensor], out, a.qp, b.qp, qp, ma, sa, mb, sb, left, lo, hi)

    # --- graph nodes ---------------------------------------------------------------------------
    def run(self) -> IntegerModel:
        for node in self.graph.nodes:
            getattr(self, f"_node_{node.op}")(node)
        if self.output is None or self.input_qp is None or self.input_tensor is None:
            raise ConversionError("the model has no quantized input or output")
        return IntegerModel(self.ops, self.input_tensor, self.output.tensor, self.input_qp, self.output.qp,
                            source=type(self.model).__name__, notes=self.notes)

    def _node_placeholder(self, node: fx.Node) -> None:
        if self.input_tensor is not None:
            raise ConversionError("convert() supports models with one tensor input")
        self.input_tensor = node.name
        self.values[node.name] = _Float(node.name)

    def _node_get_attr(self, node: fx.Node) -> None:
        raise ConversionError(f"the model uses the tensor attribute {node.target!r} directly in forward(); "
                              f"convert() supports module calls only ({SUPPORTED})")

    def _node_output(self, node: fx.Node) -> None:
        arg = node.args[0]
        if not isinstance(arg, fx.Node):
            raise ConversionError("convert() supports models returning one tensor")
        v = self.values[arg.name]
        if isinstance(v, _Float):
            raise ConversionError("the model output is never quantized")
        if not isinstance(v, _Codes):
            raise ConversionError(f"the model output (from {v.origin!r}) is not quantized: give {v.origin!r} an "
                                  "activation quantizer with an integer format")
        self.output = v

    def _shape_op(self, v: Value, op: Op, user: str) -> Value:
        if isinstance(v, _Float):
            return _Float(op.output, [*v.deferred, op])
        c = self.codes(v, user)
        self.emit(op)
        return _Codes(op.output, c.qp, user)

    def _relu(self, v: Value, upper: float | None, name: str, own_quantizer: bool) -> Value:
        if isinstance(v, _Pending):
            return v.with_relu(upper)
        c = self.codes(v, repr(name))
        if own_quantizer:
            return _PendingCodes(origin=name, src=c).with_relu(upper)
        lo, hi = self.bounds(c.qp, 0.0, upper, name)
        out = f"{name}:relu"
        self.emit(ClampOp(name, [c.tensor], out, c.qp, lo, hi))
        return _Codes(out, c.qp, name)

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
            if not (isinstance(v, _PendingConv) and v.await_bn == name):
                raise ConversionError(
                    f"BatchNorm {user} is not folded into a preceding conv: prepare with fold_bn: true (the conv's "
                    "output must feed only this BatchNorm); an integer model has no separate BatchNorm")
            v.await_bn = None
            result = v
        elif isinstance(m, (nn.ReLU, nn.ReLU6)):
            assert v is not None
            result = self._relu(v, 6.0 if isinstance(m, nn.ReLU6) else None, name, act_qp is not None)
        elif isinstance(m, Add):
            result = self._add(node, name)
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
            result = _Codes(node.name, c.qp, name)
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
        if isinstance(v, (_Float, _Codes)):
            return v.tensor
        raise ConversionError(f"the output of {v.origin!r} is used before it is quantized")

    def _conv(self, m: nn.Module, name: str, v: Value | None) -> _PendingConv:
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
        return _PendingConv(origin=name, module=m, src=src, weight=weight, w_scale=w_scale, w_zero_point=w_zp,
                            fmt=fmt, bias_real=bias, await_bn=await_bn)

    def _add(self, node: fx.Node, name: str) -> _PendingAdd:
        if len(node.args) != 2 or node.kwargs:
            raise ConversionError(f"{name!r}: an add of exactly two tensors is supported")
        a = self.codes(self.value(node.args[0], repr(name)), repr(name))
        b = self.codes(self.value(node.args[1], repr(name)), repr(name))
        return _PendingAdd(origin=name, a=a, b=b)

    def _node_call_function(self, node: fx.Node) -> None:
        fn = node.target
        where = f"{getattr(fn, '__name__', fn)} (graph node {node.name!r})"
        if fn in _ADD_FUNCS:
            if "alpha" in node.kwargs:
                raise ConversionError(f"{where}: torch.add with alpha is not supported")
            result: Value = self._add(node, node.name)
        elif fn is torch.flatten:
            v = self.value(node.args[0], where)
            start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
            end = node.args[2] if len(node.args) > 2 else node.kwargs.get("end_dim", -1)
            result = self._shape_op(v, FlattenOp(node.name, [self._tensor(v)], node.name, int(start), int(end)), where)
        elif fn is torch.cat:
            tensors = node.args[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            cs = [self.codes(self.value(t, where), where) for t in tensors]  # type: ignore[union-attr]
            if any(c.qp != cs[0].qp for c in cs):
                raise ConversionError(f"{where}: concatenated tensors have different scales/zero points "
                                      f"({', '.join(f'{c.origin}: S={c.qp.scale:.4g}, Z={c.qp.zero_point}' for c in cs)}); "
                                      "an integer concatenation needs them to match")
            self.emit(CatOp(node.name, [c.tensor for c in cs], node.name, cs[0].qp, int(dim)))
            result = _Codes(node.name, cs[0].qp, node.name)
        elif fn in _RELU_FUNCS:
            result = self._relu(self.value(node.args[0], where), _RELU_FUNCS[fn], node.name, False)
        else:
            raise ConversionError(f"cannot convert {where}: no integer implementation (supported: {SUPPORTED})")
        self.values[node.name] = result

    def _node_call_method(self, node: fx.Node) -> None:
        method = str(node.target)
        where = f"Tensor.{method} (graph node {node.name!r})"
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
        elif method == "relu":
            result = self._relu(v, None, node.name, False)
        else:
            raise ConversionError(f"cannot convert {where}: no integer implementation (supported: {SUPPORTED})")
        self.values[node.name] = result


def convert(model: nn.Module, example: Tensor | None = None) -> IntegerModel:
    """Lower a prepared (QAT-trained or calibrated) model to an integer-only :class:`IntegerModel`.

    The integer model matches the simulated model in ``eval()`` mode: the same weight codes and
    activation scales, requantization by fixed-point multipliers. ``example`` (optional): one
    input batch run once so shape-dependent constants (global-pool multipliers) are resolved
    and shown by :func:`describe`. Raises :class:`ConversionError` naming the offending module.
    """
    imodel = _Lowering(model).run()
    if example is not None:
        imodel(example[:1])
    return imodel


# --------------------------------------------------------------------------------------------
# A config that gives a model everything convert() needs
# --------------------------------------------------------------------------------------------

_SHAPE_ONLY = (nn.Flatten, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)


def integer_config(model: nn.Module, activation: Any = "uint8",
                   weight: Any = None, *, fold_bn: bool | dict[str, int] = True,
                   input: Any = None) -> dict[str, Any]:
    """A :func:`precsim.prepare` config for an integer model of ``model``.

    ``activation``/``weight`` are role values (default: uint8 activations, int8 per-channel
    weights). Adds the rules convert() needs: an ``input`` quantizer (``input``, default the
    activation format) on the first module(s) the model input reaches, and output quantizers
    for average pools and for residual adds that no ReLU follows.
    """
    weight = {"format": "int8", "granularity": "per_channel"} if weight is None else weight
    graph = trace(model)
    modules = dict(model.named_modules())
    rules: list[dict[str, Any]] = []
    placeholder = next(n for n in graph.nodes if n.op == "placeholder")
    frontier, firsts = list(placeholder.users), []
    while frontier:
        node = frontier.pop(0)
        if node.op == "call_module" and isinstance(modules[node.target], _SHAPE_ONLY) or (
                node.op == "call_function" and node.target is torch.flatten) or (
                node.op == "call_method" and node.target in ("flatten", "view", "reshape", "contiguous")):
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
                modules[users[0].target], (nn.ReLU, nn.ReLU6))
            needs = not relu_next
        if needs:
            rules.append({"match": str(node.target), "activation": activation})
    return {"activation": activation, "weight": weight, "fold_bn": fold_bn, "rules": rules}

