"""runtime/accumulate.py against a pure NumPy reference, bit for bit.

The reference is the definition: for each block of K in ascending order, acc = R(acc + block
sum) in float64 (the exact sum, for these inputs) rounded by ``precsim.quantize`` (which narrows
float64 so that it rounds once), or acc = wrap/saturate(acc + block sum) in int64. Inputs are
small integers times powers of two, so every in-block float32 sum is exact.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

import precsim
import precsim.runtime.accumulate as accumulate
from precsim.formats import parse_format
from precsim.formats.random import random_bits
from precsim.runtime.accumulate import block_seeds, conv_as_matmul, matmul_float, matmul_int, sum_to_odd


def exact_values(shape: tuple[int, ...], seed: int, ints: int = 7, spread: int = 2) -> torch.Tensor:
    """Integers in [-ints, ints] times 2^[-spread, spread]: products and their block sums are
    exact in float32 (and every sum in float64)."""
    g = torch.Generator().manual_seed(seed)
    mant = torch.randint(-ints, ints + 1, shape, generator=g).float()
    return mant * 2.0 ** torch.randint(-spread, spread + 1, shape, generator=g).float()


def reference_float(a: torch.Tensor, b: torch.Tensor, fmt: str, block: int, promote: int | None = None,
                    rounding: str = "nearest", seed: torch.Tensor | None = None,
                    init: torch.Tensor | None = None) -> torch.Tensor:
    a64, b64 = a.double().numpy(), b.double().numpy()
    k = a64.shape[-1]
    nb = math.ceil(k / block)
    shape = np.broadcast_shapes(a64.shape[:-2], b64.shape[:-2]) + (a64.shape[-2], b64.shape[-1])
    acc = np.zeros(shape)
    if init is not None:
        acc = precsim.quantize(torch.broadcast_to(init.double(), shape).contiguous(), fmt).double().numpy()
    total = np.zeros(shape, dtype=np.float32)
    seeds = block_seeds(seed, 0, nb) if seed is not None else None
    for j in range(nb):
        s = a64[..., j * block:(j + 1) * block] @ b64[..., j * block:(j + 1) * block, :]
        params = {}
        if rounding == "stochastic":
            params["random_bits"] = random_bits(shape, seeds[j])  # type: ignore[index]
        acc = precsim.quantize(torch.from_numpy(acc + s), fmt, rounding=rounding, **params).double().numpy()
        if promote is not None and (j + 1) % (promote // block) == 0:
            total = (total + acc.astype(np.float32)).astype(np.float32)
            acc = np.zeros(shape)
    if promote is not None:
        return torch.from_numpy((total + acc.astype(np.float32)).astype(np.float32))
    return torch.from_numpy(acc.astype(np.float32))


def reference_int(a: torch.Tensor, b: torch.Tensor, bits: int, block: int, overflow: str,
                  promote: int | None = None) -> tuple[torch.Tensor, int]:
    a64, b64 = a.numpy().astype(np.int64), b.numpy().astype(np.int64)
    k = a64.shape[-1]
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    shape = a64.shape[:-1] + (b64.shape[-1],)
    acc, total, events = np.zeros(shape, np.int64), np.zeros(shape, np.int64), 0
    for j in range(math.ceil(k / block)):
        s = acc + a64[..., j * block:(j + 1) * block] @ b64[j * block:(j + 1) * block]
        out = (s < lo) | (s > hi)
        events += int(out.sum())
        acc = np.clip(s, lo, hi) if overflow == "saturate" else (s - lo) % 2**bits + lo
        if promote is not None and (j + 1) % (promote // block) == 0:
            total, acc = total + acc, np.zeros(shape, np.int64)
    return torch.from_numpy(total + acc), events


FORMATS = ["fp16", "bf16", "flexfp(e=5,m=8)", "fp8_e5m2"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("block", [1, 3, 16, 64])
@pytest.mark.parametrize("promote", [None, 4])
def test_float_accumulator_equals_reference(fmt: str, block: int, promote: int | None) -> None:
    a, b = exact_values((6, 50), 0), exact_values((50, 5), 1)  # K = 50: no block size divides it
    p = None if promote is None else promote * block
    got = matmul_float(a, b, parse_format(fmt), block, promote=p)
    assert torch.equal(got, reference_float(a, b, fmt, block, p))


def test_stochastic_accumulator_equals_reference_and_varies_with_seed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(accumulate, "BUFFER_BYTES", 64)  # parts of the output: their bits keep the whole's numbering
    a, b = exact_values((7, 40), 2, spread=4), exact_values((40, 6), 3, spread=4)
    fmt = "flexfp(e=5,m=3)"
    seed = torch.tensor([11, -5], dtype=torch.int32)
    got = matmul_float(a, b, parse_format(fmt), 4, rounding="stochastic", seed=seed)
    assert torch.equal(got, reference_float(a, b, fmt, 4, rounding="stochastic", seed=seed))
    other = matmul_float(a, b, parse_format(fmt), 4, rounding="stochastic", seed=seed + 1)
    assert not torch.equal(got, other)


def test_parts_and_chunks_keep_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cutting the output into parts and K into GEMM chunks (promotion groups longer than a
    chunk) changes nothing."""
    a, b = exact_values((9, 96), 4), exact_values((96, 7), 5)
    whole = matmul_float(a, b, parse_format("fp8_e5m2"), 4, promote=24)
    monkeypatch.setattr(accumulate, "BUFFER_BYTES", 200)
    monkeypatch.setattr(accumulate, "MAX_CHUNK", 4)
    assert torch.equal(matmul_float(a, b, parse_format("fp8_e5m2"), 4, promote=24), whole)
    assert torch.equal(whole, reference_float(a, b, "fp8_e5m2", 4, 24))


