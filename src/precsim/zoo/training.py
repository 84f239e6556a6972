"""A quick seeded training loop for the zoo models (used by the tests, benchmarks and examples)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

__all__ = ["train_steps"]


def train_steps(model: nn.Module, data: TensorDataset, steps: int, lr: float, seed: int,
                batch_size: int = 64) -> None:
    """Train ``model`` for ``steps`` Adam steps on ``data`` with the cross-entropy loss.

    The quick, reproducible loop the tests and benchmarks share: ``data`` is shuffled by a
    :class:`torch.Generator` seeded with ``seed`` (epochs repeat until ``steps`` batches are
    done), a fresh ``torch.optim.Adam(model.parameters(), lr=lr)`` with no schedule, and the
    model is put in training mode first and left there: call ``model.eval()`` afterwards.
    Works for float and prepared (quantization-aware) models alike.
    """
    loader = DataLoader(data, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            loss = nn.functional.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                return
