"""The integer operations an encoder such as BERT adds to an :class:`~precsim.integer.model.IntegerModel`.

I-BERT (Kim et al., ICML 2021) is the text analogue of I-ViT; an encoder captured by
``torch.export`` (:mod:`precsim.integer.lower`) needs, beyond the I-ViT ops:

* :class:`EmbeddingOp`: a lookup in an int8 table (word, position, token type);
* :class:`AttentionProbsOp`: attention's scores ``(q - Zq)(k - Zk)^T`` kept as the int32
  accumulator (scale ``Sq Sk c``, no rounding), the attention mask as an integer additive
  constant, Shiftmax, and the requantization of the probabilities to the P operand's grid;
* :class:`IGeluOp`: I-BERT's polynomial GELU (:mod:`precsim.integer.ibert_ops`);
* :class:`FineAddOp`: a residual add whose first input is a GEMM result already rescaled to a
  ``2^L`` finer grid than the output (int32), so the add rounds once, as the simulation does;
* :class:`MeanPoolOp`: integer mean pooling over the tokens the attention mask keeps;
* :class:`ConstOp`: an integer buffer (position ids);
* :class:`AtenOp`: an ATen op that only moves codes or computes on integer data (views,
  transposes, the attention mask built from the input mask, position ids), run as it is.

They follow the integer model's layout convention (4-D tensors channels-last, see
:mod:`precsim.integer.ops`) and compute on the logical tensor.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from precsim.integer.fixedpoint import (
    check_requant_rounding,
    multiply_by_quantized_multiplier,
    shift_right_rounded,
)
from precsim.integer.ibert_ops import IGeluConsts, i_gelu_int
from precsim.integer.ivit_ops import ShiftExpConsts, ShiftmaxConsts, shiftmax_int
from precsim.integer.ops import (
    FixedPointMultiplier,
    Op,
    QParams,
    _rec,
    _requant_fast,
    register_op,
    requant_row,
    to_nchw,
    to_nhwc,
)

__all__ = ["ATEN_OPS", "AtenOp", "AttentionProbsOp", "ConstOp", "EmbeddingOp", "IGeluOp", "FineAddOp", "MeanPoolOp", "decode_arg",
           "encode_arg"]

Record = list[tuple[str, str, Tensor]]

# ATen ops an integer model may run as they are: they move codes or compute on integer data only
ATEN_OPS: tuple[str, ...] = (
    "view", "reshape", "_unsafe_view", "transpose", "permute", "unsqueeze", "squeeze", "expand", "contiguous",
    "clone", "slice", "select", "index", "sym_size", "arange", "new_ones", "ge", "le", "lt", "gt", "eq", "ne",
    "__and__", "__or__", "bitwise_and", "bitwise_or", "bitwise_not", "logical_not", "add", "sub", "to",
    "_to_copy", "alias", "flatten", "unflatten", "cumsum", "mul",
)


def encode_arg(arg: Any, inputs: list[str]) -> Any:
    """An fx argument as plain values a weights-only load accepts: a graph value becomes
    ``["ref", i]`` (the op's i-th input), a dtype ``["dtype", name]``; devices and layouts drop
    (an integer model runs on the CPU)."""
    from torch import fx

    if isinstance(arg, fx.Node):
        if arg.name not in inputs:
            inputs.append(arg.name)
        return ["ref", inputs.index(arg.name)]
    if isinstance(arg, (list, tuple)):
        return ["list", [encode_arg(a, inputs) for a in arg]]
    if isinstance(arg, (torch.dtype, torch.layout, torch.memory_format)):
        return ["torch", str(arg).removeprefix("torch.")]
    if isinstance(arg, torch.device):
        return ["device"]
    if arg is None or isinstance(arg, (bool, int, float, str)):
        return arg
    raise TypeError(f"unsupported argument {arg!r} ({type(arg).__name__})")


def decode_arg(code: Any, values: tuple[Any, ...]) -> Any:
    """Inverse of :func:`encode_arg`, with ``values`` the op's inputs at run time."""
    if isinstance(code, list):
        tag = code[0]
        if tag == "ref":
            return values[code[1]]
        if tag == "list":
            return [decode_arg(c, values) for c in code[1]]
        if tag == "torch":
            return getattr(torch, code[1])
        if tag == "device":
            return torch.device("cpu")
        raise ValueError(f"unknown argument code {code!r}")
    return code


def _logical(x: Any) -> Any:
    return to_nchw(x) if isinstance(x, Tensor) else x


def _stored(x: Any) -> Any:
    return to_nhwc(x) if isinstance(x, Tensor) else x


@register_op
@dataclass
class AtenOp(Op):
    """``torch.ops.aten.<target>`` on codes or integer data, with encoded arguments (:func:`encode_arg`).

    Only :data:`ATEN_OPS` run; a float result is refused at run time (an integer model holds
    integer tensors only). Keyword ``dtype``/``device``/``layout`` arguments that name a float
    type are refused at conversion by the lowering.
    """

    kind: ClassVar[str] = "aten"
    name: str
    inputs: list[str]
    output: str
    target: str  # e.g. "view.default"
    args: list[Any]
    kwargs: dict[str, Any]

    def __post_init__(self) -> None:
        packet, _, overload = self.target.partition(".")
        if packet not in ATEN_OPS:
            raise ValueError(f"{self.name}: aten.{self.target} is not an integer-model op; allowed: {', '.join(ATEN_OPS)}")
        self._fn = getattr(getattr(torch.ops.aten, packet), overload or "default")

    def _apply(self, values: tuple[Any, ...]) -> Any:
        args = [decode_arg(a, values) for a in self.args]
        kwargs = {k: decode_arg(v, values) for k, v in self.kwargs.items()}
        out = self._fn(*args, **kwargs)
        if isinstance(out, Tensor) and (out.dtype.is_floating_point or out.dtype.is_complex):
            raise TypeError(f"{self.name}: aten.{self.target} made a {out.dtype} tensor in an integer model")
        return out

    def run(self, *xs: Any, record: Record | None = None) -> Any:  # type: ignore[override]
        return _stored(self._apply(tuple(_logical(x) for x in xs)))

    def reference(self, *xs: Any) -> Any:  # type: ignore[override]
        return self._apply(xs)

    def describe_row(self) -> dict[str, str]:
        return {"op": f"aten.{self.target.removesuffix('.default')}"}


@register_op
@dataclass
class ConstOp(Op):
    """An integer constant of the model (a buffer such as BERT's position ids)."""

    kind: ClassVar[str] = "const"
    name: str
    inputs: list[str]
    output: str
    value: Tensor

    def run(self, record: Record | None = None) -> Tensor:
        return _stored(self.value)

    def reference(self) -> Tensor:
        return self.value

    def describe_row(self) -> dict[str, str]:
        return {"op": f"constant {tuple(self.value.shape)}", "out": str(self.value.dtype).removeprefix("torch.")}


@register_op
@dataclass
class EmbeddingOp(Op):
    """``table[ids]``: rows of an integer table (codes of ``qp``; any index shape)."""

    kind: ClassVar[str] = "embedding"
    name: str
    inputs: list[str]
    output: str
    table: Tensor
    qp: QParams

    def run(self, ids: Tensor, record: Record | None = None) -> Tensor:
        return _stored(self.table[_logical(ids)])

    def reference(self, ids: Tensor) -> Tensor:
        return self.table[ids].to(torch.int64)

    def describe_row(self) -> dict[str, str]:
        rows, width = self.table.shape
        return {"op": f"embedding ({rows}x{width})", "in": "int64", "weight": str(self.table.dtype).removeprefix("torch."),
                "out": str(self.qp.dtype).removeprefix("torch."), "Z_out": str(self.qp.zero_point),
                "S_w": f"{self.qp.scale:.4g}", "S_out": f"{self.qp.scale:.4g}"}


@register_op
@dataclass
class AttentionProbsOp(Op):
    """``P = requant(Shiftmax((q - Zq)(k - Zk)^T + mask))``: attention's probabilities as codes.

    The scores stay the exact int32 accumulator (scale ``Sq Sk factor``, ``factor`` the
    attention scale ``1/sqrt(d)``); where the boolean ``mask`` (third input, optional; True:
    attend) is False, ``penalty`` is subtracted (an integer additive constant large enough that
    the shift exponential gives 0). Shiftmax writes 16-bit probabilities (scale ``1/(2^16-1)``),
    requantized to the P operand's grid ``p_qp`` by ``multiplier``/``shift``.
    """

    kind: ClassVar[str] = "attention_probs"
    name: str
    inputs: list[str]
    output: str
    q_qp: QParams
    k_qp: QParams
    p_qp: QParams
    factor: float
    consts: dict[str, Any]
    penalty: int
    multiplier: int
    shift: int
    rounding: str = "gemmlowp"
    _k: ShiftmaxConsts = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_requant_rounding(self.rounding)
        c = dict(self.consts)
        self._k = ShiftmaxConsts(ShiftExpConsts(**c.pop("exp")), **c)
        self._mult = FixedPointMultiplier(self.multiplier, self.shift, self.rounding)

    @property
    def scores_scale(self) -> float:
        return self.q_qp.scale * self.k_qp.scale * self.factor

    def _scores(self, q: Tensor, k: Tensor, mask: Tensor | None) -> Tensor:
        acc = torch.matmul(q.to(torch.int32) - self.q_qp.zero_point,
                           (k.to(torch.int32) - self.k_qp.zero_point).transpose(-2, -1)).to(torch.int64)
        if mask is not None:
            acc = acc - (~mask.to(torch.bool)).to(torch.int64) * self.penalty
        return acc

    def run(self, q: Tensor, k: Tensor, mask: Tensor | None = None, record: Record | None = None) -> Tensor:
        scores = self._scores(to_nchw(q), to_nchw(k), None if mask is None else to_nchw(mask))
        _rec(record, self, "scores", scores)
        p16 = shiftmax_int(scores, self._k)
        _rec(record, self, "shiftmax", p16)
        out = _requant_fast(p16, self._mult, 0, self.p_qp.zero_point, self.p_qp.qmin, self.p_qp.qmax,
                            self.p_qp.dtype, self.rounding)
        return to_nhwc(out)

    def reference(self, q: Tensor, k: Tensor, mask: Tensor | None = None) -> Tensor:
        qc = (q.to(torch.int64) - self.q_qp.zero_point).double()
        kc = (k.to(torch.int64) - self.k_qp.zero_point).double()
        scores = torch.round(torch.matmul(qc, kc.transpose(-2, -1))).to(torch.int64)  # exact: |acc| < 2^53
        if mask is not None:
            scores = scores - (~mask.to(torch.bool)).to(torch.int64) * self.penalty
        p16 = shiftmax_int(scores, self._k).to(torch.int64)
        v = multiply_by_quantized_multiplier(p16, self.multiplier, self.shift, rounding=self.rounding)
        return torch.clamp(v + self.p_qp.zero_point, self.p_qp.qmin, self.p_qp.qmax)

    def describe_row(self) -> dict[str, str]:
        e = self._k.exp
        return {"op": f"attention scores + mask, shiftmax (exp b={e.mult}, c={e.shift})",
                "in": f"{self.q_qp.dtype}@{self.k_qp.dtype}".replace("torch.", ""), "acc": "int32",
                "M0": str(self.multiplier), "n": str(-self.shift),
                "Z_in": f"{self.q_qp.zero_point},{self.k_qp.zero_point}",
                "S_in": f"{self.q_qp.scale:.4g},{self.k_qp.scale:.4g}",
                **{k: v for k, v in requant_row(self.q_qp, self.p_qp, self.p_qp.qmin, self.p_qp.qmax).items()
                   if k in ("out", "Z_out", "S_out", "clamp")}}


@register_op
@dataclass
class FineAddOp(Op):
    """``clamp(Z + RDBPOT(a + MBQM(b - Zb, Mb), L))``: ``a`` is int32 on the grid ``S_out 2^-L``
    (a GEMM result rescaled there by its own requantization), ``b`` codes rescaled to that grid;
    one rounding of an almost exact sum, as :class:`~precsim.integer.ops.AddOp`."""

    kind: ClassVar[str] = "fine_add"
    name: str
    inputs: list[str]
    output: str
    b_qp: QParams
    out_qp: QParams
    b_multiplier: int
    b_shift: int
    left_shift: int
    rounding: str = "gemmlowp"

    def __post_init__(self) -> None:
        self._mb = FixedPointMultiplier(self.b_multiplier, self.b_shift, self.rounding)

    def run(self, a: Tensor, b: Tensor, record: Record | None = None) -> Tensor:
        total = self._mb(_logical(b).to(torch.int32) - self.b_qp.zero_point).add_(_logical(a).to(torch.int64))
        _rec(record, self, "rescaled sum", total)
        q = self.out_qp
        return _stored(_requant_fast(total, None, self.left_shift, q.zero_point, q.qmin, q.qmax, q.dtype,
                                     self.rounding))

    def reference(self, a: Tensor, b: Tensor) -> Tensor:
        sb = multiply_by_quantized_multiplier(b.to(torch.int64) - self.b_qp.zero_point, self.b_multiplier,
                                              self.b_shift, rounding=self.rounding)
        out = shift_right_rounded(a.to(torch.int64) + sb, self.left_shift, self.rounding) + self.out_qp.zero_point
        return torch.clamp(out, self.out_qp.qmin, self.out_qp.qmax)

    def describe_row(self) -> dict[str, str]:
        return {"op": "add (GEMM result + codes)", "in": f"int32+{self.b_qp.dtype}".replace("torch.", ""),
                "acc": f"int64 (<<{self.left_shift})", "M0": str(self.b_multiplier), "n": str(-self.b_shift),
                **requant_row(self.b_qp, self.out_qp, self.out_qp.qmin, self.out_qp.qmax)}


@register_op
@dataclass
class MeanPoolOp(Op):
    """Integer mean over the tokens (axis 1) a 0/1 mask keeps:
    ``round_half_up(2^L sum_t (x - Z) m / sum_t m)``, codes on the grid ``S 2^-L`` (int32)."""

    kind: ClassVar[str] = "mean_pool"
    name: str
    inputs: list[str]
    output: str
    in_qp: QParams
    out_qp: QParams
    left_shift: int

    def _apply(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask.to(torch.int64).unsqueeze(-1)
        total = ((x.to(torch.int64) - self.in_qp.zero_point) * m).sum(1) << self.left_shift
        count = m.sum(1).clamp_min(1)
        return torch.div(2 * total + count, 2 * count, rounding_mode="floor")

    def run(self, x: Tensor, mask: Tensor, record: Record | None = None) -> Tensor:
        return _stored(self._apply(_logical(x), _logical(mask)).to(self.out_qp.dtype))

    def reference(self, x: Tensor, mask: Tensor) -> Tensor:
        return self._apply(x, mask)

    def describe_row(self) -> dict[str, str]:
        return {"op": f"mean pool (<<{self.left_shift})", "acc": "int64",
                **requant_row(self.in_qp, self.out_qp, self.out_qp.qmin, self.out_qp.qmax)}


@register_op
@dataclass
class IGeluOp(Op):
    """I-BERT's integer GELU (:func:`~precsim.integer.ibert_ops.i_gelu_int`): symmetric codes in and out."""

    kind: ClassVar[str] = "igelu"
    name: str
    inputs: list[str]
    output: str
    in_qp: QParams
    out_qp: QParams
    consts: dict[str, Any]
    _k: IGeluConsts = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._k = IGeluConsts(**self.consts)

    def run(self, x: Tensor, record: Record | None = None) -> Tensor:
        return i_gelu_int(x, self._k).to(self.out_qp.dtype)  # element-wise: any layout

    def reference(self, x: Tensor) -> Tensor:
        return i_gelu_int(x, self._k).to(torch.int64)

    def describe_row(self) -> dict[str, str]:
        k = self._k
        return {"op": f"i-gelu (erf poly, q_b={k.q_b})", "acc": "int64", "M0": str(k.out_mult), "n": f"{k.out_shift} (b/2^c)",
                **requant_row(self.in_qp, self.out_qp, self.out_qp.qmin, self.out_qp.qmax)}
