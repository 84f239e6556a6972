"""The module-level dataflow graph of a model, captured with ``torch.export``.

``torch.fx`` symbolic tracing fails on ``forward()`` code that branches on shapes or values of
its inputs, assigns into tensors or calls what fx cannot proxy. ``torch.export`` runs the
model's own Python on fake tensors and records every ATen op it reaches. :func:`capture` turns
that ATen graph back into the graph the walkers read (BN folding, bias quantization,
``integer_config``, ``ivit_config``, ``convert``): one ``call_module`` node per call of a leaf
module (one that computes, or carries quantizers: :class:`precsim.qat.graph.ModuleTracer`'s
leaves), and the ops between modules as the torch functions and tensor methods ``torch.fx``
records.

How module calls are found: while the model is captured, each leaf call's tensor inputs and
outputs pass through an identity op of precsim's own (``precsim::boundary``, tagged with the
call and the slot), so the ATen graph shows where each call begins and ends, even a call that
computes nothing (an Identity, a Dropout in eval, a QuantPoint). Quantizers are the identity
meanwhile (:data:`precsim.qat.quantizer.BYPASS`) and operand or accumulator points suspended:
the graph is the float model's, and capturing changes no state.

The batch axis (axis 0 of every input) is exported as a symbol, so reshapes keep it free: a
size computed from the batch becomes -1, as in code written for any batch size.
"""

from __future__ import annotations

import contextlib
import inspect
import operator
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from precsim.qat.leaves import ModuleTracer, own_children
from precsim.qat.operands import mode_of
from precsim.qat.quantizer import BYPASS

__all__ = ["capture", "float_model"]


@torch.library.custom_op("precsim::boundary", mutates_args=())
def _boundary(x: Tensor, tag: str) -> Tensor:
    """Identity that marks a leaf call's input or output slot in the captured graph (a copy:
    an op of a custom library may not return its input)."""
    return x.clone()


@_boundary.register_fake
def _(x: Tensor, tag: str) -> Tensor:
    return torch.empty_like(x)


@dataclass(frozen=True)
class _Slot:
    index: int


@dataclass
class _Call:
    """One call of a leaf: its arguments with each tensor replaced by its input slot."""

    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: int = 0  # tensors in its output
    tuple_output: bool = False
    sources: dict[int, Any] = field(default_factory=dict)  # input slot -> node of the new graph


