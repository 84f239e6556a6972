"""Accumulator points: GEMM calls of a prepared model run with a simulated accumulator.

The arithmetic is :mod:`precsim.runtime.accumulate` (pure); here is what a model needs around
it: an :class:`Accumulator` module per point (its seed and step for stochastic rounding, its
count of integer overflow events, and a fingerprint in its ``state_dict``), the one autograd
Function every GEMM kind goes through (:class:`_AccumulatedMatmul`: straight-through, i.e. the
plain GEMM's gradients, or the backward GEMMs accumulated by ``gradient_accumulator``), and
:func:`accumulated_call`, which turns an intercepted ``F.linear``, ``conv1d/2d`` or matmul-like
call into that GEMM. The calls are intercepted by the TorchFunctionMode of
:mod:`precsim.qat.operands`, which both ``points: operands`` and ``points: outputs`` install
when a config has an accumulator: nothing in torch is replaced and no layer has a forward of
its own here.

Integer accumulators work on the operands' integer codes: an operand rounded by an integer
point with scale S and zero point Z holds S (q - Z), so ``round(x / S)`` is the code q - Z;
the accumulated code sum is rescaled by S_a S_b. The scales come from the points that rounded
the operands (the ``grids``): with ``points: outputs``, the module's ``input`` role and its
weight; with ``points: operands``, the operand points.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from precsim.formats.random import mix_seed
from precsim.qat.config import AccumulatorSpec
from precsim.qat.fingerprint import Fingerprinted
from precsim.runtime.accumulate import (
    conv_as_matmul,
    conv_float,
    einsum_as_matmul,
    exact_dtype,
    matmul_float,
    matmul_int,
)

_GOLDEN = -1640531527  # 0x9E3779B9 as int32: the step's offset of the seed (as Quantizer)
_BACKWARD_SALTS = (0x1B873593, 0x5BD1E995)  # grad_input, grad_weight
Grid = tuple[Tensor, Tensor]  # (scale, zero point) of an integer point, shaped to broadcast on its tensor
Matmul = Callable[[Tensor, Tensor], Tensor]
INPUT_SOURCE = "precsim_input_source"
"""Attribute of a Linear/Conv without an ``input`` point (points: outputs): ``(quantizer, factors)``,
the upstream point whose codes reach its input through ops that keep them, and the constants
that rescale them on the way. Int32 bias quantization finds it (:mod:`precsim.qat.bias`); an
integer accumulator reads the input's codes on that grid."""


def accumulator_fingerprint(spec: AccumulatorSpec | None, grad_spec: AccumulatorSpec | None) -> dict[str, str]:
    """What an accumulator point was made with (its overflow count means something only then)."""
    fp = {"role": "accumulator", "format": "fp32" if spec is None else spec.describe()}
    if grad_spec is not None:
        fp["gradient"] = grad_spec.describe()
    return fp


class _AccumulatedMatmul(torch.autograd.Function):
    """``forward_fn(a, b)`` forward (a @ b with a simulated accumulator); backward: the plain
    GEMM's gradients, g b^T and a^T g, through ``backward_fn`` (the backward GEMMs with their
    own accumulator) where given, else ``torch.matmul`` (straight-through)."""

    @staticmethod
    def forward(ctx, a: Tensor, b: Tensor, forward_fn: Matmul,  # type: ignore[override]
                backward_fn: Callable[[Tensor, Tensor, int], Tensor] | None) -> Tensor:
        ctx.save_for_backward(a, b)
        ctx.backward_fn = backward_fn
        return forward_fn(a.detach(), b.detach()).to(torch.promote_types(a.dtype, b.dtype))  # (sums: float32)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None, None]:  # type: ignore[override]
        a, b = ctx.saved_tensors
        fn = ctx.backward_fn
        grad_a = grad_b = None
        g = g.to(a.dtype)
        if ctx.needs_input_grad[0]:
            bt = b.transpose(-1, -2)
            if fn is not None and a.dim() == 2 and g.dim() == 3:  # a shared by every matrix (a conv's
                # weight): one GEMM whose K runs over all of them, as for a Linear's weight
                grad_a = fn(g.transpose(0, 1).reshape(g.shape[1], -1), bt.reshape(-1, bt.shape[-1]), 0)
            else:
                grad_a = _sum_to(torch.matmul(g, bt) if fn is None else fn(g, bt, 0), a.shape)
        if ctx.needs_input_grad[1]:
            at = a.transpose(-1, -2)
            if a.dim() == 2 and g.dim() == 3:  # bmm reads a shared a in place (matmul copies g and the result)
                at = at.expand(g.shape[0], *at.shape)
            grad_b = _sum_to(torch.bmm(at, g) if fn is None and at.dim() == 3 == g.dim() else (
                torch.matmul(at, g) if fn is None else fn(at, g, 1)), b.shape)
        return grad_a, grad_b, None, None


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """A gradient of a broadcast operand summed back to its shape."""
    return t if t.shape == shape else t.sum_to_size(shape)


