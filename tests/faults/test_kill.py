"""kill -9 at random points of a sweep, then resume: nothing written is lost, the rest is rebuilt.

Each seed kills the sweep (a forked process: a real one, without a second torch import) after a
random delay within the duration of a whole run, checks what is on disk, and resumes; the last
seeds kill the resumed runs too.
The resumed folder must equal the uninterrupted run bit for bit (rows and curves).
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import pytest

from experiments._helpers import single_thread

from ._helpers import assert_complete, assert_subset, fault, run_here, start_forked, sweep_args, write_config


@pytest.fixture(scope="module")
def run_seconds(tmp_path_factory: pytest.TempPathFactory, reference) -> float:
    """How long a forked sweep takes from start to end (the window the kills are drawn from);
    it also checks that a forked run gives the reference's bits."""
    folder = tmp_path_factory.mktemp("forked")
    with single_thread():
        start = time.perf_counter()
        proc = start_forked(sweep_args(write_config(folder), folder / "out"), folder / "run.log")
        proc.join(timeout=120)
        seconds = time.perf_counter() - start
    assert proc.exitcode == 0, (folder / "run.log").read_text()
    assert_complete(folder / "out", reference.out)
    return seconds


@pytest.mark.parametrize("seed,kills", [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2), (5, 2), (6, 3)])
def test_kill_at_random_points_then_resume(tmp_path: Path, reference, run_seconds: float, seed: int,
                                            kills: int) -> None:
    rng = random.Random(seed)
    cfg, out = write_config(tmp_path), tmp_path / "out"
    args = sweep_args(cfg, out)
    present: set[str] = set()
    with fault("kill -9", count=kills) as f:
        for k in range(kills):
            proc = start_forked(args, tmp_path / f"run{k}.log")
            time.sleep(rng.uniform(0.0, run_seconds))
            if proc.exitcode is None:
                os.kill(proc.pid, signal.SIGKILL)
            else:
                f["count"] -= 1  # it had finished: nothing was injected
            proc.join(timeout=60)
            log = (tmp_path / f"run{k}.log").read_text()
            assert proc.exitcode in (0, -signal.SIGKILL), log
            now = assert_subset(out, reference.out)  # what survived the kill is exact
            f["rows_lost"] += len(present - now)
            present = now
        rc, err = run_here(args)
        assert rc == 0, err
        assert_complete(out, reference.out)
        f["rows_lost"] += len(present - assert_subset(out, reference.out))


def test_a_rerun_removes_the_temporary_files_a_kill_left_in_every_folder_it_writes(tmp_path: Path,
                                                                                   reference) -> None:
    """A kill between an atomic write's temporary file and its rename leaves ``.<name>.*.tmp``
    wherever precsim writes (the folder, checkpoints, telemetry, debug digests); the rerun
    removes each one, says so, and touches nobody else's files."""
    out = reference.copy(tmp_path / "out")
    left = [out / ".results.json.a1.tmp", out / "checkpoints" / ".q_sr.pt.b2.tmp",
            out / "stats" / ".q_sr.csv.c3.tmp", out / "debug" / ".q_sr.json.d4.tmp"]
    for p in left:
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(b"torn")
    theirs = out / "stats" / "notes.tmp"  # not precsim's pattern: kept
    theirs.write_text("mine")
    with fault("temporary file left"):
        rc, err = run_here(sweep_args(write_config(tmp_path), out))
        assert rc == 0, err
        for p in left:
            assert not p.exists() and f"removed {str(p)!r}" in err
        assert theirs.read_text() == "mine"
        theirs.unlink()
        assert_complete(out, reference.out)
