"""The Quantizer module: one quantization point (format + observer + rounding + role).

Forward: the tensor is rounded to the role's format, with a straight-through estimator.
Backward: the gradient flowing through the point is rounded to the gradient role's format.
Both happen in one ``torch.autograd.Function``, so gradient quantization works for any module
and under DDP, with no module backward hooks.

Stochastic rounding only happens in ``train()``. Its random bits come from a per-quantizer seed
and a step counter, both buffers: a checkpoint restores the stream exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from precsim.config import RoleSpec
from precsim.formats import DSEFormat, FloatFormat, IntFormat
from precsim.formats.backend import call, run_quantize
from precsim.formats.rounding import exponent_of
from precsim.observers import Observer, broadcast_range, next_range, reduce_dims, tensor_range

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
    """y = Q(x) forward; dx = G(mask * dy) backward (mask: clipped STE, G: gradient format)."""

    @staticmethod
    def forward(ctx, x: Tensor, forward_fn: Callable[[Tensor], tuple[Tensor, Tensor | None]],  # type: ignore[override]
                backward_fn: Callable[[Tensor], Tensor] | None) -> Tensor:
        q, mask = forward_fn(x)
        if q is x:  # an input returned as is becomes a view that in-place ops (ReLU(inplace)) reject
            q = q.clone()
        ctx.backward_fn = backward_fn
        ctx.has_mask = mask is not None
        if mask is not None:
            ctx.save_for_backward(mask)
        return q

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        if ctx.has_mask:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        if ctx.backward_fn is not None:
            grad = ctx.backward_fn(grad)
        return grad, None, None


def observe_and_quantize(
    x: Tensor, seed: Tensor | None, min_val: Tensor, max_val: Tensor, initialized: Tensor,
    fmt: IntFormat, kind: str, momentum: float, rounding: str, update: bool, clipped: bool,
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Observe, quantize and build the clipped-STE mask in one pure function (one fused pass).

    Returns (Q(x), mask or None, new min, new max).
    """
    if update:
        lo, hi = tensor_range(x, reduce_dims(fmt.axis, x.dim()))
        min_val, max_val = next_range(lo, hi, min_val, max_val, initialized, kind, momentum)
    lo, hi = broadcast_range(min_val, max_val, fmt.axis, x.dim())
    scale, zp = fmt.qparams(lo, hi)
    q = fmt.quantize(x, rounding, seed=seed, scale=scale, zero_point=zp)  # type: ignore[arg-type]
    mask = None
    if clipped:
        mask = (x >= (fmt.qmin - zp - 0.5) * scale) & (x <= (fmt.qmax - zp + 0.5) * scale)
    return q, mask, min_val, max_val


