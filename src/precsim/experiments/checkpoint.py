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

A checkpoint file is ``torch.save``'s bytes followed by a one-line trailer holding their
SHA-256 (``torch.load`` ignores bytes after the archive, so the file still loads with it).
Writes are atomic, so a torn write cannot happen here; the checksum catches files damaged or
truncated afterwards (a full disk under a copy, a bad sync), and every such file gives an
error naming it, what is wrong, and the way out.
"""

from __future__ import annotations

import hashlib
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
CHECKPOINT_DIR = "checkpoints"
_TRAILER_TAG = b"\nprecsim-checkpoint sha256="
_TRAILER_LEN = len(_TRAILER_TAG) + 64 + 1
_STATE_KEYS = {"version": int, "scheme": str, "scheme_fingerprint": str, "spec_fingerprint": str, "epoch": int,
               "model": dict, "optimizer": dict, "curves": list, "progress": dict, "rng": dict}


class CorruptFileError(ValueError):
    """A file precsim reads back is damaged; ``problem`` says how (the message adds the way out)."""

    def __init__(self, message: str, path: str | Path, problem: str) -> None:
        super().__init__(message)
        self.path = Path(path)
        self.problem = problem


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
    except BaseException as err:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(err, OSError) and err.filename is None:  # fsync/write errors name no file
            raise OSError(err.errno, f"{err.strerror} (writing {str(path)!r})") from err
        raise


def remove_temp_files(*folders: Path) -> list[Path]:
    """Delete the temporary files of atomic writes (``.<name>.*.tmp``) that a killed run left in
    ``folders``; call it only while holding the folder's lock (a live writer's file looks the same)."""
    found = [p for d in folders if d.is_dir() for p in sorted(d.glob(".*.tmp")) if p.is_file()]
    for p in found:
        p.unlink(missing_ok=True)
    return found


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


def checksummed_torch_bytes(obj: Any) -> bytes:
    """``torch.save`` bytes plus the trailer with their SHA-256."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    data = buffer.getvalue()
    return data + _TRAILER_TAG + hashlib.sha256(data).hexdigest().encode("ascii") + b"\n"


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    atomic_write_bytes(path, checksummed_torch_bytes(obj))


def torch_payload(data: bytes) -> tuple[bytes, str | None]:
    """(the ``torch.save`` bytes, what is wrong with the file or None).

    A file without the trailer (written before precsim checksummed checkpoints, or cut
    short) is returned whole: whether torch can read it decides."""
    if not data:
        return data, "it is empty (0 bytes)"
    tail = data[-_TRAILER_LEN:]
    if len(data) > _TRAILER_LEN and tail.startswith(_TRAILER_TAG) and tail.endswith(b"\n"):
        payload, digest = data[:-_TRAILER_LEN], tail[len(_TRAILER_TAG):-1].decode("ascii", "replace")
        if hashlib.sha256(payload).hexdigest() != digest:
            return payload, "its SHA-256 does not match the one written with it (the file was damaged)"
        return payload, None
    return data, None


def read_torch_file(path: str | Path) -> Any:
    """``torch.load`` of a file written by :func:`atomic_torch_save`, checked against its checksum.

    Raises CorruptFileError (naming the file and what is wrong, without the way out, which the
    caller knows) for a damaged file; FileNotFoundError if there is none."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise
    except OSError as err:
        raise CorruptFileError(f"{str(path)!r} cannot be read: {err.strerror}", path,
                               f"it cannot be read ({err.strerror})") from None
    payload, problem = torch_payload(data)
    if problem is None:
        try:
            return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
        except Exception as err:  # torch raises RuntimeError, UnpicklingError, OSError, EOFError, ...
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            problem = f"torch cannot read it, it is truncated or damaged ({len(data)} bytes; {first[:160]})"
    raise CorruptFileError(f"{str(path)!r} is corrupt: {problem}", path, problem)


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
                    curves: list[dict[str, Any]], progress: dict[str, Any],
                    row: dict[str, Any] | None = None) -> None:
    """Write the state after ``epoch`` finished epochs (atomically).

    ``progress``: plain numbers and flags of the run so far (times, steps, early stop).
    ``row``: the results row, once the scheme has finished: the checkpoint then holds all
    its results, so that a lost or damaged results file loses no row.
    """
    extra = {} if row is None else {"row": row}
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
        **extra,
    }, path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A checkpoint's state, checked: checksum, readable by torch, the keys and types it must have.

    Raises CorruptFileError (without the way out) or FileNotFoundError."""
    path = Path(path)
    state = read_torch_file(path)
    if not isinstance(state, dict):
        problem = f"it holds a {type(state).__name__}, not a precsim checkpoint"
        raise CorruptFileError(f"{str(path)!r} is corrupt: {problem}", path, problem)
    bad = [k for k, t in _STATE_KEYS.items() if not isinstance(state.get(k), t)]
    if bad:
        problem = f"it is not a precsim checkpoint (missing or wrong: {', '.join(bad)})"
        raise CorruptFileError(f"{str(path)!r} is corrupt: {problem}", path, problem)
    return state


def checkpoint_way_out(path: Path) -> str:
    return (f"delete it to train scheme {path.stem!r} again from its first epoch (the other schemes' results "
            "are kept), or use --fresh to start the whole folder over")


def load_checkpoint(path: str | Path, *, scheme_fingerprint: str, spec_fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at ``path``, or None if there is none.

    A damaged checkpoint, or one written for another scheme config or spec, raises ValueError
    naming the file and the way out: resuming it would crash or silently mix two experiments.
    """
    path = Path(path)
    if not path.is_file():
        return None
    try:
        state = read_checkpoint(path)
    except CorruptFileError as err:
        message = f"checkpoint {str(path)!r} is corrupt: {err.problem}; {checkpoint_way_out(path)}"
        raise CorruptFileError(message, path, err.problem) from None
    if state.get("version") != CHECKPOINT_VERSION:
        raise ValueError(f"checkpoint {str(path)!r} has version {state.get('version')!r}, "
                         f"expected {CHECKPOINT_VERSION}; rerun with --fresh")
    if state["scheme_fingerprint"] != scheme_fingerprint or state["spec_fingerprint"] != spec_fingerprint:
        raise ValueError(f"checkpoint {str(path)!r} belongs to a different sweep or scheme config; "
                         "use another --out folder, or --fresh to overwrite")
    return state


__all__ = ["CHECKPOINT_DIR", "CorruptFileError", "atomic_torch_save", "atomic_write_bytes", "atomic_write_json",
           "atomic_write_text", "capture_rng", "checkpoint_way_out", "checksummed_torch_bytes", "load_checkpoint",
           "read_checkpoint", "read_torch_file", "remove_temp_files", "restore_rng", "save_checkpoint", "torch_payload"]
