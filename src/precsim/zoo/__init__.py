"""Model zoo and bundled datasets for precision experiments.

Models are built module-per-op (see :mod:`precsim.zoo.models`) so quantizers can
attach to every intermediate result; datasets load from local files only.
:func:`train_steps` is the short seeded Adam loop the tests and benchmarks train
them with.
"""

from precsim.qat.markers import Add, MatMul
from precsim.zoo.data import DATASETS, load_dataset
from precsim.zoo.models import MLP, MODELS, ResNet, ViT, get_model
from precsim.zoo.training import train_steps

__all__ = [
    "MODELS",
    "DATASETS",
    "get_model",
    "load_dataset",
    "train_steps",
    "Add",
    "MatMul",
    "MLP",
    "ResNet",
    "ViT",
]
