"""Bit-exact agreement with ml_dtypes (an independent implementation) for every preset it has.

ml_dtypes converts with round-to-nearest-even. Where its semantics differ from ours (overflow to
NaN for E4M3FN and the fnuz formats; NaN -> -0 for formats without NaN), the comparison uses our
``overflow=nan`` variant or leaves NaN inputs out, and separate tests pin down the difference.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from precsim.formats import parse_format
from precsim.runtime import quantize

from ._helpers import F32, assert_same_bits, boundaries, every_exponent, ties

# spec -> (ml_dtypes dtype, storage integer type, number of codes, NaN inputs comparable)
CASES = {
    "bf16": (ml_dtypes.bfloat16, np.uint16, 2**16, True),
    "fp16": (np.float16, np.uint16, 2**16, True),
    "fp8_e4m3(overflow=nan)": (ml_dtypes.float8_e4m3fn, np.uint8, 2**8, True),
    "fp8_e5m2": (ml_dtypes.float8_e5m2, np.uint8, 2**8, True),
    "fp8_e4m3fnuz(overflow=nan)": (ml_dtypes.float8_e4m3fnuz, np.uint8, 2**8, True),
    "fp8_e5m2fnuz(overflow=nan)": (ml_dtypes.float8_e5m2fnuz, np.uint8, 2**8, True),
    "fp8_e4m3b11fnuz(overflow=nan)": (ml_dtypes.float8_e4m3b11fnuz, np.uint8, 2**8, True),
    "flexfp(e=4,m=3)": (ml_dtypes.float8_e4m3, np.uint8, 2**8, True),
    "flexfp(e=3,m=4)": (ml_dtypes.float8_e3m4, np.uint8, 2**8, True),
    # ml_dtypes turns NaN into -0 for these (they have no NaN code); we keep NaN: see below.
    "fp6_e2m3": (ml_dtypes.float6_e2m3fn, np.uint8, 2**6, False),
    "fp6_e3m2": (ml_dtypes.float6_e3m2fn, np.uint8, 2**6, False),
    "fp4_e2m1": (ml_dtypes.float4_e2m1fn, np.uint8, 2**4, False),
}


def values_of(dtype, storage, n) -> np.ndarray:
    """Every value of an ml_dtypes type, decoded by ml_dtypes itself."""
    return np.arange(n, dtype=storage).view(dtype).astype(F32)


def oracle(x: np.ndarray, dtype) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return x.astype(dtype).astype(F32)


def ours(x: np.ndarray, spec: str) -> np.ndarray:
    return quantize(torch.from_numpy(x.copy()), spec).numpy()


@pytest.mark.parametrize("spec", list(CASES))
def test_bit_exact_vs_ml_dtypes(spec: str) -> None:
    dtype, storage, n, nan_ok = CASES[spec]
    values = values_of(dtype, storage, n)
    fmt = parse_format(spec)
    fin = np.unique(np.abs(values[np.isfinite(values)]))
    # the format's own description agrees with ml_dtypes' value set
    assert fmt.max == fin[-1]
    assert fmt.smallest_subnormal == fin[1]
    info = ml_dtypes.finfo(dtype)
    assert fmt.smallest_normal == float(info.smallest_normal)
    rng = np.random.default_rng(abs(hash(spec)) % 2**32)
    x = np.concatenate([
        every_exponent(rng, 16),
        ties(values, rng, limit=40000),
        fin, -fin,
        boundaries(fmt.smallest_subnormal, fmt.smallest_normal, fmt.max, float(fin[-1] - fin[-2])),
    ])
    if not nan_ok:
        x = x[~np.isnan(x)]
    assert_same_bits(ours(x, spec), oracle(x, dtype), x, spec)


def test_every_value_is_a_fixed_point() -> None:
    """Each representable value maps to itself (bit for bit, incl. -0 where it exists)."""
    for spec, (dtype, storage, n, _) in CASES.items():
        v = values_of(dtype, storage, n)
        v = v[~np.isnan(v)]
        assert_same_bits(ours(v, spec), v, v, spec)


def test_e4m3_default_saturates_where_ml_dtypes_gives_nan() -> None:
    """Our fp8_e4m3 default is overflow='saturate': |x| > 464 (past the tie above 448) and ±Inf
    become ±448. ml_dtypes' float8_e4m3fn turns the same inputs into NaN. Below the tie the two
    agree (464 itself ties to even, 448)."""
    x = np.array([448, 460, 464, np.nextafter(F32(464), F32(1e9)), 480, 1e6, 3e38, np.inf], dtype=F32)
    x = np.concatenate([x, -x])
    got = ours(x, "fp8_e4m3")
    ml = oracle(x, ml_dtypes.float8_e4m3fn)
    assert np.array_equal(got, np.sign(x) * 448)
    over = np.abs(x) > 464
    assert np.isnan(ml[over]).all()
    assert np.array_equal(ml[~over], got[~over])
    assert np.isnan(ours(x, "fp8_e4m3(overflow=nan)")[over]).all()


def test_fnuz_default_saturates_where_ml_dtypes_gives_nan() -> None:
    """fnuz formats have no Inf; our default saturates (ml_dtypes: NaN), -0 becomes +0 in both."""
    for spec, dtype in [("fp8_e4m3fnuz", ml_dtypes.float8_e4m3fnuz), ("fp8_e5m2fnuz", ml_dtypes.float8_e5m2fnuz),
                        ("fp8_e4m3b11fnuz", ml_dtypes.float8_e4m3b11fnuz)]:
        fmt = parse_format(spec)
        x = np.array([fmt.max * 4, np.inf, -np.inf, -0.0, -1e-30], dtype=F32)
        got = ours(x, spec)
        assert_same_bits(got, np.array([fmt.max, fmt.max, -fmt.max, 0.0, 0.0], dtype=F32), x, spec)
        ml = oracle(x, dtype)
        assert np.isnan(ml[:3]).all()
        assert_same_bits(ml[3:], got[3:], x[3:], spec)


@pytest.mark.parametrize("spec,dtype", [("fp6_e2m3", ml_dtypes.float6_e2m3fn), ("fp6_e3m2", ml_dtypes.float6_e3m2fn),
                                        ("fp4_e2m1", ml_dtypes.float4_e2m1fn)])
def test_finite_formats_keep_nan_where_ml_dtypes_gives_negative_zero(spec, dtype) -> None:
    """OCP FP6/FP4 have no NaN code. ml_dtypes turns NaN into a zero (-0 for the default NaN);
    we keep NaN (a NaN in a
    simulated tensor is a bug the user wants to see). Inf saturates to ±max in both."""
    x = np.array([np.nan, -np.nan, np.inf, -np.inf], dtype=F32)
    got = ours(x, spec)
    ml = oracle(x, dtype)
    assert np.isnan(got[:2]).all()
    assert (ml[:2] == 0).all() and np.signbit(ml[0])
    mx = parse_format(spec).max
    assert_same_bits(got[2:], [mx, -mx], x[2:], spec)
    assert_same_bits(ml[2:], [mx, -mx], x[2:], spec)
