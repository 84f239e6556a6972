"""capture(model, inputs): the model's dataflow as a ``torch.export`` graph of ATen ops.

``torch.fx`` symbolic tracing fails on real models (Hugging Face encoders assign into proxies,
branch on shapes and take keyword inputs); ``torch.export`` runs the model's Python on fake
tensors and records every ATen op it reaches, with the module each op ran in
(``node.meta["nn_module_stack"]``). The batch and sequence axes of every input are exported as
symbols, so the graph (and the integer model lowered from it) serves any batch size and any
sequence length up to the model's own limit.

The prepared model runs with its points suspended while it is captured: the graph is the float
model's, and :mod:`precsim.integer.lower` reads each point's settings from the module that
holds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from precsim.qat.module_graph import float_model

__all__ = ["capture"]


def capture(model: nn.Module, inputs: Mapping[str, Tensor]) -> torch.export.ExportedProgram:
    """The ATen graph of ``model(**inputs)`` (in eval mode, points suspended), with dynamic
    batch (axis 0) and sequence (axis 1) sizes for every input of two or more axes.

    Raises ValueError naming the input when ``inputs`` is not a mapping of tensors, and
    RuntimeError with torch.export's own reason when the model cannot be captured.
    """
    if not isinstance(inputs, Mapping) or not all(isinstance(v, Tensor) for v in inputs.values()):
        raise ValueError("capture needs the model's inputs as a dict of tensors (keyword inputs), e.g. "
                         "{'input_ids': ..., 'attention_mask': ...}")
    batch = torch.export.Dim("batch", min=1, max=1 << 16)
    seq = torch.export.Dim("sequence", min=2, max=_max_positions(model))
    shapes: dict[str, Any] = {}
    for name, t in inputs.items():
        dims: dict[int, Any] = {}
        if t.dim() >= 1 and t.shape[0] > 1:
            dims[0] = batch
        if t.dim() >= 2 and t.shape[1] > 1:
            dims[1] = seq
        shapes[name] = dims or None
    try:
        with float_model(model):
            return torch.export.export(model, (), dict(inputs), dynamic_shapes=shapes, strict=False)
    except Exception as err:  # torch.export raises many types; say what failed and why
        raise RuntimeError(f"torch.export could not capture {type(model).__name__}: {type(err).__name__}: "
                           f"{str(err).splitlines()[0] if str(err) else ''}") from err


def _max_positions(model: nn.Module) -> int:
    """The longest sequence the model accepts (a Hugging Face config's max_position_embeddings)."""
    for m in model.modules():
        n = getattr(getattr(m, "config", None), "max_position_embeddings", None)
        if isinstance(n, int) and n >= 2:
            return n
    return 1 << 16
