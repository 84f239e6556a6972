"""Proofs 1 and 2: every quantization point holds only representable values, forward and backward."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import precsim

from ._models import (
    Capture,
    SmallCNN,
    TinyTransformer,
    assert_grad_representable,
    assert_representable,
    image_batches,
    make,
)

CONFIGS = {
    "int8": {
        "activation": "int8",
        "weight": {"format": "int8", "granularity": "per_channel", "observer": "minmax"},
        "gradient": {"format": "fp8_e5m2", "rounding": "stochastic"},
    },
    "uint8_per_channel_act": {
        "activation": {"format": "uint8", "granularity": "per_channel", "rounding": "stochastic"},
        "weight": {"format": "int4", "observer": "running_minmax"},
        "gradient": "bf16",
        "weight_gradient": {"format": "fp8_e5m2", "rounding": "stochastic"},
    },
    "fp8": {
        "activation": {"format": "fp8_e4m3", "rounding": "stochastic"},
        "weight": "bf16",
        "gradient": {"format": "fp8_e5m2", "scale": 1024},
        "weight_gradient": "bf16",
    },
    "dse_mx": {
        "activation": "dse(e=4,m=3)",
        "weight": {"format": "mxfp8_e4m3", "rounding": "stochastic"},
        "gradient": {"format": "hfp8_bwd", "rounding": "stochastic"},
    },
}


def _check(model: nn.Module, cap: Capture) -> None:
    acts = [n for n, (q, _) in cap.out.items() if q.role == "activation" and q.spec is not None]
    weights = [n for n, (q, _) in cap.out.items() if q.role == "weight" and q.spec is not None]
    assert acts and weights
    for name, (q, y) in cap.out.items():
        if q.spec is not None:
            assert_representable(q, y, name)
    grads = [n for n, (q, _) in cap.grad.items() if q.grad_spec is not None]
    assert len(grads) == len([n for n, (q, _) in cap.out.items() if q.role == "activation" and q.grad_spec])
    for name, (q, g) in cap.grad.items():
        if q.grad_spec is not None:
            assert_grad_representable(q, g, name)
    for name, q in precsim.quantizers(model):  # weight_gradient: the gradient the optimizer sees
        if q.role == "weight" and q.grad_spec is not None:
            owner = model.get_submodule(name.rsplit(".", 1)[0])
            assert_grad_representable(q, owner.original.grad, name)


@pytest.mark.parametrize("key", list(CONFIGS))
def test_cnn_points_hold_representable_values(key: str) -> None:
    model = make(SmallCNN, inplace=key == "fp8")
    precsim.prepare(model, CONFIGS[key], seed=3)
    cap = Capture(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in image_batches(3):
        model.train()
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        _check(model, cap)
        opt.step()
    model.eval()
    cap.out.clear()
    with torch.no_grad():
        model(image_batches(1, seed=9)[0][0])
    for name, (q, y) in cap.out.items():
        if q.spec is not None:
            assert_representable(q, y, name)


def test_transformer_points_hold_representable_values() -> None:
    model = make(TinyTransformer)
    cfg = {
        "activation": "int8",
        "weight": {"format": "int8", "granularity": "per_channel"},
        "gradient": {"format": "fp8_e5m2", "rounding": "stochastic"},
        "rules": [
            {"type": ["Embedding", "LayerNorm", "GELU", "Softmax"]},
            {"type": "Softmax", "activation": {"format": "uint8", "observer": "running_minmax"}},
            {"match": "res*", "activation": "bf16"},
        ],
    }
    precsim.prepare(model, cfg, seed=1)
    cap = Capture(model)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 20, (4, 6), generator=g)
    labels = torch.randint(0, 3, (4,), generator=g)
    model.train()
    nn.functional.cross_entropy(model(tokens), labels).backward()
    names = {n.rsplit(".", 1)[0] for n, (q, _) in cap.out.items() if q.role == "activation"}
    assert {"embed", "ln1", "softmax", "gelu", "res1", "res2", "qkv", "fc1"} <= names
    _check(model, cap)
    assert cap.out["softmax.precsim_activation"][1].min() >= 0
