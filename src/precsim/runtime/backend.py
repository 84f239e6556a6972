"""Eager or compiled execution of a format's rounding.

The rounding functions are plain tensor ops, so ``torch.compile`` fuses each one into a single
loop (C++ on CPU, Triton on GPU) with the same arithmetic: eager is the reference and the
compiled path must give the same bits (tested). Compilation happens once per (format,
rounding, extra parameters) with dynamic shapes, and Inductor caches it on disk across runs.

Compiled kernels are the default for every entry point (``precsim.quantize``, prepared models,
the optimizer, calibration, the sweep). ``set_compile(False)`` or the environment variable
``PRECSIM_COMPILE=0`` turns them off: the eager reference then runs, with the same bits. They
are off by themselves, with one warning, where this machine cannot compile or its compiler
gives other bits (:func:`compiler_works`); inside an outer ``torch.compile`` region the eager
function is used so the outer graph can fuse it.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import Tensor

from precsim.runtime.kernel import Kernel

_OFF = ("0", "", "false", "False", "off", "no")
_state = {"compile": os.environ.get("PRECSIM_COMPILE", "1") not in _OFF}
MIN_COMPILED_NUMEL = 64  # below this a compiled call's fixed overhead outweighs the fusion


def set_compile(enabled: bool) -> None:
    """Use compiled rounding kernels (True, the default) or the eager reference (False)."""
    _state["compile"] = bool(enabled)


@contextlib.contextmanager
def compiling(enabled: bool) -> Iterator[None]:
    """:func:`set_compile` for a ``with`` block, restored afterwards."""
    before = _state["compile"]
    _state["compile"] = bool(enabled)
    try:
        yield
    finally:
        _state["compile"] = before


def compile_requested() -> bool:
    """Whether compiled kernels are turned on and no outer ``torch.compile`` is tracing the
    caller (whose graph then takes the eager functions, with no value read back)."""
    return _state["compile"] and not torch.compiler.is_compiling()


def compile_enabled() -> bool:
    """Whether kernels run compiled: :func:`compile_requested`, and this machine's compiler
    gives the eager reference's bits (:func:`compiler_works`)."""
    return compile_requested() and compiler_works()


def _probe(x: Tensor, bits: Tensor, scale: Tensor) -> tuple[Tensor, ...]:
    from precsim.formats.integer import fake_quantize
    from precsim.formats.rounding import round_float

    common = {"negative_zero": True, "overflow": "saturate"}
    return (round_float(x, mantissa_bits=3, min_exponent=-6, max_value=448.0, rounding="nearest", **common),
            round_float(x, mantissa_bits=7, min_exponent=-126, max_value=3.3895313892515355e38, rounding="nearest",
                        **common),
            round_float(x, mantissa_bits=2, min_exponent=-14, max_value=57344.0, rounding="stochastic",
                        random_bits=bits, **common),
            round_float(x, mantissa_bits=3, min_exponent=-6 + bits[:1].clamp(-20, 20), max_value=448.0,
                        rounding="nearest", **common),
            fake_quantize(x, scale, torch.zeros_like(scale), -128, 127))


@functools.cache
def compiler_works() -> bool:
    """Whether ``torch.compile`` builds kernels here that give the eager reference's bits.

    Checked once per process on a probe of the operations the kernels use (float and integer
    bit manipulation, selects, shifts, the float-addition rounding, stochastic rounding,
    integer rounding), over every float32 exponent and the specials. Where it fails, or
    nothing can be compiled (no C++ compiler), a warning says so and every kernel runs
    eagerly: slower, the same results. (On this project's AVX-512 machine, Inductor made to
    emit AVX2 code, with ``ATEN_CPU_CAPABILITY=avx2``, computed even ``x * 2.0`` wrongly, and
    the probe caught it; a real AVX2-only machine was not available to test.)
    """
    start = time.perf_counter()
    try:
        return _check_compiler()
    finally:
        _probe_s[0] = time.perf_counter() - start


_probe_s = [0.0]  # seconds :func:`compiler_works` took (see :func:`compile_seconds`)


