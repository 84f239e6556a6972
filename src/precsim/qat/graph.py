"""The dataflow between a model's modules, as a module-level torch.fx graph.

Leaves are the modules that compute (own no sub-modules) or carry quantizers. BN folding, bias
quantization, ``integer_config``, ``ivit_config`` and ``convert`` all read the model through
:func:`trace`: captured with ``torch.export`` when example inputs are given
(:mod:`precsim.qat.module_graph`: real models' Python survives it), else by torch.fx symbolic
tracing (no inputs needed, but no data-dependent Python).

It also holds the rules for walking that graph: which ops keep integer codes and their scale,
and how a constant factor rescales them. :mod:`precsim.qat.bias` follows them upstream to find
the quantizer behind a layer's input; :func:`precsim.convert` lowers the same ops without
requantizing (the subset it has integer kernels for). Both read the definitions here.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from precsim.qat.leaves import ModuleTracer, own_children
from precsim.qat.markers import QuantPoint
from precsim.qat.module_graph import capture

__all__ = ["DIV_FUNCS", "IDENTITY_MODULES", "KEEP_CODES_FUNCS", "KEEP_CODES_METHODS", "KEEP_CODES_MODULES",
           "LAYOUT_FUNCS", "LAYOUT_METHODS", "LAYOUT_MODULES", "MAXPOOL_FUNCS", "MAXPOOL_MODULES", "MUL_FUNCS",
           "RELU_FUNCS", "RELU_METHODS", "RELU_MODULES", "ModuleTracer", "constant_factor", "own_children", "trace"]


def trace(model: nn.Module, example_inputs: Any = None) -> fx.Graph:
    """The module-level dataflow graph of ``model``: from ``torch.export`` on ``example_inputs``
    (a batch: a tensor, a tuple of positional inputs or a dict of keyword inputs) when given,
    else (or where torch.export fails) from torch.fx symbolic tracing; a clear error with each
    capture's reason if neither can."""
    exported = None
    if example_inputs is not None:
        try:
            return capture(model, example_inputs)
        except ValueError as err:
            exported = err
    try:
        return ModuleTracer().trace(model)
    except Exception as err:  # fx raises many types (TraceError, TypeError, ...)
        hint = (f" And {exported}" if exported is not None else " Give example inputs (a batch; example_inputs= "
                "for prepare, integer_config and ivit_config, example= for convert) so that torch.export captures "
                "it instead.")
        raise ValueError(f"precsim needs the dataflow of {type(model).__name__} and torch.fx cannot trace it: "
                         f"{type(err).__name__}: {err}.{hint}") from (exported or err)


# --------------------------------------------------------------------------------------------
# Walking the graph: the ops that keep codes and scale
# --------------------------------------------------------------------------------------------
# A quantized tensor is integer codes with a scale and zero point. These ops move, pick or clamp
# the codes of their first argument and compute no new values, so what leaves them has the same
# scale and zero point (a ReLU clamp and a max keep the grid too). ``torch.cat`` keeps them only
# when its inputs share one scale; the walkers check that case themselves.

IDENTITY_MODULES: tuple[type[nn.Module], ...] = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                                                 nn.Dropout3d)
"""Modules that return their input unchanged in eval (dropout is the identity there)."""
LAYOUT_MODULES: tuple[type[nn.Module], ...] = (nn.Flatten, nn.Unflatten)
"""Modules that only change the shape of the codes."""
MAXPOOL_MODULES: tuple[type[nn.Module], ...] = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d)
"""Max pooling: picks one code per window, so the grid is unchanged."""
RELU_MODULES: tuple[type[nn.Module], ...] = (nn.ReLU, nn.ReLU6)
"""ReLU clamps: a clamp of codes on the grid stays on it."""
KEEP_CODES_MODULES: tuple[type[nn.Module], ...] = (*IDENTITY_MODULES, QuantPoint, *LAYOUT_MODULES,
                                                   *MAXPOOL_MODULES, *RELU_MODULES)
"""Every module that keeps codes and scale (a :class:`QuantPoint` is the identity until it quantizes)."""

LAYOUT_FUNCS = (torch.flatten, torch.reshape, torch.squeeze, torch.unsqueeze, torch.transpose, torch.permute,
                torch.unflatten, torch.unbind, torch.chunk, torch.split, torch.narrow, torch.select,
                operator.getitem)
"""Functions whose result is the first argument's codes (or pieces of them), reshaped or indexed."""
MAXPOOL_FUNCS = (F.max_pool1d, F.max_pool2d, F.max_pool3d)
"""Functional max pooling (see :data:`MAXPOOL_MODULES`)."""
RELU_FUNCS = {F.relu: None, torch.relu: None, F.relu6: 6.0}
"""Functional ReLU clamps, each with its upper bound (None: none), which an integer clamp needs."""
KEEP_CODES_FUNCS = (*LAYOUT_FUNCS, *RELU_FUNCS, *MAXPOOL_FUNCS)
"""Every function that keeps codes and scale."""

LAYOUT_METHODS = ("flatten", "view", "reshape", "contiguous", "squeeze", "unsqueeze", "transpose", "permute", "t",
                  "unflatten", "unbind", "chunk", "split", "narrow", "select", "expand")
"""Tensor methods that only reshape, index or broadcast the codes."""
RELU_METHODS = ("relu",)
"""The ReLU clamp as a tensor method."""
KEEP_CODES_METHODS = (*LAYOUT_METHODS, *RELU_METHODS)
"""Every tensor method that keeps codes and scale."""

MUL_FUNCS = (operator.mul, torch.mul)
"""Multiplication: by a positive constant it keeps the codes and scales the scale (:func:`constant_factor`)."""
DIV_FUNCS = (operator.truediv, torch.div)
"""Division: by a positive constant it keeps the codes and divides the scale (:func:`constant_factor`)."""


def constant_factor(node: fx.Node) -> tuple[fx.Node, float] | None:
    """``(x, f)`` for ``x * c``, ``c * x`` (f = c) or ``x / c`` (f = 1/c) with ``c`` a positive constant number.

    Such a node keeps the codes of ``x`` and multiplies their scale by ``f``: the bias walker
    carries ``f`` into ``S_in``, and convert folds it into the scale (or a product's multiplier).
    None for anything else: another op, a tensor or negative factor, ``c / x``, keyword arguments.
    """
    if node.op != "call_function" or node.kwargs or len(node.args) != 2:
        return None
    divide = node.target in DIV_FUNCS
    if not (divide or node.target in MUL_FUNCS):
        return None
    x, c = node.args
    if not divide and not isinstance(x, fx.Node):
        x, c = c, x
    if not isinstance(x, fx.Node) or isinstance(c, bool) or not isinstance(c, (int, float)) or not c > 0:
        return None
    return x, 1.0 / float(c) if divide else float(c)
