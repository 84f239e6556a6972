"""Bit-exact tests of the gemmlowp / TFLite fixed-point helpers against independent numpy references."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from precsim.integer.fixedpoint import (
    REQUANT_ROUNDINGS,
    apply_dyadic,
    check_requant_rounding,
    dyadic,
    multiply_by_quantized_multiplier,
    multiply_by_quantized_multiplier_single,
    quantize_multiplier,
    quantize_multipliers,
    requantize,
    rounding_divide_by_pot,
    saturating_rounding_doubling_high_mul,
    shift_right_rounded,
)

I32_MIN = -(2**31)
I32_MAX = 2**31 - 1

# --------------------------------------------------------------------------------------------
# Independent numpy int64 references (gemmlowp fixedpoint.h / TFLite common.h, as published)
# --------------------------------------------------------------------------------------------


def ref_srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.int64)
    b = b.astype(np.int64)
    ab = a * b
    nudge = np.where(ab >= 0, np.int64(1 << 30), np.int64(1 - (1 << 30)))
    num = ab + nudge
    quot = (np.abs(num) // np.int64(1 << 31)) * np.sign(num)  # C division truncates toward zero
    return np.where((a == I32_MIN) & (b == I32_MIN), np.int64(I32_MAX), quot)


def ref_rdbpot(x: np.ndarray, e: np.ndarray) -> np.ndarray:
    x = x.astype(np.int64)
    e = np.broadcast_to(np.asarray(e, dtype=np.int64), x.shape)
    mask = np.left_shift(np.int64(1), e) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0).astype(np.int64)
    return (x >> e) + (remainder > threshold).astype(np.int64)


def ref_mbqm(x: np.ndarray, m: np.ndarray, shift: np.ndarray) -> np.ndarray:
    x = x.astype(np.int64)
    shift = np.asarray(shift, dtype=np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    shifted = np.clip(x * np.left_shift(np.int64(1), left), I32_MIN, I32_MAX)
    high = ref_srdhm(shifted, np.broadcast_to(np.asarray(m, dtype=np.int64), shifted.shape))
    return ref_rdbpot(high, np.broadcast_to(right, high.shape))


def ref_mbqm_single(x: np.ndarray, m: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """TFLite's MultiplyByQuantizedMultiplier under TFLITE_SINGLE_ROUNDING, as published:
    ``total_shift = 31 - shift``, ``(x * M0 + (1 << (total_shift - 1))) >> total_shift`` in int64.

    Extended to precsim's shift range [-62, 31]: total_shift 0 is the exact product, >= 63
    gives 0; results saturate to int32.
    """
    x, m, shift = np.broadcast_arrays(
        x.astype(np.int64), np.asarray(m, dtype=np.int64), np.asarray(shift, dtype=np.int64)
    )
    total = 31 - shift
    used = np.minimum(total, 62)
    round_ = np.where(used > 0, np.left_shift(np.int64(1), np.maximum(used - 1, 0)), np.int64(0))
    out = (x * m + round_) >> used
    out = np.where(total >= 63, np.int64(0), out)
    return np.clip(out, I32_MIN, I32_MAX)


def ref_shift_single(x: np.ndarray, e: int) -> np.ndarray:
    """x / 2^e, round half up (single-rounding MBQM by 2^-e)."""
    x = x.astype(np.int64)
    return x if e == 0 else (x + (np.int64(1) << (e - 1))) >> e


def ref_quantize_multiplier(real: float) -> tuple[int, int]:
    """Exact rational version of TFLite QuantizeMultiplier (frexp, round half away, renormalise)."""
    if real == 0:
        return 0, 0
    fr = Fraction(real)
    e = 0
    while fr >= Fraction(2) ** e:
        e += 1
    while fr < Fraction(2) ** (e - 1):
        e -= 1
    v = fr * Fraction(2) ** (31 - e)  # in [2^30, 2^31)
    q = math.floor(v)
    if v - q >= Fraction(1, 2):
        q += 1
    if q == 2**31:
        q, e = 2**30, e + 1
    return q, e


def ref_dyadic(real: float, bits: int) -> tuple[int, int]:
    fr = abs(Fraction(real))
    for c in range(62, -1, -1):
        v = fr * 2**c
        b = math.floor(v + Fraction(1, 2))
        if b < 2**bits:
            return (-b if real < 0 else b), c
    raise AssertionError("unreachable in these tests")


def rng_int32(rng: np.random.Generator, n: int) -> np.ndarray:
    x = rng.integers(I32_MIN, I32_MAX, size=n, endpoint=True, dtype=np.int64)
    extremes = np.array(
        [I32_MIN, I32_MIN + 1, -1, 0, 1, I32_MAX - 1, I32_MAX, -(2**30), 2**30], dtype=np.int64
    )
    return np.concatenate([extremes, x])


# --------------------------------------------------------------------------------------------
# SRDHM
# --------------------------------------------------------------------------------------------


def test_srdhm_random_bit_exact() -> None:
    rng = np.random.default_rng(1)
    a = rng_int32(rng, 20000)
    b = rng_int32(rng, 20000)[::-1].copy()
    # every extreme paired with every extreme
    ext = a[:9]
    aa, bb = np.meshgrid(ext, ext)
    a = np.concatenate([a, aa.ravel()])
    b = np.concatenate([b, bb.ravel()])
    got = saturating_rounding_doubling_high_mul(torch.from_numpy(a).int(), torch.from_numpy(b).int())
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy().astype(np.int64), ref_srdhm(a, b))


@pytest.mark.parametrize(
    ("a", "b", "want"),
    [
        (I32_MIN, I32_MIN, I32_MAX),  # the one overflow: saturates
        (I32_MAX, I32_MAX, I32_MAX - 1),
        (1, 2**30, 1),  # +0.5 -> 1
        (-1, 2**30, 0),  # -0.5 -> 0 (nudge 1 - 2^30: ties toward +inf)
        (3, 2**30, 2),  # +1.5 -> 2
        (-3, 2**30, -1),  # -1.5 -> -1
        (I32_MIN, I32_MAX, -(2**31) + 1),
        (I32_MIN, 2**30, -(2**30)),
    ],
)
def test_srdhm_cases(a: int, b: int, want: int) -> None:
    got = saturating_rounding_doubling_high_mul(torch.tensor([a]), torch.tensor([b]))
    assert got.dtype == torch.int64
    assert int(got[0]) == want


def test_srdhm_rejects_out_of_range_and_float() -> None:
    with pytest.raises(ValueError):
        saturating_rounding_doubling_high_mul(torch.tensor([2**31]), torch.tensor([1]))
    with pytest.raises(TypeError):
        saturating_rounding_doubling_high_mul(torch.tensor([1.0]), torch.tensor([1]))


# --------------------------------------------------------------------------------------------
# RoundingDivideByPOT
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "e", "want"),
    [
        (-3, 1, -2),  # -1.5 -> -2 (ties away from zero)
        (3, 1, 2),
        (-5, 2, -1),  # -1.25
        (-6, 2, -2),  # -1.5
        (6, 2, 2),
        (-7, 0, -7),
        (I32_MIN, 31, -1),
        (I32_MAX, 31, 1),
        (-(2**30), 31, -1),  # -0.5 -> -1
        (2**30, 31, 1),
        (-(2**30) + 1, 31, 0),
        (I32_MIN, 1, -(2**30)),
    ],
)
def test_rdbpot_cases(x: int, e: int, want: int) -> None:
    assert int(rounding_divide_by_pot(torch.tensor([x], dtype=torch.int32), e)[0]) == want


def test_rdbpot_random_bit_exact_and_per_channel() -> None:
    rng = np.random.default_rng(2)
    x = rng_int32(rng, 30000)
    e = rng.integers(0, 32, size=x.shape, dtype=np.int64)
    got = rounding_divide_by_pot(torch.from_numpy(x).int(), torch.from_numpy(e))
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy(), ref_rdbpot(x, e))
    # scalar exponent 31 and a per-channel exponent broadcast along the last axis
    np.testing.assert_array_equal(rounding_divide_by_pot(torch.from_numpy(x), 31).numpy(), ref_rdbpot(x, 31))
    x2 = x[: 300 * 8].reshape(300, 8)
    e2 = np.arange(0, 32, 4, dtype=np.int64)
    got2 = rounding_divide_by_pot(torch.from_numpy(x2), torch.from_numpy(e2))
    np.testing.assert_array_equal(got2.numpy(), ref_rdbpot(x2, e2[None, :]))
    # agrees with exact rational rounding (half away from zero)
    for xv, ev in zip(x[:500].tolist(), e[:500].tolist(), strict=True):
        fr = Fraction(xv, 2**ev)
        want = math.floor(abs(fr) + Fraction(1, 2)) * (1 if fr >= 0 else -1)
        assert int(rounding_divide_by_pot(torch.tensor([xv]), ev)[0]) == want


def test_rdbpot_rejects_bad_exponent() -> None:
    with pytest.raises(ValueError):
        rounding_divide_by_pot(torch.tensor([1]), -1)
    with pytest.raises(ValueError):
        rounding_divide_by_pot(torch.tensor([1]), 63)


# --------------------------------------------------------------------------------------------
# QuantizeMultiplier
# --------------------------------------------------------------------------------------------


def test_quantize_multiplier_normalises_2_31() -> None:
    assert quantize_multiplier(1 - 2**-40) == (2**30, 1)
    assert quantize_multiplier(1.0) == (2**30, 1)
    assert quantize_multiplier(0.5) == (2**30, 0)
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(0.75) == (3 * 2**29, 0)
    # exact ties round half away from zero (std::round), not half to even
    assert quantize_multiplier((2**30 + 2.5) / 2**31) == (2**30 + 3, 0)
    assert quantize_multiplier((2**30 + 3.5) / 2**35) == (2**30 + 4, -4)
    m, s = quantize_multipliers(
        torch.tensor([(2**30 + 2.5) / 2**31, (2**30 + 3.5) / 2**35], dtype=torch.float64)
    )
    assert m.tolist() == [2**30 + 3, 2**30 + 4] and s.tolist() == [0, -4]


@pytest.mark.parametrize("bad", [-1e-3, float("nan"), float("inf"), -float("inf"), 2.0**31])
def test_quantize_multiplier_rejects(bad: float) -> None:
    with pytest.raises(ValueError, match="quantize_multiplier"):
        quantize_multiplier(bad)


def test_quantize_multiplier_round_trip_and_reference() -> None:
    rng = np.random.default_rng(3)
    reals = np.concatenate([10.0 ** rng.uniform(-10, 3, size=800), [1e-10, 1e3, 2.0**-33, 1 - 2**-40, 0.5]])
    for r in reals.tolist():
        m0, shift = quantize_multiplier(r)
        assert 2**30 <= m0 < 2**31
        assert (m0, shift) == ref_quantize_multiplier(r)
        back = Fraction(m0) * Fraction(2) ** (shift - 31)
        assert abs(back - Fraction(r)) <= Fraction(r) * Fraction(1, 2**31)
    # vectorised version agrees element-wise (incl. zero)
    vec = torch.tensor(np.concatenate([reals, [0.0]]), dtype=torch.float64)
    m_t, s_t = quantize_multipliers(vec)
    assert m_t.dtype == torch.int32 and s_t.dtype == torch.int32
    want = [quantize_multiplier(r) for r in vec.tolist()]
    assert list(zip(m_t.tolist(), s_t.tolist(), strict=True)) == want


def test_quantize_multipliers_rejects() -> None:
    with pytest.raises(ValueError, match="-0.5"):
        quantize_multipliers(torch.tensor([0.1, -0.5]))
    with pytest.raises(ValueError):
        quantize_multipliers(torch.tensor([float("nan")]))


# --------------------------------------------------------------------------------------------
# MultiplyByQuantizedMultiplier / requantize
# --------------------------------------------------------------------------------------------


def test_mbqm_random_bit_exact() -> None:
    rng = np.random.default_rng(4)
    x = rng_int32(rng, 20000)
    m = rng.integers(2**30, 2**31, size=x.shape, dtype=np.int64)
    shift = rng.integers(-40, 12, size=x.shape, dtype=np.int64)
    shift[:200] = 31  # large left shifts: saturation path
    shift[200:400] = -31
    got = multiply_by_quantized_multiplier(
        torch.from_numpy(x).int(), torch.from_numpy(m).int(), torch.from_numpy(shift).int()
    )
    assert got.dtype == torch.int32
    np.testing.assert_array_equal(got.numpy().astype(np.int64), ref_mbqm(x, m, shift))


def test_mbqm_close_to_real_product() -> None:
    rng = np.random.default_rng(5)
    x = rng.integers(-(2**20), 2**20, size=5000, dtype=np.int64)
    for real in [1e-6, 0.00390625, 0.123456, 0.75, 1.0, 3.7]:
        m0, shift = quantize_multiplier(real)
        got = multiply_by_quantized_multiplier(torch.from_numpy(x), m0, shift).numpy()
        exact = x.astype(np.float64) * (m0 * 2.0 ** (shift - 31))
        assert np.abs(got - exact).max() < 1.0  # double rounding: < 1 LSB


def test_mbqm_saturates_left_shift() -> None:
    x = torch.tensor([I32_MAX, I32_MIN, 3], dtype=torch.int32)
    got = multiply_by_quantized_multiplier(x, 2**30, 4)  # x * 16 * 0.5
    sat = ref_mbqm(np.array([I32_MAX, I32_MIN, 3]), np.array(2**30), np.array(4))
    np.testing.assert_array_equal(got.numpy(), sat)
    assert got.tolist() == [2**30, -(2**30), 24]


def _mbqm_per_channel(
    rng: np.random.Generator, rounding: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, torch.Tensor]:
    """Random int64 values (3, 5, 7), one multiplier and shift per channel of axis 1 (shifts -62..3): x, m, s, MBQM."""
    x = rng.integers(-(2**31), 2**31, size=(3, 5, 7), dtype=np.int64)
    m = rng.integers(2**30, 2**31, size=5, dtype=np.int64)
    s = np.array([-31, -7, 0, 3, -62], dtype=np.int64)
    got = multiply_by_quantized_multiplier(
        torch.from_numpy(x), torch.from_numpy(m).int(), torch.from_numpy(s).int(), axis=1, rounding=rounding
    )
    return x, m, s, got


def test_mbqm_per_channel_axis() -> None:
    x, m, s, got = _mbqm_per_channel(np.random.default_rng(6), "gemmlowp")
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), ref_mbqm(x, m[None, :, None], s[None, :, None]))
    # axis=-1 with last-dim parameters equals plain broadcasting
    m7, s7 = m[:1].repeat(7), np.arange(-6, 1, dtype=np.int64)
    a = multiply_by_quantized_multiplier(
        torch.from_numpy(x), torch.from_numpy(m7), torch.from_numpy(s7), axis=-1
    )
    b = multiply_by_quantized_multiplier(torch.from_numpy(x), torch.from_numpy(m7), torch.from_numpy(s7))
    assert torch.equal(a, b)
    with pytest.raises(ValueError):
        multiply_by_quantized_multiplier(
            torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(s), axis=2
        )


def test_requantize_clamp_and_zero_point() -> None:
    rng = np.random.default_rng(7)
    acc = rng.integers(-(2**24), 2**24, size=(64, 4), dtype=np.int64)
    acc[0] = [I32_MAX, I32_MIN, 0, -1]
    m0, shift = quantize_multipliers(torch.tensor([0.01, 0.002, 1e-4, 0.3], dtype=torch.float64))
    zp = np.array([0, -3, 10, 128], dtype=np.int64)
    got = requantize(torch.from_numpy(acc).int(), m0, shift, torch.from_numpy(zp), -128, 127, axis=1)
    assert got.dtype == torch.int32
    want = np.clip(ref_mbqm(acc, m0.numpy()[None, :], shift.numpy()[None, :]) + zp[None, :], -128, 127)
    np.testing.assert_array_equal(got.numpy(), want)
    assert int(got.min()) == -128 and int(got.max()) == 127  # clamp exercised
    u8 = requantize(torch.from_numpy(acc[:, 0]), int(m0[0]), int(shift[0]), 5, 0, 255)
    np.testing.assert_array_equal(
        u8.numpy(), np.clip(ref_mbqm(acc[:, 0], m0[0].item(), shift[0].item()) + 5, 0, 255)
    )
    with pytest.raises(ValueError):
        requantize(torch.from_numpy(acc), 2**30, 0, 0, 5, 4)


# --------------------------------------------------------------------------------------------
# Single rounding (TFLITE_SINGLE_ROUNDING)
# --------------------------------------------------------------------------------------------


def test_mbqm_single_random_bit_exact() -> None:
    rng = np.random.default_rng(10)
    x = rng_int32(rng, 30000)
    m = rng.integers(2**30, 2**31, size=x.shape, dtype=np.int64)
    m[:9] = [0, 1, 2**30, 2**31 - 1, 2**30, 2**31 - 1, 2**31 - 1, 0, 1]  # with the extreme x values
    shift = rng.integers(-62, 32, size=x.shape, dtype=np.int64)
    shift[:9] = [31, -62, -31, -31, -32, 30, 31, 0, 0]
    shift[9:300] = 31  # no right shift: exact product, saturated
    shift[300:600] = rng.integers(-93 + 31, -30, size=300)  # total shift 62 and beyond
    got = multiply_by_quantized_multiplier_single(
        torch.from_numpy(x).int(), torch.from_numpy(m).int(), torch.from_numpy(shift).int()
    )
    assert got.dtype == torch.int32
    want = ref_mbqm_single(x, m, shift)
    np.testing.assert_array_equal(got.numpy().astype(np.int64), want)
    via_mode = multiply_by_quantized_multiplier(
        torch.from_numpy(x), torch.from_numpy(m), torch.from_numpy(shift), rounding="single"
    )
    np.testing.assert_array_equal(via_mode.numpy(), want)
    # saturation and flushes to 0 are hit
    assert (want == I32_MAX).any() and (want == I32_MIN).any() and (want == 0).any()
    # exact rational rounding, floor(x M0 2^(shift-31) + 1/2) clipped to int32, on a sample
    for xv, mv, sv, gv in zip(
        x[:3000].tolist(), m[:3000].tolist(), shift[:3000].tolist(), got[:3000].tolist(), strict=True
    ):
        exact = math.floor(Fraction(xv * mv) * Fraction(2) ** (sv - 31) + Fraction(1, 2))
        assert gv == min(max(exact, I32_MIN), I32_MAX), (xv, mv, sv)


@pytest.mark.parametrize(
    ("x", "m0", "shift", "single", "gemmlowp"),
    [
        (3, 2**30, 0, 2, 2),  # 1.5 -> 2
        (-3, 2**30, 0, -1, -1),  # -1.5 -> -1: ties toward +inf
        (-5, 2**30, 0, -2, -2),  # -2.5 -> -2
        (1, 3 * 2**29, -1, 0, 1),  # 0.375: gemmlowp rounds 0.75 -> 1 first, then 0.5 -> 1
        (-1, 3 * 2**29, -1, 0, -1),  # -0.375
        (-(2**10), 2**30, -10, 0, -1),  # -0.5 exactly: single ties up, RoundingDivideByPOT away from zero
        (2**10, 2**30, -10, 1, 1),  # +0.5
        (-(2**10) - 1, 2**30, -10, -1, -1),  # just below -0.5
        (I32_MIN, 2**30, -31, 0, -1),  # -0.5 at the deepest TFLite shift
        (I32_MIN, 2**31 - 1, -31, -1, -1),  # -1 + 2^-31
        (I32_MIN, 2**31 - 1, -32, 0, 0),  # total shift 63: |value| < 1/2 -> 0
        (I32_MAX, 2**31 - 1, -62, 0, 0),
        (3, 5, 31, 15, 5),  # total shift 0: the exact product (gemmlowp saturates 3 << 31 first)
        (I32_MAX, 2**31 - 1, 31, I32_MAX, I32_MAX - 1),  # saturates
        (I32_MIN, 2**31 - 1, 31, I32_MIN, -(2**31) + 1),
        (0, 2**31 - 1, -5, 0, 0),
    ],
)
def test_mbqm_single_cases(x: int, m0: int, shift: int, single: int, gemmlowp: int) -> None:
    xt = torch.tensor([x])
    assert int(multiply_by_quantized_multiplier(xt, m0, shift, rounding="single")[0]) == single
    assert int(multiply_by_quantized_multiplier(xt, m0, shift, rounding="gemmlowp")[0]) == gemmlowp
    assert int(ref_mbqm_single(np.array([x]), np.array(m0), np.array(shift))[0]) == single
    assert int(ref_mbqm(np.array([x]), np.array(m0), np.array(shift))[0]) == gemmlowp


def test_mbqm_single_per_channel_and_requantize() -> None:
    rng = np.random.default_rng(11)
    x, m, s, got = _mbqm_per_channel(rng, "single")
    np.testing.assert_array_equal(got.numpy(), ref_mbqm_single(x, m[None, :, None], s[None, :, None]))
    acc = rng.integers(-(2**24), 2**24, size=(64, 4), dtype=np.int64)
    m0, shift = quantize_multipliers(torch.tensor([0.01, 0.002, 1e-4, 0.3], dtype=torch.float64))
    zp = np.array([0, -3, 10, 128], dtype=np.int64)
    q = requantize(
        torch.from_numpy(acc).int(), m0, shift, torch.from_numpy(zp), -128, 127, axis=1, rounding="single"
    )
    want = np.clip(ref_mbqm_single(acc, m0.numpy()[None, :], shift.numpy()[None, :]) + zp[None, :], -128, 127)
    np.testing.assert_array_equal(q.numpy(), want)


def test_mbqm_single_is_within_half_a_code() -> None:
    """One rounding: |result - x M0 2^(shift-31)| <= 1/2 (gemmlowp's double rounding reaches ~1/2 + 2^-(n+1))."""
    rng = np.random.default_rng(12)
    x = rng.integers(-(2**20), 2**20, size=5000, dtype=np.int64)
    for real in [1e-6, 0.00390625, 0.123456, 0.75, 1.0, 3.7]:
        m0, shift = quantize_multiplier(real)
        got = multiply_by_quantized_multiplier(torch.from_numpy(x), m0, shift, rounding="single").numpy()
        exact = [Fraction(int(v) * m0) * Fraction(2) ** (shift - 31) for v in x[:500].tolist()]
        assert max(abs(int(g) - e) for g, e in zip(got[:500].tolist(), exact, strict=True)) <= Fraction(1, 2)


def test_mbqm_single_rejects() -> None:
    with pytest.raises(ValueError, match="multiplier"):
        multiply_by_quantized_multiplier_single(torch.tensor([1]), -1, 0)
    with pytest.raises(ValueError, match="shift"):
        multiply_by_quantized_multiplier_single(torch.tensor([1]), 2**30, 32)
    with pytest.raises(ValueError, match="x must lie"):
        multiply_by_quantized_multiplier_single(torch.tensor([2**31]), 2**30, 0)


@pytest.mark.parametrize(
    ("x", "e", "single", "gemmlowp"),
    [
        (-3, 1, -1, -2),  # -1.5
        (3, 1, 2, 2),
        (-5, 2, -1, -1),  # -1.25
        (-6, 2, -1, -2),  # -1.5
        (6, 2, 2, 2),
        (-7, 0, -7, -7),
        (I32_MIN, 31, -1, -1),
        (-(2**30), 31, 0, -1),  # -0.5
        (2**30, 31, 1, 1),
    ],
)
def test_shift_right_rounded(x: int, e: int, single: int, gemmlowp: int) -> None:
    xt = torch.tensor([x], dtype=torch.int32)
    assert (
        int(shift_right_rounded(xt, e, "single")[0]) == single == int(ref_shift_single(np.array([x]), e)[0])
    )
    assert int(shift_right_rounded(xt, e, "gemmlowp")[0]) == gemmlowp == int(rounding_divide_by_pot(xt, e)[0])
    assert shift_right_rounded(xt, e, "single").dtype == torch.int32


def test_rounding_names_are_checked() -> None:
    assert REQUANT_ROUNDINGS == ("gemmlowp", "single")
    assert check_requant_rounding("single") == "single"
    for bad in ("double", "Single", None):
        with pytest.raises(ValueError, match=r"rounding .*allowed: 'gemmlowp', 'single'"):
            check_requant_rounding(bad)
    with pytest.raises(ValueError, match="'tflite'"):
        multiply_by_quantized_multiplier(torch.tensor([1]), 2**30, 0, rounding="tflite")
    with pytest.raises(ValueError, match="'tflite'"):
        shift_right_rounded(torch.tensor([1]), 1, "tflite")
    with pytest.raises(ValueError, match="exponent"):
        shift_right_rounded(torch.tensor([1]), 63, "single")


# --------------------------------------------------------------------------------------------
# Dyadic numbers
# --------------------------------------------------------------------------------------------


def test_dyadic_matches_reference_and_precision() -> None:
    rng = np.random.default_rng(8)
    reals = np.concatenate([10.0 ** rng.uniform(-8, 6, size=150), [1.0, 0.5, 1 - 2**-40, 3.0]])
    reals = np.concatenate([reals, -reals[:50]])
    for bits in (8, 16, 31):
        for r in reals.tolist():
            if abs(r) >= 2**bits:
                with pytest.raises(ValueError):
                    dyadic(r, bits)
                continue
            b, c = dyadic(r, bits)
            assert (b, c) == ref_dyadic(r, bits)
            assert abs(b) < 2**bits and 0 <= c <= 62
            if c < 62:  # not capped: full precision
                assert abs(Fraction(b, 2**c) - Fraction(r)) <= abs(Fraction(r)) / 2**bits
    assert dyadic(0.0) == (0, 0)
    assert dyadic(1 - 2**-40, 8) == (128, 7)  # rounding carried into bit 8 -> renormalised


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_dyadic_rejects(bad: float) -> None:
    with pytest.raises(ValueError):
        dyadic(bad)


def test_apply_dyadic_bit_exact_and_ties() -> None:
    rng = np.random.default_rng(9)
    x = rng.integers(-(2**31), 2**31, size=20000, dtype=np.int64)
    for b, c in [(1, 1), (3, 2), (-5, 3), (dyadic(0.1234)), (dyadic(7.5, 20)), (12345, 0)]:
        got = apply_dyadic(torch.from_numpy(x).int(), b, c)
        assert got.dtype == torch.int64
        want = x * b if c == 0 else (x * b + (1 << (c - 1))) >> c
        np.testing.assert_array_equal(got.numpy(), want)
    # round half up: 1.5 -> 2, -1.5 -> -1, -2.5 -> -2
    assert apply_dyadic(torch.tensor([3, -3, -5]), 1, 1).tolist() == [2, -1, -2]


def test_apply_dyadic_overflow_guard() -> None:
    with pytest.raises(OverflowError):
        apply_dyadic(torch.tensor([2**40]), 2**30, 10)
    with pytest.raises(OverflowError):
        apply_dyadic(torch.tensor([-(2**62)]), 2, 1)
    assert apply_dyadic(torch.tensor([2**31]), 2**30, 31).tolist() == [2**30]
