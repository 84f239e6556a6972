"""calibrate(): post-training quantization -- fill the observers from a few batches, no training.

PTQ needs ranges for every activation quantizer. In ``eval()`` the quantizers keep their
ranges fixed, and in ``train()`` BatchNorm would update its statistics and dropout would fire;
so the model runs in ``eval()`` under ``torch.no_grad()`` while a pre-hook on each activation
and input quantizer updates its observer (moving average, running min/max, ... as configured).
Weight quantizers need no data: their observers take the weights' own range.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from precsim.qat.batches import feed
from precsim.qat.config import QuantConfig
from precsim.qat.operands import discover, mode_of
from precsim.qat.prepare import prepare
from precsim.qat.quantizer import Quantizer

__all__ = ["calibrate"]


def _update_observer(q: Quantizer, args: tuple[Any, ...]) -> None:
    if q.observer is not None and args and isinstance(args[0], Tensor):
        q.observer.update(args[0].float())


def calibrate(model: nn.Module, loader: Iterable[Any], config: QuantConfig | dict[str, Any] | str | Path | None,
              batches: int = 32) -> nn.Module:
    """Prepare ``model`` with ``config`` (None: it is prepared already) and fill its observers.

    Runs at most ``batches`` batches from ``loader`` (tensors, ``(inputs, labels)`` pairs or
    dicts of keyword inputs) in ``eval()`` mode without gradients; BatchNorm statistics and
    weights do not change. Returns the model (prepared in place), in ``eval()`` mode and ready
    for :func:`precsim.convert`.
    """
    if batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    if config is not None:
        prepare(model, config)
    elif not any(isinstance(m, Quantizer) for m in model.modules()) and mode_of(model) is None:
        raise ValueError("calibrate: the model is not prepared; pass a config")
    model.eval()
    loader = iter(loader)
    first = next(loader, None)
    if first is None:
        raise ValueError("calibrate: the loader yielded no batches")
    discover(model, lambda: feed(model, first))  # operand points exist from the first forward pass on
    handles = [q.register_forward_pre_hook(_update_observer) for q in model.modules()
               if isinstance(q, Quantizer) and q.role in ("activation", "input") and q.observer is not None]
    try:
        with torch.no_grad():
            for batch in itertools.islice(itertools.chain([first], loader), batches):
                feed(model, batch)
    finally:
        for h in handles:
            h.remove()
    return model
