"""Integer formats against a plain reference written here in numpy:
S * (clamp(round_half_even(x / S) + Z, qmin, qmax) - Z), with S and Z from min/max."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precsim.formats import IntFormat, parse_format
from precsim.runtime import quantize

from ._helpers import F32, assert_same_bits


def ref_qparams(lo, hi, qmin, qmax, symmetric):
    lo = np.minimum(lo, F32(0)).astype(F32)
    hi = np.maximum(hi, F32(0)).astype(F32)
    if symmetric:
        s = (np.maximum(-lo, hi) / F32(qmax)).astype(F32)
        z = np.zeros_like(s)
    else:
        s = ((hi - lo) / F32(qmax - qmin)).astype(F32)
        safe = np.where(s > 0, s, F32(1)).astype(F32)
        z = np.clip(np.round(F32(qmin) - lo / safe), qmin, qmax).astype(F32)
    s = np.where(s > 0, s, F32(1)).astype(F32)
    return s, z


def ref_fake_quant(x, s, z, qmin, qmax):
    q = np.round((x / s).astype(F32)) + z  # np.round: half to even
    q = np.clip(q, qmin, qmax)
    return ((q - z) * s).astype(F32)


def ranges(bits: int, signed: bool, narrow: bool = False):
    if signed:
        return -(2 ** (bits - 1)) + (1 if narrow else 0), 2 ** (bits - 1) - 1
    return 0, 2**bits - 1


def data(shape, seed, positive=False):
    g = np.random.default_rng(seed)
    x = (g.standard_normal(shape) * np.exp2(g.integers(-3, 4, shape))).astype(F32)
    x.flat[:: max(1, x.size // 7)] = 0.0
    if positive:
        x = np.abs(x) + F32(0.25)
    return x


@pytest.mark.parametrize("bits", range(2, 17))
@pytest.mark.parametrize("signed", [True, False])
def test_per_tensor(bits: int, signed: bool) -> None:
    qmin, qmax = ranges(bits, signed)
    fmt = IntFormat(bits, signed=signed)
    assert (fmt.qmin, fmt.qmax) == (qmin, qmax)
    for seed, positive in ((0, False), (1, True)):
        x = data((6, 40), seed + bits, positive)
        s, z = ref_qparams(x.min(), x.max(), qmin, qmax, symmetric=signed)
        want = ref_fake_quant(x, s, z, qmin, qmax)
        got = quantize(torch.from_numpy(x), fmt)
        assert_same_bits(got, want, x, fmt.spec)
        # outputs on the grid (up to the float32 rounding of q * S), codes in range
        codes = got.numpy().astype(np.float64) / s + z
        assert (np.abs(codes - np.round(codes)) <= 3e-7 * (qmax - qmin)).all()
        assert np.round(codes).min() >= qmin and np.round(codes).max() <= qmax


@pytest.mark.parametrize("spec,signed,symmetric,narrow", [
    ("int8", True, True, False),
    ("uint8", False, False, False),
    ("int4(symmetric=false)", True, False, False),
    ("int8(narrow=true)", True, True, True),
    ("uint4(symmetric=true)", False, True, False),
])
def test_per_channel_every_axis_of_4d(spec, signed, symmetric, narrow) -> None:
    x = data((3, 4, 5, 6), 3)
    base = parse_format(spec)
    qmin, qmax = ranges(base.bits, signed, narrow)
    for axis in range(4):
        fmt = IntFormat(base.bits, signed, symmetric, narrow, axis=axis)
        dims = tuple(d for d in range(4) if d != axis)
        s, z = ref_qparams(x.min(axis=dims, keepdims=True), x.max(axis=dims, keepdims=True), qmin, qmax, symmetric)
        want = ref_fake_quant(x, s, z, qmin, qmax)
        assert_same_bits(quantize(torch.from_numpy(x), fmt), want, x, f"{spec} axis={axis}")
        # negative axis is the same
        fmt_neg = IntFormat(base.bits, signed, symmetric, narrow, axis=axis - 4)
        assert_same_bits(quantize(torch.from_numpy(x), fmt_neg), want, x, f"{spec} axis={axis - 4}")


@pytest.mark.parametrize("axis", [0, 1, -1])
@pytest.mark.parametrize("symmetric", [True, False])
def test_per_group(axis: int, symmetric: bool) -> None:
    x = data((8, 12, 16), 4)
    g = 4
    fmt = parse_format(f"int4(axis={axis},group={g},symmetric={str(symmetric).lower()})")
    qmin, qmax = -8, 7
    y = np.moveaxis(x, axis, -1)
    yg = y.reshape(*y.shape[:-1], y.shape[-1] // g, g)
    s, z = ref_qparams(yg.min(-1, keepdims=True), yg.max(-1, keepdims=True), qmin, qmax, symmetric)
    want = np.moveaxis(ref_fake_quant(yg, s, z, qmin, qmax).reshape(y.shape), -1, axis)
    assert_same_bits(quantize(torch.from_numpy(x), fmt), want, x, fmt.spec)


def test_group_must_divide_axis() -> None:
    with pytest.raises(ValueError, match="not a multiple of group_size=5"):
        quantize(torch.ones(4, 12), "int8(group=5)")


@pytest.mark.parametrize("spec", ["uint8", "int8(symmetric=false)", "uint4", "int2(symmetric=false)",
                                  "uint8(axis=1)", "int4(symmetric=false,group=8)"])
def test_zero_is_exact_for_affine(spec: str) -> None:
    """The zero point is an integer (nudged), so 0 maps to exactly 0 even when the range does
    not straddle zero symmetrically."""
    g = np.random.default_rng(9)
    for shift in (0.3, -2.7, 11.0, -0.001):
        x = (g.uniform(0, 1, (16, 32)) * 5 + shift).astype(F32)
        x[::3, ::5] = 0.0
        y = quantize(torch.from_numpy(x), spec).numpy()
        assert (y[x == 0] == 0).all() and not np.signbit(y[x == 0]).any()


def test_narrow_range() -> None:
    fmt = parse_format("int8(narrow=true)")
    assert (fmt.qmin, fmt.qmax) == (-127, 127)
    x = torch.tensor([-10.0, -5.0, 0.0, 3.0, 10.0])
    y = quantize(x, fmt, scale=10 / 127)
    assert y[0] == -10 and y[-1] == 10  # symmetric: -max is a code
    y2 = quantize(torch.tensor([-200.0]), fmt, scale=1.0)
    assert y2.item() == -127  # -128 is dropped
    assert quantize(torch.tensor([-200.0]), "int8", scale=1.0).item() == -128


def test_explicit_scale_and_zero_point_per_channel() -> None:
    x = data((5, 3, 7), 12)
    s = np.array([0.05, 0.2, 1.5], dtype=F32)
    z = np.array([-3.0, 0.0, 100.0], dtype=F32)
    fmt = parse_format("int8(axis=1)")
    want = ref_fake_quant(x, s[None, :, None], z[None, :, None], -128, 127)
    got = quantize(torch.from_numpy(x), fmt, scale=torch.from_numpy(s), zero_point=torch.from_numpy(z))
    assert_same_bits(got, want, x, "explicit per-channel")
    # scalar scale per tensor, zero point as a Python number
    want2 = ref_fake_quant(x, F32(0.1), F32(7), 0, 255)
    assert_same_bits(quantize(torch.from_numpy(x), "uint8", scale=0.1, zero_point=7), want2, x, "explicit per-tensor")


def test_explicit_qparams_are_checked() -> None:
    x = torch.ones(3)
    with pytest.raises(ValueError, match="scale must be finite and > 0"):
        quantize(x, "int8", scale=0.0)
    with pytest.raises(ValueError, match="zero_point must be an integer in -128..127"):
        quantize(x, "int8", scale=1.0, zero_point=0.5)
    with pytest.raises(ValueError, match="zero_point must be an integer in 0..255"):
        quantize(x, "uint8", scale=1.0, zero_point=300)
    with pytest.raises(ValueError, match="zero_point given without scale"):
        quantize(x, "int8", zero_point=1)


def test_specials_and_degenerate() -> None:
    x = torch.tensor([float("nan"), float("inf"), -float("inf"), 1.0, -2.0])
    y = quantize(x, "int8", scale=0.5)
    assert torch.isnan(y[0])
    assert y[1].item() == 127 * 0.5 and y[2].item() == -128 * 0.5  # ±Inf saturate
    # dynamic scale ignores non-finite values
    y = quantize(x, "int8")
    assert y[3].item() == pytest.approx(1.0, rel=1e-2) and torch.isfinite(y[1:]).all()
    assert torch.equal(quantize(torch.zeros(4, 4), "int8"), torch.zeros(4, 4))
    assert torch.equal(quantize(torch.zeros(4, 4), "uint8(axis=0)"), torch.zeros(4, 4))
    assert quantize(torch.tensor(3.0), "int8").item() == 3.0  # 0-d


def test_codes_interface() -> None:
    from precsim.formats.integer import quantize_codes

    fmt = IntFormat(8)
    x = torch.tensor([-1.0, -0.5, 0.0, 0.26, 1.0])
    s, z = fmt.choose_qparams(x)
    codes = quantize_codes(x, s, z, fmt.qmin, fmt.qmax)
    assert codes.dtype == torch.int32
    assert torch.equal(codes.float() * s, quantize(x, fmt))


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("compile_kernels", [False, True])
@pytest.mark.parametrize("spec", ["int8", "int8(axis=0)", "int8(group=8)", "uint8"])
def test_no_finite_value_gives_scale_one(spec: str, compile_kernels: bool, request) -> None:
    """The documented policy (docs/guide.md, Inf and NaN): where a tensor, channel or group has
    no finite value its range is [0, 0], as for all zeros, so S = 1: ±Inf become qmin and qmax
    (times 1), NaN stays NaN; nothing raises and no scale is made up from the Inf."""
    if compile_kernels:
        request.getfixturevalue("compiled")
    fmt = parse_format(spec)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 16, generator=g)
    specials = torch.tensor([INF, -INF, NAN, INF]).repeat(8)
    whole = spec in ("int8", "uint8")
    if whole:  # per tensor: nothing finite anywhere
        x = specials.reshape(8, 4).repeat(1, 4)
    else:  # row 2 (a channel; two groups) has no finite value, the other rows keep their own scales
        x[2] = specials[:16]
    y = quantize(x, spec)
    ends = torch.where(x > 0, float(fmt.qmax), float(fmt.qmin))
    nonfinite = ~torch.isfinite(x)
    assert torch.equal(y[nonfinite & ~x.isnan()], ends[nonfinite & ~x.isnan()])
    assert y[x.isnan()].isnan().all()
    if not whole:
        assert_same_bits(y[2], torch.where(x[2].isnan(), x[2], ends[2]))
        others = torch.cat([x[:2], x[3:]])
        assert_same_bits(torch.cat([y[:2], y[3:]]), quantize(others, spec))