def _leaves(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The leaf modules torch.fx would keep whole (outermost first), with their names."""
    tracer, found = ModuleTracer(), []

    def walk(prefix: str, module: nn.Module) -> None:
        for name, child in own_children(module):
            fqn = f"{prefix}.{name}" if prefix else name
            if tracer.is_leaf_module(child, fqn):
                found.append((fqn, child))
            else:
                walk(fqn, child)
    walk("", model)
    return found


@contextlib.contextmanager
def _marked(model: nn.Module, calls: list[_Call]) -> Iterator[None]:
    """Hooks that pass each leaf call's tensors through :func:`_boundary` (the pre-hook first
    and the hook last, so the leaf's quantizer hooks fall inside its call)."""
    handles, open_calls = [], []

    def enter(name: str, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        c = len(calls)
        flat, spec = tree_flatten((args, kwargs))
        record, new, slot = [], [], 0
        for v in flat:
            if isinstance(v, Tensor):
                record.append(_Slot(slot))
                new.append(torch.ops.precsim.boundary(v, f"in:{c}:{slot}"))
                slot += 1
            else:
                record.append(v)
                new.append(v)
        rec_args, rec_kwargs = tree_unflatten(record, spec)
        calls.append(_Call(name, tuple(rec_args), dict(rec_kwargs)))
        open_calls.append(c)
        return tree_unflatten(new, spec)

    def leave(module: nn.Module, args: Any, output: Any) -> Any:
        c = open_calls.pop()
        if isinstance(output, Tensor):
            calls[c].outputs = 1
            return torch.ops.precsim.boundary(output, f"out:{c}:0")
        if isinstance(output, (tuple, list)) and all(isinstance(o, Tensor) for o in output):
            calls[c].outputs, calls[c].tuple_output = len(output), True
            return type(output)(torch.ops.precsim.boundary(o, f"out:{c}:{i}") for i, o in enumerate(output))
        raise ValueError(f"capturing {calls[c].name!r}: a module output must be a tensor or a tuple of tensors, "
                         f"got {type(output).__name__}")

    try:
        for name, module in _leaves(model):
            handles.append(module.register_forward_pre_hook(
                lambda m, a, k, name=name: enter(name, m, a, k), with_kwargs=True, prepend=True))
            handles.append(module.register_forward_hook(leave))
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def float_model(model: nn.Module) -> Iterator[None]:
    """The model as a capture must see it: eval mode (each module's own flag restored after),
    no gradients, quantizers the identity, operand/accumulator points suspended."""
    mode = mode_of(model)
    suspended = mode.suspended if mode is not None else None
    token = BYPASS.set(True)
    modes = {m: m.training for m in model.modules()}  # each its own (a frozen BatchNorm stays in eval)
    model.eval()
    if mode is not None:
        mode.suspended = True
    try:
        with torch.no_grad():
            yield
    finally:
        if mode is not None:
            mode.suspended = suspended
        for m, training in modes.items():
            m.training = training
        BYPASS.reset(token)


def _inputs(model: nn.Module, example: Any) -> tuple[tuple[Any, ...], dict[str, Any], dict[str, Any]]:
    """(args, kwargs, dynamic shapes by parameter name) of ``example`` (a tensor, a tuple of
    positional inputs or a dict of keyword inputs), each batch of one made a batch of two (a
    batch of one would be exported as the constant 1)."""
    def two(v: Any) -> Any:
        return v.expand(2, *v.shape[1:]) if isinstance(v, Tensor) and v.dim() and v.shape[0] == 1 else v
    if isinstance(example, dict):
        args, kwargs = (), {k: two(v) for k, v in example.items()}
    else:
        args, kwargs = tuple(two(v) for v in (example if isinstance(example, (tuple, list)) else (example,))), {}
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except TypeError as err:
        raise ValueError(f"example inputs do not fit {type(model).__name__}.forward: {err}") from None
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    shapes = {k: {0: batch} if isinstance(v, Tensor) and v.dim() else None for k, v in bound.items()}
    return args, kwargs, shapes


def capture(model: nn.Module, example: Any) -> fx.Graph:
    """The module-level graph of ``model`` run on ``example`` (see the module doc).

    Raises ValueError with torch.export's reason when the model cannot be captured.
    """
    args, kwargs, shapes = _inputs(model, example)
    calls: list[_Call] = []
    try:
        with float_model(model), _marked(model, calls):
            program = torch.export.export(model, args, kwargs, dynamic_shapes=shapes, strict=False)
    except Exception as err:  # torch.export raises many types; say what failed and why
        first = str(err).splitlines()[0] if str(err) else ""
        raise ValueError(f"torch.export could not capture {type(model).__name__}: {type(err).__name__}: {first}") from err
    return _ModuleGraph(program, calls).build()


_A = torch.ops.aten
_RESHAPES = (_A.view.default, _A.reshape.default, _A._unsafe_view.default)
_METHODS = {_A.transpose.int: "transpose", _A.squeeze.dim: "squeeze", _A.unbind.int: "unbind",
            _A.sym_size.int: "size", _A.t.default: "t", _A.unflatten.int: "unflatten"}
_FUNCTIONS = {_A.add.Tensor: operator.add, _A.mul.Tensor: operator.mul, _A.div.Tensor: operator.truediv,
              _A.matmul.default: operator.matmul, _A.bmm.default: operator.matmul, _A.mm.default: operator.matmul,
              _A.relu.default: F.relu, _A.cat.default: torch.cat, _A.flatten.using_ints: torch.flatten}
_COPIES = (_A.clone.default, _A.alias.default, _A.contiguous.default, _A.detach.default)
_END = 1 << 62  # a slice end at or past this is "to the end"


class _ModuleGraph:
    """Builds the module-level graph from an exported program and the leaf calls it recorded."""

    def __init__(self, program: torch.export.ExportedProgram, calls: list[_Call]) -> None:
        self.program, self.calls = program, calls
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.module_nodes: dict[int, fx.Node] = {}  # call -> its call_module node
        self.inside: int | None = None

    def build(self) -> fx.Graph:
        targets = {s.arg.name: s for s in self.program.graph_signature.input_specs}
        for node in self.program.graph.nodes:
            if node.op == "placeholder":
                self.placeholder(node, targets[node.name])
            elif node.op == "output":
                outs = [self.value(o) for o in node.args[0]]
                self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
            elif node.target is torch.ops.precsim.boundary.default:
                self.boundary(node)
            elif self.inside is None:
                self.env[node] = self.translate(node)
        for n in reversed(list(self.graph.nodes)):  # what only a leaf used (its sizes, its constants)
            if not n.users and n.op in ("call_function", "call_method", "get_attr"):
                self.graph.erase_node(n)
        self.graph.lint()
        return self.graph

    def value(self, arg: Any) -> Any:
        return fx.node.map_arg(arg, lambda n: self.env[n])

    def placeholder(self, node: fx.Node, spec: Any) -> None:
        kind = spec.kind.name
        if kind == "USER_INPUT":
            self.env[node] = self.graph.placeholder(node.name)
        elif kind in ("PARAMETER", "BUFFER", "CONSTANT_TENSOR"):
            self.env[node] = self.graph.get_attr(spec.target)
        else:
            raise ValueError(f"capturing: an input of kind {kind} ({node.name}) is not supported")

    def boundary(self, node: fx.Node) -> None:
        side, c, slot = str(node.args[1]).split(":")
        call = self.calls[int(c)]
        if side == "in":
            call.sources[int(slot)] = self.env[node.args[0]]
            self.inside = int(c)
            return
        self.inside = None
        if int(slot) == 0:
            flat, spec = tree_flatten((call.args, call.kwargs))
            args, kwargs = tree_unflatten([call.sources[v.index] if isinstance(v, _Slot) else v for v in flat], spec)
            self.module_nodes[int(c)] = self.graph.call_module(call.name, tuple(args), dict(kwargs))
        module_node = self.module_nodes[int(c)]
        self.env[node] = self.graph.call_function(operator.getitem, (module_node, int(slot))) if (
            call.tuple_output) else module_node

    def translate(self, node: fx.Node) -> Any:
        """The torch-level op torch.fx would record for an ATen node between modules."""
        t, g = node.target, self.graph
        args, kwargs = self.value(node.args), self.value(node.kwargs)
        first = node.args[0] if node.args else None
        rank = first.meta["val"].dim() if isinstance(first, fx.Node) and isinstance(first.meta.get("val"), Tensor) else 0
        if node.op != "call_function":
            raise ValueError(f"capturing: unexpected graph node {node.format_node()}")
        if t in _RESHAPES:
            sizes = list(args[1])
            free = [i for i, s in enumerate(sizes) if not isinstance(s, int)]
            if len(free) == 1:
                sizes[free[0]] = -1  # the batch (or a size computed from it)
            out = g.call_method("reshape", (args[0], *sizes))
        elif t in _METHODS:
            out = g.call_method(_METHODS[t], tuple(args), kwargs)
        elif t is _A.permute.default:
            out = g.call_method("permute", (args[0], *args[1]))
        elif t is _A.expand.default:
            out = g.call_method("expand", (args[0], *args[1]))
        elif t is _A.select.int and isinstance(args[1], int):  # x[:, i] as torch.fx records it
            out = g.call_function(operator.getitem, (args[0], (*(slice(None),) * (args[1] % rank), args[2])))
        elif t is _A.unsqueeze.default:  # x[:, None]: indexing, which every lowering knows
            out = g.call_function(operator.getitem, (args[0], (*(slice(None),) * (args[1] % (rank + 1)), None)))
        elif t is _A.slice.Tensor:
            dim, start, end, step = (list(args[1:]) + [0, 0, None, 1][len(args) - 1:])[:4]
            key = slice(None if start == 0 else start, None if end is None or isinstance(end, int) and end >= _END
                        else end, None if step == 1 else step)
            out = g.call_function(operator.getitem, (args[0], (*(slice(None),) * dim, key)))
        elif t in _COPIES:  # a copy in any memory format holds the same values
            out = g.call_method("contiguous", (args[0],))
        elif t is _A.hardtanh.default and tuple(args[1:]) == (0.0, 6.0):
            out = g.call_function(F.relu6, (args[0],))
        elif t in _FUNCTIONS and not (t is _A.add.Tensor and kwargs.get("alpha", 1) != 1):
            out = g.call_function(_FUNCTIONS[t], tuple(args), {})
        else:  # operator.* on sizes, getitem, and ATen ops the walkers name in their errors
            out = g.call_function(t, tuple(args), kwargs)
        out.meta.update({k: node.meta[k] for k in ("stack_trace", "val") if k in node.meta})
        return out
