"""The fast rounding paths equal the general reference algorithm, bit for bit.

:func:`round_float` takes a shorter integer path for 1..22 mantissa bits, and a float32
addition for nearest rounding on constant normal grids; the general
:func:`round_float_reference` is the one checked against ml_dtypes and gfloat. Here they
must agree on every float32 exponent field, with edge-case and random mantissas, for every
rounding (stochastic given the same random bits), overflow mode and kind of grid (fixed,
reaching below 2^-126, per-block tensors of exponents), eager and compiled.
"""

from __future__ import annotations

import pytest
import torch

from precsim.formats.rounding import _float_add_rounds, exp2i, round_float, round_float_reference
from precsim.runtime.backend import call, compile_enabled, set_compile


def _inputs() -> torch.Tensor:
    """Every exponent field x edge-case and random mantissas, both signs, plus random patterns."""
    g = torch.Generator().manual_seed(0)
    edges = torch.tensor([0, 1, 2, 3, 0x3FFFFF, 0x400000, 0x400001, 0x7FFFFF, 0x7FFFFE, 0x200000, 0x100000,
                          0x080000, 0x0C0000, 0x600000, 0x000100, 0x000080], dtype=torch.int32)
    rand = torch.randint(0, 0x800000, (48,), dtype=torch.int32, generator=g)
    mant = torch.cat([edges, rand])
    exps = torch.arange(256, dtype=torch.int32)
    grid = ((exps[:, None] << 23) | mant[None, :]).reshape(-1)
    noise = torch.randint(-(2**31), 2**31 - 1, (20000,), dtype=torch.int32, generator=g)
    mags = torch.cat([grid, noise & 0x7FFFFFFF])
    return torch.cat([mags, mags | -(2**31)]).view(torch.float32)


# (mantissa bits, min exponent, max value, overflow, negative zero): fp8/fp6/fp4/bf16/fp16 grids,
# HFP8 (b=-4), grids reaching below 2^-126, fn/fnuz maxima, every overflow mode
GRIDS = [
    (3, -6, 448.0, "saturate", True),
    (3, -6, 448.0, "nan", True),
    (2, -14, 57344.0, "inf", True),
    (3, -7, 240.0, "saturate", False),
    (3, -10, 15.0 * 2**4, "inf", True),
    (3, 1, 7.5, "saturate", True),
    (1, 0, 6.0, "saturate", True),
    (7, -126, float(torch.finfo(torch.bfloat16).max), "inf", True),
    (10, -14, 65504.0, "inf", True),
    (7, -135, 2.0**118, "inf", True),
    (3, -138, 2.0**-120, "saturate", True),
    (10, -139, 2.0**-100, "inf", True),
    (22, -126, 3.0e38, "inf", True),
    (7, -126, float(torch.finfo(torch.bfloat16).max), "saturate", False),
    (4, -126, 2.0**120, "nan", True),
    (1, -148, 2.0**-140, "saturate", True),
]


@pytest.mark.parametrize("rounding", ["nearest", "toward_zero", "stochastic"])
@pytest.mark.parametrize(("m", "emin", "maxv", "overflow", "negzero"), GRIDS)
def test_fast_equals_reference(m: int, emin: int, maxv: float, overflow: str, negzero: bool, rounding: str) -> None:
    x = _inputs()
    rb = torch.randint(-(2**31), 2**31 - 1, x.shape, dtype=torch.int32, generator=torch.Generator().manual_seed(1))
    kw = dict(mantissa_bits=m, min_exponent=emin, max_value=maxv, overflow=overflow, negative_zero=negzero,
              rounding=rounding, random_bits=rb)
    fast, ref = round_float(x, **kw), round_float_reference(x, **kw)  # type: ignore[arg-type]
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("rounding", ["nearest", "toward_zero", "stochastic"])
@pytest.mark.parametrize(("m", "emin", "emax", "mx"), [(3, -6, 8, 448.0), (2, -14, 15, 57344.0), (1, 0, 2, 6.0)])
def test_fast_equals_reference_per_block(m: int, emin: int, emax: int, mx: float, rounding: str) -> None:
    """Tensor exponents as MX blocks and DSE use them: shared exponents from -127 to 127."""
    x = _inputs()
    x = x[: x.numel() // 32 * 32].reshape(-1, 32)
    shared = torch.randint(-127, 128, (x.shape[0], 1), dtype=torch.int32, generator=torch.Generator().manual_seed(2))
    shared[:40] = -127 + torch.arange(40, dtype=torch.int32)[:, None] % 8  # the bottom of the range
    rb = torch.randint(-(2**31), 2**31 - 1, x.shape, dtype=torch.int32, generator=torch.Generator().manual_seed(3))
    kw = dict(mantissa_bits=m, min_exponent=emin + shared, max_value=mx * exp2i(shared), overflow="saturate",
              negative_zero=True, rounding=rounding, random_bits=rb)
    fast, ref = round_float(x, **kw), round_float_reference(x, **kw)  # type: ignore[arg-type]
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))


