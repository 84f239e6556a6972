"""A compiled kernel called straight into Inductor's code, without Dynamo's per-call work.

``torch.compile`` runs every call through Dynamo: a frame hook, guards on each argument, and
bytecode that rebuilds the outputs. Hot that costs 15 us a call; inside a training step, where
convolutions have evicted its code and data from the caches, 170 us against 60 us for the
compiled code alone. A step runs 40 to 70 quantization kernels: that overhead alone was a
tenth of an FP32 step.

A :class:`Kernel` compiles through ``torch.compile`` once per *signature* of its arguments,
keeps what Inductor built (a custom backend hands it over), and calls that directly on later
calls with the same signature. The signature holds what Dynamo's guards check about these
arguments: dtype, device, rank, static sizes, whether each dynamic size is 0, 1 or more (Dynamo
specializes 0 and 1), contiguity, which arguments share storage, sizes below 2^31, grad and
inference mode; and torch's thread count, which Inductor writes into its C++ loops. A compile
is called directly only if it is one graph whose inputs are the arguments and their dynamic
sizes, whose outputs are the function's tensors, fresh, and whose shape guards hold for every
size of the signature; otherwise that signature keeps going through ``torch.compile``. Where
it can (:func:`_direct_call`), the direct call goes one level further down, to the code
Inductor generated, skipping AOTAutograd's runtime wrappers too. The first call of each
signature is Dynamo's, so the two paths are tested against each other wherever a kernel runs
twice.

The first call of each signature is also checked against the eager reference, bit for bit,
on copies of the arguments (outputs and whatever the function writes into its arguments). If
they differ, that signature runs eagerly from then on, with a warning: a code generator that
miscompiles costs speed, never correctness (see also
:func:`precsim.runtime.backend.compiler_works`, checked before any kernel compiles).
"""

from __future__ import annotations

import time
import types
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor
from torch.utils._pytree import tree_flatten, tree_unflatten

_LARGE = 2**31 - 1
Signature = tuple[Any, ...]


def signature(args: Sequence[Any], dynamic: Sequence[tuple[int, ...]]) -> Signature:
    """What Dynamo's guards would check of ``args``; ``dynamic[i]`` lists the dimensions of
    tensor ``args[i]`` marked dynamic (the others are compiled as constants)."""
    # torch's thread count too: Inductor writes it into its C++ loops (its disk cache keys on it)
    sig: list[Any] = [torch.is_grad_enabled(), torch.is_inference_mode_enabled(), torch.get_num_threads()]
    storages: list[int] = []
    for a, dims in zip(args, dynamic, strict=True):
        if not isinstance(a, Tensor):
            sig.append(a)
            continue
        sizes = tuple(min(s, 2) if d in dims else s for d, s in enumerate(a.shape))
        storage = a.untyped_storage().data_ptr()
        shared = storages.index(storage) if storage in storages and a.numel() else -1
        storages.append(storage)
        sig.append((a.dtype, a.device, sizes, a.is_contiguous(), shared, a.numel() <= _LARGE))
    return tuple(sig)


