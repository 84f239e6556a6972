"""The integer operations a vision transformer adds to an :class:`~precsim.integer.model.IntegerModel`.

I-ViT (Li & Gu, ICCV 2023) keeps a transformer integer-only with:

* :class:`MatMulOp`: the product of two activations (attention's ``q k^T`` and ``softmax v``),
  integer accumulation of the centred codes and dyadic requantization ``M = S_a S_b c / S_out``
  (``c`` a constant such as ``1/sqrt(d)`` folded in): the gemmlowp multiplier ``M0 2^(shift-31)``
  is I-ViT's dyadic ``b / 2^c`` with ``b = M0``;
* :class:`ShiftmaxOp`, :class:`ShiftGeluOp`, :class:`ILayerNormOp`: the integer nonlinearities
  of :mod:`precsim.integer.ivit_ops`, whose integer constants are derived once here, at
  conversion time, and saved with the model;
* :class:`AddConstOp`: tokens plus real constants (class token, position embedding), the
  constants rounded once at conversion on a ``2^L`` finer grid than the output;
* :class:`LayoutOp`: permute / transpose / unflatten / flatten / indexing on codes.

Like every op they read and write the integer model's layout (4-D tensors channels-last, see
:mod:`precsim.integer.ops`) and compute on the logical (channels-first) tensor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from precsim.integer.fixedpoint import (
    INT32_MAX,
    check_requant_rounding,
    multiply_by_quantized_multiplier,
    requantize,
    shift_right_rounded,
)
from precsim.integer.ivit_ops import (
    ILayerNormConsts,
    ShiftExpConsts,
    ShiftGeluConsts,
    ShiftmaxConsts,
    i_layernorm_int,
    shift_gelu_int,
    shiftmax_int,
)
from precsim.integer.ops import (
    FixedPointMultiplier,
    Op,
    QParams,
    _exact_int,
    _rec,
    _requant_fast,
    register_op,
    requant_row,
    to_nchw,
    to_nhwc,
)

__all__ = [
    "AddConstOp",
    "ILayerNormOp",
    "LayoutOp",
    "MatMulOp",
    "ShiftGeluOp",
    "ShiftmaxOp",
    "consts_state",
    "decode_index",
    "encode_index",
]

Record = list[tuple[str, str, Tensor]]


def _dt(qp: QParams) -> str:
    return str(qp.dtype).replace("torch.", "")


def consts_state(consts: Any) -> dict[str, Any]:
    """A frozen ``prepare_*`` constants dataclass as plain values (nested ones as dicts): what an op saves."""
    return {f.name: (consts_state(v) if dataclasses.is_dataclass(v) else v)
            for f in dataclasses.fields(consts) for v in [getattr(consts, f.name)]}


# --------------------------------------------------------------------------------------------
# Activation x activation product
# --------------------------------------------------------------------------------------------


@register_op
@dataclass
class MatMulOp(Op):
    """``out = clamp(Z3 + MBQM(sum_k (a - Za)(b - Zb), M0, shift))``, batched over leading dims.

    ``M0 2^(shift - 31) = S_a S_b factor / S_out`` (``factor``: a constant multiplying the product
    in the float model, e.g. attention's ``1/sqrt(head_dim)``, so it costs no extra rounding).
    The inner size K (head size, or number of tokens) is known only at run time, so the
    accumulator is planned per K met (integer maths, cached): int32 while the worst case
    ``K max|a - Za| max|b - Zb|`` fits, else int64 rounded right by ``pre_shift`` bits before the
    multiply (``shift + pre_shift``), as :class:`~precsim.integer.ops.ConvOp` does.
    """

    kind: ClassVar[str] = "matmul"
    name: str
    inputs: list[str]
    output: str
    a_qp: QParams
    b_qp: QParams
    out_qp: QParams
    multiplier: int
    shift: int
    lo: int
    hi: int
    factor: float = 1.0
    rounding: str = "gemmlowp"
    _plans: dict[int, tuple[torch.dtype, int, FixedPointMultiplier]] = field(
        init=False, repr=False, compare=False, default_factory=dict)

    def __post_init__(self) -> None:
        check_requant_rounding(self.rounding)

    def plan(self, k: int) -> tuple[torch.dtype, int, FixedPointMultiplier]:
        """(accumulator dtype, pre_shift, multiplier) for inner size ``k``."""
        if k not in self._plans:
            bound = k * self.a_qp.max_abs_centred * self.b_qp.max_abs_centred
            pre = 0 if bound <= INT32_MAX else max(0, bound.bit_length() - 30)
            acc_t = torch.int32 if bound <= INT32_MAX else torch.int64
            if self.shift + pre > 31:
                raise OverflowError(f"{self.name}: requantization multiplier out of range for K = {k}")
            self._plans[k] = (acc_t, pre, FixedPointMultiplier(self.multiplier, self.shift + pre, self.rounding))
        return self._plans[k]

    def run(self, a: Tensor, b: Tensor, record: Record | None = None) -> Tensor:
        a, b = to_nchw(a), to_nchw(b)
        acc_t, pre, mult = self.plan(a.shape[-1])
        acc = torch.matmul(a.to(acc_t) - self.a_qp.zero_point, b.to(acc_t) - self.b_qp.zero_point)
        _rec(record, self, "accumulator", acc)
        return to_nhwc(_requant_fast(acc, mult, pre, self.out_qp.zero_point, self.lo, self.hi, self.out_qp.dtype,
                                     self.rounding))

    def reference(self, a: Tensor, b: Tensor) -> Tensor:
        acc_t, pre, _ = self.plan(a.shape[-1])
        ac = (a.to(torch.int64) - self.a_qp.zero_point).double()
        bc = (b.to(torch.int64) - self.b_qp.zero_point).double()
        acc = _exact_int(torch.matmul(ac, bc), self.name)
        if acc_t == torch.int32 and acc.numel() and int(acc.abs().max()) > INT32_MAX:
            raise OverflowError(f"{self.name}: accumulator overflowed int32 despite the bound")
        if pre:
            acc = shift_right_rounded(acc, pre, self.rounding)
        return requantize(acc.to(torch.int32), self.multiplier, self.shift + pre, self.out_qp.zero_point,
                          self.lo, self.hi, rounding=self.rounding).to(torch.int64)

    def describe_row(self) -> dict[str, str]:
        k32 = INT32_MAX // max(1, self.a_qp.max_abs_centred * self.b_qp.max_abs_centred)
        return {
            "op": "matmul" + (f" (x{self.factor:.4g})" if self.factor != 1.0 else ""),
            "in": f"{_dt(self.a_qp)}@{_dt(self.b_qp)}", "acc": f"int32 (K<={k32})", "out": _dt(self.out_qp),
            "M0": str(self.multiplier), "n": str(-self.shift),
            "Z_in": f"{self.a_qp.zero_point},{self.b_qp.zero_point}", "Z_out": str(self.out_qp.zero_point),
            "S_in": f"{self.a_qp.scale:.4g},{self.b_qp.scale:.4g}", "S_out": f"{self.out_qp.scale:.4g}",
            "clamp": f"{self.lo}..{self.hi}",
        }


# --------------------------------------------------------------------------------------------
# I-ViT nonlinearities
# --------------------------------------------------------------------------------------------


@dataclass
class _NonlinearOp(Op):
    """One input, one I-ViT integer nonlinearity: ``consts`` are its integer constants (a
    ``prepare_*`` dataclass as plain values, :func:`consts_state`), rebuilt into ``_k`` by each
    subclass's ``__post_init__``."""

    name: str
    inputs: list[str]
    output: str
    in_qp: QParams
    out_qp: QParams
    consts: dict[str, Any]


@register_op
@dataclass
class ShiftmaxOp(_NonlinearOp):
    """Integer softmax over the last dim (:func:`~precsim.integer.ivit_ops.shiftmax_int`).

    ``in_qp.scale`` is the real scale of the input codes (any zero point: the row max is
    subtracted first); the output has I-ViT's scale ``1 / (2^bits - 1)`` and zero point 0
    (``out_qp``). ``consts`` are the integer constants of ``prepare_shiftmax``.
    """

    kind: ClassVar[str] = "shiftmax"
    _k: ShiftmaxConsts = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        c = dict(self.consts)
        self._k = ShiftmaxConsts(ShiftExpConsts(**c.pop("exp")), **c)

    @classmethod
    def make(cls, name: str, inputs: list[str], output: str, in_qp: QParams, k: ShiftmaxConsts) -> ShiftmaxOp:
        out_qp = QParams(k.out_scale, 0, 0, k.out_max)
        return cls(name, inputs, output, in_qp, out_qp, consts_state(k))

    def run(self, x: Tensor, record: Record | None = None) -> Tensor:
        return to_nhwc(shiftmax_int(to_nchw(x), self._k).to(self.out_qp.dtype))

    def reference(self, x: Tensor) -> Tensor:
        return shiftmax_int(x, self._k).to(torch.int64)

    def describe_row(self) -> dict[str, str]:
        e = self._k.exp
        return {"op": f"shiftmax (exp: b={e.mult}, c={e.shift}, G={e.guard_bits})", "acc": "int64",
                **requant_row(self.in_qp, self.out_qp, 0, self.out_qp.qmax)}


@register_op
@dataclass
class ShiftGeluOp(_NonlinearOp):
    """Integer GELU ``x sigmoid(1.702 x)`` (:func:`~precsim.integer.ivit_ops.shift_gelu_int`).

    Symmetric codes in and out (zero point 0), output clamped to ``out_qp``'s range.
    """

    kind: ClassVar[str] = "shiftgelu"
    _k: ShiftGeluConsts = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        c = dict(self.consts)
        self._k = ShiftGeluConsts(exp=ShiftExpConsts(**c.pop("exp")), **c)

    def _apply(self, x: Tensor) -> Tensor:
        return torch.clamp(shift_gelu_int(x, self._k), self.out_qp.qmin, self.out_qp.qmax)

    def run(self, x: Tensor, record: Record | None = None) -> Tensor:
        return self._apply(x).to(self.out_qp.dtype)  # element-wise: any layout

    def reference(self, x: Tensor) -> Tensor:
        return self._apply(x).to(torch.int64)

    def describe_row(self) -> dict[str, str]:
        k = self._k
        return {"op": f"shiftgelu (sigmoid 2^-{k.sigmoid_bits})", "acc": "int64", "M0": str(k.out_mult),
                "n": f"{k.out_shift} (b/2^c)", **requant_row(self.in_qp, self.out_qp, self.out_qp.qmin, self.out_qp.qmax)}


@register_op
@dataclass
class ILayerNormOp(_NonlinearOp):
    """Integer LayerNorm over the last dim (:func:`~precsim.integer.ivit_ops.i_layernorm_int`).

    The mean is shift-invariant, so the input may have any zero point; ``consts`` hold the
    integer affine weight/bias (16-bit, per tensor) and the output dyadic multiplier.
    """

    kind: ClassVar[str] = "ilayernorm"
    _k: ILayerNormConsts = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._k = ILayerNormConsts(**self.consts)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self._k.weight_int, self._k.bias_int))

    def _apply(self, x: Tensor) -> Tensor:
        return torch.clamp(i_layernorm_int(x, self._k), self.out_qp.qmin, self.out_qp.qmax)

    def run(self, x: Tensor, record: Record | None = None) -> Tensor:
        return to_nhwc(self._apply(to_nchw(x)).to(self.out_qp.dtype))

    def reference(self, x: Tensor) -> Tensor:
        return self._apply(x).to(torch.int64)

    def describe_row(self) -> dict[str, str]:
        k = self._k
        return {"op": f"i-layernorm (n={k.n}, P={k.frac_bits}, isqrt)", "weight": f"int{k.weight_int.dtype.itemsize * 8}",
                "acc": "int64", "M0": str(k.out_mult), "n": f"{k.out_shift} (b/2^c)", "S_w": f"{k.weight_scale:.4g}",
                **requant_row(self.in_qp, self.out_qp, self.out_qp.qmin, self.out_qp.qmax)}


