"""I-ViT integer ops: exact isqrt, bit-exactness against independent numpy int64 references,
error bounds against the float ops, and an integer-only check of every run-time op."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from precsim.integer.ivit_ops import (
    i_layernorm,
    i_layernorm_int,
    isqrt,
    prepare_i_layernorm,
    prepare_shift_exp,
    prepare_shift_gelu,
    prepare_shiftmax,
    shift_gelu,
    shift_gelu_int,
    shiftmax,
    shiftmax_int,
)

K_EXP = 30  # exp_bits used by the ops' defaults
F_EXP = 20  # frac_bits
Q_SIG = 16  # sigmoid_bits

# --------------------------------------------------------------------------------------------
# Independent reference constants (rules as documented; exact rationals for the dyadics)
# --------------------------------------------------------------------------------------------


def ref_dyadic(real: float, bits: int) -> tuple[int, int]:
    """Largest c <= 62 with round_half_away(real * 2^c) < 2^bits (real > 0)."""
    fr = Fraction(real)
    for c in range(62, -1, -1):
        b = math.floor(fr * 2**c + Fraction(1, 2))
        if b < 2**bits:
            return b, c
    raise AssertionError("real too large")


def ref_guard(scale: float) -> int:
    g = 0
    while Fraction(scale) / 2**g >= Fraction(1, 2**12):
        g += 1
    return g


def ref_exp_consts(scale: float) -> dict[str, int]:
    g = ref_guard(scale)
    x_floor = -(math.ceil((K_EXP + 4) / (1.4375 * scale)) + 1)
    bits = min(31, 61 - (2 * (-x_floor * 2**g) + 2).bit_length())
    b, c = ref_dyadic(scale * 2.0 ** (F_EXP - g), bits)
    return {"guard_bits": g, "x_floor": x_floor, "mult": b, "shift": c}


def check_exp_consts(consts: Any, scale: float) -> dict[str, int]:
    want = ref_exp_consts(scale)
    got = {k: getattr(consts, k) for k in want}
    assert got == want
    assert (consts.frac_bits, consts.exp_bits) == (F_EXP, K_EXP)
    return want


# --------------------------------------------------------------------------------------------
# Independent numpy int64 references of the ops (I-ViT rules as documented in ivit_ops)
# --------------------------------------------------------------------------------------------


def ref_shift_exp(x: np.ndarray, c: dict[str, int]) -> np.ndarray:
    x = np.maximum(x.astype(np.int64), c["x_floor"])
    big = x * 2 ** c["guard_bits"]
    t = big + big // 2 - big // 16  # floor divisions == arithmetic shifts
    p = (t * c["mult"] + (1 << (c["shift"] - 1))) // 2 ** c["shift"]
    hi = p // 2**F_EXP  # floor(p / 2^F) <= 0
    r = p - hi * 2**F_EXP
    q = -hi
    mant = (2**F_EXP + r) * 2 ** (K_EXP - F_EXP)
    return np.where(q > K_EXP, 0, mant // np.left_shift(np.int64(1), np.minimum(q, K_EXP)))


def ref_shiftmax(x: np.ndarray, scale: float, bits: int, sum_preserving: bool) -> np.ndarray:
    c = ref_exp_consts(scale)
    m = 2**bits - 1
    x = x.astype(np.int64)
    e = ref_shift_exp(x - x.max(axis=-1, keepdims=True), c)
    s = e.sum(axis=-1, keepdims=True)
    if not sum_preserving:
        return (2 * e * m + s) // (2 * s)
    r = (2 * np.cumsum(e, axis=-1) * m + s) // (2 * s)
    return np.diff(r, axis=-1, prepend=0)


def ref_gelu_consts(scale: float, out_scale: float, out_bits: int) -> dict[str, Any]:
    qmax = 2 ** (out_bits - 1) - 1
    g = ref_guard(scale)
    x_lim = math.ceil((K_EXP + 4) / (1.6875 * 1.4375 * scale)) + 2
    x_hi = max(x_lim, math.ceil((qmax + 1) * out_scale / scale) + 1)
    bits = min(31, 61 - (x_hi * 2**Q_SIG).bit_length())
    b, c = ref_dyadic(scale / out_scale * 2.0**-Q_SIG, bits)
    return {
        "guard_bits": g,
        "x_lo": -x_lim,
        "x_hi": x_hi,
        "out_mult": b,
        "out_shift": c,
        "qmin": -qmax - 1,
        "qmax": qmax,
        "exp": ref_exp_consts(scale * 2.0**-g),
    }


def ref_shift_gelu(x: np.ndarray, c: dict[str, Any]) -> np.ndarray:
    x = np.clip(x.astype(np.int64), c["x_lo"], c["x_hi"])
    big = x * 2 ** c["guard_bits"]
    y = big + big // 2 + big // 8 + big // 16
    e = ref_shift_exp(-np.abs(y), c["exp"])
    one = np.int64(2**K_EXP)
    num = np.where(y >= 0, one, e)
    den = one + e
    sig = (num * 2 ** (Q_SIG + 1) + den) // (2 * den)
    out = (x * sig * c["out_mult"] + (1 << (c["out_shift"] - 1))) // 2 ** c["out_shift"]
    return np.clip(out, c["qmin"], c["qmax"])


def ref_ln_consts(
    scale: float,
    n: int,
    out_scale: float,
    w: np.ndarray,
    b: np.ndarray,
    eps: float,
    in_bits: int,
    out_bits: int,
    weight_bits: int = 16,
    k: int = 16,
) -> dict[str, Any]:
    p = min(16, (60 - n.bit_length() - 2 * in_bits) // 2)
    eps_int = min(round(eps / (scale * scale) * 2.0 ** (2 * p)), 2**61)
    wmax = float(np.abs(w).max())
    s_w = wmax / (2 ** (weight_bits - 1) - 1) if wmax > 0 else 1.0
    w_int = np.round(w / s_w).astype(np.int64)
    b_int = np.round(b / (s_w * 2.0**-k)).astype(np.int64)
    acc_bound = ((math.isqrt(n) + 2) * 2 ** (k + 1)) * int(np.abs(w_int).max()) + int(np.abs(b_int).max())
    bits = min(31, 61 - acc_bound.bit_length())
    mult, shift = ref_dyadic(s_w / out_scale * 2.0**-k, bits)
    qmax = 2 ** (out_bits - 1) - 1
    return {
        "frac_bits": p,
        "eps_int": eps_int,
        "weight_scale": s_w,
        "w_int": w_int,
        "b_int": b_int,
        "out_mult": mult,
        "out_shift": shift,
        "qmin": -qmax - 1,
        "qmax": qmax,
        "k": k,
    }


def ref_i_layernorm(x: np.ndarray, c: dict[str, Any]) -> np.ndarray:
    x = x.astype(np.int64)
    n = x.shape[-1]
    p, k = c["frac_bits"], c["k"]
    mean = (x.sum(axis=-1, keepdims=True) * 2 ** (p + 1) + n) // (2 * n)
    y = x * 2**p - mean
    var = (2 * (y * y).sum(axis=-1, keepdims=True) + n) // (2 * n) + c["eps_int"]
    std = np.maximum(np.vectorize(math.isqrt, otypes=[np.int64])(var), 1)
    z = (y * 2 ** (k + 1) + std) // (2 * std)
    acc = z * c["w_int"] + c["b_int"]
    out = (acc * c["out_mult"] + (1 << (c["out_shift"] - 1))) // 2 ** c["out_shift"]
    return np.clip(out, c["qmin"], c["qmax"])


class FloatSpy(TorchFunctionMode):
    """Records every torch call inside the block whose result contains a floating tensor."""

    def __init__(self) -> None:
        super().__init__()
        self.float_calls: list[str] = []

    def __torch_function__(
        self, func: Callable[..., Any], types: Any, args: Any = (), kwargs: Any = None
    ) -> Any:
        out = func(*args, **(kwargs or {}))
        outs = out if isinstance(out, tuple | list) else (out,)
        if any(isinstance(o, torch.Tensor) and (o.is_floating_point() or o.is_complex()) for o in outs):
            self.float_calls.append(getattr(func, "__name__", str(func)))
        return out


def assert_integer_only(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    spy = FloatSpy()
    with spy:
        out = fn()
    assert spy.float_calls == []
    assert out.dtype == torch.int32
    return out


# --------------------------------------------------------------------------------------------
# isqrt
# --------------------------------------------------------------------------------------------


def test_isqrt_exhaustive_small() -> None:
    n = torch.arange(0, 2**20 + 1, dtype=torch.int64)
    want = np.fromiter((math.isqrt(v) for v in range(2**20 + 1)), dtype=np.int64, count=2**20 + 1)
    got = isqrt(n)
    assert got.dtype == torch.int64
    np.testing.assert_array_equal(got.numpy(), want)


def test_isqrt_large_and_squares() -> None:
    gen = torch.Generator().manual_seed(0)
    rnd = torch.randint(0, 2**62, (50000,), generator=gen, dtype=torch.int64)
    roots = torch.randint(1, 2**31, (20000,), generator=gen, dtype=torch.int64)
    roots = torch.cat([roots, torch.tensor([1, 2, 3, 2**31 - 1, 2**16, 2**30])])
    sq = roots * roots
    n = torch.cat([rnd, sq - 1, sq, sq + 1, torch.tensor([2**62 - 1, 2**62 - 2, 2, 3])])
    got = isqrt(n).tolist()
    assert got == [math.isqrt(v) for v in n.tolist()]
    assert int(isqrt(torch.tensor([2]))[0]) == 1  # I-ViT's 10-step Newton from 2^16 gives 64
    assert isqrt(torch.tensor([[4, 8]], dtype=torch.int32)).tolist() == [[2, 2]]


def test_isqrt_rejects_out_of_range() -> None:
    with pytest.raises(ValueError):
        isqrt(torch.tensor([-1]))
    with pytest.raises(ValueError):
        isqrt(torch.tensor([2**62]))
    with pytest.raises(TypeError):
        isqrt(torch.tensor([2.0]))


# --------------------------------------------------------------------------------------------
# Shift exponential and Shiftmax
# --------------------------------------------------------------------------------------------

SCALES = [1e-4, 0.002, 0.03, 0.1, 0.7, 3.0]


@pytest.mark.parametrize("scale", SCALES)
def test_shift_exp_consts_and_floor(scale: float) -> None:
    k = prepare_shift_exp(scale)
    check_exp_consts(k, scale)
    # the clamp point is already past underflow, so clamping cannot change a result
    from precsim.integer.ivit_ops import shift_exp_int

    assert int(shift_exp_int(torch.tensor([k.x_floor]), k)[0]) == 0
    assert int(shift_exp_int(torch.tensor([0]), k)[0]) == 2**K_EXP
    with pytest.raises(dataclasses.FrozenInstanceError):
        k.mult = 1  # type: ignore[misc]


@pytest.mark.parametrize("scale", SCALES)
@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("sum_preserving", [True, False])
def test_shiftmax_bit_exact(scale: float, bits: int, sum_preserving: bool) -> None:
    gen = torch.Generator().manual_seed(int(scale * 1000) + bits)
    span = min(2**20, max(8, int(12 / scale)))  # logits spanning ~[-12, 12] (and wider for tiny scales)
    x = torch.randint(-span, span, (6, 4, 33), generator=gen, dtype=torch.int32)
    x[0, 0] = 5  # constant row
    x[0, 1, 1:] = -(2**31) + 1  # one-hot row, huge gaps
    k = prepare_shiftmax(scale, bits, sum_preserving=sum_preserving)
    check_exp_consts(k.exp, scale)
    got = assert_integer_only(lambda: shiftmax_int(x, k))
    want = ref_shiftmax(x.numpy(), scale, bits, sum_preserving)
    np.testing.assert_array_equal(got.numpy(), want)
    assert int(got.min()) >= 0 and int(got.max()) <= 2**bits - 1
    # int64 input and a single-element row
    np.testing.assert_array_equal(shiftmax_int(x.long(), k).numpy(), want)
    assert shiftmax_int(x[..., :1], k).unique().tolist() == [2**bits - 1]


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize("sum_preserving", [True, False])
def test_shiftmax_error_bound(bits: int, sum_preserving: bool) -> None:
    lsb = 1.0 / (2**bits - 1)
    bound = 0.017 + (lsb if sum_preserving else lsb / 2)
    gen = torch.Generator().manual_seed(bits)
    worst = 0.0
    for scale in [0.001, 0.01, 0.05, 0.1, 0.3, 1.0, 2.0]:
        span = max(2, int(6 / scale))
        for n in (2, 3, 5, 64):
            x = torch.randint(-span, 1, (4000 // n + 50, n), generator=gen, dtype=torch.int32)
            codes, out_scale = shiftmax(x, scale, bits, sum_preserving=sum_preserving)
            err = (codes.double() * out_scale - torch.softmax(x.double() * scale, dim=-1)).abs()
            worst = max(worst, float(err.max()))
        # two-element rows over every gap: the chord's worst case
        d = torch.arange(0, int(8 / scale) + 2, dtype=torch.int32)
        x2 = torch.stack([torch.zeros_like(d), -d], dim=-1)
        codes, out_scale = shiftmax(x2, scale, bits, sum_preserving=sum_preserving)
        err = (codes.double() * out_scale - torch.softmax(x2.double() * scale, dim=-1)).abs()
        worst = max(worst, float(err.max()))
    assert worst < bound
    assert worst > 0.01  # the approximation is real: a perfect softmax would mean a broken test
    if bits == 8:
        assert worst < 0.021


@pytest.mark.parametrize("bits", [8, 16])
def test_shiftmax_rows_sum_to_one_long_rows(bits: int) -> None:
    m = 2**bits - 1
    gen = torch.Generator().manual_seed(11)
    for scale in (0.004, 0.05):
        x = torch.randint(-int(4 / scale), int(4 / scale), (16, 1024), generator=gen, dtype=torch.int32)
        x[0] = 0  # uniform row: every probability is 1/1024 < 1 LSB at 8 bits
        codes, out_scale = shiftmax(x, scale, bits)
        assert codes.sum(dim=-1).tolist() == [m] * 16  # exactly 1 in every row
        assert torch.allclose((codes.double() * out_scale).sum(-1), torch.ones(16, dtype=torch.float64))
        ref = torch.softmax(x.double() * scale, dim=-1)
        assert float((codes.double() * out_scale - ref).abs().max()) < 0.017 + 1 / m
        near, _ = shiftmax(x, scale, bits, sum_preserving=False)
        # nearest rounding: stated tolerance n / (2M), and codes within 1 of the cumulative ones
        assert int((near.sum(-1) - m).abs().max()) <= 1024 // 2
        assert int((near - codes).abs().max()) <= 1
    if bits == 16:  # 16 bits keep the long-row sums close even without sum preservation
        assert int((near.sum(-1) - m).abs().max()) <= 1024 // 2


def test_shiftmax_rejects() -> None:
    with pytest.raises(TypeError):
        shiftmax(torch.zeros(2, 3), 0.1)
    with pytest.raises(ValueError):
        prepare_shiftmax(0.0)
    with pytest.raises(ValueError):
        prepare_shiftmax(0.1, output_bits=17)
    with pytest.raises(ValueError):
        shiftmax_int(torch.zeros(1, 70000, dtype=torch.int32), prepare_shiftmax(0.1, 16))


# --------------------------------------------------------------------------------------------
# ShiftGELU
# --------------------------------------------------------------------------------------------

GELU_CASES = [
    (0.001, None, 8),
    (0.01, None, 8),
    (0.05, 0.0125, 16),
    (0.1, None, 8),
    (0.37, 0.02, 16),
    (1.5, 0.5, 8),
]


@pytest.mark.parametrize(("scale", "out_scale", "out_bits"), GELU_CASES)
def test_shift_gelu_bit_exact(scale: float, out_scale: float | None, out_bits: int) -> None:
    so = scale if out_scale is None else out_scale
    k = prepare_shift_gelu(scale, out_scale, out_bits)
    want_c = ref_gelu_consts(scale, so, out_bits)
    for name in ("guard_bits", "x_lo", "x_hi", "out_mult", "out_shift", "qmin", "qmax"):
        assert getattr(k, name) == want_c[name], name
    check_exp_consts(k.exp, scale * 2.0**-k.guard_bits)
    gen = torch.Generator().manual_seed(3)
    lim = int(10 / scale) + 3
    x = torch.cat(
        [
            torch.arange(-lim, lim + 1, dtype=torch.int32),
            torch.randint(-(2**31), 2**31 - 1, (2000,), generator=gen, dtype=torch.int32),
            torch.tensor([-(2**31), 2**31 - 1], dtype=torch.int32),
        ]
    )
    got = assert_integer_only(lambda: shift_gelu_int(x, k))
    np.testing.assert_array_equal(got.numpy(), ref_shift_gelu(x.numpy(), want_c))
    np.testing.assert_array_equal(shift_gelu_int(x.long(), k).numpy(), got.numpy())
    # clamping is invisible: far inputs saturate exactly as the unclamped formula would
    assert int(shift_gelu_int(torch.tensor([2**31 - 1]), k)[0]) == k.qmax
    assert int(shift_gelu_int(torch.tensor([-(2**31)]), k)[0]) == 0


def test_shift_gelu_error_bound() -> None:
    worst = 0.0
    for scale in [2**-10, 0.003, 0.01, 0.03, 0.1, 0.2, 0.5]:
        for out_scale, out_bits in [(scale / 64, 16), (scale, 8)]:
            x = torch.arange(-int(8 / scale) - 5, int(8 / scale) + 5, dtype=torch.int32)
            codes, so = shift_gelu(x, scale, out_scale, out_bits)
            ref = F.gelu(x.double() * scale)
            in_range = (ref > -(2 ** (out_bits - 1)) * so) & (ref < (2 ** (out_bits - 1) - 1) * so)
            err = (codes.double() * so - ref).abs()[in_range]
            worst = max(worst, float(err.max()) - so / 2)
    assert worst < 0.026
    assert worst > 0.02  # x * sigmoid(1.702 x) alone is 0.0203 off: the bound is not vacuous


def test_shift_gelu_shape_and_rejects() -> None:
    x = torch.randint(-128, 128, (2, 3, 5), dtype=torch.int32)
    codes, so = shift_gelu(x, 0.05)
    assert codes.shape == x.shape and codes.dtype == torch.int32 and so == 0.05
    with pytest.raises(ValueError):
        prepare_shift_gelu(-1.0)
    with pytest.raises(ValueError):
        prepare_shift_gelu(0.1, out_bits=1)


# --------------------------------------------------------------------------------------------
# I-LayerNorm
# --------------------------------------------------------------------------------------------

LN_CASES = [(1, 0.05, 8), (2, 0.001, 16), (16, 1.0, 8), (197, 0.02, 16), (768, 0.003, 16), (768, 0.5, 8)]


def _ln_inputs(n: int, in_bits: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(2 ** (in_bits - 1)), 2 ** (in_bits - 1)
    x = torch.randint(lo, hi, (24, n), generator=gen, dtype=torch.int32)
    x[1::3] = x[1::3] // 2 ** (in_bits - 3)  # rows with a spread of a few codes
    x[2] = 7  # constant row: variance 0
    x[3, 0] = lo  # outlier
    w = torch.randn(n, generator=gen) * 0.5 + 1.0
    b = torch.randn(n, generator=gen) * 0.3
    return x, w, b


@pytest.mark.parametrize(("n", "scale", "in_bits"), LN_CASES)
def test_i_layernorm_bit_exact(n: int, scale: float, in_bits: int) -> None:
    x, w, b = _ln_inputs(n, in_bits, n)
    out_scale = 6.0 / 127
    for weight, bias, eps in [(w, b, 1e-5), (None, None, 1e-6), (w, None, 0.0)]:
        k = prepare_i_layernorm(scale, n, out_scale, weight, bias, eps=eps, in_bits=in_bits)
        wn = np.ones(n) if weight is None else weight.double().numpy()
        bn = np.zeros(n) if bias is None else bias.double().numpy()
        c = ref_ln_consts(scale, n, out_scale, wn, bn, eps, in_bits, 8)
        assert (k.frac_bits, k.eps_int, k.out_mult, k.out_shift) == (
            c["frac_bits"],
            c["eps_int"],
            c["out_mult"],
            c["out_shift"],
        )
        np.testing.assert_array_equal(k.weight_int.numpy(), c["w_int"])
        np.testing.assert_array_equal(k.bias_int.numpy(), c["b_int"])
        got = assert_integer_only(lambda k=k: i_layernorm_int(x, k))
        np.testing.assert_array_equal(got.numpy(), ref_i_layernorm(x.numpy(), c))
    with pytest.raises(ValueError):
        i_layernorm_int(torch.full((1, n), 2 ** (in_bits - 1), dtype=torch.int32), k)


def test_i_layernorm_error_bound() -> None:
    """Per element: out_scale/2 + |w| (2^-(k+1) + (1/2 + |z|) 2^-P / sigma) + |z| s_w / 2 + ...,
    sigma = sqrt(var + eps / scale^2) in codes (the documented bound)."""
    worst_lsb = 0.0
    for n, scale, in_bits in LN_CASES:
        x, w, b = _ln_inputs(n, in_bits, 100 + n)
        out_scale = 8.0 / 32767
        k = prepare_i_layernorm(scale, n, out_scale, w, b, in_bits=in_bits, out_bits=16)
        codes = i_layernorm_int(x, k)
        xf = x.double() * scale
        ref = F.layer_norm(xf, (n,), w.double(), b.double(), 1e-5)
        z = F.layer_norm(xf, (n,), None, None, 1e-5).abs()
        sigma = torch.sqrt(x.double().var(-1, unbiased=False, keepdim=True) + 1e-5 / scale**2)
        wa = w.double().abs()
        bound = (
            out_scale / 2
            + wa * (2.0 ** -(k.norm_bits + 1) + (0.5 + z) * 2.0**-k.frac_bits / sigma) * 1.01
            + z * k.weight_scale / 2
            + k.weight_scale * 2.0**-k.norm_bits
            + ref.abs() * 2.0**-20
        )
        err = (codes.double() * out_scale - ref).abs()
        inside = ref.abs() < 32767 * out_scale
        assert bool((err <= bound)[inside].all())
        wide = sigma.expand_as(ref) > 100  # rows spanning > 100 codes: under 1 LSB
        if bool((inside & wide).any()):
            worst_lsb = max(worst_lsb, float(err[inside & wide].max()) / out_scale)
    assert 0.5 < worst_lsb < 1.0


def test_i_layernorm_wrapper_and_constant_row() -> None:
    n = 8
    b = torch.linspace(-1, 1, n)
    x = torch.full((3, n), -5, dtype=torch.int32)
    codes, so = i_layernorm(x, 0.1, 1 / 64, None, b)
    assert so == 1 / 64
    assert codes.tolist() == [torch.round(b * 64).int().tolist()] * 3  # (x - mean) = 0 -> bias only
    with pytest.raises(ValueError):
        prepare_i_layernorm(0.1, 4096, 0.1, in_bits=32)
