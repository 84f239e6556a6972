"""``quantize(x, fmt)``: the user-facing entry to every format."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from precsim.formats.float import FloatFormat
from precsim.formats.parse import Format, parse_format
from precsim.formats.random import draw_seed
from precsim.formats.rounding import Rounding, check_rounding, float_bits

_HOLDS = {  # dtype -> (mantissa bits, max exponent, exponent of smallest subnormal)
    torch.float16: (10, 15, -24),
    torch.bfloat16: (7, 127, -133),
    torch.float64: (52, 1023, -1074),
}


def _holds(dtype: torch.dtype, fmt: Format) -> bool:
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


def to_float32_round_to_odd(x: Tensor) -> Tensor:
    """float64 -> float32 rounding to odd, so a later rounding to <= 22 bits is not a double one."""
    y = x.to(torch.float32)
    bits = float_bits(y)
    away = y.to(torch.float64).abs() > x.abs()
    bits = torch.where(away & torch.isfinite(y), bits - 1, bits)  # one ulp back toward zero
    truncated = bits.view(torch.float32)
    inexact = (truncated.to(torch.float64) != x) & torch.isfinite(truncated) & torch.isfinite(x)
    return torch.where(inexact, bits | 1, bits).view(torch.float32)


def quantize(
    x: Tensor,
    fmt: str | Format,
    *,
    rounding: Rounding = "nearest",
    generator: torch.Generator | None = None,
    **params: Any,
) -> Tensor:
    """Round ``x`` to ``fmt``: every output value is exactly representable in the format.

    ``rounding`` is ``nearest`` (ties to even), ``stochastic`` (random bits from a seed drawn
    from ``generator``, or torch's default generator) or ``toward_zero``. ``params`` go to the
    format: ``scale``/``zero_point`` for integers, ``shift`` for DSE, ``random_bits`` for
    explicit stochastic-rounding bits.

    float32 is computed as is. bfloat16/float16 inputs are computed in float32; float64 inputs
    are narrowed to float32 by rounding to odd (exact for formats of at most 22 mantissa bits).
    The result has the input's dtype when that dtype holds every value of the format, else
    float32.
    """
    fmt = parse_format(fmt)
    check_rounding(rounding)
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"quantize needs a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dtype == torch.float64:
        x32 = to_float32_round_to_odd(x)
    else:
        x32 = x.to(torch.float32)
    seed = None
    if rounding == "stochastic" and "random_bits" not in params:
        seed = draw_seed(generator, x.device)
    y = fmt.quantize(x32, rounding, seed=seed, **params)
    if x.dtype != torch.float32 and _holds(x.dtype, fmt):
        return y.to(x.dtype)
    return y
