"""Keep freed memory in the process, so that new tensors do not page-fault (glibc only).

On CPU, torch allocates tensors with malloc. glibc serves blocks over its mmap threshold (a few
MB, adapting) with fresh pages from the kernel and trims the heap top when memory is freed, so
a training step whose activations are a few MB each pays a page fault per 4 KiB of every new
tensor. A quantization point adds a new tensor in each direction, so it pays more of them than
the layer it follows: 14,000 faults per step for int8 on the zoo ResNet against 600 for FP32,
and ratios to FP32 that moved by 0.4 with the mix of other models alive in the process.

:func:`tune_allocator` raises the mmap threshold to glibc's maximum (32 MiB) and stops trimming,
the tuning torch's CPU performance guide reaches with jemalloc or tcmalloc. The process then
keeps its peak heap for reuse instead of returning it to the system. It is a process-wide
setting: ``precsim sweep`` and ``benchmarks/train_step.py`` apply it; a library call never does
unless asked.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024 * 1024  # glibc's largest allowed value on 64-bit
TRIM_THRESHOLD = 2**31 - 1


@functools.cache
def tune_allocator() -> bool:
    """Tell glibc's malloc to keep freed memory; True if it took effect (False off glibc)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
