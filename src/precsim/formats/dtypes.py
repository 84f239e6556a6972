"""Torch dtypes and formats: which dtype holds a format, and float64 inputs narrowed to float32
so that rounding them to a format rounds once (pure)."""

from __future__ import annotations

import torch
from torch import Tensor

from precsim.formats.float import FloatFormat
from precsim.formats.parse import Format
from precsim.formats.rounding import Rounding, exponent_of, float_bits

_HOLDS = {  # dtype -> (mantissa bits, max exponent, exponent of smallest subnormal)
    torch.float16: (10, 15, -24),
    torch.bfloat16: (7, 127, -133),
    torch.float64: (52, 1023, -1074),
}


def holds(dtype: torch.dtype, fmt: Format) -> bool:
    """Whether ``dtype`` can represent every value of ``fmt``."""
    if dtype == torch.float64:
        return True
    if not isinstance(fmt, FloatFormat) or dtype not in _HOLDS:
        return False
    m, emax, emin_sub = _HOLDS[dtype]
    return (
        fmt.mantissa_bits <= m
        and fmt.max_exponent <= emax
        and fmt.min_exponent - fmt.mantissa_bits >= emin_sub
        and (fmt.has_inf or fmt.overflow != "inf")
    )


def _truncate_to_float32(x: Tensor) -> tuple[Tensor, Tensor]:
    """float64 -> float32 rounded toward zero, and whether that was inexact."""
    y = x.to(torch.float32)
    bits = float_bits(y)
    away = (y.to(torch.float64).abs() > x.abs()) & torch.isfinite(x)  # incl. finite x that became Inf
    truncated = torch.where(away, bits - 1, bits).view(torch.float32)  # one ulp back toward zero
    inexact = (truncated.to(torch.float64) != x) & torch.isfinite(x)
    return truncated, inexact


def narrow_float64(x: Tensor, fmt: Format, rounding: Rounding = "nearest") -> Tensor:
    """float64 -> float32 such that rounding the result to ``fmt`` rounds ``x`` only once.

    ``toward_zero``: truncation (exact for every format). Otherwise rounding to odd, exact
    wherever float32 keeps at least 2 more bits than the format. For a FloatFormat rounded to
    nearest, the places where it keeps fewer (22-23 mantissa bits, spacing 2^-148 or 2^-149) are
    exact too: with no extra bit float32's own RNE is the answer; with one, the odd float32
    value between two format values is their midpoint, and an inexact ``x`` above it moves to
    the upper one. Stochastic rounding of float64 inputs resolves probabilities at float32's
    precision.
    """
    truncated, inexact = _truncate_to_float32(x)
    if rounding == "toward_zero":
        return truncated
    bits = float_bits(truncated)
    odd = torch.where(inexact, bits | 1, bits)
    if rounding != "nearest" or not isinstance(fmt, FloatFormat):
        return odd.view(torch.float32)
    e = exponent_of(truncated)
    extra = e.clamp(min=fmt.min_exponent) - fmt.mantissa_bits - e.clamp(min=-126) + 23  # float32 bits kept
    above_mid = torch.where(inexact & ((bits & 1) == 1), bits + 1, bits)
    rne = float_bits(x.to(torch.float32))
    return torch.where(extra >= 2, odd, torch.where(extra == 1, above_mid, rne)).view(torch.float32)
