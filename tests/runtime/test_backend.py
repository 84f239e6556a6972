"""The compiled fast path gives the same bits as the eager reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import precsim
from precsim.formats import parse_format
from precsim.formats.random import draw_seed
from precsim.runtime.backend import compile_enabled, run_quantize, set_compile


def _data() -> torch.Tensor:
    """Normal values across many binades, subnormals, ties, specials."""
    torch.manual_seed(0)
    x = torch.randn(64, 96) * torch.exp2(torch.randint(-40, 40, (64, 96)).float())
    x[0, :8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e-39, 0.5])
    x[1] = torch.arange(96) * 0.0625 + 0.03125  # ties for coarse grids
    return x


CASES = [  # every family x rounding the kernel benchmark times, plus the special grids
    ("fp8_e4m3", "nearest", {}),
    ("fp8_e4m3", "stochastic", {}),
    ("bf16", "nearest", {}),
    ("bf16", "toward_zero", {}),
    ("hfp8_fwd", "stochastic", {}),
    ("int8", "stochastic", {}),
    ("int8(axis=0)", "nearest", {}),
    ("int8(axis=0)", "stochastic", {"scale": torch.rand(64) + 0.01, "zero_point": torch.zeros(64)}),
    ("int8(axis=0)", "stochastic", {}),
    ("dse(e=4,m=3)", "nearest", {}),
    ("dse(e=5,m=2)", "stochastic", {}),
    ("mxfp8_e4m3", "nearest", {}),
    ("mxfp8_e4m3", "stochastic", {}),
    ("mxfp4", "stochastic", {}),
    ("mxint8", "nearest", {}),
    ("nvfp4", "nearest", {}),
    ("nvfp4", "stochastic", {}),
]


@pytest.mark.parametrize(("spec", "rounding", "params"), CASES)
def test_compiled_equals_eager(compiled, spec: str, rounding: str, params: dict) -> None:
    fmt = parse_format(spec)
    x = _data()
    seed = draw_seed(torch.Generator().manual_seed(3))
    if "scale" in params:
        params = {"scale": params["scale"].reshape(64, 1), "zero_point": params["zero_point"].reshape(64, 1)}
    eager = fmt.quantize(x, rounding, seed=seed, **params)
    fast = run_quantize(fmt, x, rounding, seed, **params)
    assert torch.equal(eager.view(torch.int32), fast.view(torch.int32))
    # a second shape reuses the dynamic-shape kernel and still agrees
    y = x[:32, :64].contiguous()
    p2 = {k: v[:32] for k, v in params.items()}
    assert torch.equal(fmt.quantize(y, rounding, seed=seed, **p2).view(torch.int32),
                       run_quantize(fmt, y, rounding, seed, **p2).view(torch.int32))


# each path (the scaled rows of MX floats rounded deterministically, the row kernel otherwise;
# float, integer and NVFP4 elements) on rows of 1, 7, 28 and 31 of a 2-D or 4-D tensor
@pytest.mark.parametrize(("spec", "rounding", "shape"), [
    ("mxfp8_e4m3", "nearest", (32, 8, 7, 7)), ("mxfp8_e4m3", "nearest", (16, 4, 28, 28)),
    ("mxfp8_e4m3", "nearest", (5000, 1)), ("mxfp8_e4m3", "stochastic", (32, 8, 7, 7)),
    ("mxfp8_e4m3", "stochastic", (700, 31)), ("mxfp4", "stochastic", (16, 4, 28, 28)),
    ("mxfp4", "stochastic", (5000, 1)), ("mxint8", "nearest", (700, 31)), ("nvfp4", "stochastic", (32, 8, 7, 7)),
    ("nvfp4", "stochastic", (5000, 1))])
def test_rows_shorter_than_a_block_equal_eager(compiled, spec: str, rounding: str, shape: tuple[int, ...]) -> None:
    """Rows shorter than a block are quantized in place (no padding): same bits, same random bits."""
    fmt = parse_format(f"{spec}(axis=-1)")
    torch.manual_seed(1)
    x = torch.randn(shape) * torch.exp2(torch.randint(-30, 30, shape).float())
    x.view(-1)[:6] = torch.tensor([0.0, -0.0, float("inf"), float("nan"), 1e-40, -3e-39])
    seed = draw_seed(torch.Generator().manual_seed(5))
    fast = run_quantize(fmt, x, rounding, seed)
    assert fast.is_contiguous() or shape[-1] >= fmt.block_size  # padded rows come back as a view
    assert torch.equal(fmt.quantize(x, rounding, seed=seed).view(torch.int32), fast.view(torch.int32))


_CHANNEL_SHAPES = {"c16": (32, 16, 7, 7), "c64": (8, 64, 5, 5), "c48": (4, 48, 3, 3), "c1": (16, 1, 3, 3),
                   "5d": (2, 32, 4, 3, 3)}


# every channel layout for one format; two for each other format and rounding
@pytest.mark.parametrize(("spec", "rounding", "shape"), [
    *(("mxfp8_e4m3", "nearest", s) for s in _CHANNEL_SHAPES.values()),
    *((spec, rounding, _CHANNEL_SHAPES[k]) for spec, rounding, keys in [
        ("mxfp8_e4m3", "stochastic", ("c16", "c64")), ("mxfp4", "nearest", ("c1", "5d")),
        ("mxint8", "stochastic", ("c64", "c48")), ("nvfp4", "nearest", ("c16", "5d"))] for k in keys)])
def test_channel_blocks_equal_eager(compiled, spec: str, rounding: str, shape: tuple[int, ...]) -> None:
    """Blocks along the channel axis (the default for 4-D and 5-D tensors) are cut in place,
    across the memory layout: the reference's bits and random bits, NaN (either sign), Inf,
    zero and subnormal blocks included; 48 channels (not whole blocks) take the eager path."""
    fmt = parse_format(spec)
    assert fmt.block_axis(len(shape)) == 1
    g = torch.Generator().manual_seed(3)
    x = torch.randn(shape, generator=g) * torch.exp2(torch.randint(-30, 30, shape, generator=g).float())
    flat = x.view(-1)
    flat[:5] = torch.tensor([float("nan"), float("inf"), 1e-40, -0.0, -3e-39])
    flat[7] = torch.tensor(-0x400000, dtype=torch.int32).view(torch.float32)  # -NaN
    x[-1] = torch.randn(shape[1:], generator=g) * 1e-42  # subnormal blocks
    seed = draw_seed(torch.Generator().manual_seed(5))
    fast = run_quantize(fmt, x, rounding, seed)
    assert fast.shape == x.shape and fast.is_contiguous()
    assert torch.equal(fmt.quantize(x, rounding, seed=seed).view(torch.int32), fast.view(torch.int32))


def test_channel_blocks_are_blocks_of_channels() -> None:
    """The default block axis: channels of (N, C, H, W), the last axis of 2-D and 3-D tensors;
    blocking channels equals blocking the last axis of the tensor with channels moved last."""
    fmt = parse_format("mxfp8_e4m3")
    assert [fmt.block_axis(n) for n in (1, 2, 3, 4, 5)] == [0, 1, 2, 1, 1]
    assert parse_format("mxfp8_e4m3(axis=-1)").block_axis(4) == 3
    x = torch.randn(4, 64, 5, 5) * torch.exp2(torch.randint(-10, 10, (4, 64, 1, 1)).float())
    last = parse_format("mxfp8_e4m3(axis=-1)").quantize(x.movedim(1, -1)).movedim(-1, 1)
    assert torch.equal(fmt.quantize(x), last)
    assert not torch.equal(fmt.quantize(x), parse_format("mxfp8_e4m3(axis=-1)").quantize(x))
    with pytest.raises(ValueError, match="block axis 4 not allowed for a 4-D tensor"):
        parse_format("mxfp8_e4m3(axis=4)").quantize(x)


@pytest.mark.parametrize("rounding", ["nearest", "toward_zero"])
@pytest.mark.parametrize("spec", ["mxfp8_e4m3", "mxfp6_e3m2", "mxfp4"])  # fn, finite; 3, 2 and 1 mantissa bits
def test_scaled_rows_equal_eager_at_the_extremes(compiled, spec: str, rounding: str) -> None:
    """Rows of 28 rounded as (x / X) on the element grid, times X: the reference's bits for blocks
    at both ends of the scale range (clamped shared exponents), float32 subnormals beside huge
    values (x / X below 2^-126), exact ties of the element grid, and NaN/Inf blocks."""
    from precsim.runtime.backend import scaled_rows

    fmt = parse_format(spec)
    assert scaled_rows(fmt, rounding)
    g = torch.Generator().manual_seed(7)
    rows = torch.randn(4096, 28, generator=g)
    rows *= torch.exp2(torch.randint(-149, 128, (4096, 1), generator=g).float()).clamp(max=2.0**100)
    rows[:64] *= torch.exp2(torch.randint(-60, 0, (64, 28), generator=g).float())  # within-row spread
    rows[64:128, 0] = 3.0e38  # huge rows with subnormal neighbours
    rows[64:128, 1:] = torch.randn(64, 27, generator=g) * 1e-39
    rows[128:192] = torch.randn(64, 28, generator=g) * 1e-41  # all subnormal: the bottom scale 2^-127
    step = torch.exp2(torch.randint(-20, 20, (64, 1), generator=g).float())  # ties: odd multiples of half
    rows[192:256] = (torch.randint(-15, 16, (64, 28), generator=g) * 2 + 1).float() * step / 8
    rows[256, 3], rows[257, 0], rows[258, 5], rows[259, 1] = float("nan"), float("inf"), -float("inf"), -0.0
    x = rows.reshape(64, 64, 28)
    assert torch.equal(fmt.quantize(x, rounding).view(torch.int32), run_quantize(fmt, x, rounding).view(torch.int32))
    channels = x.reshape(64, 4, 16, 28).transpose(1, 3).contiguous()  # the same blocks along a channel axis
    assert torch.equal(fmt.quantize(channels, rounding).view(torch.int32),
                       run_quantize(fmt, channels, rounding).view(torch.int32))


def test_random_bits_row_stride_numbers_the_padded_layout() -> None:
    from precsim.formats.random import random_bits

    seed = torch.tensor([7, -9], dtype=torch.int32)
    padded = random_bits((6, 32), seed)
    assert torch.equal(random_bits((2, 3, 28), seed, row_stride=32).reshape(6, 28), padded[:, :28])


CONFIGS = {  # the quantizer paths: float + mask, observer, DSE (delayed), MX, dynamic gradient scale
    "fp8_sr": {"activation": "fp8_e4m3", "weight": "fp8_e4m3",
               "gradient": {"format": "fp8_e4m3", "rounding": "stochastic"}},
    "int8": {"activation": "int8", "weight": "int8(axis=0)", "gradient": {"format": "int8", "rounding": "stochastic"}},
    "int8_fp32_grad": {"activation": "int8", "weight": {"format": "int8", "granularity": "per_channel"}},
    "clipped_input_float": {"input": "int8", "activation": {"format": "fp8_e4m3", "ste": "clipped"},
                            "gradient": "bf16"},
    "int8_delayed": {"activation": {"format": "int8", "delayed": True},
                     "weight": {"format": "int8", "granularity": "per_channel", "delayed": True},
                     "gradient": "int8"},
    "int8_delayed_channels_sr": {"activation": {"format": "int8", "granularity": "per_channel", "delayed": True,
                                                "rounding": "stochastic", "observer": "running_minmax"},
                                 "weight": {"format": "int8", "delayed": True}},
    "dse_mx_dynamic": {"activation": "dse(e=4,m=3,delayed=true)", "weight": "mxfp8_e4m3",
                       "gradient": {"format": "mxfp8_e5m2", "scale": "dynamic"},
                       "weight_gradient": {"format": "dse(e=5,m=2)", "scale": "dynamic", "rounding": "stochastic"}},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prepared_model_same_with_compiled_kernels(compiled, name: str) -> None:
    """Training steps through compiled quantizers equal the eager ones: outputs, gradients, state."""

    def run() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(80, 96), nn.ReLU(), nn.Linear(96, 10))
        precsim.prepare(model, CONFIGS[name], seed=1)
        x = torch.randn(64, 80)
        outs = []
        for _ in range(2):  # the second step sees observer, delayed-shift and scale state
            model.zero_grad()
            out = model(x)
            out.square().sum().backward()
            outs += [out.detach()] + [p.grad.clone() for p in model.parameters()]
        return outs, model.state_dict()

    fast, fast_state = run()
    set_compile(False)
    ref, ref_state = run()
    for a, b in zip(fast, ref, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    for k, v in ref_state.items():
        assert torch.equal(fast_state[k], v), k


@pytest.mark.parametrize("compile_kernels", [False, True])
def test_clipped_ste_rebuilt_in_backward_matches_forward_range(compile_kernels: bool) -> None:
    """The clipped STE passes exactly the gradients of inputs inside the range used in forward,
    even when the observer moves on (a second forward) before the first backward."""
    from precsim.qat.config import parse_role
    from precsim.qat.quantizer import Quantizer

    before = compile_enabled()
    set_compile(compile_kernels)
    try:
        q = Quantizer("activation", parse_role("activation", "int8")).train()
        q(torch.randn(64, 96))  # a first range; the moving average then lags behind x1's wider one
        x1 = (torch.randn(64, 96) * 4).requires_grad_()
        y1 = q(x1)
        lo, hi = q.observer.min_val.clone(), q.observer.max_val.clone()
        q(torch.randn(64, 96) * 50)  # moves the observer's range before y1's backward
        g = torch.randn(64, 96)
        y1.backward(g)
        scale = torch.maximum(-lo.clamp(max=0), hi.clamp(min=0)) / 127
        inside = (x1.detach() >= -128.5 * scale) & (x1.detach() <= 127.5 * scale)
        assert not inside.all()  # the test exercises clipping
        assert torch.equal(x1.grad, g * inside)
    finally:
        set_compile(before)


def test_input_quantizer_tolerates_in_place_changes_of_its_input() -> None:
    """An ``input`` quantizer keeps its mask: the caller may change the input in place."""
    model = nn.Sequential(nn.Linear(8, 8))
    precsim.prepare(model, {"input": "int8"})
    x = torch.randn(4, 8, requires_grad=True)
    h = x * 1.0
    out = model(h)
    h.add_(1.0)  # after the forward pass, before backward
    out.sum().backward()
    assert x.grad is not None


@pytest.mark.parametrize("spec", ["mxfp8_e4m3", "mxfp4", "mxint8", "nvfp4"])
def test_block_max_is_the_magnitude_bit_max(compiled, spec: str) -> None:
    """The per-block max (a float reduction) picks the scale that the max of the magnitudes'
    bit patterns gives: subnormal and all-zero blocks, and a NaN of either sign makes its block
    NaN, eager and compiled."""
    fmt = parse_format(spec)
    torch.manual_seed(2)
    n = fmt.block_size  # one block per row
    x = torch.randn(256, n) * torch.exp2(torch.randint(-150, 128, (256, 1)).float())
    neg_nan = torch.tensor(-0x400000, dtype=torch.int32).view(torch.float32)  # 0xFFC00000
    x[0, 5] = neg_nan
    x[1, :] = neg_nan
    x[2, 7] = -float("inf")
    x[3, :] = -0.0
    x[4, :] = torch.randn(n) * 1e-42  # subnormal block
    x[5, :] = 1e-45
    bits = (x.view(torch.int32) & 0x7FFFFFFF).amax(dim=-1)
    for out in (fmt.quantize(x, "nearest"), run_quantize(fmt, x, "nearest")):
        assert torch.equal(out.isnan().all(dim=-1), bits > 0x7F800000 - 1)
        assert not out[bits < 0x7F800000].isnan().any()
        assert fmt.scale != "e8m0" or (out[3:6] == 0).all()  # zero, subnormal blocks: bottom scale


@pytest.mark.parametrize("compile_kernels", [False, True])
def test_weight_ste_skipped_only_when_every_value_is_inside(compile_kernels: bool) -> None:
    """A weight's own min/max range passes every gradient, so backward applies no mask; a value
    outside the STE bounds (here NaN, which compares false) still gets a zero gradient."""
    from precsim.qat.config import parse_role
    from precsim.qat.quantizer import Quantizer

    before = compile_enabled()
    set_compile(compile_kernels)
    try:
        q = Quantizer("weight", parse_role("weight", "int8")).train()
        w = (torch.randn(64, 96) * 3).requires_grad_()
        g = torch.randn(64, 96)
        q(w).backward(g)
        assert torch.equal(w.grad, g)  # inside: the gradient passes untouched
        w2 = w.detach().clone()
        w2[3, 5] = float("nan")
        w2.requires_grad_()
        q(w2).backward(g)
        expected = g.clone()
        expected[3, 5] = 0.0
        assert torch.equal(w2.grad, expected)
    finally:
        set_compile(before)


@pytest.mark.parametrize("spec", ["int8", "uint8", "int8(axis=0)"])
def test_integer_zero_is_positive_compiled_and_eager(compiled, spec: str) -> None:
    """Small negative values round to the integer zero: +0.0, as eager IEEE arithmetic gives,
    also from kernels compiled with -fno-signed-zeros."""
    fmt = parse_format(spec)
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(2))
    x[:, :8] = -1e-9
    x[:, 8] = -0.0
    for out in (fmt.quantize(x), run_quantize(fmt, x)):
        assert (out[:, :9].view(torch.int32) == 0).all()


def test_outer_torch_compile_takes_the_eager_functions(compiled) -> None:
    """Inside a user's own torch.compile, the quantizers trace their eager functions (no kernel
    of their own, no value read back, no compiler check in the trace): same outputs and
    gradients as eager, in training (int8 with int8 gradients, stochastic fp8)."""
    from precsim.runtime.backend import compile_enabled

    cfg = {"activation": "int8", "weight": "int8", "gradient": {"format": "fp8_e5m2", "rounding": "stochastic"}}

    def run(outer: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(80, 96), nn.ReLU(), nn.Linear(96, 10))
        precsim.prepare(model, cfg, seed=1)
        x = torch.randn(64, 80)
        f = torch.compile(model, backend="aot_eager") if outer else model
        out = f(x)
        out.square().sum().backward()
        return [out.detach()] + [p.grad for p in model.parameters()]

    assert compile_enabled()
    torch._dynamo.reset()
    traced = run(True)
    torch._dynamo.reset()
    set_compile(False)
    ref = run(False)
    for a, b in zip(traced, ref, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))


def test_row_kernels_end_rows_with_scalar_tails(compiled, monkeypatch: pytest.MonkeyPatch) -> None:
    """MX channel blocks and short rows compile with scalar row tails (a masked vector per row
    of 49 cost 2.4x the time); flat kernels keep Inductor's default."""
    from precsim.runtime import backend

    options: dict[str, dict | None] = {}
    real = backend._compiled

    def recording(fn, static, inline=False, rowwise=False, casts=False):  # type: ignore[no-untyped-def]
        kernel = real(fn, static, inline, rowwise, casts)
        options[fn.__name__] = kernel.options
        return kernel

    monkeypatch.setattr(backend, "_compiled", recording)
    run_quantize(parse_format("mxfp8_e4m3"), torch.randn(4, 32, 7, 7))  # channel blocks
    run_quantize(parse_format("mxfp8_e4m3(axis=-1)"), torch.randn(64, 7))  # rows shorter than a block
    run_quantize(parse_format("fp8_e4m3"), torch.randn(4, 32, 7, 7))  # flat
    assert options["_quantize_across"]["cpp.enable_loop_tail_vec"] is False  # type: ignore[index]
    assert options["_power_scale"]["cpp.enable_loop_tail_vec"] is False  # type: ignore[index]
    assert "cpp.enable_loop_tail_vec" not in (options["_quantize"] or {})


