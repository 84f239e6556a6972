"""Operand points (``points: operands``): every floating operand of every GEMM a model runs.

Hardware rounds what enters its matrix units, not what leaves a module. So here each operand
of each GEMM-like call executed inside a prepared model is a quantization point: ``F.linear``
(``nn.Linear``), ``conv1d/2d/3d``, ``matmul``/``@``/``mm``/``bmm``/``addmm``/``baddbmm``,
``einsum``, and ``F.scaled_dot_product_attention`` computed as its two GEMMs (``q k^T`` and
``P v``, the softmax output P an operand). Module parameters (and views of them) take the
``weight`` role, every other operand ``activation``; their gradients ``weight_gradient`` and
``gradient``. Rules naming a non-GEMM op (softmax, gelu, silu, layer_norm, rms_norm, add of two
float tensors of one shape, or of one broadcast over leading batch axes such as a position
embedding) add a point on its output; a rule naming ``embedding`` adds a ``weight`` point on
the table of ``F.embedding`` (what an integer model stores).

How it sees functional code without editing the model: a :class:`torch.overrides.TorchFunctionMode`
active only while the prepared model (or any of its modules) runs, entered and left by module
hooks, which also keep the stack of running modules so that each call is charged to the
innermost one. Nothing in torch's namespace is replaced.

A point is named by its module, op kind, the op's index among that module call's ops of that
kind, and the operand: ``encoder.layer.0.attention.self.precsim_operands.attention_0_p``. Points
are created on first use (a model's calls are known only when it runs): on the first forward
pass, on :func:`discover` (``prepare(..., example_inputs=...)``, ``calibrate``), or when a
``state_dict`` that holds them is loaded. Wrap a model in DDP after one of these, so that DDP
sees their buffers.

Block formats (MX, NVFP4) group each operand along the axis its GEMM reduces: the last axis of
``a`` and axis -2 of ``b`` in ``a @ b``, in_features for Linear, input channels for conv (axis 1),
the head dimension of q and k, the key axis of P and v; the gradient w.r.t. an operand is
blocked along the same axis as the operand (``block_axis: last`` keeps the format's own axis,
as for module outputs).

Accumulators (``accumulator``, :mod:`precsim.qat.accumulator`): the same mode runs each GEMM
call that has one (linear, conv, matmul-like, attention's two GEMMs) with its simulated
accumulator, an :class:`Accumulator` point named ``<op>_<k>_acc`` next to the operand points.
With ``points: outputs`` the mode is installed too, on the Linear/Conv modules an accumulator
selects only (``OperandPoints(..., operands=False)``): it rounds no operand, and runs their
GEMM calls with the module's ``precsim_accumulator``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import zlib
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from precsim.formats import parse_format
from precsim.formats.random import mix_seed
from precsim.qat.accumulator import INPUT_SOURCE, Accumulator, Grid, accumulated_call, attention_matmul
from precsim.qat.config import ACCUMULATED_OPS, GEMM_OPS, AccumulatorSpec, QuantConfig, RoleSpec
from precsim.qat.fingerprint import EXTRA_STATE, decode
from precsim.qat.quantizer import Quantizer
from precsim.runtime.backend import blocked

CONTAINER = "precsim_operands"  # the ModuleDict child that holds a module's operand points
ACCUMULATOR = "precsim_accumulator"  # points: outputs: a Linear/Conv module's Accumulator child
ACC_OPERAND = "acc"  # points: operands: the key of a GEMM call's Accumulator is <op>_<k>_acc
POINT_KEY = re.compile(r"^(?P<op>[a-z_]+?)_(?P<k>\d+)_(?P<operand>[a-z0-9]+)$")

# A point's quantizer, or None where the config leaves that operand in float32.
Point = Callable[[str, Tensor, "int | None"], Tensor]


# --- which calls are GEMMs, and where their operands are -------------------------------------
def _last(t: Tensor) -> int:
    return -1


def _rows(t: Tensor) -> int:
    """``b`` of ``a @ b``: its K is axis -2 (axis -1 of a vector)."""
    return -2 if t.dim() >= 2 else -1


def _channels(t: Tensor) -> int:
    return 1


# func -> (op kind, ((argument position, keyword, operand name, reduction axis), ...))
_Operand = tuple[int, str, str, Callable[[Tensor], int]]
_LINEAR = ((0, "input", "input", _last), (1, "weight", "weight", _last))
_CONV = ((0, "input", "input", _channels), (1, "weight", "weight", _channels))
_MATMUL = ((0, "input", "a", _last), (1, "other", "b", _rows))
_MM = ((0, "input", "a", _last), (1, "mat2", "b", _rows))
_ADDMM = ((1, "mat1", "a", _last), (2, "mat2", "b", _rows))
_BADDBMM = ((1, "batch1", "a", _last), (2, "batch2", "b", _rows))
GEMMS: dict[Any, tuple[str, tuple[_Operand, ...]]] = {
    F.linear: ("linear", _LINEAR),
    torch.conv1d: ("conv", _CONV), torch.conv2d: ("conv", _CONV), torch.conv3d: ("conv", _CONV),
    torch.matmul: ("matmul", _MATMUL), torch.Tensor.matmul: ("matmul", _MATMUL),
    torch.Tensor.__matmul__: ("matmul", _MATMUL),
    torch.Tensor.__rmatmul__: ("matmul", ((1, "other", "a", _last), (0, "self", "b", _rows))),
    torch.mm: ("matmul", _MM), torch.Tensor.mm: ("matmul", _MM),
    torch.bmm: ("matmul", _MM), torch.Tensor.bmm: ("matmul", _MM),
    torch.addmm: ("matmul", _ADDMM), torch.Tensor.addmm: ("matmul", _ADDMM),
    torch.baddbmm: ("matmul", _BADDBMM), torch.Tensor.baddbmm: ("matmul", _BADDBMM),
}
# non-GEMM ops whose output is a point where a rule names the op
OUTPUTS: dict[Any, str] = {
    F.softmax: "softmax", torch.softmax: "softmax", torch.Tensor.softmax: "softmax",
    F.gelu: "gelu", F.silu: "silu", F.layer_norm: "layer_norm", F.rms_norm: "rms_norm",
    torch.add: "add", torch.Tensor.add: "add", torch.Tensor.__add__: "add", torch.Tensor.__radd__: "add",
}


def einsum_axes(equation: str) -> list[int | None]:
    """The reduction axis of each einsum operand: its last subscript that is summed (absent from
    the output); None where the operand has none (an outer product's factor)."""
    eq = equation.replace(" ", "")
    lhs, _, out = eq.partition("->")
    terms = lhs.split(",")
    if "->" not in eq:  # implicit output: the subscripts that appear once, in order
        letters = [c for c in lhs if c.isalpha()]
        out = "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    axes: list[int | None] = []
    for term in terms:
        summed = [i for i, c in enumerate(term) if c.isalpha() and c not in out]
        if not summed:
            axes.append(None)
            continue
        i = summed[-1]
        dots = term.find("...")
        # a subscript after "..." counts from the end, since "..." stands for any number of axes
        axes.append(i - len(term) if 0 <= dots < i else i)
    return axes


def _is_weight(t: Tensor) -> bool:
    """A module parameter, or a view of one (``w.t()``): the weight role."""
    return isinstance(t, nn.Parameter) or isinstance(getattr(t, "_base", None), nn.Parameter)


def _is_float(t: Any) -> bool:
    return isinstance(t, Tensor) and t.is_floating_point()


# --- the points of one running module --------------------------------------------------------
@dataclasses.dataclass
class _Frame:
    module: nn.Module
    name: str
    types: tuple[str, ...]
    counts: dict[str, int] = dataclasses.field(default_factory=dict)


class OperandPoints(TorchFunctionMode):
    """Quantizes the operands of GEMM calls made while a prepared model runs (see module doc)."""

    def __init__(self, config: QuantConfig, seed: int, operands: bool = True) -> None:
        super().__init__()
        self.config, self.seed = config, seed
        self.operands = operands  # False: points: outputs, only accumulators (module precsim_accumulator)
        self.accumulating = config.has_accumulators  # no accumulator anywhere: no lookup per GEMM call
        self.stack: list[_Frame] = []
        self.discovering = False  # create points, round nothing (prepare's example_inputs, calibrate)
        self.skipped: set[tuple[str, str]] = set()  # (module, key) the config leaves in float32
        self.suspended = False  # the model runs in plain float32 (graph capture: precsim.integer.capture)

    # module hooks: the stack of running modules; the mode is active while it is not empty. The
    # name travels with the hook (a partial), so a deep copy of the model keeps its names.
    def enter(self, name: str, module: nn.Module, args: Any) -> None:
        if self.suspended:
            return
        if not self.stack:
            self.__enter__()
        mro = tuple(c.__name__ for c in type(module).__mro__)
        self.stack.append(_Frame(module, name, mro))

    def leave(self, module: nn.Module, args: Any, output: Any) -> None:
        if self.stack and self.stack[-1].module is module:
            self.stack.pop()
            if not self.stack:
                self.__exit__(None, None, None)

    # the points
    def spec_for(self, frame_name: str, types: tuple[str, ...], op: str, role: str) -> tuple[RoleSpec | None, ...]:
        """(spec, gradient spec) of a point: the global roles, then every rule that selects it, in
        order. An output op (softmax, ...) takes part only from a rule that names its op on."""
        cfg = self.config
        grad_role = "weight_gradient" if role == "weight" else "gradient"
        selected = op in GEMM_OPS
        spec, grad = cfg.roles.get(role), cfg.roles.get(grad_role)
        for rule in cfg.rules:
            if not rule.selects(frame_name, types, op):
                continue
            if not rule.ops and not selected:
                continue  # a rule without op changes an output op's point but does not add one
            selected = True
            spec, grad = rule.roles.get(role, spec), rule.roles.get(grad_role, grad)
        return (spec, grad) if selected else (None, None)

    def accumulator_specs(self, frame_name: str, types: tuple[str, ...], op: str) -> tuple[AccumulatorSpec | None, ...]:
        """(accumulator, gradient accumulator) of a GEMM call: the global keys, then every rule
        that selects it, in order."""
        if op not in ACCUMULATED_OPS:
            return None, None
        return self.config.accumulators_for(frame_name, types, op)

    def accumulator(self, frame: _Frame, op: str, index: int) -> Accumulator | None:
        """The accumulator of a GEMM call (created on first use; points: operands), or None."""
        if not self.accumulating:
            return None
        if not self.operands:
            acc = getattr(frame.module, ACCUMULATOR, None)
            return acc if isinstance(acc, Accumulator) and acc.spec is not None else None
        key = f"{op}_{index}_{ACC_OPERAND}"
        acc = self._made(frame, key, lambda: self.create_accumulator(frame.module, frame.name, key,
                                                                     _device(frame.module)))
        return acc if acc is not None and acc.spec is not None else None  # type: ignore[return-value]

    def _made(self, frame: _Frame, key: str, make: Callable[[], nn.Module | None]) -> Any:
        """Point ``key`` of the frame's module: the one it holds, or ``make()``'s (None, and not
        asked again, where the config leaves it in float32)."""
        points = getattr(frame.module, CONTAINER, None)
        found = points[key] if points is not None and key in points else None
        if found is None and (frame.name, key) not in self.skipped:
            found = make()
            if found is None:
                self.skipped.add((frame.name, key))
        return found

    def create_accumulator(self, module: nn.Module, name: str, key: str, device: torch.device) -> Accumulator | None:
        """The Accumulator of point ``key`` (``<op>_<k>_acc``) of ``module`` (None: the config gives it none)."""
        op = POINT_KEY.match(key)
        assert op is not None, key
        types = tuple(c.__name__ for c in type(module).__mro__)
        spec, grad = self.accumulator_specs(name, types, op["op"])
        if spec is None and grad is None:
            return None
        qualified = f"{name}.{key}" if name else key
        acc = Accumulator(spec, grad, seed=mix_seed(self.seed, zlib.crc32(qualified.encode())))
        acc.train(module.training)
        if not hasattr(module, CONTAINER):
            module.add_module(CONTAINER, nn.ModuleDict())
        getattr(module, CONTAINER)[key] = acc.to(device)
        return acc

    def grids(self, frame: _Frame, op: str, index: int, operands: tuple[str, ...]) -> tuple[list[Grid | None], tuple[int, int]]:
        """The integer grids (scale, zero point) the operands of a GEMM call were rounded on, in
        the call's operand order, and their code widths: the operand points (points: operands),
        or the module's ``input`` point and weight (points: outputs)."""
        folded = weight = None
        if self.operands:
            points = getattr(frame.module, CONTAINER, None)
            quantizers = [points[k] if points is not None and (k := f"{op}_{index}_{o}") in points else None
                          for o in operands]
        else:
            weight = getattr(getattr(frame.module, "parametrizations", None), "weight", None)
            quantizers = [getattr(frame.module, "precsim_input", None), weight[0] if weight is not None else None]
            if hasattr(quantizers[1], "weight_grid"):  # a BN-folded weight (qat/fold.FoldedWeight): its quantizer
                folded, quantizers[1] = quantizers[1], quantizers[1].quant  # type: ignore[union-attr]
        source = None if self.operands or quantizers[0] is not None else frame.module.__dict__.get(INPUT_SOURCE)
        if source is not None:  # no input point: the upstream point int32 biases found (qat/bias.py)
            quantizers[0] = source[0]
        grids = [q.grid if isinstance(q, Quantizer) and q.observer is not None else None for q in quantizers]
        if source is not None and grids[0] is not None:
            grids[0] = (grids[0][0] * math.prod(source[1]), grids[0][1])
        if folded is not None and grids[1] is not None:  # the codes the conv multiplies, at S_w / s per channel
            grids[1] = folded.weight_grid(weight.original)  # type: ignore[union-attr]
        bits = tuple(getattr(q.spec.format, "bits", 16) if g is not None else 16  # type: ignore[union-attr]
                     for q, g in zip(quantizers, grids, strict=True))
        return grids, bits  # type: ignore[return-value]

    def point(self, frame: _Frame, op: str, index: int, operand: str, x: Tensor, axis: int | None) -> Tensor:
        """``x`` rounded at the point (created on first use), or ``x`` where there is none."""
        key = f"{op}_{index}_{operand}"
        role = "weight" if _is_weight(x) else "activation"
        q = self._made(frame, key, lambda: self.create(frame.module, frame.name, key, role, x.dim(), axis, x.device))
        return x if q is None or self.discovering else q(x)

    def create(self, module: nn.Module, name: str, key: str, role: str, ndim: int | None, axis: int | None,
               device: torch.device) -> Quantizer | None:
        """The quantizer of point ``key`` of ``module`` (None: fp32 there), added as its child."""
        op = POINT_KEY.match(key)
        assert op is not None, key
        types = tuple(c.__name__ for c in type(module).__mro__)
        spec, grad = self.spec_for(name, types, op["op"], role)
        if spec is None and grad is None:
            return None
        if axis is not None and self.config.block_axis == "reduction":  # the gradient is blocked like its operand
            spec = None if spec is None else along(spec, axis, ndim)
            grad = None if grad is None else along(grad, axis, ndim)
        qualified = f"{name}.{key}" if name else key
        q = Quantizer(role, spec, grad, seed=mix_seed(self.seed, zlib.crc32(qualified.encode())))
        q.train(module.training)
        if not hasattr(module, CONTAINER):
            module.add_module(CONTAINER, nn.ModuleDict())
        points: nn.ModuleDict = getattr(module, CONTAINER)
        points[key] = q.to(device)
        return q

    # the mode
    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if not self.stack:
            return func(*args, **kwargs)
        frame = self.stack[-1]
        gemm = GEMMS.get(func)
        if gemm is not None:
            return self._gemm(frame, func, gemm, args, kwargs)
        if not self.operands:
            return func(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            index = frame.counts.get("attention", 0)  # the index _pointer takes
            acc = self.accumulator(frame, "attention", index)
            matmul = torch.matmul if acc is None or self.discovering else attention_matmul(
                acc, lambda names: self.grids(frame, "attention", index, names))
            return attention(self._pointer(frame, "attention"), *args, matmul=matmul, **kwargs)
        if func is torch.einsum:
            return self._einsum(frame, args)
        if func is F.embedding and len(args) >= 2 and _is_float(args[1]):
            index = self._next(frame, "embedding")
            table = self.point(frame, "embedding", index, "weight", args[1], None)
            return func(args[0], table, *args[2:], **kwargs)
        op = OUTPUTS.get(func)
        if op is not None and (op != "add" or _residual_add(args)):
            index = self._next(frame, op)
            out = func(*args, **kwargs)
            return self.point(frame, op, index, "output", out, None) if _is_float(out) else out
        return func(*args, **kwargs)

    @staticmethod
    def _next(frame: _Frame, op: str) -> int:
        index = frame.counts.get(op, 0)
        frame.counts[op] = index + 1
        return index

    def _pointer(self, frame: _Frame, op: str) -> Point:
        index = self._next(frame, op)
        return lambda operand, x, axis: self.point(frame, op, index, operand, x, axis)

    def _gemm(self, frame: _Frame, func: Any, gemm: tuple[str, tuple[_Operand, ...]], args: tuple[Any, ...],
              kwargs: dict[str, Any]) -> Any:
        op, operands = gemm
        index = self._next(frame, op)
        args, kwargs = list(args), dict(kwargs)
        if self.operands:
            for pos, keyword, operand, axis in operands:
                if pos < len(args) and _is_float(args[pos]):
                    args[pos] = self.point(frame, op, index, operand, args[pos], axis(args[pos]))
                elif pos >= len(args) and _is_float(kwargs.get(keyword)):
                    kwargs[keyword] = self.point(frame, op, index, operand, kwargs[keyword], axis(kwargs[keyword]))
        acc = self.accumulator(frame, op, index)
        if acc is None or self.discovering or not all(
                _is_float(args[p] if p < len(args) else kwargs.get(k)) for p, k, _, _ in operands):
            return func(*args, **kwargs)
        grids, bits = self.grids(frame, op, index, tuple(o for _, _, o, _ in operands)) if acc.integer else (None,
                                                                                                             (16, 16))
        return accumulated_call(acc, op, func, tuple(args), kwargs, grids, bits)

    def _einsum(self, frame: _Frame, args: tuple[Any, ...]) -> Any:
        equation, *rest = args
        tensors = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)
        if len(tensors) < 2 or not all(_is_float(t) for t in tensors):
            return torch.einsum(equation, *tensors)
        index = self._next(frame, "einsum")
        axes = einsum_axes(equation)
        if len(axes) != len(tensors):
            return torch.einsum(equation, *tensors)  # torch says what is wrong
        tensors = [self.point(frame, "einsum", index, f"op{i}", t, a)
                   for i, (t, a) in enumerate(zip(tensors, axes, strict=True))]
        acc = self.accumulator(frame, "einsum", index)
        if acc is None or self.discovering or not all(_is_float(t) for t in tensors):
            return torch.einsum(equation, *tensors)
        if len(tensors) != 2:
            raise ValueError(f"{frame.name or 'the model'}: accumulated einsum {equation!r} of {len(tensors)} operands; "
                             "allowed: two operands (one GEMM)")
        grids, bits = self.grids(frame, "einsum", index, ("op0", "op1")) if acc.integer else (None, (16, 16))
        return accumulated_call(acc, "einsum", torch.einsum, (equation, *tensors), {}, grids, bits)


def _residual_add(args: tuple[Any, ...]) -> bool:
    """A residual-style add: two float tensors, neither a parameter, of one shape but for size-1
    leading axes of one of them (a position embedding shared by the batch); not a bias, an
    additive attention mask (broadcast over heads or queries) or a scalar."""
    if len(args) < 2 or not (_is_float(args[0]) and _is_float(args[1])) or _is_weight(args[0]) or _is_weight(args[1]):
        return False
    return batch_broadcast(tuple(args[0].shape), tuple(args[1].shape))


def batch_broadcast(a: tuple[Any, ...], b: tuple[Any, ...]) -> bool:
    """Two shapes equal but for size-1 leading axes of one of them (sizes may be symbols that
    compare equal to themselves): the shapes of a residual add's operands."""
    if len(a) != len(b):
        return False
    differ = [i for i in range(len(a)) if a[i] != b[i]]
    return all(1 in (a[i], b[i]) for i in differ) and differ == list(range(len(differ)))


def along(spec: RoleSpec, axis: int, ndim: int | None) -> RoleSpec:
    """``spec`` with its block format's blocks along ``axis`` (the GEMM's reduction axis); other
    formats, and a block format given its own axis, are kept."""
    fmt = spec.format
    if not blocked(fmt) or fmt.axis is not None:  # type: ignore[attr-defined]
        return spec
    if ndim is not None and ndim > 0:
        axis %= ndim
    return dataclasses.replace(spec, format=dataclasses.replace(fmt, axis=axis))  # type: ignore[type-var]


def attention(point: Point, query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
              enable_gqa: bool = False, matmul: Callable[[Tensor, Tensor], Tensor] = torch.matmul) -> Tensor:
    """``F.scaled_dot_product_attention`` as its two GEMMs with their operands at points.

    S = Q(q) Q(k)^T * scale (+ mask) and the softmax in float32; P = softmax(S), dropped out as
    SDPA does; out = Q(P) Q(v). Same math as SDPA's reference, so with no formats it agrees with
    SDPA to float32 rounding. ``matmul`` runs the two GEMMs (an accumulator's)."""
    q = point("q", query, -1)
    k = point("k", key, -1)
    if enable_gqa and q.dim() >= 3 and k.size(-3) != q.size(-3):
        k = k.repeat_interleave(q.size(-3) // k.size(-3), dim=-3)
        value = value.repeat_interleave(q.size(-3) // value.size(-3), dim=-3)
    length, source = q.size(-2), k.size(-2)
    factor = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    scores = matmul(q, k.transpose(-2, -1)).float() * factor
    if is_causal:
        causal = torch.ones(length, source, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    p = torch.softmax(scores, dim=-1).to(query.dtype)
    if dropout_p > 0.0:
        p = F.dropout(p, dropout_p)
    p = point("p", p, -1)
    v = point("v", value, -2)
    return matmul(p, v)


# --- attaching to a model --------------------------------------------------------------------
def attach(model: nn.Module, config: QuantConfig, seed: int,
           accumulators: dict[str, tuple[AccumulatorSpec | None, AccumulatorSpec | None]] | None = None) -> OperandPoints:
    """Hooks on every module of ``model`` that keep the mode active while it runs.

    ``accumulators`` (points: outputs): module name -> (accumulator, gradient accumulator);
    only those modules are hooked, each gets its :class:`Accumulator` as ``precsim_accumulator``,
    and the mode rounds no operand."""
    mode = OperandPoints(config, seed, operands=accumulators is None)
    for name, module in model.named_modules():
        if isinstance(module, (Quantizer, Accumulator)):
            continue
        if accumulators is not None:
            if name not in accumulators:
                continue
            spec, grad = accumulators[name]
            acc = Accumulator(spec, grad, seed=mix_seed(seed, zlib.crc32(f"{name}.{ACCUMULATOR}".encode())))
            acc.owner_kind = "Linear" if isinstance(module, nn.Linear) else "Conv"
            module.add_module(ACCUMULATOR, acc.to(_device(module)))
        module.register_forward_pre_hook(functools.partial(mode.enter, name))
        module.register_forward_hook(mode.leave, always_call=True)
    model.precsim_mode = mode  # type: ignore[assignment]  # plain attribute: not a module, not state
    if accumulators is None:
        model.register_load_state_dict_pre_hook(_materialize)
    return mode


def _device(module: nn.Module) -> torch.device:
    return next((t.device for t in [*module.parameters(), *module.buffers()]), torch.device("cpu"))


def mode_of(model: nn.Module) -> OperandPoints | None:
    return getattr(model, "precsim_mode", None)


def _materialize(model: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
    """Load pre-hook: create the operand points a ``state_dict`` holds that the model has not run
    yet, so that loading before the first forward pass restores them."""
    mode = mode_of(model)
    if mode is None:
        return
    modules = dict(model.named_modules())
    tail = f".{EXTRA_STATE}"
    for full in state_dict:
        if not (full.startswith(prefix) and full.endswith(tail)):
            continue
        owner, sep, key = full[len(prefix):-len(tail)].rpartition(f"{CONTAINER}.")
        if not sep or POINT_KEY.match(key) is None:
            continue
        name = owner[:-1] if owner.endswith(".") else owner
        module = modules.get(name)
        if module is None or (hasattr(module, CONTAINER) and key in getattr(module, CONTAINER)):
            continue
        saved = decode(state_dict[full]) or {}
        role = saved.get("role", "activation")
        device = _device(module)
        if role == "accumulator":
            mode.create_accumulator(module, name, key, device)
            continue
        axis = _saved_axis(saved)
        mode.create(module, name, key, role if role in ("weight", "activation") else "activation", None, axis, device)


def _saved_axis(saved: dict[str, str]) -> int | None:
    """The block axis of a saved point's format (or gradient format), so it is re-created alike."""
    for key in ("format", "gradient"):
        if key in saved:
            axis = getattr(parse_format(saved[key]), "axis", None)
            if axis is not None:
                return axis
    return None


def discover(model: nn.Module, run: Callable[[], Any]) -> None:
    """Run ``run`` (a forward pass) creating the model's operand points without rounding,
    observing or stepping anything (nothing, for a model without operand points)."""
    mode = mode_of(model)
    if mode is None or not mode.operands:  # module-output points exist from prepare on: nothing to discover
        return
    mode.discovering = True
    try:
        with torch.no_grad():
            run()
    finally:
        mode.discovering = False


__all__ = ["ACCUMULATOR", "CONTAINER", "batch_broadcast", "GEMMS", "OUTPUTS", "POINT_KEY", "OperandPoints", "along", "attach", "attention", "discover",
           "einsum_axes", "mode_of"]
