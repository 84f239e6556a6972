"""Bit-exact agreement with gfloat for FlexFP with any (e, m, b), every rounding mode we have,
stochastic rounding given the same random bits, and MX block formats.

Mapping: precsim's FlexFP shift ``b`` multiplies every value by 2^b, so gfloat's exponent bias
is the IEEE-style bias 2^(e-1) - 1 minus b (fnuz: 2^(e-1) - b).

Stochastic rounding: ``round_float`` rounds up iff ``dropped + (r & (2^k - 1)) >= 2^k`` where k
is the number of float32 mantissa bits dropped (23 - m in the normal range). That is gfloat's
``RoundMode.StochasticFastest`` with ``srnumbits = k`` and ``srbits = r & (2^k - 1)``.
"""

from __future__ import annotations

import gfloat
import gfloat.formats as gf
import numpy as np
import pytest
import torch
from gfloat import Domain, FormatInfo, RoundMode

from precsim.formats import BlockFormat, FloatFormat, parse_format
from precsim.formats.rounding import MAX_DROPPED_BITS

from ._helpers import F32, assert_same_bits, boundaries, every_exponent, neighbours, ties


def gfloat_info(fmt: FloatFormat) -> FormatInfo:
    """gfloat's description of a precsim FloatFormat."""
    e, m = fmt.exponent_bits, fmt.mantissa_bits
    ieee_bias = 2 ** (e - 1) if fmt.specials == "fnuz" else 2 ** (e - 1) - 1
    kw = {
        "ieee": dict(domain=Domain.Extended, num_high_nans=2**m - 1, has_nz=True),
        "fn": dict(domain=Domain.Finite, num_high_nans=1, has_nz=True),
        "fnuz": dict(domain=Domain.Finite, num_high_nans=0, has_nz=False),
        "finite": dict(domain=Domain.Finite, num_high_nans=0, has_nz=True),
    }[fmt.specials]
    return FormatInfo(f"e{e}m{m}b{fmt.bias}", k=1 + e + m, precision=m + 1, bias=ieee_bias - fmt.bias,
                      is_signed=True, has_subnormals=True, is_twos_complement=False, **kw)


def gfloat_values(fi: FormatInfo) -> np.ndarray:
    """Every non-negative value of a format, decoded by gfloat (positive codes only)."""
    codes = np.arange(2 ** (fi.k - 1), dtype=np.int64)
    v = gfloat.decode_ndarray(fi, codes)
    return v[np.isfinite(v)]


def round_gfloat(fi, x, rnd, sat, srbits=None, srnumbits=0) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        return gfloat.round_ndarray(fi, x.astype(np.float64), rnd, sat, srbits, srnumbits).astype(F32)


def grid():
    """(e, m, b) for e in 2..8, m in 0..10 and a spread of shifts, skipping rejected combos."""
    out = []
    for e in range(2, 9):
        for m in range(0, 11):
            for b in (-25, -9, -1, 0, 3, 60):
                try:
                    FloatFormat(e, m, b)
                except ValueError:
                    continue
                out.append((e, m, b))
            # the extreme shifts: smallest subnormal 2^-149 (deep in float32 subnormals) and
            # largest values up against float32's max
            lo = 1 - (2 ** (e - 1) - 1) - m  # exponent of the smallest subnormal at b = 0
            out.append((e, m, -149 - lo))
            out.append((e, m, 127 - (2**e - 2 - (2 ** (e - 1) - 1))))
    return sorted(set(out))


GRID = grid()


def test_grid_is_broad() -> None:
    assert len(GRID) > 300
    assert any(FloatFormat(*c).min_exponent < -126 for c in GRID)  # reaches float32 subnormals


def grid_inputs(fmt: FloatFormat, rng) -> np.ndarray:
    fi = gfloat_info(fmt)
    vals = gfloat_values(fi).astype(F32)
    ulp_top = fmt.max - float(np.unique(vals)[-2]) if vals.size > 2 else fmt.max
    return np.concatenate([
        every_exponent(rng, 4),
        ties(vals, rng, limit=600),
        neighbours(vals[rng.integers(0, vals.size, 200)]),
        boundaries(fmt.smallest_subnormal, fmt.smallest_normal, fmt.max, ulp_top),
    ])


