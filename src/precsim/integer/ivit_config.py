"""ivit_config(model): the quantizers of I-ViT (Li & Gu, ICCV 2023) as a :func:`precsim.prepare` config.

I-ViT keeps every tensor that feeds a linear layer, a product or GELU at 8 bits (signed,
symmetric: its shift-based kernels assume zero point 0), weights at 8 bits per output channel,
and widens where precision is cheap and matters: the residual stream (the outputs of the
residual adds and of the position-embedding add, which are also LayerNorm's inputs) at 16 bits,
and the softmax output at 16 bits (unsigned, zero point 0). The model input gets an ``input``
quantizer on the module(s) it reaches first, so :func:`precsim.convert` knows its codes. The
logits are kept at 16 bits so that two close classes do not tie in argmax.

Module types, not names, select the nonlinear ops, so any model built from ``nn.Linear``,
``nn.LayerNorm``, ``nn.Softmax``, ``nn.GELU``, :class:`~precsim.qat.markers.MatMul` and
:class:`~precsim.qat.markers.Add` modules (the zoo ViT is) gets the same treatment.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from precsim.qat.graph import LAYOUT_FUNCS, LAYOUT_METHODS, trace

__all__ = ["ivit_config"]


def _first_modules(graph: torch.fx.Graph) -> list[str]:
    """Names of the modules the model input reaches first (through shape-only ops)."""
    frontier = list(next(n for n in graph.nodes if n.op == "placeholder").users)
    names: list[str] = []
    while frontier:
        node = frontier.pop(0)
        if node.op == "call_module":
            if str(node.target) not in names:
                names.append(str(node.target))
        elif node.op == "call_method" and node.target in LAYOUT_METHODS or (
                node.op == "call_function" and node.target in LAYOUT_FUNCS):
            frontier.extend(node.users)
    return names


def _last_module(graph: torch.fx.Graph) -> str | None:
    """The module whose output is the model output, if it is a module call."""
    out = next(n for n in graph.nodes if n.op == "output").args[0]
    return str(out.target) if getattr(out, "op", None) == "call_module" else None


def ivit_config(model: nn.Module, activation: Any = "int8", weight: Any = None, *, residual: Any = "int16",
                softmax: Any = "uint16", input: Any = "uint8", logits: Any = "int16",
                example_inputs: Any = None) -> dict[str, Any]:
    """A :func:`precsim.prepare` config with I-ViT's quantizers for ``model`` (role values as in a config).

    ``activation``: Linear/Conv, MatMul, LayerNorm and GELU outputs (default int8, symmetric);
    ``weight``: default int8 per output channel; ``residual``: outputs of ``Add`` modules (int16);
    ``softmax``: Softmax outputs (uint16); ``input``: the model input (uint8, affine: images
    are not centred); ``logits``: the output layer (int16). LayerNorm's affine weight stays
    float in the simulation: I-LayerNorm quantizes it to 16 bits itself. ``example_inputs``: a
    batch, to read the model's dataflow by torch.export instead of torch.fx (:func:`precsim.qat.graph.trace`).
    """
    graph = trace(model, example_inputs)
    weight = {"format": "int8", "granularity": "per_channel"} if weight is None else weight
    rules: list[dict[str, Any]] = [{"match": name, "input": input} for name in _first_modules(graph)]
    present = {type(m).__name__ for m in model.modules()}
    for type_name, role in (("MatMul", activation), ("GELU", activation), ("Softmax", softmax), ("Add", residual)):
        if type_name in present:
            rules.append({"type": type_name, "activation": role})
    if "LayerNorm" in present:
        rules.append({"type": "LayerNorm", "activation": activation, "weight": "fp32"})
    last = _last_module(graph)
    if last is not None:
        rules.append({"match": last, "activation": logits})
    return {"activation": activation, "weight": weight, "rules": rules}
