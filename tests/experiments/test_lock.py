"""The run-folder lock: one holder, a clear message naming it, stale locks taken over once."""

from __future__ import annotations

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from precsim.experiments.lock import LOCK_NAME, UNREADABLE_STALE_S, FolderBusyError, acquire, pid_alive


def _dead_pid() -> int:
    """The pid of a process that has ended (and been reaped)."""
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def _write_lock(folder: Path, text: str, age_s: float = 0.0) -> Path:
    path = folder / LOCK_NAME
    path.write_text(text)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def test_held_lock_names_its_holder_and_is_released(tmp_path: Path) -> None:
    with acquire(tmp_path, command="precsim sweep --out x") as lock:
        data = json.loads((tmp_path / LOCK_NAME).read_text())
        assert data["pid"] == os.getpid() and data["host"] == socket.gethostname()
        with pytest.raises(FolderBusyError) as err:
            acquire(tmp_path)
        text = str(err.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in text and lock.holder.started in text
        assert "precsim sweep --out x" in text and "another --out" in text
    assert not (tmp_path / LOCK_NAME).exists()
    acquire(tmp_path).release()  # free again


def test_lock_released_on_exception(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError), acquire(tmp_path):
        raise RuntimeError("boom")
    assert not (tmp_path / LOCK_NAME).exists()


def test_stale_lock_of_a_dead_pid_is_taken_over(tmp_path: Path) -> None:
    pid = _dead_pid()
    assert not pid_alive(pid)
    _write_lock(tmp_path, json.dumps({"pid": pid, "host": socket.gethostname(), "started": "then"}))
    said: list[str] = []
    with acquire(tmp_path, log=said.append) as lock:
        assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == lock.holder.token
    assert len(said) == 1 and f"pid {pid}" in said[0] and "is gone" in said[0]


def test_reused_pid_is_not_its_holder(tmp_path: Path) -> None:
    # Our own pid, but another process start time: the holder was an earlier process with this pid.
    _write_lock(tmp_path, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "started": "then",
                                      "proc_start": 1}))
    if not Path(f"/proc/{os.getpid()}/stat").exists():
        pytest.skip("no /proc: pid reuse cannot be detected")
    acquire(tmp_path).release()


@pytest.mark.parametrize("text", ["", "{\"pid\": 1", "\x00\x01garbage"], ids=["empty", "truncated", "garbage"])
def test_unreadable_lock_taken_over_when_old_refused_when_young(tmp_path: Path, text: str) -> None:
    path = _write_lock(tmp_path, text)
    with pytest.raises(FolderBusyError, match="delete") as err:
        acquire(tmp_path)
    assert str(path) in str(err.value)
    _write_lock(tmp_path, text, age_s=UNREADABLE_STALE_S + 1)
    acquire(tmp_path).release()


def test_lock_of_another_host_is_never_taken_over(tmp_path: Path) -> None:
    path = _write_lock(tmp_path, json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}),
                       age_s=3600)
    with pytest.raises(FolderBusyError) as err:
        acquire(tmp_path)
    assert "host elsewhere" in str(err.value) and f"delete {str(path)!r}" in str(err.value)


def _contend(folder: str, go: multiprocessing.Event, results: multiprocessing.Queue) -> None:
    go.wait()
    try:
        lock = acquire(folder)
    except FolderBusyError:
        results.put("busy")
        return
    results.put("won")
    time.sleep(1.0)  # hold it while the others try
    lock.release()


def test_racing_processes_over_a_stale_lock_one_wins(tmp_path: Path) -> None:
    _write_lock(tmp_path, json.dumps({"pid": _dead_pid(), "host": socket.gethostname(), "started": "then"}))
    ctx = multiprocessing.get_context("fork")
    go, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), go, results)) for _ in range(6)]
    for p in procs:
        p.start()
    go.set()
    outcome = sorted(results.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    assert outcome == ["busy"] * 5 + ["won"]
    assert not (tmp_path / LOCK_NAME).exists()
