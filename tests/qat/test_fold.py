"""BatchNorm folding for QAT (Jacob et al. 2018, section 3.2) against explicit reference folds."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import precsim
from precsim.qat.config import QuantConfig
from precsim.qat.fold import FoldedWeight, find_fold_chains, fold_conv_bn
from precsim.qat.quantizer import Quantizer
from precsim.zoo import get_model


def _random_bn(c: int, seed: int, dims: int = 2) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](c, eps=1e-3)
    with torch.no_grad():
        bn.weight.copy_(torch.randn(c, generator=g))
        bn.bias.copy_(torch.randn(c, generator=g))
        bn.running_mean.copy_(torch.randn(c, generator=g))
        bn.running_var.copy_(torch.rand(c, generator=g) * 3 + 0.1)
    return bn.eval()


def _explicit_fold(w: torch.Tensor, b: torch.Tensor | None, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The textbook formulas, written out independently of precsim.qat.fold."""
    std = torch.sqrt(bn.running_var + bn.eps)
    factor = bn.weight / std
    w_ref = w * factor.view(-1, *([1] * (w.dim() - 1)))
    b0 = torch.zeros_like(bn.running_mean) if b is None else b
    b_ref = bn.bias + (b0 - bn.running_mean) * factor
    return w_ref, b_ref


