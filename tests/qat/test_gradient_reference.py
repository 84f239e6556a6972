"""Proof 3 and gradient scaling: weight gradients equal an explicit autograd reference bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import precsim
import precsim.qat.quantizer as quantizer_module

from ._models import MLP, RoundGrad, make

FMT_CASES = ["bf16", "fp8_e5m2", "fp8_e4m3", "hfp8_bwd"]


def _data(scale: float = 1.0):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, 6, generator=g)
    y = torch.randint(0, 3, (16,), generator=g)
    return x, y


def _reference_grads(model: MLP, x, y, fmt: str, loss_scale: float = 1.0, point_scales=(1.0, 1.0, 1.0),
                     wgrad: str | None = None, loss_factor: float = 1.0):
    """Autograd on an unprepared copy with the error signal rounded by hand at each point."""
    ref = copy.deepcopy(model)
    x = x.clone().requires_grad_(True)
    s1, s2, s3 = point_scales
    h = RoundGrad.apply(ref.fc1(x), fmt, s1)
    h = RoundGrad.apply(ref.relu(h), fmt, s2)
    out = RoundGrad.apply(ref.fc2(h), fmt, s3)
    (nn.functional.cross_entropy(out, y) * loss_factor * loss_scale).backward()
    grads = {n: p.grad / loss_scale for n, p in ref.named_parameters()}
    if wgrad is not None:
        for n in ("fc1.weight", "fc2.weight"):
            grads[n] = precsim.quantize(grads[n], wgrad)
    return grads, x.grad / loss_scale


def _prepared_grads(model: MLP, cfg, x, y, loss_factor: float = 1.0):
    model.train()
    x = x.clone().requires_grad_(True)
    (nn.functional.cross_entropy(model(x), y) * loss_factor).backward()
    grads = {}
    for name, p in model.named_parameters():
        grads[name.replace(".parametrizations.weight.original", ".weight")] = p.grad
    return grads, x.grad


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("fmt", FMT_CASES)
def test_gradient_quantization_matches_reference(fmt: str) -> None:
    base = make(MLP)
    x, y = _data()
    ref, ref_dx = _reference_grads(base, x, y, fmt)
    model = precsim.prepare(copy.deepcopy(base), {"gradient": fmt})
    got, dx = _prepared_grads(model, {"gradient": fmt}, x, y)
    _assert_same(got, ref)
    assert torch.equal(dx, ref_dx)
    # and it is not vacuous: the fp32 gradients differ
    fp32 = copy.deepcopy(base)
    nn.functional.cross_entropy(fp32(x), y).backward()
    assert any(not torch.equal(p.grad, got[n]) for n, p in fp32.named_parameters())


def test_weight_gradient_role_matches_reference() -> None:
    base = make(MLP)
    x, y = _data()
    cfg = {"gradient": "fp8_e5m2", "weight_gradient": "bf16"}
    ref, _ = _reference_grads(base, x, y, "fp8_e5m2", wgrad="bf16")
    got, _ = _prepared_grads(precsim.prepare(copy.deepcopy(base), cfg), cfg, x, y)
    _assert_same(got, ref)


def test_static_gradient_scale_equals_scaled_loss_reference() -> None:
    base = make(MLP)
    x, y = _data()
    tiny = 2.0**-12  # small loss: unscaled fp8 gradients would underflow
    cfg = {"gradient": {"format": "fp8_e5m2", "scale": 1024}}
    # reference: scale the loss by 1024, quantize the error signal, unscale the weight gradients
    ref, ref_dx = _reference_grads(base, x, y, "fp8_e5m2", loss_scale=1024.0, loss_factor=tiny)
    got, dx = _prepared_grads(precsim.prepare(copy.deepcopy(base), cfg), cfg, x, y, loss_factor=tiny)
    _assert_same(got, ref)
    assert torch.equal(dx, ref_dx)
    unscaled, _ = _reference_grads(base, x, y, "fp8_e5m2", loss_factor=tiny)
    assert any(not torch.equal(unscaled[k], got[k]) for k in got)


def test_dynamic_gradient_scale_backs_off_on_overflow(monkeypatch: pytest.MonkeyPatch) -> None:
    base = make(MLP)
    x, y = _data()
    big = 2.0**6  # large gradients: at the initial scale 2^16 they overflow fp8_e5m2 (max 57344)
    plain = precsim.prepare(copy.deepcopy(base), {"gradient": "fp8_e5m2"})
    plain_grads, _ = _prepared_grads(plain, None, x, y, loss_factor=2.0**16 * big)
    assert not all(torch.isfinite(g).all() for g in plain_grads.values())

    cfg = {"gradient": {"format": "fp8_e5m2", "scale": "dynamic"}}
    model = precsim.prepare(copy.deepcopy(base), cfg)
    got, dx = _prepared_grads(model, cfg, x, y, loss_factor=big)
    qs = [model.fc1.precsim_activation, model.relu.precsim_activation, model.fc2.precsim_activation]
    scales = [float(q.grad_scale) for q in qs]
    assert all(s < 2.0**16 for s in scales)
    assert all(torch.isfinite(g).all() for g in got.values())
    ref, ref_dx = _reference_grads(base, x, y, "fp8_e5m2", point_scales=scales, loss_factor=big)
    _assert_same(got, ref)
    assert torch.equal(dx, ref_dx)

    # the scale grows back (doubles) after GROWTH_INTERVAL steps without overflow
    monkeypatch.setattr(quantizer_module, "GROWTH_INTERVAL", 2)
    for _ in range(2):
        model.zero_grad()
        _prepared_grads(model, cfg, x, y, loss_factor=big * 2.0**-8)
    assert [float(q.grad_scale) for q in qs] == [2 * s for s in scales]
    # eval-mode backward uses the scale but does not update it
    model.eval()
    before = [q.grad_scale.clone() for q in qs]
    nn.functional.cross_entropy(model(x), y).mul(2.0**10).backward()
    assert all(torch.equal(b, q.grad_scale) for b, q in zip(before, qs, strict=True))


def test_delayed_dse_gradient_uses_previous_shift() -> None:
    """dse(delayed) on the gradient: each backward rounds with the shift measured on the previous one."""
    fmt = precsim.parse_format("dse(e=5,m=2,delayed=true)")
    model = precsim.prepare(make(MLP), {"gradient": fmt})
    q = model.fc2.precsim_activation  # the last point: its incoming gradient comes straight from the loss
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []

    def hook(mod, args, out):
        pair: list[torch.Tensor] = []

        def leaving(g: torch.Tensor) -> None:
            seen.append((pair[0], g.detach().clone()))

        out.register_hook(lambda g: pair.append(g.detach().clone()))  # arriving at the point
        args[0].register_hook(leaving)
    q.register_forward_hook(hook)
    g = torch.Generator().manual_seed(3)
    model.train()
    for factor in (1.0, 2.0**-4, 2.0**16):  # the last jump overflows the stale shift
        x = torch.randn(16, 6, generator=g)
        y = torch.randint(0, 3, (16,), generator=g)
        (nn.functional.cross_entropy(model(x), y) * factor).backward()
    assert len(seen) == 3
    shifts = [fmt.shift_for(incoming) for incoming, _ in seen]
    assert len({int(s) for s in shifts}) > 1  # the loss factors move the shift
    for i, (incoming, outgoing) in enumerate(seen):
        used = shifts[max(i - 1, 0)]
        assert torch.equal(outgoing, fmt.quantize(incoming, shift=used)), i
    assert torch.isinf(seen[2][1]).any() and torch.isfinite(fmt.quantize(seen[2][0], shift=shifts[2])).all()
    assert int(q.grad_dse_shift) == int(shifts[-1])


@pytest.mark.parametrize("fmt", ["mxfp8_e5m2", "mxfp4", "nvfp4", "dse(e=5,m=2)", "int8"])
def test_dynamic_gradient_scale_works_for_scaled_formats(fmt: str) -> None:
    """MX/NVFP4, DSE and integer gradients scale each tensor or block to its own range, so a dynamic
    power-of-two S leaves their rounding unchanged; it must still keep S g finite. At the initial
    2^16, gradients near 1e36 overflow float32 (the NaN seen in an MXFP8 DDP run); the scale backs
    off and the result equals the unscaled rounding."""
    from precsim.formats import parse_format
    from precsim.qat.config import RoleSpec
    from precsim.qat.quantizer import Quantizer

    f = parse_format(fmt)
    q = Quantizer("activation", None, RoleSpec(format=f, scale="dynamic"))
    x = torch.zeros(8, 64, requires_grad=True)
    g = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 1e36
    q(x).backward(g)
    assert torch.isfinite(x.grad).all()
    assert float(q.grad_scale) < 2.0**16
    assert torch.equal(x.grad, f.quantize(g))
    # ordinary gradients: S stays put and the rounding is still Q(g)
    scale = q.grad_scale.clone()
    x.grad = None
    q(x).backward(g * 1e-36)
    assert torch.equal(q.grad_scale, scale) and torch.equal(x.grad, f.quantize(g * 1e-36))


@pytest.mark.parametrize("compile_kernels", [False, True])
def test_delayed_int_gradient_uses_previous_range(compile_kernels: bool) -> None:
    """``delayed: true`` on an integer gradient: the first backward measures its own range;
    each later one rounds on the grid of the previous backward's [min, max], then stores its own."""
    from precsim.formats.integer import tensor_range
    from precsim.runtime.backend import compile_enabled, set_compile

    fmt = precsim.parse_format("int8")
    before = compile_enabled()
    set_compile(compile_kernels)
    try:
        model = precsim.prepare(make(MLP), {"gradient": {"format": "int8", "delayed": True}})
        q = model.fc2.precsim_activation
        seen: list[tuple[torch.Tensor, torch.Tensor]] = []

        def hook(mod, args, out):
            pair: list[torch.Tensor] = []
            out.register_hook(lambda g: pair.append(g.detach().clone()))
            args[0].register_hook(lambda g: seen.append((pair[0], g.detach().clone())))
        q.register_forward_hook(hook)
        g = torch.Generator().manual_seed(5)
        model.train()
        for factor in (1.0, 8.0, 1.0 / 64):  # 64 x 3 gradients: the compiled path when enabled
            x = torch.randn(64, 6, generator=g)
            y = torch.randint(0, 3, (64,), generator=g)
            (nn.functional.cross_entropy(model(x), y) * factor).backward()
        ranges = [torch.stack(tensor_range(incoming, None)) for incoming, _ in seen]
        for i, (incoming, outgoing) in enumerate(seen):
            lo, hi = ranges[max(i - 1, 0)]
            scale, zp = fmt.qparams(lo, hi)
            assert torch.equal(outgoing, fmt.quantize(incoming, scale=scale, zero_point=zp)), i
        assert not torch.equal(seen[1][1], fmt.quantize(seen[1][0]))  # the stale range shows
        assert torch.equal(q.grad_range, ranges[-1])
    finally:
        set_compile(before)


def test_delayed_gradient_range_is_per_tensor() -> None:
    with pytest.raises(ValueError, match="delayed gradient ranges are per tensor"):
        precsim.prepare(make(MLP), {"gradient": {"format": "int8", "granularity": "per_channel", "delayed": True}})


def test_observer_on_a_gradient_role_is_an_error() -> None:
    """A gradient has no observer: the key would be ignored, so it is refused."""
    with pytest.raises(ValueError, match="'observer' is for forward roles"):
        precsim.prepare(make(MLP), {"gradient": {"format": "int8", "observer": "moving_average"}})