def _check_compiler() -> bool:
    from precsim.runtime.kernel import _same_bits

    g = torch.Generator().manual_seed(0)
    x = torch.randint(-(2**31), 2**31 - 1, (8192,), dtype=torch.int32, generator=g).view(torch.float32).clone()
    x[:8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, 448.0, 0.5])
    bits = torch.randint(-(2**31), 2**31 - 1, (8192,), dtype=torch.int32, generator=g)
    scale = torch.tensor(0.037)
    why = ""
    try:
        torch._dynamo.maybe_mark_dynamic(x, 0)
        torch._dynamo.maybe_mark_dynamic(bits, 0)
        same = _same_bits(torch.compile(_probe, dynamic=None)(x, bits, scale), _probe(x, bits, scale))
        why = "it gives other bits than the eager reference"
    except Exception as err:  # noqa: BLE001 (any failure to compile means: run eagerly)
        same, why = False, f"it failed: {type(err).__name__}: {err}"[:300]
    if not same:
        warnings.warn(f"precsim: torch.compile cannot be used for the rounding kernels on this machine (torch "
                      f"{torch.__version__}): {why}. They run eagerly: slower, the same results.",
                      RuntimeWarning, stacklevel=2)
    return same


# Inductor stores an intermediate in a full-size buffer when a long expression feeds several
# uses (more than 50 ops on CPU). In kernels that fuse a per-row (per-block, per-channel) max
# with the rounding, that turned the random bits or the rounding's intermediates into extra
# passes over memory (4-5x clone); a higher bar keeps them in registers. It is not the default for every kernel: where a
# per-tensor scalar (a DSE shift, an NVFP4 scale) feeds every element, inlining recomputes it
# per element and compiles for a minute.
_INLINE = {"realize_opcount_threshold": 200}
# Inductor's CPU loops end each innermost row with a masked vector iteration when the row is not
# a multiple of the vector width. In a long kernel that tail costs several full iterations (its
# bit casts loop element by element), and kernels that round per row pay it in every row: an MX
# channel block on a 7x7 map (rows of 49: three vectors and a tail) took 2.4x the time it takes
# with scalar tails. Not for flat kernels, which have one tail in all: there scalar tails made
# the training step slower (fp8 by 0.07 x FP32, DSE by 0.16), for reasons not found (measured
# before _PARALLEL below: perhaps the one-thread kernels that it fixes).
_SCALAR_TAILS = {"cpp.enable_loop_tail_vec": False}
# Inductor keeps a float32 value that is cast to float16/bfloat16 and back in float32 (the casts
# vanish): right for mixed-precision models, wrong for a kernel that rounds by that cast (the fp16
# and bf16 accumulators, :mod:`precsim.runtime.accumulate`). Such kernels ask for real casts; a
# torch without the option runs them eagerly.
_CASTS = {"emulate_precision_casts": True}
# With dynamic sizes Inductor decides once, from the size of the first call, whether a loop is
# worth several threads (not under 512 elements a thread), and keeps that choice, in its on-disk
# cache too, for every later size. A kernel first called on a small tensor (a test's, a small
# layer's) then ran every tensor on one thread: the int8 gradient kernel took 2x its time on 2
# cores once the test suite had filled the cache. A bar of one element makes the loops parallel
# whatever the first size; a tensor that small costs the threads' start-up, a few microseconds.
_PARALLEL = {"cpp.min_chunk_size": 1}


def _available(options: dict[str, Any]) -> dict[str, Any]:
    """The ``options`` this torch's Inductor has (the package accepts older releases)."""
    from torch._inductor import config

    def has(key: str) -> bool:
        section, _, name = key.rpartition(".")
        return hasattr(getattr(config, section) if section else config, name)

    return {k: v for k, v in options.items() if has(k)}


def blocked(fmt: Any) -> bool:
    """Whether ``fmt`` rounds blocks of elements (:meth:`BlockFormat.quantize_blocks`), which
    :func:`run_quantize` cuts outside the kernel."""
    return hasattr(fmt, "quantize_blocks")


def per_tensor_format(fmt: Any) -> bool:
    """Whether ``fmt`` rounds every element alike, with at most one value for the whole tensor
    (no channel axis, groups or blocks): a kernel may then see any tensor flat."""
    return getattr(fmt, "axis", None) is None and getattr(fmt, "group_size", None) is None and not blocked(fmt)


