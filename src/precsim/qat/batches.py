"""How a batch reaches a model: a tensor, an ``(inputs, labels)`` pair, or a dict of keyword
inputs (Hugging Face style: ``{"input_ids": ..., "attention_mask": ...}``).

Every precsim function that feeds data to a model (``calibrate``, ``prepare``'s
``example_inputs``) goes through :func:`feed`, so they all accept the same batches.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["feed"]


def feed(model: nn.Module, batch: Any) -> Any:
    """``model`` applied to ``batch``: ``model(x)``, ``model(pair[0])`` or ``model(**inputs)``."""
    if isinstance(batch, Tensor):
        return model(batch)
    if isinstance(batch, dict) and batch and all(isinstance(k, str) for k in batch):
        return model(**batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], (Tensor, dict)):
        return feed(model, batch[0])
    raise TypeError(f"cannot feed a batch of type {type(batch).__name__} to the model; allowed: a tensor, "
                    "an (inputs, labels) pair, or a dict of keyword inputs such as {'input_ids': ...}")
