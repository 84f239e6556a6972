"""The integer operations an :class:`~precsim.integer.model.IntegerModel` is made of.

Each op holds only integer constants (codes, int32 bias, fixed-point multipliers ``M0`` and
shifts, zero points, clamp bounds) and has two implementations:

* :meth:`Op.run`: the integer kernel. Integer tensors only (int8/uint8 storage, int32 or int64
  arithmetic), feature maps channels-last (NHWC) so a conv is an integer matmul over
  ``(positions, C*kh*kw)`` columns with the zero-point terms of Jacob et al. (eq. 7-8)
  precomputed: ``acc = sum q1 q2 - Z2 sum q1 + (K Z1 Z2 - Z1 sum q2 + bias)``.
* :meth:`Op.reference`: the same integer maths computed another way, for the fixed-point
  simulation (:func:`~precsim.integer.exact.integer_exact`): channels-first, the centred
  products ``sum (q1 - Z1)(q2 - Z2)`` through torch's float64 conv/linear/pooling (exact: every
  partial sum is an integer below 2^53, checked), the same fixed-point requantization.

Requantization is always ``clamp(Z3 + MultiplyByQuantizedMultiplier(acc, M0, shift))`` from
:mod:`precsim.integer.fixedpoint`, in the op's ``rounding`` mode: ``"gemmlowp"``
(SaturatingRoundingDoublingHighMul, then RoundingDivideByPOT) or ``"single"`` (TFLite's single
rounding). Every rounding right shift of an op (the residual add's final ``>> L``, the rounding
of int64 accumulators) follows the same mode. ReLU/ReLU6 are folded into the clamp bounds.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from precsim.integer.fixedpoint import (
    INT32_MAX,
    INT32_MIN,
    check_requant_rounding,
    multiply_by_quantized_multiplier,
    quantize_multiplier,
    requantize,
    shift_right_rounded,
)

__all__ = [
    "OPS",
    "AddOp",
    "AvgPoolOp",
    "CatOp",
    "ClampOp",
    "ConvOp",
    "FlattenOp",
    "MaxPoolOp",
    "Op",
    "QParams",
    "RequantOp",
    "ReshapeOp",
    "op_from_state",
    "register_op",
    "requant_row",
    "storage_dtype",
    "to_nchw",
    "to_nhwc",
]

_EXACT = 2**53  # float64 holds every integer below this exactly
_CHUNK_BYTES = 1 << 26  # im2col columns are built in chunks of at most 64 MiB


def storage_dtype(qmin: int, qmax: int) -> torch.dtype:
    """The narrowest torch integer dtype holding ``qmin..qmax`` (uint8, int8, int16, int32)."""
    if qmin >= 0 and qmax <= 255:
        return torch.uint8
    if qmin >= -128 and qmax <= 127:
        return torch.int8
    if qmin >= -(2**15) and qmax < 2**15:
        return torch.int16
    return torch.int32


def to_nhwc(x: Tensor) -> Tensor:
    """4-D NCHW -> NHWC (contiguous); other ranks unchanged."""
    return x.permute(0, 2, 3, 1).contiguous() if x.dim() == 4 else x


def to_nchw(x: Tensor) -> Tensor:
    """4-D NHWC -> NCHW (contiguous); other ranks unchanged."""
    return x.permute(0, 3, 1, 2).contiguous() if x.dim() == 4 else x


@dataclass(frozen=True)
class QParams:
    """Per-tensor affine integer quantization: real = scale * (code - zero_point)."""

    scale: float  # a float32 value, stored exactly as a Python float
    zero_point: int
    qmin: int
    qmax: int

    @property
    def dtype(self) -> torch.dtype:
        return storage_dtype(self.qmin, self.qmax)

    @property
    def bits(self) -> int:
        return (self.qmax - self.qmin).bit_length()

    @property
    def max_abs_centred(self) -> int:
        """max |q - Z| over the code range."""
        return max(abs(self.qmin - self.zero_point), abs(self.qmax - self.zero_point))

    def scale_tensor(self) -> Tensor:
        return torch.tensor(self.scale, dtype=torch.float32)

    def state(self) -> list[float | int]:
        return [self.scale, self.zero_point, self.qmin, self.qmax]

    @classmethod
    def from_state(cls, s: list[float | int]) -> QParams:
        return cls(float(s[0]), int(s[1]), int(s[2]), int(s[3]))


def _exact_int(x: Tensor, where: str) -> Tensor:
    """float64 tensor of integer values -> int64, refusing anything that was not exact."""
    if x.numel() and float(x.abs().max()) >= _EXACT:
        raise OverflowError(f"{where}: float64 reference sum reached 2^53; it would not be exact")
    r = torch.round(x)
    if not torch.equal(r, x):
        raise AssertionError(f"{where}: float64 reference sum is not an integer")
    return r.to(torch.int64)


def _requant(acc: Tensor, m0: Tensor | int, shift: Tensor | int, pre_shift: int, zp: int, lo: int, hi: int,
             axis: int | None, rounding: str = "gemmlowp") -> Tensor:
    """Reference requantization by :mod:`fixedpoint` (int32 out); ``pre_shift`` rounds int64 sums first."""
    if pre_shift:
        acc = shift_right_rounded(acc.to(torch.int64), pre_shift, rounding)
    return requantize(acc.to(torch.int32), m0, shift, zp, lo, hi, axis=axis, rounding=rounding)


class FixedPointMultiplier:
    """``MultiplyByQuantizedMultiplier`` fused into a few int64 passes, for the integer kernels.

    Bit-identical to :func:`fixedpoint.multiply_by_quantized_multiplier` in the same ``rounding``
    mode for ``M0 >= 0`` (tested).

    ``"gemmlowp"``: ``SRDHM(a, M0) = (a M0 + 2^30) >> 31`` (C's truncating division with
    gemmlowp's nudge equals this flooring shift for both signs),
    ``RoundingDivideByPOT(h, e) = (h + 2^(e-1) - [h < 0]) >> e``, and the two shifts compose: with
    ``p = a M0`` and ``e >= 1`` the result is ``(p + 2^30 + 2^(e-1) 2^31 - [p < -2^30] 2^31) >> (31 + e)``.

    ``"single"``: ``(x M0 + 2^(t-1)) >> t`` with ``t = 31 - shift`` (0 where ``t >= 63``), saturated
    to int32 when a left shift (``shift > 0``) could leave its range.

    ``m0``/``shift`` are ints or per-channel vectors broadcast along the last dimension.
    """

    def __init__(self, m0: Tensor | int, shift: Tensor | int, rounding: str = "gemmlowp") -> None:
        m = torch.as_tensor(m0).to(torch.int64)
        s = torch.as_tensor(shift).to(torch.int64)
        if bool((m < 0).any()):
            raise ValueError("FixedPointMultiplier needs M0 >= 0")
        self.rounding = check_requant_rounding(rounding)
        if self.rounding == "single":
            t = 31 - s
            far = t > 62  # |x M0| < 2^62 <= 2^(t-1): rounds to 0
            self.m0 = torch.where(far, torch.zeros_like(m), m)
            self.total_shift = torch.where(far, torch.zeros_like(t), t)
            self.add = torch.where(self.total_shift > 0, torch.bitwise_left_shift(
                torch.ones_like(t), torch.clamp(self.total_shift - 1, min=0)), 0)
            self.saturate = bool((s > 0).any())
            return
        self.m0 = m
        self.left = torch.clamp(s, min=0)
        right = torch.clamp(-s, min=0)
        self.any_left = bool((self.left > 0).any())
        self.fused = bool((right >= 1).all()) and bool((right <= 31).all())
        if self.fused:
            half = torch.bitwise_left_shift(torch.ones_like(right), right - 1)
            self.add_pos = (1 << 30) + half * (1 << 31)
            self.add_neg = self.add_pos - (1 << 31)
            self.total_shift = right + 31
        else:
            self.right = right
            self.half = torch.where(right > 0, torch.bitwise_left_shift(torch.ones_like(right),
                                                                        torch.clamp(right - 1, min=0)), 0)
            self.nonzero = (right > 0).to(torch.int64)

    def __call__(self, x: Tensor) -> Tensor:
        """``x`` (int32-range values, any integer dtype) -> int64 ``x * M0 * 2^(shift - 31)``, rounded."""
        v = x.to(torch.int64)
        if self.rounding == "single":
            v = (v * self.m0).add_(self.add).bitwise_right_shift_(self.total_shift)
            return v.clamp_(INT32_MIN, INT32_MAX) if self.saturate else v
        if self.any_left:
            v = torch.clamp(torch.bitwise_left_shift(v, self.left), INT32_MIN, INT32_MAX)
        v = v * self.m0  # |a M0| <= 2^62
        if self.fused:
            v += torch.where(v < -(1 << 30), self.add_neg, self.add_pos)
            return v.bitwise_right_shift_(self.total_shift)
        v.add_(1 << 30).bitwise_right_shift_(31)  # SRDHM
        neg = (v < 0).to(torch.int64) * self.nonzero
        v.add_(self.half).sub_(neg).bitwise_right_shift_(self.right)  # RoundingDivideByPOT
        return v


def _requant_fast(acc: Tensor, mult: FixedPointMultiplier | None, pre_shift: int, zp: int, lo: int, hi: int,
                  dtype: torch.dtype, rounding: str = "gemmlowp") -> Tensor:
    """The integer kernels' requantization: same results as :func:`_requant`, fewer passes."""
    if pre_shift:  # the int64 sum >> pre_shift, rounded as fixedpoint.shift_right_rounded
        acc = acc.to(torch.int64) + (1 << (pre_shift - 1))
        if rounding == "gemmlowp":  # RoundingDivideByPOT: ties away from zero
            acc -= (acc < (1 << (pre_shift - 1))).to(torch.int64)
        acc = acc >> pre_shift
    v = acc.to(torch.int64) if mult is None else mult(acc)  # None: the sum is already at the output scale
    v.add_(zp).clamp_(lo, hi)
    return v.to(dtype)



class Op:
    """One integer operation: ``inputs`` (tensor names) -> ``output`` (a tensor name)."""

    kind: ClassVar[str] = ""
    name: str
    inputs: list[str]
    output: str

    def run(self, *xs: Tensor, record: list[tuple[str, str, Tensor]] | None = None) -> Tensor:
        raise NotImplementedError

    def reference(self, *xs: Tensor) -> Tensor:
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """The constructor's arguments as plain values (``init=False`` fields are caches rebuilt on load)."""
        out: dict[str, Any] = {"kind": self.kind}
        for f in fields(self):  # type: ignore[arg-type]
            if not f.init:
                continue
            v = getattr(self, f.name)
            out[f.name] = v.state() if isinstance(v, QParams) else v
        return out

    def describe_row(self) -> dict[str, str]:
        return {}

    def nbytes(self) -> int:
        """Bytes of constants the op keeps (weights, biases, multipliers)."""
        total = 0
        for f in fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                total += v.numel() * v.element_size()
        return total


def _rec(record: list[tuple[str, str, Tensor]] | None, op: Op, what: str, t: Tensor) -> None:
    if record is not None:
        record.append((op.name, what, t))


def requant_row(in_qp: QParams, out_qp: QParams, lo: int, hi: int) -> dict[str, str]:
    """The :func:`describe` columns every one-input requantizing op shares: dtypes, zero points, scales, clamp."""
    return {
        "in": str(in_qp.dtype).replace("torch.", ""), "out": str(out_qp.dtype).replace("torch.", ""),
        "Z_in": str(in_qp.zero_point), "Z_out": str(out_qp.zero_point),
        "S_in": f"{in_qp.scale:.4g}", "S_out": f"{out_qp.scale:.4g}", "clamp": f"{lo}..{hi}",
    }


def _fmt_vec(t: Tensor) -> str:
    t = t.flatten()
    if t.numel() == 1 or bool((t == t[0]).all()):
        return f"{t[0].item():.4g}" if t.dtype.is_floating_point else str(t[0].item())
    if t.dtype.is_floating_point:
        return f"[{t.min().item():.4g}..{t.max().item():.4g}]x{t.numel()}"
    return f"[{t.min().item()}..{t.max().item()}]x{t.numel()}"


# --------------------------------------------------------------------------------------------
# Conv / Linear
# --------------------------------------------------------------------------------------------


@dataclass
class ConvOp(Op):
    """Integer conv2d or linear with int32 bias, per-channel fixed-point requantization and clamp.

    ``weight``: integer codes, ``(Cout, Cin/groups, kh, kw)`` or ``(Cout, K)``; ``w_zero_point``
    and ``bias`` (int32, scale S_in * S_w, zero point 0), ``multiplier`` (M0) and ``shift`` are
    per output channel. ``acc_dtype`` is ``int32`` unless the worst case ``acc_bound`` overflows
    it; then ``int64`` with a rounding ``pre_shift`` before requantization (already added into
    ``shift``). ``rounding``: the requantization mode (:data:`~precsim.integer.fixedpoint.REQUANT_ROUNDINGS`).
    """

    kind: ClassVar[str] = "conv"
    name: str
    inputs: list[str]
    output: str
    op_type: str  # "conv2d" | "linear"
    weight: Tensor
    w_zero_point: Tensor
    bias: Tensor
    multiplier: Tensor
    shift: Tensor
    in_qp: QParams
    out_qp: QParams
    lo: int
    hi: int
    in_scale: float
    w_scale: Tensor
    acc_dtype: str = "int32"
    acc_bound: int = 0
    pre_shift: int = 0
    stride: tuple[int, ...] = (1, 1)
    padding: tuple[int, ...] = (0, 0)
    dilation: tuple[int, ...] = (1, 1)
    groups: int = 1
    rounding: str = "gemmlowp"
    _w_mat: Tensor = field(init=False, repr=False, compare=False)
    _offset: Tensor = field(init=False, repr=False, compare=False)
    _has_wzp: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.stride, self.padding, self.dilation = tuple(self.stride), tuple(self.padding), tuple(self.dilation)
        acc_t = torch.int64 if self.acc_dtype == "int64" else torch.int32
        w = self.weight.to(torch.int64)
        cout = w.shape[0]
        g = self.groups
        k = w[0].numel()  # per output channel
        # Precomputed zero-point terms (Jacob et al. eq. 8): K Z1 Z2 - Z1 sum_k q2 + bias.
        z1 = self.in_qp.zero_point
        z2 = self.w_zero_point.to(torch.int64).reshape(cout)
        offset = k * z1 * z2 - z1 * w.reshape(cout, -1).sum(1) + self.bias.to(torch.int64)
        self._offset = offset.to(acc_t)
        self._has_wzp = bool((z2 != 0).any())
        # (groups, K, Cout/groups) with K ordered (C, kh, kw), as the im2col columns; a transposed
        # view of a (Cout/groups, K) block: torch's integer matmul runs 3-5x faster with K contiguous.
        self._w_mat = w.reshape(g, cout // g, k).contiguous().to(acc_t).transpose(1, 2)
        self._mult = FixedPointMultiplier(self.multiplier, self.shift, self.rounding)

    def nbytes(self) -> int:
        keep = (self.weight, self.w_zero_point, self.bias, self.multiplier, self.shift)
        return sum(t.numel() * t.element_size() for t in keep)

    # --- integer kernel ------------------------------------------------------------------------
    def _columns(self, x: Tensor) -> tuple[Tensor, tuple[int, int, int]]:
        """im2col of NHWC codes: ``(N*OH*OW, C*kh*kw)`` and the output shape (N, OH, OW)."""
        n, h, w, c = x.shape
        kh, kw = self.weight.shape[2], self.weight.shape[3]
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        if ph or pw:  # pad with the input zero point: the code of real 0
            x = F.pad(x, (0, 0, pw, pw, ph, ph), value=self.in_qp.zero_point)
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        if dh == 1 and dw == 1:
            cols = x.unfold(1, kh, sh).unfold(2, kw, sw)  # (N, OH, OW, C, kh, kw), a view
        else:
            taps = [x[:, i * dh: i * dh + sh * (oh - 1) + 1: sh, j * dw: j * dw + sw * (ow - 1) + 1: sw, :]
                    for i in range(kh) for j in range(kw)]
            cols = torch.stack(taps, dim=-1)  # (N, OH, OW, C, kh*kw)
        return cols.reshape(n * oh * ow, c * kh * kw), (n, oh, ow)

    def _matmul(self, cols: Tensor) -> Tensor:
        """acc = cols @ W - Z2 * rowsum(cols) + offset, per group; ``cols`` in the acc dtype."""
        g = self.groups
        if g == 1:
            acc = cols @ self._w_mat[0]
            if self._has_wzp:
                acc -= cols.sum(1, keepdim=True) * self.w_zero_point.to(acc.dtype)
        else:
            m = cols.shape[0]
            cg = cols.reshape(m, g, -1).transpose(0, 1)  # (g, M, Kg)
            acc = torch.matmul(cg, self._w_mat)  # (g, M, Cout/g)
            if self._has_wzp:
                z2 = self.w_zero_point.to(acc.dtype).reshape(g, 1, -1)
                acc -= cg.sum(2, keepdim=True) * z2
            acc = acc.transpose(0, 1).reshape(m, -1)
        return acc + self._offset

    def run(self, x: Tensor, record: list[tuple[str, str, Tensor]] | None = None) -> Tensor:
        acc_t = torch.int64 if self.acc_dtype == "int64" else torch.int32
        if self.op_type == "linear":
            lead = x.shape[:-1]
            acc = self._matmul(x.reshape(-1, x.shape[-1]).to(acc_t))
            _rec(record, self, "accumulator", acc)
            out = _requant_fast(acc, self._mult, self.pre_shift, self.out_qp.zero_point, self.lo, self.hi,
                                self.out_qp.dtype, self.rounding)
            return out.reshape(*lead, -1)
        n = x.shape[0]
        per_image = max(1, x[0].numel() * self.weight[0].numel() * 8 // max(1, x.shape[-1]))
        step = max(1, _CHUNK_BYTES // per_image)
        outs = []
        for start in range(0, n, step):
            cols, (b, oh, ow) = self._columns(x[start:start + step].to(acc_t))
            acc = self._matmul(cols)
            _rec(record, self, "accumulator", acc)
            out = _requant_fast(acc, self._mult, self.pre_shift, self.out_qp.zero_point, self.lo, self.hi,
                                self.out_qp.dtype, self.rounding)
            outs.append(out.reshape(b, oh, ow, -1))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    # --- float64 reference ---------------------------------------------------------------------
    def reference(self, x: Tensor) -> Tensor:
        xc = (x.to(torch.int64) - self.in_qp.zero_point).double()
        shape = (-1,) + (1,) * (self.weight.dim() - 1)
        wc = (self.weight.to(torch.int64) - self.w_zero_point.to(torch.int64).reshape(shape)).double()
        if self.op_type == "linear":
            acc = F.linear(xc, wc)
        else:  # F.unfold + a float64 matmul per group (torch's float64 dilated conv is very slow)
            n, _, h, w = xc.shape
            cout, cg, kh, kw = wc.shape
            (sh, sw), (ph, pw), (dh, dw), g = self.stride, self.padding, self.dilation, self.groups
            oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
            ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
            cols = F.unfold(xc, (kh, kw), self.dilation, self.padding, self.stride)  # (N, C*kh*kw, L)
            cols = cols.reshape(n, g, cg * kh * kw, oh * ow)
            acc = torch.matmul(wc.reshape(g, cout // g, -1), cols).reshape(n, cout, oh, ow)
        bshape = (-1, 1, 1) if self.op_type == "conv2d" else (-1,)
        acc = _exact_int(acc + self.bias.double().reshape(bshape), self.name)
        if self.acc_dtype == "int32" and acc.numel() and int(acc.abs().max()) > INT32_MAX:
            raise OverflowError(f"{self.name}: accumulator overflowed int32 despite the bound")
        axis = 1 if self.op_type == "conv2d" else -1
        out = _requant(acc, self.multiplier, self.shift, self.pre_shift, self.out_qp.zero_point,
                       self.lo, self.hi, axis=axis, rounding=self.rounding)
        return out.to(torch.int64)

    def describe_row(self) -> dict[str, str]:
        return {
            "op": self.op_type, "in": str(self.in_qp.dtype).replace("torch.", ""),
            "weight": str(self.weight.dtype).replace("torch.", "") + ("/ch" if self.w_scale.numel() > 1 else ""),
            "acc": self.acc_dtype + (f" (>>{self.pre_shift})" if self.pre_shift else ""),
            "out": str(self.out_qp.dtype).replace("torch.", ""),
            "M0": _fmt_vec(self.multiplier), "n": _fmt_vec(-self.shift),
            "Z_in": str(self.in_qp.zero_point), "Z_w": _fmt_vec(self.w_zero_point), "Z_out": str(self.out_qp.zero_point),
            "S_in": f"{self.in_scale:.4g}", "S_w": _fmt_vec(self.w_scale), "S_out": f"{self.out_qp.scale:.4g}",
            "clamp": f"{self.lo}..{self.hi}",
        }


# --------------------------------------------------------------------------------------------
# Element-wise: residual add, requantize, clamp
# --------------------------------------------------------------------------------------------


@dataclass
class AddOp(Op):
    """Residual add: both inputs rescaled to the output scale with ``left_shift`` extra bits.

    ``a' = MBQM((a - Za) << L, Ma0, sa)`` (Ma = Sa / S_out, likewise b), then
    ``q = clamp(Z_out + RoundingDivideByPOT(a' + b', L))``: one final rounding of an almost exact
    sum, as TFLite's quantized add (which uses L = 20). With ``rounding="single"`` the rescaling
    and the final ``>> L`` round once each, ties toward +inf (TFLite's single-rounding add).
    """

    kind: ClassVar[str] = "add"
    name: str
    inputs: list[str]
    output: str
    a_qp: QParams
    b_qp: QParams
    out_qp: QParams
    a_multiplier: int
    a_shift: int
    b_multiplier: int
    b_shift: int
    left_shift: int
    lo: int
    hi: int
    rounding: str = "gemmlowp"

    def __post_init__(self) -> None:
        self._ma = FixedPointMultiplier(self.a_multiplier, self.a_shift, self.rounding)
        self._mb = FixedPointMultiplier(self.b_multiplier, self.b_shift, self.rounding)

    def _combine(self, a: Tensor, b: Tensor) -> Tensor:
        one = 1 << self.left_shift
        a32 = (a.to(torch.int32) - self.a_qp.zero_point) * one
        b32 = (b.to(torch.int32) - self.b_qp.zero_point) * one
        sa = multiply_by_quantized_multiplier(a32, self.a_multiplier, self.a_shift, rounding=self.rounding)
        sb = multiply_by_quantized_multiplier(b32, self.b_multiplier, self.b_shift, rounding=self.rounding)
        total = shift_right_rounded(sa + sb, self.left_shift, self.rounding) + self.out_qp.zero_point
        return torch.clamp(total, self.lo, self.hi)

    def run(self, a: Tensor, b: Tensor, record: list[tuple[str, str, Tensor]] | None = None) -> Tensor:
        one = 1 << self.left_shift
        sa = self._ma((a.to(torch.int32) - self.a_qp.zero_point) * one)
        sb = self._mb((b.to(torch.int32) - self.b_qp.zero_point) * one)
        _rec(record, self, "rescaled sum", sa.add_(sb))
        return _requant_fast(sa, None, self.left_shift, self.out_qp.zero_point, self.lo, self.hi,
                             self.out_qp.dtype, self.rounding)

    def reference(self, a: Tensor, b: Tensor) -> Tensor:
        return self._combine(a, b).to(torch.int64)

    def describe_row(self) -> dict[str, str]:
        return {
            "op": "add", "in": f"{self.a_qp.dtype}+{self.b_qp.dtype}".replace("torch.", ""),
            "acc": f"int32 (<<{self.left_shift})", "out": str(self.out_qp.dtype).replace("torch.", ""),
            "M0": f"{self.a_multiplier},{self.b_multiplier}", "n": f"{-self.a_shift},{-self.b_shift}",
            "Z_in": f"{self.a_qp.zero_point},{self.b_qp.zero_point}", "Z_out": str(self.out_qp.zero_point),
            "S_in": f"{self.a_qp.scale:.4g},{self.b_qp.scale:.4g}", "S_out": f"{self.out_qp.scale:.4g}",
            "clamp": f"{self.lo}..{self.hi}",
        }


@dataclass
class RequantOp(Op):
    """Codes at one scale -> codes at another: ``clamp(Z_out + MBQM(q - Z_in, M0, shift))``."""

    kind: ClassVar[str] = "requant"
    name: str
    inputs: list[str]
    output: str
    in_qp: QParams
    out_qp: QParams
    multiplier: int
    shift: int
    lo: int
    hi: int
    rounding: str = "gemmlowp"

    def _apply(self, x: Tensor) -> Tensor:
        return requantize(x.to(torch.int32) - self.in_qp.zero_point, self.multiplier, self.shift,
                          self.out_qp.zero_point, self.lo, self.hi, rounding=self.rounding)

    def __post_init__(self) -> None:
        self._mult = FixedPointMultiplier(self.multiplier, self.shift, self.rounding)

    def run(self, x: Tensor, record: list[tuple[str, str, Tensor]] | None = None) -> Tensor:
        return _requant_fast(x.to(torch.int32) - self.in_qp.zero_point, self._mult, 0, self.out_qp.zero_point,
                             self.lo, self.hi, self.out_qp.dtype)

    def reference(self, x: Tensor) -> Tensor:
        return self._apply(x).to(torch.int64)

    def describe_row(self) -> dict[str, str]:
        return {"op": "requant", "acc": "int32", "M0": str(self.multiplier), "n": str(-self.shift),
                **requant_row(self.in_qp, self.out_qp, self.lo, self.hi)}


@dataclass
class ClampOp(Op):
    """ReLU/ReLU6 on codes without a new scale: ``clamp(q, lo, hi)``."""

    kind: ClassVar[str] = "clamp"
    name: str
    inputs: list[str]
    output: str
    qp: QParams
    lo: int
    hi: int

    def run(self, x: Tensor, record: list[tuple[str, str, Tensor]] | None = None) -> Tensor:
        return torch.clamp(x, self.lo, self.hi)

    def reference(self, x: Tensor) -> Tensor:
        return torch.clamp(x, self.lo, self.hi)

    def describe_row(self) -> dict[str, str]:
        d = str(self.qp.dtype).replace("torch.", "")
        return {"op": "clamp", "in": d, "out": d, "Z_out": str(self.qp.zero_point),
                "S_out": f"{self.qp.scale:.4g}", "clamp": f"{self.lo}..{self.hi}"}


# --------------------------------------------------------------------------------------------
# Pooling
# --------------------------------------------------------------------------------------------


@dataclass
class AvgPoolOp(Op):
    """Average pooling: the integer window sum ``sum (q - Z_in)``, requantized with M = S_in / (N S_out).

    The 1/N of the average is part of the fixed-point multiplier, so there is one rounding.
    ``kernel`` None means global pooling (AdaptiveAvgPool2d(1)); its N is the input's H*W, and
    the multiplier for each N met is derived once and kept in ``multipliers``.
    """

    kind: ClassVar[str] = "avgpool"
    name: str
    inputs: list[str]
    output: str
    in_qp: QParams
    out_qp: QParams
    lo: int
    hi: int
    kernel: tuple[int, int] | None = None
    stride: tuple[int, int] | None = None
    multipliers: dict[int, tuple[int, int]] = field(default_factory=dict)
    rounding: str = "gemmlowp"

    def __post_init__(self) -> None:
        check_requant_rounding(self.rounding)

    def multiplier_for(self, count: int) -> tuple[int, int]:
        """(M0, shift) for a window of ``count`` elements (conversion-time maths, cached)."""
        if count not in self.multipliers:
            self.multipliers[count] = quantize_multiplier(self.in_qp.scale / (count * self.out_qp.scale))
        return self.multipliers[count]

    def _finish(self, total: Tensor, count: int) -> Tensor:
        m0, shift = self.multiplier_for(count)
        return requantize(total, m0, shift, self.out_qp.zero_point, self.lo, self.hi, rounding=self.rounding)

    def _finish_fast(self, total: Tensor, count: int) -> Tensor:
        m0, shift = self.multiplier_for(count)
        return _requant_fast(total, FixedPointMultiplier(m0, shift, self.rounding), 0, self.out_qp.zero_point, self.lo, self.hi,
                             self.out_qp.dtype)

    def run(self, x: Tensor, record: list[tuple[str, str, Tensor]] | None = None) -> Tensor:
        xc = x.to(torch.int32) - self.in_qp.zero_point  # NHWC
        if self.kernel is None:
            count = x.shape[1] * x.shape[2]
            total = xc.sum(dim=(1, 2), keepdim=True, dtype=torch.int32)
        else:
            (kh, kw), (sh, sw) = self.kernel, self.stride or self.kernel
            count = kh * kw
            total = xc.unfold(1, kh, sh).unfold(2, kw, sw).sum(dim=(-2, -1), dtype=torch.int32)
        _rec(record, self, "window sum", total)
        return self._finish_fast(total, count)

    def reference(self, x: Tensor) -> Tensor:
        xc = (x.to(torch.int64) - self.in_qp.zero_point).double()  # NCHW
        if self.kernel is None:
            count = x.shape[2] * x.shape[3]
            total = xc.sum(dim=(2, 3), keepdim=True)
        else:
            count = self.kernel[0] * self.kernel[1]
            total = F.avg_pool2d(xc, self.kernel, self.stride or self.kernel, divisor_override=1)
        return self._finish(_exact_int(total, self.name), count).to(torch.int64)

    def describe_row(self) -> dict[str, str]:
        m = ", ".join(f"N={n}: {m0}" for n, (m0, _) in sorted(self.multipliers.items())) or "per N"
        n = ", ".join(f"{-s}" for _, (_, s) in sorted(self.multipliers.items())) or "-"
        return {"op": "avgpool" if self.kernel else "global avgpool", "acc": "int32", "M0": m, "n": n,
                **requant_row(self.in_qp, self.out_qp, self.lo, self.hi)}


@dataclass
class MaxPoolOp(Op):
    """Max pooling on codes (the dequantization is monotonic, so scale and zero point carry over)."""

    kind: ClassVar[str] = "maxpool"
    name: str
    inputs: list[str]
    output: str
    qp: QParams
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] = (0, 0)

    def run(self, x: Tensor, record: list[tuple[str, str, Tensor]] | None = None) -> Tensor:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel, self.stride, self.padding
        if ph or pw:
            low = torch.iinfo(x.dtype).min
            x = F.pad(x.to(torch.int32), (0, 0, pw, pw, ph, ph), value=low).to(x.dtype)
        return x.unfold(1, kh, sh).unfold(2, kw, sw).amax(dim=(-2, -1))

    def reference(self, x: Tensor) -> Tensor:
        y = F.max_pool2d(x.double(), self.kernel, self.stride, self.padding)
        return _exact_int(y, self.name)

    def describe_row(self) -> dict[str, str]:
        d = str(self.qp.dtype).replace("torch.", "")
        return {"op": "maxpool", "in": d, "out": d, "Z_out": str(self.qp.zero_point), "S_out": f"{self.qp.scale:.4g}"}


# --------------------------------------------------------------------------------------------
# Shape ops (NCHW semantics; 4-D tensors are NHWC inside the integer kernels)
# --------------------------------------------------------------------------------------------


@dataclass
class FlattenOp(Op):
    kind: ClassVar[str] = "flatten"
    name: str
    inputs: list[str]
    output: str
    start_dim: int = 1
    end_dim: int = -1

    def run(self, x: Tensor, record: list[tuple[str, str, Tensor]] | None = None) -> Tensor:
        return to_nhwc(torch.flatten(to_nchw(x), self.start_dim, self.end_dim))

    def reference(self, x: Tensor) -> Tensor:
        return torch.flatten(x, self.start_dim, self.end_dim)

    def describe_row(self) -> dict[str, str]:
        return {"op": f"flatten({self.start_dim},{self.end_dim})"}


@dataclass
class ReshapeOp(Op):
    kind: ClassVar[str] = "reshape"
    name: str
    inputs: list[str]
    output: str
    shape: tuple[int, ...]

    def run(self, x: Tensor, record: list[tuple[str, str, Tensor]] | None = None) -> Tensor:
        return to_nhwc(to_nchw(x).reshape(self.shape))

    def reference(self, x: Tensor) -> Tensor:
        return x.reshape(self.shape)

    def describe_row(self) -> dict[str, str]:
        return {"op": f"reshape{tuple(self.shape)}"}


@dataclass
class CatOp(Op):
    """Concatenation of codes that share one scale and zero point."""

    kind: ClassVar[str] = "cat"
    name: str
    inputs: list[str]
    output: str
    qp: QParams
    dim: int = 1

    def run(self, *xs: Tensor, record: list[tuple[str, str, Tensor]] | None = None) -> Tensor:
        return to_nhwc(torch.cat([to_nchw(x) for x in xs], dim=self.dim))

    def reference(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=self.dim)

    def describe_row(self) -> dict[str, str]:
        d = str(self.qp.dtype).replace("torch.", "")
        return {"op": f"cat(dim={self.dim})", "in": d, "out": d, "Z_out": str(self.qp.zero_point),
                "S_out": f"{self.qp.scale:.4g}"}


OPS: dict[str, type[Op]] = {cls.kind: cls for cls in
                            (ConvOp, AddOp, RequantOp, ClampOp, AvgPoolOp, MaxPoolOp, FlattenOp, ReshapeOp, CatOp)}
_QP_FIELDS = ("in_qp", "out_qp", "a_qp", "b_qp", "qp", "q_qp", "k_qp", "p_qp")


def register_op(cls: type[Op]) -> type[Op]:
    """Class decorator: make an op kind defined in another module loadable by :func:`op_from_state`."""
    OPS[cls.kind] = cls
    return cls

_TUPLE_FIELDS = ("stride", "padding", "dilation", "kernel", "shape")


def op_from_state(state: dict[str, Any]) -> Op:
    """Rebuild an op saved with :meth:`Op.state` (plain dicts, lists, ints and tensors)."""
    state = dict(state)
    kind = state.pop("kind")
    if kind not in OPS:
        raise ValueError(f"unknown integer op kind {kind!r} in saved model; known: {', '.join(OPS)}")
    for key in _QP_FIELDS:
        if key in state:
            state[key] = QParams.from_state(state[key])
    for key in _TUPLE_FIELDS:
        if key in state and state[key] is not None:
            state[key] = tuple(state[key])
    if "multipliers" in state:
        state["multipliers"] = {int(k): (int(v[0]), int(v[1])) for k, v in state["multipliers"].items()}
    return OPS[kind](**state)