class Accumulator(Fingerprinted):
    """One accumulator point: how a GEMM's sums are held (``spec``), and its backward GEMMs'
    (``grad_spec``). Buffers: the seed and step of stochastic rounding (as a Quantizer's) and
    ``overflows``, the integer overflow events counted so far (every block add that left the
    W-bit range, over every call; reset it with ``overflows.zero_()``)."""

    def __init__(self, spec: AccumulatorSpec | None, grad_spec: AccumulatorSpec | None = None, seed: int = 0) -> None:
        super().__init__()
        self.spec, self.grad_spec = spec, grad_spec
        self.owner_kind = ""  # points: outputs: "Linear" or "Conv" (the summary's op)
        self.fingerprint = accumulator_fingerprint(spec, grad_spec)
        self.register_buffer("seed", torch.tensor([mix_seed(seed, 1), mix_seed(seed, 2)], dtype=torch.int32))
        self.register_buffer("step", torch.zeros((), dtype=torch.int32))
        self.register_buffer("overflows", torch.zeros((), dtype=torch.int64))

    @property
    def integer(self) -> bool:
        return self.spec is not None and self.spec.bits is not None

    # --- the GEMM ---------------------------------------------------------------------------
    def _call_seed(self, salt: int = 0) -> Tensor:
        offset = torch.stack([torch.zeros_like(self.step), self.step * _GOLDEN])
        return (self.seed ^ salt) + offset

    def _settings(self) -> tuple[AccumulatorSpec, str, Tensor | None]:
        """This call's spec, rounding (stochastic only in training) and seed; a training call
        moves the step on (the next call draws other bits)."""
        if self.training:
            with torch.no_grad():
                self.step.add_(1)
        spec = self.spec
        assert spec is not None
        rounding = spec.rounding if self.training else "nearest"
        return spec, rounding, self._call_seed() if rounding == "stochastic" else None

    def conv(self, x: Tensor, weight: Tensor, init: Tensor | None, stride: Any, padding: Any, dilation: Any) -> Tensor:
        """A conv (groups 1) with this point's float accumulator, forward only (its caller's
        straight-through gives the gradient): :func:`conv_float`, the GEMM's bits without im2col."""
        spec, rounding, seed = self._settings()
        return conv_float(x.detach(), weight.detach(), spec.format, spec.block, stride=stride, padding=padding,
                          dilation=dilation, promote=spec.promote, rounding=rounding, seed=seed, init=init)

    def matmul(self, a: Tensor, b: Tensor, init: Tensor | None = None,
               scales: tuple[Tensor, Tensor, float, float] | None = None) -> Tensor:
        """``a @ b`` (torch.matmul's shapes) with this point's accumulator; ``init``: a bias added
        first (the result's shape); ``scales`` (integer accumulators): S_a, S_b (shaped for ``a``
        and ``b``) and the largest code magnitudes of a and b."""
        squeeze = []
        if a.dim() == 1:
            a, squeeze = a.unsqueeze(0), [*squeeze, -2]
        if b.dim() == 1:
            b, squeeze = b.unsqueeze(-1), [*squeeze, -1]
        lead = a.shape[:-1]
        if b.dim() == 2 and a.dim() > 2:  # one GEMM over every row: the weight gradient sums them all
            a = a.reshape(-1, a.shape[-1])
        training = self.training
        spec, rounding, seed = self._settings()
        if init is not None and b.dim() == 2:
            init = init.reshape(-1, init.shape[-1]) if init.dim() > 1 else init

        def forward(x: Tensor, y: Tensor) -> Tensor:
            if spec.bits is None:
                return matmul_float(x, y, spec.format, spec.block, promote=spec.promote, rounding=rounding, seed=seed,
                                    init=init)
            assert scales is not None
            sa, sb, max_a, max_b = scales
            ca, cb = torch.round(x / sa), torch.round(y / sb)
            scale = (sa * sb).to(torch.float64)
            start = None if init is None else torch.round(init.double() / scale)
            out, events = matmul_int(ca, cb, spec.bits, spec.block, promote=spec.promote, overflow=spec.overflow,
                                     init=start, dtype=exact_dtype(max_a, max_b, spec.block))
            self.overflows.add_(events)
            return (out.double() * scale).float()

        out = _AccumulatedMatmul.apply(a, b, forward, self._backward(training))
        if len(lead) + 1 != out.dim() and b.dim() == 2:
            out = out.reshape(*lead, out.shape[-1])
        for dim in squeeze:
            out = out.squeeze(dim)
        return out

    def _backward(self, training: bool) -> Callable[[Tensor, Tensor, int], Tensor] | None:
        """The backward GEMMs with ``grad_spec`` (None: straight-through)."""
        g = self.grad_spec
        if g is None:
            return None
        rounding = g.rounding if training else "nearest"
        seeds = [self._call_seed(s) if rounding == "stochastic" else None for s in _BACKWARD_SALTS]

        def run(x: Tensor, y: Tensor, which: int) -> Tensor:
            if y.dim() == 2 and x.dim() > 2:
                return run(x.reshape(-1, x.shape[-1]), y, which).reshape(*x.shape[:-1], y.shape[-1])
            return matmul_float(x, y, g.format, g.block, promote=g.promote, rounding=rounding, seed=seeds[which])
        return run

    def extra_repr(self) -> str:
        grad = "-" if self.grad_spec is None else self.grad_spec.describe()
        return f"accumulator={'fp32' if self.spec is None else self.spec.describe()}, gradient={grad}"


