"""Accumulators: a GEMM whose running sum is held, and rounded, in a narrow format (pure).

Hardware does not sum a dot product in float32. Each output element's reduction axis K is cut
into consecutive blocks of ``block`` elements, in ascending k; a block's products are summed
in float32 (as inside one MMA instruction); the block sums are then added one by one to an
accumulator held in format F and rounded after every add::

    k:    0 ........ B-1 | B ....... 2B-1 | 2B ...... 3B-1 | ...  (B = block)
          \\ sum fp32 /     \\ sum fp32 /     \\ sum fp32 /
    acc = 0 -> R_F(acc + s0) -> R_F(acc + s1) -> R_F(acc + s2) -> ...
    promote P (a multiple of B): after every P elements, total += acc (float32), acc = 0;
    the output is total + acc (acc alone without promote).

``R_F(acc + s)`` rounds the exact sum once: the float32 sum and its exact error (TwoSum) give
the sum rounded to odd at float32's 24 bits, which F (at most 22 significant bits, smallest
subnormal >= 2^-147: the config refuses other formats) then rounds as if it saw the exact value
(rounding to odd keeps the information of every discarded bit; Boldo and Melquiond). So an
fp16 accumulator gives the bits of a sum rounded to fp16 after every add, with no double
rounding. Stochastic rounding draws block j's bits from ``block_seeds(seed)[j]``, one word per
output element in flat order.

Integer accumulators (:func:`matmul_int`) take integer codes; block sums are exact (float32
where every block sum is below 2^24, else float64); the accumulator is an int64 kept in W bits
after every add, wrapped (two's complement) or saturated, and every add that left the W-bit
range counts as one overflow event.

Speed: on the CPU, accumulators run in one fused C kernel (:mod:`precsim.runtime.native`): float
formats rounded to nearest or stochastically, and integer widths up to 48 bits on codes whose
block sums are exact in float32. The block sums stay in the GEMM's registers and are rounded
there, and a conv's im2col columns are read from its input as they are packed; a kernel that
is missing or fails its probe leaves the torch path below, with the same bits.

The torch path (GPUs, float64 block sums, formats the kernel cannot round): the output is
cut into parts (rows, or matrices of a batched GEMM) whose block sums fit :data:`BUFFER_BYTES`,
so that they stay in cache; for each part, one batched GEMM per chunk of :data:`MAX_CHUNK`
blocks writes a [blocks, rows, N] buffer (allocated once per call: a fresh 128 MB buffer cost
3x the GEMM in page faults) whose row 0 is the accumulator, then fused passes of up to
:data:`STEPS_PER_KERNEL` block adds run over it (one compiled kernel per format, rounding and
number of adds: the add, its exact error and the rounding). A scan of a whole chunk unrolled in
one kernel took minutes to compile; 8 adds per kernel ran slower than 4.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from precsim.formats.random import indexed_bits
from precsim.runtime import native
from precsim.runtime.backend import call, compile_requested

BUFFER_BYTES = 16 << 20  # the block sums of one part of the output (half the L3 of the 2-core VM)
MAX_CHUNK = 32  # blocks per batched GEMM
FUSED = True  # accumulators on the CPU through the fused kernel (False: the torch path, for comparisons)
STEPS_PER_KERNEL = 4  # block adds fused in one kernel call (each count of them compiles once per format)
OVERFLOWS: tuple[str, ...] = ("wrap", "saturate")


def check_blocks(block: Any, promote: Any, where: str = "accumulator") -> None:
    """The block and promotion the semantics define: a block of at least one element, a
    promotion after a whole number of blocks (the config and the GEMMs here check the same)."""
    if isinstance(block, bool) or not isinstance(block, int) or block < 1:
        raise ValueError(f"{where}: block {block!r} not allowed; allowed: an integer >= 1")
    if promote is not None and (isinstance(promote, bool) or not isinstance(promote, int) or promote < block
                                or promote % block):
        raise ValueError(f"{where}: promote {promote!r} not allowed; allowed: a multiple of block ({block})")


def _on_cpu(*tensors: Tensor | None) -> bool:
    """Whether every operand is on the CPU: only then does the fused kernel read them (a weight on
    another device takes the torch path, whose GEMM says what is wrong)."""
    return all(t is None or t.device.type == "cpu" for t in tensors)
_BLOCK_SALT = 0x2545F491  # block j's seed word 1 is seed[1] + j * this (mod 2^32)


def block_seeds(seed: Tensor, first: int, n: int) -> Tensor:
    """The two-word seeds of blocks ``first .. first + n - 1`` of a call seeded ``seed`` ([n, 2] int32)."""
    j = torch.arange(first, first + n, dtype=torch.int64, device=seed.device)
    word = (seed[1].to(torch.int64) + j * _BLOCK_SALT) % 2**32
    word = torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)
    return torch.stack([seed[0].expand(n), word], dim=1)


def sum_to_odd(acc: Tensor, x: Tensor) -> Tensor:
    """``acc + x`` (float32) rounded to odd: the float32 sum, moved one unit toward the exact
    sum where that is inexact and the sum's last bit is even (TwoSum gives the exact error)."""
    s = acc + x
    bb = s - acc
    err = (acc - (s - bb)) + (x - bb)  # exact; NaN where s is Inf or NaN
    bits = s.view(torch.int32)
    away = 1 | ((err.view(torch.int32) ^ bits) >> 31)  # +1 (away from zero) where err has s's sign, else -1
    move = (err != 0) & (err == err) & ((bits & 1) == 0)
    return (bits + torch.where(move, away, 0)).view(torch.float32)  # (sign bits: 2x faster than comparisons)