# --------------------------------------------------------------------------------------------
# Tokens plus constants: class token and position embedding
# --------------------------------------------------------------------------------------------


@register_op
@dataclass
class AddConstOp(Op):
    """``out = clamp(Z_out + RDBPOT(cat(prefix, MBQM((x - Zx) 2^L, Sx/S_out) + offset), L))``.

    The real constants (class token plus its position embedding: ``prefix``, ``P`` rows
    prepended along ``dim``; the position embedding of the other rows: ``offset``) are int64
    codes at scale ``S_out 2^-L``, rounded once at conversion; the tokens are rescaled to the
    same grid, so the only run-time rounding is the final one (as :class:`~precsim.integer.ops.AddOp`).
    ``prefix``/``offset`` may be empty (no class token / no added constant).
    """

    kind: ClassVar[str] = "addconst"
    name: str
    inputs: list[str]
    output: str
    in_qp: QParams
    out_qp: QParams
    multiplier: int
    shift: int
    left_shift: int
    prefix: Tensor
    offset: Tensor
    dim: int
    lo: int
    hi: int
    rounding: str = "gemmlowp"
    _mult: FixedPointMultiplier = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._mult = FixedPointMultiplier(self.multiplier, self.shift, self.rounding)

    def _join(self, v: Tensor) -> Tensor:
        if self.offset.numel():
            v = v + self.offset
        if self.prefix.numel():
            shape = list(v.shape)
            shape[self.dim] = self.prefix.shape[self.dim]
            v = torch.cat([self.prefix.expand(shape), v], dim=self.dim)
        return v

    def run(self, x: Tensor, record: Record | None = None) -> Tensor:
        v = self._mult((to_nchw(x).to(torch.int32) - self.in_qp.zero_point) * (1 << self.left_shift))
        v = self._join(v)
        _rec(record, self, "rescaled sum", v)
        return to_nhwc(_requant_fast(v, None, self.left_shift, self.out_qp.zero_point, self.lo, self.hi,
                                     self.out_qp.dtype, self.rounding))

    def reference(self, x: Tensor) -> Tensor:
        xc = (x.to(torch.int64) - self.in_qp.zero_point) * (1 << self.left_shift)
        v = self._join(multiply_by_quantized_multiplier(xc, self.multiplier, self.shift, rounding=self.rounding))
        out = shift_right_rounded(v, self.left_shift, self.rounding) + self.out_qp.zero_point
        return torch.clamp(out, self.lo, self.hi)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.prefix, self.offset))

    def describe_row(self) -> dict[str, str]:
        rows = self.prefix.shape[self.dim] if self.prefix.numel() else 0
        return {"op": f"add const ({rows} prefix rows)", "acc": f"int64 (<<{self.left_shift})",
                "M0": str(self.multiplier), "n": str(-self.shift),
                **requant_row(self.in_qp, self.out_qp, self.lo, self.hi)}


