"""Fixed-point integer arithmetic for integer-only inference.

Bit-exact torch ports of the rules in Jacob et al. 2018 ("Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference"), gemmlowp's ``fixedpoint.h`` and
TFLite's ``QuantizeMultiplier`` / ``MultiplyByQuantizedMultiplier``, plus I-ViT style dyadic
numbers ``b / 2^c``.

Requantization comes in two rounding modes (:data:`REQUANT_ROUNDINGS`), a property of the integer model:

* ``"gemmlowp"`` (the default, Jacob et al. / gemmlowp / TFLite's classic kernels):
  SaturatingRoundingDoublingHighMul then RoundingDivideByPOT -- two roundings;
* ``"single"`` (TFLite built with ``TFLITE_SINGLE_ROUNDING``): one rounding of
  ``x M0 2^(shift - 31)`` in int64, ties toward +inf. It is within 1/2 code of the real product
  (up to the multiplier's 2^-31 relative error), so it agrees with fake quantization's
  ``round(y / S)`` except within float noise of a tie.

Conventions:

* Run-time functions take torch integer tensors (int32 or int64) and return the dtype of their
  main data argument.  All arithmetic is done in int64, so no intermediate can overflow where the
  C++ reference would compute in 64 bits; values that the C++ reference keeps in int32 must be in
  int32 range (checked, ``ValueError`` otherwise).
* Floats appear only in the functions that *derive* integer constants from real scales
  (:func:`quantize_multiplier`, :func:`quantize_multipliers`, :func:`dyadic`), which run once at
  conversion time.
* torch's ``//`` floors; the C reference truncates.  Where C semantics matter we use
  ``torch.div(..., rounding_mode="trunc")`` or arithmetic shifts (which floor) exactly as the
  reference does.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "INT32_MAX",
    "INT32_MIN",
    "REQUANT_ROUNDINGS",
    "apply_dyadic",
    "check_requant_rounding",
    "dyadic",
    "multiply_by_quantized_multiplier",
    "multiply_by_quantized_multiplier_single",
    "quantize_multiplier",
    "quantize_multipliers",
    "requantize",
    "rounding_divide_by_pot",
    "saturating_rounding_doubling_high_mul",
    "shift_right_rounded",
]

INT32_MIN = -(1 << 31)
INT32_MAX = (1 << 31) - 1
INT64_MAX = (1 << 63) - 1

# A shift by more than this would need a wider type than int64 for the rounding mask.
_MAX_RIGHT_SHIFT = 62
_MAX_LEFT_SHIFT = 31

IntLike = Tensor | int

REQUANT_ROUNDINGS = ("gemmlowp", "single")
"""Requantization rounding modes: gemmlowp's double rounding (default) and TFLite's single rounding."""


def check_requant_rounding(rounding: object) -> str:
    """Return ``rounding`` if it is one of :data:`REQUANT_ROUNDINGS`; ValueError naming it and the allowed ones."""
    if not isinstance(rounding, str) or rounding not in REQUANT_ROUNDINGS:
        raise ValueError(
            f"unknown requantization rounding {rounding!r}; allowed: " + ", ".join(repr(r) for r in REQUANT_ROUNDINGS)
        )
    return rounding


def _round_half_away(v: float) -> int:
    """Round a finite float half away from zero (C ``std::round``), exactly, to a Python int."""
    a = abs(v)
    fl = math.floor(a)
    # a - floor(a) is exact for any finite double, so the tie test is exact too.
    r = fl + (1 if a - fl >= 0.5 else 0)
    return -r if v < 0 else r


def _as_int_tensor(x: IntLike, name: str) -> Tensor:
    """Accept an int or an integer tensor; reject floats so no float sneaks into run-time maths."""
    if isinstance(x, Tensor):
        if x.dtype not in (torch.int32, torch.int64, torch.int16, torch.int8, torch.uint8):
            raise TypeError(f"{name} must be an integer tensor, got dtype {x.dtype}")
        return x
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"{name} must be an int or an integer tensor, got {type(x).__name__}")
    return torch.tensor(x, dtype=torch.int64)


def _check_range(x: Tensor, lo: int, hi: int, name: str) -> None:
    """Raise ValueError if any element of x lies outside [lo, hi]."""
    if x.numel() == 0:
        return
    mn, mx = int(x.min()), int(x.max())
    if mn < lo or mx > hi:
        raise ValueError(f"{name} must lie in [{lo}, {hi}], got values in [{mn}, {mx}]")


def _along_axis(p: Tensor, x: Tensor, axis: int | None) -> Tensor:
    """Reshape a per-channel 1-D parameter so it broadcasts along ``axis`` of ``x``."""
    if axis is None or p.dim() == 0:
        return p
    if p.dim() != 1:
        raise ValueError(f"per-channel parameter must be 1-D when axis is given, got shape {tuple(p.shape)}")
    ax = axis % x.dim()
    if p.shape[0] not in (1, x.shape[ax]):
        raise ValueError(f"per-channel parameter has {p.shape[0]} entries but axis {axis} has {x.shape[ax]}")
    shape = [1] * x.dim()
    shape[ax] = p.shape[0]
    return p.reshape(shape)


# --------------------------------------------------------------------------------------------
# Conversion-time constants (floats allowed here)
# --------------------------------------------------------------------------------------------


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite ``QuantizeMultiplier``: ``real ~= M0 * 2**(shift - 31)`` with ``M0`` in [2^30, 2^31).

    ``frac, e = frexp(real)``; ``M0 = round_half_away(frac * 2^31)`` (exact: scaling by 2^31 is
    exact in binary64, so the only rounding is this one, relative error <= 2^-31); if the rounding
    reaches 2^31, ``M0`` is halved and the shift bumped.  ``real == 0`` gives ``(0, 0)``.

    Deviations from TFLite, both to widen the usable range: TFLite flushes to ``(0, 0)`` when
    ``shift < -31``; we only flush below ``-62`` (the deepest right shift that
    :func:`rounding_divide_by_pot` supports in int64), so multipliers down to ~2^-63 keep full
    precision.  ``real >= 2^31`` (``shift > 31``) is rejected rather than saturated.

    Raises ValueError for negative, NaN, infinite or too large ``real``.
    """
    real = float(real)
    if not math.isfinite(real) or real < 0:
        raise ValueError(f"quantize_multiplier needs a finite real >= 0, got {real!r}")
    if real == 0.0:
        return 0, 0
    frac, shift = math.frexp(real)
    q = _round_half_away(math.ldexp(frac, 31))
    if q == 1 << 31:
        q //= 2
        shift += 1
    if shift > _MAX_LEFT_SHIFT:
        raise ValueError(f"quantize_multiplier: real {real!r} >= 2^31 is out of range")
    if shift < -_MAX_RIGHT_SHIFT:
        return 0, 0
    return q, shift


