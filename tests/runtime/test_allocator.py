"""tune_allocator takes effect on glibc and reports honestly elsewhere."""

from __future__ import annotations

import platform
import sys

import precsim


def test_tune_allocator_takes_effect_on_glibc() -> None:
    on_glibc = sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"
    assert precsim.tune_allocator() is on_glibc
