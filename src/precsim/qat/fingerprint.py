"""The config fingerprint of a quantization point, saved in its ``state_dict``.

A point's buffers mean something only under the config that made them: an int8 per-channel
range loaded into a per-tensor or an int4 point, or a moving average into a ``minmax`` point,
would load without a word, since the keys match. So each
:class:`~precsim.qat.quantizer.Quantizer` saves what gives its buffers their meaning (its
``get_extra_state``, key ``<point>._extra_state``), and ``load_state_dict`` raises where a
saved point differs from the model's, unless inside :func:`loading_any_config`.

The fingerprint is a uint8 tensor holding a small JSON object, not the object itself: a
``state_dict`` of tensors only still goes through safetensors, ``{k: v.clone() ...}`` loops
and ``.to(device)``. A ``state_dict`` saved before fingerprints has no such key and loads as
before, also with ``strict=True``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

from precsim.qat.config import RoleSpec

EXTRA_STATE = "_extra_state"  # torch's state_dict key for a module's get_extra_state()
SHOWN = 5  # differing points listed in an error; the rest are counted

_ANY_CONFIG: ContextVar[bool] = ContextVar("precsim_loading_any_config", default=False)


def fingerprint(role: str, spec: RoleSpec | None, grad_spec: RoleSpec | None) -> dict[str, str]:
    """What gives a point's buffers their meaning: role, format (its spec holds granularity and
    axis), observer, delayed ranges, gradient format and scale.

    Not the rounding, the STE or the observer's momentum: they change how later steps move the
    state, not what the saved state is. A percentile observer's q is kept: it is which range.
    """
    fp = {"role": role, "format": "fp32" if spec is None else spec.format.spec}
    if spec is not None and spec.format.observed:
        fp["observer"] = spec.observer + (f"({spec.percentile:g})" if spec.observer == "percentile" else "")
    if spec is not None and spec.delayed:
        fp["delayed"] = "true"
    if grad_spec is not None:
        fp["gradient"] = grad_spec.format.spec
        if grad_spec.delayed:
            fp["gradient_delayed"] = "true"
        if grad_spec.scale is not None:
            fp["gradient_scale"] = str(grad_spec.scale)
    return fp


def encode(fp: dict[str, str]) -> Tensor:
    """The fingerprint as a uint8 tensor of its JSON text (a ``state_dict`` value)."""
    return torch.tensor(list(json.dumps(fp).encode()), dtype=torch.uint8)


def decode(saved: Any) -> dict[str, str] | None:
    """A saved fingerprint (:func:`encode`); None where it cannot be read."""
    try:
        fp = json.loads(bytes(torch.as_tensor(saved).detach().cpu().to(torch.uint8).tolist()).decode())
    except (TypeError, ValueError, RuntimeError):
        return None
    return fp if isinstance(fp, dict) else None


@contextmanager
def loading_any_config() -> Iterator[None]:
    """Inside, ``load_state_dict`` takes a saved state whatever config its quantization points
    were prepared with: the buffers load as they are, and fitting them is the caller's task
    (keys and shapes are still checked by torch)."""
    token = _ANY_CONFIG.set(True)
    try:
        yield
    finally:
        _ANY_CONFIG.reset(token)


def checking() -> bool:
    """Whether loads compare fingerprints now (False inside :func:`loading_any_config`)."""
    return not _ANY_CONFIG.get()


def _show(fp: dict[str, str] | None) -> str:
    if fp is None:
        return "{unreadable}"
    return "{" + ", ".join(f"{k}={v}" for k, v in fp.items()) + "}"


def mismatch_message(owner: str, differing: list[tuple[str, dict[str, str] | None, dict[str, str]]],
                     total: int) -> str:
    """The error for points whose saved fingerprint differs from the model's: (path, saved,
    current) of each, the first :data:`SHOWN` listed, and the way out."""
    n = len(differing)
    lines = [f"{owner}: the state_dict was saved from a model prepared with another config: {n} of {total} "
             f"quantization points {'differs' if n == 1 else 'differ'}, and the buffers would load with another "
             "meaning:"]
    lines += [f"  {path}: saved {_show(saved)}, this model {_show(current)}"
              for path, saved, current in differing[:SHOWN]]
    if len(differing) > SHOWN:
        lines.append(f"  ... and {len(differing) - SHOWN} more")
    lines.append("Prepare the model with the config the state_dict was saved with, or load inside "
                 "`with precsim.loading_any_config():` to take the buffers as they are.")
    return "\n".join(lines)


__all__ = ["EXTRA_STATE", "checking", "decode", "encode", "fingerprint", "loading_any_config", "mismatch_message"]


class Fingerprinted(torch.nn.Module):
    """A point whose ``state_dict`` carries its config fingerprint (``self.fingerprint``), and
    whose load refuses a state saved under another config (see the module doc)."""

    fingerprint: dict[str, str]

    def get_extra_state(self) -> Tensor:
        """The config fingerprint: a saved state carries what its buffers mean."""
        return encode(self.fingerprint)

    def set_extra_state(self, state: Any) -> None:
        """Nothing to restore: :meth:`_load_from_state_dict` compared the fingerprint."""

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                              strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                              error_msgs: list[str]) -> None:
        key = prefix + EXTRA_STATE
        if key in state_dict and checking():  # a prepared model's load pre-hook raised already if it held us
            saved = decode(state_dict[key])
            if saved != self.fingerprint:
                path = prefix[:-1] or f"the {type(self).__name__.lower()}"
                error_msgs.append(mismatch_message(type(self).__name__, [(path, saved, self.fingerprint)], 1))
                return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if key not in state_dict and key in missing_keys:  # saved before fingerprints: nothing is missing
            missing_keys.remove(key)

