"""One process at a time per run folder: a lock file created with ``O_EXCL``.

Two sweeps writing one folder each rewrite the results files from their own memory, so the
last writer drops the other's rows; two identical sweeps both do all the work. The lock file
(``.precsim.lock`` in the folder) holds the holder's pid, host, start time and command as JSON,
so that a second sweep can say who holds the folder. It is removed when the holder ends,
also on an exception or Ctrl-C; a run killed hard (SIGKILL, power loss) leaves it behind, and
the next sweep takes it over when it is stale:

- same host and the pid is gone (or is a zombie, or is a newer process that reused the pid);
- or the file is unreadable (empty, truncated, garbage) and older than ``UNREADABLE_STALE_S``.

A lock from another host cannot be checked; the message says which file to delete. Take-overs
are serialized by ``flock`` on the folder, so two sweeps that find the same stale lock cannot
both take it (a lock is only ever deleted under that ``flock``, and only once it is stale).
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

LOCK_NAME = ".precsim.lock"
# An unreadable lock younger than this may be one that its creator is still writing.
UNREADABLE_STALE_S = 10.0
_READ_RETRY_S = 1.0


class FolderBusyError(ValueError):
    """The folder is locked by a live run (or by one that cannot be checked)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a folder: what the lock file says."""

    pid: int
    host: str
    started: str
    command: str = ""
    token: str = ""
    proc_start: int | None = None  # /proc start time of the pid (Linux), to detect pid reuse

    def describe(self) -> str:
        text = f"pid {self.pid} on host {self.host}, started {self.started}"
        return text + (f": {self.command}" if self.command else "")


def _proc_stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of ``pid`` from /proc, or None where there is no /proc."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # the name in parentheses may hold spaces
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def pid_alive(pid: int, proc_start: int | None = None) -> bool:
    """Whether ``pid`` is a running process of this host (and the same one, given its start time)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # os.kill(pid, 0) would terminate it there: assume it runs
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process: it exists
    stat = _proc_stat(pid)
    if stat is not None:
        state, start = stat
        if state == "Z" or (proc_start is not None and start != proc_start):
            return False  # a zombie, or a newer process that got the same pid
    return True


def read_holder(path: Path) -> tuple[Holder | None, str | None]:
    """The holder written in ``path``, or (None, what is wrong with the file)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as err:
        return None, f"cannot be read ({err.strerror})"
    if not raw.strip():
        return None, "is empty"
    try:
        data = json.loads(raw.decode("utf-8"))
        holder = Holder(pid=int(data["pid"]), host=str(data["host"]), started=str(data["started"]),
                        command=str(data.get("command", "")), token=str(data.get("token", "")),
                        proc_start=None if data.get("proc_start") is None else int(data["proc_start"]))
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as err:
        return None, f"is not a precsim lock ({type(err).__name__}: {err})"
    return holder, None


def stale_reason(holder: Holder | None, problem: str | None, age_s: float, host: str) -> str | None:
    """Why the lock may be taken over, or None when its holder may still be running."""
    if holder is None:
        if age_s >= UNREADABLE_STALE_S:
            return f"the lock file {problem} and is {age_s:.0f} s old"
        return None
    if holder.host != host:
        return None
    if not pid_alive(holder.pid, holder.proc_start):
        return f"its holder (pid {holder.pid}, started {holder.started}) is gone"
    return None


def busy_message(folder: Path, path: Path, holder: Holder | None, problem: str | None, host: str) -> str:
    if holder is None:
        return (f"output folder {str(folder)!r} is locked by {str(path)!r}, which {problem}; a sweep may be "
                f"starting there. If none is, delete {str(path)!r} (or wait {UNREADABLE_STALE_S:.0f} s: "
                "an unreadable lock is then taken over)")
    text = f"output folder {str(folder)!r} is in use by another precsim sweep ({holder.describe()})"
    if holder.host != host:
        return (f"{text}. precsim cannot check a process on another host: wait for it, use another --out, "
                f"or, if that run is gone, delete {str(path)!r}")
    return f"{text}. Wait for it to finish (or stop it: kill {holder.pid}), or use another --out"


@contextlib.contextmanager
def _takeover_guard(folder: Path) -> Iterator[None]:
    """An exclusive flock on the folder itself (released when the fd closes, also by a crash)."""
    try:
        import fcntl
    except ImportError:  # Windows: no flock; take-overs are then not serialized
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        with contextlib.suppress(OSError):  # a filesystem without flock: best effort
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


class FolderLock:
    """A held lock; ``release()`` (or leaving the ``with`` block) removes the file if still ours."""

    def __init__(self, path: Path, holder: Holder) -> None:
        self.path = path
        self.holder = holder
        self._held = True

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        with contextlib.suppress(FileNotFoundError):
            current, _ = read_holder(self.path)
            if current is not None and current.token == self.holder.token:
                self.path.unlink(missing_ok=True)

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()


def _create(path: Path, holder: Holder) -> bool:
    """Create ``path`` holding ``holder``; False if it exists."""
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(asdict(holder)) + "\n")
            f.flush()
            os.fsync(f.fileno())
    except BaseException as err:
        path.unlink(missing_ok=True)
        if isinstance(err, OSError) and err.filename is None:  # a full disk: say which file
            raise OSError(err.errno, f"{err.strerror} (writing {str(path)!r})") from err
        raise
    return True


def acquire(folder: str | Path, *, command: str = "", log: Callable[[str], None] | None = None) -> FolderLock:
    """Lock ``folder`` (created if missing) for this process; FolderBusyError if a live run holds it."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    host = socket.gethostname()
    stat = _proc_stat(os.getpid())
    me = Holder(pid=os.getpid(), host=host, started=datetime.now().astimezone().isoformat(timespec="seconds"),
                command=command, token=uuid.uuid4().hex, proc_start=stat[1] if stat else None)
    deadline = time.monotonic() + _READ_RETRY_S
    for _ in range(100):
        if _create(path, me):
            return FolderLock(path, me)
        with _takeover_guard(folder):
            try:
                holder, problem = read_holder(path)
                age = time.time() - path.stat().st_mtime
            except FileNotFoundError:
                continue  # released meanwhile: try again
            reason = stale_reason(holder, problem, age, host)
            if reason is not None:
                path.unlink()
                if log is not None:
                    log(f"precsim sweep: taking over {str(folder)!r}: {reason}")
                continue
        if holder is None and time.monotonic() < deadline:
            time.sleep(0.05)  # perhaps its creator is writing it: read it again
            continue
        raise FolderBusyError(busy_message(folder, path, holder, problem, host))
    raise FolderBusyError(f"could not lock output folder {str(folder)!r}: its lock {str(path)!r} keeps changing")


__all__ = ["LOCK_NAME", "UNREADABLE_STALE_S", "FolderBusyError", "FolderLock", "Holder", "acquire", "pid_alive",
           "read_holder", "stale_reason"]