def quantize_multipliers(reals: Tensor) -> tuple[Tensor, Tensor]:
    """Vectorised :func:`quantize_multiplier` for per-channel scales; returns int32 (M0, shift).

    Same rounding (half away from zero of ``frac * 2^31``, exact in float64) and the same range
    rules, element-wise.
    """
    r = torch.as_tensor(reals).detach().to(torch.float64)
    bad = ~torch.isfinite(r) | (r < 0)
    if bool(bad.any()):
        raise ValueError(f"quantize_multipliers needs finite reals >= 0, got {r[bad].tolist()[:8]!r}")
    frac, exp = torch.frexp(r)
    scaled = torch.ldexp(frac, torch.tensor(31, dtype=torch.float64))
    # frac * 2^31 lies in [2^30, 2^31): floor(v + 0.5) is exact there (ulp = 2^-22).
    q = torch.floor(scaled + 0.5).to(torch.int64)
    shift = exp.to(torch.int64)
    top = q == (1 << 31)
    q = torch.where(top, q // 2, q)
    shift = torch.where(top, shift + 1, shift)
    too_big = (shift > _MAX_LEFT_SHIFT) & (q != 0)
    if bool(too_big.any()):
        raise ValueError(f"quantize_multipliers: reals >= 2^31 out of range: {r[too_big].tolist()[:8]!r}")
    flush = (shift < -_MAX_RIGHT_SHIFT) | (q == 0)
    q = torch.where(flush, torch.zeros_like(q), q)
    shift = torch.where(flush, torch.zeros_like(shift), shift)
    return q.to(torch.int32), shift.to(torch.int32)


def dyadic(real: float, bits: int = 31, max_shift: int = 62) -> tuple[int, int]:
    """Dyadic number ``b / 2^c ~= real`` (I-ViT), with ``|b| < 2^bits`` and ``0 <= c <= max_shift``.

    ``c`` is the largest shift for which ``|b| = round_half_away(|real| * 2^c)`` still fits in
    ``bits`` bits, which maximises precision: relative error <= 2^-bits when ``c`` is not capped
    by ``max_shift`` (|b| >= 2^(bits-1) then).  ``real == 0`` (or a real so small that ``b``
    rounds to 0 at ``max_shift``) gives ``(0, 0)``.  Raises ValueError for non-finite ``real``
    or ``|real| >= 2^bits`` (which would need ``c < 0``).
    """
    real = float(real)
    if not math.isfinite(real):
        raise ValueError(f"dyadic needs a finite real, got {real!r}")
    if not 1 <= bits <= 62:
        raise ValueError(f"dyadic: bits must be in [1, 62], got {bits}")
    if not 0 <= max_shift <= _MAX_RIGHT_SHIFT:
        raise ValueError(f"dyadic: max_shift must be in [0, {_MAX_RIGHT_SHIFT}], got {max_shift}")
    if real == 0.0:
        return 0, 0
    _, e = math.frexp(abs(real))  # |real| in [2^(e-1), 2^e)
    c = min(bits - e, max_shift)
    if c < 0:
        raise ValueError(f"dyadic: |real| = {abs(real)!r} needs more than {bits} bits with c >= 0")
    b = _round_half_away(math.ldexp(abs(real), c))
    if b >= 1 << bits:  # rounding carried out of the top bit
        c -= 1
        if c < 0:
            raise ValueError(f"dyadic: |real| = {abs(real)!r} needs more than {bits} bits with c >= 0")
        b = _round_half_away(math.ldexp(abs(real), c))
    if b == 0:
        return 0, 0
    return (-b if real < 0 else b), c


# --------------------------------------------------------------------------------------------
# Run-time integer operations (no floats)
# --------------------------------------------------------------------------------------------


def saturating_rounding_doubling_high_mul(a: IntLike, b: IntLike) -> Tensor:
    """gemmlowp ``SaturatingRoundingDoublingHighMul``: ``round(a * b / 2^31)`` on int32 values.

    Computed in int64: ``ab = a * b``; ``nudge = 2^30`` if ``ab >= 0`` else ``1 - 2^30``;
    result ``(ab + nudge) / 2^31`` truncated toward zero (C division).  That is round to nearest
    with ties toward +inf (0.5 -> 1 but -0.5 -> 0: the ``1 - 2^30`` nudge makes negative ties
    round toward zero).  The only overflow, ``a == b == INT32_MIN``, saturates to INT32_MAX.
    Inputs must hold int32-range values; the output dtype is the promoted input dtype.
    """
    at, bt = _as_int_tensor(a, "a"), _as_int_tensor(b, "b")
    out_dtype = torch.promote_types(at.dtype, bt.dtype)
    a64, b64 = at.to(torch.int64), bt.to(torch.int64)
    _check_range(a64, INT32_MIN, INT32_MAX, "a")
    _check_range(b64, INT32_MIN, INT32_MAX, "b")
    ab = a64 * b64  # |ab| <= 2^62: exact in int64
    pos = torch.tensor(1 << 30, dtype=torch.int64)
    neg = torch.tensor(1 - (1 << 30), dtype=torch.int64)
    nudge = torch.where(ab >= 0, pos, neg)
    res = torch.div(ab + nudge, 1 << 31, rounding_mode="trunc")
    overflow = (a64 == INT32_MIN) & (b64 == INT32_MIN)
    res = torch.where(overflow, torch.tensor(INT32_MAX, dtype=torch.int64), res)
    return res.to(out_dtype)


def rounding_divide_by_pot(x: IntLike, exponent: IntLike) -> Tensor:
    """gemmlowp ``RoundingDivideByPOT``: ``x / 2^exponent`` rounded to nearest, ties away from zero.

    ``mask = 2^e - 1``; ``remainder = x & mask``; ``threshold = (mask >> 1) + (x < 0)``;
    result ``(x >> e) + (remainder > threshold)`` with an arithmetic (flooring) shift.
    ``exponent`` may be an int or a tensor broadcastable against ``x`` (per channel).  gemmlowp
    allows 0..31 on int32; since we compute in int64 we accept 0..62 (larger shifts of int32
    values give 0 or +-1 after rounding, as the formula says).  Output dtype: ``x``'s.
    """
    xt = _as_int_tensor(x, "x")
    et = _as_int_tensor(exponent, "exponent").to(torch.int64)
    _check_range(et, 0, _MAX_RIGHT_SHIFT, "exponent")
    x64 = xt.to(torch.int64)
    mask = torch.bitwise_left_shift(torch.ones_like(et), et) - 1
    remainder = torch.bitwise_and(x64, mask)
    threshold = torch.bitwise_right_shift(mask, 1) + (x64 < 0).to(torch.int64)
    res = torch.bitwise_right_shift(x64, et) + (remainder > threshold).to(torch.int64)
    return res.to(xt.dtype)


def multiply_by_quantized_multiplier(
    x: IntLike, multiplier: IntLike, shift: IntLike, axis: int | None = None, rounding: str = "gemmlowp"
) -> Tensor:
    """TFLite ``MultiplyByQuantizedMultiplier``: ``x * M0 * 2^(shift - 31)`` with gemmlowp rounding.

    ``left = max(shift, 0)``, ``right = max(-shift, 0)``;
    ``RoundingDivideByPOT(SRDHM(x * 2^left, M0), right)`` -- TFLite's double rounding (SRDHM
    rounds to nearest with ties toward +inf, then RoundingDivideByPOT to nearest with ties away
    from zero), so the result is within 1 of ``x * M0 * 2^(shift-31)`` (double rounding).
    ``x * 2^left`` saturates to int32 where the C++ reference would overflow (undefined there).
    ``multiplier``/``shift`` are ints or tensors; with ``axis`` given, 1-D per-channel tensors are
    broadcast along that axis of ``x``.  Requires ``shift`` in [-62, 31] and int32-range ``x``.
    Output dtype: ``x``'s.  ``rounding="single"``: :func:`multiply_by_quantized_multiplier_single`.
    """
    if check_requant_rounding(rounding) == "single":
        return multiply_by_quantized_multiplier_single(x, multiplier, shift, axis)
    xt = _as_int_tensor(x, "x")
    m = _along_axis(_as_int_tensor(multiplier, "multiplier").to(torch.int64), xt, axis)
    s = _along_axis(_as_int_tensor(shift, "shift").to(torch.int64), xt, axis)
    _check_range(s, -_MAX_RIGHT_SHIFT, _MAX_LEFT_SHIFT, "shift")
    x64 = xt.to(torch.int64)
    _check_range(x64, INT32_MIN, INT32_MAX, "x")
    left = torch.clamp(s, min=0)
    right = torch.clamp(-s, min=0)
    shifted = torch.clamp(x64 * torch.bitwise_left_shift(torch.ones_like(left), left), INT32_MIN, INT32_MAX)
    high = saturating_rounding_doubling_high_mul(shifted, m)
    return rounding_divide_by_pot(high, right).to(xt.dtype)


def multiply_by_quantized_multiplier_single(
    x: IntLike, multiplier: IntLike, shift: IntLike, axis: int | None = None
) -> Tensor:
    """TFLite ``MultiplyByQuantizedMultiplier`` under ``TFLITE_SINGLE_ROUNDING``: one rounding.

    With ``t = 31 - shift``: ``(x * M0 + 2^(t-1)) >> t`` in int64 (an arithmetic, flooring shift),
    i.e. ``floor(x M0 2^-t + 1/2)``: round to nearest, ties toward +inf (-2.5 -> -2). TFLite
    allows ``shift`` in [-31, 30]; we accept [-62, 31] like the gemmlowp path: ``t = 0`` is the
    exact product, and ``t >= 63`` gives 0 (``|x M0| < 2^62 <= 2^(t-1)``, so the value is below
    1/2 in magnitude). A result outside int32 (possible only with ``shift > 0``; TFLite's DCHECK)
    saturates. ``M0`` must lie in [0, 2^31 - 1], ``x`` in int32 range. Output dtype: ``x``'s.
    """
    xt = _as_int_tensor(x, "x")
    m = _along_axis(_as_int_tensor(multiplier, "multiplier").to(torch.int64), xt, axis)
    s = _along_axis(_as_int_tensor(shift, "shift").to(torch.int64), xt, axis)
    _check_range(s, -_MAX_RIGHT_SHIFT, _MAX_LEFT_SHIFT, "shift")
    _check_range(m, 0, INT32_MAX, "multiplier")
    x64 = xt.to(torch.int64)
    _check_range(x64, INT32_MIN, INT32_MAX, "x")
    t = 31 - s  # 0..93
    t_used = torch.clamp(t, max=_MAX_RIGHT_SHIFT)
    half = torch.where(
        t_used > 0,
        torch.bitwise_left_shift(torch.ones_like(t_used), torch.clamp(t_used - 1, min=0)),
        torch.zeros_like(t_used),
    )
    res = torch.bitwise_right_shift(x64 * m + half, t_used)  # |x M0| < 2^62: no int64 overflow
    res = torch.where(t > _MAX_RIGHT_SHIFT, torch.zeros_like(res), res)
    return torch.clamp(res, INT32_MIN, INT32_MAX).to(xt.dtype)


def shift_right_rounded(x: IntLike, exponent: int, rounding: str = "gemmlowp") -> Tensor:
    """``x / 2^exponent`` rounded as a requantization of ``rounding`` mode rounds (output dtype: ``x``'s).

    ``"gemmlowp"``: :func:`rounding_divide_by_pot` (ties away from zero); ``"single"``:
    ``(x + 2^(e-1)) >> e``, ties toward +inf, which is single-rounding
    ``MultiplyByQuantizedMultiplier`` by ``2^-e`` (the final step of TFLite's quantized add).
    """
    if check_requant_rounding(rounding) == "gemmlowp":
        return rounding_divide_by_pot(x, exponent)
    xt = _as_int_tensor(x, "x")
    if not 0 <= exponent <= _MAX_RIGHT_SHIFT:
        raise ValueError(f"exponent must lie in [0, {_MAX_RIGHT_SHIFT}], got {exponent}")
    if exponent == 0:
        return xt
    x64 = xt.to(torch.int64)
    if x64.numel() and int(x64.max()) > INT64_MAX - (1 << (exponent - 1)):
        raise OverflowError(f"shift_right_rounded: x + 2^{exponent - 1} overflows int64")
    return torch.bitwise_right_shift(x64 + (1 << (exponent - 1)), exponent).to(xt.dtype)


def requantize(
    acc: IntLike,
    multiplier: IntLike,
    shift: IntLike,
    zero_point: IntLike,
    qmin: int,
    qmax: int,
    axis: int | None = None,
    rounding: str = "gemmlowp",
) -> Tensor:
    """int32 accumulator -> output codes: ``clamp(MBQM(acc, M0, shift) + zero_point, qmin, qmax)``.

    Rounding is that of :func:`multiply_by_quantized_multiplier` in mode ``rounding``; ``zero_point`` may be
    per-channel like ``multiplier``/``shift`` (broadcast along ``axis``).  Returns int32.
    """
    if qmin > qmax:
        raise ValueError(f"requantize: qmin {qmin} > qmax {qmax}")
    xt = _as_int_tensor(acc, "acc")
    scaled = multiply_by_quantized_multiplier(xt, multiplier, shift, axis, rounding).to(torch.int64)
    zp = _along_axis(_as_int_tensor(zero_point, "zero_point").to(torch.int64), xt, axis)
    return torch.clamp(scaled + zp, qmin, qmax).to(torch.int32)


def apply_dyadic(x: IntLike, b: int, c: int, *, check: bool = True) -> Tensor:
    """Multiply by the dyadic number ``b / 2^c``: ``floor((x*b + 2^(c-1)) / 2^c)`` in int64.

    Rounding: round half up (toward +inf on ties), as an arithmetic right shift floors; ``c == 0``
    gives the exact product ``x*b``.  Overflow limit: ``|x| * |b| + 2^(c-1)`` must stay below 2^63;
    with ``check`` (default) this is verified from ``x``'s actual extremes and OverflowError is
    raised otherwise (callers that proved the bound at prepare time pass ``check=False``).
    Returns int64 (the result of a dyadic multiply need not fit the input dtype).
    """
    if not 0 <= c <= _MAX_RIGHT_SHIFT:
        raise ValueError(f"apply_dyadic: shift c must be in [0, {_MAX_RIGHT_SHIFT}], got {c}")
    x64 = _as_int_tensor(x, "x").to(torch.int64)
    if check and x64.numel() > 0:
        max_abs = max(abs(int(x64.min())), abs(int(x64.max())))
        if max_abs * abs(b) + ((1 << (c - 1)) if c > 0 else 0) > INT64_MAX:
            raise OverflowError(
                f"apply_dyadic: |x| up to {max_abs} times |b| = {abs(b)} overflows int64 (c = {c})"
            )
    prod = x64 * b
    if c == 0:
        return prod
    return torch.bitwise_right_shift(prod + (1 << (c - 1)), c)