# --------------------------------------------------------------------------------------------
# Layout
# --------------------------------------------------------------------------------------------

LAYOUT_METHODS = ("permute", "transpose", "unflatten", "flatten", "select", "getitem")


def encode_index(index: Any) -> list[list[Any]]:
    """A ``tensor[index]`` key (ints, slices, ``...``, None) as nested lists that a weights-only load accepts."""
    items = index if isinstance(index, tuple) else (index,)
    out: list[list[Any]] = []
    for it in items:
        if isinstance(it, bool) or not isinstance(it, (int, slice, type(Ellipsis), type(None))):
            raise TypeError(f"unsupported index element {it!r}")
        if isinstance(it, int):
            out.append(["i", it])
        elif isinstance(it, slice):
            if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (it.start, it.stop, it.step)):
                raise TypeError(f"unsupported slice {it!r}")
            out.append(["s", it.start, it.stop, it.step])
        else:
            out.append(["e"] if it is Ellipsis else ["n"])
    return out


def decode_index(code: list[list[Any]]) -> tuple[Any, ...]:
    """Inverse of :func:`encode_index`."""
    items: list[Any] = []
    for c in code:
        tag = c[0]
        items.append(c[1] if tag == "i" else slice(*c[1:]) if tag == "s" else Ellipsis if tag == "e" else None)
    return tuple(items)