@pytest.mark.parametrize("with_bias", [False, True])
def test_fold_conv_bn_equals_explicit_reference(with_bias: bool) -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, padding=1, bias=with_bias)
    bn = _random_bn(5, 1)
    w, b = fold_conv_bn(conv.weight, conv.bias, bn)
    w_ref, b_ref = _explicit_fold(conv.weight, conv.bias, bn)
    torch.testing.assert_close(w, w_ref, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(b, b_ref, rtol=1e-6, atol=1e-6)
    x = torch.randn(4, 3, 9, 9)
    torch.testing.assert_close(F.conv2d(x, w, b, padding=1), bn(conv(x)), rtol=1e-5, atol=1e-5)


def test_fold_linear_bn1d() -> None:
    torch.manual_seed(0)
    fc = nn.Linear(7, 4)
    bn = _random_bn(4, 2, dims=1)
    w, b = fold_conv_bn(fc.weight, fc.bias, bn)
    x = torch.randn(6, 7)
    torch.testing.assert_close(F.linear(x, w, b), bn(fc(x)), rtol=1e-5, atol=1e-5)


class ConvBnNet(nn.Module):
    """conv-bn-relu, conv-bn (no relu), linear-bn1d-relu6."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(2, 4, 3, padding=1, bias=True)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2)
        self.bn2 = nn.BatchNorm2d(6)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(6 * 3 * 3, 5)
        self.bn3 = nn.BatchNorm1d(5)
        self.act = nn.ReLU6()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu1(self.bn1(self.conv1(x)))
        x = self.bn2(self.conv2(x))
        return self.act(self.bn3(self.fc(self.flatten(x))))


def _randomize_bns(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)


def test_chains_found() -> None:
    chains = find_fold_chains(ConvBnNet())
    assert [(c.conv, c.bn, c.act) for c in chains] == [
        ("conv1", "bn1", "relu1"), ("conv2", "bn2", None), ("fc", "bn3", "act")]
    resnet = get_model("resnet", widths=(4, 8))
    found = {(c.conv, c.bn, c.act) for c in find_fold_chains(resnet)}
    assert found == set(resnet.conv_bn_act_names())


def test_weight_quantizer_sees_the_explicitly_folded_weight() -> None:
    torch.manual_seed(0)
    model = ConvBnNet()
    _randomize_bns(model, 3)
    precsim.prepare(model, {"activation": "uint8", "weight": {"format": "int8", "granularity": "per_channel"},
                            "fold_bn": True})
    seen: dict[str, torch.Tensor] = {}
    for name in ("conv1", "conv2", "fc"):
        p = model.get_submodule(name).parametrizations.weight[0]
        assert isinstance(p, FoldedWeight) and isinstance(p.quant, Quantizer)
        p.quant.register_forward_pre_hook(lambda m, a, name=name: seen.__setitem__(name, a[0].detach().clone()))
    model.eval()
    model(torch.randn(2, 2, 7, 7))
    for name, bn_name in (("conv1", "bn1"), ("conv2", "bn2"), ("fc", "bn3")):
        mod, bn = model.get_submodule(name), model.get_submodule(bn_name)
        w = mod.parametrizations.weight.original
        w_ref, _ = _explicit_fold(w, mod.bias, bn)
        torch.testing.assert_close(seen[name], w_ref, rtol=1e-6, atol=1e-7)
        assert torch.equal(seen[name], fold_conv_bn(w, mod.bias, bn)[0])  # the converter's fold, bit for bit


def test_inner_activation_quantizers_are_switched_off() -> None:
    model = precsim.prepare(ConvBnNet(), {"activation": "uint8", "weight": "int8", "fold_bn": True})
    has = {n: getattr(getattr(model.get_submodule(n), "precsim_activation", None), "spec", None) is not None
           for n in ("conv1", "bn1", "relu1", "conv2", "bn2", "fc", "bn3", "act")}
    assert has == {"conv1": False, "bn1": False, "relu1": True, "conv2": False, "bn2": True,
                   "fc": False, "bn3": False, "act": True}


def test_gradient_quantizers_stay_on_folded_outputs() -> None:
    model = precsim.prepare(ConvBnNet(), {"activation": "uint8", "gradient": "int8", "fold_bn": True})
    q = model.conv1.precsim_activation
    assert isinstance(q, Quantizer) and q.spec is None and q.grad_spec is not None


def test_quantization_off_matches_the_unfolded_float_model() -> None:
    torch.manual_seed(0)
    ref = ConvBnNet()
    _randomize_bns(ref, 4)
    model = precsim.prepare(copy.deepcopy(ref), {"fold_bn": True})
    x = torch.randn(8, 2, 7, 7)
    for mode in ("train", "eval"):
        ref.train(mode == "train")
        model.train(mode == "train")
        y_ref, y = ref(x), model(x)
        torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-5)
        if mode == "train":
            y_ref.square().sum().backward()
            y.square().sum().backward()
            params = {n.replace("parametrizations.weight.original", "weight"): p
                      for n, p in model.named_parameters()}
            for n, p_ref in ref.named_parameters():
                torch.testing.assert_close(params[n].grad, p_ref.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(model.bn1.running_mean, ref.bn1.running_mean)
            torch.testing.assert_close(model.bn1.running_var, ref.bn1.running_var)


def test_eval_chain_is_the_folded_conv() -> None:
    """In eval the simulated chain computes conv(x, Q(w s)) + b_fold: what the integer conv runs."""
    torch.manual_seed(0)
    model = ConvBnNet()
    _randomize_bns(model, 5)
    precsim.prepare(model, {"weight": {"format": "int8", "granularity": "per_channel"}, "fold_bn": True})
    model.eval()
    x = torch.randn(3, 2, 7, 7)
    q = model.conv1.parametrizations.weight[0].quant
    w_f, b_f = fold_conv_bn(model.conv1.parametrizations.weight.original, model.conv1.bias, model.bn1)
    wq = q(w_f)  # the weight quantizer on the folded weight
    expected = torch.relu(F.conv2d(x, wq, b_f, padding=1))
    torch.testing.assert_close(model.relu1(model.bn1(model.conv1(x))), expected, rtol=1e-5, atol=1e-5)


def test_freeze_after_stops_batch_statistics() -> None:
    torch.manual_seed(0)
    model = precsim.prepare(ConvBnNet(), {"activation": "uint8", "weight": "int8", "fold_bn": {"freeze_after": 2}})
    model.train()
    for _ in range(2):
        model(torch.randn(8, 2, 7, 7))
    frozen_mean = model.bn1.running_mean.clone()
    assert int(model.bn1.num_batches_tracked) == 2
    x = torch.randn(8, 2, 7, 7) * 3 + 1
    y_train = model(x)
    assert torch.equal(model.bn1.running_mean, frozen_mean)
    assert int(model.bn1.num_batches_tracked) == 2
    assert model.bn1.training  # restored after the call
    model.eval()
    torch.testing.assert_close(y_train, model(x))  # training used the running statistics


def test_fold_state_dict_round_trip() -> None:
    torch.manual_seed(0)
    cfg = {"activation": "uint8", "weight": {"format": "int8", "granularity": "per_channel"},
           "fold_bn": {"freeze_after": 1}}
    a = precsim.prepare(ConvBnNet(), cfg)
    a.train()
    for _ in range(3):
        a(torch.randn(8, 2, 7, 7))
    b = precsim.prepare(ConvBnNet(), cfg)
    b.load_state_dict(a.state_dict())
    a.eval()
    b.eval()
    x = torch.randn(4, 2, 7, 7)
    assert torch.equal(a(x), b(x))
    assert int(b.bn1.num_batches_tracked) == 1


@pytest.mark.parametrize("value, expected", [(True, (True, None)), (False, (False, None)),
                                             ({"freeze_after": 5}, (True, 5)), ({}, (True, None))])
def test_config_fold_bn(value: object, expected: tuple[bool, int | None]) -> None:
    cfg = QuantConfig.from_dict({"fold_bn": value})
    assert (cfg.fold_bn, cfg.freeze_bn_after) == expected


@pytest.mark.parametrize("value, match", [({"freeze": 3}, "unknown key 'freeze'"),
                                          ({"freeze_after": -1}, "freeze_after must be"),
                                          ("yes", "fold_bn must be")])
def test_config_fold_bn_errors(value: object, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        QuantConfig.from_dict({"fold_bn": value})