def inline_kernel(fmt: Any, rounding: str) -> bool:
    """Whether ``fmt`` fuses a per-row reduction with long per-element expressions: MX blocks
    (the E8M0 exponent feeds the rounding; 1.7x instead of 4.5x clone for MXFP4), and
    per-channel integers with stochastic rounding (1.5x instead of 5x)."""
    from precsim.formats.block import BlockFormat
    from precsim.formats.integer import IntFormat

    if isinstance(fmt, BlockFormat):
        return fmt.scale == "e8m0"
    return rounding == "stochastic" and isinstance(fmt, IntFormat) and fmt.axis is not None


_KERNELS: list[Kernel] = []


def kernels() -> tuple[Kernel, ...]:
    """The kernels this process has made so far (one per function and static settings)."""
    return tuple(_KERNELS)


def compile_seconds() -> float:
    """Seconds this process has spent compiling kernels and checking them (the compiler probe
    and each signature's first call), so that a timed run can leave them out."""
    return _probe_s[0] + sum(k.compile_s for k in _KERNELS)


@functools.cache
def _compiled(fn: Callable[..., Any], static: tuple[Any, ...], inline: bool = False, rowwise: bool = False,
              casts: bool = False) -> Kernel:
    def run(*args: Any) -> Any:
        return fn(*args, *static)

    # one Dynamo code object per (function, static arguments) and signature (see Kernel)
    options = _available({**_PARALLEL, **(_INLINE if inline else {}), **(_SCALAR_TAILS if rowwise else {}),
                          **(_CASTS if casts else {})})
    kernel = Kernel(run, f"{fn.__name__}_{abs(hash(static))}", options or None)
    _KERNELS.append(kernel)
    return kernel


def call(fn: Callable[..., Any], x: Tensor, args: tuple[Any, ...], static: tuple[Any, ...] = (),
         dynamic: tuple[int, ...] | None = None, inline: bool = False, flat: bool = False,
         rows: int | None = None, rowwise: bool = False, casts: bool = False) -> Any:
    """``fn(x, *args, *static)``, through a compiled copy per ``static`` when enabled.

    ``fn`` must be a pure function of tensors; ``static`` holds the hashable settings (format,
    rounding, ...) that the compiled code specializes on. The dimensions of ``x`` in ``dynamic``
    (default: all) are compiled as symbolic sizes, so one kernel serves every shape; the others,
    and every Python number in ``static``, are constants of the kernel. ``inline``: see
    :func:`inline_kernel`. ``rowwise``: the kernel loops over short rows (blocks, channels at
    each position) and ends each with a scalar tail, not a masked vector (see ``_SCALAR_TAILS``).

    ``flat``: ``fn`` is element-wise in ``x`` and in every argument of ``x``'s shape, and any
    reduction in it spans the whole tensor (per-tensor formats). The kernel then sees them
    1-D, and its outputs of ``x``'s size come back in ``x``'s shape, so that every shape
    (activations, conv weights with dimensions of 1, linear layers) shares one compiled entry.
    ``rows`` (with ``flat``): the kernel sees them as ``rows`` rows instead (a divisor of the
    size), for per-row reductions in the flat order. ``casts``: ``fn`` rounds by casting to
    float16 or bfloat16, which the kernel must then do (see ``_CASTS``).
    """
    if x.numel() < MIN_COMPILED_NUMEL or not compile_enabled() or casts and not _available(_CASTS):
        return fn(x, *args, *static)
    shape = x.shape
    if flat:
        view = (-1,) if rows is None else (rows, -1)
        args = tuple(a.reshape(view) if isinstance(a, Tensor) and a.shape == shape else a for a in args)
        x = x.reshape(view)
        dims = tuple(range(x.dim()))
    else:
        dims = tuple(range(x.dim())) if dynamic is None else dynamic
    # arguments of x's shape (an STE's saved input) vary with it
    varying = [dims if isinstance(a, Tensor) and a.shape == x.shape else () for a in args]
    out = _compiled(fn, static, inline, rowwise, casts)((x, *args), (dims, *varying))
    if not flat:
        return out
    return tuple(_unflatten(o, x.shape, shape) for o in out) if isinstance(out, tuple) else (
        _unflatten(out, x.shape, shape))


