"""How rounding runs fast: compiled kernels and their cache, in-place gradient ownership, and
allocator tuning. Same bits as the eager rounding of :mod:`precsim.formats` (tested), on by
default; ``PRECSIM_COMPILE=0`` or :func:`set_compile` selects the eager reference."""

from precsim.runtime.allocator import tune_allocator
from precsim.runtime.backend import compile_enabled, compiling, set_compile
from precsim.runtime.quantize import quantize

__all__ = ["compile_enabled", "compiling", "quantize", "set_compile", "tune_allocator"]
