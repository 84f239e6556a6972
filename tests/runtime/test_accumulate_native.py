"""The fused accumulator kernel (``runtime/accumulate_kernel.c`` through ``runtime/native.py``):
the bits of the pure reference for fp16 and bf16 to nearest, on every layout, thread split and
conv it serves; how it is built, cached, checked and refused."""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import precsim
import precsim.runtime.accumulate as accumulate
from precsim.formats import parse_format
from precsim.runtime import native
from precsim.runtime.accumulate import conv_as_matmul, conv_float, matmul_float, matmul_int
from precsim.runtime.backend import compiling

from .test_accumulate import _midpoint_cases, columns3d, exact_values, reference_float, reference_int


@pytest.fixture(scope="module")
def lib() -> object:
    """The built kernel (where this machine has a C compiler, it must build and pass its probe)."""
    if native._compiler() is None:
        pytest.skip("no C compiler here: the fused kernel is not built (the torch path runs)")
    with compiling(True), warnings.catch_warnings():
        warnings.simplefilter("error")  # a kernel that fails its probe warns
        found = accumulate.fused_kernel(parse_format("fp16"), "nearest")
    assert found is not None, native.why_missing()
    return found[0]


@contextlib.contextmanager
def fused() -> Iterator[None]:
    """The user's default (compiled kernels on), for the call under test only: the references
    are computed with the suite's eager default."""
    with compiling(True):
        yield