def test_kernels_run_on_every_thread_whatever_the_first_size(compiled) -> None:
    """Inductor decides from the first call's size whether loops are worth several threads, and
    its cache keeps the choice for all sizes: a kernel first called on a small tensor ran every
    later one on one thread (2x the time). The kernels' options make loops parallel anyway; a
    change of torch's thread count compiles the kernel again (Inductor writes it into loops)."""
    from torch._inductor.utils import run_and_get_code

    from precsim.qat.point_fns import quantize_gradient_into
    from precsim.runtime.backend import call

    static = (parse_format("int8"), "nearest", None, 1234, None, ())  # a kernel of this test's own
    threads = torch.get_num_threads()
    try:
        with torch._inductor.config.patch(force_disable_caches=True):
            torch.set_num_threads(1)  # compiled first for one thread: loops without threads
            _, serial = run_and_get_code(call, quantize_gradient_into, torch.randn(8, 10), (None,) * 7, static,
                                         flat=True)
            torch.set_num_threads(2)  # then for two: compiled again, the first call small
            _, sources = run_and_get_code(call, quantize_gradient_into, torch.randn(8, 10), (None,) * 7, static,
                                          flat=True)
    finally:
        torch.set_num_threads(threads)
    assert serial and not any("#pragma omp parallel" in s for s in serial)
    assert sources, "a new thread count did not compile the kernel again"
    assert any("#pragma omp parallel" in s for s in sources)