def sum_cast(acc: Tensor, x: Tensor, dtype: torch.dtype) -> Tensor:
    """``acc + x`` rounded once to nearest in ``dtype`` (float16 or bfloat16), as float32.

    The float32 sum ``s`` and its exact error ``err`` (TwoSum) give the exact sum ``s + err``
    with ``|err|`` at most half a float32 unit of ``s``. The cast of ``s`` rounds it correctly
    unless ``s`` is the midpoint of two ``dtype`` values and ``err`` is not 0: the exact sum
    then lies on ``err``'s side of it. ``s`` is a midpoint when the value as far beyond it as
    the cast went short of it, ``n = r + 2 (s - r)``, is a value of the dtype (otherwise ``n``
    lies between two of them). At the overflow midpoint (max plus half its spacing) the cast
    gives Inf, which an exact sum on the zero side of it turns back into max. Only sign tests
    of ``err`` (a product with it can underflow).
    """
    s = acc + x
    bb = s - acc
    err = (acc - (s - bb)) + (x - bb)
    r = s.to(dtype).to(torch.float32)
    d = s - r
    n = r + 2 * d
    beyond = ((err > 0) & (d > 0)) | ((err < 0) & (d < 0))
    out = torch.where(beyond & (n.to(dtype).to(torch.float32) == n), n, r)
    top, big = _OVERFLOW_MIDPOINT[dtype]
    back = (s.abs() == top) & (((s > 0) & (err < 0)) | ((s < 0) & (err > 0)))
    return torch.where(back, torch.where(s > 0, big, -big), out)


_OVERFLOW_MIDPOINT = {torch.float16: (65520.0, 65504.0), torch.bfloat16: (2.0**128 - 2.0**119, 2.0**128 - 2.0**120)}


def _add_cast(rows: Tensor, dtype: torch.dtype) -> Tensor:
    """:func:`_add_float` for a format that is ``dtype`` (nearest rounding): :func:`sum_cast`."""
    acc = rows[0]
    for j in range(1, rows.shape[0]):
        acc = sum_cast(acc, rows[j], dtype)
    return acc


def cast_dtype(fmt: Any, rounding: str) -> torch.dtype | None:
    """The dtype whose cast rounds to nearest as ``fmt`` does (IEEE fp16 and bf16), or None."""
    if rounding != "nearest":
        return None
    from precsim.formats.float import FloatFormat

    for dtype, (e, m) in ((torch.float16, (5, 10)), (torch.bfloat16, (8, 7))):
        if fmt == FloatFormat(e, m):
            return dtype
    return None


def _add_float(rows: Tensor, seeds: Tensor | None, base: Tensor | None, fmt: Any, rounding: str) -> Tensor:
    """Block adds, ``acc <- R_F(acc + x)`` for ``rows = [acc, x_1, ..., x_r]`` in order: each
    exact sum rounded once, in one fused pass. Stochastic bits: block j draws from
    ``seeds[j]``, and element i of this part of the output is element ``base + i`` of the whole.
    (acc and the block sums come as one tensor so that the compiled kernel sees one size.)"""
    acc = rows[0]
    index = None if seeds is None else torch.arange(acc.shape[0], dtype=torch.int32, device=acc.device) + base
    for j in range(1, rows.shape[0]):
        bits = None if seeds is None else indexed_bits(index, seeds[j - 1])  # type: ignore[arg-type]
        acc = fmt.quantize(sum_to_odd(acc, rows[j]), rounding, random_bits=bits)
    return acc


def _keep(s: Tensor, count: Tensor, lo: Tensor, overflow: str) -> tuple[Tensor, Tensor]:
    """``s`` (int64, exact) kept in W bits (``lo`` = -2^(W-1), a 0-d int64 tensor, so that one
    kernel serves every width), and ``count`` plus its overflow events."""
    hi = -lo - 1
    out = (s < lo) | (s > hi)
    count = count + out.sum()
    if overflow == "saturate":
        return torch.minimum(torch.maximum(s, lo), hi), count
    return ((s - lo) & (-2 * lo - 1)) + lo, count


def _add64(acc: Tensor, x: Tensor, count: Tensor, overflow: str) -> tuple[Tensor, Tensor]:
    """``acc + x`` in a 64-bit accumulator (int64 arithmetic wraps; an overflow is a sign flip)."""
    s = acc + x
    out = ((acc ^ s) & (x ^ s)) < 0
    count = count + out.sum()
    if overflow == "saturate":
        s = torch.where(out, torch.where(x > 0, torch.iinfo(torch.int64).max, torch.iinfo(torch.int64).min), s)
    return s, count


