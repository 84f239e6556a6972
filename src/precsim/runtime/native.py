"""The fused accumulator kernel, ``accumulate_kernel.c``: built once per machine, called with ctypes.

Why C: an accumulator needs every block sum of a GEMM on its own. In torch they are a
``[blocks, M, N]`` buffer that a batched GEMM writes and the rounding reads back, about 4.5x the
plain GEMM at block 32 (fp16); fused into the GEMM's register tile they never reach memory
(about 2x). Inductor cannot generate that loop (a GEMM with a rounded scan over K), so the
kernel is a small C file in the package. It rounds float accumulators to nearest or
stochastically (:func:`accumulate`, :func:`accumulate_conv`) and keeps integer ones in W bits
(:func:`accumulate_int`).

It is built on first use with the system C compiler (``$CC``, else ``cc``, ``gcc`` or
``clang``), ``-O3 -march=native`` without ``-ffast-math`` (the rounding depends on IEEE adds),
into ``$PRECSIM_CACHE_DIR`` (default ``~/.cache/precsim``), named by a hash of the source, the
compiler, the flags and this CPU's features, and written atomically (two processes building it
at once both succeed). :func:`library` returns None, and says why, where it cannot be built or
loaded: the caller then takes the torch path (:mod:`precsim.runtime.accumulate` also checks the
kernel's bits against that path before first use).

Threads: ``torch.get_num_threads()``, in an OpenMP region of the kernel (``-fopenmp``). torch's
wheels load their own ``libgomp.so.1`` first, and the library's dependency on that name resolves
to it: the region runs on torch's thread pool. (A pool of Python threads, ctypes releasing the
GIL, competed with torch's threads, which spin for a while after each torch op: the 1024^3 GEMM
took 2.6 ms longer right after a matmul.) Where the compiler has no OpenMP, one thread.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import struct
import subprocess
import tempfile
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

SOURCE = "accumulate_kernel.c"
FLAGS = ("-O3", "-march=native", "-ffp-contract=fast", "-fno-math-errno", "-std=c11", "-fPIC", "-shared")
THREADS = ("-fopenmp",)  # a compiler without OpenMP builds a one-thread library
SMALL_FLOPS = 1 << 18  # below this many multiply-adds one thread runs the call (not worth waking others)
_L, _P = ctypes.c_long, ctypes.c_void_p
_SHARED = [_P, _P, _P, _L, _L, _P, ctypes.c_int]  # start, out, total, block, promote, format, threads
_GEMM = [_L, _L, _L, _L, _P, _L, _L, _L, _P, _L, _L, _L, *_SHARED]
_CONV = [_L, _L, _P, _L, _P, _P, *_SHARED]
_INT = [_L, _L, _L, _L, _P, _L, _L, _L, _P, _L, _L, _L, _P, _P, _P, _L, _L, ctypes.c_int, ctypes.c_int, ctypes.c_int,
        ctypes.POINTER(ctypes.c_long)]
MAX_INT_BITS = 48  # integer accumulators the kernel keeps (int64 adds of W-bit values and block sums < 2^24)
_OVERFLOW_BITS = {"inf": 0x7F800000, "nan": 0x7FC00000}  # and saturate: max's bits


def _bits(value: float) -> int:
    return int(struct.unpack("<i", struct.pack("<f", value))[0])


def format_parameters(fmt: Any) -> tuple[int, ...] | None:
    """The kernel's description of ``fmt`` rounded to nearest (``format()`` in the C file), or
    None where the kernel cannot round it: not a :class:`FloatFormat`, more than 21 mantissa
    bits (rounding to odd needs two spare bits of float32's 23), a smallest normal below 2^-126
    or a largest value beyond float32's (the bit arithmetic assumes float32's normal layout)."""
    from precsim.formats.float import FLOAT32_MAX, FloatFormat

    if not isinstance(fmt, FloatFormat):
        return None
    m, emin, top = fmt.mantissa_bits, fmt.min_exponent, fmt.max
    if not (1 <= m <= 21 and emin >= -126 and top < FLOAT32_MAX):
        return None
    over = _OVERFLOW_BITS.get(fmt.overflow, _bits(top))
    magic = 1.5 * 2.0 ** (emin - m + 23)  # its spacing is the subnormal quantum 2^(emin - m)
    return (23 - m, _bits(2.0**emin), _bits(top), over, int(fmt.has_negative_zero), _bits(magic), emin + 127,
            _bits(2.0 ** (emin - m)))


_why: list[str] = []  # why the library is missing (empty while it is not)


def cache_dir() -> Path:
    """Where built kernels are kept: ``$PRECSIM_CACHE_DIR``, else ``$XDG_CACHE_HOME/precsim``
    or ``~/.cache/precsim``."""
    if os.environ.get("PRECSIM_CACHE_DIR"):
        return Path(os.environ["PRECSIM_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "precsim"


def _compiler() -> list[str] | None:
    """The compiler's command: ``$CC`` (which may carry arguments, e.g. ``ccache gcc``), else
    the first of cc, gcc and clang on the PATH."""
    for words in (shlex.split(os.environ.get("CC", "")), ["cc"], ["gcc"], ["clang"]):
        found = shutil.which(words[0]) if words else None
        if found:
            return [found, *words[1:]]
    return None


def _cpu() -> str:
    """This CPU's features (``-march=native`` builds for exactly them)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return platform.processor()


