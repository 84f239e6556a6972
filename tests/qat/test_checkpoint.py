"""Proof 6: a checkpoint restores observers, DSE state, scalers and the stochastic stream exactly."""

from __future__ import annotations

import torch
from torch import nn

import precsim

from ._models import SmallCNN, image_batches, make

CFG = {
    "activation": {"format": "int8", "rounding": "stochastic"},
    "weight": {"format": "int8", "granularity": "per_channel", "rounding": "stochastic"},
    "gradient": {"format": "fp8_e5m2", "rounding": "stochastic", "scale": "dynamic"},
    "weight_gradient": {"format": "bf16", "rounding": "stochastic"},
    "rules": [
        {"match": "conv2", "activation": {"format": "int8", "granularity": "per_channel", "observer": "percentile"}},
        {"match": "bn2", "activation": {"format": "dse(e=4,m=3,delayed=true)", "rounding": "stochastic"}},
        {"match": "relu1", "activation": {"format": "uint8", "observer": "running_minmax"}},
        {"type": "Linear", "weight": {"format": "int4", "observer": "moving_average", "momentum": 0.5}},
    ],
}


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1):
    model.train()
    model.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return out.detach(), grads


def test_state_dict_round_trip_is_exact(tmp_path) -> None:
    batches = image_batches(6)
    a = precsim.prepare(make(SmallCNN), CFG, seed=7)
    for x, y in batches[:3]:
        _step(a, x, y)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert state["conv2.precsim_activation.observer.min_val"].shape == (8,)
    assert state["conv1.parametrizations.weight.0.observer.min_val"].shape == (4,)
    assert bool(state["bn2.precsim_activation.dse_ready"])
    assert int(state["fc.precsim_activation.step"]) == 3
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)

    b = precsim.prepare(make(SmallCNN, seed=99), CFG, seed=7)  # other weights, fresh observers
    x_eval = image_batches(1, seed=42)[0][0]
    a.eval()
    b.eval()
    assert not torch.equal(a(x_eval), b(x_eval))
    missing, unexpected = b.load_state_dict(torch.load(path), strict=True)
    assert not missing and not unexpected
    for k, v in state.items():
        assert torch.equal(v, b.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(a(x_eval), b(x_eval))

    # the training stream continues identically: stochastic rounding, observers, DSE, scaler
    for x, y in batches[3:]:
        out_a, grads_a = _step(a, x, y)
        out_b, grads_b = _step(b, x, y)
        assert torch.equal(out_a, out_b)
        assert all(torch.equal(ga, gb) for ga, gb in zip(grads_a, grads_b, strict=True))
    a.eval()
    b.eval()
    assert torch.equal(a(x_eval), b(x_eval))


def test_stream_depends_on_step_counter() -> None:
    """Without the saved counters a fresh model would draw other random bits."""
    batches = image_batches(4)
    a = precsim.prepare(make(SmallCNN), CFG, seed=7)
    for x, y in batches[:3]:
        _step(a, x, y)
    state = {k: v for k, v in a.state_dict().items() if not k.endswith(".step")}
    b = precsim.prepare(make(SmallCNN), CFG, seed=7)
    b.load_state_dict(state, strict=False)
    out_a, _ = _step(a, *batches[3])
    out_b, _ = _step(b, *batches[3])
    assert not torch.equal(out_a, out_b)
