"""``quantize(x, fmt)``: the user-facing entry to every format."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from precsim.formats.base import Format
from precsim.formats.dtypes import holds, narrow_float64
from precsim.formats.parse import parse_format
from precsim.formats.random import draw_seed
from precsim.formats.rounding import Rounding, check_rounding
from precsim.runtime.backend import run_quantize


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
    allowed = ("random_bits", *fmt.params)
    bad = [k for k in params if k not in allowed]
    if bad:
        raise ValueError(f"{fmt.name}: unknown parameter {bad[0]!r}; allowed: {', '.join(allowed)}")
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise ValueError(f"quantize needs a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dtype == torch.float64:
        x32 = narrow_float64(x.detach(), fmt, rounding)
    else:
        x32 = x.detach().to(torch.float32)
    check = getattr(fmt, "check_params", None)  # a format may validate its parameters
    if check is not None:
        check(**{k: v for k, v in params.items() if k != "random_bits"})
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
        return y.to(x.dtype) if x.dtype != torch.float32 and holds(x.dtype, fmt) else y

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
