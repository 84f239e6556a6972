"""The Quantizer module: one quantization point (format + observer + rounding + role).

Forward: the tensor is rounded to the role's format, with a straight-through estimator.
Backward: the gradient flowing through the point is rounded to the gradient role's format.
Both happen in one ``torch.autograd.Function``, so gradient quantization works for any module
and under DDP, with no module backward hooks.

Stochastic rounding only happens in ``train()``. Its random bits come from a per-quantizer seed
and a step counter, both buffers: a checkpoint restores the stream exactly.

Speed: each direction is one pure function (rounding, STE mask, observer step, DSE shift,
gradient scale) run through :func:`precsim.formats.backend.call`, so with compiled kernels a
quantization point costs one or two fused passes. A dynamic gradient scale works for every
gradient format (see :func:`scale_limit`).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable

import torch
from torch import Tensor, nn

from precsim.config import RoleSpec
from precsim.formats import BlockFormat, DSEFormat, FloatFormat, Format, IntFormat
from precsim.formats.backend import MIN_COMPILED_NUMEL, call, compile_enabled, inline_kernel, run_quantize
from precsim.formats.rounding import exp2i, exponent_of
from precsim.observers import Observer, broadcast_range, next_range, reduce_dims, row_ranges, tensor_range
from precsim.ownership import baseline, owns_gradient

_GOLDEN = -1640531527  # 0x9E3779B9 as int32
_BACKWARD_SALT = 0x5BD1E995
GROWTH_INTERVAL = 1000


def mix_seed(*words: int) -> int:
    """A 32-bit hash of integers (for per-quantizer seeds; Python ints, not tensors)."""
    h = 0x811C9DC5
    for w in words:
        h = ((h ^ (w & 0xFFFFFFFF)) * 0x01000193) & 0xFFFFFFFF
        h ^= h >> 15
    return h - 2**32 if h >= 2**31 else h


class _FakeQuantSTE(torch.autograd.Function):
    """y = Q(x) forward; dx = G(mask * dy) backward (mask: clipped STE, G: gradient format).

    The clipped-STE mask is normally not stored: backward recomputes it from the saved input
    and the bounds of the grid the forward pass used (:func:`ste_mask`), fused with
    ``mask * dy`` (and the gradient rounding) in one pass, written into ``dy`` when backward
    owns it (:mod:`precsim.ownership`). A stored mask cost a full-size output of the forward kernel
    and an eager mixed-dtype multiply in backward: on CPU the two made int8 training 2.5x FP32.
    With compiled kernels on the CPU, an integer point keeps only the positions of the few
    clipped elements instead (:func:`clipped_ste`), and backward zeroes those alone.
    """

    @staticmethod
    def forward(ctx, x: Tensor, forward_fn: Callable[[Tensor], tuple[Tensor, SteArgs | None]],  # type: ignore[override]
                backward_fn: Callable[[Tensor, SteArgs | None], Tensor] | None) -> Tensor:
        q, ste = forward_fn(x, ctx.needs_input_grad[0])
        if q is x:  # an input returned as is becomes a view that in-place ops (ReLU(inplace)) reject
            q = q.clone()
        ctx.backward_fn = backward_fn
        ctx.ste_static = None
        if ste is not None and ctx.needs_input_grad[0]:
            base, lo, hi, *static = ste
            ctx.ste_static, ctx.ste_has_range = tuple(static), lo is not None
            ctx.save_for_backward(base, *((lo, hi) if lo is not None else ()))
        return q

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        refs = sys.getrefcount(grad)  # first: see ownership.owns_gradient
        owned = compile_enabled() and owns_gradient(grad, refs)
        ste: SteArgs | None = None
        if ctx.ste_static is not None:
            saved = ctx.saved_tensors
            lo, hi = (saved[1], saved[2]) if ctx.ste_has_range else (None, None)
            ste = (saved[0], lo, hi, *ctx.ste_static)
        if ctx.backward_fn is not None:  # the mask is applied inside, fused with the rounding
            return ctx.backward_fn(grad, ste, owned), None, None
        return (grad if ste is None else masked_gradient(grad, ste, owned)), None, None


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


def int_grid(min_val: Tensor, max_val: Tensor, fmt: IntFormat, ndim: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The integer grid spanning [min_val, max_val]: (scale, zero point, STE lo, STE hi) (pure).

    The STE bounds are the range of inputs within half a step of [qmin, qmax]:
    [S (qmin - Z - 1/2), S (qmax - Z + 1/2)].
    """
    lo, hi = broadcast_range(min_val, max_val, fmt.axis, ndim)
    scale, zp = fmt.qparams(lo, hi)
    return scale, zp, (fmt.qmin - zp - 0.5) * scale, (fmt.qmax - zp + 0.5) * scale


