"""I-BERT's i-GELU: bit-exact against a plain-Python reference, and its error against the exact GELU."""

from __future__ import annotations

import math

import pytest
import torch

from precsim.integer.ibert_ops import ERF_A, ERF_B, i_gelu_int, prepare_i_gelu
from precsim.integer.ops import QParams, op_from_state
from precsim.integer.text_ops import IGeluOp
from precsim.integer.vit_ops import consts_state

SCALES = [(0.08 / 256, 0.08), (0.05, 0.05), (1e-3, 2e-2), (0.3, 0.1)]
WIDE = [(2.93e-6, 7.5e-4, 16)]  # MiniLM's GELU at int16: the input grid is rounded 2^r coarser first


def ref_i_gelu(q: int, scale: float, out_scale: float, bits: int = 8) -> int:
    """The paper's formulas in Python integers and floats, element by element (constants rounded to
    nearest), on the input grid the constants chose (``in_shift``)."""
    k = prepare_i_gelu(scale, out_scale, bits)
    r = k.in_shift
    grid = scale * 2**r
    s = grid / math.sqrt(2.0)
    s_poly = ERF_A * s * s
    q_b, q_c, q_1 = round(ERF_B / s), round(1 / s_poly), round(1 / s_poly)
    qmin, qmax = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x_hi = max(-q_b, math.ceil((qmax + 1) * out_scale / grid) + 1)
    if r:
        q = (q + (1 << (r - 1))) >> r
    q = min(max(q, q_b), x_hi)
    t = min(abs(q), -q_b) + q_b
    sign = (q > 0) - (q < 0)
    erf = sign * (t * t + q_c)
    v = (-q * (erf + q_1) * k.out_mult + (1 << (k.out_shift - 1))) >> k.out_shift
    return min(max(v, qmin), qmax)


@pytest.mark.parametrize(("scale", "out_scale", "bits"), [(a, b, 8) for a, b in SCALES] + WIDE)
def test_i_gelu_is_bit_exact(scale: float, out_scale: float, bits: int) -> None:
    k = prepare_i_gelu(scale, out_scale, bits)
    hi = int(12 / scale)
    x = torch.cat([torch.arange(-2000, 2000), torch.randint(-hi, hi, (3000,), generator=torch.Generator().manual_seed(0)),
                   torch.tensor([-(2**31), 2**31 - 1, k.q_b - 1, k.q_b, k.q_b + 1, -k.q_b, k.x_hi, k.x_hi + 1])])
    got = i_gelu_int(x, k)
    want = torch.tensor([ref_i_gelu(int(v), scale, out_scale, bits) for v in x], dtype=torch.int32)
    assert got.dtype == torch.int32 and torch.equal(got, want)


@pytest.mark.parametrize(("scale", "out_scale", "bits"), [(a, b, 8) for a, b in SCALES] + WIDE)
def test_i_gelu_error_against_the_exact_gelu(scale: float, out_scale: float, bits: int) -> None:
    k = prepare_i_gelu(scale, out_scale, bits)
    top = (1 << (bits - 1)) - 1
    x = torch.linspace(-8 / scale, min(12, top * out_scale) / scale, 200_001).round().to(torch.int64)
    exact = torch.nn.functional.gelu(x.double() * scale)
    err = (i_gelu_int(x, k).double() * out_scale - exact).abs().max().item()
    assert err < 0.0185 + out_scale / 2 + scale * 2**k.in_shift  # the erf polynomial's own error is 0.0182
    assert int(i_gelu_int(torch.tensor([-(2**31)]), k)) == 0 and int(i_gelu_int(torch.tensor([2**31 - 1]), k)) == top


def test_i_gelu_refuses_a_grid_too_coarse() -> None:
    with pytest.raises(ValueError, match="too coarse"):
        prepare_i_gelu(4.0, 0.1)
    with pytest.raises(ValueError, match="finite and > 0"):
        prepare_i_gelu(0.0, 0.1)


def test_i_gelu_op_round_trip() -> None:
    k = prepare_i_gelu(0.01, 0.05)
    op = IGeluOp("gelu", ["x"], "y", QParams(0.01, 0, -(2**31), 2**31 - 1), QParams(0.05, 0, -128, 127),
                 consts_state(k))
    x = torch.randint(-2000, 2000, (4, 7, 9))
    again = op_from_state(op.state())
    assert torch.equal(again.run(x), op.run(x)) and op.run(x).dtype == torch.int8
    assert torch.equal(op.reference(x), op.run(x).to(torch.int64))
