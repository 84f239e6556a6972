"""The pure functions of a quantization point, each run as one compiled kernel.

:class:`~precsim.qat.quantizer.Quantizer` decides what to call; these functions are what
happens to the tensors: the clipped straight-through estimator (its mask, rebuilt in backward,
or the few clipped elements' indices), an observed integer point's forward pass with its
observer step (:func:`int_point`), the rounding of formats with a measured per-call state, the
dynamic gradient scale, and the whole gradient point. Each exists for speed: one fused pass
over a tensor instead of several (the docstrings give the measurements).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from precsim.formats.base import Format, ObservedFormat, StatefulFormat
from precsim.formats.integer import finite_range
from precsim.formats.rounding import exp2i, exponent_of
from precsim.qat.observers import broadcast_range, next_range, reduce_dims, row_ranges
from precsim.runtime.backend import call

GROWTH_INTERVAL = 1000


# The clipped STE's state: (base, lo, hi, clip). ``base`` is the forward input (float32 or the
# input's dtype) from which backward rebuilds the mask: lo <= base <= hi (integers), |base| <=
# clip (floats); or, with lo, hi and clip all None, the mask itself (bool) or the flat indices of
# the clipped elements, the only ones the mask zeroes (int64, :func:`clipped_ste`).
SteArgs = tuple[Tensor, Tensor | None, Tensor | None, float | None]


def ste_mask(x: Tensor, lo: Tensor | None, hi: Tensor | None, clip: float | None) -> Tensor:
    """The clipped-STE mask: where ``x`` was inside the representable range (pure).

    Integers: ``lo``/``hi`` are the clip bounds of the grid the forward pass used
    (:func:`int_grid`). Float formats: |x| <= ``clip`` (the format's max). All None: ``x`` is
    a mask already.
    """
    if clip is not None:
        return x.float().abs() <= clip
    if lo is None:
        return x
    x = x.float()
    return (x >= lo) & (x <= hi)


def apply_ste(g: Tensor, x: Tensor, lo: Tensor | None, hi: Tensor | None, clip: float | None) -> Tensor:
    """mask * g with the clipped-STE mask of ``x`` (one fused pass under compile)."""
    return g * ste_mask(x, lo, hi, clip)


def per_tensor(bound: Tensor | None) -> bool:
    """Whether STE bounds are one number for the whole tensor (None: no bounds)."""
    return bound is None or bound.dim() == 0


def apply_ste_into(g: Tensor, x: Tensor, lo: Tensor | None, hi: Tensor | None, clip: float | None) -> None:
    """:func:`apply_ste` written into ``g`` (a gradient this backward owns)."""
    g.copy_(apply_ste(g, x, lo, hi, clip))


def masked_gradient(g: Tensor, ste: SteArgs, owned: bool) -> Tensor:
    """mask * g with the clipped-STE mask, compiled; written into ``g`` when backward owns it.

    Given the clipped elements' indices, only those are multiplied by 0 (into a copy of ``g``
    unless owned). The rest keep their bits, as multiplying by 1 would leave them."""
    base, lo, hi, clip = ste
    if is_sparse(ste):
        if not owned:
            g = g.clone(memory_format=torch.contiguous_format)
        flat = g.view(-1)
        flat[base] = flat[base] * 0  # NaN * 0 and Inf * 0 stay NaN, as in mask * g
        return g
    if owned:
        call(apply_ste_into, g, (base, lo, hi), (clip,), flat=per_tensor(lo))
        return g
    return call(apply_ste, g.float(), (base, lo, hi), (clip,), flat=per_tensor(lo)).to(g.dtype)


def is_sparse(ste: SteArgs | None) -> bool:
    """Whether an STE state holds the clipped elements' indices (see :func:`clipped_ste`)."""
    return ste is not None and ste[0].dtype == torch.int64


SPARSE_LIMIT = 1 / 64  # at most this fraction of clipped elements is kept as indices
ROW_LIMIT = 1 / 8  # past this fraction of rows flagged as holding some, none is searched


