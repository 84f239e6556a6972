"""Proof 7: stochastic rounding only in train(); reproducible from the seed."""

from __future__ import annotations

import torch
from torch import nn

import precsim

from ._models import SmallCNN, image_batches, make


def _cfg(rounding: str) -> dict:
    return {
        "activation": {"format": "fp8_e4m3", "rounding": rounding},
        "weight": {"format": "int8", "granularity": "per_channel", "rounding": rounding},
        "gradient": {"format": "fp8_e5m2", "rounding": rounding},
        "rules": [{"type": "ReLU", "activation": {"format": "uint8", "rounding": rounding}}],
    }


def _train_run(seed: int, rounding: str = "stochastic", steps: int = 2):
    model = precsim.prepare(make(SmallCNN), _cfg(rounding), seed=seed)
    model.train()
    outs, grads = [], []
    for x, y in image_batches(steps):
        model.zero_grad()
        out = model(x)
        nn.functional.cross_entropy(out, y).backward()
        outs.append(out.detach())
        grads.append([p.grad.clone() for p in model.parameters()])
    return outs, grads


def test_eval_rounds_to_nearest_and_is_deterministic() -> None:
    sr = precsim.prepare(make(SmallCNN), _cfg("stochastic"), seed=0).eval()
    rn = precsim.prepare(make(SmallCNN), _cfg("nearest"), seed=0).eval()
    x = image_batches(1)[0][0]
    with torch.no_grad():
        first, second, nearest = sr(x), sr(x), rn(x)
    assert torch.equal(first, second)
    assert torch.equal(first, nearest)
    assert all(int(q.step) <= 1 for _, q in precsim.quantizers(sr))  # eval does not advance the stream


def test_train_is_reproducible_per_seed_and_stochastic() -> None:
    outs0, grads0 = _train_run(0)
    outs0b, grads0b = _train_run(0)
    for a, b in zip(outs0, outs0b, strict=True):
        assert torch.equal(a, b)
    for ga, gb in zip(grads0, grads0b, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(ga, gb, strict=True))
    outs1, grads1 = _train_run(1)
    assert not torch.equal(outs0[0], outs1[0])
    assert any(not torch.equal(a, b) for a, b in zip(grads0[0], grads1[0], strict=True))
    outs_rn, _ = _train_run(0, "nearest")
    assert not torch.equal(outs0[0], outs_rn[0])


def test_stream_advances_each_training_call() -> None:
    model = precsim.prepare(make(nn.Linear, 16, 16), {"activation": {"format": "bf16", "rounding": "stochastic"}})
    x = torch.randn(64, 16)
    model.train()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert not torch.equal(a, b)
    assert torch.equal(precsim.quantize(a, "bf16"), a) and torch.equal(precsim.quantize(b, "bf16"), b)
    exact = nn.functional.linear(x, model.weight, model.bias)
    mean = torch.stack([model(x).detach() for _ in range(200)]).mean(0)
    ulp = precsim.quantize(exact, "bf16", rounding="toward_zero").abs() * 2.0**-7
    assert ((mean - exact).abs() <= 0.25 * ulp + 1e-12).float().mean() > 0.95  # unbiased
