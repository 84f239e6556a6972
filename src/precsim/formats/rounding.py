"""Rounding on the float32 bit pattern: the one place that manipulates float32 bits.

Every float-like format (FlexFP, OCP FP8/6/4, bf16, DSE and the elements of MX blocks) is
rounded by :func:`round_float`. It works on the integer view of a float32 tensor with plain
tensor ops (shifts, masks, adds, ``where``), so eager mode and ``torch.compile`` run the same
arithmetic and give the same bits.

Exponents come from the bit pattern, never from ``log2`` (which rounds up just below powers of
two).
"""

from __future__ import annotations

import math
import struct
from typing import Literal

import torch
from torch import Tensor

Rounding = Literal["nearest", "stochastic", "toward_zero"]
ROUNDINGS: tuple[str, ...] = ("nearest", "stochastic", "toward_zero")
Overflow = Literal["saturate", "inf", "nan"]

_SIGN = -(2**31)  # 0x80000000 as int32
_ABS = 0x7FFFFFFF
_MANT = 0x007FFFFF
_INF_BITS = 0x7F800000
_FLOAT32_MAX = 3.4028234663852886e38
# Dropped bits are capped so that ``significand + random bits`` fits in int32. Past the cap
# (inputs more than 2^7 below a format's smallest subnormal) stochastic rounding resolves the
# probability of rounding up to 2^-30 of a quantum instead of exactly.
MAX_DROPPED_BITS = 30


def check_rounding(rounding: str) -> None:
    if rounding not in ROUNDINGS:
        raise ValueError(f"unknown rounding {rounding!r}; allowed: {', '.join(ROUNDINGS)}")


def float_bits(x: Tensor) -> Tensor:
    """The int32 view of a float32 tensor (no copy)."""
    return x.view(torch.int32)


def positive_zero(x: Tensor) -> Tensor:
    """``x`` with -0.0 turned into +0.0.

    IEEE arithmetic gives +0 for ``(q - z) * s`` at q = z, but compiled kernels are built with
    ``-fno-signed-zeros`` and may fold ``+ 0.0`` away: a select of the constant +0 where
    ``x == 0`` (true for both zeros) keeps both paths alike. A select on the bit pattern did the
    same, but Inductor's CPU code turns each bit view into a store and a reload: int8 rounding
    cost 450 us on a 1.6 M activation against 330 us with the float select.
    """
    return torch.where(x == 0, 0.0, x)


def exponent_of(x: Tensor) -> Tensor:
    """floor(log2(|x|)) for finite nonzero float32 ``x``, exactly, as int32.

    Subnormals are scaled into the normal range first (an exact multiply).
    """
    a = x.abs()
    sub = a < 2.0**-126
    a = torch.where(sub, a * 2.0**64, a)
    e = (float_bits(a) >> 23) - 127
    return torch.where(sub, e - 64, e)


def exp2i(e: Tensor) -> Tensor:
    """2^e as float32 for integer ``e`` in [-149, 128] (128 gives Inf), built from bits."""
    normal = (e + 127) << 23
    sub = torch.ones_like(e) << (e + 149).clamp(0, 22)
    return torch.where(e >= -126, normal, sub).view(torch.float32)


def round_float(
    x: Tensor,
    *,
    mantissa_bits: int,
    min_exponent: int | Tensor,
    max_value: float | Tensor,
    overflow: Overflow,
    negative_zero: bool,
    rounding: Rounding,
    random_bits: Tensor | None = None,
    normal_grid: bool = False,
) -> Tensor:
    """Round float32 ``x`` onto a sign-magnitude float grid.

    The grid has ``mantissa_bits`` stored mantissa bits, smallest normal exponent
    ``min_exponent`` (below it values are subnormal with a fixed quantum
    2^(min_exponent - mantissa_bits)) and largest finite magnitude ``max_value``.
    ``min_exponent`` and ``max_value`` may be tensors that broadcast against ``x`` (a shared
    exponent per tensor or per block).

    Rounding: ``nearest`` is ties-to-even; ``toward_zero`` truncates; ``stochastic`` adds the
    low bits of ``random_bits`` (uniform int32) below the kept precision and truncates, so
    P(round up) equals the dropped fraction exactly.

    Overflow (a rounded magnitude above ``max_value``, or an infinite input) becomes ±max
    (``saturate``), ±Inf (``inf``) or NaN (``nan``). ``toward_zero`` never rounds a finite
    value past ``max_value`` (as IEEE round-toward-zero). NaN inputs stay NaN.
    Without ``negative_zero`` a result of -0 becomes +0 (the fnuz formats).

    ``normal_grid``: the caller knows that a tensor ``min_exponent`` is >= -126 everywhere
    (a DSE shift it has read). The grid's quantum then depends only on the exponent field, as
    for a constant ``min_exponent``, which saves a third of the work per element. Same result.

    Grids with 1..22 mantissa bits (every format but E8M0-like and float32 itself) take
    :func:`_round_float_bits`, about half the integer ops of the general
    :func:`round_float_reference`, with identical results (tested on every float32 exponent);
    with nearest rounding on a constant normal grid (FP8, FP6, FP4, the MX elements and DSE's
    scaled grid), :func:`_round_nearest_float`, with a third of those; grids whose smallest
    normal is 2^-126 (bf16) drop a constant number of bits (:func:`_round_float_bits_fixed`).
    """
    if rounding == "nearest" and _float_add_rounds(mantissa_bits, min_exponent, max_value):
        return _round_nearest_float(x, mantissa_bits, min_exponent, max_value, overflow,  # type: ignore[arg-type]
                                    negative_zero)
    if 1 <= mantissa_bits <= 22:
        return _round_float_bits(x, mantissa_bits, min_exponent, max_value, overflow, negative_zero, rounding,
                                 random_bits, normal_grid)
    return round_float_reference(
        x, mantissa_bits=mantissa_bits, min_exponent=min_exponent, max_value=max_value, overflow=overflow,
        negative_zero=negative_zero, rounding=rounding, random_bits=random_bits)