def count_rows(numel: int) -> int:
    """How many rows a per-tensor point's clipped elements are looked for in (flagged by the
    kernel, or counted): 256 or the largest power of two dividing ``numel``, so that a clipped
    element is searched for in 1/256 of the tensor; one row for small tensors."""
    return math.gcd(numel, 256) if numel >= 4096 else 1


def maybe_outside(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """Whether any element of ``x`` may lie outside the STE bounds [lo, hi] (0-d bool, pure):
    from the min and max of ``x`` (NaN propagates through both, and then counts as outside),
    two reductions in the rounding's pass instead of a count per element."""
    dims = tuple(d for d in range(x.dim()) if lo.dim() == 0 or lo.shape[d] == 1)
    inside = (x.amin(dim=dims, keepdim=lo.dim() > 0) >= lo) & (x.amax(dim=dims, keepdim=lo.dim() > 0) <= hi)
    return ~inside.all()


def outside_per_row(x: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """How many elements of each row (first dimension) lie outside the STE bounds (pure)."""
    outside = ~ste_mask(x, lo, hi, None)
    if x.dim() < 2:
        return outside.sum(dtype=torch.int32)
    return outside.sum(dim=tuple(range(1, x.dim())), dtype=torch.int32)


def clipped_ste(x: Tensor, x32: Tensor, lo: Tensor, hi: Tensor, maybe: Tensor | None) -> SteArgs | None:
    """The clipped STE's state for an integer point, given whether elements may lie outside the
    bounds: one flag for the tensor (:func:`maybe_outside`) or one per row of ``x32``'s flat
    order (:func:`int_point`); None: not checked.

    None (pass every gradient) when no element is outside, as for a weight's own min/max range
    and most activations; the flat indices of those outside when they are few and the bounds
    per tensor (in training they are the tail beyond a moving-average range, often one or two
    elements: backward then costs nothing; only the rows that may hold them are searched, as a
    full ``nonzero`` of the mask costs 2.5x the rounding); otherwise the input, from which
    backward rebuilds the mask. Rows come from the kernel's flags, or, given one flag, from a
    pass that counts the clipped elements per row.
    """
    if maybe is None:
        return (x, lo, hi, None)
    if not bool(maybe.any()):
        return None
    if not (per_tensor(lo) and x32.is_contiguous()):
        return (x, lo, hi, None)
    if maybe.numel() == 1:
        outside = call(outside_per_row, x32, (lo, hi), flat=True, rows=count_rows(x32.numel())).reshape(-1)
        count = int(outside.sum())
        if count == 0:
            return None
        if count > x.numel() * SPARSE_LIMIT:
            return (x, lo, hi, None)
        hit = outside.nonzero().squeeze(1)
    else:
        outside = maybe
        hit = maybe.nonzero().squeeze(1)
        if hit.numel() > maybe.numel() * ROW_LIMIT:  # too many rows to search: the mask, rebuilt
            return (x, lo, hi, None)
    rows = x32.reshape(outside.numel(), -1)
    r, c = (~ste_mask(rows[hit], lo, hi, None)).nonzero(as_tuple=True)
    if r.numel() == 0:
        return None
    if r.numel() > x.numel() * SPARSE_LIMIT:
        return (x, lo, hi, None)
    return (hit[r] * rows.shape[1] + c, None, None, None)


def int_grid(min_val: Tensor, max_val: Tensor, fmt: ObservedFormat, ndim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The integer grid spanning [min_val, max_val]: (scale, zero point, STE lo, STE hi) (pure).

    The STE bounds are the range of inputs within half a step of [qmin, qmax]:
    [S (qmin - Z - 1/2), S (qmax - Z + 1/2)].
    """
    lo, hi = broadcast_range(min_val, max_val, fmt.axis, ndim)
    scale, zp = fmt.qparams(lo, hi)
    return scale, zp, (fmt.qmin - zp - 0.5) * scale, (fmt.qmax - zp + 0.5) * scale


def quantize_on_grid(x: Tensor, seed: Tensor | None, scale: Tensor, zero_point: Tensor, fmt: ObservedFormat,
                     rounding: str) -> Tensor:
    """Q(x) on a given integer grid (pure)."""
    return fmt.quantize(x, rounding, seed=seed, scale=scale, zero_point=zero_point)  # type: ignore[arg-type]


def int_point(
    x: Tensor, seed: Tensor | None, min_val: Tensor, max_val: Tensor, initialized: Tensor, fmt: ObservedFormat,
    kind: str, momentum: float, rounding: str, observe_when: str, check_outside: bool = False,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """An integer quantization point's forward pass in one function (one compiled call).

    ``observe_when``: ``before`` measures ``x`` and rounds on the new range's grid (two passes
    over ``x``: the min/max, then the rounding); ``after`` (delayed ranges) rounds on the
    stored range's grid and measures ``x`` in the same pass; ``never`` rounds on the stored
    range. The observer's state (``min_val``, ``max_val``, ``initialized``) is updated in
    place, unless ``never``: three small eager copies cost more than the rounding of a weight.
    Returns (Q(x), scale, zero point, STE lo, STE hi, outside), with ``outside``
    (``check_outside``) whether any element may lie outside the STE bounds
    (:func:`maybe_outside`), which :func:`clipped_ste` turns into backward's work. Measuring
    a 2-D ``x`` first (per-tensor ``before``), the pass that measures it also takes each row's
    min and max, and ``outside`` is per row: which rows to search (no counting pass later).

    The grid is among the outputs so that Inductor computes it once: left as an intermediate,
    it was recomputed for every element, the division included (int8 rounding then cost 3x
    fp8's).
    """
    lo, hi, seen = min_val, max_val, initialized
    row_extremes = None
    if observe_when == "before" and check_outside and x.dim() == 2 and fmt.axis is None:
        x_lo, x_hi, *row_extremes = row_ranges(x)
        lo, hi, seen = next_range(x_lo, x_hi, min_val, max_val, initialized, kind, momentum)
    elif observe_when == "before":
        lo, hi, seen = observe(x, min_val, max_val, initialized, fmt.axis, kind, momentum)
    scale, zp, ste_lo, ste_hi = int_grid(lo, hi, fmt, x.dim())
    q = quantize_on_grid(x, seed, scale, zp, fmt, rounding)
    if observe_when == "after":
        lo, hi, seen = observe(x, min_val, max_val, initialized, fmt.axis, kind, momentum)
    if observe_when != "never":
        min_val.copy_(lo)
        max_val.copy_(hi)
        initialized.copy_(seen)
    outside = None
    if row_extremes is not None:
        outside = ~((row_extremes[0] >= ste_lo) & (row_extremes[1] <= ste_hi))
    elif check_outside:
        outside = maybe_outside(x, ste_lo, ste_hi)
    return q, scale, zp, ste_lo, ste_hi, outside


def observe(x: Tensor, min_val: Tensor, max_val: Tensor, initialized: Tensor, axis: int | None, kind: str,
            momentum: float) -> tuple[Tensor, Tensor, Tensor]:
    """The observer's next range and ``initialized`` after seeing ``x`` (pure)."""
    lo, hi = finite_range(x, reduce_dims(axis, x.dim()))
    return next_range(lo, hi, min_val, max_val, initialized, kind, momentum)


def quantize_measured(x: Tensor, seed: Tensor | None, stored: Tensor | None, fmt: StatefulFormat, rounding: str,
                      options: tuple[tuple[str, Any], ...] = ()) -> tuple[Tensor, Tensor, tuple[Tensor, ...]]:
    """Q(x) for a format with a measured per-call state (:class:`~precsim.formats.MeasuredState`):
    (Q(x), the state measured on ``x``, the parameters rounded on) (pure).

    With a ``stored`` state (delayed: the previous call's) the rounding does not wait for the
    measurement, so the two share one pass over ``x``; without, the measurement is a pass of its
    own before the rounding. ``options``: static faster paths for the stored state
    (:func:`~precsim.formats.base.rounding_options`). The parameters are outputs only so that
    Inductor computes them once instead of per element (see :func:`int_point`).
    """
    state = fmt.measure(x)
    params = fmt.state_params(state if stored is None else stored)
    q = fmt.quantize(x, rounding, seed=seed, **params, **dict(options))  # type: ignore[arg-type]
    # the state itself, or the stored one (an input), is no new output: a kernel returning one
    # tensor twice, or an input, is not called directly (runtime/kernel.py), 10% of a DSE step
    return q, state, tuple(p for p in params.values() if p is not state and p is not stored)


def next_grad_scale(g: Tensor, scale: Tensor, clean: Tensor, limit: float,
                    interval: int) -> tuple[Tensor, Tensor, Tensor]:
    """Dynamic gradient scale (loss-scale style): (S used now, next S, next clean-step count).

    S shrinks at once by the power of two that brings max finite |g| * S under ``limit``, and
    doubles after ``interval`` steps in a row without shrinking.
    """
    amax = torch.where(torch.isfinite(g), g.abs(), torch.zeros_like(g)).amax()
    ratio = amax / limit * scale
    over = ratio > 1.0
    shrink = torch.where(over, exponent_of(torch.where(over, ratio, torch.ones_like(ratio))) + 1, 0)
    s_now = scale * exp2i(-shrink)
    clean = torch.where(over, torch.zeros_like(clean), clean + 1)
    grow = clean >= interval
    return s_now, torch.where(grow, s_now * 2, s_now), torch.where(grow, torch.zeros_like(clean), clean)


def quantize_gradient_fn(
    g: Tensor, ste_x: Tensor | None, ste_lo: Tensor | None, ste_hi: Tensor | None, seed: Tensor | None,
    scale: Tensor | None, clean: Tensor | None, stored: Tensor | None, fmt: Format, rounding: str,
    limit: float | None, interval: int, ste_clip: float | None, options: tuple[tuple[str, Any], ...] = (),
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, tuple[Tensor, ...]]:
    """The whole gradient point in one pure function (one fused pass under compile).

    G(mask * g), optionally scaled as G(S g) / S with a dynamic S (``limit`` not None); the
    clipped-STE mask is recomputed from the forward input ``ste_x`` (:func:`ste_mask`; no mask
    when ``ste_x`` is None). Returns (gradient, next S, next clean-step count, measured state,
    per-tensor values); the caller stores the state. The measured state is that of a format with
    one (:attr:`~precsim.formats.Format.state`: DSE's shift, an integer's [min, max]); rounded
    on ``stored`` (the previous backward's) where given. The per-tensor values (S, the rounding's
    parameters) are outputs only so that Inductor computes them once instead of per element (see
    :func:`int_point`).
    """
    if ste_x is not None:
        g = g * ste_mask(ste_x, ste_lo, ste_hi, ste_clip)
    next_scale = next_clean = measured = None
    once: tuple[Tensor, ...] = ()
    s = scale
    if scale is not None:
        if limit is not None:
            s, next_scale, next_clean = next_grad_scale(g, scale, clean, limit, interval)  # type: ignore[arg-type]
            once = (s,)
        g = g * s
    if fmt.state is not None:
        q, measured, params = quantize_measured(g, seed, stored, fmt, rounding, options)  # type: ignore[arg-type]
        once += params
    else:
        q = fmt.quantize(g, rounding, seed=seed)
    if s is not None:
        q = q / s
    return q, next_scale, next_clean, measured, once


def quantize_gradient_into(
    g: Tensor, ste_x: Tensor | None, ste_lo: Tensor | None, ste_hi: Tensor | None, seed: Tensor | None,
    scale: Tensor | None, clean: Tensor | None, stored: Tensor | None, fmt: Format, rounding: str,
    limit: float | None, interval: int, ste_clip: float | None, options: tuple[tuple[str, Any], ...] = (),
) -> tuple[Tensor | None, Tensor | None, Tensor | None, tuple[Tensor, ...]]:
    """:func:`quantize_gradient_fn` written into ``g`` (a gradient this backward owns); returns
    the rest of its outputs."""
    q, next_scale, next_clean, measured, once = quantize_gradient_fn(
        g, ste_x, ste_lo, ste_hi, seed, scale, clean, stored, fmt, rounding, limit, interval, ste_clip, options)
    g.copy_(q)
    return next_scale, next_clean, measured, once
