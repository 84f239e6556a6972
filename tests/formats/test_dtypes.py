"""Input dtypes: bf16/fp16 come back in their own dtype when it holds the format; float64 is
narrowed so that the result is the correctly rounded value of the float64 input itself."""

from __future__ import annotations

import gfloat
import ml_dtypes
import numpy as np
import pytest
import torch
from gfloat import RoundMode

from precsim.formats import parse_format
from precsim.runtime import quantize

from ._helpers import F32, assert_same_bits
from .test_vs_gfloat import gfloat_info


@pytest.mark.parametrize(
    "dtype,spec,out",
    [
        (torch.float16, "fp8_e4m3", torch.float16),
        (torch.float16, "fp8_e5m2", torch.float16),
        (torch.float16, "fp16", torch.float16),
        (torch.float16, "fp4_e2m1", torch.float16),
        (torch.float16, "bf16", torch.float32),  # bf16's range does not fit in fp16
        (torch.float16, "fp8_e4m3fnuz", torch.float16),
        (torch.float16, "hfp8_fwd", torch.float16),
        (torch.float16, "flexfp(e=5,m=10,b=-1)", torch.float32),  # subnormals below fp16's
        (torch.float16, "int8", torch.float32),
        (torch.float16, "mxfp8_e4m3", torch.float32),
        (torch.bfloat16, "fp8_e4m3", torch.bfloat16),
        (torch.bfloat16, "bf16", torch.bfloat16),
        (torch.bfloat16, "fp16", torch.float32),  # 10 mantissa bits do not fit in bf16
        (torch.bfloat16, "dse(e=4,m=3)", torch.float32),
        (torch.float32, "fp8_e4m3", torch.float32),
        (torch.float64, "fp8_e4m3", torch.float64),
        (torch.float64, "int8", torch.float64),
        (torch.float64, "mxfp4", torch.float64),
    ],
)
def test_output_dtype(dtype, spec, out) -> None:
    x = (torch.randn(4, 32, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    y = quantize(x, spec)
    assert y.dtype == out
    # the values are those of the float32 computation on the (exactly converted) input
    assert torch.equal(y.float(), quantize(x.float(), spec))


def test_low_precision_inputs_round_like_float32() -> None:
    """Every fp16 / bf16 value goes through float32 exactly; fp8 results equal ml_dtypes'."""
    h = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.float16)
    b = torch.arange(2**16, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    for x in (h, b):
        y = quantize(x, "fp8_e4m3(overflow=nan)")
        assert y.dtype == x.dtype
        with np.errstate(invalid="ignore", over="ignore"):
            want = x.float().numpy().astype(ml_dtypes.float8_e4m3fn).astype(F32)
        assert_same_bits(y.float(), want, x.float().numpy(), str(x.dtype))


def double_rounding_inputs(values: np.ndarray, rng) -> np.ndarray:
    """float64 values a hair off the midpoints of a format: through float32 RNE they would land
    exactly on the midpoint and then tie to even (double rounding)."""
    v = np.unique(np.abs(values[np.isfinite(values)]).astype(np.float64))
    mids = (v[:-1] + v[1:]) / 2

    def eps(a):  # far below float32's half ulp at a
        return np.where(a > 0, np.ldexp(1.0, np.frexp(a)[1] - 40), 2.0**-1070)

    x = np.concatenate([mids, mids + eps(mids), mids - eps(mids), v, v + eps(v), v - eps(v),
                        rng.uniform(0, 2 * v[-1], 2000), np.exp2(rng.uniform(-160, 140, 2000))])
    return np.concatenate([x, -x, [0.0, np.inf, -np.inf, 1e300, -1e300, 1e-300]])


def test_float64_just_above_a_midpoint_is_rounded_once() -> None:
    """A float64 a hair above a midpoint of the format rounds up: 1 + 2^-4 + 2^-40 is 1.125 in
    E4M3 and 1 + 2^-8 + 2^-40 is 1 + 2^-7 in bf16 (correct rounding, worked out by hand). A
    detour through float32 would land on the midpoint and tie to even (1.0): the float32 value
    of the same input is already that midpoint, and does round to 1.0. (Some releases of
    ml_dtypes narrow float64 through float32; precsim's contract does not depend on which.)"""
    x = np.array([1 + 2**-4 + 2**-40, 1 + 2**-8 + 2**-40])
    assert quantize(torch.from_numpy(x[:1]), "fp8_e4m3").item() == 1.125
    assert quantize(torch.from_numpy(x[1:]), "bf16").item() == 1 + 2**-7
    assert quantize(torch.from_numpy(x[:1]).float(), "fp8_e4m3").item() == 1.0  # float32 in: already rounded
    assert quantize(torch.from_numpy(x[1:]).float(), "bf16").item() == 1.0


def test_float64_fp16_vs_numpy() -> None:
    """numpy converts float64 -> float16 directly (rounded once): bit-exact agreement."""
    values = np.arange(2**16, dtype=np.uint16).view(np.float16).astype(np.float64)
    x = double_rounding_inputs(values, np.random.default_rng(0))
    with np.errstate(invalid="ignore", over="ignore"):
        want = x.astype(np.float16).astype(np.float64)
        via32 = x.astype(F32).astype(np.float16).astype(np.float64)
    assert (want != via32).sum() > 1000, "the inputs should include double-rounding cases"
    y = quantize(torch.from_numpy(x), "fp16")
    assert y.dtype == torch.float64
    assert_same_bits(y.numpy().astype(F32), want.astype(F32), x, "fp16 from float64")


@pytest.mark.parametrize("spec", [
    "fp8_e4m3",
    "fp8_e5m2",
    "bf16",
    "fp6_e3m2",
    "fp8_e4m3b11fnuz",
    "fp32",  # the result is float32 RNE of x (round-to-odd alone would be wrong here)
    "flexfp(e=8,m=23,b=0)",
    "flexfp(e=5,m=23)",  # float32's precision in the normal range, coarser below 2^-14
    "flexfp(e=8,m=22)",  # one bit less than float32
    "flexfp(e=6,m=22,b=-10)",
    "flexfp(e=8,m=7,b=-15)",  # smallest subnormal 2^-148: one bit coarser than float32
    "flexfp(e=8,m=7,b=-16)",  # smallest subnormal 2^-149, as float32
    "flexfp(e=8,m=10,b=-13)",
    "flexfp(e=4,m=3,b=-4)",
    "flexfp(e=5,m=21,b=-2)",
])
def test_float64_is_rounded_once_vs_gfloat(spec) -> None:
    """float64 in: equal to gfloat rounding the float64 value itself (gfloat computes in float64),
    for the presets (where a float32 detour would double-round: checked) and for FlexFPs with
    22-23 mantissa bits or spacing 2^-148/2^-149, where round-to-odd alone would double-round
    (fp32 from float64 must be float32's own RNE)."""
    fmt = parse_format(spec)
    fi = gfloat_info(fmt)
    rng = np.random.default_rng(1)
    if fmt.bits <= 8:  # every value
        q = gfloat.decode_ndarray(fi, np.arange(2 ** (fi.k - 1), dtype=np.int64))
        q = q[np.isfinite(q)]
    else:  # the format's values near both ends and in the middle
        q = np.concatenate([
            np.ldexp(np.arange(0, 64, dtype=np.float64), fmt.min_exponent - fmt.mantissa_bits),  # subnormals
            np.ldexp(1 + np.arange(0, 64) / 2**fmt.mantissa_bits, fmt.min_exponent),
            np.ldexp(1 + rng.integers(0, 2**fmt.mantissa_bits, 500) / 2**fmt.mantissa_bits,
                     rng.integers(fmt.min_exponent, fmt.max_exponent + 1, 500)),
            [fmt.max, fmt.max * (1 + 2.0**-fmt.mantissa_bits)],
        ])
    x = double_rounding_inputs(q, rng)
    sat = fmt.overflow == "saturate"
    if fmt.mantissa_bits <= 22:
        with np.errstate(invalid="ignore", over="ignore"):
            via32 = gfloat.round_ndarray(fi, x.astype(F32).astype(np.float64), RoundMode.TiesToEven, sat=sat)
            once = gfloat.round_ndarray(fi, x, RoundMode.TiesToEven, sat=sat)
        assert (via32 != once).sum() > 10, "the inputs should include double-rounding cases"
    y = quantize(torch.from_numpy(x), spec)
    assert y.dtype == torch.float64
    for rounding, mode in (("nearest", RoundMode.TiesToEven), ("toward_zero", RoundMode.TowardZero)):
        y = quantize(torch.from_numpy(x), spec, rounding=rounding).numpy()
        with np.errstate(invalid="ignore", over="ignore"):
            want = gfloat.round_ndarray(fi, x, mode, sat=sat)
        bad = ~((y == want) | (np.isnan(y) & np.isnan(want))) | (np.signbit(y) != np.signbit(want))
        assert not bad.any(), f"{spec} {rounding}: {x[bad][:5]!r} -> {y[bad][:5]!r}, want {want[bad][:5]!r}"