@torch.compiler.assume_constant_result
def _bits_of(value: float) -> int:
    """The int32 bit pattern of ``value`` rounded to float32 (a constant, also under compile)."""
    return struct.unpack("<i", struct.pack("<f", value))[0] if abs(value) <= _FLOAT32_MAX else _INF_BITS


def _top_exponent(max_value: float) -> int:
    """The smallest e with 2^e > ``max_value`` (finite, > 0)."""
    return math.frexp(max_value)[1]


def _float_add_rounds(m: int, min_exponent: int | Tensor, max_value: float | Tensor) -> bool:
    """Whether :func:`_round_nearest_float` applies: a constant grid with normal quanta whose
    magic constant 2^(e + 23 - m) stays a finite float32 up to the overflow threshold."""
    return (1 <= m <= 22 and isinstance(min_exponent, int) and min_exponent >= -126
            and isinstance(max_value, float) and 0 < max_value < math.inf
            and _top_exponent(max_value) + 23 - m <= 127)


def _round_nearest_float(x: Tensor, m: int, min_exponent: int, max_value: float, overflow: Overflow,
                         negative_zero: bool) -> Tensor:
    """:func:`round_float` with ties to even, by float32 addition: (x + c) - c with
    c = ±2^(e + 23 - m), e the exponent of the grid's binade for x.

    x + c lies in c's binade, where float32's spacing 2^(e - m) is the grid's quantum, so the
    hardware's ties-to-even addition rounds x onto the grid (the parity of the float32 last bit
    is that of the grid's mantissa), and subtracting c is exact. Below the grid's smallest
    normal, e = ``min_exponent`` gives the subnormal quantum; from the overflow threshold up,
    e stays at its top so that c stays finite, and the result still exceeds ``max_value``.
    About 15 vector ops per element against 45 for the bit path: on a cache-resident
    activation (the training step's case) the bit path was compute-bound. Kernels are compiled
    without reassociation (``-fno-unsafe-math-optimizations``) and keep subnormals, so the
    addition is done as written. The sign is put back on the bits, as x - x gives +0.
    """
    bits = float_bits(x)
    sign = bits & _SIGN
    mag = bits & _ABS
    field = (mag & _INF_BITS).clamp((min_exponent + 127) << 23, (_top_exponent(max_value) + 127) << 23)
    c = ((field + ((23 - m) << 23)) | sign).view(torch.float32)
    out = float_bits((x + c) - c) & _ABS
    return _finish(bits, sign, mag, out, _bits_of(max_value), overflow, negative_zero)


def _finish(bits: Tensor, sign: Tensor, mag: Tensor, out: Tensor, max_bits: int | Tensor, overflow: Overflow,
            negative_zero: bool) -> Tensor:
    """The rounded magnitude ``out`` of input ``bits`` as float32: overflow past ``max_bits``,
    the sign of zero, the sign back on, NaN inputs as they were."""
    over = out > max_bits
    if overflow == "saturate":
        out = torch.where(over, max_bits, out)
    elif overflow == "inf":
        out = torch.where(over, _INF_BITS, out)
    else:
        out = torch.where(over, 0x7FC00000, out)
    if not negative_zero:
        sign = torch.where(out == 0, 0, sign)
    return torch.where(mag > _INF_BITS, bits, out | sign).view(torch.float32)


