"""Fixtures shared by every test folder.

The suite checks the eager reference by default (``PRECSIM_COMPILE=0`` for this process and the
processes it starts): it exercises hundreds of formats, shapes and settings, and compiling a
kernel for each on a fresh Inductor cache would take CI past its time. Users get the compiled
kernels by default; tests that ask for the fixture ``compiled`` (and the sweep, which turns
them on) check that path against the reference bit for bit, and ``tests/runtime/test_default_path.py``
checks, in a fresh process, that the default is the compiled path.
"""

from __future__ import annotations

import os

import pytest

os.environ["PRECSIM_COMPILE"] = "0"  # before precsim reads it (subprocesses inherit it)

from precsim.runtime.backend import compile_enabled, compiler_works, set_compile  # noqa: E402

set_compile(False)


@pytest.fixture
def requires_compiler() -> None:
    """Skips a test of the compiled paths where torch.compile cannot be used (the kernels then
    run eagerly, see ``compiler_works``: those tests would test the eager path twice)."""
    if not compiler_works():
        pytest.skip("torch.compile gives other bits than eager here: the kernels run eagerly")


@pytest.fixture
def compiled(requires_compiler):  # type: ignore[no-untyped-def]
    """Compiled kernels for one test (the suite's default is the eager reference)."""
    before = compile_enabled()
    set_compile(True)
    yield
    set_compile(before)