@contextlib.contextmanager
def threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def same(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Bit for bit (any NaN equals any NaN: the payload is not part of the contract)."""
    return got.shape == want.shape and bool(
        ((got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())).all())


# IEEE with Inf, fn saturating (and overflowing to NaN), fnuz (no -0), finite-only FP6/FP4, a
# shifted bias, an odd width
FORMATS = ["fp16", "bf16", "fp8_e5m2", "fp8_e4m3", "flexfp(e=4,m=3,specials=fn,overflow=nan)", "fp8_e4m3fnuz",
           "fp6_e2m3", "fp4_e2m1", "hfp8_fwd", "flexfp(e=5,m=8)", "flexfp(e=6,m=13)"]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize(("block", "promote", "start"),
                         [(1, None, False), (7, 21, True), (32, None, True), (32, 128, False), (300, None, False),
                          (256, 512, True)])
def test_fused_gemm_equals_reference(lib: object, fmt: str, block: int, promote: int | None, start: bool) -> None:
    """K = 650: several packed chunks of K (256 elements, rounded to whole blocks), a last block
    shorter than the others, promotion across chunks; N = 70 and M = 13: partial tiles. Rows
    scaled into the format's subnormals and past its largest value."""
    a, b = exact_values((13, 650), 30, spread=3), exact_values((650, 70), 31, spread=3)
    init = exact_values((13, 70), 32) * 16 if start else None
    f = parse_format(fmt)
    big = min(f.max, 2.0**100)  # type: ignore[attr-defined]  # (bf16: float32 sums must stay finite to be exact)
    for row, scale in ((0, 2.0 ** (f.min_exponent - 6)), (1, big / 64), (2, -big / 2048)):  # type: ignore[attr-defined]
        a[row] *= scale  # (the start too: the reference's float64 sums must stay within float32's 24 bits)
        if init is not None:
            init[row] *= scale
    assert native.format_parameters(f) is not None
    want = reference_float(a, b, fmt, block, promote, init=init)
    with fused():
        got = matmul_float(a, b, f, block, promote=promote, init=init)
    assert same(got, want)


@pytest.mark.parametrize("n_threads", [1, 2])
def test_fused_layouts_and_thread_splits(lib: object, n_threads: int) -> None:
    """A transposed weight (Linear's x @ w.T), a transposed input, a batch broadcast against one
    matrix, one matrix against a batch (a conv's weight), and sizes above the one-thread bar
    (rows split over threads, and matrices split over threads)."""
    fmt = parse_format("fp16")
    w = exact_values((96, 300), 33)
    x = exact_values((200, 300), 34)
    xt = exact_values((300, 40), 35).t()  # [40, 300], not contiguous
    batch = exact_values((4, 1, 24, 300), 36)
    shared = exact_values((24, 300), 37)
    cols = exact_values((5, 300, 50), 38)
    cases = [(x, w.t()), (xt, w.t()), (batch, w.t()), (shared, cols), (exact_values((3, 64, 300), 39), w.t())]
    assert 200 * 96 * 300 > native.SMALL_FLOPS
    for a, b in cases:
        want = reference_float(a, b, "fp16", 32)
        with fused(), threads(n_threads):
            got = matmul_float(a, b, fmt, 32)
        assert same(got, want), (tuple(a.shape), tuple(b.shape))


@pytest.mark.parametrize("fmt", ["fp16", "bf16"])
def test_fused_rounds_each_exact_sum_once(lib: object, fmt: str) -> None:
    """Block 1 on [acc, x] . [1, 1]: the accumulator is acc, then acc + x rounded once, on sums
    built to fall on the format's midpoints (subnormals included) where the float32 sum is not
    the exact one."""
    acc, x = _midpoint_cases(fmt, 20000, 40)
    a, b = torch.stack([acc, x], 1), torch.ones(2, 1)
    once = precsim.quantize(acc.double() + x.double(), fmt).float()
    with fused():
        got = matmul_float(a, b, parse_format(fmt), 1)[:, 0]
    assert same(got, once)


@pytest.mark.parametrize(("fmt", "big", "half"), [("fp16", 65504.0, 16.0), ("bf16", 2.0**128 - 2.0**120, 2.0**119)])
def test_fused_overflow_midpoint_and_specials(lib: object, fmt: str, big: float, half: float) -> None:
    hair = half * 2.0**-14
    inf, nan = float("inf"), float("nan")
    acc = torch.tensor([big, big, big, -big, -big, inf, inf, 1.0, 0.0, -0.0])
    x = torch.tensor([half - hair, half, half + hair, -half + hair, -half, 1.0, -inf, nan, -0.0, -0.0])
    with fused():
        got = matmul_float(torch.stack([acc, x], 1), torch.ones(2, 1), parse_format(fmt), 1)[:, 0]
    want = torch.tensor([big, inf, inf, -big, -inf, inf, nan, nan, 0.0, 0.0])
    assert same(got, want)
    assert not bool(torch.signbit(got[-2:]).any())  # 0 + 0 + -0: the accumulator starts at +0


@pytest.mark.parametrize(("shape", "wshape", "stride", "padding", "dilation"), [
    ((3, 5, 13, 11), (7, 5, 3, 3), 1, 1, 1),
    ((2, 4, 12, 12), (6, 4, 3, 3), 2, 2, 2),
    ((2, 3, 9, 10), (5, 3, 3, 5), 1, "same", 2),
    ((2, 3, 9, 10), (5, 3, 2, 2), (2, 3), "valid", 1),
    ((2, 32, 6, 6), (9, 32, 3, 3), 1, (1, 0), 1),  # K = 288: two packed chunks of K
    ((3, 4, 40), (6, 4, 5), 3, 2, 2),  # conv1d
])
def test_fused_conv_equals_the_gemm_reference(lib: object, shape: tuple[int, ...], wshape: tuple[int, ...],
                                             stride: object, padding: object, dilation: object) -> None:
    """The kernel reads the im2col columns from the input as it packs them: the reference is the
    pure GEMM on ``F.unfold``'s columns (K in ``weight.flatten(1)``'s order), with a bias
    started first and promotion."""
    x, w = exact_values(shape, 41), exact_values(wshape, 42)
    conv = torch.nn.functional.conv1d if len(shape) == 3 else torch.nn.functional.conv2d
    out = conv(x, w, None, stride, padding, dilation)
    bias = exact_values((wshape[0],) + (1,) * (len(shape) - 2), 43) * 8
    a, b, back = conv_as_matmul(x, w, stride, padding, dilation)
    init = torch.broadcast_to(bias, out.shape).reshape(*out.shape[:2], -1)
    for block, promote in ((9, 36), (32, None)):
        want = back(reference_float(a, b, "fp16", block, promote, init=init))
        with fused():
            got = conv_float(x, w, parse_format("fp16"), block, stride=stride, padding=padding, dilation=dilation,
                             promote=promote, init=bias)
        assert same(got, want)


def test_fused_conv_with_inf_and_nan_inputs(lib: object) -> None:
    """Zero padding is a zero column entry, so an Inf next to the border gives what the GEMM on
    unfold's columns gives (no 0 * Inf from padded weight blocks)."""
    x = exact_values((2, 3, 8, 8), 44)
    x[0, 1, 0, 0], x[1, 2, 4, 4] = float("inf"), float("nan")
    w = exact_values((4, 3, 3, 3), 45)
    a, b, back = conv_as_matmul(x, w, 1, 1, 1)
    want = back(reference_float(a, b, "bf16", 4))
    with fused():
        got = conv_float(x, w, parse_format("bf16"), 4, padding=1)
    assert same(got, want)
    assert bool(got.isinf().any()) and bool(got.isnan().any())


@pytest.mark.parametrize(("stride", "padding"), [((1, 1, 1), (1, 1, 1)), ((2, 1, 2), (0, 2, 1))])
def test_fused_conv3d_equals_the_gemm_reference(lib: object, stride: tuple[int, int, int],
                                               padding: tuple[int, int, int]) -> None:
    """conv3d runs the fused kernel too (its columns read from the 5-d input), Inf and NaN
    inputs included (the torch path's block convs refuse those)."""
    x, w = exact_values((2, 3, 6, 7, 8), 64), exact_values((4, 3, 3, 2, 3), 65)
    x[1, 2, 0, 0, 0], x[0, 0, 3, 3, 3] = float("inf"), float("nan")
    out = torch.nn.functional.conv3d(x, w, None, stride, padding)
    want = reference_float(w.flatten(1), columns3d(x, (3, 2, 3), stride, padding), "fp16", 8, 24)
    with fused():
        got = conv_float(x, w, parse_format("fp16"), 8, stride=stride, padding=padding, promote=24)
    assert same(got, want.view(out.shape))
    assert bool(got.isnan().any()) and bool(got.isinf().any())
    with fused():  # "same" padding
        same_pad = conv_float(x[:1, :, :, :, :], w, parse_format("bf16"), 4, padding="same")
    cols = columns3d(torch.nn.functional.pad(x[:1], (1, 1, 0, 1, 1, 1)), (3, 2, 3), (1, 1, 1), (0, 0, 0))
    assert same(same_pad, reference_float(w.flatten(1), cols, "bf16", 4).view(same_pad.shape))


def test_the_fused_kernel_follows_the_compile_switch(lib: object) -> None:
    """On by default (compiled kernels on); off with them, and for what it does not do
    (other roundings, integer formats, formats past its bit arithmetic: the torch path)."""
    fp8 = parse_format("fp8_e5m2")
    with compiling(True):
        assert accumulate.fused_kernel(fp8, "nearest") is not None
        assert accumulate.fused_kernel(fp8, "stochastic") is not None
        assert accumulate.fused_kernel(fp8, "toward_zero") is None
        assert accumulate.fused_kernel(parse_format("int16"), "nearest") is None
    with compiling(False):
        assert accumulate.fused_kernel(fp8, "nearest") is None
    for wide in ("fp32", "flexfp(e=5,m=22)", "flexfp(e=8,m=7,b=-3)"):
        assert native.format_parameters(parse_format(wide)) is None, wide  # the torch path rounds those


@pytest.mark.parametrize("fmt", ["fp16", "bf16", "fp8_e5m2", "flexfp(e=5,m=3)", "fp8_e4m3fnuz", "fp4_e2m1"])
@pytest.mark.parametrize(("block", "promote"), [(1, None), (8, 32), (32, None)])
def test_fused_stochastic_rounding_equals_reference(lib: object, fmt: str, block: int, promote: int | None) -> None:
    """Stochastic accumulators: block j's bits from the call's seed, one word per output element
    in flat order, as the torch path draws them: batched matrices, N past the kernel's packed
    width (1024), rows into the subnormals; another seed gives other bits."""
    f = parse_format(fmt)
    a, b = exact_values((2, 5, 300), 60, spread=3), exact_values((2, 300, 1100), 61, spread=3)
    a[:, 0] *= 2.0 ** (f.min_exponent - 4)  # type: ignore[attr-defined]
    seed = torch.tensor([-77, 2**31 - 3], dtype=torch.int32)
    want = reference_float(a, b, fmt, block, promote, rounding="stochastic", seed=seed)
    with fused():
        got = matmul_float(a, b, f, block, promote=promote, rounding="stochastic", seed=seed)
        other = matmul_float(a, b, f, block, promote=promote, rounding="stochastic", seed=seed + 1)
    assert same(got, want)
    assert not same(other, got)


def test_fused_stochastic_conv_equals_the_torch_path(lib: object) -> None:
    x, w = exact_values((3, 4, 9, 9), 62), exact_values((5, 4, 3, 3), 63)
    seed = torch.tensor([5, 6], dtype=torch.int32)
    kw = {"stride": 2, "padding": 1, "rounding": "stochastic", "seed": seed, "promote": 16}
    want = conv_float(x, w, parse_format("fp8_e5m2"), 4, **kw)  # type: ignore[arg-type]
    with fused():
        got = conv_float(x, w, parse_format("fp8_e5m2"), 4, **kw)  # type: ignore[arg-type]
    assert same(got, want)


def codes(shape: tuple[int, ...], lo: int, hi: int, seed: int) -> torch.Tensor:
    return torch.randint(lo, hi, shape, generator=torch.Generator().manual_seed(seed)).float()


@pytest.mark.parametrize("bits", [12, 16, 24])
@pytest.mark.parametrize("overflow", ["wrap", "saturate"])
@pytest.mark.parametrize(("block", "promote"), [(1, None), (32, None), (7, 28), (300, 600)])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_fused_integer_accumulator_equals_reference(lib: object, bits: int, overflow: str, block: int,
                                                    promote: int | None, n_threads: int) -> None:
    """int8 times uint8 codes, K = 650 (chunks of K, a short last block), every width wrapping or
    saturating: the codes and the count of overflow events of the pure reference."""
    a, b = codes((40, 650), -128, 128, 50), codes((650, 70), 0, 256, 51)
    want, events = reference_int(a.long(), b.long(), bits, block, overflow, promote)
    with fused(), threads(n_threads):
        got, count = matmul_int(a, b, bits, block, promote=promote, overflow=overflow, dtype=torch.float32)
    assert torch.equal(got, want)
    assert int(count) == events


def test_fused_integer_accumulator_start_and_batches(lib: object) -> None:
    """A start (kept in W bits first: its own overflows count) and batched GEMMs, against the
    torch path."""
    a, b = codes((3, 8, 200), -128, 128, 52), codes((3, 200, 9), 0, 256, 53)
    init = codes((9,), -40000, 40000, 54).long()
    kw = {"promote": 64, "overflow": "saturate", "init": init, "dtype": torch.float32}
    want, events = matmul_int(a, b, 16, 16, **kw)  # type: ignore[arg-type]
    with fused():
        got, count = matmul_int(a, b, 16, 16, **kw)  # type: ignore[arg-type]
    assert torch.equal(got, want) and int(count) == int(events) > 0
    assert accumulate._fused_int() is None  # the suite's default: the torch path ran above
    with fused():
        assert accumulate._fused_int() is not None


def test_empty_k_is_the_start(lib: object) -> None:
    """K = 0: no block, the output is the start (both paths; was an error in the torch one)."""
    init = exact_values((4,), 46) * 1000.3
    want = precsim.quantize(init.expand(3, 4).contiguous(), "fp16")
    with fused():
        got = matmul_float(torch.ones(3, 0), torch.ones(0, 4), parse_format("fp16"), 8, init=init)
    assert same(got, want)
    assert same(matmul_float(torch.ones(3, 0), torch.ones(0, 4), parse_format("fp16"), 8, init=init), want)
    assert same(matmul_float(torch.ones(3, 0), torch.ones(0, 4), parse_format("fp16"), 8, promote=16),
                torch.zeros(3, 4))


@contextlib.contextmanager
def rebuilt(monkeypatch: pytest.MonkeyPatch, folder: Path) -> Iterator[None]:
    """The kernel looked up afresh (in ``folder``) inside the block, and again after it."""
    monkeypatch.setenv("PRECSIM_CACHE_DIR", str(folder))
    caches = (native.library.cache_clear, accumulate._built_kernel.cache_clear, accumulate._agrees.cache_clear,
              accumulate._int_agrees.cache_clear, native._why.clear)
    for clear in caches:
        clear()
    try:
        yield
    finally:
        monkeypatch.undo()
        for clear in caches:
            clear()


def test_without_a_compiler_the_torch_path_runs_and_says_so(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    with rebuilt(monkeypatch, tmp_path):
        monkeypatch.setattr(native, "_compiler", lambda: None)
        with compiling(True), pytest.warns(RuntimeWarning, match="no C compiler found.*the same results"):
            assert accumulate.fused_kernel(parse_format("fp16"), "nearest") is None
        assert list(tmp_path.iterdir()) == []


def test_a_kernel_that_gives_other_bits_is_refused(lib: object, monkeypatch: pytest.MonkeyPatch,
                                                   tmp_path: Path) -> None:
    """The probe before first use compares with the torch path; a wrong kernel is not used."""
    real = native.accumulate

    def off_by_one_ulp(*args: object, **kwargs: object) -> torch.Tensor:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        out.view(torch.int32)[0, 0, 0] += 1
        return out

    with rebuilt(monkeypatch, tmp_path):
        monkeypatch.setattr(native, "accumulate", off_by_one_ulp)
        with compiling(True), pytest.warns(RuntimeWarning, match=r"fp8_e4m3 \(nearest\) it gives other bits"):
            assert accumulate.fused_kernel(parse_format("fp8_e4m3"), "nearest") is None


def test_an_integer_kernel_that_gives_other_codes_is_refused(lib: object, monkeypatch: pytest.MonkeyPatch,
                                                            tmp_path: Path) -> None:
    real = native.accumulate_int

    def one_more_overflow(*args: object, **kwargs: object) -> tuple[torch.Tensor, int]:
        out, events = real(*args, **kwargs)  # type: ignore[arg-type]
        return out, events + 1

    with rebuilt(monkeypatch, tmp_path):
        monkeypatch.setattr(native, "accumulate_int", one_more_overflow)
        with compiling(True), pytest.warns(RuntimeWarning, match="int16 wrap it gives other codes"):
            assert accumulate._fused_int() is None


def test_built_once_per_cache_folder_atomically(lib: object, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    source = (Path(native.__file__).parent / native.SOURCE).read_bytes()
    monkeypatch.setenv("PRECSIM_CACHE_DIR", str(tmp_path / "cache"))
    first = native._build(source)
    stamp = os.stat(first).st_mtime_ns
    assert native._build(source) == first and os.stat(first).st_mtime_ns == stamp  # reused, not rebuilt
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [first.name]  # no temporary files left
    other = native._build(source + b"\n/* another source */\n")
    assert other != first and other.exists()


def test_a_conv_weight_whose_rows_are_strided_views(lib: object) -> None:
    """``weight.reshape(C_out, -1)`` may be a view whose elements along a row are not adjacent
    (a 1x1 kernel sliced, a transposed conv1d weight): the kernel gets rows it can step through."""
    x = exact_values((2, 4, 5, 5), 80)
    w = exact_values((3, 8, 1, 1), 81)[:, ::2]
    assert w.reshape(3, -1).stride() == (8, 2)
    x1, w1 = exact_values((2, 6, 9), 82), exact_values((6, 4), 83).t()[..., None]
    for xs, ws in ((x, w), (x1, w1)):
        with fused():
            got = conv_float(xs, ws, parse_format("fp8_e5m2"), 3)
        a, b, back = conv_as_matmul(xs, ws.contiguous())
        assert same(got, back(reference_float(a, b, "fp8_e5m2", 3).view(back(a @ b).shape).flatten(2)))


def test_operands_on_another_device_and_bad_blocks_are_refused(lib: object) -> None:
    """Only CPU operands reach the kernel (a weight elsewhere gets torch's error, not a crash);
    a block or promotion the semantics do not define is named."""
    with fused(), pytest.raises(RuntimeError, match="device"):
        matmul_float(torch.ones(4, 8), torch.ones(8, 4, device="meta"), parse_format("fp16"), 4)
    for call in (lambda: matmul_float(torch.ones(4, 12), torch.ones(12, 3), parse_format("fp16"), 2, promote=3),
                 lambda: matmul_int(torch.ones(4, 12), torch.ones(12, 3), 16, 4, promote=2),
                 lambda: conv_float(torch.ones(1, 2, 4, 4), torch.ones(3, 2, 3, 3), parse_format("fp16"), 4,
                                    promote=6)):
        with fused(), pytest.raises(ValueError, match=r"promote \d not allowed; allowed: a multiple of block"):
            call()
    with pytest.raises(ValueError, match="block 0 not allowed; allowed: an integer >= 1"):
        matmul_float(torch.ones(4, 12), torch.ones(12, 3), parse_format("fp16"), 0)


def test_a_damaged_kernel_in_the_cache_is_built_again(lib: object, monkeypatch: pytest.MonkeyPatch,
                                                      tmp_path: Path) -> None:
    """A cached library cut short (a crash while the disk wrote it) is deleted and built again."""
    with rebuilt(monkeypatch, tmp_path):
        path = native._build((Path(native.__file__).parent / native.SOURCE).read_bytes())
        path.write_bytes(b"")
        with compiling(True), warnings.catch_warnings():
            warnings.simplefilter("error")
            assert accumulate.fused_kernel(parse_format("fp16"), "nearest") is not None
        assert path.stat().st_size > 0


@pytest.mark.parametrize(("cc", "cache", "message"), [
    ("false", None, r"false .*-O3.* exited with status 1 \(set CC to a working C compiler\)"),
    (None, "a-file", r"cannot write the kernel into .*a-file.*set PRECSIM_CACHE_DIR to a writable folder"),
])
def test_a_failed_build_says_what_failed_and_the_way_out(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                         cc: str | None, cache: str | None, message: str) -> None:
    folder = tmp_path / "cache"
    if cache is not None:
        folder = tmp_path / cache
        folder.write_text("not a folder")
    with rebuilt(monkeypatch, folder):
        if cc is not None:
            monkeypatch.setenv("CC", cc)
        with compiling(True), pytest.warns(RuntimeWarning, match=message):
            assert accumulate.fused_kernel(parse_format("fp16"), "nearest") is None


def test_cc_may_carry_arguments(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CC", "cc -m64")
    found = native._compiler()
    assert found is not None and Path(found[0]).name == "cc" and found[1:] == ["-m64"]