# --- an intercepted GEMM call as a matmul -------------------------------------------------------
def _bind(args: tuple[Any, ...], kwargs: dict[str, Any], names: tuple[str, ...],
          defaults: tuple[Any, ...]) -> list[Any]:
    values = list(args) + [None] * (len(names) - len(args))
    for i, name in enumerate(names):
        if i >= len(args):
            values[i] = kwargs.get(name, defaults[i])
    return values


_LINEAR = ("input", "weight", "bias")
_CONV = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = (None, None, None, 1, 0, 1, 1)


def _scales(grids: list[Grid | None] | None, names: tuple[str, str]) -> list[Tensor]:
    """The operands' scales, checked: an integer accumulator needs both operands integer-rounded."""
    if grids is None or any(g is None for g in grids):
        missing = [n for n, g in zip(names, grids or [None, None], strict=True) if g is None]
        raise ValueError(f"an integer accumulator sums integer codes: operand {missing[0]!r} is not rounded by an "
                         "integer point; give it an integer format (points: outputs: the module's 'input' role and "
                         "'weight'; points: operands: 'activation' and 'weight')")
    return [g[0] for g in grids]  # type: ignore[index]


def _per_tensor(scale: Tensor, name: str) -> Tensor:
    if scale.numel() != 1:
        raise ValueError(f"an integer accumulator needs one scale for operand {name!r} across the reduction axis; "
                         f"got {scale.numel()} scales (per_channel there); allowed: granularity per_tensor")
    return scale.reshape(())


Vjp = Callable[[Tensor, tuple[Tensor, ...], tuple[bool, ...]], list[Tensor | None]]


class _StraightThrough(torch.autograd.Function):
    """``simulated(*tensors)`` forward; backward: ``vjp(g, tensors, needs)``, the gradients of
    the op as torch runs it, i.e. the straight-through estimator for any GEMM kind, with
    torch's own backward kernels (a conv's: no im2col columns kept, no col2im)."""

    @staticmethod
    def forward(ctx, simulated: Callable[..., Tensor], vjp: Vjp,  # type: ignore[override]
                *tensors: Tensor) -> Tensor:
        ctx.vjp = vjp
        ctx.save_for_backward(*tensors)
        return simulated(*tensors)

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        return (None, None, *ctx.vjp(g, ctx.saved_tensors, ctx.needs_input_grad[2:]))


def _recomputed(plain: Callable[..., Tensor]) -> Vjp:
    """The vjp of any op: ``plain`` run again on the saved operands, then autograd."""
    def vjp(g: Tensor, tensors: tuple[Tensor, ...], needs: tuple[bool, ...]) -> list[Tensor | None]:
        with torch.enable_grad():
            xs = [t.detach().requires_grad_(need) for t, need in zip(tensors, needs, strict=True)]
            out = plain(*xs)
            wanted = [x for x, need in zip(xs, needs, strict=True) if need]
            grads = iter(torch.autograd.grad(out, wanted, g) if wanted else ())
        return [next(grads) if need else None for need in needs]
    return vjp