def _tupled(v: Any) -> Any:
    return tuple(_tupled(x) for x in v) if isinstance(v, (list, tuple)) else v


@register_op
@dataclass
class LayoutOp(Op):
    """A layout-only tensor method on codes: ``permute``, ``transpose``, ``unflatten``, ``flatten``,
    ``select`` (one element of ``unbind``) or ``getitem`` (``args``: an :func:`encode_index` key)."""

    kind: ClassVar[str] = "layout"
    name: str
    inputs: list[str]
    output: str
    method: str
    args: list[Any]

    def __post_init__(self) -> None:
        if self.method not in LAYOUT_METHODS:
            raise ValueError(f"unknown layout method {self.method!r}; known: {', '.join(LAYOUT_METHODS)}")
        self.args = list(self.args)

    def _apply(self, x: Tensor) -> Tensor:
        if self.method == "getitem":
            return x[decode_index(self.args)]
        return getattr(x, self.method)(*_tupled(self.args))

    def run(self, x: Tensor, record: Record | None = None) -> Tensor:
        return to_nhwc(self._apply(to_nchw(x)).contiguous())

    def reference(self, x: Tensor) -> Tensor:
        return self._apply(x)

    def describe_row(self) -> dict[str, str]:
        args = decode_index(self.args) if self.method == "getitem" else tuple(_tupled(self.args))
        return {"op": f"{self.method}{args}"}