@pytest.mark.parametrize("e", range(2, 9))
def test_flexfp_grid_nearest_and_toward_zero(e: int) -> None:
    rng = np.random.default_rng(e)
    for (ee, m, b) in GRID:
        if ee != e:
            continue
        fmt = FloatFormat(e, m, b)
        fi = gfloat_info(fmt)
        x = grid_inputs(fmt, rng)
        xt = torch.from_numpy(x)
        for ours_mode, g_mode in (("nearest", RoundMode.TiesToEven), ("toward_zero", RoundMode.TowardZero)):
            got = fmt.quantize(xt, ours_mode)
            assert_same_bits(got, round_gfloat(fi, x, g_mode, sat=False), x, f"{fmt.spec} {ours_mode}")


@pytest.mark.parametrize("specials", ["fn", "fnuz", "finite"])
def test_other_specials_vs_gfloat(specials: str) -> None:
    """fn / fnuz / finite layouts with shifts, saturating (the default) and overflow=nan."""
    rng = np.random.default_rng(7)
    for e in (2, 3, 4, 5, 8):
        for m in (1, 2, 3, 5):
            for b in (-6, 0, 4):
                try:
                    fmt = FloatFormat(e, m, b, specials)
                except ValueError:
                    continue
                fi = gfloat_info(fmt)
                x = grid_inputs(fmt, rng)
                x = x[~np.isnan(x)]
                xt = torch.from_numpy(x)
                assert_same_bits(fmt.quantize(xt), round_gfloat(fi, x, RoundMode.TiesToEven, sat=True), x, fmt.spec)
                assert_same_bits(fmt.quantize(xt, "toward_zero"), round_gfloat(fi, x, RoundMode.TowardZero, sat=True),
                                 x, fmt.spec)
                if specials != "finite":
                    fmt_nan = FloatFormat(e, m, b, specials, "nan")
                    assert_same_bits(fmt_nan.quantize(xt), round_gfloat(fi, x, RoundMode.TiesToEven, sat=False),
                                     x, fmt_nan.spec)


def dropped_bits(fmt: FloatFormat, x: np.ndarray) -> np.ndarray:
    """How many float32 mantissa bits rounding to ``fmt`` drops, from frexp (not our code)."""
    _, ex = np.frexp(np.abs(x).astype(np.float64))
    exp = ex.astype(np.int64) - 1  # true exponent
    quantum = np.maximum(exp, fmt.min_exponent) - fmt.mantissa_bits
    ulp32 = np.maximum(exp, -126) - 23  # float32's quantum at x
    return quantum - ulp32


@pytest.mark.parametrize("spec", ["flexfp(e=4,m=3)", "flexfp(e=5,m=2)", "flexfp(e=8,m=7,b=-9)", "flexfp(e=3,m=0,b=2)",
                                  "flexfp(e=6,m=10,b=-40)", "fp8_e4m3", "fp6_e2m3"])
def test_stochastic_matches_gfloat_given_same_bits(spec: str) -> None:
    fmt = parse_format(spec)
    fi = gfloat_info(fmt)
    rng = np.random.default_rng(11)
    sat = fmt.overflow == "saturate"
    # normal range (k = 23 - m) and the subnormal range, where k depends on the input's exponent
    normal = np.exp2(rng.uniform(fmt.min_exponent, fmt.max_exponent + 1, 4000)).astype(F32)
    sub = np.exp2(rng.uniform(fmt.min_exponent - fmt.mantissa_bits - 8, fmt.min_exponent, 4000)).astype(F32)
    x = np.concatenate([normal, sub, np.array([fmt.max, fmt.smallest_subnormal / 2], dtype=F32)])
    x = np.concatenate([x, -x])
    r = rng.integers(-(2**31), 2**31, x.size, dtype=np.int64).astype(np.int32)
    got = fmt.quantize(torch.from_numpy(x), "stochastic", random_bits=torch.from_numpy(r)).numpy()
    k = dropped_bits(fmt, x)
    f32_normal = np.abs(x) >= 2.0**-126
    f32_normal[normal.size:] = False
    assert (k[f32_normal] == 23 - fmt.mantissa_bits).all()
    keep = k <= MAX_DROPPED_BITS  # past the cap our probability is resolved to 2^-30 only
    assert keep.mean() > 0.9
    for kk in np.unique(k[keep]):
        sel = k == kk
        srbits = (r[sel].astype(np.int64) & (2**int(kk) - 1))
        want = round_gfloat(fi, x[sel], RoundMode.StochasticFastest, sat, srbits, int(kk))
        assert_same_bits(got[sel], want, x[sel], f"{spec} stochastic k={kk}")
        want2 = round_gfloat(fi, x[sel], RoundMode.Stochastic, sat, srbits, int(kk))
        assert_same_bits(got[sel], want2, x[sel], f"{spec} stochastic (RTNE variant) k={kk}")


