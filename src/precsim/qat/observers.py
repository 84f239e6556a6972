"""Observers: how the range of a scaled (integer) format is measured.

State lives in registered buffers, so ``state_dict()``/``load_state_dict()`` restore it exactly
(the I-ViT reference keeps ranges in plain attributes and loses them on reload).

Every observer measures the finite values only. A tensor (or a channel) with no finite value
leaves the stored range as it was, [0, 0] before any: one all-NaN or all-Inf batch says
nothing about the range, and must not pull a moving average towards zero. The point then
rounds on that range, so ±Inf saturate to its ends as they do beside finite values.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from precsim.formats.integer import finite_only, finite_range, zero_if_infinite

OBSERVERS: tuple[str, ...] = ("minmax", "running_minmax", "moving_average", "percentile")


def row_ranges(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """For a 2-D ``x``: the range of its finite values, as :func:`finite_range` over all, and each
    row's plain min and max (NaN propagating), all from one pass (pure). The rows' extremes
    tell which rows may hold values outside a range decided afterwards."""
    lo, hi = finite_only(x)
    lo, hi = lo.amin(dim=1).amin(), hi.amax(dim=1).amax()  # per row first: one pass with the rows' extremes
    return lo, hi, x.amin(dim=1), x.amax(dim=1)


def percentile_range(x: Tensor, dims: tuple[int, ...] | None, q: float) -> tuple[Tensor, Tensor]:
    """The (100 - q)-th and q-th percentiles of the finite values: a range that ignores rare
    outliers; +Inf and -Inf where there is no finite value, as :func:`finite_range`."""
    x = x.detach().float()
    if dims is None:
        flat = x.reshape(1, -1)
    else:
        keep = [d for d in range(x.dim()) if d not in dims]
        flat = x.permute(*keep, *dims).reshape(x.shape[keep[0]] if keep else 1, -1)
    if flat.shape[1] > 2**16:  # quantile of a strided sample keeps this cheap
        flat = flat[:, :: flat.shape[1] // 2**16 + 1]
    flat = torch.where(torch.isfinite(flat), flat, torch.nan)  # one NaN made the quantile NaN
    lo = torch.nanquantile(flat, 1 - q / 100, dim=1).nan_to_num(nan=torch.inf)
    hi = torch.nanquantile(flat, q / 100, dim=1).nan_to_num(nan=-torch.inf)
    if dims is None:
        lo, hi = lo.reshape(()), hi.reshape(())
    return lo, hi


def reduce_dims(axis: int | None, ndim: int) -> tuple[int, ...] | None:
    """Dimensions reduced for one range: all (None) or all but the channel ``axis``."""
    if axis is None:
        return None
    axis = axis % ndim
    return tuple(d for d in range(ndim) if d != axis)


def next_range(lo: Tensor, hi: Tensor, min_val: Tensor, max_val: Tensor, initialized: Tensor,
               kind: str, momentum: float) -> tuple[Tensor, Tensor, Tensor]:
    """The stored range and ``initialized`` after seeing a tensor whose finite values span
    [lo, hi] (:func:`finite_range`; pure). Where it had none (lo = +Inf, hi = -Inf) the stored
    range stays, [0, 0] before any, and ``initialized`` waits for a finite value."""
    first = ~initialized
    if kind == "minmax":
        new_lo, new_hi = lo, hi
    elif kind == "running_minmax":
        new_lo = torch.where(first, lo, torch.minimum(min_val, lo))
        new_hi = torch.where(first, hi, torch.maximum(max_val, hi))
    else:
        new_lo = torch.where(first, lo, min_val + momentum * (lo - min_val))
        new_hi = torch.where(first, hi, max_val + momentum * (hi - max_val))
    seen = lo <= hi
    zero = torch.zeros_like(min_val)
    return (torch.where(seen, new_lo, torch.where(first, zero, min_val)),
            torch.where(seen, new_hi, torch.where(first, zero, max_val)), initialized | seen.any())


def broadcast_range(lo: Tensor, hi: Tensor, axis: int | None, ndim: int) -> tuple[Tensor, Tensor]:
    """A per-channel range of shape (C,) reshaped to broadcast along ``axis``."""
    if axis is None or lo.dim() != 1:
        return lo, hi
    shape = [1] * ndim
    shape[axis % ndim] = lo.numel()
    return lo.reshape(shape), hi.reshape(shape)


class Observer(nn.Module):
    """Tracks [min, max] of the tensors it sees, per tensor or per channel.

    - ``minmax``: the current tensor's range (weights: always current);
    - ``running_minmax``: the widest range seen so far;
    - ``moving_average``: min <- min + momentum (x_min - min), started at the first range;
    - ``percentile``: the moving average of the (100 - q, q) percentiles.
    """

    def __init__(self, kind: str = "moving_average", axis: int | None = None,
                 momentum: float = 0.1, percentile: float = 99.99) -> None:
        super().__init__()
        if kind not in OBSERVERS:
            raise ValueError(f"unknown observer {kind!r}; allowed: {', '.join(OBSERVERS)}")
        if not 0.0 < momentum <= 1.0:
            raise ValueError(f"observer momentum {momentum!r} not allowed; allowed: 0 < momentum <= 1")
        if not 50.0 < percentile <= 100.0:
            raise ValueError(f"percentile {percentile!r} not allowed; allowed: 50 < percentile <= 100")
        self.kind, self.axis, self.momentum, self.percentile = kind, axis, momentum, percentile
        self.register_buffer("min_val", torch.zeros(()))
        self.register_buffer("max_val", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def _finite_range(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """This observer's range of ``x`` alone, +Inf and -Inf where it has no finite value."""
        dims = reduce_dims(self.axis, x.dim())
        if self.kind == "percentile":
            return percentile_range(x, dims, self.percentile)
        return finite_range(x, dims)

    def measure(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """This observer's range of ``x`` alone, [0, 0] where it has no finite value."""
        lo, hi = self._finite_range(x)
        return zero_if_infinite(lo), zero_if_infinite(hi)

    @torch.no_grad()
    def update(self, x: Tensor) -> None:
        lo, hi = self._finite_range(x)
        if self.min_val.shape != lo.shape:
            self.min_val = torch.zeros_like(lo)
            self.max_val = torch.zeros_like(hi)
            self.initialized.fill_(False)
        new_lo, new_hi, initialized = next_range(lo, hi, self.min_val, self.max_val, self.initialized,
                                                 self.kind, self.momentum)
        self.min_val.copy_(new_lo)
        self.max_val.copy_(new_hi)
        self.initialized.copy_(initialized)

    def range_for(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The stored range, shaped to broadcast against ``x``."""
        return broadcast_range(self.min_val, self.max_val, self.axis, x.dim())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[no-untyped-def]
        for name in ("min_val", "max_val"):  # per-channel buffers take their shape on first use
            key = prefix + name
            if key in state_dict and state_dict[key].shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(state_dict[key], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, axis={self.axis}, momentum={self.momentum}"