class Quantizer(nn.Module):
    """Quantizes a tensor in the forward pass (``spec``) and its gradient (``grad_spec``)."""

    def __init__(self, role: str, spec: RoleSpec | None, grad_spec: RoleSpec | None = None, seed: int = 0) -> None:
        super().__init__()
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
        if grad_spec is not None and grad_spec.scale is not None:
            start = 2.0**16 if grad_spec.scale == "dynamic" else float(grad_spec.scale)
            self.register_buffer("grad_scale", torch.tensor(start))
            self.register_buffer("clean_steps", torch.zeros((), dtype=torch.int32))

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            with torch.no_grad():
                self.step.add_(1)
        offset = torch.stack([torch.zeros_like(self.step), self.step * _GOLDEN])
        fwd_seed = self.seed + offset
        bwd_seed = (self.seed ^ _BACKWARD_SALT) + offset
        training = self.training
        backward_fn = None
        if self.grad_spec is not None:
            def backward_fn(g: Tensor) -> Tensor:
                return self.quantize_gradient(g, bwd_seed, training)
        if self.spec is None:
            return _FakeQuantSTE.apply(x, lambda t: (t, None), backward_fn)

        def forward_fn(t: Tensor) -> tuple[Tensor, Tensor | None]:
            return self.quantize_values(t, fwd_seed, training)
        return _FakeQuantSTE.apply(x, forward_fn, backward_fn)

    @torch.no_grad()
    def quantize_values(self, x: Tensor, seed: Tensor, training: bool) -> tuple[Tensor, Tensor | None]:
        """Q(x) and the clipped-STE mask (None: pass every gradient)."""
        spec = self.spec
        assert spec is not None
        fmt = spec.format
        rounding = spec.rounding if training else "nearest"
        x32 = x.float()
        mask = None
        if isinstance(fmt, IntFormat) and self.observer is not None:
            obs = self.observer
            update = training or obs.kind == "minmax" or not bool(obs.initialized)
            channels = () if fmt.axis is None else (x32.shape[fmt.axis],)
            if update and (obs.kind == "percentile" or obs.min_val.shape != channels):
                obs.update(x32)  # eager: quantiles, or the first call that sizes per-channel buffers
                update = False
            q, mask, lo, hi = call(
                observe_and_quantize, x32, (seed, obs.min_val, obs.max_val, obs.initialized),
                (fmt, obs.kind, obs.momentum, rounding, update, spec.ste == "clipped"),
            )
            if update:
                obs.min_val.copy_(lo)
                obs.max_val.copy_(hi)
                obs.initialized.fill_(True)
        elif isinstance(fmt, DSEFormat) and fmt.delayed:
            shift = fmt.shift_for(x32)
            used = torch.where(self.dse_ready, self.dse_shift, shift)
            if training:
                self.dse_shift.copy_(shift)
                self.dse_ready.fill_(True)
            q = run_quantize(fmt, x32, rounding, seed, shift=used)
        else:
            q = run_quantize(fmt, x32, rounding, seed)
            if spec.ste == "clipped" and isinstance(fmt, FloatFormat):
                mask = x32.abs() <= fmt.max
        return q.to(x.dtype), mask

    # --- backward ---------------------------------------------------------------------------
    @torch.no_grad()
    def quantize_gradient(self, g: Tensor, seed: Tensor, training: bool) -> Tensor:
        """G(g): the gradient rounded to the gradient role's format (scaled if asked)."""
        spec = self.grad_spec
        assert spec is not None
        fmt = spec.format
        rounding = spec.rounding if training else "nearest"
        g32 = g.float()
        scale = None
        if spec.scale is not None:
            scale = self.grad_scale
            if spec.scale == "dynamic" and isinstance(fmt, FloatFormat):
                scale = self._dynamic_scale(g32, fmt.max, training)
            g32 = g32 * scale
        if isinstance(fmt, DSEFormat):
            shift = fmt.shift_for(g32)
            if fmt.delayed:  # the shift measured on the previous backward, as for activations
                used = torch.where(self.grad_dse_ready, self.grad_dse_shift, shift)
                if training:
                    self.grad_dse_shift.copy_(shift)
                    self.grad_dse_ready.fill_(True)
                shift = used
            q = run_quantize(fmt, g32, rounding, seed, shift=shift)
        else:
            q = run_quantize(fmt, g32, rounding, seed)
        if scale is not None:
            q = q / scale
        return q.to(g.dtype)

    def _dynamic_scale(self, g: Tensor, max_value: float, training: bool) -> Tensor:
        """Loss-scale style: shrink S at once on overflow; double it after clean intervals."""
        amax = torch.where(torch.isfinite(g), g.abs(), torch.zeros_like(g)).amax()
        s = self.grad_scale
        ratio = amax * s / max_value
        over = ratio > 1.0
        shrink = torch.where(over, (exponent_of(torch.where(over, ratio, torch.ones_like(ratio))) + 1).float(), torch.zeros(()))
        s_now = s * torch.exp2(-shrink)
        if training:
            clean = torch.where(over, torch.zeros_like(self.clean_steps), self.clean_steps + 1)
            grow = clean >= GROWTH_INTERVAL
            self.grad_scale.copy_(torch.where(grow, s_now * 2, s_now))
            self.clean_steps.copy_(torch.where(grow, torch.zeros_like(clean), clean))
        return s_now

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