def _conv_vjp(names: list[str], kernel: tuple[int, ...], stride: Any, padding: Any, dilation: Any,
              groups: int) -> Vjp | None:
    """A conv's vjp by ``aten.convolution_backward`` (what autograd runs for it), without running
    the conv forward again (15% of the zoo ResNet's step); ``names``: the role of each tensor
    (input, weight, bias). None for an odd total "same" padding (torch pads the input for it)."""
    n = len(kernel)
    dilation = _ints(dilation, n)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(dilation, kernel, strict=True)]
        if any(t % 2 for t in totals):
            return None
        padding = [t // 2 for t in totals]
    pads = _ints(0 if padding == "valid" else padding, n)

    def vjp(g: Tensor, tensors: tuple[Tensor, ...], needs: tuple[bool, ...]) -> list[Tensor | None]:
        t, need = dict(zip(names, tensors, strict=True)), dict(zip(names, needs, strict=True))
        x, w = t["input"], t["weight"]
        unbatched = x.dim() == n + 1
        gx, gw, gb = torch.ops.aten.convolution_backward(
            (g.unsqueeze(0) if unbatched else g).to(x.dtype), x.unsqueeze(0) if unbatched else x, w,
            [w.shape[0]] if "bias" in t else None, _ints(stride, n), pads, dilation, False, [0] * n, groups,
            [need["input"], need["weight"], need.get("bias", False)])
        grads = {"input": gx[0] if unbatched and gx is not None else gx, "weight": gw, "bias": gb}
        return [grads[name] if need[name] else None for name in names]
    return vjp


def _ints(v: Any, n: int) -> list[int]:
    return list(v) if isinstance(v, (tuple, list)) else [v] * n


def accumulated_call(acc: Accumulator, op: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                     grids: list[Grid | None] | None = None, bits: tuple[int, int] = (16, 16)) -> Any:
    """``func(*args, **kwargs)`` (an ``F.linear``, ``conv1d/2d`` or matmul-like call, operands
    already rounded) with ``acc``'s accumulator. ``grids``: the (scale, zero point) of each
    operand's integer point, in the call's operand order (integer accumulators); ``bits``:
    their code widths.

    Without a gradient accumulator, the whole call is one :class:`_StraightThrough` (the
    gradient is the plain op's); with one, its GEMM form runs through :class:`_AccumulatedMatmul`,
    whose backward GEMMs are accumulated."""
    if acc.grad_spec is not None or not torch.is_grad_enabled():
        return _accumulated(acc, op, func, args, kwargs, grids, bits)
    keys = list(kwargs)
    slots = [i for i, v in enumerate([*args, *kwargs.values()]) if isinstance(v, Tensor)]

    def rebuild(tensors: tuple[Tensor, ...]) -> tuple[list[Any], dict[str, Any]]:
        values = [*args, *kwargs.values()]
        for i, t in zip(slots, tensors, strict=True):
            values[i] = t
        return values[:len(args)], dict(zip(keys, values[len(args):], strict=True))

    def simulated(*tensors: Tensor) -> Tensor:
        a, k = rebuild(tensors)
        return _accumulated(acc, op, func, tuple(a), k, grids, bits)  # type: ignore[no-any-return]

    def plain(*tensors: Tensor) -> Tensor:
        a, k = rebuild(tensors)
        return func(*a, **k)  # type: ignore[no-any-return]

    vjp = None
    if op == "conv":
        _, w, _, stride, padding, dilation, groups = _bind(args, kwargs, _CONV, _CONV_DEFAULTS)
        names = [_CONV[i] if i < len(args) else keys[i - len(args)] for i in slots]
        vjp = _conv_vjp(names, w.shape[2:], stride, padding, dilation, groups)
    values = [*args, *kwargs.values()]
    return _StraightThrough.apply(simulated, vjp or _recomputed(plain), *(values[i] for i in slots))


def _accumulated(acc: Accumulator, op: str, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 grids: list[Grid | None] | None, bits: tuple[int, int]) -> Any:
    """:func:`accumulated_call`'s simulated op (through :meth:`Accumulator.matmul`)."""
    spec = acc.spec
    assert spec is not None
    integer = spec.bits is not None
    code_max = (2.0 ** bits[0], 2.0 ** bits[1])
    if op == "linear":
        x, w, bias = _bind(args, kwargs, _LINEAR, (None, None, None))
        scales = None
        if integer:
            sx, sw = _scales(grids, ("input", "weight"))
            sw = torch.broadcast_to(sw, w.shape)[:, :1].t() if sw.numel() > 1 else sw.reshape(())
            scales = (_per_tensor(sx, "input"), sw, *code_max)
        init = bias if bias is not None and spec.bias == "before" else None
        if init is not None:
            init = torch.broadcast_to(init, (*x.shape[:-1], w.shape[0]))
        out = acc.matmul(x, w.t(), init=init, scales=scales)
        return out + bias if bias is not None and init is None else out
    if op == "conv":
        x, w, bias, stride, padding, dilation, groups = _bind(args, kwargs, _CONV, _CONV_DEFAULTS)
        if not integer and groups == 1 and (acc.grad_spec is None or not torch.is_grad_enabled()):
            shaped = None if bias is None else bias.view(-1, *([1] * (w.dim() - 2)))  # batched or not
            before = shaped is not None and spec.bias == "before"
            out = acc.conv(x, w, shaped if before else None, stride, padding, dilation)
            return out + shaped if shaped is not None and not before else out
        a, b, back = conv_as_matmul(x, w, stride, padding, dilation, groups)  # a: the weight, b: the input's columns
        rows = (w.shape[0], 1) if groups == 1 else (groups, w.shape[0] // groups, 1)  # per output channel
        scales = None
        if integer:
            sx, sw = _scales(grids, ("input", "weight"))
            sw = torch.broadcast_to(sw, w.shape).reshape(w.shape[0], -1)[:, 0].reshape(rows) if sw.numel() > 1 else (
                sw.reshape(()))
            scales = (sw, _per_tensor(sx, "input"), code_max[1], code_max[0])
        init = None
        if bias is not None and spec.bias == "before":
            init = torch.broadcast_to(bias.reshape(rows), (*b.shape[:-2], *a.shape[-2:-1], b.shape[-1]))
        out = back(acc.matmul(a, b, init=init, scales=scales))
        if bias is not None and init is None:
            out = out + bias.view(-1, *([1] * (w.dim() - 2)))
        return out
    if op == "einsum":
        a, b, back = einsum_as_matmul(args[0], args[1], args[2])
        scales = None
        if integer:
            sa, sb = _scales(grids, ("op0", "op1"))
            scales = (_per_tensor(sa, "op0"), _per_tensor(sb, "op1"), *code_max)
        return back(acc.matmul(a, b, scales=scales))
    # matmul-like: matmul / @ / mm / bmm, and addmm / baddbmm (beta * input + alpha * product)
    return _matmul_like(acc, func, args, kwargs, grids, code_max)


def _matmul_like(acc: Accumulator, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any],
                 grids: list[Grid | None] | None, code_max: tuple[float, float]) -> Any:
    names = getattr(func, "__name__", "")
    fused = names in ("addmm", "baddbmm")
    if fused:
        inp, m1, m2 = _bind(args, kwargs, ("input", "mat1" if names == "addmm" else "batch1",
                                           "mat2" if names == "addmm" else "batch2"), (None,) * 3)
        beta, alpha = kwargs.get("beta", 1), kwargs.get("alpha", 1)
    elif names == "__rmatmul__":
        m2, m1 = args[0], args[1]
    else:
        m1 = args[0] if args else kwargs.get("input")
        m2 = args[1] if len(args) > 1 else kwargs.get("other", kwargs.get("mat2"))
    scales = None
    if acc.integer:
        sa, sb = _scales(grids, ("a", "b"))
        scales = (_per_tensor(sa, "a"), _per_tensor(sb, "b"), *code_max)
    out = acc.matmul(m1, m2, scales=scales)
    if fused:
        out = beta * inp + alpha * out if (beta != 1 or alpha != 1) else inp + out
    return out


def attention_matmul(acc: Accumulator,
                     grids_of: Callable[[tuple[str, str]], tuple[list[Grid | None], tuple[int, int]]]) -> Matmul:
    """The matmul of :func:`precsim.qat.operands.attention`'s two GEMMs, ``q k^T`` then ``P v``,
    with ``acc``'s accumulator. An integer accumulator sums the codes of the operands' points:
    ``grids_of(("q", "k"))`` and ``grids_of(("p", "v"))`` give their grids when each GEMM runs
    (after attention has rounded its operands)."""
    if not acc.integer:
        return acc.matmul
    pairs = iter((("q", "k"), ("p", "v")))

    def matmul(x: Tensor, y: Tensor) -> Tensor:
        names = next(pairs)
        grids, bits = grids_of(names)
        sa, sb = _scales(grids, names)
        return acc.matmul(x, y, scales=(_per_tensor(sa, names[0]), _per_tensor(sb, names[1]), 2.0 ** bits[0],
                                        2.0 ** bits[1]))
    return matmul


def overflows(model: nn.Module) -> dict[str, int]:
    """Integer overflow events counted by each accumulator point of ``model`` (its name -> count)."""
    return {name: int(m.overflows) for name, m in model.named_modules() if isinstance(m, Accumulator)}


__all__ = ["Accumulator", "accumulated_call", "accumulator_fingerprint", "attention_matmul", "overflows"]