def _round_float_bits(x: Tensor, m: int, min_exponent: int | Tensor, max_value: float | Tensor,
                      overflow: Overflow, negative_zero: bool, rounding: Rounding,
                      random_bits: Tensor | None, normal_grid: bool = False) -> Tensor:
    """:func:`round_float` for 1 <= m <= 22, rounding the magnitude's bit pattern in place.

    With d the number of float32 significand bits below the grid's quantum, a magnitude with
    d <= 23 is rounded by adding an increment to its bit pattern and clearing the low d bits:
    a carry runs into the exponent field exactly as rounding up to the next binade should.
    A magnitude below the grid's quantum (d >= 24) becomes 0 or one quantum. The decisions
    (ties to even, the random bits compared) are those of :func:`round_float_reference`.
    """
    bits = float_bits(x)
    sign = bits & _SIGN
    mag = bits & _ABS
    if isinstance(min_exponent, int) and min_exponent == -126:
        return _round_float_bits_fixed(bits, sign, mag, m, max_value, overflow, negative_zero, rounding,
                                       random_bits)
    biased = mag >> 23
    e1 = biased.clamp(min=1)  # float32 subnormals share the exponent field of 2^-126
    sig = torch.where(biased > 0, (mag & _MANT) | 0x800000, mag)  # |x| = sig * 2^(e1 - 150)
    normal = normal_grid or (isinstance(min_exponent, int) and min_exponent >= -126)
    if normal:  # the grid's quantum only depends on the exponent field
        d = (23 - m) + (min_exponent + 127 - e1).clamp(min=0)
        if isinstance(min_exponent, int):
            quantum_bits = _bits_of(2.0 ** (min_exponent - m))
        else:
            quantum_bits = float_bits(exp2i(min_exponent - m))
    else:  # a float32 subnormal's own leading bit matters for grids reaching below 2^-126
        emin_b = torch.as_tensor(min_exponent, dtype=torch.int32) + 127
        true_b = (float_bits(sig.to(torch.float32)) >> 23) - 150 + e1
        d = torch.maximum(true_b, emin_b) - e1 + (23 - m)  # >= 0 as the quantum is >= 2^-149
        quantum_bits = float_bits(exp2i(emin_b - 127 - m))
    dm = d.clamp(max=23)
    mask = (torch.ones_like(dm) << dm) - 1
    small = d > 23  # |x| below one quantum: the result is 0 or the quantum
    if rounding == "nearest":
        odd = (sig >> dm) & 1
        if not normal:
            odd = odd & mask  # d = 0: nothing is dropped, nothing added
        rounded = (mag + ((mask >> 1) + odd)) & ~mask
        up = (d == 24) & (sig > 0x800000)  # above half a quantum (exactly half is a tie to 0)
    elif rounding == "stochastic":
        if random_bits is None:
            raise ValueError("stochastic rounding needs random_bits")
        rounded = (mag + (random_bits & mask)) & ~mask
        ds = d.clamp(max=MAX_DROPPED_BITS)
        excess = (d - MAX_DROPPED_BITS).clamp(0, 24)
        low = (torch.ones_like(ds) << ds) - 1
        up = ((sig >> excess) + (random_bits & low)) > low
    elif rounding == "toward_zero":
        rounded = mag & ~mask
        up = None
    else:
        check_rounding(rounding)
        raise AssertionError  # unreachable
    if up is None:
        out = torch.where(small, 0, rounded)
    else:
        out = torch.where(small, up.to(torch.int32) * quantum_bits, rounded)

    if isinstance(max_value, Tensor):
        max_bits = float_bits(max_value.to(torch.float32))
    else:
        max_bits = _bits_of(max_value)
    is_inf = mag == _INF_BITS
    if rounding == "toward_zero":
        out = torch.where((out > max_bits) & ~is_inf, max_bits, out)
    return _finish(bits, sign, mag, out, max_bits, overflow, negative_zero)


def _round_float_bits_fixed(bits: Tensor, sign: Tensor, mag: Tensor, m: int, max_value: float | Tensor,
                            overflow: Overflow, negative_zero: bool, rounding: Rounding,
                            random_bits: Tensor | None) -> Tensor:
    """:func:`_round_float_bits` for grids whose smallest normal is float32's, 2^-126 (bf16,
    FlexFP with 8 exponent bits and bias 0): every float32, subnormals included, then keeps its
    top m mantissa bits, so the number of dropped bits is the constant 23 - m and no value is
    below one quantum. A third of the general path's operations (bf16 rounding was
    compute-bound in the training step)."""
    d = 23 - m
    mask = (1 << d) - 1
    if rounding == "nearest":
        out = (mag + ((mask >> 1) + ((mag >> d) & 1))) & ~mask
    elif rounding == "stochastic":
        if random_bits is None:
            raise ValueError("stochastic rounding needs random_bits")
        out = (mag + (random_bits & mask)) & ~mask
    elif rounding == "toward_zero":
        out = mag & ~mask
    else:
        check_rounding(rounding)
        raise AssertionError  # unreachable
    max_bits = float_bits(max_value.to(torch.float32)) if isinstance(max_value, Tensor) else _bits_of(max_value)
    if rounding == "toward_zero":
        out = torch.where((out > max_bits) & (mag != _INF_BITS), max_bits, out)
    return _finish(bits, sign, mag, out, max_bits, overflow, negative_zero)


