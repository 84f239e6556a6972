"""Post-training quantization: calibrate() fills observers from a few batches without training."""

from __future__ import annotations

import copy

import pytest
import torch
from test_convert import qat_resnet
from torch import nn
from torch.utils.data import DataLoader

import precsim
from precsim.integer.convert import convert, integer_config
from precsim.integer.exact import integer_exact
from precsim.qat.quantizer import Quantizer
from precsim.zoo import get_model


def _loader(n: int, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 1, 12, 12, generator=g), torch.zeros(batch, dtype=torch.long)) for _ in range(n)]


def test_calibrate_fills_observers_and_trains_nothing() -> None:
    torch.manual_seed(0)
    model = get_model("resnet", widths=(4, 8))
    model.train()
    before = copy.deepcopy(model.state_dict())
    calls = []
    model.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    out = precsim.calibrate(model, _loader(10), integer_config(model), batches=3)
    assert out is model and not model.training
    assert len(calls) == 3
    acts = [q for q in model.modules() if isinstance(q, Quantizer) and q.role in ("activation", "input")
            and q.observer is not None]
    assert acts and all(bool(q.observer.initialized) for q in acts)
    assert all(int(q.step) == 0 for q in acts)  # no training steps taken
    state = model.state_dict()
    for key, value in before.items():
        owner, _, name = key.rpartition(".")  # parametrized weights (and int32 biases) keep the original
        new_key = key if key in state else f"{owner}.parametrizations.{name}.original"
        assert torch.equal(state[new_key], value), key  # weights and BN statistics untouched
    assert all(p.grad is None for p in model.parameters())


def test_calibrate_a_prepared_model_and_errors() -> None:
    model = get_model("resnet", widths=(4,))
    with pytest.raises(ValueError, match="not prepared"):
        precsim.calibrate(model, _loader(1), None)
    precsim.prepare(model, integer_config(model))
    precsim.calibrate(model, [x for x, _ in _loader(2)], None)  # bare tensors work too
    convert(model)
    with pytest.raises(ValueError, match="batches must be"):
        precsim.calibrate(model, _loader(1), None, batches=0)
    with pytest.raises(ValueError, match="no batches"):
        precsim.calibrate(model, [], None)
    with pytest.raises(TypeError, match="cannot feed a batch of type str to the model; allowed: a tensor"):
        precsim.calibrate(model, ["text"], None)


def test_ptq_of_the_float_resnet() -> None:
    """PTQ (int8, folded BN) of a trained float model: integer accuracy close to float, code-exact mode."""
    t = qat_resnet()
    x, labels = t.test.tensors
    float_model = copy.deepcopy(t.float_model)
    with torch.no_grad():
        acc_float = (float_model(x).argmax(1) == labels).float().mean().item()
    loader = DataLoader(t.train, batch_size=128, shuffle=True, generator=torch.Generator().manual_seed(0))
    ptq = precsim.calibrate(float_model, loader, integer_config(float_model), batches=4)
    imodel = convert(ptq)
    codes = imodel.output_codes(x)
    acc_int = (codes.argmax(1) == labels).float().mean().item()
    assert acc_int > acc_float - 0.05
    with integer_exact(ptq) as sim:
        exact = sim(x[:100])
    qp = imodel.output_qp
    assert torch.equal(torch.round(exact / qp.scale_tensor()).long() + qp.zero_point, codes[:100].long())


def test_calibrate_leaves_batchnorm_in_eval() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU())
    cfg = {"activation": "uint8", "weight": "int8", "fold_bn": True, "rules": [{"match": "0", "input": "uint8"}]}
    precsim.calibrate(model, _loader(2), cfg)
    assert int(model[1].num_batches_tracked) == 0