@pytest.mark.parametrize("rounding", ["nearest", "toward_zero", "stochastic"])
@pytest.mark.parametrize(("m", "emin", "emax", "mx", "overflow"),
                         [(3, -6, 8, 448.0, "saturate"), (2, -14, 15, 57344.0, "inf"), (1, 0, 2, 6.0, "saturate")])
def test_normal_grid_path_equals_reference(m: int, emin: int, emax: int, mx: float, overflow: str,
                                           rounding: str) -> None:
    """``normal_grid=True`` (a DSE shift read first) with every tensor exponent whose grid stays
    at or above 2^-126, down to exactly -126, gives the reference's bits."""
    x = _inputs()
    x = x[: x.numel() // 32 * 32].reshape(-1, 32)
    lowest = -126 - emin  # the smallest shift that keeps the grid normal
    shared = torch.randint(lowest, 128 - emax, (x.shape[0], 1), dtype=torch.int32,
                           generator=torch.Generator().manual_seed(4))
    shared[:40] = lowest + torch.arange(40, dtype=torch.int32)[:, None] % 4
    rb = torch.randint(-(2**31), 2**31 - 1, x.shape, dtype=torch.int32, generator=torch.Generator().manual_seed(5))
    kw = dict(mantissa_bits=m, min_exponent=emin + shared, max_value=mx * exp2i(shared), overflow=overflow,
              negative_zero=True, rounding=rounding, random_bits=rb)
    fast = round_float(x, normal_grid=True, **kw)  # type: ignore[arg-type]
    ref = round_float_reference(x, **kw)  # type: ignore[arg-type]
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))


ADDITION_GRIDS = [g for g in GRIDS if _float_add_rounds(g[0], g[1], g[2])]


def test_float_addition_takes_the_narrow_grids() -> None:
    """fp8/fp6/fp4/fp16-like grids take the float-addition path; bf16-like and grids below
    2^-126 (whose magic constant would leave float32) do not."""
    assert [g[:3] for g in ADDITION_GRIDS] == [g[:3] for g in GRIDS[:7]] + [GRIDS[8][:3]]


def _round(x: torch.Tensor, m: int, emin: int, maxv: float, overflow: str, negzero: bool) -> torch.Tensor:
    return round_float(x, mantissa_bits=m, min_exponent=emin, max_value=maxv, overflow=overflow,  # type: ignore[arg-type]
                       negative_zero=negzero, rounding="nearest")


@pytest.mark.parametrize(("m", "emin", "maxv", "overflow", "negzero"), [GRIDS[0], GRIDS[2], GRIDS[3], GRIDS[1]])
def test_float_addition_compiled_equals_reference(m: int, emin: int, maxv: float, overflow: str,
                                                  negzero: bool, requires_compiler: None) -> None:
    """Compiled, (x + c) - c is done as written (no reassociation, subnormals kept)."""
    x = _inputs()
    before = compile_enabled()
    set_compile(True)
    try:
        fast = call(_round, x, (), (m, emin, maxv, overflow, negzero), flat=True)
    finally:
        set_compile(before)
    ref = round_float_reference(x, mantissa_bits=m, min_exponent=emin, max_value=maxv, overflow=overflow,  # type: ignore[arg-type]
                                negative_zero=negzero, rounding="nearest")
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))


def _round_with(x: torch.Tensor, rb: torch.Tensor, m: int, emin: int, maxv: float, overflow: str, negzero: bool,
                rounding: str) -> torch.Tensor:
    return round_float(x, mantissa_bits=m, min_exponent=emin, max_value=maxv, overflow=overflow,  # type: ignore[arg-type]
                       negative_zero=negzero, rounding=rounding, random_bits=rb)  # type: ignore[arg-type]


FIXED_GRIDS = [g for g in GRIDS if g[1] == -126 and not _float_add_rounds(g[0], g[1], g[2])]


@pytest.mark.parametrize("rounding", ["nearest", "toward_zero", "stochastic"])
@pytest.mark.parametrize(("m", "emin", "maxv", "overflow", "negzero"), FIXED_GRIDS)
def test_fixed_shift_compiled_equals_reference(m: int, emin: int, maxv: float, overflow: str, negzero: bool,
                                               rounding: str, requires_compiler: None) -> None:
    """Grids whose smallest normal is 2^-126 (bf16-like) drop a constant 23 - m bits from every
    float32, subnormals included: compiled, the reference's bits for every rounding."""
    assert len(FIXED_GRIDS) == 4
    x = _inputs()
    rb = torch.randint(-(2**31), 2**31 - 1, x.shape, dtype=torch.int32, generator=torch.Generator().manual_seed(6))
    before = compile_enabled()
    set_compile(True)
    try:
        fast = call(_round_with, x, (rb,), (m, emin, maxv, overflow, negzero, rounding), flat=True)
    finally:
        set_compile(before)
    ref = round_float_reference(x, mantissa_bits=m, min_exponent=emin, max_value=maxv, overflow=overflow,  # type: ignore[arg-type]
                                negative_zero=negzero, rounding=rounding, random_bits=rb)  # type: ignore[arg-type]
    assert torch.equal(fast.view(torch.int32), ref.view(torch.int32))
