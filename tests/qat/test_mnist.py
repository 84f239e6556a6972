"""Proof 8: int8 QAT on real MNIST digits reaches FP32 accuracy (within 1 point)."""

from __future__ import annotations

import torch
from torch import nn

import precsim


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))


def _train(data, config, epochs: int = 2, batch: int = 64) -> float:
    x_train, y_train, x_test, y_test = data
    torch.manual_seed(0)
    model = _mlp()
    if config is not None:
        precsim.prepare(model, config, seed=0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    order = torch.Generator().manual_seed(0)  # same data order for both runs
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(x_train), generator=order)
        for i in range(0, len(x_train), batch):
            idx = perm[i:i + batch]
            opt.zero_grad()
            nn.functional.cross_entropy(model(x_train[idx]), y_train[idx]).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return (model(x_test).argmax(dim=1) == y_test).float().mean().item() * 100


def test_int8_qat_tracks_fp32_on_mnist(mnist5k) -> None:
    fp32 = _train(mnist5k, None)
    int8 = _train(mnist5k, {"activation": "int8", "weight": {"format": "int8", "granularity": "per_channel"}})
    assert fp32 > 85.0, fp32
    assert abs(int8 - fp32) <= 1.0, (fp32, int8)
