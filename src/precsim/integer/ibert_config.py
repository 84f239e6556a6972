"""ibert_config(model): I-BERT's quantizers (Kim et al., ICML 2021) for a BERT-family encoder, as a
:func:`precsim.prepare` config with operand points.

Every GEMM operand is 8 bits: weights int8 per output channel, the activations that enter a
Linear int8, attention's q, k, P and v uint8 (affine: q, k and v are not centred, and P lies in
[0, 1]). The nonlinear ops get output points, as an integer pipeline rounds there: LayerNorm and
GELU int8, and the residual stream (every residual add, the embedding sums) int16, the input
width I-LayerNorm is built for. Embedding tables are int8 per tensor.

A Linear whose input already is a point's output (a LayerNorm, GELU or add) gets no input point
of its own, so every tensor is rounded once, where the integer model rounds it. Which those are
comes from the model's ``torch.export`` graph (:func:`precsim.integer.capture.capture`), not from
module names, so any encoder built from Linear, LayerNorm, GELU and SDPA attention gets the same
treatment.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from precsim.integer.capture import capture

__all__ = ["ibert_config"]

_aten = torch.ops.aten
_POINTED = {_aten.layer_norm.default: "layer_norm", _aten.gelu.default: "gelu", _aten.add.Tensor: "add",
            _aten.embedding.default: "embedding"}  # ops whose output is already a point's
_LAYOUT = {"view", "reshape", "_unsafe_view", "transpose", "permute", "contiguous", "dropout", "clone", "alias",
           "unsqueeze", "flatten", "expand", "select", "slice"}


def _producer(node: Any) -> Any:
    """The op that made ``node``'s value, looking through layout ops and dropout."""
    while getattr(node, "op", None) == "call_function" and str(node.target.__name__).split(".")[0] in _LAYOUT:
        node = node.args[0]
    return node


def _linear_inputs_to_quantize(model: nn.Module, inputs: dict[str, Tensor]) -> list[str]:
    """The Linear modules whose input is not already a point's output (e.g. attention's output projection)."""
    graph = capture(model, inputs).graph_module.graph
    names: list[str] = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target is not _aten.linear.default:
            continue
        src = _producer(node.args[0])
        if getattr(src, "target", None) in _POINTED:
            continue
        stack = node.meta.get("nn_module_stack") or {}
        fqn = str(list(stack.values())[-1][0]) if stack else ""
        if fqn not in names:
            names.append(fqn)
    return names


def ibert_config(model: nn.Module, example_inputs: dict[str, Tensor] | None = None, *, activation: Any = "int8",
                 weight: Any = None, attention: Any = "uint8", residual: Any = "int16",
                 embedding: Any = "int8", layer_norm: Any = None, gelu: Any = None) -> dict[str, Any]:
    """A :func:`precsim.prepare` config with I-BERT's quantizers for ``model`` (role values as in a config).

    ``example_inputs``: keyword inputs the model can run (default: two 8-token rows of token id 0,
    all attended); only the graph is read from them. ``activation``: Linear inputs, LayerNorm
    and GELU outputs (int8); ``weight``: default int8 per output channel; ``attention``: q, k,
    P, v (uint8); ``residual``: residual adds and embedding sums (int16); ``embedding``: the
    tables (int8, per tensor); ``layer_norm``/``gelu``: their outputs, and so the inputs of the
    Linear layers they feed (default: ``activation``; ``"int16"`` for both is what MiniLM needs to
    meet 0.99 cosine to FP32, docs/ibert.md).
    """
    weight = {"format": "int8", "granularity": "per_channel"} if weight is None else weight
    if example_inputs is None:
        example_inputs = {"input_ids": torch.zeros(2, 8, dtype=torch.long),
                          "attention_mask": torch.ones(2, 8, dtype=torch.long)}
    rules: list[dict[str, Any]] = [{"op": "linear", "activation": "fp32"}]
    rules += [{"match": name, "op": "linear", "activation": activation}
              for name in _linear_inputs_to_quantize(model, example_inputs)]
    rules += [{"op": "attention", "activation": attention}, {"op": "embedding", "weight": embedding},
              {"op": "add", "activation": residual}, {"op": "layer_norm", "activation": activation if layer_norm is None else layer_norm},
              {"op": "gelu", "activation": activation if gelu is None else gelu}]
    return {"points": "operands", "activation": activation, "weight": weight, "rules": rules}
