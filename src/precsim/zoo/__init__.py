"""Model zoo and bundled datasets for precision experiments.

Models are built module-per-op (see :mod:`precsim.zoo.models`) so quantizers can
attach to every intermediate result; datasets load from local files only.
"""

from precsim.zoo.data import DATASETS, load_dataset
from precsim.zoo.layers import Add, MatMul
from precsim.zoo.models import MLP, MODELS, ResNet, ViT, get_model

__all__ = [
    "MODELS",
    "DATASETS",
    "get_model",
    "load_dataset",
    "Add",
    "MatMul",
    "MLP",
    "ResNet",
    "ViT",
]