def quantize_on_grid(x: Tensor, seed: Tensor | None, scale: Tensor, zero_point: Tensor, fmt: IntFormat,
                     rounding: str) -> Tensor:
    """Q(x) on a given integer grid (pure)."""
    return fmt.quantize(x, rounding, seed=seed, scale=scale, zero_point=zero_point)  # type: ignore[arg-type]


def int_point(
    x: Tensor, seed: Tensor | None, min_val: Tensor, max_val: Tensor, initialized: Tensor, fmt: IntFormat,
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
    lo, hi = min_val, max_val
    row_extremes = None
    if observe_when == "before" and check_outside and x.dim() == 2 and fmt.axis is None:
        x_lo, x_hi, *row_extremes = row_ranges(x)
        lo, hi = next_range(x_lo, x_hi, min_val, max_val, initialized, kind, momentum)
    elif observe_when == "before":
        lo, hi = observe(x, min_val, max_val, initialized, fmt.axis, kind, momentum)
    scale, zp, ste_lo, ste_hi = int_grid(lo, hi, fmt, x.dim())
    q = quantize_on_grid(x, seed, scale, zp, fmt, rounding)
    if observe_when == "after":
        lo, hi = observe(x, min_val, max_val, initialized, fmt.axis, kind, momentum)
    if observe_when != "never":
        min_val.copy_(lo)
        max_val.copy_(hi)
        initialized.fill_(True)
    outside = None
    if row_extremes is not None:
        outside = ~((row_extremes[0] >= ste_lo) & (row_extremes[1] <= ste_hi))
    elif check_outside:
        outside = maybe_outside(x, ste_lo, ste_hi)
    return q, scale, zp, ste_lo, ste_hi, outside


def observe(x: Tensor, min_val: Tensor, max_val: Tensor, initialized: Tensor, axis: int | None, kind: str,
            momentum: float) -> tuple[Tensor, Tensor]:
    """The observer's next range after seeing ``x`` (pure)."""
    lo, hi = tensor_range(x, reduce_dims(axis, x.dim()))
    return next_range(lo, hi, min_val, max_val, initialized, kind, momentum)


def quantize_float(x: Tensor, seed: Tensor | None, fmt: FloatFormat, rounding: str) -> Tensor:
    """Q(x) for a float format (pure)."""
    return fmt.quantize(x, rounding, seed=seed)  # type: ignore[arg-type]


def quantize_dse(x: Tensor, seed: Tensor | None, stored: Tensor | None, fmt: DSEFormat,
                 rounding: str, normal_grid: bool = False) -> tuple[Tensor, Tensor]:
    """DSE rounding and the shift measured on ``x``.

    With a ``stored`` shift (delayed DSE, from the previous call) the rounding does not wait
    for the measurement, so the two share one pass over ``x``; without, the max is a pass of
    its own before the rounding. ``normal_grid``: see :meth:`DSEFormat.quantize` (only with a
    ``stored`` shift, which the caller can read first).
    """
    if stored is None:
        return fmt.quantize_measured(x, rounding, seed=seed)
    return fmt.quantize(x, rounding, seed=seed, shift=stored, normal_grid=normal_grid), fmt.shift_for(x)


def dse_normal_grid(fmt: Format, stored: Tensor | None, rounding: str) -> bool:
    """Whether a stored DSE shift allows the faster normal-grid rounding (reads the shift: on
    the CPU only, where reading it costs no device sync). Not asked where the rounding takes
    the scaled constant grid anyway (:meth:`DSEFormat.quantize`, nearest)."""
    return (isinstance(fmt, DSEFormat) and stored is not None and stored.device.type == "cpu"
            and not (fmt.scales_exactly and rounding == "nearest") and fmt.grid_is_normal(int(stored)))


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
    limit: float | None, interval: int, ste_clip: float | None, normal_grid: bool = False, delayed: bool = False,
) -> tuple[Tensor, Tensor | None, Tensor | None, Tensor | None, tuple[Tensor, ...]]:
    """The whole gradient point in one pure function (one fused pass under compile).

    G(mask * g), optionally scaled as G(S g) / S with a dynamic S (``limit`` not None); the
    clipped-STE mask is recomputed from the forward input ``ste_x`` (:func:`ste_mask`; no mask
    when ``ste_x`` is None). Returns (gradient, next S, next clean-step count, measured state,
    per-tensor values); the caller stores the state. The measured state is DSE's shift or, for
    an integer format with ``delayed``, the [min, max] of ``g``, which the next call rounds on
    (``stored``). The per-tensor values (S, an integer grid) are outputs only so that Inductor
    computes them once instead of per element (see :func:`int_point`).
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
    if isinstance(fmt, DSEFormat):
        q, measured = quantize_dse(g, seed, stored, fmt, rounding, normal_grid)
    elif isinstance(fmt, IntFormat) and fmt.axis is None and fmt.group_size is None:
        lo, hi = tensor_range(g, None)  # delayed: rounded on the previous backward's range instead
        grid = fmt.qparams(lo, hi) if stored is None else fmt.qparams(stored[0], stored[1])
        once += grid
        q = fmt.quantize(g, rounding, seed=seed, scale=grid[0], zero_point=grid[1])  # type: ignore[arg-type]
        if delayed:
            measured = torch.stack((lo, hi))
    else:
        q = fmt.quantize(g, rounding, seed=seed)  # type: ignore[arg-type]
    if s is not None:
        q = q / s
    return q, next_scale, next_clean, measured, once


def quantize_gradient_into(
    g: Tensor, ste_x: Tensor | None, ste_lo: Tensor | None, ste_hi: Tensor | None, seed: Tensor | None,
    scale: Tensor | None, clean: Tensor | None, stored: Tensor | None, fmt: Format, rounding: str,
    limit: float | None, interval: int, ste_clip: float | None, normal_grid: bool = False, delayed: bool = False,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, tuple[Tensor, ...]]:
    """:func:`quantize_gradient_fn` written into ``g`` (a gradient this backward owns); returns
    the rest of its outputs."""
    q, next_scale, next_clean, measured, once = quantize_gradient_fn(
        g, ste_x, ste_lo, ste_hi, seed, scale, clean, stored, fmt, rounding, limit, interval, ste_clip,
        normal_grid, delayed)
    g.copy_(q)
    return next_scale, next_clean, measured, once


def scale_limit(fmt: Format) -> float:
    """The magnitude a dynamic gradient scale keeps max |g| * S under.

    A float format's max: past it values saturate or overflow. The other formats scale each
    tensor (DSE, integer) or block (MX, NVFP4) to its own range, so a power-of-two S changes
    nothing there except near the ends of float32 and of their scale range: S then keeps S g
    finite (under 2^127) and lifts tiny gradients off the bottom of the scale range (MX
    flushes blocks below 2^-127 x its element scale, DSE has a lowest shift).
    """
    return fmt.max if isinstance(fmt, FloatFormat) else 2.0**127


class Quantizer(nn.Module):
    """Quantizes a tensor in the forward pass (``spec``) and its gradient (``grad_spec``)."""

    def __init__(self, role: str, spec: RoleSpec | None, grad_spec: RoleSpec | None = None, seed: int = 0) -> None:
        super().__init__()
        baseline()  # measured once, outside any backward pass (see ownership.owns_gradient)
        self.role, self.spec, self.grad_spec = role, spec, grad_spec
        self.register_buffer("seed", torch.tensor([mix_seed(seed, 1), mix_seed(seed, 2)], dtype=torch.int32))
        self.register_buffer("step", torch.zeros((), dtype=torch.int32))
        self.observer: Observer | None = None
        fmt = spec.format if spec else None
        if isinstance(fmt, IntFormat) and fmt.group_size is None:
            self.observer = Observer(spec.observer, fmt.axis, spec.momentum, spec.percentile)  # type: ignore[union-attr]
        if isinstance(fmt, DSEFormat) and fmt.delayed:
            self.register_buffer("dse_shift", torch.zeros((), dtype=torch.int32))
            self.register_buffer("dse_ready", torch.zeros((), dtype=torch.bool))
        if grad_spec is not None and isinstance(grad_spec.format, DSEFormat) and grad_spec.format.delayed:
            self.register_buffer("grad_dse_shift", torch.zeros((), dtype=torch.int32))
            self.register_buffer("grad_dse_ready", torch.zeros((), dtype=torch.bool))
        if grad_spec is not None and isinstance(grad_spec.format, IntFormat) and grad_spec.delayed:
            self.register_buffer("grad_range", torch.zeros(2))  # [min, max] of the previous backward
            self.register_buffer("grad_range_ready", torch.zeros((), dtype=torch.bool))
        if grad_spec is not None and grad_spec.scale is not None:
            start = 2.0**16 if grad_spec.scale == "dynamic" else float(grad_spec.scale)
            self.register_buffer("grad_scale", torch.tensor(start))
            self.register_buffer("clean_steps", torch.zeros((), dtype=torch.int32))

    # --- forward ----------------------------------------------------------------------------
    def _seeds(self, training: bool) -> tuple[Tensor | None, Tensor | None]:
        """This call's (forward, backward) seeds; None where that direction rounds deterministically."""
        fwd = self.spec is not None and training and self.spec.rounding == "stochastic"
        bwd = self.grad_spec is not None and training and self.grad_spec.rounding == "stochastic"
        if not (fwd or bwd):
            return None, None
        offset = torch.stack([torch.zeros_like(self.step), self.step * _GOLDEN])
        return (self.seed + offset if fwd else None,
                (self.seed ^ _BACKWARD_SALT) + offset if bwd else None)

    def forward(self, x: Tensor) -> Tensor:
        if x.numel() == 0:  # a zero-size batch: nothing to round, observe or count
            return x.clone()
        training = self.training
        if training:
            with torch.no_grad():
                self.step.add_(1)
        fwd_seed, bwd_seed = self._seeds(training)
        backward_fn = None
        if self.grad_spec is not None:
            def backward_fn(g: Tensor, ste: SteArgs | None, owned: bool) -> Tensor:
                return self.quantize_gradient(g, bwd_seed, training, ste, owned)
        if self.spec is None:
            return _FakeQuantSTE.apply(x, lambda t, need_ste: (t, None), backward_fn)

        def forward_fn(t: Tensor, need_ste: bool) -> tuple[Tensor, SteArgs | None]:
            return self.quantize_values(t, fwd_seed, training, need_ste)
        return _FakeQuantSTE.apply(x, forward_fn, backward_fn)

    @torch.no_grad()
    def quantize_values(self, x: Tensor, seed: Tensor | None, training: bool,
                        need_ste: bool = True) -> tuple[Tensor, SteArgs | None]:
        """Q(x) and what the clipped STE needs in backward (None: pass every gradient, or
        ``need_ste`` False: no backward).

        That is the input and the bounds of the integer grid it was rounded on (or the float
        clip), so backward rebuilds the mask; an ``input`` quantizer stores the mask itself
        instead, since its input stays visible to the caller, who may change it in place before
        backward."""
        spec = self.spec
        assert spec is not None
        fmt = spec.format
        rounding = spec.rounding if training else "nearest"
        x32 = x.float()
        ste: SteArgs | None = None
        if isinstance(fmt, IntFormat) and self.observer is not None:
            obs = self.observer
            update = training or obs.kind == "minmax" or not bool(obs.initialized)
            channels = () if fmt.axis is None else (x32.shape[fmt.axis],)
            if update and (obs.kind == "percentile" or obs.min_val.shape != channels):
                obs.update(x32)  # eager: quantiles, or the first call that sizes per-channel buffers
                update = False
            when = "never"
            if update:  # delayed: the previous call's range; this tensor's min/max in the same pass
                when = "after" if spec.delayed and training and bool(obs.initialized) else "before"
            clipped = spec.ste == "clipped" and need_ste
            # reading the answer is free on the CPU only (a sync on a GPU); eager is the reference
            check = clipped and compile_enabled() and x.device.type == "cpu" and x.numel() >= MIN_COMPILED_NUMEL
            q, _, _, ste_lo, ste_hi, outside = call(
                int_point, x32, (seed, obs.min_val, obs.max_val, obs.initialized),
                (fmt, obs.kind, obs.momentum, rounding, when, check), inline=inline_kernel(fmt, rounding),
                flat=fmt.axis is None,
                rows=count_rows(x32.numel()) if check and when == "before" and fmt.axis is None else None)
            if clipped:  # new tensors: a later update cannot change them
                ste = clipped_ste(x, x32, ste_lo, ste_hi, outside)
        elif isinstance(fmt, DSEFormat):
            delayed = fmt.delayed
            stored = self.dse_shift if delayed and bool(self.dse_ready) else None  # the previous call's
            q, shift = call(quantize_dse, x32, (seed, stored), (fmt, rounding, dse_normal_grid(fmt, stored, rounding)),
                            flat=True)
            if delayed and training:
                self.dse_shift.copy_(shift)
                self.dse_ready.fill_(True)
        elif isinstance(fmt, FloatFormat):
            q = call(quantize_float, x32, (seed,), (fmt, rounding), flat=True)
            if spec.ste == "clipped" and need_ste and not fmt.is_float32:
                ste = (x, None, None, fmt.max)
        else:  # blocks, and integers without an observer (grouped): cut into blocks outside the kernel
            q = run_quantize(fmt, x32, rounding, seed)
        if ste is not None and self.role == "input" and not is_sparse(ste):
            ste = (call(ste_mask, x32, ste[1:3], ste[3:], flat=per_tensor(ste[1])), None, None, None)
        return q.to(x.dtype), ste

    # --- backward ---------------------------------------------------------------------------
    @torch.no_grad()
    def quantize_gradient(self, g: Tensor, seed: Tensor | None, training: bool, ste: SteArgs | None = None,
                          owned: bool = False) -> Tensor:
        """G(mask * g): the gradient rounded to the gradient role's format (scaled if asked).

        ``owned``: ``g`` is this backward's own (:func:`precsim.ownership.owns_gradient`), so
        the result is written into it instead of a new tensor."""
        spec = self.grad_spec
        assert spec is not None
        fmt = spec.format
        rounding = spec.rounding if training else "nearest"
        scale = clean = stored = None
        limit = None
        if spec.scale is not None:
            scale, clean = self.grad_scale, self.clean_steps
            if spec.scale == "dynamic":
                limit = scale_limit(fmt)
        delayed = isinstance(fmt, DSEFormat) and fmt.delayed
        if delayed and bool(self.grad_dse_ready):
            stored = self.grad_dse_shift  # the shift measured on the previous backward
        delayed_range = isinstance(fmt, IntFormat) and spec.delayed
        if delayed_range and bool(self.grad_range_ready):
            stored = self.grad_range  # the range measured on the previous backward
        if is_sparse(ste):  # zero the few clipped elements first: then the kernel reads g alone
            g = masked_gradient(g, ste, owned)  # type: ignore[arg-type]
            ste, owned = None, g.dtype == torch.float32
        ste_x, ste_lo, ste_hi, ste_clip = (None,) * 4 if ste is None else ste
        if isinstance(fmt, BlockFormat):  # blocks are cut outside the kernel (see run_quantize)
            g32 = g.float() if ste is None else masked_gradient(g.float(), ste, owned)
            q, next_scale, next_clean, shift = self._block_gradient(g32, seed, scale, clean, fmt, rounding, limit,
                                                                    owned)
        else:
            args = (ste_x, ste_lo, ste_hi, seed, scale, clean, stored)
            static = (fmt, rounding, limit, GROWTH_INTERVAL, ste_clip, dse_normal_grid(fmt, stored, rounding), delayed_range)
            flat = per_tensor(ste_lo) and not (isinstance(fmt, IntFormat) and fmt.axis is not None)
            # written into the gradient it owns: no new gradient-sized tensor
            if owned:
                q = g
                next_scale, next_clean, shift, _ = call(quantize_gradient_into, g, args, static, flat=flat)
            else:
                q, next_scale, next_clean, shift, _ = call(quantize_gradient_fn, g.float(), args, static, flat=flat)
        if training:
            if next_scale is not None:
                self.grad_scale.copy_(next_scale)
                self.clean_steps.copy_(next_clean)
            if delayed:
                self.grad_dse_shift.copy_(shift)
                self.grad_dse_ready.fill_(True)
            if delayed_range:
                self.grad_range.copy_(shift)  # here the range [min, max] the kernel measured
                self.grad_range_ready.fill_(True)
        return q.to(g.dtype)

    @staticmethod
    def _block_gradient(g: Tensor, seed: Tensor | None, scale: Tensor | None,
                        clean: Tensor | None, fmt: BlockFormat, rounding: str,
                        limit: float | None, owned: bool = False) -> tuple[Tensor, Tensor | None, Tensor | None, None]:
        """:func:`quantize_gradient_fn` for block formats (mask applied), in steps around the block
        kernel; in place where ``g`` is owned or a scaled copy."""
        next_scale = next_clean = None
        s = scale
        if scale is not None:
            if limit is not None:
                s, next_scale, next_clean = call(next_grad_scale, g, (scale, clean), (limit, GROWTH_INTERVAL), flat=True)
            g = g * s
        q = run_quantize(fmt, g, rounding, seed, inplace=owned or s is not None)
        return (q if s is None else q / s), next_scale, next_clean, None

    def describe(self) -> tuple[str, str, str, str]:
        """(format, observer, rounding, gradient) as text, for summaries."""
        spec, g = self.spec, self.grad_spec
        fmt = spec.format.name if spec else "fp32"
        obs = self.observer.kind if self.observer is not None else "-"
        rnd = spec.rounding if spec else "-"
        grad = "-" if g is None else f"{g.format.name} ({g.rounding}{', scale ' + str(g.scale) if g.scale else ''})"
        return fmt, obs, rnd, grad

    def extra_repr(self) -> str:
        fmt, obs, rnd, grad = self.describe()
        return f"role={self.role}, format={fmt}, observer={obs}, rounding={rnd}, gradient={grad}"
