"""Atomic files and per-epoch checkpoints, so an interrupted sweep loses at most one epoch.

Every file is written to a temporary file in the same folder, flushed to disk, and moved over
the old one with ``os.replace`` (atomic on POSIX and Windows): a reader, or a rerun after a
crash or Ctrl-C, sees either the old file or the new one, never half of one.

A checkpoint holds everything that determines the rest of the run: model state (weights,
BatchNorm statistics and every quantizer buffer: observer ranges, step counters that seed
stochastic rounding, gradient scales), optimizer state, the number of finished epochs, the
curves so far, the time and steps spent so far, and the RNG states. The data order of epoch ``k`` is a
function of (seed, k) (see :mod:`precsim.experiments.train`), so a resumed run continues
bit for bit.
"""

from __future__ import annotations

import io
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_VERSION = 1


def _file_mode() -> int:
    """The mode a plain ``open()`` would create files with (mkstemp's is always 0600)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_FILE_MODE = _file_mode()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is never seen half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """JSON with NaN/Inf written as null (strict JSON has no NaN)."""
    atomic_write_text(path, json.dumps(_json_safe(obj), indent=2, allow_nan=False) + "\n")


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float) and (obj != obj or obj in (float("inf"), float("-inf"))):
        return None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


# ---------------------------------------------------------------------------- RNG state


def capture_rng() -> dict[str, Any]:
    """torch (CPU and CUDA), Python and NumPy global RNG states, in torch.load-safe types."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": [str(np_state[0]), torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | Path, *, scheme: str, scheme_fingerprint: str, spec_fingerprint: str,
                    epoch: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    curves: list[dict[str, Any]], progress: dict[str, Any]) -> None:
    """Write the state after ``epoch`` finished epochs (atomically).

    ``progress``: plain numbers and flags of the run so far (times, steps, early stop).
    """
    atomic_torch_save({
        "version": CHECKPOINT_VERSION,
        "scheme": scheme,
        "scheme_fingerprint": scheme_fingerprint,
        "spec_fingerprint": spec_fingerprint,
        "epoch": epoch,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "curves": curves,
        "progress": dict(progress),
        "rng": capture_rng(),
    }, path)


def load_checkpoint(path: str | Path, *, scheme_fingerprint: str, spec_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None if there is none.

    A checkpoint written for another scheme config or spec raises ValueError: resuming it
    would silently mix two experiments.
    """
    path = Path(path)
    if not path.is_file():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {str(path)!r} has version {state.get('version')!r}, "
                         f"expected {CHECKPOINT_VERSION}; rerun with --fresh")
    if state["scheme_fingerprint"] != scheme_fingerprint or state["spec_fingerprint"] != spec_fingerprint:
        raise ValueError(f"checkpoint {str(path)!r} belongs to a different sweep or scheme config; "
                         "use another --out folder, or --fresh to overwrite")
    return state


__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_json", "atomic_write_text", "capture_rng",
           "load_checkpoint", "restore_rng", "save_checkpoint"]
