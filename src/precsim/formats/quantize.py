"""``quantize(x, fmt)``: the user-facing entry to every format."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from precsim.formats.backend import run_quantize
from precsim.formats.block import BlockFormat
from precsim.formats.dse import DSEFormat
from precsim.formats.float import FloatFormat
from precsim.formats.integer import IntFormat
from precsim.formats.parse import Format, parse_format
from precsim.formats.random import draw_seed
from precsim.formats.rounding import Rounding, check_rounding, exponent_of, float_bits

_PARAMS: tuple[tuple[type, tuple[str, ...]], ...] = (  # the keyword parameters each kind accepts
    (FloatFormat, ("random_bits",)),
    (IntFormat, ("random_bits", "scale", "zero_point")),
    (DSEFormat, ("random_bits", "shift")),
    (BlockFormat, ("random_bits",)),
)
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


def _truncate_to_float32(x: Tensor) -> tuple[Tensor, Tensor]:
    """float64 -> float32 rounded toward zero, and whether that was inexact."""
    y = x.to(torch.float32)
    bits = float_bits(y)
    away = (y.to(torch.float64).abs() > x.abs()) & torch.isfinite(x)  # incl. finite x that became Inf
    truncated = torch.where(away, bits - 1, bits).view(torch.float32)  # one ulp back toward zero
    inexact = (truncated.to(torch.float64) != x) & torch.isfinite(x)
    return truncated, inexact


def to_float32_round_to_odd(x: Tensor) -> Tensor:
    """float64 -> float32 rounding to odd, so a later rounding to <= 22 bits is not a double one."""
    truncated, inexact = _truncate_to_float32(x)
    bits = float_bits(truncated)
    return torch.where(inexact, bits | 1, bits).view(torch.float32)


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
    are narrowed to float32 so that the result is rounded once (see :func:`narrow_float64`).
    The result has the input's dtype when that dtype holds every value of the format, else
    float32. An empty tensor gives an empty result of that dtype and shape.

    Autograd, the same for every format: the straight-through estimator. Where ``x`` requires
    grad, the result does, and its gradient reaches ``x`` unchanged (no clipping: a quantizer
    of :func:`precsim.prepare` clips where it saturates, this function does not); parameters
    such as ``scale`` get no gradient, and an automatic scale is a constant of the call.
    """
    fmt = parse_format(fmt)
    check_rounding(rounding)
    allowed = next(names for kind, names in _PARAMS if isinstance(fmt, kind))
    bad = [k for k in params if k not in allowed]
    if bad:
        raise ValueError(f"{fmt.name}: unknown parameter {bad[0]!r}; allowed: {', '.join(allowed)}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"quantize needs a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dtype == torch.float64:
        x32 = narrow_float64(x.detach(), fmt, rounding)
    else:
        x32 = x.detach().to(torch.float32)
    if isinstance(fmt, IntFormat) and params.get("scale") is not None:
        fmt.check_qparams(params["scale"], params.get("zero_point"))
    seed = None
    if rounding == "stochastic" and "random_bits" not in params:
        seed = draw_seed(generator, x.device)
    # numbers as the tensors the format makes of them: a kernel then serves every value
    params = {k: torch.as_tensor(v, dtype=torch.int32 if k == "shift" else torch.float32, device=x.device)
              if isinstance(v, (int, float)) else v for k, v in params.items()}
    if getattr(fmt, "group_size", None) is not None and x.dim() == 0:
        raise ValueError(f"{fmt.name} scales groups along an axis; a 0-d tensor has none")

    def compute() -> Tensor:
        y = run_quantize(fmt, x32, rounding, seed, **params) if x32.numel() else x32.clone()
        return y.to(x.dtype) if x.dtype != torch.float32 and _holds(x.dtype, fmt) else y

    if x.requires_grad and torch.is_grad_enabled():
        return _StraightThrough.apply(x, compute)
    with torch.no_grad():
        return compute()


class _StraightThrough(torch.autograd.Function):
    """``compute()`` forward, the incoming gradient unchanged (in ``x``'s dtype) backward."""

    @staticmethod
    def forward(ctx, x: Tensor, compute: Any) -> Tensor:  # type: ignore[override]
        ctx.dtype = x.dtype
        return compute()

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return grad.to(ctx.dtype), None
