"""I-BERT's integer GELU (Kim et al., "I-BERT: Integer-only BERT Quantization", ICML 2021).

``GELU(x) = x/2 (1 + erf(x / sqrt 2))`` with ``erf`` replaced by a second-order polynomial,
``L(u) = sgn(u) (a (min(|u|, -b) + b)^2 + 1)``, ``a = -0.2888``, ``b = -1.769``: on integer
codes that is one square, adds and one dyadic requantization. Its worst error against the exact
GELU, before the output rounding, is 0.0182 (measured on a 1e-3 input grid) against ShiftGELU's
0.0255 (``x sigmoid(1.702 x)`` and a shift exponential), and on an int8 output grid it
gives the exactly rounded code more often (97% vs 94% of inputs at MiniLM's scales), which
matters where that grid is coarse (MiniLM: docs/ibert.md).

As in :mod:`precsim.integer.ivit_ops`, ``prepare_i_gelu`` derives integer constants once (floats
allowed) and ``i_gelu_int`` runs on integer tensors only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from precsim.integer.fixedpoint import apply_dyadic, dyadic

__all__ = ["IGeluConsts", "i_gelu_int", "prepare_i_gelu"]

ERF_A = -0.2888
ERF_B = -1.769


@dataclass(frozen=True)
class IGeluConsts:
    """Constants of :func:`i_gelu_int` for input codes of scale ``scale``.

    ``in_shift`` r: the input codes are first rounded to a grid 2^r coarser (r > 0 only where a
    very fine input grid would overflow int64 below). ``q_b = round(b / s)`` and
    ``q_c = round(1 / (a s^2))`` with ``s = scale 2^r / sqrt 2`` (the scale of ``x / sqrt 2``): the polynomial ``(q + q_b)^2 + q_c`` has scale ``a s^2``;
    ``q_1 = round(1 / (a s^2))`` (negative, as ``a``) is that scale's 1; ``x_hi``: inputs above
    it saturate the output anyway; ``out_mult``/``out_shift``: dyadic ``~= scale |a| s^2 / 2 /
    out_scale``; ``qmin``/``qmax``: signed output range.
    """

    scale: float
    in_shift: int
    q_b: int
    q_c: int
    q_1: int
    x_hi: int
    out_mult: int
    out_shift: int
    qmin: int
    qmax: int
    out_scale: float


def prepare_i_gelu(scale: float, out_scale: float, out_bits: int = 8) -> IGeluConsts:
    """Constants for :func:`i_gelu_int`: input scale, output scale, signed output width.

    Deviation from I-BERT: the constants are rounded to nearest, not floored (I-BERT's floor
    biases the erf polynomial by up to one unit of its scale).
    """
    if not (math.isfinite(scale) and scale > 0 and math.isfinite(out_scale) and out_scale > 0):
        raise ValueError(f"scales must be finite and > 0, got {scale!r}, {out_scale!r}")
    if not 2 <= out_bits <= 32:
        raise ValueError(f"out_bits must be in [2, 32], got {out_bits}")
    qmin, qmax = -(1 << (out_bits - 1)), (1 << (out_bits - 1)) - 1
    want = min(31, max(16, out_bits + 12))  # multiplier bits: its rounding stays far below an output LSB
    for r in range(48):
        grid = math.ldexp(scale, r)
        s = grid / math.sqrt(2.0)
        s_poly = ERF_A * s * s
        q_b, q_c, q_1 = round(ERF_B / s), round(1.0 / s_poly), round(1.0 / s_poly)
        x_hi = max(-q_b, math.ceil((qmax + 1) * out_scale / grid) + 1)
        bits = min(31, 61 - (x_hi * 2 * abs(q_1) + 1).bit_length())
        if bits >= want:
            break
    else:  # pragma: no cover - r = 47 always leaves enough bits for a finite scale
        raise ValueError(f"scale {scale!r} / out_scale {out_scale!r}: no input grid fits int64")
    if q_b >= -1:
        raise ValueError(f"input scale {scale!r} is too coarse for i-GELU (b / s rounds to {q_b})")
    mult, shift = dyadic(grid * abs(s_poly) / 2 / out_scale, bits)
    return IGeluConsts(scale, r, q_b, q_c, q_1, x_hi, mult, shift, qmin, qmax, out_scale)


def i_gelu_int(x: Tensor, k: IGeluConsts) -> Tensor:
    """I-BERT i-GELU on codes ``x``; returns signed int32 codes of ``k.out_scale``.

    ``q = clamp(round_half_up(x / 2^r), q_b, x_hi)`` (below ``q_b`` the erf is -1 and GELU is exactly 0);
    ``erf = sgn(q) ((min(|q|, -q_b) + q_b)^2 + q_c)`` at scale ``a s^2``;
    ``out = round_half_up(-q (erf + q_1) * scale |a| s^2 / 2 / out_scale)`` (the minus: ``a < 0``),
    clamped to the signed range.
    """
    q = x.to(torch.int64)
    if k.in_shift:
        q = torch.bitwise_right_shift(q + (1 << (k.in_shift - 1)), k.in_shift)
    q = torch.clamp(q, k.q_b, k.x_hi)
    t = torch.clamp(q.abs(), max=-k.q_b) + k.q_b
    erf = torch.sign(q) * (t * t + k.q_c)
    out = apply_dyadic(-q * (erf + k.q_1), k.out_mult, k.out_shift, check=False)
    return torch.clamp(out, k.qmin, k.qmax).to(torch.int32)
