"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest

from precsim.formats.backend import compile_enabled, compiler_works, set_compile


@pytest.fixture
def requires_compiler() -> None:
    """Skips a test of the compiled paths where torch.compile cannot be used (the kernels then
    run eagerly, see ``compiler_works``: those tests would test the eager path twice)."""
    if not compiler_works():
        pytest.skip("torch.compile gives other bits than eager here: the kernels run eagerly")


@pytest.fixture
def compiled(requires_compiler):  # type: ignore[no-untyped-def]
    """Compiled kernels for one test (the default is the eager reference)."""
    before = compile_enabled()
    set_compile(True)
    yield
    set_compile(before)