def test_batched_matmul_broadcasts() -> None:
    a, b = exact_values((3, 4, 20), 6), exact_values((1, 20, 5), 7)
    got = matmul_float(a, b, parse_format("bf16"), 8)
    assert got.shape == (3, 4, 5)
    assert torch.equal(got, reference_float(a, b, "bf16", 8))


def test_init_is_the_accumulator_start() -> None:
    a, b = exact_values((4, 30), 8), exact_values((30, 3), 9)
    bias = exact_values((3,), 10) * 64
    got = matmul_float(a, b, parse_format("fp8_e5m2"), 5, init=bias)
    assert torch.equal(got, reference_float(a, b, "fp8_e5m2", 5, init=bias))


def test_sum_to_odd_rounds_once() -> None:
    """acc + x rounded to odd at 24 bits, then to fp16, equals the exact sum rounded to fp16 --
    including ties the float32 sum alone would break the wrong way."""
    g = torch.Generator().manual_seed(0)
    acc = precsim.quantize(torch.randn(20000, generator=g) * 100, "fp16")
    x = torch.randn(20000, generator=g) * 2.0 ** torch.randint(-40, 8, (20000,), generator=g).float()
    exact = acc.double() + x.double()  # exact: exponents of acc and x differ by < 29 bits... mostly
    once = precsim.quantize(exact, "fp16")
    ok = (acc.double() + x.double() - acc.double() == x.double())  # where float64 held the exact sum
    got = precsim.quantize(sum_to_odd(acc, x), "fp16")
    assert torch.equal(got[ok], once[ok])
    assert not torch.equal(precsim.quantize(acc + x, "fp16")[ok], once[ok])  # double rounding does happen


@pytest.mark.parametrize("overflow", ["wrap", "saturate"])
@pytest.mark.parametrize("block", [1, 4, 7])
def test_int16_accumulator_equals_reference(overflow: str, block: int) -> None:
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-128, 128, (5, 60), generator=g).float()
    b = torch.randint(-128, 128, (60, 4), generator=g).float()
    got, events = matmul_int(a, b, 16, block, overflow=overflow)
    want, want_events = reference_int(a, b, 16, block, overflow)
    assert torch.equal(got, want)
    assert int(events) == want_events > 0


def test_integer_promotion_and_widths() -> None:
    g = torch.Generator().manual_seed(2)
    a = torch.randint(-128, 128, (4, 64), generator=g).float()
    b = torch.randint(-128, 128, (64, 3), generator=g).float()
    got, events = matmul_int(a, b, 12, 2, overflow="saturate", promote=8)
    want, want_events = reference_int(a, b, 12, 2, "saturate", promote=8)
    assert torch.equal(got, want) and int(events) == want_events
    exact, none = matmul_int(a, b, 32, 8)
    assert torch.equal(exact, (a.double() @ b.double()).long()) and int(none) == 0
    big = torch.full((1, 4), 2.0**52)
    wrapped, n64 = matmul_int(big, torch.full((4, 1), 2.0**10), 64, 1)  # 2^64 wraps to 0 in int64
    assert int(wrapped) == 0 and int(n64) == 1


