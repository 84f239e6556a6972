"""The Quantizer module: one quantization point (format + observer + rounding + role).

Forward: the tensor is rounded to the role's format, with a straight-through estimator.
Backward: the gradient flowing through the point is rounded to the gradient role's format.
Both happen in one ``torch.autograd.Function``, so gradient quantization works for any module
and under DDP, with no module backward hooks.

Stochastic rounding only happens in ``train()``. Its random bits come from a per-quantizer seed
and a step counter, both buffers: a checkpoint restores the stream exactly.

The quantizer drives its formats through the :class:`~precsim.formats.Format` interface and
never asks which family a format is: an ``observed`` format gets an :class:`Observer`, a format
with a measured ``state`` gets buffers for it where the rounding is delayed, and every other
format is rounded as it is. A dynamic gradient scale works for every gradient format (it keeps
max |g| * S under the format's ``gradient_limit``).

Speed: each direction is one pure function of :mod:`precsim.qat.point_fns` (rounding, STE
mask, observer step, measured state, gradient scale) run through
:func:`precsim.runtime.backend.call`, so with compiled kernels a quantization point costs one
or two fused passes.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

import torch
from torch import Tensor

from precsim.formats.base import Format, MeasuredState, rounding_options
from precsim.formats.random import mix_seed
from precsim.qat.config import RoleSpec
from precsim.qat.fingerprint import Fingerprinted, fingerprint
from precsim.qat.observers import Observer
from precsim.qat.point_fns import (
    GROWTH_INTERVAL,
    SteArgs,
    clipped_ste,
    count_rows,
    int_point,
    is_sparse,
    masked_gradient,
    next_grad_scale,
    per_tensor,
    quantize_gradient_fn,
    quantize_gradient_into,
    quantize_measured,
    ste_mask,
)
from precsim.runtime.backend import (
    MIN_COMPILED_NUMEL,
    blocked,
    call,
    compile_enabled,
    inline_kernel,
    per_tensor_format,
    run_quantize,
)
from precsim.runtime.ownership import baseline, owns_gradient

_GOLDEN = -1640531527  # 0x9E3779B9 as int32
# the collector of the innermost precsim.collect_stats (precsim.qat.telemetry.Stats), if any
STATS: ContextVar[Any] = ContextVar("precsim_stats", default=None)
BYPASS: ContextVar[bool] = ContextVar("precsim_bypass", default=False)
"""True while a model's dataflow is captured (:mod:`precsim.qat.module_graph`): every quantizer
is the identity, so the capture records the float model and changes no quantizer state."""
_BACKWARD_SALT = 0x5BD1E995


def delayed_state(spec: RoleSpec | None, backward: bool) -> MeasuredState | None:
    """The measured state a direction keeps between calls: where the format rounds on the
    previous call's state (delayed DSE), or, for a gradient, where the role asks for it
    (``delayed: true`` on an integer gradient: the previous backward's range). A forward
    observed format keeps its range in its observer instead."""
    state = spec.format.state if spec is not None else None
    if state is None or (spec.format.observed and not backward):  # type: ignore[union-attr]
        return None
    return state if state.delayed or (backward and spec.delayed) else None  # type: ignore[union-attr]


class _FakeQuantSTE(torch.autograd.Function):
    """y = Q(x) forward; dx = G(mask * dy) backward (mask: clipped STE, G: gradient format).

    The clipped-STE mask is normally not stored: backward recomputes it from the saved input
    and the bounds of the grid the forward pass used (:func:`ste_mask`), fused with
    ``mask * dy`` (and the gradient rounding) in one pass, written into ``dy`` when backward
    owns it (:mod:`precsim.runtime.ownership`). A stored mask cost a full-size output of the forward kernel
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


class Quantizer(Fingerprinted):
    """Quantizes a tensor in the forward pass (``spec``) and its gradient (``grad_spec``)."""

    def __init__(self, role: str, spec: RoleSpec | None, grad_spec: RoleSpec | None = None, seed: int = 0) -> None:
        super().__init__()
        baseline()  # measured once, outside any backward pass (see ownership.owns_gradient)
        self.role, self.spec, self.grad_spec = role, spec, grad_spec
        self.fingerprint = fingerprint(role, spec, grad_spec)
        self.register_buffer("seed", torch.tensor([mix_seed(seed, 1), mix_seed(seed, 2)], dtype=torch.int32))
        self.register_buffer("step", torch.zeros((), dtype=torch.int32))
        self.observer: Observer | None = None
        self.grid: tuple[Tensor, Tensor] | None = None  # (scale, zero point) of the last forward (integer formats)
        if spec is not None and spec.format.observed:
            self.observer = Observer(spec.observer, spec.format.axis, spec.momentum, spec.percentile)  # type: ignore[attr-defined]
        self._delayed = {"": delayed_state(spec, False), "grad_": delayed_state(grad_spec, True)}
        for prefix, state in self._delayed.items():
            if state is not None:
                value, ready = (prefix + name for name in state.buffers)
                self.register_buffer(value, torch.zeros(state.size, dtype=torch.int32 if state.integer else torch.float32))
                self.register_buffer(ready, torch.zeros((), dtype=torch.bool))
        if grad_spec is not None and grad_spec.scale is not None:
            start = 2.0**16 if grad_spec.scale == "dynamic" else float(grad_spec.scale)
            self.register_buffer("grad_scale", torch.tensor(start))
            self.register_buffer("clean_steps", torch.zeros((), dtype=torch.int32))

    def _stored(self, prefix: str) -> Tensor | None:
        """The state a delayed direction measured on its previous call (None: none yet, or not delayed)."""
        state = self._delayed[prefix]
        if state is None or not bool(getattr(self, prefix + state.buffers[1])):
            return None
        return getattr(self, prefix + state.buffers[0])

    def _store(self, prefix: str, measured: Tensor) -> None:
        state = self._delayed[prefix]
        assert state is not None
        getattr(self, prefix + state.buffers[0]).copy_(measured)
        getattr(self, prefix + state.buffers[1]).fill_(True)

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
        if BYPASS.get():
            return x
        if x.numel() == 0:  # a zero-size batch: nothing to round, observe or count
            return x.clone()
        training = self.training
        if training:
            with torch.no_grad():
                self.step.add_(1)
        fwd_seed, bwd_seed = self._seeds(training)
        stats = STATS.get()
        if stats is not None and not stats.sample(self):
            stats = None
        backward_fn = None
        if self.grad_spec is not None:
            def backward_fn(g: Tensor, ste: SteArgs | None, owned: bool) -> Tensor:
                if stats is None:
                    return self.quantize_gradient(g, bwd_seed, training, ste, owned)
                out = self.quantize_gradient(g, bwd_seed, training, ste, False)  # not in place: g is compared
                stats.record(self, "backward", g, out)
                return out
        if self.spec is None:
            return _FakeQuantSTE.apply(x, lambda t, need_ste: (t, None), backward_fn)

        def forward_fn(t: Tensor, need_ste: bool) -> tuple[Tensor, SteArgs | None]:
            return self.quantize_values(t, fwd_seed, training, need_ste)
        out = _FakeQuantSTE.apply(x, forward_fn, backward_fn)
        if stats is not None:
            stats.record(self, "forward", x, out)
        return out

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
        if self.observer is not None:  # the scale comes from the observer's range
            q, ste = self._observed_point(x, x32, seed, training, rounding, need_ste)
        elif fmt.state is not None:  # a state measured on each tensor (or the previous call's)
            stored = self._stored("")
            q, measured, _ = call(quantize_measured, x32, (seed, stored),
                                  (fmt, rounding, rounding_options(fmt, stored, rounding)), flat=True)
            if training and self._delayed[""] is not None:
                self._store("", measured)
        else:  # a fixed grid, or scales the rounding computes itself (blocks, groups)
            q = run_quantize(fmt, x32, rounding, seed)
            if spec.ste == "clipped" and need_ste and fmt.ste_clip is not None:
                ste = (x, None, None, fmt.ste_clip)
        if ste is not None and self.role == "input" and not is_sparse(ste):
            ste = (call(ste_mask, x32, ste[1:3], ste[3:], flat=per_tensor(ste[1])), None, None, None)
        return q.to(x.dtype), ste

    def _observed_point(self, x: Tensor, x32: Tensor, seed: Tensor | None, training: bool, rounding: str,
                        need_ste: bool) -> tuple[Tensor, SteArgs | None]:
        """An observed format's point (:func:`int_point`): Q(x) on the observer's range, the
        observer's step, and the clipped STE's state."""
        spec, obs = self.spec, self.observer
        assert spec is not None and obs is not None
        fmt = spec.format
        axis = fmt.axis  # type: ignore[attr-defined]
        update = training or obs.kind == "minmax" or not bool(obs.initialized)
        channels = () if axis is None else (x32.shape[axis],)
        if update and (obs.kind == "percentile" or obs.min_val.shape != channels):
            obs.update(x32)  # eager: quantiles, or the first call that sizes per-channel buffers
            update = False
        when = "never"
        if update:  # delayed: the previous call's range; this tensor's min/max in the same pass
            when = "after" if spec.delayed and training and bool(obs.initialized) else "before"
        clipped = spec.ste == "clipped" and need_ste
        # reading the answer is free on the CPU only (a sync on a GPU); eager is the reference
        check = clipped and compile_enabled() and x.device.type == "cpu" and x.numel() >= MIN_COMPILED_NUMEL
        q, scale, zero_point, ste_lo, ste_hi, outside = call(
            int_point, x32, (seed, obs.min_val, obs.max_val, obs.initialized),
            (fmt, obs.kind, obs.momentum, rounding, when, check), inline=inline_kernel(fmt, rounding),
            flat=axis is None,
            rows=count_rows(x32.numel()) if check and when == "before" and axis is None else None)
        self.grid = (scale, zero_point)  # the grid of this call: an integer accumulator reads codes on it
        # new tensors: a later update cannot change them
        return q, clipped_ste(x, x32, ste_lo, ste_hi, outside) if clipped else None

    # --- backward ---------------------------------------------------------------------------
    @torch.no_grad()
    def quantize_gradient(self, g: Tensor, seed: Tensor | None, training: bool, ste: SteArgs | None = None,
                          owned: bool = False) -> Tensor:
        """G(mask * g): the gradient rounded to the gradient role's format (scaled if asked).

        ``owned``: ``g`` is this backward's own (:func:`precsim.runtime.ownership.owns_gradient`), so
        the result is written into it instead of a new tensor."""
        spec = self.grad_spec
        assert spec is not None
        fmt = spec.format
        rounding = spec.rounding if training else "nearest"
        scale = clean = None
        limit = None
        if spec.scale is not None:
            scale, clean = self.grad_scale, self.clean_steps
            if spec.scale == "dynamic":
                limit = fmt.gradient_limit
        stored = self._stored("grad_")  # the state measured on the previous backward
        if is_sparse(ste):  # zero the few clipped elements first: then the kernel reads g alone
            g = masked_gradient(g, ste, owned)  # type: ignore[arg-type]
            ste, owned = None, g.dtype == torch.float32
        ste_x, ste_lo, ste_hi, ste_clip = (None,) * 4 if ste is None else ste
        if blocked(fmt):  # blocks are cut outside the kernel (see run_quantize)
            g32 = g.float() if ste is None else masked_gradient(g.float(), ste, owned)
            q, next_scale, next_clean, measured = self._block_gradient(g32, seed, scale, clean, fmt, rounding, limit,
                                                                       owned)
        else:
            args = (ste_x, ste_lo, ste_hi, seed, scale, clean, stored)
            static = (fmt, rounding, limit, GROWTH_INTERVAL, ste_clip, rounding_options(fmt, stored, rounding))
            flat = per_tensor(ste_lo) and per_tensor_format(fmt)
            # written into the gradient it owns: no new gradient-sized tensor
            if owned:
                q = g
                next_scale, next_clean, measured, _ = call(quantize_gradient_into, g, args, static, flat=flat)
            else:
                q, next_scale, next_clean, measured, _ = call(quantize_gradient_fn, g.float(), args, static, flat=flat)
        if training:
            if next_scale is not None:
                self.grad_scale.copy_(next_scale)
                self.clean_steps.copy_(next_clean)
            if self._delayed["grad_"] is not None:
                self._store("grad_", measured)  # type: ignore[arg-type]
        return q.to(g.dtype)

    @staticmethod
    def _block_gradient(g: Tensor, seed: Tensor | None, scale: Tensor | None,
                        clean: Tensor | None, fmt: Format, rounding: str,
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
