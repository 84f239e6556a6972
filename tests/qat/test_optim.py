"""QuantizedOptimizer: low-precision master weights and optimizer state."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch import nn

import precsim
from precsim import QuantizedOptimizer

from ._models import MLP, SmallCNN, image_batches, make


def _data(n: int = 4):
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(16, 6, generator=g), torch.randint(0, 3, (16,), generator=g)) for _ in range(n)]


def _loss(model: nn.Module, x, y) -> torch.Tensor:
    return nn.functional.cross_entropy(model(x), y)


def _representable(t: torch.Tensor, fmt: str) -> bool:
    return torch.equal(precsim.quantize(t, fmt), t)


@pytest.mark.parametrize("kind", ["sgd", "adam"])
def test_matches_manual_reference_loop(kind: str) -> None:
    def build(params):
        if kind == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return torch.optim.Adam(params, lr=0.01)

    ref_model, model = make(MLP), make(MLP)
    ref_opt = build(ref_model.parameters())
    opt = QuantizedOptimizer(build(model.parameters()), weight="bf16", state="fp8_e5m2")
    for x, y in _data():
        for m, o in ((ref_model, ref_opt), (model, opt)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
        with torch.no_grad():  # the reference: round by hand after each step
            for p in ref_model.parameters():
                p.copy_(precsim.quantize(p, "bf16"))
                for name, t in ref_opt.state[p].items():
                    if name != "step":
                        t.copy_(precsim.quantize(t, "fp8_e5m2"))
        for p, q in zip(ref_model.parameters(), model.parameters(), strict=True):
            assert torch.equal(p, q)
            assert _representable(q, "bf16")
            for name, t in opt.state[q].items():
                assert torch.equal(t, ref_opt.state[p][name]), name
                if name != "step":
                    assert _representable(t, "fp8_e5m2")
    if kind == "adam":
        assert all(float(opt.state[p]["step"]) == 4.0 for p in model.parameters())  # bookkeeping untouched
    # not vacuous: plain fp32 training ends elsewhere
    plain = make(MLP)
    plain_opt = build(plain.parameters())
    for x, y in _data():
        plain_opt.zero_grad()
        _loss(plain, x, y).backward()
        plain_opt.step()
    assert any(not torch.equal(p, q) for p, q in zip(plain.parameters(), model.parameters(), strict=True))


def test_stochastic_rounding_state_dict_round_trip(tmp_path) -> None:
    data = _data(6)

    def fresh(seed: int):
        model = make(MLP)
        opt = QuantizedOptimizer(torch.optim.Adam(model.parameters(), lr=0.01), weight="fp8_e4m3",
                                 state="bf16", rounding="stochastic", seed=seed)
        return model, opt

    a, opt_a = fresh(3)
    for x, y in data[:3]:
        opt_a.zero_grad()
        _loss(a, x, y).backward()
        opt_a.step()
    path = tmp_path / "ckpt.pt"
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, path)
    assert opt_a.state_dict()["precsim_quantized"]["steps"] == 3

    b, opt_b = fresh(999)
    ckpt = torch.load(path)
    b.load_state_dict(ckpt["model"])
    opt_b.load_state_dict(ckpt["opt"])
    assert opt_b.steps == 3 and opt_b.seed == 3
    for x, y in data[3:]:
        for m, o in ((a, opt_a), (b, opt_b)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            assert torch.equal(p, q)
            assert _representable(q, "fp8_e4m3")
            assert torch.equal(opt_a.state[p]["exp_avg"], opt_b.state[q]["exp_avg"])

    # another seed draws other bits; nearest rounding differs from stochastic
    c, opt_c = fresh(4)
    for x, y in data[:3]:
        opt_c.zero_grad()
        _loss(c, x, y).backward()
        opt_c.step()
    a2, opt_a2 = fresh(3)
    for x, y in data[:3]:
        opt_a2.zero_grad()
        _loss(a2, x, y).backward()
        opt_a2.step()
    assert any(not torch.equal(p, q) for p, q in zip(a2.parameters(), c.parameters(), strict=True))


def test_prepared_model_scheduler_and_delegation() -> None:
    model = precsim.prepare(make(SmallCNN), {"activation": "int8", "weight": "int8", "gradient": "fp8_e5m2"})
    inner = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt = QuantizedOptimizer(inner, weight="bf16", state="bf16")
    assert isinstance(opt, torch.optim.Optimizer)
    assert opt.param_groups is inner.param_groups and opt.state is inner.state and opt.defaults is inner.defaults
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    originals = [model.get_submodule(n).parametrizations.weight.original for n in ("conv1", "conv2", "fc")]
    for x, y in image_batches(2):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        sched.step()
    assert inner.param_groups[0]["lr"] == pytest.approx(0.025)
    for p in originals:  # the stored weights of a prepared model are what gets rounded
        assert _representable(p.detach(), "bf16")
        assert _representable(inner.state[p]["momentum_buffer"], "bf16")
    opt.zero_grad()
    assert all(p.grad is None for p in model.parameters())
    extra = nn.Parameter(torch.randn(3, 3))
    opt.add_param_group({"params": [extra], "lr": 1.0})
    extra.grad = torch.full((3, 3), 1e-3)
    opt.step()
    assert len(inner.param_groups) == 2 and _representable(extra.detach(), "bf16")
    clone = pickle.loads(pickle.dumps(opt))
    assert clone.steps == opt.steps and clone.weight_format == opt.weight_format
    assert "bf16" in repr(opt)
    copy.deepcopy(opt)


def test_no_formats_is_the_plain_optimizer() -> None:
    a, b = make(MLP), make(MLP)
    oa = torch.optim.SGD(a.parameters(), lr=0.1)
    ob = QuantizedOptimizer(torch.optim.SGD(b.parameters(), lr=0.1), weight="fp32")
    for x, y in _data(2):
        for m, o in ((a, oa), (b, ob)):
            o.zero_grad()
            _loss(m, x, y).backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_closure_is_passed_through() -> None:
    model = make(MLP)
    opt = QuantizedOptimizer(torch.optim.LBFGS(model.parameters(), lr=0.1, max_iter=2), weight="bf16")
    x, y = _data(1)[0]

    def closure():
        opt.zero_grad()
        loss = _loss(model, x, y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.is_tensor(loss)
    assert all(_representable(p.detach(), "bf16") for p in model.parameters())


@pytest.mark.parametrize(("kwargs", "word"), [
    ({"weight": "fp9"}, "fp9"),
    ({"state": "dse(e=4,m=3,delayed=true)"}, "delayed"),
    ({"rounding": "up"}, "up"),
])
def test_bad_arguments(kwargs, word) -> None:
    with pytest.raises(ValueError, match=word):
        QuantizedOptimizer(torch.optim.SGD(make(MLP).parameters(), lr=0.1), **kwargs)
    with pytest.raises(ValueError, match="Optimizer"):
        QuantizedOptimizer(object())  # type: ignore[arg-type]
