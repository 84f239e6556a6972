"""DSE (FlexFP with a per-tensor shift from the data)."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from precsim.formats import DSEFormat, FloatFormat, parse_format
from precsim.formats.rounding import exp2i, round_float_reference
from precsim.runtime import quantize

from ._helpers import F32, assert_same_bits

SPECS = ["dse(e=4,m=3)", "dse(e=5,m=2)", "dse(e=4,m=3,specials=fn)", "dse(e=3,m=4)", "dse(e=2,m=1,specials=finite)",
         "dse(e=8,m=7)", "dse(e=5,m=10)", "dse(e=4,m=0)"]


def tensors(seed: int):
    g = np.random.default_rng(seed)
    for log_scale in (-140, -120, -60, -10, 0, 7, 40, 100, 120):
        x = (g.standard_normal((8, 16)) * 2.0**log_scale).astype(F32)
        yield x
    # max |x| just below a power of two, exactly at one, and at the top-rounding edge
    yield np.array([np.nextafter(F32(1024), F32(0)), 0.3, -7], dtype=F32)
    yield np.array([-1024.0, 0.25, 3.0], dtype=F32)
    yield np.array([239.0, 1.0, 248.0 * 2**-20], dtype=F32)
    yield np.array([float("nan"), float("inf"), 3.0, -100.0], dtype=F32)


@pytest.mark.parametrize("spec", SPECS)
def test_output_representable_with_shift_for(spec: str) -> None:
    fmt = parse_format(spec)
    assert isinstance(fmt, DSEFormat)
    e = fmt.element
    for x in tensors(1):
        xt = torch.from_numpy(x)
        b = int(fmt.shift_for(xt))
        lo, hi = fmt.shift_range
        assert lo <= b <= hi
        y = fmt.quantize(xt)
        shifted = FloatFormat(e.exponent_bits, e.mantissa_bits, b, e.specials, e.overflow)
        # representable in flexfp(e, m, b): quantizing again is the identity ...
        assert_same_bits(shifted.quantize(y), y.numpy(), x, f"{spec} b={b}")
        # ... and equals rounding x in that fixed format
        assert_same_bits(y, shifted.quantize(xt).numpy(), x, f"{spec} b={b}")
        fin = np.isfinite(x)
        top = np.abs(y.numpy()[fin]).max()
        if np.abs(x[fin]).max() > 0 and b > lo:
            # the largest magnitude lands in the top binade and does not overflow. Exception:
            # "fn" formats, whose top binade lacks its last value (the NaN code): a max |x| that
            # rounds to that code gets one more shift and is then exact one binade lower.
            assert top <= e.max * 2.0**b, (spec, b, top)
            if e.specials == "fn" and top == (2 - 2.0**-e.mantissa_bits) * 2.0 ** (e.max_exponent - 1 + b):
                continue
            assert 2.0 ** (e.max_exponent + b) <= top, (spec, b, top)
        assert np.isfinite(y.numpy()[fin]).all()


def test_representable_checked_independently_with_ml_dtypes() -> None:
    """dse(e=4,m=3) / dse(e=5,m=2) outputs, divided by 2^b, are float8_e4m3 / float8_e5m2 values."""
    for spec, dtype in (("dse(e=4,m=3)", ml_dtypes.float8_e4m3), ("dse(e=5,m=2)", ml_dtypes.float8_e5m2)):
        fmt = parse_format(spec)
        for x in list(tensors(2))[:-1]:
            xt = torch.from_numpy(x)
            b = int(fmt.shift_for(xt))
            y = fmt.quantize(xt).numpy().astype(np.float64) * 2.0**-b
            assert np.array_equal(y.astype(dtype).astype(np.float64), y), spec


def test_fn_top_code_edge() -> None:
    """E4M3FN: max 448 = 1.75 * 2^8; 1.875 * 2^8 is the NaN code. A max |x| of 470 rounds to that
    code, so the shift goes up by one and 470 -> 480 is exact in the binade below the top (the
    alternative, saturating to 448, would lose 5% on the largest value)."""
    fmt = parse_format("dse(e=4,m=3,specials=fn)")
    x = torch.tensor([470.0, 1.0])
    assert int(fmt.shift_for(x)) == 1
    assert fmt.quantize(x)[0] == 480
    x = torch.tensor([460.0, 1.0])  # rounds to 448: no extra shift
    assert int(fmt.shift_for(x)) == 0 and fmt.quantize(x)[0] == 448


def test_top_binade_edge() -> None:
    """max |x| that would round past the element max bumps the shift by one."""
    fmt = parse_format("dse(e=4,m=3)")  # IEEE-style E4M3: max 240 = 1.875 * 2^7
    x = torch.tensor([247.0, 1.0])  # rounds to 240 (the tie is 248)
    assert int(fmt.shift_for(x)) == 0 and fmt.quantize(x)[0] == 240
    x = torch.tensor([249.0, 1.0])  # would round to 256: shift one more
    assert int(fmt.shift_for(x)) == 1 and fmt.quantize(x)[0] == 256
    x = torch.tensor([248.0, 1.0])  # the tie goes to even, 256
    assert int(fmt.shift_for(x)) == 1 and fmt.quantize(x)[0] == 256
    x = torch.tensor([np.nextafter(F32(256), F32(0)), 1.0])  # just below 2^8: exponent 7 from the bits
    assert int(fmt.shift_for(x)) == 1 and fmt.quantize(x)[0] == 256


def test_delayed_uses_given_shift() -> None:
    fmt = parse_format("dse(e=4,m=3,delayed=true)")
    assert fmt.delayed
    x = torch.randn(64, generator=torch.Generator().manual_seed(0)) * 1000
    for s in (-3, 0, 2, 9):
        y = quantize(x, fmt, shift=s)
        assert torch.equal(y, FloatFormat(4, 3, s).quantize(x))
        assert torch.equal(y, fmt.quantize(x, shift=torch.tensor(s, dtype=torch.int32)))
    with pytest.raises(ValueError, match="delayed: pass shift="):
        fmt.quantize(x)
    # the non-delayed variant also accepts an explicit shift
    assert torch.equal(quantize(x, "dse(e=4,m=3)", shift=2), FloatFormat(4, 3, 2).quantize(x))


def test_all_zero_and_empty() -> None:
    fmt = parse_format("dse(e=4,m=3)")
    z = torch.zeros(5, 7)
    assert int(fmt.shift_for(z)) == 0
    assert torch.equal(fmt.quantize(z), z)
    neg = -torch.zeros(3)
    assert torch.signbit(fmt.quantize(neg)).all()
    assert fmt.quantize(torch.zeros(0)).shape == (0,)
    nan_only = torch.tensor([float("nan"), 0.0])
    assert int(fmt.shift_for(nan_only)) == 0


def test_shift_clamped_to_float32() -> None:
    fmt = parse_format("dse(e=5,m=2)")
    lo, hi = fmt.shift_range
    assert int(fmt.shift_for(torch.tensor([2.0**-149]))) == lo
    assert int(fmt.shift_for(torch.tensor([3e38]))) == hi
    y = fmt.quantize(torch.tensor([1e-45, 2.0**-140]))
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])  # stochastic keeps the shifted grid
@pytest.mark.parametrize("spec", SPECS + ["dse(e=4,m=3,overflow=nan)", "dse(e=5,m=2,overflow=saturate)"])
def test_scaled_rounding_equals_the_shifted_grid(spec: str, rounding: str) -> None:
    """Rounding x / 2^b on the element grid, times 2^b (where exact), gives the bits of the
    general rounding on the grid shifted by b: with the tensor's own shift and with stale
    (delayed) shifts 6 binades off either way, so that values overflow or fall below the grid;
    tensors at both ends of the shift range (the scale factor 2^-b beyond float32), float32
    subnormals beside large values, ties, specials and a signaling NaN's payload."""
    fmt = parse_format(spec)
    g = torch.Generator().manual_seed(11)
    cases = []
    for log_scale in (-148, -140, -127, -100, -20, 0, 30, 100, 126, 127):
        x = torch.randn(64, 48, generator=g) * 2.0**log_scale
        x[0, :16] *= torch.exp2(-torch.arange(16, dtype=torch.float32) * 8)  # down to float32 subnormals
        cases.append(x)
    ties = (torch.randint(-64, 64, (64, 48), generator=g) * 2 + 1).float() * 2.0**-7  # odd multiples of half a step
    ties[0, 0] = 120.0
    cases.append(ties)
    special = torch.randn(8, 8, generator=g)
    special.view(-1)[:5] = torch.tensor([float("inf"), -float("inf"), -0.0, 0.0, 3e38])
    special.view(torch.int32).view(-1)[5] = 0x7F800001  # a signaling NaN keeps its bits
    cases.append(special)
    for x in cases:
        rb = torch.randint(-(2**31), 2**31 - 1, x.shape, dtype=torch.int32, generator=g)
        kw = {"random_bits": rb} if rounding == "stochastic" else {}
        got, b = fmt.quantize_measured(x, rounding, **kw)
        assert torch.equal(b, fmt.shift_for(x))
        assert torch.equal(got.view(torch.int32), _shifted_reference(fmt, x, b, rounding, **kw).view(torch.int32))
        lo, hi = fmt.shift_range
        for stale in (b - 6, b + 6, torch.tensor(lo), torch.tensor(hi)):
            stale = stale.clamp(lo, hi).to(torch.int32)
            got = fmt.quantize(x, rounding, shift=stale, **kw)
            want = _shifted_reference(fmt, x, stale, rounding, **kw)
            assert torch.equal(got.view(torch.int32), want.view(torch.int32)), (spec, rounding, int(stale))


def _shifted_reference(fmt, x: torch.Tensor, b: torch.Tensor, rounding: str, **kw) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """The general rounding (round_float_reference) on the element grid shifted by b."""
    e = fmt.element
    return round_float_reference(x, mantissa_bits=e.mantissa_bits, min_exponent=e.min_exponent + b,
                                  max_value=e.max * exp2i(b), overflow=e.overflow, negative_zero=e.has_negative_zero,
                                  rounding=rounding, random_bits=kw.get("random_bits"))
