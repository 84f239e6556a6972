"""Eager or compiled execution of a format's rounding.

The rounding functions are plain tensor ops, so ``torch.compile`` fuses each one into a single
loop (C++ on CPU, Triton on GPU) with the same arithmetic: eager is the reference and the
compiled path must give the same bits (tested). Compilation happens once per (format,
rounding, extra parameters) with dynamic shapes, and Inductor caches it on disk across runs.

``set_compile(True)`` (or the environment variable ``PRECSIM_COMPILE=1``) turns it on; inside
an outer ``torch.compile`` region the eager function is used so the outer graph can fuse it.
"""

from __future__ import annotations

import functools
import os
import types
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_state = {"compile": os.environ.get("PRECSIM_COMPILE", "0") not in ("0", "", "false", "False")}
MIN_COMPILED_NUMEL = 4096  # below this a compiled call's fixed overhead outweighs the fusion


def set_compile(enabled: bool) -> None:
    """Use compiled rounding kernels (True) or the eager reference (False)."""
    _state["compile"] = bool(enabled)


def compile_enabled() -> bool:
    return _state["compile"]


@functools.cache
def _compiled(fn: Callable[..., Any], static: tuple[Any, ...]) -> Callable[..., Any]:
    def run(*args: Any) -> Any:
        return fn(*args, *static)

    # Dynamo keeps its cache (and its recompile limit) per code object: give each (function,
    # static arguments) its own, or every format would share one function's 8 cache entries.
    code = run.__code__.replace(co_name=f"{fn.__name__}_{abs(hash(static))}")
    unique = types.FunctionType(code, run.__globals__, code.co_name, run.__defaults__, run.__closure__)
    return torch.compile(unique, dynamic=True)


def call(fn: Callable[..., Any], x: Tensor, args: tuple[Any, ...], static: tuple[Any, ...] = ()) -> Any:
    """``fn(x, *args, *static)``, through a compiled copy per ``static`` when enabled.

    ``fn`` must be a pure function of tensors; ``static`` holds the hashable settings (format,
    rounding, ...) that the compiled code specializes on.
    """
    if not _state["compile"] or x.numel() < MIN_COMPILED_NUMEL or torch.compiler.is_compiling():
        return fn(x, *args, *static)
    # A Parameter would get static-shape guards (a recompile per weight shape): pass plain data.
    plain = tuple(a.detach() if isinstance(a, Tensor) else a for a in args)
    return _compiled(fn, static)(x.detach(), *plain)


def _quantize(x: Tensor, seed: Tensor | None, values: tuple[Any, ...], fmt: Any, rounding: str,
              keys: tuple[str, ...]) -> Tensor:
    return fmt.quantize(x, rounding, seed=seed, **dict(zip(keys, values, strict=True)))


def run_quantize(fmt: Any, x: Tensor, rounding: str = "nearest", seed: Tensor | None = None, **params: Any) -> Tensor:
    """``fmt.quantize(x, rounding, seed=seed, **params)``, compiled when enabled."""
    if params.get("random_bits") is not None:
        return fmt.quantize(x, rounding, seed=seed, **params)
    keys = tuple(sorted(params))
    return call(_quantize, x, (seed, tuple(params[k] for k in keys)), (fmt, rounding, keys))
