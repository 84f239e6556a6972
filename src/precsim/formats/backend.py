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
def _compiled(fmt: Any, rounding: str, keys: tuple[str, ...]) -> Callable[..., Tensor]:
    def run(x: Tensor, seed: Tensor | None, *values: Any) -> Tensor:
        return fmt.quantize(x, rounding, seed=seed, **dict(zip(keys, values, strict=True)))

    # Dynamo keeps its cache (and its recompile limit) per code object: give each (format,
    # rounding) its own, or every format would share one function's 8 cache entries.
    code = run.__code__.replace(co_name=f"quantize_{abs(hash((fmt, rounding, keys)))}")
    unique = types.FunctionType(code, run.__globals__, code.co_name, run.__defaults__, run.__closure__)
    return torch.compile(unique, dynamic=True)


def run_quantize(fmt: Any, x: Tensor, rounding: str = "nearest", seed: Tensor | None = None, **params: Any) -> Tensor:
    """``fmt.quantize(x, rounding, seed=seed, **params)``, compiled when enabled."""
    if (
        not _state["compile"]
        or x.numel() < MIN_COMPILED_NUMEL
        or torch.compiler.is_compiling()
        or params.get("random_bits") is not None
    ):
        return fmt.quantize(x, rounding, seed=seed, **params)
    keys = tuple(sorted(params))
    # A Parameter would get static-shape guards (a recompile per weight shape): pass plain data.
    return _compiled(fmt, rounding, keys)(x.detach(), seed, *(params[k] for k in keys))
