"""Shared inputs and comparisons for the format tests (no precsim logic in here)."""

from __future__ import annotations

import numpy as np
import torch

F32 = np.float32


def bits(a) -> np.ndarray:
    """int32 view of a float32 array or tensor."""
    if isinstance(a, torch.Tensor):
        a = a.detach().cpu().numpy()
    return np.ascontiguousarray(np.asarray(a, dtype=F32)).view(np.int32)


def assert_same_bits(got, want, inputs=None, what: str = "") -> None:
    """Bit-exact equality of two float32 arrays; NaN compares by isnan."""
    g = np.asarray(got.detach().cpu().numpy() if isinstance(got, torch.Tensor) else got, dtype=F32).ravel()
    w = np.asarray(want, dtype=F32).ravel()
    assert g.shape == w.shape
    gn, wn = np.isnan(g), np.isnan(w)
    bad = (gn != wn) | (~gn & (bits(g) != bits(w)))
    if bad.any():
        idx = np.flatnonzero(bad)[:8]
        xs = "" if inputs is None else np.asarray(inputs).ravel()[idx]
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} differ; first inputs {xs!r}\n got {g[idx]!r}\n want {w[idx]!r}"
        )


def every_exponent(rng: np.random.Generator, per_exponent: int = 16) -> np.ndarray:
    """float32 values with every biased exponent 0..255 and both signs, random mantissas.

    Exponent 255 gives NaNs (random nonzero mantissas) plus ±Inf (mantissa 0 is added).
    """
    e = np.repeat(np.arange(256, dtype=np.uint32), per_exponent)
    mant = rng.integers(0, 2**23, size=e.size, dtype=np.uint32)
    mant[::per_exponent] = 0  # exact powers of two (and ±Inf, ±0)
    mant[1::per_exponent] = 2**23 - 1  # all-ones mantissa: just below the next power of two
    u = (e << 23) | mant
    u = np.concatenate([u, u | np.uint32(0x80000000)])
    return u.view(F32)


def neighbours(x: np.ndarray) -> np.ndarray:
    """x together with its float32 neighbours (nextafter both ways)."""
    x = np.asarray(x, dtype=F32)
    return np.concatenate([x, np.nextafter(x, F32(np.inf)), np.nextafter(x, F32(-np.inf))])


def ties(values: np.ndarray, rng: np.random.Generator | None = None, limit: int | None = None) -> np.ndarray:
    """Midpoints between consecutive finite values (both signs) and their float32 neighbours.

    Midpoints are computed in float64; those that are not float32 values (spacing 2^-149 or
    23 mantissa bits) cannot be inputs and are left out.
    """
    v = np.unique(np.abs(values[np.isfinite(values)]).astype(np.float64))
    mids = (v[:-1] + v[1:]) / 2
    if limit is not None and mids.size > limit:
        assert rng is not None
        keep = np.concatenate([mids[:32], mids[-32:], rng.choice(mids, limit - 64, replace=False)])
        mids = keep
    m32 = mids.astype(F32)
    m32 = m32[m32.astype(np.float64) == mids]
    m32 = neighbours(m32)
    return np.concatenate([m32, -m32])


def boundaries(smallest_subnormal: float, smallest_normal: float, max_value: float, ulp_at_max: float) -> np.ndarray:
    """Subnormal boundaries, top of range and specials, each with its float32 neighbours."""
    s = smallest_subnormal
    pts = [
        s,
        s / 2,
        smallest_normal - s,  # largest subnormal
        smallest_normal,
        max_value,
        max_value + ulp_at_max / 2,  # tie at the top
        max_value + ulp_at_max,
        max_value * 2,
    ]
    pts = [p for p in pts if p < 3.4e38]
    p32 = neighbours(np.array(pts, dtype=np.float64).astype(F32))
    first_past = np.nextafter(F32(max_value), F32(np.inf))  # first float32 value past max
    extra = np.array([0.0, np.inf, np.nan, first_past], dtype=F32)
    out = np.concatenate([p32, extra])
    return np.concatenate([out, -out])