def conv_reference(x: torch.Tensor, w: torch.Tensor, fmt: str, block: int, stride: int, padding: int,
                   groups: int) -> torch.Tensor:
    """The conv by the definition: patches in the order of weight.flatten(1) (channel, kernel
    row, kernel column), built by loops, then the block scan."""
    xp = np.pad(x.double().numpy(), ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    bsz, cin = x.shape[:2]
    cout, cg, kh, kw = w.shape
    oh = (xp.shape[2] - kh) // stride + 1
    ow = (xp.shape[3] - kw) // stride + 1
    out = np.zeros((bsz, cout, oh, ow), np.float32)
    per = cout // groups
    for co in range(cout):
        grp = co // per
        cols = [xp[:, grp * cg + c, i:i + stride * oh:stride, j:j + stride * ow:stride]
                for c in range(cg) for i in range(kh) for j in range(kw)]
        patches = torch.from_numpy(np.stack(cols, -1).reshape(-1, cg * kh * kw))  # [B*oh*ow, K]
        col = reference_float(patches, w[co].reshape(-1, 1).double(), fmt, block)
        out[:, co] = col.view(bsz, oh, ow).numpy()
    return torch.from_numpy(out)


@pytest.mark.parametrize(("stride", "padding", "groups"), [(1, 1, 1), (2, 0, 2)])
def test_conv_equals_reference(stride: int, padding: int, groups: int) -> None:
    x, w = exact_values((2, 4, 6, 6), 11), exact_values((6, 4 // groups, 3, 3), 12)
    a, b, back = conv_as_matmul(x, w, stride, padding, 1, groups)
    got = back(matmul_float(a, b, parse_format("fp8_e5m2"), 5))
    assert torch.equal(got, conv_reference(x, w, "fp8_e5m2", 5, stride, padding, groups))
    plain_a, plain_b, plain_back = conv_as_matmul(x, w, stride, padding, 1, groups)
    assert torch.equal(plain_back(plain_a @ plain_b), torch.conv2d(x, w, None, stride, padding, 1, groups))


def test_conv1d_and_same_padding_as_matmul() -> None:
    x, w = exact_values((2, 3, 9), 13), exact_values((4, 3, 3), 14)
    a, b, back = conv_as_matmul(x, w, 1, "same", 1, 1)
    assert torch.equal(back(a @ b), torch.conv1d(x, w, None, 1, "same"))


def test_narrow_accumulators_differ_and_fp32_like_sums_do_not() -> None:
    a, b = exact_values((8, 64), 15), exact_values((64, 8), 16)
    plain = a @ b
    wide = matmul_float(a, b, parse_format("flexfp(e=8,m=21)"), 32)
    assert torch.equal(wide, plain)  # every sum here fits 22 bits: nothing to round
    assert not torch.equal(matmul_float(a, b, parse_format("fp8_e5m2"), 1), plain)


def test_promotion_rescues_a_narrow_accumulator_on_a_long_k() -> None:
    g = torch.Generator().manual_seed(3)
    a, b = torch.rand(16, 4096, generator=g), torch.rand(4096, 16, generator=g)  # positive: the sum grows
    exact = a.double() @ b.double()
    fmt = parse_format("bf16")

    def error(promote: int | None) -> float:
        return float(((matmul_float(a, b, fmt, 32, promote=promote).double() - exact) / exact).abs().mean())
    assert error(None) > 8 * error(128)
    assert error(128) < 2e-3


def test_compiled_kernels_give_the_reference_bits(compiled: None) -> None:
    a, b = exact_values((16, 50), 17), exact_values((50, 12), 18)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel that differs from eager warns and runs eagerly
        got = matmul_float(a, b, parse_format("fp16"), 8, promote=16)
    assert torch.equal(got, reference_float(a, b, "fp16", 8, 16))


def _midpoint_cases(fmt: str, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(acc, x): acc a value of ``fmt``, x half its spacing (either way) plus a small nudge of
    either sign or none, so that the float32 sum often lands on a midpoint the exact sum is not
    on; the exact sums are exact in float64."""
    g = torch.Generator().manual_seed(seed)
    acc = precsim.quantize(torch.randn(n, generator=g) * 2.0 ** torch.randint(-30, 12, (n,), generator=g).float(),
                           fmt)
    m = 10 if fmt == "fp16" else 7
    exp = torch.floor(torch.log2(acc.abs().clamp_min(2.0**-126)))
    spacing = 2.0 ** (torch.clamp(exp, min=-14 if fmt == "fp16" else -126) - m)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    nudge = spacing * 2.0 ** -torch.randint(12, 20, (n,), generator=g).float()
    nudge = nudge * torch.randint(-1, 2, (n,), generator=g).float()
    return acc, (sign * spacing / 2 + nudge).float()


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_sum_cast_rounds_the_exact_sum_once(fmt: str) -> None:
    """The cast path equals the exact sum rounded once (float64 holds it here), on sums built to
    fall on the format's midpoints, where a plain float32 add and cast rounds twice."""
    acc, x = _midpoint_cases(fmt, 40000, 21)
    dtype = accumulate.cast_dtype(parse_format(fmt), "nearest")
    assert dtype is not None
    once = precsim.quantize(acc.double() + x.double(), fmt)
    got = accumulate.sum_cast(acc, x, dtype)
    assert torch.equal(got, once)
    assert torch.equal(got, precsim.quantize(sum_to_odd(acc, x), fmt))  # the general path agrees
    assert int(((acc + x).to(dtype).float() != once).sum()) > 100  # the correction is needed


@pytest.mark.parametrize(("fmt", "big", "half"), [("fp16", 65504.0, 16.0), ("bf16", 2.0**128 - 2.0**120, 2.0**119)])
def test_sum_cast_at_the_overflow_midpoint_and_specials(fmt: str, big: float, half: float) -> None:
    """Max plus half its spacing is a tie (to Inf); a hair below it is max, a hair above Inf;
    Inf and NaN pass through."""
    dtype = accumulate.cast_dtype(parse_format(fmt), "nearest")
    assert dtype is not None
    hair = half * 2.0**-14
    inf, nan = float("inf"), float("nan")
    acc = torch.tensor([big, big, big, -big, -big, inf, inf, 1.0, 0.0])
    x = torch.tensor([half - hair, half, half + hair, -half + hair, -half, 1.0, -inf, nan, -0.0])
    got = accumulate.sum_cast(acc, x, dtype)
    want = torch.tensor([big, inf, inf, -big, -inf, inf, nan, nan, 0.0])
    torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(got, precsim.quantize(sum_to_odd(acc, x), fmt), rtol=0, atol=0, equal_nan=True)
    assert not bool(torch.signbit(got[-1]))


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_compiled_sum_cast_keeps_its_casts(compiled: None, fmt: str) -> None:
    """Compiled, the casts must round (Inductor drops a cast and its way back unless told)."""
    acc, x = _midpoint_cases(fmt, 4096, 22)
    dtype = accumulate.cast_dtype(parse_format(fmt), "nearest")
    rows = torch.stack([acc, x, x.flip(0)])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel that differs from eager warns and runs eagerly
        got = accumulate.call(accumulate._add_cast, rows, (), (dtype,), dynamic=(1,), casts=True)
    want = accumulate.sum_cast(accumulate.sum_cast(acc, x, dtype), x.flip(0), dtype)  # type: ignore[arg-type]
    assert torch.equal(got, want)


def test_cast_path_only_for_ieee_fp16_and_bf16_to_nearest() -> None:
    assert accumulate.cast_dtype(parse_format("flexfp(e=5,m=10)"), "nearest") == torch.float16
    assert accumulate.cast_dtype(parse_format("bf16"), "nearest") == torch.bfloat16
    assert accumulate.cast_dtype(parse_format("fp16"), "stochastic") is None
    assert accumulate.cast_dtype(parse_format("flexfp(e=5,m=10,overflow=saturate)"), "nearest") is None
    assert accumulate.cast_dtype(parse_format("flexfp(e=5,m=9)"), "nearest") is None


@pytest.mark.parametrize("fmt", ["fp16", "fp8_e5m2"])
@pytest.mark.parametrize(("stride", "padding", "dilation", "block"),
                         [(1, 1, 1, 5), (2, 0, 1, 32), (1, "same", 2, 1), (2, 2, 2, 9), (1, "valid", 1, 64)])
def test_conv_float_equals_the_gemm(fmt: str, stride: int, padding: int | str, dilation: int, block: int) -> None:
    """The conv's block sums from convolutions of zero-padded weight blocks: the GEMM's bits
    (K in weight.flatten(1) order), with promotion and a bias added first too."""
    x, w = exact_values((3, 5, 9, 9), 23), exact_values((4, 5, 3, 3), 24)
    bias = exact_values((4,), 25).view(1, -1, 1, 1) * 8
    f = parse_format(fmt)
    a, b, back = conv_as_matmul(x, w, stride, padding, dilation)
    for promote, init in ((None, None), (2 * block, bias)):
        start = None if init is None else torch.broadcast_to(init, back(a @ b).shape).reshape(3, 4, -1)
        want = back(matmul_float(a, b, f, block, promote=promote, init=start))
        got = accumulate.conv_float(x, w, f, block, stride=stride, padding=padding, dilation=dilation,
                                    promote=promote, init=init)
        assert torch.equal(got, want)
    if padding == 1 and dilation == 1:
        assert torch.equal(accumulate.conv_float(x, w, f, block, stride=stride, padding=1),
                           conv_reference(x, w, fmt, block, stride, 1, 1))


def test_conv_float_parts_stochastic_and_non_finite_inputs(monkeypatch: pytest.MonkeyPatch) -> None:
    """Parts of the batch keep the stochastic bits' numbering; an Inf in the input (0 * Inf
    would be NaN in a zero-padded block) takes the GEMM."""
    x, w = exact_values((4, 6, 7, 7), 26), exact_values((3, 6, 3, 3), 27)
    f, seed = parse_format("fp8_e5m2"), torch.tensor([5, 9], dtype=torch.int32)
    a, b, back = conv_as_matmul(x, w, 1, 1)
    want = back(matmul_float(a, b, f, 7, rounding="stochastic", seed=seed))
    monkeypatch.setattr(accumulate, "BUFFER_BYTES", 2000)
    assert torch.equal(accumulate.conv_float(x, w, f, 7, padding=1, rounding="stochastic", seed=seed), want)
    x[1, 2, 3, 3] = float("inf")
    a, b, back = conv_as_matmul(x, w, 1, 1)
    torch.testing.assert_close(accumulate.conv_float(x, w, f, 7, padding=1), back(matmul_float(a, b, f, 7)),
                               rtol=0, atol=0, equal_nan=True)


def columns3d(x: torch.Tensor, kernel: tuple[int, int, int], stride: tuple[int, int, int],
              padding: tuple[int, int, int]) -> torch.Tensor:
    """im2col of a conv3d (dilation 1) by ``Tensor.unfold``: [B, C * kd * kh * kw, L]."""
    x = torch.nn.functional.pad(x, [p for q in reversed(padding) for p in (q, q)])
    for dim, (k, s) in enumerate(zip(kernel, stride, strict=True)):
        x = x.unfold(2 + dim, k, s)  # [B, C, od, oh, ow, kd, kh, kw] once all three are done
    b, c = x.shape[:2]
    return x.permute(0, 1, 5, 6, 7, 2, 3, 4).reshape(b, c * kernel[0] * kernel[1] * kernel[2], -1)


def test_conv_float_in_one_and_three_dimensions() -> None:
    """conv1d equals the GEMM path; conv3d equals the GEMM of its patches taken by hand, K in
    weight.flatten(1) order, and so does conv_as_matmul's im2col (an Inf in the input takes
    it); an unbatched input is one sample."""
    f = parse_format("fp8_e5m2")
    x1, w1 = exact_values((2, 3, 11), 32), exact_values((4, 3, 3), 33)
    a, b, back = conv_as_matmul(x1, w1, 2, 1)
    assert torch.equal(accumulate.conv_float(x1, w1, f, 4, stride=2, padding=1), back(matmul_float(a, b, f, 4)))
    x3, w3 = exact_values((2, 3, 4, 5, 5), 34), exact_values((4, 3, 2, 3, 3), 35)
    got = accumulate.conv_float(x3, w3, f, 7, padding=1)
    cols = columns3d(x3, (2, 3, 3), (1, 1, 1), (1, 1, 1)).transpose(1, 2)  # [B, L, K]
    want = matmul_float(cols, w3.flatten(1).t(), f, 7).transpose(1, 2).reshape(got.shape)
    assert torch.equal(got, want)
    assert torch.equal(accumulate.conv_float(x3[1], w3, f, 7, padding=1), got[1])
    assert not torch.equal(got, torch.nn.functional.conv3d(x3, w3, padding=1))
    a, b, back = conv_as_matmul(x3, w3, 1, 1)
    assert torch.equal(a, w3.flatten(1)) and torch.equal(b, cols.transpose(1, 2))
    assert torch.equal(back(a @ b), torch.nn.functional.conv3d(x3, w3, padding=1))
    a1, b1, back1 = conv_as_matmul(x3[1], w3, 1, 1)
    assert torch.equal(back1(a1 @ b1), back(a @ b)[1])
    x3[0, 1, 2, 2, 2] = float("inf")
    a, b, back = conv_as_matmul(x3, w3, 1, 1)
    torch.testing.assert_close(accumulate.conv_float(x3, w3, f, 7, padding=1), back(matmul_float(a, b, f, 7)),
                               rtol=0, atol=0, equal_nan=True)
