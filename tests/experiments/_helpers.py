"""Helpers: a tiny sweep config (seconds, not minutes), one-thread runs and a CLI runner."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

# The module the CLI tests run (`python -m <this> sweep ...`).
CLI_MODULE = "precsim.experiments.command"


def tiny_config(**changes: Any) -> dict[str, Any]:
    """A sweep that trains in about a second per scheme: 4/8/8-wide ResNet on 8x8 digits, 2 steps/epoch."""
    cfg: dict[str, Any] = {
        "model": {"name": "resnet", "widths": [4, 8, 8]},
        "dataset": {"name": "digits"},
        "optimizer": {"name": "sgd", "lr": 0.05},
        "epochs": 1,
        "batch_size": 32,
        "eval_batch_size": 100,
        "train_subset": 128,
        "test_subset": 100,
        "max_steps": 2,
        "schemes": ["fp32", "qint8"],
        "compile": False,  # eager kernels: compiling each format costs seconds, these runs take one
    }
    cfg.update(changes)
    return cfg


@contextlib.contextmanager
def single_thread() -> Iterator[None]:
    """One intra-op thread: these tiny models gain nothing from two, and on a busy 2-core machine
    OpenMP threads waiting for each other made the tests several times slower. Subprocesses get
    ``OMP_NUM_THREADS=1`` (see :func:`cli_env`), so in-process and subprocess runs compute alike
    (results are bit-identical only for the same thread count)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def cli_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def run_cli(args: list[str], cwd: Path, timeout: float = 120, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", CLI_MODULE, *args], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=cli_env(**env))