def _add_int(rows: Tensor, count: Tensor, lo: Tensor | None, overflow: str) -> tuple[Tensor, Tensor]:
    """Block adds of an integer accumulator, ``rows = [acc, x_1, ..., x_r]`` (int64): each
    ``acc + x`` kept in W bits (``lo`` = -2^(W-1); None: 64 bits), and ``count`` plus the
    adds' overflow events."""
    acc = rows[0]
    for j in range(1, rows.shape[0]):
        acc, count = _add64(acc, rows[j], count, overflow) if lo is None else _keep(acc + rows[j], count, lo, overflow)
    return acc, count


# --- the driver: blocks of K, chunks of blocks and of output rows ----------------------------
Step = Callable[[Tensor, int, int], Tensor]  # ([acc, r block sums], first block's index, flat offset) -> new acc


def _normalized(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, tuple[int, ...]]:
    """(a, b, output shape): a 2-D b makes a 2-D a ([rows, K]); otherwise b is [P, K, N] and a
    is [M, K] (one matrix for every P: a conv's weight) or [P, M, K]."""
    k = a.shape[-1]
    if b.dim() < 2 or b.shape[-2] != k:
        raise ValueError(f"accumulated GEMM: K of a ({k}) and b ({tuple(b.shape)}) differ")
    batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    shape = (*batch, a.shape[-2] if a.dim() > 1 else 1, b.shape[-1])
    if b.dim() == 2:
        return a.reshape(math.prod(a.shape[:-1]), k), b, shape
    b = b.expand(*batch, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
    if a.dim() > 2 and math.prod(a.shape[:-2]) > 1:
        a = a.expand(*batch, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
    else:
        a = a.reshape(a.shape[-2], k)
    return a, b, shape


def _blocks_per_gemm(nb: int, per_promote: int | None) -> int:
    """Blocks summed by one batched GEMM: whole promotion groups where a group fits."""
    cap = max(1, min(MAX_CHUNK, nb))  # (nb = 0: K is empty, the output is the start)
    if per_promote is None:
        return cap
    if per_promote <= cap:
        return per_promote * (cap // per_promote)
    return max(d for d in range(1, cap + 1) if per_promote % d == 0)


Sums = Callable[[int, int, int, int, Tensor], None]
"""Writes block sums: ``(u0, u1, first, n, rows)`` fills ``rows`` ([n, (u1 - u0) * unit]) with
the sums of blocks ``first .. first + n - 1`` for units ``u0 .. u1 - 1`` of the output."""


def _run(units: int, unit: int, nb: int, sums: Sums, per_promote: int | None, out: Tensor, start: Tensor | None,
         step: Step) -> None:
    """Fills ``out`` (flat: ``units`` parts of ``unit`` elements, the output's dtype) with the
    accumulation of ``nb`` blocks: for each run of units small enough that its block sums fit
    :data:`BUFFER_BYTES` (so they stay in cache), each chunk of blocks is written by ``sums``
    into rows 1.. of a buffer whose row 0 holds the accumulator; ``step`` adds row j + 1 to row
    j and the result becomes row j + 1."""
    per_gemm = _blocks_per_gemm(nb, per_promote)
    per_part = max(1, min(units, BUFFER_BYTES // max(1, per_gemm * unit * out.element_size())))
    store = torch.empty((per_gemm + 1) * per_part * unit, dtype=out.dtype, device=out.device)
    for u0 in range(0, units, per_part):
        u1 = min(units, u0 + per_part)
        size = (u1 - u0) * unit
        rows = store[:(per_gemm + 1) * size].view(per_gemm + 1, size)
        if start is None:
            rows[0].zero_()
        else:
            rows[0].copy_(start[u0 * unit:u0 * unit + size])
        total = None if per_promote is None else torch.zeros_like(rows[0])
        for first in range(0, nb, per_gemm):
            n = min(per_gemm, nb - first)
            sums(u0, u1, first, n, rows[1:n + 1])
            j = 0
            while j < n:  # spans of up to STEPS_PER_KERNEL blocks, none across a promotion
                r = min(STEPS_PER_KERNEL, n - j)
                if per_promote is not None:
                    r = min(r, per_promote - (first + j) % per_promote)
                rows[j + r].copy_(step(rows[j:j + r + 1], first + j, u0 * unit))
                j += r
                if total is not None and (first + j) % per_promote == 0:  # type: ignore[operator]
                    total += rows[j]
                    rows[j].zero_()
            rows[0].copy_(rows[n])
        acc = rows[0] if total is None else rows[0] + total
        out[u0 * unit:u0 * unit + size].copy_(acc)


def _gemm_sums(a: Tensor, b: Tensor, block: int, dtype: torch.dtype) -> tuple[int, int, int, Sums]:
    """(units, unit, blocks, :data:`Sums`) of normalized ``a @ b``: the units are the rows of a
    2-D GEMM or the matrices of a batched one; each chunk of blocks is one batched GEMM (in
    ``dtype``). A last block shorter than ``block`` is a GEMM of its own (no padding: a copy of b)."""
    batched = b.dim() == 3
    shared = batched and a.dim() == 2  # one a for every matrix of b (a conv's weight)
    units, unit = (b.shape[0], a.shape[-2] * b.shape[2]) if batched else (a.shape[0], b.shape[1])
    k = a.shape[-1]
    full, rest = divmod(k, block)
    # block-major copy of a: each block's GEMM reads a contiguous matrix (the K-slices of b are)
    a_blocks = a[..., :full * block].unflatten(-1, (full, block)).movedim(-2, 0).to(dtype).contiguous()
    a_rest = a[..., full * block:].to(dtype)
    b = b.to(dtype)

    def sums(u0: int, u1: int, first: int, n: int, rows: Tensor) -> None:
        part_a = a_blocks if shared else a_blocks[:, u0:u1]
        part_rest = a_rest if shared else a_rest[u0:u1]
        part_b = b[u0:u1] if batched else b
        out_shape = (u1 - u0, a.shape[-2], b.shape[-1]) if batched else (u1 - u0, b.shape[-1])
        whole = min(n, full - first)  # full blocks in this chunk (the last chunk may end with the rest)
        if whole > 0:
            ak = part_a[first:first + whole]
            bk = part_b[..., first * block:(first + whole) * block, :].unflatten(-2, (whole, block)).movedim(-3, 0)
            out = rows[:whole].view(whole, *out_shape)
            if shared:  # a batch of one a: torch.matmul would copy it and its result; bmm reads it in place
                for j in range(whole):
                    _gemm_into(ak[j].expand(u1 - u0, *ak.shape[1:]), bk[j], out[j])
            else:
                _gemm_into(ak, bk, out)
        if whole < n:
            rest_a = part_rest.expand(u1 - u0, *part_rest.shape) if shared else part_rest
            _gemm_into(rest_a, part_b[..., full * block:, :], rows[n - 1].view(out_shape))

    return units, unit, full + (rest > 0), sums


def _gemm_into(a: Tensor, b: Tensor, out: Tensor) -> None:
    """``a @ b`` written into ``out`` (float block sums; integer codes: exact sums in float,
    held in int64)."""
    if out.dtype == a.dtype:
        (torch.bmm if a.dim() == 3 and b.dim() == 3 else torch.matmul)(a, b, out=out)
    else:
        out.copy_(torch.matmul(a, b))


def _float_step(fmt: Any, rounding: str, seed: Tensor | None, nb: int) -> Step:
    """The block adds of a float accumulator (:func:`_add_cast` where a cast rounds as ``fmt``)."""
    seeds = block_seeds(seed, 0, nb) if rounding == "stochastic" else None  # type: ignore[arg-type]
    dtype = cast_dtype(fmt, rounding)

    def step(span: Tensor, j: int, base: int) -> Tensor:
        if dtype is not None:
            return call(_add_cast, span, (), (dtype,), dynamic=(1,), casts=True)  # type: ignore[no-any-return]
        if seeds is None:
            return call(_add_float, span, (None, None), (fmt, rounding), dynamic=(1,))  # type: ignore[no-any-return]
        offset = torch.tensor(base, dtype=torch.int32, device=span.device)
        return call(_add_float, span, (seeds[j:j + span.shape[0] - 1], offset), (fmt, rounding),  # type: ignore[no-any-return]
                    dynamic=(1,))
    return step


def _float_start(init: Tensor | None, shape: Any, fmt: Any) -> Tensor | None:
    """The accumulator's start (a bias added first), flat, rounded to ``fmt`` to nearest."""
    if init is None:
        return None
    return fmt.quantize(torch.broadcast_to(init.float(), shape).reshape(-1).contiguous(), "nearest")  # type: ignore[no-any-return]


def matmul_float(a: Tensor, b: Tensor, fmt: Any, block: int, *, promote: int | None = None,
                 rounding: str = "nearest", seed: Tensor | None = None, init: Tensor | None = None) -> Tensor:
    """``a @ b`` ([..., M, K] @ [..., K, N], broadcast) with a float accumulator in ``fmt`` (see
    the module doc); ``init``: the accumulator's start (a bias added first), rounded to ``fmt``
    to nearest. float32 result. On the CPU the fused kernel runs it (:func:`fused_kernel`);
    elsewhere the torch path, :func:`_matmul_float`."""
    if rounding == "stochastic" and seed is None:
        raise ValueError("stochastic accumulation needs a seed")
    check_blocks(block, promote)
    a, b, shape = _normalized(a.float(), b.float())
    start = _float_start(init, shape, fmt)
    fused = fused_kernel(fmt, rounding) if _on_cpu(a, b, start) and math.prod(shape) and a.shape[-1] else None
    if fused is not None:
        return native.accumulate(fused[0], a, b, fused[1], block, promote, start, seed).view(shape)
    return _matmul_float(a, b, shape, fmt, block, promote, rounding, seed, start)


def _matmul_float(a: Tensor, b: Tensor, shape: Any, fmt: Any, block: int, promote: int | None, rounding: str,
                  seed: Tensor | None, start: Tensor | None) -> Tensor:
    """:func:`matmul_float` in torch, on normalized operands: batched GEMMs of blocks into a
    buffer, then compiled passes of block adds (:func:`_run`)."""
    nb = math.ceil(a.shape[-1] / block)
    out = torch.empty(math.prod(shape), dtype=torch.float32, device=a.device)
    step = _float_step(fmt, rounding, seed, nb)
    if out.numel():
        _run(*_gemm_sums(a, b, block, torch.float32), None if promote is None else promote // block, out, start, step)
    return out.view(shape)


def fused_kernel(fmt: Any, rounding: str) -> tuple[Any, tuple[int, ...]] | None:
    """(the fused kernel of :mod:`precsim.runtime.native`, ``fmt``'s parameters for it) where it
    applies: :data:`FUSED` and compiled kernels on, rounding to nearest or stochastic, a format
    it can round (:func:`~precsim.runtime.native.format_parameters`), the kernel built, and its
    bits equal to :func:`_matmul_float`'s on a probe of this format and rounding. Else None (a
    warning says why the kernel is missing or refused, once)."""
    if not (FUSED and rounding in ("nearest", "stochastic") and compile_requested()):
        return None
    params = native.format_parameters(fmt)
    if params is None:
        return None
    lib = _built_kernel()
    if lib is None or not _agrees(fmt, rounding):
        return None
    return lib, params


def _fused_int() -> Any:
    """The fused kernel for integer accumulators, where :func:`fused_kernel`'s conditions hold
    for them (its int16 wrap and saturate equal the torch path's on a probe)."""
    if not (FUSED and compile_requested()):
        return None
    lib = _built_kernel()
    return lib if lib is not None and _int_agrees() else None


@functools.cache
def _int_agrees() -> bool:
    """Whether the fused kernel's integer accumulators give the torch path's codes and overflow
    counts: int16 and int12, wrap and saturate, a start, promotion."""
    from precsim.runtime.backend import compiling

    g = torch.Generator().manual_seed(0)
    a = torch.randint(-128, 128, (13, 300), generator=g).float()
    b = torch.randint(0, 256, (300, 37), generator=g).float()
    init = torch.randint(-2000, 2000, (13 * 37,), generator=g)
    for bits, overflow, block, promote, start in ((16, "wrap", 32, None, init), (12, "saturate", 7, 21, None),
                                                 (16, "saturate", 300, None, init), (20, "wrap", 1, 64, None)):
        fused, events = native.accumulate_int(_built_kernel(), a, b, bits, overflow == "saturate", block, promote,
                                              start)
        ref, ref_events = torch.empty(13 * 37, dtype=torch.int64), torch.zeros((), dtype=torch.int64)
        with compiling(False):
            _matmul_int(a, b, bits, block, promote, overflow, start, torch.float32, ref, ref_events)
        if not (torch.equal(fused.view(-1), ref) and events == int(ref_events)):
            _refused(f"for int{bits} {overflow} it gives other codes than the torch path (block {block}, "
                     f"promote {promote})")
            return False
    return True


def _refused(why: str) -> None:
    warnings.warn(f"precsim: the fused accumulator kernel is not used: {why}. Those accumulators take the torch "
                  f"path: slower, the same results.", RuntimeWarning, stacklevel=4)


@functools.cache
def _built_kernel() -> Any:
    lib = native.library()
    if lib is None:
        _refused(native.why_missing())
    return lib


@functools.cache
def _agrees(fmt: Any, rounding: str) -> bool:
    """Whether the fused kernel gives the torch path's bits for ``fmt`` and ``rounding`` on a
    probe whose block sums are all exact in float32 (so that their order does not matter): sums
    on the format's subnormal grid, past its largest value, Inf and NaN inputs (any NaN: the
    payload is not part of the contract), ties, a start, promotion, blocks of 1, 7, 32 and all of
    K (stochastic: from a seed whose second word wraps around 2^32 across the blocks)."""
    from precsim.runtime.backend import compiling

    lib, params = _built_kernel(), native.format_parameters(fmt)
    g = torch.Generator().manual_seed(0)

    def exact(shape: tuple[int, int]) -> Tensor:  # 4-bit integers times 2^-2..2^2: sums of 300 exact
        return torch.randint(-7, 8, shape, generator=g).float() * 2.0 ** torch.randint(-2, 3, shape, generator=g)
    a, b = exact((13, 300)), exact((300, 37))
    a[0] *= 2.0 ** (fmt.min_exponent - 4)
    a[1] *= 2.0 ** (math.frexp(fmt.max)[1] - 8)
    a[2, 5], a[3, 9] = float("inf"), float("nan")
    init = exact((13, 37))
    seed = None if rounding == "nearest" else torch.tensor([0x1234567, 2**31 - 5], dtype=torch.int32)
    for block, promote, start in ((1, None, None), (7, 21, init), (32, 64, None), (300, None, init)):
        first = _float_start(start, (13, 37), fmt)
        fused = native.accumulate(lib, a, b, params, block, promote, first, seed).view(13, 37)  # type: ignore[arg-type]
        with compiling(False):
            ref = _matmul_float(a, b, (13, 37), fmt, block, promote, rounding, seed, first)
        if not ((fused.view(torch.int32) == ref.view(torch.int32)) | (fused.isnan() & ref.isnan())).all():
            _refused(f"for {fmt.name or fmt.spec} ({rounding}) it gives other bits than the torch path (block {block}, "
                     f"promote {promote})")
            return False
    return True


def exact_dtype(code_max_a: float, code_max_b: float, block: int) -> torch.dtype:
    """float32 where every block sum of integer codes is exact in it (below 2^24), else float64
    (exact below 2^53, which 16-bit codes and blocks up to 2^20 stay under)."""
    bound = code_max_a * code_max_b * block
    if bound < 2.0**24:
        return torch.float32
    if bound < 2.0**53:
        return torch.float64
    raise ValueError(f"integer accumulation: block sums reach {bound:.3g}, past float64's exact integers (2^53); "
                     "allowed: smaller blocks or narrower codes")


def matmul_int(a: Tensor, b: Tensor, bits: int, block: int, *, promote: int | None = None, overflow: str = "wrap",
               init: Tensor | None = None, dtype: torch.dtype = torch.float64) -> tuple[Tensor, Tensor]:
    """``a @ b`` of integer codes (float tensors holding integers) with a ``bits``-bit integer
    accumulator (see the module doc); ``init``: integer codes it starts from (kept in ``bits``
    bits too). Returns the int64 result and the number of overflow events (int64 scalar).
    ``dtype``: where block sums are computed (:func:`exact_dtype`). Promotion adds to an exact
    int64 total."""
    if not 8 <= bits <= 64:
        raise ValueError(f"integer accumulator width {bits} not allowed; allowed: 8..64")
    if overflow not in OVERFLOWS:
        raise ValueError(f"overflow {overflow!r} not allowed; allowed: {', '.join(OVERFLOWS)}")
    check_blocks(block, promote)
    a, b, shape = _normalized(a, b)
    out = torch.empty(math.prod(shape), dtype=torch.int64, device=a.device)
    count = torch.zeros((), dtype=torch.int64, device=a.device)
    lo = None if bits == 64 else torch.tensor(-(2 ** (bits - 1)), dtype=torch.int64, device=a.device)
    start = None
    if init is not None:
        pair = torch.stack([torch.zeros_like(out), torch.broadcast_to(init, shape).reshape(-1).to(torch.int64)])
        start, events = _add_int(pair, count, lo, overflow)
        count.copy_(events)

    lib = _fused_int() if (dtype == torch.float32 and bits <= native.MAX_INT_BITS and _on_cpu(a, b, start)
                           and out.numel() and a.shape[-1]) else None
    if lib is not None:
        result, events = native.accumulate_int(lib, a.float(), b.float(), bits, overflow == "saturate", block, promote,
                                               start)
        return result.view(shape), count + events
    _matmul_int(a, b, bits, block, promote, overflow, start, dtype, out, count)
    return out.view(shape), count


def _matmul_int(a: Tensor, b: Tensor, bits: int, block: int, promote: int | None, overflow: str,
                start: Tensor | None, dtype: torch.dtype, out: Tensor, count: Tensor) -> None:
    """:func:`matmul_int` in torch, on normalized operands, into ``out`` (flat int64), adding the
    overflow events to ``count``."""
    lo = None if bits == 64 else torch.tensor(-(2 ** (bits - 1)), dtype=torch.int64, device=a.device)

    def step(span: Tensor, j: int, base: int) -> Tensor:
        acc, events = call(_add_int, span, (count, lo), (overflow,), dynamic=(1,))
        count.copy_(events)
        return acc  # type: ignore[no-any-return]

    if out.numel():
        _run(*_gemm_sums(a, b, block, dtype), None if promote is None else promote // block, out, start, step)


# --- conv as a GEMM ---------------------------------------------------------------------------
def _tuple(v: Any, n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


def conv_as_matmul(x: Tensor, weight: Tensor, stride: Any = 1, padding: Any = 0, dilation: Any = 1,
                   groups: int = 1) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """A conv1d/2d/3d as ``a @ b`` with K in the order of ``weight.flatten(1)`` (channel, then
    each kernel axis, the last fastest), and the function that turns the GEMM's result into the
    conv's output. a is the weight ([C_out, K], or [G, C_out/G, K/G]), b the input's columns
    ([B, K, L], or [B, G, K/G, L]; im2col by one ``Tensor.unfold`` per spatial axis, whose
    backward autograd knows): the result is already in the conv's layout (no transposes of the
    large operand). An unbatched input gives an unbatched output."""
    n = weight.dim() - 2
    if n not in (1, 2, 3) or x.dim() not in (n + 1, n + 2):
        raise ValueError(f"accumulated conv: input of rank {x.dim()} and weight of rank {weight.dim()}; allowed: "
                         "conv1d, conv2d and conv3d, batched or not")
    unbatched = x.dim() == n + 1
    x, stride, padding, dilation = _explicit(x.unsqueeze(0) if unbatched else x, weight, stride, padding, dilation)
    cols = F.pad(x, [p for q in reversed(padding) for p in (q, q)]) if any(padding) else x
    for i, (k, s, d) in enumerate(zip(weight.shape[2:], stride, dilation, strict=True)):
        cols = cols.unfold(2 + i, d * (k - 1) + 1, s)  # [B, C, *out, *window]
    if any(d > 1 for d in dilation):
        cols = cols[(..., *(slice(None, None, d) for d in dilation))]
    bsz, cout, spatial = x.shape[0], weight.shape[0], cols.shape[2:2 + n]
    cols = cols.permute(0, 1, *range(2 + n, 2 + 2 * n), *range(2, 2 + n)).reshape(bsz, -1, math.prod(spatial))

    def back(out: Tensor) -> Tensor:
        out = out.reshape(bsz, cout, *spatial)
        return out[0] if unbatched else out
    if groups == 1:
        return weight.flatten(1), cols, back
    kg = cols.shape[1] // groups
    a = weight.reshape(groups, cout // groups, kg)
    return a, cols.view(bsz, groups, kg, cols.shape[2]), back


def _explicit(x: Tensor, weight: Tensor, stride: Any, padding: Any, dilation: Any) -> tuple[Tensor, tuple[int, ...],
                                                                                            tuple[int, ...],
                                                                                            tuple[int, ...]]:
    """(x, stride, padding, dilation) with one int per spatial axis: "same" pads x here (stride
    1; torch puts the odd element at the end), "valid" is no padding."""
    n = weight.dim() - 2
    stride, dilation = _tuple(stride, n), _tuple(dilation, n)
    if isinstance(padding, str):
        if padding == "same":
            totals = [d * (k - 1) for d, k in zip(dilation, weight.shape[2:], strict=True)]
            x = F.pad(x, [p for t in reversed(totals) for p in (t // 2, t - t // 2)])
        padding = 0
    return x, stride, _tuple(padding, n), dilation


def einsum_as_matmul(equation: str, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Callable[[Tensor], Tensor]]:
    """A two-operand ``torch.einsum`` as a batched GEMM ``[B, M, K] @ [B, K, N]`` and the function
    that turns its result into the einsum's. K runs over the summed subscripts shared by both
    operands in the order of the first operand's subscripts (its last one fastest); a subscript
    only one operand has and the output lacks is summed in float32 first (no GEMM sums it).
    Raises ValueError for what has no GEMM form here: ellipses, a subscript repeated in one operand."""
    spec = equation.replace(" ", "")
    if "..." in spec:
        raise ValueError(f"accumulated einsum {equation!r}: ellipses are not supported; allowed: explicit subscripts")
    ins, _, out = spec.partition("->")
    sa, sb = ins.split(",") if ins.count(",") == 1 else ("", "")
    if not sa or not sb or len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or len(sa) != a.dim() or (
            len(sb) != b.dim()):
        raise ValueError(f"accumulated einsum {equation!r} on operands of rank {a.dim()} and {b.dim()}: allowed: two "
                         "operands, one subscript per axis, none repeated within an operand")
    if "->" not in spec:  # implicit output: the subscripts seen once, in alphabetical order
        out = "".join(sorted(c for c in sa + sb if (sa + sb).count(c) == 1))
    a = a.sum([sa.index(c) for c in sa if c not in sb and c not in out]) if any(
        c not in sb and c not in out for c in sa) else a
    sa = "".join(c for c in sa if c in sb or c in out)
    b = b.sum([sb.index(c) for c in sb if c not in sa and c not in out]) if any(
        c not in sa and c not in out for c in sb) else b
    sb = "".join(c for c in sb if c in sa or c in out)
    batch = [c for c in sa if c in sb and c in out]
    summed = [c for c in sa if c in sb and c not in out]
    rows, cols = [c for c in sa if c not in sb], [c for c in sb if c not in sa]
    size = {c: max(a.shape[sa.index(c)] if c in sa else 1, b.shape[sb.index(c)] if c in sb else 1) for c in sa + sb}
    a = a.permute([sa.index(c) for c in batch + rows + summed]).expand([size[c] for c in batch + rows + summed])
    b = b.permute([sb.index(c) for c in batch + summed + cols]).expand([size[c] for c in batch + summed + cols])
    nb, nm, nk, nn_ = (math.prod(size[c] for c in group) for group in (batch, rows, summed, cols))
    order = batch + rows + cols

    def back(result: Tensor) -> Tensor:
        return result.reshape([size[c] for c in order]).permute([order.index(c) for c in out])

    return a.reshape(nb, nm, nk), b.reshape(nb, nk, nn_), back


def conv_float(x: Tensor, weight: Tensor, fmt: Any, block: int, *, stride: Any = 1, padding: Any = 0,
               dilation: Any = 1, promote: int | None = None, rounding: str = "nearest", seed: Tensor | None = None,
               init: Tensor | None = None) -> Tensor:
    """``conv1d/2d/3d(x, weight)`` (groups 1) with a float accumulator in ``fmt``, K in the order of
    ``weight.flatten(1)``: the bits of :func:`matmul_float` on :func:`conv_as_matmul`'s GEMM,
    without its im2col columns (on the zoo ResNet's 28x28 maps ``F.unfold`` alone took 4x the
    conv). Block j's sums are a conv of the input channels the block covers with the weight
    zero outside the block: the zeros add nothing while the input is finite (a non-finite
    input takes the GEMM, where 0 * Inf does not arise). ``init``: the start, of the output's
    shape (a bias added first), rounded to ``fmt`` to nearest."""
    if rounding == "stochastic" and seed is None:
        raise ValueError("stochastic accumulation needs a seed")
    check_blocks(block, promote)
    conv = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}.get(weight.dim() - 2)
    if conv is None or x.dim() not in (weight.dim() - 1, weight.dim()):
        raise ValueError(f"accumulated conv: input of rank {x.dim()} and weight of rank {weight.dim()}; allowed: "
                         "conv1d, conv2d and conv3d, batched or not")
    if x.dim() < weight.dim():  # one unbatched sample
        start = None if init is None else init.unsqueeze(0)
        return conv_float(x.unsqueeze(0), weight, fmt, block, stride=stride, padding=padding, dilation=dilation,
                          promote=promote, rounding=rounding, seed=seed, init=start)[0]
    shape = conv(x.to("meta"), weight.to("meta"), None, stride, padding, dilation).shape
    fused = fused_kernel(fmt, rounding) if _on_cpu(x, weight, init) and math.prod(shape) else None
    if fused is not None:
        return _conv_fused(*fused, x, weight, block, stride, padding, dilation, promote, _float_start(init, shape, fmt),
                           shape, seed)
    if not bool(torch.isfinite(x).all()):
        a, b, back = conv_as_matmul(x, weight, stride, padding, dilation)
        start = None if init is None else torch.broadcast_to(init, shape).reshape(*shape[:2], -1)
        return back(matmul_float(a, b, fmt, block, promote=promote, rounding=rounding, seed=seed, init=start))
    x, weight = x.float(), weight.float()
    cout, kernel = weight.shape[0], weight.shape[2:]
    per_channel = math.prod(kernel)
    flat = weight.reshape(cout, -1)
    k = flat.shape[1]
    nb = math.ceil(k / block)
    pieces = []  # (first channel, last channel + 1, the block's weight over those channels)
    for j in range(nb):
        k0, k1 = j * block, min(k, (j + 1) * block)
        c0, c1 = k0 // per_channel, (k1 - 1) // per_channel + 1
        w = flat.new_zeros(cout, (c1 - c0) * per_channel)
        w[:, k0 - c0 * per_channel:k1 - c0 * per_channel] = flat[:, k0:k1]
        pieces.append((c0, c1, w.view(cout, c1 - c0, *kernel)))

    def sums(u0: int, u1: int, first: int, n: int, rows: Tensor) -> None:
        for j in range(n):
            c0, c1, w = pieces[first + j]
            rows[j].view(u1 - u0, *shape[1:]).copy_(conv(x[u0:u1, c0:c1], w, None, stride, padding, dilation))

    out = torch.empty(math.prod(shape), dtype=torch.float32, device=x.device)
    start = _float_start(init, shape, fmt)
    if out.numel():
        _run(shape[0], math.prod(shape[1:]), nb, sums, None if promote is None else promote // block, out, start,
             _float_step(fmt, rounding, seed, nb))
    return out.view(shape)


def _conv_fused(lib: Any, params: tuple[int, ...], x: Tensor, weight: Tensor, block: int, stride: Any, padding: Any,
                dilation: Any, promote: int | None, start: Tensor | None, shape: Any, seed: Tensor | None) -> Tensor:
    """:func:`conv_float` through the fused kernel: a conv1d or conv2d as a conv3d with unit
    depth (and height), "same" padding made explicit (torch puts the extra element at the end)."""
    lift = 5 - x.dim()
    x, weight = x.reshape(*x.shape[:2], *[1] * lift, *x.shape[2:]), weight.reshape(
        *weight.shape[:2], *[1] * lift, *weight.shape[2:])
    padding = padding if isinstance(padding, str) else (0,) * lift + _tuple(padding, 3 - lift)
    x, stride, padding, dilation = _explicit(x, weight, (1,) * lift + _tuple(stride, 3 - lift), padding,
                                             (1,) * lift + _tuple(dilation, 3 - lift))
    out = native.accumulate_conv(lib, x.float(), weight.float(), stride, padding, dilation, params, block, promote,
                                 start, seed)
    return out.view(shape)


__all__ = ["BUFFER_BYTES", "MAX_CHUNK", "OVERFLOWS", "block_seeds", "cast_dtype", "check_blocks", "conv_as_matmul", "exact_dtype",
           "matmul_float", "matmul_int", "sum_cast", "sum_to_odd"]
