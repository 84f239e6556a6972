"""Stochastic rounding: unbiased, always one of the two neighbours, reproducible from a seed."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from precsim.formats import parse_format
from precsim.formats.random import draw_seed, random_bits
from precsim.runtime import quantize

from ._helpers import F32

N = 2000  # draws per value


def e4m3_values() -> np.ndarray:
    v = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    v = v[np.isfinite(v)]
    return np.unique(v)


def between(grid: np.ndarray, lo_lim: float, hi_lim: float, n: int, rng) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """n float32 values strictly between grid neighbours in [lo_lim, hi_lim], P(up) in [0.05, 0.95]."""
    g = grid[(grid >= lo_lim) & (grid <= hi_lim)]
    i = rng.integers(0, g.size - 1, n)
    lo, hi = g[i], g[i + 1]
    x = (lo + (hi - lo) * rng.uniform(0.05, 0.95, n)).astype(F32).astype(np.float64)
    sign = rng.choice([-1.0, 1.0], n)
    return x * sign, lo * sign, hi * sign


def check_unbiased(x, lo, hi, out) -> None:
    """out: (N, n) draws. Each is lo or hi; the mean is x within 5 binomial sigmas."""
    out = out.astype(np.float64)
    assert ((out == lo) | (out == hi)).all(), "stochastic rounding left the two neighbours"
    p = (x - lo) / (hi - lo)
    phat = (out == hi).mean(axis=0)
    sigma = np.sqrt(p * (1 - p) / out.shape[0])
    z = np.abs(phat - p) / sigma
    assert z.max() < 5, f"bias: worst z = {z.max():.2f}"
    assert 0.2 < z.mean() < 1.5  # the draws do vary like a binomial (not constant, not wild)
    mean = out.mean(axis=0)
    assert (np.abs(mean - x) <= 5 * np.abs(hi - lo) * sigma + 1e-30).all()


def draws(x: np.ndarray, spec, seed: int = 0, **kw) -> np.ndarray:
    xt = torch.from_numpy(x.astype(F32)).expand(N, -1).contiguous()
    g = torch.Generator().manual_seed(seed)
    return quantize(xt, spec, rounding="stochastic", generator=g, **kw).numpy()


def test_unbiased_float_normal_range() -> None:
    rng = np.random.default_rng(0)
    x, lo, hi = between(e4m3_values(), 2.0**-6, 448, 300, rng)
    check_unbiased(x, lo, hi, draws(x, "fp8_e4m3"))


def test_unbiased_float_subnormal_range() -> None:
    rng = np.random.default_rng(1)
    x, lo, hi = between(e4m3_values(), 0, 2.0**-6, 200, rng)
    assert (np.abs(hi) <= 2.0**-6).all()
    check_unbiased(x, lo, hi, draws(x, "fp8_e4m3"))


def test_unbiased_flexfp_with_shift_in_float32_subnormals() -> None:
    """A grid below 2^-126 (inputs are float32 subnormals)."""
    fmt = parse_format("flexfp(e=8,m=3,b=-12)")
    rng = np.random.default_rng(2)
    q = 2.0 ** (fmt.min_exponent - 3)
    grid = np.concatenate([np.arange(0, 8) * q, np.ldexp(1 + np.arange(8) / 8, fmt.min_exponent + 2)])
    grid = np.unique(np.concatenate([grid, np.ldexp(1 + np.arange(8) / 8, fmt.min_exponent + 1),
                                     np.ldexp(1 + np.arange(8) / 8, fmt.min_exponent)]))
    x, lo, hi = between(grid, 0, grid.max(), 200, rng)
    assert (np.abs(x) < 2.0**-126).all()
    check_unbiased(x, lo, hi, draws(x, fmt))


def test_unbiased_int8() -> None:
    rng = np.random.default_rng(3)
    s = 0.0625
    k = rng.integers(-120, 120, 300)
    f = rng.uniform(0.05, 0.95, 300)
    x = ((k + f) * s).astype(F32).astype(np.float64)
    check_unbiased(x, k * s, (k + 1) * s, draws(x, "int8", scale=s))


def test_unbiased_mx() -> None:
    """mxfp8_e4m3 blocks whose amax is exactly 1.0 (shared scale 2^-8): elements are unbiased."""
    rng = np.random.default_rng(4)
    grid = e4m3_values() * 2.0**-8
    x, lo, hi = between(grid, 2.0**-14, 1.0, 31 * 8, rng)
    blocks = x.reshape(8, 31)
    xb = np.concatenate([np.ones((8, 1)), blocks], axis=1).ravel()
    out = draws(xb, "mxfp8_e4m3").reshape(N, 8, 32)
    assert (out[:, :, 0] == 1).all()
    check_unbiased(x, lo, hi, out[:, :, 1:].reshape(N, -1))


def test_unbiased_dse_and_nvfp4_stay_on_neighbours() -> None:
    rng = np.random.default_rng(5)
    x = rng.standard_normal(64).astype(F32)
    for spec in ("dse(e=4,m=3)", "nvfp4", "mxint8", "mxfp4"):
        out = draws(x, spec)
        nearest = quantize(torch.from_numpy(x), spec).numpy()
        down = quantize(torch.from_numpy(x), spec, rounding="toward_zero").numpy()
        # every draw is toward-zero or one step further out; the mean is close to x
        assert ((out == down) | (np.abs(out) > np.abs(down))).all(), spec
        err = np.abs(out.mean(0) - x)
        assert (err <= np.abs(nearest - x) + 1e-6).mean() > 0.9, spec


def test_same_seed_same_bits_different_seed_different() -> None:
    x = torch.randn(4096, generator=torch.Generator().manual_seed(9))
    for spec in ("fp8_e4m3", "bf16", "int8", "mxfp4", "dse(e=5,m=2)", "nvfp4"):
        a = quantize(x, spec, rounding="stochastic", generator=torch.Generator().manual_seed(1))
        b = quantize(x, spec, rounding="stochastic", generator=torch.Generator().manual_seed(1))
        c = quantize(x, spec, rounding="stochastic", generator=torch.Generator().manual_seed(2))
        assert torch.equal(a.view(torch.int32), b.view(torch.int32)), spec
        assert not torch.equal(a, c), spec


def test_default_generator_and_resume() -> None:
    x = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(123)
    a1 = quantize(x, "fp8_e5m2", rounding="stochastic")
    a2 = quantize(x, "fp8_e5m2", rounding="stochastic")
    torch.manual_seed(123)
    b1 = quantize(x, "fp8_e5m2", rounding="stochastic")
    b2 = quantize(x, "fp8_e5m2", rounding="stochastic")
    assert torch.equal(a1, b1) and torch.equal(a2, b2)
    assert not torch.equal(a1, a2)  # successive calls draw new seeds
    # a checkpointed generator state continues the same stream
    g = torch.Generator().manual_seed(7)
    quantize(x, "fp8_e5m2", rounding="stochastic", generator=g)
    state = g.get_state()
    nxt = quantize(x, "fp8_e5m2", rounding="stochastic", generator=g)
    g2 = torch.Generator()
    g2.set_state(state)
    assert torch.equal(quantize(x, "fp8_e5m2", rounding="stochastic", generator=g2), nxt)


def test_explicit_random_bits() -> None:
    x = torch.tensor([1.0 + 2.0**-5, -(1.0 + 2.0**-5)])  # 1/4 of the way from 1 to 1.125
    fmt = parse_format("fp8_e4m3")
    k = 23 - 3
    lowest = torch.zeros(2, dtype=torch.int32)
    assert torch.equal(fmt.quantize(x, "stochastic", random_bits=lowest), torch.tensor([1.0, -1.0]))
    just_up = torch.full((2,), 3 * 2 ** (k - 2), dtype=torch.int32)  # dropped + r == 2^k
    assert torch.equal(fmt.quantize(x, "stochastic", random_bits=just_up), torch.tensor([1.125, -1.125]))
    just_below = just_up - 1
    assert torch.equal(fmt.quantize(x, "stochastic", random_bits=just_below), torch.tensor([1.0, -1.0]))
    # the high bits are ignored
    assert torch.equal(fmt.quantize(x, "stochastic", random_bits=just_below | (1 << 25)), torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="needs a seed or random_bits"):
        fmt.quantize(x, "stochastic")


def test_random_bits_look_uniform() -> None:
    seed = draw_seed(torch.Generator().manual_seed(0))
    r = random_bits((100_000,), seed)
    assert r.dtype == torch.int32
    bit_means = torch.stack([((r >> i) & 1).float().mean() for i in range(32)])
    assert ((bit_means - 0.5).abs() < 0.015).all()
    assert torch.unique(r).numel() > 99_000
    # the same seed gives the same bits for a different shape with the same element count
    assert torch.equal(random_bits((400, 250), seed).ravel(), r)
