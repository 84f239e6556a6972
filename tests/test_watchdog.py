"""The suite's hang watchdog (pyproject's pytest options): a stuck test ends the run, with tracebacks."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


def test_a_hanging_test_ends_the_run_with_tracebacks(tmp_path: Path) -> None:
    (tmp_path / "test_stuck.py").write_text("import time\n\ndef test_stuck():\n    time.sleep(600)\n")
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-c", str(PYPROJECT), "--rootdir", str(tmp_path),
                           "-o", "faulthandler_timeout=2", "-p", "no:cacheprovider", str(tmp_path)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert time.monotonic() - start < 120
    assert proc.returncode != 0
    assert "Timeout" in proc.stderr and "test_stuck" in proc.stderr, proc.stderr[-2000:]