def _unflatten(out: Any, seen: torch.Size, shape: torch.Size) -> Any:
    if isinstance(out, Tensor) and out.shape == seen:
        return out.view(shape)
    return out


def _quantize(x: Tensor, seed: Tensor | None, *rest: Any) -> Tensor:
    """``fmt.quantize`` with the parameters as arguments of their own (``rest``: their values,
    then ``fmt``, ``rounding`` and their names), so that a kernel's signature sees each tensor."""
    *values, fmt, rounding, keys = rest
    return fmt.quantize(x, rounding, seed=seed, **dict(zip(keys, values, strict=True)))


def _quantize_blocks(blocks: Tensor, seed: Tensor | None, fmt: Any, rounding: str) -> Tensor:
    return fmt.quantize_blocks(blocks, rounding, seed=seed)


def _quantize_rows(rows: Tensor, seed: Tensor | None, fmt: Any, rounding: str, n: int) -> Tensor:
    return fmt.quantize_blocks(rows, rounding, seed=seed, row_stride=fmt.block_size)


def _quantize_across(blocks: Tensor, seed: Tensor | None, fmt: Any, rounding: str) -> tuple[Tensor, ...]:
    """Blocks along dim 2 of (outer, blocks, block_size, inner): a channel axis in place.

    With MX float elements and deterministic rounding, the block's power scale X and 1 / X are
    outputs too, so that Inductor computes them once per block (left as intermediates, it
    rebuilt them from the block max for every element: 1.6x the time); the rounding is then
    that of :func:`_quantize_rows_scaled`, on the element's constant grid. Same bits.
    """
    if not scaled_rows(fmt, rounding):
        return (fmt.quantize_blocks(blocks, rounding, seed=seed, dim=2),)
    s = fmt.power_scale(blocks, dim=2)
    inv = s.reciprocal()  # exact: a power of two from 2^-127 to 2^127 (or NaN)
    q = fmt.round_scaled(blocks * inv, rounding) * s
    # a NaN/Inf block is one canonical NaN; tested on 1 / X: ``isnan`` of X made Inductor
    # rebuild X per element (2x the time)
    return torch.where(inv != inv, torch.nan, q), s, inv


def scaled_rows(fmt: Any, rounding: str) -> bool:
    """Whether rows shorter than a block take :func:`_quantize_rows_scaled`: MX float elements,
    deterministic rounding. (With stochastic rounding, the random bits' padded numbering
    needs a division per element in a flat kernel: 3x slower than the row kernel.)"""
    from precsim.formats.block import BlockFormat
    from precsim.formats.float import FloatFormat

    return (isinstance(fmt, BlockFormat) and fmt.scale == "e8m0" and isinstance(fmt.element, FloatFormat)
            and rounding != "stochastic")


def _power_scale(rows: Tensor, fmt: Any) -> Tensor:
    return fmt.power_scale(rows)


def _round_scaled(y: Tensor, fmt: Any, rounding: str) -> Tensor:
    return fmt.round_scaled(y, rounding)


def _round_scaled_into(y: Tensor, fmt: Any, rounding: str) -> None:
    y.copy_(fmt.round_scaled(y, rounding))