def _build(source: bytes) -> Path:
    cc = _compiler()
    if cc is None:
        raise OSError("no C compiler found (set CC, or install cc, gcc or clang)")
    version = subprocess.run([*cc, "--version"], capture_output=True, text=True, timeout=60).stdout
    key = hashlib.sha256(b"\0".join([source, " ".join(cc).encode(), version.encode(),
                                     " ".join(FLAGS + THREADS).encode(), _cpu().encode(),
                                     platform.machine().encode()])).hexdigest()[:20]
    folder = cache_dir()
    target = folder / f"accumulate_{key}.so"
    if target.exists():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder, prefix="build-"))
    except OSError as err:
        raise OSError(f"cannot write the kernel into {str(folder)!r} ({err.strerror or err}); set "
                      "PRECSIM_CACHE_DIR to a writable folder") from err
    try:
        src, built = tmp / SOURCE, tmp / "kernel.so"
        src.write_bytes(source)
        for extra in (THREADS, ()):
            command = [*cc, *FLAGS, *extra, "-o", str(built), str(src)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode == 0:
                break
        if done.returncode != 0:
            said = (done.stderr or done.stdout).strip()
            raise OSError(f"{' '.join(command)} exited with status {done.returncode}"
                          f"{': ' + said[-600:] if said else ''} (set CC to a working C compiler)")
        os.replace(built, target)  # atomic: a reader sees the whole library or none
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


@functools.cache
def library() -> ctypes.CDLL | None:
    """The built kernel, or None (:func:`why_missing` says why). A cached file that does not
    load (damaged, e.g. cut short by a crash) is deleted and built again, once."""
    source = resources.files("precsim.runtime").joinpath(SOURCE).read_bytes()
    for attempt in (1, 2):
        try:
            path = _build(source)
        except (OSError, subprocess.SubprocessError) as err:
            _why.append(str(err))
            return None
        try:
            lib = ctypes.CDLL(str(path))
            for name, args in (("precsim_acc_gemm", _GEMM), ("precsim_acc_conv", _CONV),
                               ("precsim_acc_int_gemm", _INT), ("precsim_threaded", [])):
                fn = getattr(lib, name)
                fn.argtypes = args
                fn.restype = ctypes.c_int
            return lib
        except (OSError, AttributeError) as err:
            if attempt == 1:
                path.unlink(missing_ok=True)
                continue
            _why.append(f"{str(path)!r} does not load ({err}); delete it, or set PRECSIM_CACHE_DIR to another folder")
    return None


def threaded(lib: ctypes.CDLL) -> bool:
    """Whether the library was built with OpenMP (else it runs on one thread)."""
    return bool(lib.precsim_threaded())


def why_missing() -> str:
    """Why :func:`library` is None ('' while it is not)."""
    return _why[0] if _why else ""


def _operands(a: Tensor, b: Tensor) -> tuple[tuple[int, int, int, int], list[int]]:
    """((P, M, N, K), the GEMM's pointer and stride arguments) of ``a @ b``."""
    bs = b if b.dim() == 3 else b.unsqueeze(0)
    p, k, n = bs.shape
    sap = a.stride(0) if a.dim() == 3 else 0
    sbp = bs.stride(0) if bs.shape[0] > 1 else 0
    return (p, a.shape[-2], n, k), [a.data_ptr(), sap, a.stride(-2), a.stride(-1), bs.data_ptr(), sbp, bs.stride(1),
                                    bs.stride(2)]


def accumulate(lib: ctypes.CDLL, a: Tensor, b: Tensor, fmt: tuple[int, ...], block: int, promote: int | None,
               start: Tensor | None, seed: Tensor | None = None) -> Tensor:
    """``a @ b`` (float32 on the CPU; ``a`` [P, M, K] or [M, K] shared by every matrix, ``b``
    [P, K, N] or [K, N]) with the block sums added to an accumulator rounded in the format
    ``fmt`` (:func:`format_parameters`) to nearest, or stochastically with the bits
    :mod:`precsim.runtime.accumulate` draws from ``seed`` (two int32 words); ``promote`` in
    elements; ``start``: the accumulator's start, flat [P * M * N] float32, or None. Returns
    [P, M, N] float32."""
    size, operands = _operands(a, b)
    rounding = _format_array(fmt, seed)

    def call(buffers: list[Any], threads: int) -> int:
        return int(lib.precsim_acc_gemm(*size, *operands, *buffers, rounding, threads))
    return _launch(call, size, torch.float32, block, promote, start)


def accumulate_int(lib: ctypes.CDLL, a: Tensor, b: Tensor, bits: int, saturate: bool, block: int,
                   promote: int | None, start: Tensor | None) -> tuple[Tensor, int]:
    """:func:`accumulate` for integer codes (float32 tensors whose block sums are exact in
    float32) with a ``bits``-bit accumulator (8 .. :data:`MAX_INT_BITS`), wrapped or saturated;
    ``start``: int64 codes already kept in ``bits`` bits, flat, or None. Returns the int64
    result [P, M, N] and the number of adds that left the range."""
    size, operands = _operands(a, b)
    events = ctypes.c_long(0)

    def call(buffers: list[Any], threads: int) -> int:
        return int(lib.precsim_acc_int_gemm(*size, *operands, *buffers, bits, int(saturate), threads,
                                            ctypes.byref(events)))
    out = _launch(call, size, torch.int64, block, promote, start)
    return out, events.value


def accumulate_conv(lib: ctypes.CDLL, x: Tensor, weight: Tensor, stride: tuple[int, ...], padding: tuple[int, ...],
                    dilation: tuple[int, ...], fmt: tuple[int, ...], block: int, promote: int | None,
                    start: Tensor | None, seed: Tensor | None = None) -> Tensor:
    """:func:`accumulate` on the im2col GEMM of ``conv3d(x, weight)`` (groups 1; float32 on the
    CPU; explicit padding; a conv1d or conv2d lifted to unit depth and height), whose columns the
    kernel reads from ``x`` as it packs them: ``weight.flatten(1) @ unfold(x)``, without the
    columns in memory (on the zoo ResNet's 28x28 maps ``F.unfold`` took 2.6x the fused GEMM).
    Returns [P, Cout, D_out * H_out * W_out]."""
    x = x.contiguous()
    w = weight.reshape(weight.shape[0], -1).contiguous()  # the kernel steps one element along a row
    kernel = weight.shape[2:]
    out = [(n + 2 * p - d * (k - 1) - 1) // s + 1
           for n, k, s, p, d in zip(x.shape[2:], kernel, stride, padding, dilation, strict=True)]
    geometry = (ctypes.c_long * 19)(x.shape[1], *x.shape[2:], *kernel, *stride, *padding, *dilation, *out)
    size = (x.shape[0], w.shape[0], out[0] * out[1] * out[2], w.shape[1])
    rounding = _format_array(fmt, seed)

    def call(buffers: list[Any], threads: int) -> int:
        return int(lib.precsim_acc_conv(size[0], size[1], w.data_ptr(), w.stride(0), x.data_ptr(), geometry, *buffers,
                                        rounding, threads))
    return _launch(call, size, torch.float32, block, promote, start)


def _format_array(fmt: tuple[int, ...], seed: Tensor | None) -> Any:
    """:func:`format_parameters` and the rounding (nearest without a seed, else stochastic from
    its two words) as the kernel's int32 array."""
    words = (*fmt, 0, 0, 0) if seed is None else (*fmt, 1, *(int(w) for w in seed.tolist()))
    return (ctypes.c_int32 * len(words))(*words)


def _launch(call: Callable[[list[Any], int], int], size: tuple[int, int, int, int], dtype: torch.dtype, block: int,
            promote: int | None, start: Tensor | None) -> Tensor:
    """The output ([P, M, N] of ``dtype``) of ``call(buffers, threads)``, ``buffers`` being what
    every kernel takes after its operands: the start, output and promotion buffers, the block and
    the promotion. One thread below :data:`SMALL_FLOPS`."""
    p, m, n, k = size
    out = torch.empty(p, m, n, dtype=dtype)
    packed_k = block * max(1, 256 // block)  # the kernel's KC = 256 rounded to whole blocks
    total = torch.empty_like(out) if promote is not None and k > packed_k else None  # (else kept in the tile)
    start = None if start is None else start.contiguous()
    buffers = [None if start is None else start.data_ptr(), out.data_ptr(), None if total is None else total.data_ptr(),
               block, promote or 0]
    if call(buffers, 1 if p * m * n * k < SMALL_FLOPS else torch.get_num_threads()):
        raise MemoryError("the fused accumulator kernel could not allocate its packing buffers")
    return out
