"""Two sweeps into one folder: the second fails at once naming the holder; no row is lost."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

from precsim.experiments.lock import LOCK_NAME
from precsim.experiments.sweep import EPOCH_SLEEP_ENV

from ._helpers import assert_complete, assert_subset, fault, run_here, start_forked, sweep_args, write_config


def _slow_epochs() -> None:
    os.environ[EPOCH_SLEEP_ENV] = "0.5"  # in the child: it holds the folder a little longer


def test_second_sweep_fails_at_once_and_rows_of_both_are_kept(tmp_path: Path, reference) -> None:
    """The issue's case: `sweep --schemes fp32,qint8 & sweep --schemes q_sr` into one --out."""
    cfg, out = write_config(tmp_path), tmp_path / "out"
    first = start_forked(sweep_args(cfg, out, "--schemes", "fp32,qint8"), tmp_path / "first.log", _slow_epochs)
    deadline = time.monotonic() + 100
    while not (out / LOCK_NAME).exists():
        assert first.exitcode is None, (tmp_path / "first.log").read_text()
        assert time.monotonic() < deadline, "the first sweep did not start in time"
        time.sleep(0.02)
    with fault("concurrent sweep"):
        for schemes in ("q_sr", "fp32,qint8"):  # another scheme, and the very same command
            start = time.monotonic()
            rc, err = run_here(sweep_args(cfg, out, "--schemes", schemes))
            assert rc == 2 and time.monotonic() - start < 10, err
            assert f"in use by another precsim sweep (pid {first.pid} on host {socket.gethostname()}, started" in err
            assert "--schemes fp32,qint8" in err and f"kill {first.pid}" in err  # its command line, the way out
        first.join(timeout=120)
        assert first.exitcode == 0, (tmp_path / "first.log").read_text()
        assert assert_subset(out, reference.out) == {"fp32", "qint8"}
        rc, err = run_here(sweep_args(cfg, out, "--schemes", "q_sr"))  # now it may run: rows are merged
        assert rc == 0, err
        assert_complete(out, reference.out)


def test_identical_sweeps_started_together_run_once(tmp_path: Path, reference) -> None:
    cfg, out = write_config(tmp_path), tmp_path / "out"
    with fault("concurrent sweep"):
        procs = [start_forked(sweep_args(cfg, out), tmp_path / f"{i}.log") for i in range(2)]
        for p in procs:
            p.join(timeout=120)
        logs = [(tmp_path / f"{i}.log").read_text() for i in range(2)]
        assert sorted(p.exitcode for p in procs) == [0, 2], logs
        loser = logs[[p.exitcode for p in procs].index(2)]
        winner = procs[[p.exitcode for p in procs].index(0)]
        assert f"pid {winner.pid} on host" in loser and "skipped" not in loser
        assert "in use by another precsim sweep" in loser and "accuracy" not in loser  # it trained nothing
        assert_complete(out, reference.out)