class Kernel:
    """``fn`` compiled with ``torch.compile``; called directly once compiled (see module doc)."""

    def __init__(self, fn: Callable[..., Any], name: str, options: dict[str, Any] | None = None) -> None:
        self.fn, self.name, self.options = fn, name, options
        self._direct: dict[Signature, Callable[[Sequence[Any]], Any] | None] = {}
        self._dynamo: dict[Signature, Callable[..., Any]] = {}
        self._captured: list[tuple[Any, ...]] = []
        self._eager: set[Signature] = set()
        self.compile_s = 0.0  # seconds spent in first calls of signatures (compiling and checking)

    @property
    def compiles(self) -> int:
        """How many signatures this kernel has compiled (each one a ``torch.compile``)."""
        return len(self._dynamo)

    def __call__(self, args: Sequence[Any], dynamic: Sequence[tuple[int, ...]]) -> Any:
        sig = signature(args, dynamic)
        direct = self._direct.get(sig)
        if direct is not None:
            return direct(args)
        if sig in self._eager:
            return self.fn(*args)
        if sig in self._direct:  # checked already, no direct path
            return self._dynamo[sig](*_for_dynamo(args, dynamic))
        start = time.perf_counter()
        try:
            return self._first_call(sig, _for_dynamo(args, dynamic))
        finally:
            self.compile_s += time.perf_counter() - start

    def _first_call(self, sig: Signature, args: list[Any]) -> Any:
        """Compile ``sig``, check it against the eager reference, and keep the direct path to it."""
        code = self.fn.__code__.replace(co_name=f"{self.name}_{len(self._dynamo)}")
        unique = types.FunctionType(code, self.fn.__globals__, code.co_name, self.fn.__defaults__,
                                    self.fn.__closure__)  # a code object of its own: compiled afresh
        compiled = self._dynamo[sig] = torch.compile(unique, backend=self._backend, dynamic=None)
        saved = [a.clone() if isinstance(a, Tensor) else a for a in args]
        self._captured.clear()
        out = compiled(*args)
        captured = list(self._captured)
        self._captured.clear()
        copies = [a.clone() if isinstance(a, Tensor) else a for a in saved]
        ref = self.fn(*copies)  # the eager reference, free to write into its copies
        if _same_bits(out, ref) and _same_bits(list(args), copies):
            self._direct[sig] = _direct_call(captured, args, out, saved)
            return out
        warnings.warn(f"precsim: the compiled kernel {self.name} gave other bits than the eager reference on this "
                      f"machine (torch {torch.__version__}); it runs eagerly from now on: slower, same results",
                      RuntimeWarning, stacklevel=2)
        self._direct[sig] = None
        self._eager.add(sig)
        for a, s in zip(args, saved, strict=True):
            if isinstance(a, Tensor):
                a.copy_(s)  # undo what the compiled code wrote
        return self.fn(*args)  # the same as ``ref``, on (and returning) the caller's own tensors

    def _backend(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        from torch._guards import TracingContext
        from torch._inductor.compile_fx import compile_fx

        context = TracingContext.try_get()
        shape_env = context.fake_mode.shape_env if context and context.fake_mode else None
        guards = [g.expr for g in shape_env.guards] if shape_env is not None else None
        compiled = compile_fx(gm, example_inputs, config_patches=self.options)
        self._captured.append((gm, list(example_inputs), compiled, guards))
        return compiled


def _for_dynamo(args: Sequence[Any], dynamic: Sequence[tuple[int, ...]]) -> list[Any]:
    """The arguments as Dynamo's calls take them: plain data (a Parameter would get static-shape
    guards), with the dynamic sizes marked (direct calls need neither)."""
    args = [a.detach() if isinstance(a, Tensor) else a for a in args]
    for a, dims in zip(args, dynamic, strict=True):
        for d in dims if isinstance(a, Tensor) else ():
            torch._dynamo.maybe_mark_dynamic(a, d)
    return args


def _same_bits(a: Any, b: Any) -> bool:
    """Equal structure and equal bits (NaN payloads and the sign of zero included)."""
    if isinstance(a, Tensor):
        if not (isinstance(b, Tensor) and a.dtype == b.dtype and a.shape == b.shape):
            return False
        if a.is_floating_point():
            view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
            return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
        return torch.equal(a, b)
    if isinstance(a, (tuple, list)):
        return isinstance(b, (tuple, list)) and len(a) == len(b) and all(
            _same_bits(x, y) for x, y in zip(a, b, strict=True))
    return a is None and b is None or (not isinstance(b, Tensor) and a == b)


def _guards_hold(guards: list[Any] | None) -> bool:
    """Whether every shape guard holds for any size a signature allows (2 to 2^31 - 1):
    relations of one size with constants, checked at both ends."""
    if guards is None:
        return False
    for g in guards:
        symbols = g.free_symbols
        if len(symbols) != 1:
            return False
        (s,) = symbols
        if not (bool(g.subs(s, 2)) and bool(g.subs(s, _LARGE))):
            return False
    return True


def _inductor_code(compiled: Callable[..., Any]) -> Callable[[list[Any]], Any] | None:
    """The code Inductor generated for a graph (``call(args: list)``), under the wrappers that
    AOTAutograd puts around it (see :func:`_direct_call`); None if not found."""
    fn: Any = compiled
    for _ in range(8):
        if hasattr(fn, "current_callable") and callable(fn.current_callable):
            return fn.current_callable  # type: ignore[no-any-return]
        fn = getattr(fn, "__wrapped__", None)
        if fn is None:
            return None
    return None


def _direct_call(captured: list[tuple[Any, ...]], args: Sequence[Any], out: Any,
                 before: Sequence[Any] | None = None) -> Callable[[Sequence[Any]], Any] | None:
    """A function of ``args`` that calls the captured compile and rebuilds ``out``'s structure;
    None where that cannot be shown to be the same computation.

    Where the compile's outputs are exactly the function's tensors, it calls Inductor's
    generated code itself, below AOTAutograd's runtime wrappers (which handle aliased outputs,
    mutations done outside the graph, RNG state and autocast; none of them here). Those
    wrappers cost about a third of a small kernel's call, and more cold. That is used only if,
    run on copies of ``before`` (the arguments before the first call), it gives the first
    call's outputs and leaves the copies as the first call left ``args``, bit for bit."""
    if len(captured) != 1:  # no graph, or a graph break
        return None
    gm, example, compiled, guards = captured[0]
    if not _guards_hold(guards):
        return None
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example):
        return None
    plan: list[tuple[int, int | None]] = []
    for node, ex in zip(placeholders, example, strict=True):
        if isinstance(ex, Tensor):
            where = next((i for i, a in enumerate(args) if a is ex), None)
            if where is None:
                return None
            plan.append((where, None))
        elif isinstance(ex, torch.SymInt):
            size = _size_of(str(node.meta.get("example_value")), placeholders, example, args)
            if size is None:
                return None
            plan.append(size)
        else:
            return None
    leaves, spec = tree_flatten(out)
    slots = [k for k, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    if any(leaf is not None and not isinstance(leaf, Tensor) for leaf in leaves):
        return None
    tensors = [leaves[k] for k in slots]
    if len({id(t) for t in tensors}) != len(tensors) or any(t is a for t in tensors for a in args):
        return None
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if not isinstance(outputs, (tuple, list)) or len(outputs) != len(tensors):
        return None
    for node, t in zip(outputs, tensors, strict=True):  # the same order: same dtypes and ranks
        value = node.meta.get("example_value") if isinstance(node, torch.fx.Node) else None
        if not isinstance(value, Tensor) or value.dtype != t.dtype or value.dim() != t.dim():
            return None
    n_leaves = len(leaves)
    code = _inductor_code(compiled) if before is not None else None
    if code is not None and not _same_results(code, plan, before, args, tensors):  # type: ignore[arg-type]
        code = None
    single = isinstance(out, Tensor)
    flat = isinstance(out, tuple) and len(out) == len(tensors) and slots == list(range(len(tensors)))

    def direct(args: Sequence[Any]) -> Any:
        inputs = [args[i] if d is None else args[i].shape[d] for i, d in plan]
        if code is None:
            results = compiled(*inputs)
        elif torch.autograd.profiler._is_profiler_enabled:
            with torch.autograd.profiler.record_function("precsim kernel"):
                results = code(inputs)
        else:
            results = code(inputs)
        if single:
            return results[0]
        if flat:
            return tuple(results)
        rebuilt: list[Any] = [None] * n_leaves
        for k, t in zip(slots, results, strict=True):
            rebuilt[k] = t
        return tree_unflatten(rebuilt, spec)

    direct.inductor_code = code is not None  # type: ignore[attr-defined]
    return direct


def _same_results(code: Callable[[list[Any]], Any], plan: list[tuple[int, int | None]], before: Sequence[Any],
                  after: Sequence[Any], outputs: list[Tensor]) -> bool:
    """Whether Inductor's ``code`` run on copies of ``before`` gives ``outputs`` and leaves the
    copies equal to ``after``."""
    trial = [a.clone() if isinstance(a, Tensor) else a for a in before]
    try:
        results = code([trial[i] if d is None else trial[i].shape[d] for i, d in plan])
    except Exception:  # noqa: BLE001 (any failure: keep the wrappers)
        return False
    return (isinstance(results, (tuple, list)) and len(results) == len(outputs)
            and _same_bits(list(results), outputs) and _same_bits(trial, list(after)))


def _size_of(symbol: str, placeholders: list[Any], example: list[Any], args: Sequence[Any]) -> tuple[int, int] | None:
    """(argument, dimension) of a tensor argument whose size is the graph input ``symbol``."""
    for node, ex in zip(placeholders, example, strict=True):
        value = node.meta.get("example_value")
        if not (isinstance(ex, Tensor) and isinstance(value, Tensor)):
            continue
        for d, s in enumerate(value.shape):
            if str(s) == symbol:
                where = next((i for i, a in enumerate(args) if a is ex), None)
                if where is not None:
                    return where, d
    return None