def _quantize_rows_scaled(rows: Tensor, fmt: Any, rounding: str, inplace: bool = False) -> Tensor:
    """MX rows shorter than a block as (x / X) rounded on the element grid, times X.

    Inductor compiles a rounding whose grid moves per row of 28 into a loop per row: a vector
    of 16 and a masked tail of 12, with the row's exponents broadcast (4.6x fp8's time). Here
    the per-row scales are one small kernel (a single float output: a second one, or a bool,
    doubled its time), the exact divisions and multiplications by them are torch's
    broadcasting ops, and the rounding is a flat kernel on a constant grid. Same bits
    (:meth:`BlockFormat.round_scaled`).
    """
    s = call(_power_scale, rows, (), (fmt,), dynamic=(0,), rowwise=True)
    if inplace:  # (rows owned by the caller: no new full-size tensor)
        q = rows.mul_(s.reciprocal())
        call(_round_scaled_into, q.view(-1), (), (fmt, rounding), dynamic=(0,))
    else:
        q = call(_round_scaled, (rows * s.reciprocal()).view(-1), (), (fmt, rounding), dynamic=(0,)).view(rows.shape)
    out = q.mul_(s)  # exact, as 1 / s is: powers of two from 2^-127 to 2^127
    bad = s.isnan()  # NaN or Inf in the block: the result is NaN, one canonical NaN
    if out.device.type == "cpu" and not bool(bad.any()):  # (on a GPU the check would cost a sync)
        return out
    return torch.where(bad, torch.nan, out)


def run_quantize(fmt: Any, x: Tensor, rounding: str = "nearest", seed: Tensor | None = None, *,
                 inplace: bool = False, **params: Any) -> Tensor:
    """``fmt.quantize(x, rounding, seed=seed, **params)``, compiled when enabled.

    ``inplace``: the caller owns ``x`` and allows writing the result into it (MX rows shorter
    than a block do; other paths return a new tensor).

    A block format is cut into blocks outside the compiled kernel, which sees one (blocks,
    block_size) matrix whatever the tensor's shape: a pad or a reshape of symbolic sizes inside
    the kernel defeats vectorization (up to 30x slower than clone). The flat block order is the
    same, so the random bits and the result are too.

    A block axis shorter than the block (an activation's last axis of 28, 14 or 7 with MX
    blocks of 32) is one block per row: the kernel reads the rows in place, with their length
    as a literal, and writes a contiguous result. Padding them to the block size cost a copy
    in, a padded output and a copy out (the next layer copied the strided view): 3-4x the
    step time of FP32 for MXFP8 on the zoo ResNet.
    """
    if params.get("random_bits") is not None and blocked(fmt):
        return fmt.quantize(x, rounding, seed=seed, **params)  # explicit bits for blocks: eager
    if not params and blocked(fmt) and x.dim() > 0 and compile_enabled():
        axis = fmt.block_axis(x.dim())
        if axis != x.dim() - 1:  # across the memory layout: blocks of channels at each position
            c = x.shape[axis]
            if not (x.is_contiguous() and x.numel() > 0 and (c <= fmt.block_size or c % fmt.block_size == 0)):
                return fmt.quantize(x, rounding, seed)  # eager: channels not in whole blocks
            size = min(c, fmt.block_size)
            blocks = x.view(math.prod(x.shape[:axis]), c // size, size, -1)
            out = call(_quantize_across, blocks, (seed,), (fmt, rounding), dynamic=(0, 1, 3),
                       inline=inline_kernel(fmt, rounding), rowwise=True)
            return out[0].view(x.shape)
        y = x.movedim(axis, -1)
        n = y.shape[-1]
        if 0 < n < fmt.block_size and y.is_contiguous() and _state.get("rows", True):
            if scaled_rows(fmt, rounding):
                out = _quantize_rows_scaled(y.view(-1, n), fmt, rounding, inplace)
            else:
                out = call(_quantize_rows, y.view(-1, n), (seed,), (fmt, rounding, n), dynamic=(0,),
                           inline=inline_kernel(fmt, rounding), rowwise=True)
            return out.view(y.shape).movedim(-1, axis)
        blocks, n = fmt.blocks(x)
        flat = blocks.reshape(-1, fmt.block_size)
        out = call(_quantize_blocks, flat, (seed,), (fmt, rounding), dynamic=(0,),
                   inline=inline_kernel(fmt, rounding))
        return fmt.unblock(out.view(blocks.shape), n)
    keys = tuple(sorted(params))
    values = tuple(params[k] for k in keys)
    # one kernel for every shape where the format and its parameters are per tensor or per element
    flat = (per_tensor_format(fmt)
            and all(not isinstance(v, Tensor) or v.dim() == 0 or v.shape == x.shape for v in values))
    return call(_quantize, x, (seed, *values), (fmt, rounding, keys), inline=inline_kernel(fmt, rounding), flat=flat)