# --- MX blocks ----------------------------------------------------------------------------
MX = {
    "mxfp8_e4m3": gf.format_info_mxfp8_e4m3,
    "mxfp8_e5m2": gf.format_info_mxfp8_e5m2,
    "mxfp6_e2m3": gf.format_info_mxfp6_e2m3,
    "mxfp6_e3m2": gf.format_info_mxfp6_e3m2,
    "mxfp4": gf.format_info_mxfp4_e2m1,
    "mxint8": gf.format_info_mxint8,
}


def mx_data(rng, nblocks: int = 48) -> np.ndarray:
    """Blocks of 32 with magnitudes from float32 subnormals to near float32's max."""
    mags = np.concatenate([
        [0.0, 2.0**-149, 1e-44, 1e-40, 2.0**-126, 1e38, 3e38, 1.0],
        np.exp2(rng.uniform(-140, 126, nblocks - 8)),
    ])
    data = rng.standard_normal((nblocks, 32)) * mags[:, None]
    data[3, :] = 0.0  # all-zero block
    data[4, 5:] = 0.0  # mostly zero
    data[5, :] *= 2.0 ** rng.integers(-30, 0, 32)  # wide spread inside a block
    # powers of two at amax and values just below them (log2 would round up)
    data[6, 0] = 2.0**20
    data[7, 0] = np.nextafter(F32(2.0**-3), F32(0))
    with np.errstate(over="ignore"):
        x = data.astype(F32)
    x[~np.isfinite(x)] = F32(3e38)
    return x


@pytest.mark.parametrize("name", list(MX))
def test_mx_vs_gfloat_quantize_block(name: str) -> None:
    rng = np.random.default_rng(3)
    x = mx_data(rng)
    fmt = parse_format(name)
    assert isinstance(fmt, BlockFormat)
    got = fmt.quantize(torch.from_numpy(x)).numpy()
    fi = MX[name]
    want = np.stack([
        gfloat.quantize_block(fi, blk.astype(np.float64), gfloat.compute_scale_amax, RoundMode.TiesToEven)
        for blk in x
    ]).astype(F32)
    assert_same_bits(got, want, x, name)
    # and along another axis (blocks run down axis 0)
    fmt0 = BlockFormat(fmt.element, fmt.block_size, axis=0, scale=fmt.scale)
    got0 = fmt0.quantize(torch.from_numpy(np.ascontiguousarray(x.T))).numpy()
    assert_same_bits(got0.T, want, x, f"{name} axis=0")
    # a length that is not a multiple of 32: the last block is zero-padded
    xs = x.reshape(12, 128)[:, :100]
    got_pad = fmt.quantize(torch.from_numpy(np.ascontiguousarray(xs))).numpy()
    padded = np.concatenate([xs, np.zeros((12, 28), dtype=F32)], axis=1).reshape(-1, 32)
    want_pad = np.stack([
        gfloat.quantize_block(fi, blk.astype(np.float64), gfloat.compute_scale_amax, RoundMode.TiesToEven)
        for blk in padded
    ]).astype(F32).reshape(12, 128)[:, :100]
    assert_same_bits(got_pad, want_pad, xs, f"{name} padded")


def test_mx_block_with_nan_or_inf_is_nan() -> None:
    """OCP MX: a block holding NaN or Inf gets a NaN scale, so all its elements are NaN.
    (gfloat instead clips the scale of an Inf block to 2^127; we follow the spec.)"""
    x = torch.ones(3, 32)
    x[0, 4] = float("nan")
    x[1, 7] = float("inf")
    for name in MX:
        y = parse_format(name).quantize(x)
        assert torch.isnan(y[:2]).all(), name
        assert (y[2] == 1).all(), name
