"""A write that fails (a full disk): a clear message, the lock released, nothing half-written,
and the same command afterwards completes the sweep exactly."""

from __future__ import annotations

import errno
import os
import resource
import signal
from pathlib import Path

import pytest

from ._helpers import assert_complete, assert_subset, fault, run_here, start_forked, sweep_args, write_config


def _fail_fsync_at(k: int):  # type: ignore[no-untyped-def]
    """In the child: the k-th fsync fails with ENOSPC, as on a full disk (fsync reports it)."""
    def setup() -> None:
        real, calls = os.fsync, [0]

        def fsync(fd: int) -> None:
            calls[0] += 1
            if calls[0] == k:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd)

        os.fsync = fsync
    return setup


def _file_size_limit(limit: int):  # type: ignore[no-untyped-def]
    """In the child: the kernel refuses to write past ``limit`` bytes in any file (EFBIG)."""
    def setup() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    return setup


# fsync calls: 1 the lock file, 2 spec.json, 3 fp32's first checkpoint, 6-8 fp32's results files,
# 13 qint8's final checkpoint; the kernel's file size limit stops the first checkpoint (62 kB).
@pytest.mark.parametrize("setup,expected", [
    (_fail_fsync_at(3), "No space left on device"), (_fail_fsync_at(13), "No space left on device"),
    (_file_size_limit(20_000), "File too large"),
], ids=["checkpoint", "final-checkpoint", "rlimit-fsize"])
def test_write_error_then_rerun(tmp_path: Path, reference, setup, expected: str) -> None:
    cfg, out = write_config(tmp_path), tmp_path / "out"
    args = sweep_args(cfg, out)
    with fault("write error") as f:
        proc = start_forked(args, tmp_path / "run.log", setup)
        proc.join(timeout=120)
        log = (tmp_path / "run.log").read_text()
        assert proc.exitcode == 1, log
        assert f"error: [Errno {errno.ENOSPC if 'space' in expected else errno.EFBIG}] {expected}" in log
        assert "(writing '" in log and "run the same command again" in log and "Traceback" not in log
        assert not (out / ".precsim.lock").exists()  # released on the error
        assert not list(out.rglob("*.tmp")) if out.exists() else True
        before = assert_subset(out, reference.out)
        rc, err = run_here(args)
        assert rc == 0, err
        assert_complete(out, reference.out)
        f["rows_lost"] = len(before - assert_subset(out, reference.out))