def round_float_reference(
    x: Tensor,
    *,
    mantissa_bits: int,
    min_exponent: int | Tensor,
    max_value: float | Tensor,
    overflow: Overflow,
    negative_zero: bool,
    rounding: Rounding,
    random_bits: Tensor | None = None,
) -> Tensor:
    """:func:`round_float` for any mantissa width: the general algorithm, and the reference.

    It takes the significand apart (implicit bit, exact exponent), rounds it as an integer and
    rebuilds the value as ``kept * 2^quantum``.
    """
    m = mantissa_bits
    bits = float_bits(x)
    sign = bits & _SIGN
    mag = bits & _ABS
    biased = mag >> 23
    exp = biased.clamp(min=1) - 127  # float32 subnormals share the exponent -126
    sig = (mag & _MANT) | ((biased > 0).to(torch.int32) << 23)  # |x| = sig * 2^(exp - 23)
    # The true exponent floor(log2|x|): a float32 subnormal has fewer significant bits, so its
    # leading bit comes from ``sig`` (exact in float32, sig < 2^24). It matters for grids that
    # reach below 2^-126 (shifts b < 0 with e = 8, MX blocks with tiny scales).
    min_exp = torch.as_tensor(min_exponent, dtype=torch.int32)
    true_exp = (float_bits(sig.to(torch.float32)) >> 23) - 150 + exp

    quantum_exp = torch.maximum(true_exp, min_exp) - m
    dropped_bits = quantum_exp - exp + 23  # >= 0 whenever the quantum is >= 2^-149
    excess = (dropped_bits - MAX_DROPPED_BITS).clamp(0, 24)
    dropped_bits = dropped_bits.clamp(0, MAX_DROPPED_BITS)
    sig = sig >> excess

    low_mask = (torch.ones_like(dropped_bits) << dropped_bits) - 1
    kept = sig >> dropped_bits
    dropped = sig & low_mask
    if rounding == "nearest":
        if m == 0:  # the kept bit is implicit: "even" is the parity of the exponent code
            odd = kept & (true_exp - min_exp + 1)
        else:
            odd = kept & 1
        half = (low_mask + 1) >> 1
        kept = kept + ((dropped + odd > half) & (dropped_bits > 0)).to(torch.int32)
    elif rounding == "stochastic":
        if random_bits is None:
            raise ValueError("stochastic rounding needs random_bits")
        kept = kept + (dropped + (random_bits & low_mask) > low_mask).to(torch.int32)
    elif rounding != "toward_zero":
        check_rounding(rounding)

    out = kept.to(torch.float32) * exp2i(quantum_exp)  # exact: kept < 2^(m+2)

    is_inf = mag == _INF_BITS
    maxv = torch.as_tensor(max_value, dtype=torch.float32, device=x.device)
    if rounding == "toward_zero":
        out = torch.where((out > maxv) & ~is_inf, maxv, out)
    over = out > maxv
    if overflow == "saturate":
        out = torch.where(over, maxv, out)
    elif overflow == "inf":
        out = torch.where(over, torch.inf, out)
    else:
        out = torch.where(over, torch.nan, out)

    out_bits = float_bits(out)
    if not negative_zero:
        sign = torch.where(out_bits == 0, 0, sign)
    out = (out_bits | sign).view(torch.float32)
    return torch.where(x != x, x, out)


def round_integer(v: Tensor, rounding: Rounding, random_bits: Tensor | None = None) -> Tensor:
    """Round float32 ``v`` to integers (still float32).

    ``stochastic`` compares 24 random bits with the fractional part: P(up) = ceil(f * 2^24) /
    2^24, exact whenever the fraction has no bits below 2^-24 of a step.
    """
    if rounding == "nearest":
        return torch.round(v)  # ties to even
    if rounding == "toward_zero":
        return torch.trunc(v)
    if rounding == "stochastic":
        if random_bits is None:
            raise ValueError("stochastic rounding needs random_bits")
        floor = torch.floor(v)
        threshold = (v - floor) * 2.0**24
        u = (random_bits & 0xFFFFFF).to(torch.float32)
        return floor + (u < threshold).to(torch.float32)
    check_rounding(rounding)
    raise AssertionError  # unreachable
