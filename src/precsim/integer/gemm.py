"""A GEMM result becomes integer ops: the conv/linear kernel and the residual add of codes.

Shared by both lowerings, :mod:`precsim.integer.convert` (module-output models, ``torch.fx``)
and :mod:`precsim.integer.lower` (operand-point models, ``torch.export``): a GEMM's result stays
pending until its consumer's quantizer fixes the output scale, and only then is the fixed-point
multiplier ``M = S_in S_w / S_out`` made.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor, fx, nn

from precsim.formats import IntFormat
from precsim.formats.integer import quantize_codes
from precsim.integer.fixedpoint import INT32_MAX, quantize_multiplier, quantize_multipliers
from precsim.integer.ops import AddOp, ConvOp, QParams, storage_dtype
from precsim.qat.bias import accumulator_scale_of, bias_codes
from precsim.qat.quantizer import Quantizer

__all__ = ["Codes", "ConversionError", "Pending", "PendingConv", "activation_qparams", "add_op", "conv_op",
           "source_line", "weight_codes"]


def source_line(node: fx.Node) -> str:
    """The user's source line a captured graph node came from (``torch.export`` records it)."""
    trace = node.meta.get("stack_trace") or ""
    lines = [ln.strip() for ln in trace.splitlines() if ln.strip().startswith("File ")]
    return lines[-1] if lines else "source unknown"


class ConversionError(ValueError):
    """The prepared model cannot become an integer model; the message names the module and why."""


@dataclass
class Codes:
    tensor: str
    qp: QParams
    origin: str


@dataclass
class Pending:
    origin: str  # the module whose result this is
    lower: float | None = None  # ReLU: 0
    upper: float | None = None  # ReLU6: 6

    def with_relu(self, upper: float | None) -> Pending:
        self.lower = 0.0
        self.upper = upper if self.upper is None else (self.upper if upper is None else min(self.upper, upper))
        return self


@dataclass
class PendingConv(Pending):
    module: nn.Module | None = None
    src: Codes | None = None
    weight: Tensor | None = None
    w_scale: Tensor | None = None
    w_zero_point: Tensor | None = None
    fmt: IntFormat | None = None
    bias_real: Tensor | None = None
    await_bn: str | None = None


def conv_op(p: PendingConv, qp: QParams, out: str, lo: int, hi: int, rounding: str, notes: list[str]) -> ConvOp:
    """The integer conv/linear of a pending GEMM result, requantized to ``qp`` (clamped to lo..hi)."""
    m, src = p.module, p.src
    assert m is not None and src is not None and p.weight is not None and p.w_scale is not None
    assert p.w_zero_point is not None and p.bias_real is not None
    if p.await_bn is not None:
        raise ConversionError(f"{p.origin!r} was prepared with fold_bn but its output reaches {out!r} before "
                              f"its BatchNorm {p.await_bn!r}")
    s_acc = accumulator_scale_of(src.qp.scale, p.w_scale)  # of the accumulator and the int32 bias: S_in S_w
    m0, shift = quantize_multipliers(s_acc / qp.scale)
    bias64 = bias_codes(p.bias_real, s_acc)  # the rule the simulation's bias: int32 uses
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
        notes.append(note)
        warnings.warn(f"precsim.convert: {note}", stacklevel=4)
    shift = shift.to(torch.int64) + pre_shift
    if bool((shift > 31).any()):
        raise ConversionError(f"{p.origin!r}: requantization multiplier out of range")
    common = dict(name=p.origin, inputs=[src.tensor], output=out, weight=p.weight, w_zero_point=p.w_zero_point,
                  bias=bias, multiplier=m0, shift=shift.to(torch.int32), in_qp=src.qp, out_qp=qp, lo=lo, hi=hi,
                  in_scale=src.qp.scale, w_scale=p.w_scale, acc_dtype=acc_dtype, acc_bound=bound,
                  pre_shift=pre_shift, rounding=rounding)
    if isinstance(m, nn.Linear):
        return ConvOp(op_type="linear", **common)  # type: ignore[arg-type]
    return ConvOp(op_type="conv2d", stride=tuple(m.stride), padding=tuple(m.padding),  # type: ignore[arg-type]
                  dilation=tuple(m.dilation), groups=m.groups, **common)


def add_op(origin: str, a: Codes, b: Codes, qp: QParams, out: str, lo: int, hi: int, rounding: str) -> AddOp:
    """The integer residual add of codes ``a`` and ``b`` into ``qp`` (clamped to lo..hi)."""
    ra_real, rb_real = a.qp.scale / qp.scale, b.qp.scale / qp.scale
    (ma, sa), (mb, sb) = quantize_multiplier(ra_real), quantize_multiplier(rb_real)
    ra, rb = a.qp.max_abs_centred, b.qp.max_abs_centred
    for left in range(20, -1, -1):
        one = 1 << left
        fits = (ra * one << max(sa, 0)) <= INT32_MAX and (rb * one << max(sb, 0)) <= INT32_MAX
        if fits and ra * one * ra_real + rb * one * rb_real + 4 <= INT32_MAX:
            break
    else:
        raise ConversionError(f"{origin!r}: input scales too far apart for an int32 residual add")
    return AddOp(origin, [a.tensor, b.tensor], out, a.qp, b.qp, qp, ma, sa, mb, sb, left, lo, hi, rounding)


def activation_qparams(q: Quantizer, where: str) -> QParams | None:
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
        raise ConversionError(f"{where} has not observed any data (no finite value yet): train the model, "
                              "or calibrate it with precsim.calibrate, before convert()")
    scale, zp = fmt.qparams(obs.min_val.cpu(), obs.max_val.cpu())
    return QParams(float(scale), int(zp), fmt.qmin, fmt.qmax)


def weight_codes(q: Quantizer, w: Tensor, where: str, per_tensor: bool = False) -> tuple[Tensor, Tensor, Tensor, IntFormat]:
    """Codes, per-row scale (float32) and zero point (int32) of the weight ``w`` as its quantizer
    ``q`` rounds it (``per_tensor``: refuse per-channel scales, e.g. for an embedding table)."""
    fmt = q.spec.format if q.spec is not None else None
    if not isinstance(fmt, IntFormat):
        raise ConversionError(f"the weights of {where} are quantized to {getattr(fmt, 'name', fmt)}, not an integer format")
    if fmt.group_size is not None or fmt.axis not in (None, 0) or (per_tensor and fmt.axis is not None):
        raise ConversionError(f"the weights of {where} use {fmt.granularity}; convert() supports "
                              + ("per-tensor" if per_tensor else "per-tensor and per-output-channel (axis 0)")
                              + " weight scales here")
    with torch.no_grad():
        w = w.detach().float().cpu()  # the integer model lives on the CPU
        obs = q.observer
        assert obs is not None
        if obs.kind == "minmax" or not bool(obs.initialized):
            lo, hi = obs.measure(w)
        else:
            lo, hi = obs.min_val.cpu(), obs.max_val.cpu()
        scale, zp = fmt.qparams(lo, hi)
        rows = w.shape[0]
        shape = (-1,) + (1,) * (w.dim() - 1)
        sb = scale.reshape(shape) if scale.dim() else scale
        zb = zp.reshape(shape) if zp.dim() else zp
        codes = quantize_codes(w, sb, zb, fmt.qmin, fmt.qmax).to(storage_dtype(fmt.qmin, fmt.qmax))
        w_scale = scale.float().expand(rows).clone() if scale.dim() == 0 else scale.float().clone()
        w_zp = zp.expand(rows).clone() if zp.dim() == 0 else zp.clone()
    return codes, w_scale, w_zp.round().to(torch.int32), fmt
