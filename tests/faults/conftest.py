"""Fixtures of the fault-injection tests: one uninterrupted reference run, one thread, the tally."""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from experiments._helpers import single_thread

from ._helpers import FAULTS, run_here, sweep_args, write_config


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    with single_thread():
        yield


@dataclass(frozen=True)
class Reference:
    out: Path
    seconds: float

    def copy(self, dest: Path) -> Path:
        """A copy of the finished folder (without its report: nothing reads it back)."""
        shutil.copytree(self.out, dest)
        return dest


@pytest.fixture(scope="session")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    """The sweep of ``_helpers.SCHEMES``, uninterrupted."""
    folder = tmp_path_factory.mktemp("reference")
    with single_thread():  # session fixtures start before the autouse one
        start = time.perf_counter()
        rc, err = run_here(sweep_args(write_config(folder), folder / "out"))
        seconds = time.perf_counter() - start
    assert rc == 0, err
    return Reference(folder / "out", seconds)


def pytest_terminal_summary(terminalreporter) -> None:  # type: ignore[no-untyped-def]
    if not FAULTS:
        return
    kinds: dict[str, list[int]] = {}
    for f in FAULTS:
        k = kinds.setdefault(f["kind"], [0, 0, 0])
        k[0] += f["count"]
        k[1] += f["count"] if f["survived"] else 0
        k[2] += f["rows_lost"]
    total = [sum(k[i] for k in kinds.values()) for i in range(3)]
    terminalreporter.write_line(f"precsim fault injection: {total[0]} faults injected, {total[1]} survived, "
                                f"{total[2]} rows lost")
    for kind, (n, ok, lost) in kinds.items():
        terminalreporter.write_line(f"  {kind}: {n} injected, {ok} survived, {lost} rows lost")
