"""Integer-only nonlinearities of I-ViT (Li & Gu, "I-ViT: Integer-only Quantization for Efficient
Vision Transformer Inference", ICCV 2023): Shiftmax, ShiftGELU and I-LayerNorm, plus an exact
integer square root.

Every op is split in two:

* ``prepare_*(scale, ...)`` runs once at conversion time and may use floats to derive integer
  constants from the real scales; it returns a frozen dataclass of ints (and integer tensors).
* ``*_int(x_codes, consts)`` runs at inference time on int32/int64 code tensors using integer
  tensor ops only (adds, multiplies, shifts, integer division, comparisons) and returns int32
  codes.  Convenience wrappers ``shiftmax``/``shift_gelu``/``i_layernorm`` do both and also
  return the output scale.

Where we deviate from the I-ViT reference code to fix a precision or robustness problem, the
docstring says so.  Error bounds quoted in docstrings were measured with
``benchmarks/ivit_op_error.py`` and are asserted (with margin) in ``tests/integer``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TypedDict, Unpack

import torch
from torch import Tensor

from precsim.integer.fixedpoint import apply_dyadic, dyadic

__all__ = [
    "ILayerNormConsts",
    "ILayerNormOptions",
    "ShiftExpConsts",
    "ShiftGeluConsts",
    "ShiftmaxConsts",
    "i_layernorm",
    "i_layernorm_int",
    "isqrt",
    "prepare_i_layernorm",
    "prepare_shift_exp",
    "prepare_shift_gelu",
    "prepare_shiftmax",
    "shift_exp_int",
    "shift_gelu",
    "shift_gelu_int",
    "shiftmax",
    "shiftmax_int",
]

_ISQRT_LIMIT = 1 << 62
# x * log2(e) ~ x + (x >> 1) - (x >> 4): 1 + 1/2 - 1/16 = 1.4375 (log2 e = 1.4427).
LOG2E_SHIFT = 1.4375
# 1.702 x ~ x + (x >> 1) + (x >> 3) + (x >> 4): 1 + 1/2 + 1/8 + 1/16 = 1.6875 (I-ViT, binary 1.1011).
GELU_SHIFT = 1.6875
# Pre-shift codes so one code is < 2^-_GUARD_TARGET in real units before the shift
# approximations, whose floor() truncations would otherwise cost up to ~2 codes of error.
_GUARD_TARGET = 12


def _int64(x: Tensor, name: str = "x") -> Tensor:
    """Check for an integer code tensor and widen it to int64 (all run-time maths is int64)."""
    if not isinstance(x, Tensor) or x.dtype not in (
        torch.int8,
        torch.uint8,
        torch.int16,
        torch.int32,
        torch.int64,
    ):
        raise TypeError(f"{name} must be an integer torch tensor, got {getattr(x, 'dtype', type(x))}")
    return x.to(torch.int64)


def _check_scale(scale: float, name: str = "scale") -> float:
    s = float(scale)
    if not math.isfinite(s) or s <= 0:
        raise ValueError(f"{name} must be a finite positive float, got {scale!r}")
    return s


def _guard_bits(scale: float) -> int:
    """Smallest G >= 0 with scale * 2^-G < 2^-_GUARD_TARGET."""
    _, e = math.frexp(scale)  # scale < 2^e
    return max(0, e + _GUARD_TARGET)


# --------------------------------------------------------------------------------------------
# isqrt
# --------------------------------------------------------------------------------------------


def _bit_length(n: Tensor) -> Tensor:
    """Element-wise bit length of non-negative int64 values (0 -> 0), by binary search on shifts."""
    v = n
    bl = torch.zeros_like(n)
    for s in (32, 16, 8, 4, 2, 1):
        step = (torch.bitwise_right_shift(v, s) > 0).to(torch.int64) * s
        v = torch.bitwise_right_shift(v, step)
        bl = bl + step
    return bl + (v > 0).to(torch.int64)


def isqrt(n: Tensor) -> Tensor:
    """Exact ``floor(sqrt(n))`` for every int64 ``n`` in [0, 2^62), with integer ops only.

    Newton's iteration ``x <- (x + n // x) // 2`` from ``x0 = 2^ceil(bitlength(n)/2)`` (an upper
    bound of sqrt(n)) decreases monotonically to ``floor(sqrt(n))`` and then stops decreasing; we
    iterate element-wise while any element still decreases (<= 7 rounds for 62-bit inputs,
    bounded at 64).  ``n == 0`` gives 0.  I-ViT's reference instead starts at 2^16 and runs 10
    fixed rounds, which is wrong for some inputs (it returns 64 for n = 2).
    Raises ValueError for values outside [0, 2^62).
    """
    n64 = _int64(n, "n")
    if n64.numel() and (int(n64.min()) < 0 or int(n64.max()) >= _ISQRT_LIMIT):
        raise ValueError(f"isqrt needs 0 <= n < 2^62, got values in [{int(n64.min())}, {int(n64.max())}]")
    pos = n64 > 0
    x = torch.bitwise_left_shift(torch.ones_like(n64), torch.bitwise_right_shift(_bit_length(n64) + 1, 1))
    for _ in range(64):
        y = torch.bitwise_right_shift(x + torch.div(n64, x, rounding_mode="floor"), 1)
        dec = (y < x) & pos
        if not bool(dec.any()):
            break
        x = torch.where(dec, y, x)
    else:  # pragma: no cover - Newton from an upper bound converges in far fewer rounds
        raise RuntimeError("isqrt did not converge")
    return torch.where(pos, x, torch.zeros_like(x))


# --------------------------------------------------------------------------------------------
# Shift-based exponential (shared by Shiftmax and ShiftGELU)
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShiftExpConsts:
    """Integer constants of :func:`shift_exp_int` (inputs: codes ``x <= 0`` of scale ``scale``).

    ``guard_bits`` G: codes are multiplied by 2^G first; ``x_floor``: inputs are clamped from
    below here (far enough that the result is already 0); ``mult``/``shift``: dyadic
    ``b / 2^c ~= scale * 2^(frac_bits - G)``; ``frac_bits`` F: fractional bits of the base-2
    exponent; ``exp_bits`` K: the result is ``~2^K * e^(x * scale)``, in [0, 2^K].
    """

    scale: float
    guard_bits: int
    x_floor: int
    mult: int
    shift: int
    frac_bits: int
    exp_bits: int


def prepare_shift_exp(scale: float, exp_bits: int = 30, frac_bits: int = 20) -> ShiftExpConsts:
    """Derive the constants of :func:`shift_exp_int` for input scale ``scale`` (floats used here only).

    ``x_floor = -(ceil((K + 4) / (1.4375 * scale)) + 1)``; the dyadic multiplier gets
    ``bits = min(31, 61 - bitlength(2 * 2^G * |x_floor| + 2))`` bits so ``t * b`` cannot overflow.
    """
    s = _check_scale(scale)
    if not 1 <= frac_bits <= exp_bits <= 40:
        raise ValueError(f"need 1 <= frac_bits <= exp_bits <= 40, got {frac_bits}, {exp_bits}")
    g = _guard_bits(s)
    x_floor = -(math.ceil((exp_bits + 4) / (LOG2E_SHIFT * s)) + 1)
    t_bound = 2 * (-x_floor << g) + 2
    bits = min(31, 61 - t_bound.bit_length())
    if bits < 16:
        raise ValueError(f"scale {s!r} is too small for an int64 shift-exp (only {bits} multiplier bits)")
    b, c = dyadic(math.ldexp(s, frac_bits - g), bits)
    return ShiftExpConsts(s, g, x_floor, b, c, frac_bits, exp_bits)


def shift_exp_int(x: Tensor, k: ShiftExpConsts) -> Tensor:
    """I-ViT's shift exponential: int64 ``~= 2^K * exp(x * scale)`` for codes ``x <= 0``.

    ``e^x = 2^(x log2 e)``, with ``x log2 e ~= X + (X >> 1) - (X >> 4)`` (1.4375 instead of
    1.4427, I-ViT), ``X = x * 2^G``.  A dyadic multiply (round half up) turns that into the
    base-2 exponent ``p`` with F fractional bits; ``p = -q * 2^F + r``, ``0 <= r < 2^F``;
    ``2^(r / 2^F) ~= 1 + r / 2^F`` (the chord, I-ViT's ``r/2 + 1`` on (-1, 0]; relative error in
    [0, +6.1%]); ``2^-q`` by an arithmetic right shift (floor).

    Deviation from I-ViT: I-ViT divides by the integer ``x0 = floor(-1/scale)``, an up-to-50%
    error on the exponent for scales near 1; we convert with a >= 16-bit dyadic multiplier after
    ``G`` guard bits, so the only exponent error is the 1.4375 factor (0.36%).
    """
    x = torch.clamp(_int64(x), min=k.x_floor)
    big = x * (1 << k.guard_bits)
    t = big + torch.bitwise_right_shift(big, 1) - torch.bitwise_right_shift(big, 4)
    p = apply_dyadic(t, k.mult, k.shift, check=False)
    q = -torch.bitwise_right_shift(p, k.frac_bits)
    r = torch.bitwise_and(p, (1 << k.frac_bits) - 1)
    mant = (r + (1 << k.frac_bits)) * (1 << (k.exp_bits - k.frac_bits))  # in [2^K, 2^(K+1))
    return torch.bitwise_right_shift(mant, torch.clamp(q, max=k.exp_bits + 1))


# --------------------------------------------------------------------------------------------
# Shiftmax
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShiftmaxConsts:
    """Constants of :func:`shiftmax_int`: the shift-exp constants, output bits, rounding mode."""

    exp: ShiftExpConsts
    output_bits: int
    sum_preserving: bool

    @property
    def out_max(self) -> int:
        """Largest output code ``M = 2^output_bits - 1`` (it represents probability 1)."""
        return (1 << self.output_bits) - 1

    @property
    def out_scale(self) -> float:
        """Output scale ``1 / (2^output_bits - 1)``."""
        return 1.0 / self.out_max


def prepare_shiftmax(
    scale: float,
    output_bits: int = 8,
    *,
    sum_preserving: bool = True,
    exp_bits: int = 30,
    frac_bits: int = 20,
) -> ShiftmaxConsts:
    """Constants for :func:`shiftmax_int` with input scale ``scale`` and unsigned ``output_bits`` codes."""
    if not 2 <= output_bits <= 16:
        raise ValueError(f"output_bits must be in [2, 16], got {output_bits}")
    return ShiftmaxConsts(prepare_shift_exp(scale, exp_bits, frac_bits), output_bits, sum_preserving)


def shiftmax_int(x: Tensor, k: ShiftmaxConsts) -> Tensor:
    """I-ViT Shiftmax: integer softmax along the last dim; returns unsigned int32 codes.

    ``x - rowmax`` (so ``x <= 0``), ``e = shift_exp_int(x)`` (``~2^30 e^x``, the row max gives
    exactly 2^30, so the row sum ``s >= 2^30 > 0``).  Output scale ``1/M``, ``M = 2^bits - 1``
    (so probability 1 is representable and codes fit ``bits`` unsigned bits).

    Normalisation (deviation from I-ViT, whose ``floor((2^31-1) / s)`` factor keeps only ~31 -
    log2(s) bits and gets coarse for long rows): an exact int64 division of ``e * M`` by ``s``.
    With ``sum_preserving`` (default) codes are differences of the rounded cumulative sums,
    ``R(C_i) - R(C_{i-1})`` with ``C`` the inclusive cumsum of ``e`` and
    ``R(C) = floor((2 C M + s) / (2 s))``: each code is within 1 LSB of ``M e_i / s`` and
    every row sums to exactly ``M`` codes, i.e. to exactly 1.  Otherwise each code is
    ``floor((2 e_i M + s) / (2 s))`` (round half up, within 0.5 LSB), and a row of n
    elements sums to 1 within ``n / (2M)``.

    Error bound vs ``torch.softmax(x * scale)``: max abs error < 0.017 + 1 LSB
    (sum-preserving) or 0.017 + 0.5 LSB (nearest), i.e. < 0.021 at 8 bits and < 0.0171 at
    16 bits; worst cases found by sweeping 2-8 element rows over scales 1e-3..2: 0.0191 (8 bit)
    and 0.0164 (16 bit); mean abs error ~1e-4..1e-3.  The 0.015 core is the chord ``2^r``
    (individual exponentials up to 6.1% high; the row normalisation cancels only the common
    part), 1.4375 for log2 e adds ~0.0015.  Row length n must satisfy
    ``n * 2^30 * (2M + 1) < 2^63`` (n <= 65536 at 16 bits).
    """
    x64 = _int64(x)
    n = x64.shape[-1]
    m = k.out_max
    if n == 0:
        raise ValueError("shiftmax of an empty row")
    if n * (1 << k.exp.exp_bits) * (2 * m + 1) >= 1 << 63:
        raise ValueError(f"row length {n} too long for int64 normalisation at {k.output_bits} bits")
    e = shift_exp_int(x64 - x64.amax(dim=-1, keepdim=True), k.exp)
    s = e.sum(dim=-1, keepdim=True)
    if k.sum_preserving:
        c = torch.cumsum(e, dim=-1)
        r = torch.div(2 * c * m + s, 2 * s, rounding_mode="floor")
        codes = torch.diff(r, dim=-1, prepend=torch.zeros_like(r[..., :1]))
    else:
        codes = torch.div(2 * e * m + s, 2 * s, rounding_mode="floor")
    return codes.to(torch.int32)


def shiftmax(
    x: Tensor, scale: float, output_bits: int = 8, *, sum_preserving: bool = True
) -> tuple[Tensor, float]:
    """Integer softmax of codes ``x`` (scale ``scale``): returns ``(codes, 1 / (2^bits - 1))``."""
    k = prepare_shiftmax(scale, output_bits, sum_preserving=sum_preserving)
    return shiftmax_int(x, k), k.out_scale


# --------------------------------------------------------------------------------------------
# ShiftGELU
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShiftGeluConsts:
    """Constants of :func:`shift_gelu_int`.

    ``guard_bits``: codes are scaled by 2^G before ``1.702 x ~= X + X>>1 + X>>3 + X>>4``;
    ``x_lo``/``x_hi``: input clamp (outside it the output is already 0 / ``qmax``);
    ``exp``: shift-exp constants at scale ``scale * 2^-G``; ``sigmoid_bits`` Q: the sigmoid is
    ``sig / 2^Q``; ``out_mult``/``out_shift``: dyadic ``~= scale * 2^-Q / out_scale``;
    ``qmin``/``qmax``: signed output code range.
    """

    scale: float
    guard_bits: int
    x_lo: int
    x_hi: int
    exp: ShiftExpConsts
    sigmoid_bits: int
    out_mult: int
    out_shift: int
    qmin: int
    qmax: int
    out_scale: float


def prepare_shift_gelu(
    scale: float, out_scale: float | None = None, out_bits: int = 8, *, sigmoid_bits: int = 16
) -> ShiftGeluConsts:
    """Constants for :func:`shift_gelu_int`: input scale, output scale (default: input scale) and
    signed output width ``out_bits``."""
    s = _check_scale(scale)
    so = _check_scale(s if out_scale is None else out_scale, "out_scale")
    if not 2 <= out_bits <= 32:
        raise ValueError(f"out_bits must be in [2, 32], got {out_bits}")
    if not 1 <= sigmoid_bits <= 24:
        raise ValueError(f"sigmoid_bits must be in [1, 24], got {sigmoid_bits}")
    qmin, qmax = -(1 << (out_bits - 1)), (1 << (out_bits - 1)) - 1
    g = _guard_bits(s)
    exp = prepare_shift_exp(math.ldexp(s, -g))
    # Beyond x_lim the real exponent is below -(K + 4) bits, so e^{-|1.702 x|} underflows to 0.
    x_lim = math.ceil((exp.exp_bits + 4) / (GELU_SHIFT * LOG2E_SHIFT * s)) + 2
    x_hi = max(x_lim, math.ceil((qmax + 1) * so / s) + 1)
    if (x_hi << g) >= 1 << 60:
        raise ValueError(f"scale {s!r} / out_scale {so!r}: guarded GELU inputs would overflow int64")
    prod_bound = x_hi << sigmoid_bits
    bits = min(31, 61 - prod_bound.bit_length())
    if bits < 16:
        raise ValueError(f"scale {s!r} / out_scale {so!r} leave too few multiplier bits ({bits})")
    b, c = dyadic(math.ldexp(s / so, -sigmoid_bits), bits)
    return ShiftGeluConsts(s, g, -x_lim, x_hi, exp, sigmoid_bits, b, c, qmin, qmax, so)


def shift_gelu_int(x: Tensor, k: ShiftGeluConsts) -> Tensor:
    """I-ViT ShiftGELU: ``GELU(x) ~= x * sigmoid(1.702 x)`` on codes; returns signed int32 codes.

    ``1.702 x ~= X + (X>>1) + (X>>3) + (X>>4)`` (1.6875, I-ViT's binary 1.1011) on
    ``X = x * 2^G``; ``E = shift_exp_int(-|1.702 x|) ~= 2^K e^{-|1.702 x|}``; the sigmoid is an
    integer division, ``sig = round_half_up(2^Q * num / (2^K + E))`` with ``num = 2^K`` for
    ``x >= 0`` and ``E`` otherwise; then ``round_half_up(x * sig * scale * 2^-Q / out_scale)``
    by a dyadic multiply, clamped to the signed range.

    Deviation from I-ViT: I-ViT evaluates ``e^{y - max}/(e^{y - max} + e^{-max})`` with the row
    max, where both terms can underflow to 0 (0/0) for far-negative y; we use the element-wise
    ``max(y, 0)``, which is the same function but always has a denominator >= 2^K.

    Error bound vs ``torch.nn.functional.gelu`` (exact erf GELU): max abs error
    < 0.026 + out_scale / 2 (worst measured over all codes for scales 2^-10..1: 0.0255 +
    out_scale / 2).  The x * sigmoid(1.702 x) model itself is off by up to 0.0203; the chord
    ``2^r`` and 1.6875 add the rest.
    """
    x64 = torch.clamp(_int64(x), k.x_lo, k.x_hi)
    big = x64 * (1 << k.guard_bits)
    y = (
        big
        + torch.bitwise_right_shift(big, 1)
        + torch.bitwise_right_shift(big, 3)
        + torch.bitwise_right_shift(big, 4)
    )
    e = shift_exp_int(-torch.abs(y), k.exp)
    one = torch.full_like(e, 1 << k.exp.exp_bits)
    num = torch.where(y >= 0, one, e)
    den = one + e
    sig = torch.div(num * (1 << (k.sigmoid_bits + 1)) + den, 2 * den, rounding_mode="floor")
    out = apply_dyadic(x64 * sig, k.out_mult, k.out_shift, check=False)
    return torch.clamp(out, k.qmin, k.qmax).to(torch.int32)


def shift_gelu(
    x: Tensor, scale: float, out_scale: float | None = None, out_bits: int = 8
) -> tuple[Tensor, float]:
    """Integer GELU of codes ``x`` (scale ``scale``): returns ``(codes, out_scale)``."""
    k = prepare_shift_gelu(scale, out_scale, out_bits)
    return shift_gelu_int(x, k), k.out_scale


# --------------------------------------------------------------------------------------------
# I-LayerNorm
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ILayerNormConsts:
    """Constants of :func:`i_layernorm_int` (``n`` = normalised size, the last dim).

    ``frac_bits`` P: the mean and centred values carry P fractional bits; ``eps_int``:
    ``eps`` in units of ``(scale * 2^-P)^2``; ``norm_bits`` k: the normalised value has scale
    2^-k; ``weight_int`` (int64, scale ``weight_scale``, symmetric per-tensor with
    ``weight_bits`` bits) and ``bias_int`` (int64, scale ``weight_scale * 2^-k``, i.e. the
    accumulator scale); ``out_mult``/``out_shift``: dyadic ``~= weight_scale * 2^-k / out_scale``.
    """

    scale: float
    n: int
    in_bits: int
    frac_bits: int
    eps_int: int
    norm_bits: int
    weight_int: Tensor
    bias_int: Tensor
    weight_scale: float
    out_mult: int
    out_shift: int
    qmin: int
    qmax: int
    out_scale: float


def prepare_i_layernorm(
    scale: float,
    n: int,
    out_scale: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    eps: float = 1e-5,
    in_bits: int = 16,
    out_bits: int = 8,
    weight_bits: int = 16,
    norm_bits: int = 16,
) -> ILayerNormConsts:
    """Constants for :func:`i_layernorm_int`; inputs must be signed ``in_bits``-bit codes.

    ``P = min(16, floor((60 - bitlength(n) - 2 * in_bits) / 2))`` keeps ``sum (x - mean)^2``
    below 2^61; ``weight_int = round(w / s_w)``, ``s_w = max|w| / (2^(weight_bits-1) - 1)``;
    ``bias_int = round(bias / (s_w 2^-k))``.  Raises ValueError when the bounds cannot be met.
    """
    s = _check_scale(scale)
    so = _check_scale(out_scale, "out_scale")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 2 <= in_bits <= 32 or not 2 <= out_bits <= 32 or not 2 <= weight_bits <= 24:
        raise ValueError(f"bad bit widths in/out/weight = {in_bits}/{out_bits}/{weight_bits}")
    p = min(16, (60 - n.bit_length() - 2 * in_bits) // 2)
    if p < 0:
        raise ValueError(f"in_bits={in_bits} is too wide for an int64 variance over n={n}")
    k = norm_bits
    if not 1 <= k <= 61 - in_bits - p:
        raise ValueError(f"norm_bits must be in [1, {61 - in_bits - p}], got {k}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    eps_int = min(round(math.ldexp(eps / (s * s), 2 * p)), 1 << 61)

    w = (
        torch.ones(n, dtype=torch.float64)
        if weight is None
        else weight.detach().to(torch.float64).reshape(-1)
    )
    bvec = (
        torch.zeros(n, dtype=torch.float64) if bias is None else bias.detach().to(torch.float64).reshape(-1)
    )
    if w.numel() != n or bvec.numel() != n:
        raise ValueError(f"weight/bias must have {n} elements, got {w.numel()} and {bvec.numel()}")
    wmax = float(w.abs().max())
    s_w = wmax / ((1 << (weight_bits - 1)) - 1) if wmax > 0 else 1.0
    w_int = torch.round(w / s_w).to(torch.int64)
    b_int = torch.round(bvec / math.ldexp(s_w, -k)).to(torch.int64)

    z_bound = (math.isqrt(n) + 2) << (k + 1)
    acc_bound = z_bound * int(w_int.abs().max()) + int(b_int.abs().max())
    bits = min(31, 61 - acc_bound.bit_length())
    if bits < 16:
        raise ValueError(f"LayerNorm accumulator bound 2^{acc_bound.bit_length()} leaves too few bits")
    mult, shift = dyadic(math.ldexp(s_w / so, -k), bits)
    qmin, qmax = -(1 << (out_bits - 1)), (1 << (out_bits - 1)) - 1
    return ILayerNormConsts(s, n, in_bits, p, eps_int, k, w_int, b_int, s_w, mult, shift, qmin, qmax, so)


def i_layernorm_int(x: Tensor, k: ILayerNormConsts) -> Tensor:
    """I-ViT I-LayerNorm over the last dim, integer only; returns signed int32 codes.

    ``mean = round_half_up(sum(x) * 2^P / n)`` (P fractional bits), ``y = x * 2^P - mean``,
    ``var = round_half_up(sum(y^2) / n) + eps_int`` in int64, ``std = max(isqrt(var), 1)``
    (exact floor sqrt), ``z = round_half_up(y * 2^k / std)`` (scale 2^-k),
    ``acc = z * weight_int + bias_int``, output ``clamp(round_half_up(acc * s_w 2^-k / out_scale))``.

    Deviations from I-ViT: I-ViT rounds the mean to whole codes, takes its 10-step Newton sqrt
    from 2^16 (inexact), normalises with ``floor((2^31-1)/std)`` and folds the affine weight into
    a per-channel float output scale; here the mean keeps P fractional bits, the sqrt is exact,
    the division is exact and the affine transform is integer.

    Error bound vs ``torch.nn.functional.layer_norm``, per element, with ``sigma`` the row's
    ``sqrt(var + eps / scale^2)`` in codes and ``z`` the exact normalised value:
    ``out_scale/2 + |w| (2^-(k+1) + (1/2 + |z|) 2^-P / sigma) + |z| s_w / 2 + s_w 2^-k``
    (output rounding; z rounding; mean kept to 2^-(P+1) codes and floor-sqrt std to 2^-P
    codes; weight and bias rounding).  Measured (benchmarks/ivit_op_error.py, n = 768, 16-bit
    inputs): at 8-bit output 0.5 LSB + 1e-4; at 16-bit output about 1 LSB, the 16-bit weight
    term ``|z| s_w / 2`` dominating for outliers (|z| ~ 10).  Rows only a few codes wide with
    wide ``in_bits`` (hence small P) see the 2^-P / sigma term, e.g. ~2 LSB of 2.4e-4.
    Inputs outside the signed ``in_bits`` range raise ValueError.
    """
    x64 = _int64(x)
    if x64.shape[-1] != k.n:
        raise ValueError(f"last dim {x64.shape[-1]} != n = {k.n}")
    lim = 1 << (k.in_bits - 1)
    if x64.numel() and (int(x64.min()) < -lim or int(x64.max()) >= lim):
        raise ValueError(
            f"inputs must be {k.in_bits}-bit signed codes, got [{int(x64.min())}, {int(x64.max())}]"
        )
    n, p = k.n, k.frac_bits
    total = x64.sum(dim=-1, keepdim=True)
    mean = torch.div(total * (1 << (p + 1)) + n, 2 * n, rounding_mode="floor")
    y = x64 * (1 << p) - mean
    ssq = (y * y).sum(dim=-1, keepdim=True)
    var = torch.div(2 * ssq + n, 2 * n, rounding_mode="floor") + k.eps_int
    std = torch.clamp(isqrt(var), min=1)
    z = torch.div(y * (1 << (k.norm_bits + 1)) + std, 2 * std, rounding_mode="floor")
    acc = z * k.weight_int + k.bias_int
    out = apply_dyadic(acc, k.out_mult, k.out_shift, check=False)
    return torch.clamp(out, k.qmin, k.qmax).to(torch.int32)


class ILayerNormOptions(TypedDict, total=False):
    """The keyword options of :func:`prepare_i_layernorm`, which :func:`i_layernorm` passes on."""

    eps: float
    in_bits: int
    out_bits: int
    weight_bits: int
    norm_bits: int


def i_layernorm(
    x: Tensor,
    scale: float,
    out_scale: float,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    **options: Unpack[ILayerNormOptions],
) -> tuple[Tensor, float]:
    """Integer LayerNorm of codes ``x`` (scale ``scale``) over the last dim: ``(codes, out_scale)``.

    ``options`` (``eps``, ``in_bits``, ...) and their defaults are those of :func:`prepare_i_layernorm`.
    """
    k = prepare_i_layernorm(scale, x.shape[-1], out_scale, weight, bias, **options)
    return i_layernorm_int(x, k), k.out_scale
