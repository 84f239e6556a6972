"""Fixtures shared by every test folder."""

from __future__ import annotations

import pytest

from precsim.formats.backend import compile_enabled, set_compile


@pytest.fixture
def compiled():
    """Compiled kernels for one test (the default is the eager reference)."""
    before = compile_enabled()
    set_compile(True)
    yield
    set_compile(before)
