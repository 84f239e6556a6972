"""export_onnx(imodel, path, example): the integer model as a standard ONNX graph.

Design choice: integer kernels plus requantization written out in ONNX integer arithmetic, not
QLinearConv/QLinearMatMul. ONNX Runtime's QLinear* kernels requantize in float (``acc * (S1 S2 /
S3)`` rounded half to even); over a deep network their results drift a code or two from
gemmlowp's fixed-point rounding. Here each layer is:

* ``ConvInteger`` / ``MatMulInteger`` (uint8 operands: signed codes are shifted by +128 with their
  zero points, because onnxruntime's u8s8 kernels on x86 without VNNI saturate pairs of products
  to int16; scalar zero points) -> int32 accumulator, ``Add`` the bias in int32 (int64 if the
  worst case ``sum_k |w - Zw| max|x - Zx| + |bias|`` could leave int32),
* ``MultiplyByQuantizedMultiplier`` (:class:`precsim.integer.ops.FixedPointMultiplier`): both
  rounding modes are ``floor((p + C - Z [p < -2^30]) / D)`` with ``p = x M0 2^left`` (gemmlowp:
  ``C = 2^30 + 2^(n-1) 2^31``, ``D = 2^(31 + n)``, ``Z = 2^31`` for a right shift n >= 1; TFLite's
  single rounding: ``C = 2^(t-1)``, ``D = 2^t``, ``Z = 0``). Where a per-channel bound on ``|x|``
  rules out saturation (:meth:`_Graph.mbqm_bounded`) it runs in uint64: ``x`` cast once, times
  ``M0 2^left`` modulo 2^64, plus an offset ``2^E`` that makes every value positive, the bracket
  read as a logical shift by ``E``, the floor as a logical shift by ``log2 D``, the offset and
  the zero point removed in one ``Add``; else in int64 with the bracket as ``Max(Min(p + 2^30,
  0), -1)`` and the floor a uint64 shift (:meth:`_Graph.floor_shift`),
* ``Add`` the output zero point, ``Clip`` to the (ReLU-folded) bounds, ``Cast`` to the code type,
  in int32 where the bound allows.

Residual adds, requantizations and pooling sums use the same pieces. ONNX's integer ``Div``
truncates toward zero and its ``BitShift`` takes unsigned types only: a floor shift by a power of
two is a logical shift of ``t + 2^63`` in uint64 (:meth:`_Graph.floor_shift`), a floor division
by another value a ``Div`` of ``t - (d - 1) [t < 0]`` (:meth:`_Graph.floor_div`), a bare ``Div``
only where both operands are provably non-negative. The requantization and rounding paths use no
``Where``, ``Sign`` of int64 or bool-to-int ``Cast``: onnxruntime runs those several times slower
than an ``Add``. The graph takes
the float image (``QuantizeLinear`` at the boundary) and returns ``output`` (float, through
``DequantizeLinear``) and ``output_codes`` (the integer model's codes), so onnxruntime's result
can be compared with :meth:`IntegerModel.run_integer` code for code.

The vision-transformer ops of :mod:`precsim.integer.vit_ops` are written out the same way, in
integer ONNX arithmetic only (no float op between the boundary ``QuantizeLinear`` and
``DequantizeLinear``):

* ``MatMulOp``: ``MatMulInteger`` when both operands are 8-bit and the op's accumulator plan for
  the exported K is int32, else an int64 ``MatMul`` of the centred codes (exact: the plan's
  bound keeps the sum far inside int64); then the plan's rounding pre-shift and the
  requantization above;
* ``ShiftmaxOp``, ``ShiftGeluOp``, ``ILayerNormOp``: each step of
  :func:`~precsim.integer.ivit_ops.shiftmax_int`, ``shift_gelu_int`` and ``i_layernorm_int`` in
  int64, except that an element-wise function of a clipped integer (ShiftGELU of its input
  clipped to ``x_lo..x_hi``, the shift exponential of ``max(x - rowmax, x_floor)``) is a
  ``Gather`` from a table of the function's own values when that range has at most ``LUT_MAX``
  entries; a shift by a data-dependent amount divides by a power of two gathered from a table.
  The square root is Newton's iteration unrolled a fixed number of times (:meth:`_Graph.isqrt`
  shows why that count suffices);
* ``AddConstOp``: the residual-add pieces plus the constant rows (``Expand``, ``Concat``);
* ``LayoutOp``: ``Transpose``, ``Reshape`` (the sizes it keeps are read with ``Shape`` at run
  time, so the batch stays dynamic), ``Gather``, ``Slice``, ``Unsqueeze``.

A text encoder (integer keyword inputs, :mod:`precsim.integer.text_ops`, e.g. the integer
MiniLM) takes its int64 inputs as they are, with batch and sequence dynamic:

* ``EmbeddingOp``: ``Gather`` from the int8 table; ``ConstOp``: an initializer;
* ``AttentionProbsOp``: ``MatMulInteger`` scores (int32, the mask's penalty made int32-sized, see
  :func:`_attention_probs`), Shiftmax as above, the requantization of its 16-bit codes to the P
  grid as a table of the op's own values;
* ``FineAddOp``, ``MeanPoolOp``: the requantization pieces, a ``ReduceSum`` and a floor division;
* ``AtenOp``: one ONNX form per ATen op (``_ATEN``): sizes from ``Shape``/``Gather``, ``Reshape``
  and ``Expand`` with run-time shapes, ``Range``, ``Slice``, ``Transpose``, ``Unsqueeze``,
  ``Cast``, comparisons, ``And``/``Or``, ``Gather``/``GatherND`` for ``aten.index``; another
  ATen op raises :class:`ExportError` naming it. A ``MatMulOp`` whose inner size may be the
  sequence length is exported with its int32 plan (exact while ``K max|a - Za| max|b - Zb|``
  fits int32, e.g. up to 33025 tokens for uint8 x uint8), Shiftmax rows up to ``MAX_TOKENS``.

Graph tensors have the logical (channels-first) layout; the integer model's channels-last
storage is internal to its kernels. Node names are ``<op kind>:<op name>/<tensor>``, so a
profile can be read per integer op.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from precsim.integer.ibert_ops import i_gelu_int
from precsim.integer.ivit_ops import ShiftExpConsts, shift_exp_int
from precsim.integer.model import IntegerModel
from precsim.integer.ops import (
    AddOp,
    AvgPoolOp,
    CatOp,
    ClampOp,
    ConvOp,
    FlattenOp,
    MaxPoolOp,
    Op,
    QParams,
    RequantOp,
    ReshapeOp,
    _requant_fast,
    to_nchw,
)
from precsim.integer.text_ops import (
    AtenOp,
    AttentionProbsOp,
    ConstOp,
    EmbeddingOp,
    FineAddOp,
    IGeluOp,
    MeanPoolOp,
)
from precsim.integer.vit_ops import (
    AddConstOp,
    ILayerNormOp,
    LayoutOp,
    MatMulOp,
    ShiftGeluOp,
    ShiftmaxOp,
    decode_index,
)

__all__ = ["export_onnx"]

OPSET = 21
IR_VERSION = 10  # onnxruntime 1.18+ reads it
INT64_MAX = 2**63 - 1
INT32_MAX = 2**31 - 1
# Newton steps of _Graph.isqrt: enough for every n in [1, 2^62) (proof in its docstring).
ISQRT_STEPS = 6
_ISQRT_LIMIT = 62  # isqrt's inputs are below 2^62
# An element-wise function of a clipped integer (ShiftGELU, the shift exponential) is exported as
# a table of its values when its input range has at most this many entries.
LUT_MAX = 1 << 18

Shapes = dict[str, tuple[int, ...]]


class ExportError(ValueError):
    """The integer model uses something the ONNX graph cannot express."""


def _import_onnx() -> Any:
    try:
        import onnx  # noqa: PLC0415 - optional dependency, imported on use
    except ImportError as err:
        raise ImportError("precsim.export_onnx needs the optional 'onnx' package: pip install onnx "
                          "(and onnxruntime to run the exported model)") from err
    return onnx


_CODE_TYPES = {torch.uint8: "UINT8", torch.int8: "INT8", torch.int16: "INT16", torch.int32: "INT32"}
_EIGHT_BIT = (torch.uint8, torch.int8)


def _onnx_type(onnx: Any, dtype: torch.dtype) -> int:
    if dtype not in _CODE_TYPES:
        raise ExportError(f"codes of dtype {dtype} have no ONNX type here (8-, 16- or 32-bit integer codes only)")
    return int(getattr(onnx.TensorProto, _CODE_TYPES[dtype]))


def _np_dtype(dtype: torch.dtype) -> Any:
    return {torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32}[dtype]


# every dtype an integer model's values may have (codes, ids, masks, sizes)
_ANY_TYPES = {**_CODE_TYPES, torch.int64: "INT64", torch.bool: "BOOL"}
_NP_ANY = {torch.uint8: np.uint8, torch.int8: np.int8, torch.int16: np.int16, torch.int32: np.int32,
           torch.int64: np.int64, torch.bool: np.bool_}


def _compact(a: Any) -> Any:
    """One value for an array whose values are all equal (a scalar constant broadcasts the cheapest)."""
    arr = np.asarray(a)
    return arr.reshape(-1)[0] if arr.size and (arr == arr.reshape(-1)[0]).all() else arr


def _pyints(a: Any) -> np.ndarray:
    """Integers (arrays or scalars of any integer type) as an object array of exact Python ints."""
    return np.vectorize(int, otypes=[object])(np.asarray(a))


def _wrap_u64(a: Any) -> np.ndarray:
    """Integers modulo 2^64 as uint64 (two's complement for negative values)."""
    return np.vectorize(lambda z: int(z) % 2**64, otypes=[object])(_pyints(a)).astype(np.uint64)


def _onnx_any_type(onnx: Any, dtype: torch.dtype) -> int:
    if dtype not in _ANY_TYPES:
        raise ExportError(f"values of dtype {dtype} have no ONNX type here (integer and bool tensors only)")
    return int(getattr(onnx.TensorProto, _ANY_TYPES[dtype]))


class _Graph:
    """Collects ONNX nodes and constants with generated names, and the int64 pieces the ops share."""

    def __init__(self, onnx: Any, rounding: str = "gemmlowp") -> None:
        self.onnx, self.helper = onnx, onnx.helper
        self.rounding = rounding
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0
        self.dtypes: dict[str, torch.dtype | None] = {}  # of the integer model's values (None: a size)
        self.dynamic = False  # sizes other than the batch are dynamic (a text model's sequence length)
        self.uint8_of: dict[str, str] = {}  # int8 codes -> their uint8 form (shared by the GEMMs reading them)
        self.cache: dict[Any, str] = {}  # other values several ops share (the attention mask's penalty)
        self.bounds: dict[str, int] = {}  # a bound on |value| of some int32 tensors (requantized GEMM results)
        self.scope = "io"  # node names are "<op kind>:<op name>/<output>" (profiles per integer op)

    def fresh(self, hint: str) -> str:
        self.count += 1
        return f"{hint}_{self.count}"

    def const(self, value: Any, dtype: Any, hint: str = "c") -> str:
        name = self.fresh(hint)
        self.inits.append(self.onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def i64(self, value: Any, hint: str = "c") -> str:
        return self.const(value, np.int64, hint)

    def node(self, op: str, inputs: list[str], hint: str | None = None, **attrs: Any) -> str:
        out = self.fresh(hint or op.lower())
        self.nodes.append(self.helper.make_node(op, inputs, [out], name=f"{self.scope}/{out}", **attrs))
        return out

    def name_as(self, x: str, out: str, since: int) -> None:
        """Call tensor ``x`` ``out``: rename the output of the last node if a node added after
        index ``since`` made it (no other node reads it yet), else add an ``Identity``."""
        if len(self.nodes) > since and list(self.nodes[-1].output) == [x]:
            self.nodes[-1].output[0] = out
        else:
            self.nodes.append(self.helper.make_node("Identity", [x], [out]))

    # --- integer pieces ------------------------------------------------------------------------
    # Costs that shape these (onnxruntime 1.32, CPU): an int64 Div is 4x an Add (no SIMD integer
    # division), a Where 4-5x, a bool -> int64 Cast 2x; int32 element-wise ops (Div included) cost
    # half their int64 form. So: floor shifts by powers of two through uint64 BitShift, signs
    # from Min/Max or Abs/Sign, and int32 wherever the values provably fit.
    def int64(self, x: str) -> str:
        return self.node("Cast", [x], to=self.onnx.TensorProto.INT64)

    def int32(self, x: str) -> str:
        return self.node("Cast", [x], to=self.onnx.TensorProto.INT32)

    def cast(self, x: str, dtype: torch.dtype) -> str:
        return self.node("Cast", [x], to=_onnx_type(self.onnx, dtype))

    def cast_any(self, x: str, dtype: torch.dtype) -> str:
        return self.node("Cast", [x], to=_onnx_any_type(self.onnx, dtype))

    def typed(self, value: Any, dtype: torch.dtype, hint: str = "c") -> str:
        """A constant of the torch integer ``dtype`` (one value if all are equal)."""
        return self.const(_compact(value), _NP_ANY[dtype], hint)

    def mul(self, x: str, c: int) -> str:
        return self.node("Mul", [x, self.i64(c)]) if c != 1 else x

    def sign_step(self, x: str, dtype: torch.dtype = torch.int64) -> str:
        """``-[x < 0]`` (-1 or 0) in ``x``'s dtype: Max(Min(x, 0), -1), no bool tensor."""
        return self.node("Max", [self.node("Min", [x, self.typed(0, dtype)]), self.typed(-1, dtype)])

    def floor_shift(self, t: str, bits: Any, add: Any = 0, then: Any = 0) -> str:
        """``floor((t + add) / 2^bits) + then`` for int64 ``t`` (any value with ``t + add`` in the
        int64 range), ``1 <= bits <= 62`` (ints or per-channel arrays).

        ONNX's integer Div truncates (and is slow) and BitShift takes unsigned types only: ``t +
        add + 2^63`` computed in uint64 (Cast and Add wrap modulo 2^64, as C++ defines for
        unsigned types) is the order-preserving image of ``t + add`` in [0, 2^64); its logical
        right shift is ``floor((t + add) / 2^bits) + 2^(63 - bits) < 2^63``, so the Cast back to
        int64 is exact, and ``then - 2^(63 - bits)`` is one Add.
        """
        b = np.asarray(bits, dtype=np.int64)
        if (b < 1).any() or (b > 62).any():
            raise ExportError(f"internal: floor shift by {bits} bits")
        u = self.node("Cast", [t], to=self.onnx.TensorProto.UINT64)
        u = self.node("Add", [u, self.const(_compact(_wrap_u64(_pyints(add) + 2**63)), np.uint64)])
        u = self.node("BitShift", [u, self.const(_compact(b), np.uint64)], direction="RIGHT")
        back = np.asarray(then, dtype=np.int64) - np.left_shift(np.int64(1), 63 - b)
        return self.node("Add", [self.int64(u), self.i64(_compact(back))])

    def shr(self, x: str, bits: int) -> str:
        """Arithmetic right shift (torch.bitwise_right_shift) of signed int64: floor(x / 2^bits)."""
        return self.floor_shift(x, bits) if bits else x

    def dyadic(self, x: str, b: int, c: int) -> str:
        """:func:`~precsim.integer.fixedpoint.apply_dyadic`: ``floor((x b + 2^(c-1)) / 2^c)``."""
        p = self.mul(x, b)
        return self.floor_shift(p, c, add=1 << (c - 1)) if c else p

    def floor_div(self, t: str, d: str | int) -> str:
        """floor(t / d) for int64 ``t`` of either sign and ``d > 0`` (a tensor or an int): ONNX's
        Div truncates, so ``t`` is moved down by ``d - 1`` where it is negative."""
        dm1 = self.i64(d - 1) if isinstance(d, int) else self.node("Sub", [d, self.i64(1)])
        dd = self.i64(d) if isinstance(d, int) else d
        return self.node("Div", [self.node("Add", [t, self.node("Mul", [self.sign_step(t), dm1])]), dd])

    def div_nonneg(self, t: str, d: str) -> str:
        """floor(t / d) where ``t >= 0`` and ``d > 0`` are proven: truncation is the floor there."""
        return self.node("Div", [t, d])

    def pow2(self, e: str, top: int) -> str:
        """``2^e`` for int64 exponents in [0, top], gathered from a table (no signed shift in ONNX)."""
        return self.node("Gather", [self.i64([1 << i for i in range(top + 1)], "pow2"), e])

    def reduce_last(self, op: str, x: str) -> str:
        return self.node(op, [x, self.i64([-1])], keepdims=1)

    def isqrt(self, n: str) -> str:
        """``floor(sqrt(n))`` for int64 ``n`` in [1, 2^62), as :func:`~precsim.integer.ivit_ops.isqrt`.

        Newton from the same start, ``x0 = 2^ceil(b/2)`` with ``b`` the bit length of ``n``
        (counted by comparisons, read from a table), then ``ISQRT_STEPS`` = 6 unrolled steps
        ``x <- min(x, (x + n // x) // 2)`` (all non-negative: ``Div`` is the floor). Why 6
        suffice, with ``r = sqrt(n) < 2^31``: a step never goes below ``floor(r)``
        (``floor((x + n/x) / 2) >= floor(r)`` by AM-GM) and, while ``x > r``, the relative error
        ``e = x / r - 1`` obeys ``e' <= e^2 / (2 (1 + e))``. ``x0 / r <= 2`` gives ``e0 <= 1``,
        then ``e1 <= 1/4``, ``e2 <= 1/40``, ``e3 <= 3.1e-4``, ``e4 <= 4.9e-8``, ``e5 <= 1.2e-15``,
        so ``x5 < r + 2^31 * 1.2e-15 < r + 1``: ``x5`` is ``floor(r)`` or ``floor(r) + 1 > r``,
        and from ``x > r`` the step gives ``floor((x + n/x) / 2) < x``, i.e. ``floor(r)``. The
        ``min`` keeps ``floor(r)`` once reached (plain Newton would oscillate to ``floor(r) + 1``
        for ``n = m^2 - 1``, as the reference's stop-when-not-decreasing test avoids). Measured
        over adversarial inputs in tests/integer/test_onnx.py.
        """
        below = self.i64([(1 << j) - 1 for j in range(_ISQRT_LIMIT)], "pow2m1")  # n > 2^j - 1 <=> b > j
        over = self.node("Greater", [self.node("Unsqueeze", [n, self.i64([-1])]), below])
        bits = self.node("ReduceSum", [self.int64(over), self.i64([-1])], keepdims=0)
        x = self.node("Gather", [self.i64([1 << ((b + 1) // 2) for b in range(_ISQRT_LIMIT + 1)], "x0"), bits])
        two = self.i64(2)
        for _ in range(ISQRT_STEPS):
            y = self.div_nonneg(self.node("Add", [x, self.div_nonneg(n, x)]), two)
            x = self.node("Min", [x, y])
        return x

    # --- requantization ------------------------------------------------------------------------
    def _channels(self, m0: Any, shift: Any, shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
        m = np.asarray(m0, dtype=np.int64).reshape(shape)
        s = np.asarray(shift, dtype=np.int64).reshape(shape)
        if (s < -31).any():
            raise ExportError("a requantization right shift above 31 is not exported")
        return m, s

    def mbqm_bounded(self, x: str, dtype: torch.dtype, m0: Any, shift: Any, shape: tuple[int, ...],
                     bound: Any, then: Any = 0) -> tuple[str, torch.dtype, int] | None:
        """MultiplyByQuantizedMultiplier of ``x`` (torch ``dtype``) with ``|x| <= bound`` (an int or
        per channel, as ``m0``), plus ``then``, computed in uint64; returns (name, dtype, bound on
        the result before ``then``), or None where a saturation could occur (or the bound is too
        wide for this form).

        Both rounding modes are ``R = floor((p + C - Z [p < -2^30]) / D)``, ``p = x M0 2^left``
        (gemmlowp, right shift n: ``C = 2^30 + 2^(n-1) 2^31``, ``D = 2^(31+n)``, ``Z = 2^31`` for
        n >= 1, else ``C = 2^30``, ``Z = 0``; single rounding: ``C = 2^(t-1)``, ``D = 2^t``,
        ``Z = 0``; see :class:`~precsim.integer.ops.FixedPointMultiplier`). With ``O = 2^E`` above
        ``|p| + 2^30 + 2^31`` and a multiple of every ``D``: ``x`` cast to uint64 (sign-extended
        modulo 2^64) times ``M0 2^left`` is ``p`` modulo 2^64; ``v = p + 2^30 + O`` lies in [0,
        2^(E+1)), so ``v >> E`` is ``[p >= -2^30]``; ``p + C + O - Z [p < -2^30]`` is positive and
        its logical shift by ``log2 D`` is ``R + O / D``. No Abs, Sign or Where, and the int32 ->
        int64 -> uint64 casts of the signed forms become one.
        """
        m, s = self._channels(m0, shift, shape)
        mo, so = np.atleast_1d(_pyints(m)), np.atleast_1d(_pyints(s))  # exact Python ints
        bnd = np.atleast_1d(_pyints(bound))
        bnd = bnd.reshape(shape) if bnd.size > 1 else bnd
        if self.rounding == "single":
            t = 31 - so
            if (t < 0).any() or (t > 62).any():
                return None
            mm, c, d, z = mo, np.where(t >= 1, 2 ** np.maximum(t - 1, 0), 0), 2**t, np.zeros_like(mo)
        else:
            left, right = np.maximum(so, 0), np.maximum(-so, 0)
            if (bnd * 2**left > INT32_MAX).any():  # saturation possible
                return None
            mm = mo * 2**left
            c = 2**30 + np.where(right >= 1, 2 ** np.maximum(right - 1, 0) * 2**31, 0)
            d = 2 ** (31 + right)
            z = np.where(right >= 1, 2**31, 0)
        p_max = int((bnd * mm).max())
        e = max((p_max + 2**31 + 2**30).bit_length(), max(int(v).bit_length() - 1 for v in d.reshape(-1)))
        if e > 62:
            return None
        r_bound = int(((bnd * mm + c) // d).max()) + 1
        if self.rounding == "single" and (so > 0).any() and r_bound > INT32_MAX:
            return None  # would saturate
        o = 2**e
        off = o // d
        u = self.node("Mul", [self.node("Cast", [x], to=self.onnx.TensorProto.UINT64),
                              self.const(_compact(_wrap_u64(mm)), np.uint64)])
        if (z != 0).any():
            v = self.node("Add", [u, self.const(o + 2**30, np.uint64)])
            ge = self.node("BitShift", [v, self.const(e, np.uint64)], direction="RIGHT")  # [p >= -2^30]
            t = self.node("Add", [v, self.node("Mul", [ge, self.const(_compact(_wrap_u64(z)), np.uint64)])])
            t = self.node("Add", [t, self.const(_compact(_wrap_u64(c - 2**30 - z)), np.uint64)])
        else:
            t = self.node("Add", [u, self.const(_compact(_wrap_u64(o + c)), np.uint64)])
        bits = np.vectorize(lambda v: int(v).bit_length() - 1, otypes=[np.int64])(d)
        q = self.node("BitShift", [t, self.const(_compact(bits), np.uint64)], direction="RIGHT")  # R + O / D
        then_max = max(abs(int(v)) for v in np.atleast_1d(_pyints(then)).reshape(-1))
        out_t = torch.int32 if r_bound + int(off.max()) + then_max <= INT32_MAX else torch.int64
        y = self.node("Add", [self.cast_any(q, out_t), self.typed(_compact(_pyints(then) - off), out_t)])
        return y, out_t, r_bound

    def mbqm(self, x: str, m0: Any, shift: Any, shape: tuple[int, ...], bound: Any = None,
             dtype: torch.dtype = torch.int64) -> str:
        """MultiplyByQuantizedMultiplier of ``x`` (int32-range values of torch ``dtype``), per
        channel via ``shape``; int64 result. With a ``bound`` on ``|x|``, :meth:`mbqm_bounded`."""
        if bound is not None:
            fast = self.mbqm_bounded(x, dtype, m0, shift, shape, bound)
            if fast is not None:
                return fast[0] if fast[1] == torch.int64 else self.int64(fast[0])
        x = x if dtype == torch.int64 else self.int64(x)
        m, s = self._channels(m0, shift, shape)
        if self.rounding == "single":  # one rounding: (x M0 + 2^(t-1)) >> t, t = 31 - shift
            t = 31 - s
            far = t > 62  # |x M0| < 2^62 <= 2^(t-1): 0, as FixedPointMultiplier
            m = np.where(far, 0, m) * np.where(t == 0, 2, 1)  # t = 0: (2 x M0) >> 1
            bits = np.clip(t, 1, 62)
            half = np.where((t > 0) & ~far, np.left_shift(np.int64(1), np.clip(t - 1, 0, 61)), 0)
            y = self.floor_shift(self.node("Mul", [x, self.i64(_compact(m))]), bits, add=half)
            if (s > 0).any():  # saturate as fixedpoint.multiply_by_quantized_multiplier_single does
                y = self.node("Clip", [y, self.i64(-(2**31)), self.i64(2**31 - 1)])
            return y
        left, right = np.maximum(s, 0), np.maximum(-s, 0)
        if (left > 0).any():
            x = self.node("Mul", [x, self.i64(_compact(np.left_shift(np.int64(1), left)))])
            if bound is None or (np.atleast_1d(_pyints(bound)) * 2 ** _pyints(left) > INT32_MAX).any():
                x = self.node("Clip", [x, self.i64(-(2**31)), self.i64(2**31 - 1)])
        p = self.node("Mul", [x, self.i64(_compact(m))])
        if (right > 0).any():  # - 2^31 where p < -2^30 (RoundingDivideByPOT of a negative SRDHM result)
            low = self.sign_step(self.node("Add", [p, self.i64(1 << 30)]))
            p = self.node("Add", [p, self.node("Mul", [low, self.i64(_compact(np.where(right > 0, 1 << 31, 0)))])])
        half = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
        return self.floor_shift(p, right + 31, add=(1 << 30) + half * (1 << 31))

    def rdbpot(self, x: str, exponent: int, dtype: torch.dtype = torch.int64,
               bound: int | None = None) -> tuple[str, torch.dtype, int | None]:
        """x / 2^e rounded as fixedpoint.shift_right_rounded: ties away from zero (gemmlowp's
        RoundingDivideByPOT), ``sign(x) floor((|x| + 2^(e-1)) / 2^e)``, or toward +inf with single
        rounding. Returns (name, dtype, bound); int32 ``x`` stays int32 when ``bound`` allows."""
        if exponent == 0:
            return x, dtype, bound
        half = 1 << (exponent - 1)
        out_bound = None if bound is None else (bound + half) >> exponent
        if self.rounding == "single":
            x64 = x if dtype == torch.int64 else self.int64(x)
            return self.floor_shift(x64, exponent, add=half), torch.int64, out_bound
        if dtype == torch.int32 and bound is not None and bound + half <= INT32_MAX:  # int32 Div is fast
            a = self.node("Add", [self.node("Abs", [x]), self.typed(half, torch.int32)])
            q = self.node("Div", [a, self.typed(1 << exponent, torch.int32)])
            return self.node("Mul", [q, self.node("Sign", [x])]), torch.int32, out_bound
        x64 = x if dtype == torch.int64 else self.int64(x)  # floor((x + 2^(e-1) - [x < 0]) / 2^e)
        return self.floor_shift(self.node("Add", [x64, self.sign_step(x64)]), exponent, add=half), torch.int64, \
            out_bound

    def clip_cast(self, x: str, lo: int, hi: int, dtype: torch.dtype) -> str:
        return self.cast(self.node("Clip", [x, self.i64(lo), self.i64(hi)]), dtype)

    def finish(self, x: str, qp: QParams, lo: int, hi: int, dtype: torch.dtype = torch.int64,
               bound: int | None = None) -> str:
        """+ Z_out, clamp, cast to the code dtype; in int32 (and without a clamp that cannot
        bite) where ``bound`` on ``|x|`` allows."""
        zp = qp.zero_point
        if dtype == torch.int32 and bound is not None and bound + abs(zp) <= INT32_MAX:
            y = self.node("Add", [x, self.typed(zp, torch.int32)]) if zp else x
            if lo > zp - bound or hi < zp + bound:
                y = self.node("Clip", [y, self.typed(lo, torch.int32), self.typed(hi, torch.int32)])
            y = y if qp.dtype == torch.int32 else self.cast(y, qp.dtype)
            self.bounds[y] = min(max(abs(lo), abs(hi)), bound + abs(zp))
            return y
        x64 = x if dtype == torch.int64 else self.int64(x)
        y = self.clip_cast(self.node("Add", [x64, self.i64(zp)]) if zp else x64, lo, hi, qp.dtype)
        self.bounds[y] = max(abs(lo), abs(hi))
        return y

    def requant(self, x: str, dtype: torch.dtype, m0: Any, shift: Any, shape: tuple[int, ...], bound: Any,
                qp: QParams, lo: int, hi: int) -> str:
        """MultiplyByQuantizedMultiplier, + Z_out, clamp, cast (int32 where ``bound`` allows)."""
        if bound is not None:
            fast = self.mbqm_bounded(x, dtype, m0, shift, shape, bound, then=qp.zero_point)
            if fast is not None:  # the result already holds + Z_out
                y, y_dtype, r_bound = fast
                zp = qp.zero_point
                if lo > zp - r_bound or hi < zp + r_bound:
                    y = self.node("Clip", [y, self.typed(lo, y_dtype), self.typed(hi, y_dtype)])
                y = y if qp.dtype == y_dtype else self.cast(y, qp.dtype)
                self.bounds[y] = min(max(abs(lo), abs(hi)), r_bound + abs(zp))
                return y
        return self.finish(self.mbqm(x, m0, shift, shape, bound, dtype), qp, lo, hi)

    def as_uint8(self, x: str, qp: QParams) -> tuple[str, int]:
        """8-bit codes as uint8 (int8 codes shifted by +128) and the matching zero point (once per tensor)."""
        if qp.dtype == torch.uint8:
            return x, qp.zero_point
        if x not in self.uint8_of:
            shifted = self.node("Add", [self.node("Cast", [x], to=self.onnx.TensorProto.INT16),
                                        self.const(128, np.int16)])
            self.uint8_of[x] = self.node("Cast", [shifted], to=self.onnx.TensorProto.UINT8)
        return self.uint8_of[x], qp.zero_point + 128

    def centred(self, x: str, zp: int, dtype: torch.dtype = torch.int64) -> str:
        """Codes minus their zero point, as int64 (or int32 for codes of up to 16 bits)."""
        y = self.int64(x) if dtype == torch.int64 else self.int32(x)
        return self.node("Sub", [y, self.typed(zp, dtype)]) if zp else y

    # --- shapes --------------------------------------------------------------------------------
    def shape_with(self, x: str, rank: int, start: int, end: int, middle: list[int]) -> str:
        """``x``'s shape (read at run time) with dims ``start..end`` (inclusive) replaced by ``middle``."""
        parts = []
        if start > 0:
            parts.append(self.node("Shape", [x], start=0, end=start))
        parts.append(self.i64(middle))
        if end < rank - 1:
            parts.append(self.node("Shape", [x], start=end + 1))
        return self.node("Concat", parts, axis=0) if len(parts) > 1 else parts[0]

    def flatten(self, x: str, rank: int, start: int, end: int) -> str:
        start, end = start % rank, end % rank
        return self.node("Reshape", [x, self.shape_with(x, rank, start, end, [-1])])


def _trace(imodel: IntegerModel, example: Tensor | dict[str, Tensor]) -> tuple[Shapes, dict[str, torch.dtype | None]]:
    """Logical (NCHW) shape and dtype of every value for the first sample of the example batch (the
    graph keeps the batch dynamic; ranks and the other sizes are what the emitters read), and
    resolved pooling multipliers; a Python int (a size read by ``aten.sym_size``) has shape ``()``
    and dtype None."""
    if imodel.inputs is None:
        if not isinstance(example, Tensor):
            raise ExportError("this integer model takes one float tensor: pass an example batch as ``example``")
        env = imodel._bind(imodel.quantize_input(example[:1]), {}, stored=True)
    else:
        if not isinstance(example, dict):
            raise ExportError(f"this integer model takes keyword inputs ({', '.join(imodel.inputs)}): pass a dict "
                              "of example tensors as ``example``")
        env = imodel._bind(None, {k: v[:1] for k, v in example.items()}, stored=True)
    shapes: Shapes = {}
    dtypes: dict[str, torch.dtype | None] = {}

    def note(name: str, v: Any) -> None:
        if isinstance(v, Tensor):
            shapes[name] = tuple(to_nchw(v).shape) if v.dim() == 4 else tuple(v.shape)
            dtypes[name] = v.dtype
        else:
            shapes[name], dtypes[name] = (), None

    for name, v in env.items():
        note(name, v)
    for i, op in enumerate(imodel.ops):
        out = op.run(*(env[n] for n in op.inputs))
        for n in op.inputs:
            if imodel._last_use.get(n) == i:
                env.pop(n, None)
        env[op.output] = out
        note(op.output, out)
    return shapes, dtypes


# --------------------------------------------------------------------------------------------
# One emitter per op kind: (graph, op, input tensor names, shapes) -> the output tensor's name
# --------------------------------------------------------------------------------------------


def _conv(g: _Graph, op: ConvOp, ins: list[str], shapes: Shapes) -> str:
    """ConvInteger/MatMulInteger on uint8 operands, + bias, requantized per output channel."""
    if op.acc_dtype != "int32":
        raise ExportError(f"{op.name}: the accumulator needs int64; "
                          "ONNX ConvInteger/MatMulInteger accumulate in int32")
    if op.in_qp.dtype not in _EIGHT_BIT:
        raise ExportError(f"{op.name}: {op.in_qp.dtype} input codes; ONNX ConvInteger/MatMulInteger take 8-bit codes")
    zw = op.w_zero_point.unique()
    if zw.numel() != 1:
        raise ExportError(f"{op.name}: per-channel weight zero points are not supported by ONNX Runtime's "
                          "integer kernels; use symmetric per-channel weights")
    # Both operands as uint8 (signed codes + 128, zero point + 128): onnxruntime's u8s8 x86
    # kernels (without VNNI) saturate pairs of products to int16, u8u8 ones do not.
    x, x_zp_val = g.as_uint8(ins[0], op.in_qp)
    w_np = op.weight.to(torch.int32).numpy() + (128 if op.weight.dtype == torch.int8 else 0)
    w_zp_val = int(zw[0]) + (128 if op.weight.dtype == torch.int8 else 0)
    x_zp = g.const(x_zp_val, np.uint8, "x_zp")
    w_zp = g.const(w_zp_val, np.uint8, "w_zp")
    cout = op.weight.shape[0]
    if op.op_type == "conv2d":
        w = g.const(w_np, np.uint8, f"{op.name}.weight")
        ph, pw = op.padding
        acc = g.node("ConvInteger", [x, w, x_zp, w_zp], "acc", pads=[ph, pw, ph, pw],
                     strides=list(op.stride), dilations=list(op.dilation), group=op.groups,
                     kernel_shape=list(op.weight.shape[2:]))
        shape: tuple[int, ...] = (1, cout, 1, 1)
    else:
        w = g.const(np.ascontiguousarray(w_np.T), np.uint8, f"{op.name}.weight")
        acc = g.node("MatMulInteger", [x, w, x_zp, w_zp], "acc")
        shape = (1, cout)
    # |acc + bias| <= sum_k |w - Zw| max|x - Zx| + |bias| per channel: int32 when that fits
    w_abs = (op.weight.to(torch.int64) - int(zw[0])).abs().reshape(cout, -1).sum(1)
    bounds = (w_abs * op.in_qp.max_abs_centred + op.bias.to(torch.int64).abs()).numpy()  # per channel
    bias = op.bias.numpy().astype(np.int64).reshape(shape)
    if bounds.max() <= INT32_MAX:
        acc = g.node("Add", [acc, g.const(bias, np.int32, f"{op.name}.bias")])
        return g.requant(acc, torch.int32, op.multiplier.numpy(), op.shift.numpy(), shape, bounds.reshape(shape),
                         op.out_qp, op.lo, op.hi)
    acc = g.node("Add", [g.int64(acc), g.i64(bias, f"{op.name}.bias")])
    return g.finish(g.mbqm(acc, op.multiplier.numpy(), op.shift.numpy(), shape), op.out_qp, op.lo, op.hi)


def _add(g: _Graph, op: AddOp, ins: list[str], shapes: Shapes) -> str:
    """Both inputs rescaled with ``left_shift`` extra bits, summed, one final rounding shift."""
    one = 1 << op.left_shift
    a = g.mbqm(g.mul(g.centred(ins[0], op.a_qp.zero_point), one), op.a_multiplier, op.a_shift, (),
               op.a_qp.max_abs_centred * one)
    b = g.mbqm(g.mul(g.centred(ins[1], op.b_qp.zero_point), one), op.b_multiplier, op.b_shift, (),
               op.b_qp.max_abs_centred * one)
    return g.finish(g.rdbpot(g.node("Add", [a, b]), op.left_shift)[0], op.out_qp, op.lo, op.hi)


def _requant(g: _Graph, op: RequantOp, ins: list[str], shapes: Shapes) -> str:
    return g.requant(g.centred(ins[0], op.in_qp.zero_point), torch.int64, op.multiplier, op.shift, (),
                     op.in_qp.max_abs_centred, op.out_qp, op.lo, op.hi)


def _clamp(g: _Graph, op: ClampOp, ins: list[str], shapes: Shapes) -> str:
    return g.finish(g.centred(ins[0], op.qp.zero_point), op.qp, op.lo, op.hi)


def _avgpool(g: _Graph, op: AvgPoolOp, ins: list[str], shapes: Shapes) -> str:
    """Window sums (ReduceSum, or a depthwise ConvInteger with a kernel of ones), one requantization."""
    n, c, h, w = shapes[op.inputs[0]]
    if op.kernel is None:
        total = g.node("ReduceSum", [g.centred(ins[0], op.in_qp.zero_point), g.i64([2, 3])], keepdims=1)
        count = h * w
    else:
        kh, kw = op.kernel
        ones = g.const(np.ones((c, 1, kh, kw)), np.uint8, "ones")
        x, x_zp_val = g.as_uint8(ins[0], op.in_qp)
        x_zp = g.const(x_zp_val, np.uint8, "x_zp")
        total = g.int64(g.node("ConvInteger", [x, ones, x_zp, g.const(0, np.uint8, "w_zp")], group=c,
                               kernel_shape=[kh, kw], strides=list(op.stride or op.kernel)))
        count = kh * kw
    m0, shift = op.multiplier_for(count)
    return g.finish(g.mbqm(total, m0, shift, (), count * op.in_qp.max_abs_centred), op.out_qp, op.lo, op.hi)


def _maxpool(g: _Graph, op: MaxPoolOp, ins: list[str], shapes: Shapes) -> str:
    ph, pw = op.padding
    return g.node("MaxPool", ins, kernel_shape=list(op.kernel), strides=list(op.stride), pads=[ph, pw, ph, pw])


def _flatten(g: _Graph, op: FlattenOp, ins: list[str], shapes: Shapes) -> str:
    return g.flatten(ins[0], len(shapes[op.inputs[0]]), op.start_dim, op.end_dim)


def _reshape(g: _Graph, op: ReshapeOp, ins: list[str], shapes: Shapes) -> str:
    return g.node("Reshape", [ins[0], g.i64(list(op.shape))])


def _cat(g: _Graph, op: CatOp, ins: list[str], shapes: Shapes) -> str:
    return g.node("Concat", ins, axis=op.dim)


def _matmul(g: _Graph, op: MatMulOp, ins: list[str], shapes: Shapes) -> str:
    """Activation x activation: the op's accumulator plan for this K, then its requantization.

    An int32 plan with 8-bit operands runs on ``MatMulInteger`` (uint8, as for Linear); any
    other is an int64 ``MatMul`` of the centred codes, which holds the exact sum the int32 or
    int64 accumulator of the integer model holds. A plan's ``pre_shift`` rounds it first.
    """
    acc_t, pre, _ = op.plan(shapes[op.inputs[0]][-1])
    if g.dynamic and acc_t != torch.int32:
        raise ExportError(f"{op.name}: the accumulator plan for K = {shapes[op.inputs[0]][-1]} is int64 with a "
                          "rounding pre-shift that depends on K, which may be the (dynamic) sequence length")
    # |acc| <= K max|a - Za| max|b - Zb|; K may be the sequence length (dynamic): then only the plan's int32 bound
    k = shapes[op.inputs[0]][-1]
    bound = INT32_MAX if g.dynamic else k * op.a_qp.max_abs_centred * op.b_qp.max_abs_centred
    if acc_t == torch.int32 and op.a_qp.dtype in _EIGHT_BIT and op.b_qp.dtype in _EIGHT_BIT:
        a, za = g.as_uint8(ins[0], op.a_qp)
        b, zb = g.as_uint8(ins[1], op.b_qp)
        acc = g.node("MatMulInteger", [a, b, g.const(za, np.uint8, "a_zp"), g.const(zb, np.uint8, "b_zp")], "acc")
        return g.requant(acc, torch.int32, op.multiplier, op.shift, (), bound, op.out_qp, op.lo, op.hi)
    acc = g.node("MatMul", [g.centred(ins[0], op.a_qp.zero_point), g.centred(ins[1], op.b_qp.zero_point)], "acc")
    acc, _, bound = g.rdbpot(acc, pre, torch.int64, bound)
    return g.requant(acc, torch.int64, op.multiplier, op.shift + pre, (), bound, op.out_qp, op.lo, op.hi)


def _shift_exp(g: _Graph, x: str, k: ShiftExpConsts) -> str:
    """:func:`~precsim.integer.ivit_ops.shift_exp_int` of int64 codes ``x <= 0``: ``~2^K e^(x scale)``.

    ``p <= 0`` (a dyadic multiple of ``t <= 0``, rounded half up), so ``q = -floor(p / 2^F)``
    is in [0, ...] and clamped to K + 1; the mantissa is positive, so its shift right by ``q``
    is a plain ``Div`` by ``2^q``.
    """
    big = g.mul(g.node("Max", [x, g.i64(k.x_floor)]), 1 << k.guard_bits)
    t = g.node("Sub", [g.node("Add", [big, g.shr(big, 1)]), g.shr(big, 4)])
    p = g.dyadic(t, k.mult, k.shift)
    whole = g.shr(p, k.frac_bits)  # floor(p / 2^F) = -q
    frac = g.node("Sub", [p, g.mul(whole, 1 << k.frac_bits)])  # p & (2^F - 1)
    mant = g.mul(g.node("Add", [frac, g.i64(1 << k.frac_bits)]), 1 << (k.exp_bits - k.frac_bits))
    q = g.node("Clip", [g.node("Neg", [whole]), g.i64(0), g.i64(k.exp_bits + 1)])
    return g.div_nonneg(mant, g.pow2(q, k.exp_bits + 1))


def _shiftmax_codes(g: _Graph, x: str, k: Any, n: int, where: str, dtype: torch.dtype = torch.int64) -> str:
    """:func:`~precsim.integer.ivit_ops.shiftmax_int` of ``x`` (int32 or int64) over the last dim
    (rows of at most ``n``), int64 codes.

    The shift exponential of ``max(x - rowmax, x_floor)`` is read from a table of its
    ``-x_floor + 1`` values (computed by :func:`~precsim.integer.ivit_ops.shift_exp_int` itself)
    when that is at most ``LUT_MAX`` entries, else written out (:func:`_shift_exp`). The row sum
    ``s >= 2^K > 0`` is the last inclusive cumulative sum, so the normalising divisions have
    non-negative operands; the exclusive sum's rounded value is the inclusive one's previous
    element (0 first), so one division serves both.
    """
    m, x_floor = k.out_max, k.exp.x_floor
    if n * (1 << k.exp.exp_bits) * (2 * m + 1) >= 1 << 63:
        raise ExportError(f"{where}: rows of {n} are too long for the int64 normalisation at {k.output_bits} bits")
    rowmax = g.reduce_last("ReduceMax", x)
    if -x_floor + 1 <= LUT_MAX:  # table[max(x - rowmax, x_floor) - x_floor], x - rowmax <= 0
        idx = g.node("Max", [g.node("Sub", [x, g.node("Add", [rowmax, g.typed(x_floor, dtype)])]), g.typed(0, dtype)])
        table = shift_exp_int(torch.arange(x_floor, 1, dtype=torch.int64), k.exp)
        e = g.node("Gather", [g.i64(table.numpy(), "exp_table"), idx], axis=0)
    else:
        x64 = x if dtype == torch.int64 else g.int64(x)
        e = _shift_exp(g, g.node("Sub", [x64, rowmax if dtype == torch.int64 else g.int64(rowmax)]), k.exp)
    last = g.i64([-1])
    if not k.sum_preserving:
        s = g.reduce_last("ReduceSum", e)
        return g.div_nonneg(g.node("Add", [g.mul(e, 2 * m), s]), g.mul(s, 2))
    c = g.node("CumSum", [e, last])
    s = g.node("Slice", [c, last, g.i64([INT64_MAX]), last])
    r = g.div_nonneg(g.node("Add", [g.mul(c, 2 * m), s]), g.mul(s, 2))  # floor((2 c M + s) / (2 s))
    prev = g.node("Pad", [g.node("Slice", [r, g.i64([0]), last, last]), g.i64([1, 0]), g.i64(0), last])
    return g.node("Sub", [r, prev])  # torch.diff with a 0 prepended


def _shiftmax(g: _Graph, op: ShiftmaxOp, ins: list[str], shapes: Shapes) -> str:
    """:func:`~precsim.integer.ivit_ops.shiftmax_int` over the last dim, as the op's codes."""
    codes = _shiftmax_codes(g, g.int64(ins[0]), op._k, shapes[op.inputs[0]][-1], op.name)
    return g.cast(codes, op.out_qp.dtype)


def _lut(g: _Graph, x: str, dtype: torch.dtype, lo: int, hi: int, fn: Callable[[Tensor], Tensor], hint: str) -> str:
    """``fn`` of integer ``x`` (torch ``dtype``) whose result depends on ``clamp(x, lo, hi)`` only:
    ``Gather`` from the table ``fn(lo..hi)`` at ``clamp(x, lo, hi) - lo``."""
    info = torch.iinfo(dtype)
    lo, hi = max(lo, info.min), min(hi, info.max)
    table = fn(torch.arange(lo, hi + 1, dtype=dtype))
    work = dtype if dtype in (torch.int32, torch.int64) else torch.int32
    xw = x if work == dtype else g.cast(x, work)
    if (lo, hi) != (info.min, info.max):
        xw = g.node("Clip", [xw, g.typed(lo, work), g.typed(hi, work)])
    idx = g.node("Sub", [xw, g.typed(lo, work)]) if lo else xw
    return g.node("Gather", [g.const(table.numpy(), table.numpy().dtype, hint), idx], axis=0)


def _shift_gelu(g: _Graph, op: ShiftGeluOp, ins: list[str], shapes: Shapes) -> str:
    """:func:`~precsim.integer.ivit_ops.shift_gelu_int`, then the op's clamp to its output codes:
    a table of the op's outputs over its clipped input range ``x_lo..x_hi`` when that has at
    most ``LUT_MAX`` entries, else written out."""
    k = op._k
    dtype = g.dtypes.get(op.inputs[0]) or torch.int64
    if min(k.x_hi, torch.iinfo(dtype).max) - max(k.x_lo, torch.iinfo(dtype).min) + 1 <= LUT_MAX:
        return _lut(g, ins[0], dtype, k.x_lo, k.x_hi, op.run, f"{op.name}.table")
    x = g.node("Clip", [g.int64(ins[0]), g.i64(k.x_lo), g.i64(k.x_hi)])
    big = g.mul(x, 1 << k.guard_bits)
    y = g.node("Add", [g.node("Add", [g.node("Add", [big, g.shr(big, 1)]), g.shr(big, 3)]), g.shr(big, 4)])
    e = _shift_exp(g, g.node("Neg", [g.node("Abs", [y])]), k.exp)
    one = g.i64(1 << k.exp.exp_bits)
    num = g.node("Where", [g.node("Less", [y, g.i64(0)]), e, one])
    den = g.node("Add", [one, e])
    sig = g.div_nonneg(g.node("Add", [g.mul(num, 1 << (k.sigmoid_bits + 1)), den]), g.mul(den, 2))
    v = g.node("Clip", [g.dyadic(g.node("Mul", [x, sig]), k.out_mult, k.out_shift), g.i64(k.qmin), g.i64(k.qmax)])
    return g.clip_cast(v, op.out_qp.qmin, op.out_qp.qmax, op.out_qp.dtype)


def _i_gelu(g: _Graph, op: IGeluOp, ins: list[str], shapes: Shapes) -> str:
    """:func:`~precsim.integer.ibert_ops.i_gelu_int`: the input rounded to the op's grid (``in_shift``),
    then a table of the outputs over ``q_b..x_hi`` when that has at most ``LUT_MAX`` entries, else
    the erf polynomial written out."""
    k = op._k
    r = k.in_shift
    lo, hi = (k.q_b << r) - (1 << r >> 1), (k.x_hi << r) + (1 << r >> 1)  # inputs beyond give the ends' outputs
    dtype = g.dtypes.get(op.inputs[0]) or torch.int64
    if hi - lo + 1 <= LUT_MAX:  # one table on the input codes as they come (often int32)
        return _lut(g, ins[0], dtype, lo, hi, op.run, f"{op.name}.table")
    x = g.int64(ins[0])
    if r:
        x = g.floor_shift(x, r, add=1 << (r - 1))
    if k.x_hi - k.q_b + 1 <= LUT_MAX:
        on_grid = dataclasses.replace(k, in_shift=0)
        return _lut(g, x, torch.int64, k.q_b, k.x_hi, lambda t: i_gelu_int(t, on_grid).to(op.out_qp.dtype),
                    f"{op.name}.table")
    q = g.node("Clip", [x, g.i64(k.q_b), g.i64(k.x_hi)])
    t = g.node("Add", [g.node("Min", [g.node("Abs", [q]), g.i64(-k.q_b)]), g.i64(k.q_b)])
    erf = g.node("Mul", [g.node("Sign", [q]), g.node("Add", [g.node("Mul", [t, t]), g.i64(k.q_c)])])
    v = g.dyadic(g.node("Mul", [g.node("Neg", [q]), g.node("Add", [erf, g.i64(k.q_1)])]), k.out_mult, k.out_shift)
    return g.clip_cast(v, op.out_qp.qmin, op.out_qp.qmax, op.out_qp.dtype)


def _i_layernorm(g: _Graph, op: ILayerNormOp, ins: list[str], shapes: Shapes) -> str:
    """:func:`~precsim.integer.ivit_ops.i_layernorm_int` over the last dim, then the op's clamp.

    The integer model refuses inputs outside the signed ``in_bits`` range at run time, which a
    graph cannot; export therefore needs the input codes' whole range inside it.

    Faster forms, each exact: the sums and ``y = x 2^P - mean`` in int32 where ``in_bits + P <=
    30``; ``z = floor((y 2^(k+1) + std) / (2 std))`` as ``Div(y 2^(k+1) + std + Z 2 std, 2 std) -
    Z`` with ``Z = (isqrt(n) + 2) 2^(k+1)`` (the model's own bound on ``|z|``: ``|y_i|^2 <= sum
    y^2 <= n (var + 1/2)`` and ``std = isqrt(var) >= 1`` give ``|y| / std < 1.88 sqrt(n)``), so
    the dividend is non-negative and ``Div`` floors; ``- Z`` and the affine bias fold into the
    dyadic multiply's constant: ``(z w + b) mult = (z + Z) (w mult) + (b - Z w) mult``.
    """
    k = op._k
    lim = 1 << (k.in_bits - 1)
    if shapes[op.inputs[0]][-1] != k.n:
        raise ExportError(f"{op.name}: last dim {shapes[op.inputs[0]][-1]} != n = {k.n}")
    if op.in_qp.qmin < -lim or op.in_qp.qmax >= lim:
        raise ExportError(f"{op.name}: input codes {op.in_qp.qmin}..{op.in_qp.qmax} exceed I-LayerNorm's "
                          f"{k.in_bits}-bit range")
    n, p, kb = k.n, k.frac_bits, k.norm_bits
    narrow = k.in_bits + p <= 30 and n << (k.in_bits - 1) <= INT32_MAX
    dt = torch.int32 if narrow else torch.int64
    x = g.int32(ins[0]) if narrow else g.int64(ins[0])
    total = g.int64(g.reduce_last("ReduceSum", x)) if narrow else g.reduce_last("ReduceSum", x)
    mean = g.floor_div(g.node("Add", [g.mul(total, 1 << (p + 1)), g.i64(n)]), 2 * n)
    y = g.node("Sub", [g.node("Mul", [x, g.typed(1 << p, dt)]), g.int32(mean) if narrow else mean])
    y = g.int64(y) if narrow else y
    ssq = g.reduce_last("ReduceSum", g.node("Mul", [y, y]))
    var = g.node("Add", [g.div_nonneg(g.node("Add", [g.mul(ssq, 2), g.i64(n)]), g.i64(2 * n)), g.i64(k.eps_int)])
    # max(isqrt(var), 1) == isqrt(max(var, 1)): isqrt is monotone and isqrt(0) = 0, isqrt(1) = 1
    std = g.isqrt(g.node("Max", [var, g.i64(1)]))
    w, bias = _pyints(k.weight_int.numpy()), _pyints(k.bias_int.numpy())
    z_bound = (math.isqrt(n) + 2) << (kb + 1)
    y_max = 1 << (k.in_bits + p)
    std_max = math.isqrt((n * y_max * y_max * 2 + n) // (2 * n) + k.eps_int) + 1
    acc_max = 2 * z_bound * int(np.abs(w).max()) + int(np.abs(bias).max()) + z_bound * int(np.abs(w).max())
    lo, hi = max(k.qmin, op.out_qp.qmin), min(k.qmax, op.out_qp.qmax)
    if (y_max << (kb + 1)) + std_max * (1 + 2 * z_bound) < 2**63 and acc_max * k.out_mult + (1 << 62) < 2**63:
        two_std = g.mul(std, 2)
        shifted = g.node("Add", [std, g.node("Mul", [two_std, g.i64(z_bound)])])  # std + Z 2 std, per row
        z = g.div_nonneg(g.node("Add", [g.mul(y, 1 << (kb + 1)), shifted]), two_std)  # z + Z >= 0
        acc = g.node("Mul", [z, g.i64(_compact(w * k.out_mult), "ln_weight")])
        const = (bias - z_bound * w) * k.out_mult
        if k.out_shift:
            v = g.floor_shift(acc, k.out_shift, add=_compact(const + (1 << (k.out_shift - 1))))
        else:
            v = g.node("Add", [acc, g.i64(_compact(const), "ln_bias")])
        return g.clip_cast(v, lo, hi, op.out_qp.dtype)
    z = g.floor_div(g.node("Add", [g.mul(y, 1 << (kb + 1)), std]), g.mul(std, 2))
    acc = g.node("Add", [g.node("Mul", [z, g.i64(k.weight_int.numpy(), "ln_weight")]),
                         g.i64(k.bias_int.numpy(), "ln_bias")])
    # clamp(clamp(v, qmin, qmax), out.qmin, out.qmax): one clamp to the intersection (non-empty: 0 is in both)
    return g.clip_cast(g.dyadic(acc, k.out_mult, k.out_shift), lo, hi, op.out_qp.dtype)


def _add_const(g: _Graph, op: AddConstOp, ins: list[str], shapes: Shapes) -> str:
    """Tokens rescaled to ``S_out 2^-L`` plus ``offset``, ``prefix`` rows prepended, one rounding shift."""
    rank = len(shapes[op.inputs[0]])
    x = g.mul(g.centred(ins[0], op.in_qp.zero_point), 1 << op.left_shift)
    v = g.mbqm(x, op.multiplier, op.shift, (), op.in_qp.max_abs_centred << op.left_shift)
    if op.offset.numel():
        v = g.node("Add", [v, g.i64(op.offset.numpy(), "offset")])
    if op.prefix.numel():
        d = op.dim % rank
        target = g.shape_with(v, rank, d, d, [op.prefix.shape[d]])
        v = g.node("Concat", [g.node("Expand", [g.i64(op.prefix.numpy(), "prefix"), target]), v], axis=d)
    return g.finish(g.rdbpot(v, op.left_shift)[0], op.out_qp, op.lo, op.hi)


def _index(g: _Graph, x: str, key: tuple[Any, ...], rank: int) -> str:
    """``x[key]`` for ints, slices (step > 0, as torch), ``...`` and None: Slice, Gather, Unsqueeze."""
    items = list(key)
    fill = [slice(None)] * (rank - sum(1 for it in items if it is not None and it is not Ellipsis))
    at = next((i for i, it in enumerate(items) if it is Ellipsis), len(items))
    items[at:at + 1] = fill
    starts, ends, steps, axes, picks, new = [], [], [], [], [], []
    axis = pos = 0
    for it in items:
        if it is None:
            new.append(pos)
            pos += 1
            continue
        if isinstance(it, int):
            picks.append((axis, it))
        else:
            if it != slice(None):
                starts.append(0 if it.start is None else it.start)
                ends.append(INT64_MAX if it.stop is None else it.stop)
                steps.append(1 if it.step is None else it.step)
                axes.append(axis)
            pos += 1
        axis += 1
    if axes:
        x = g.node("Slice", [x, g.i64(starts), g.i64(ends), g.i64(axes), g.i64(steps)])
    for axis, i in reversed(picks):  # the highest axis first, so the lower ones keep their numbers
        x = g.node("Gather", [x, g.i64(i)], axis=axis)
    return g.node("Unsqueeze", [x, g.i64(new)]) if new else x


def _layout(g: _Graph, op: LayoutOp, ins: list[str], shapes: Shapes) -> str:
    """permute/transpose/flatten/unflatten/select/getitem on the logical tensor."""
    x, rank, args = ins[0], len(shapes[op.inputs[0]]), op.args
    if op.method in ("permute", "transpose"):
        if op.method == "permute":  # x.permute(2, 0, 1) or x.permute((2, 0, 1))
            dims = args[0] if len(args) == 1 and isinstance(args[0], (list, tuple)) else args
            perm = [int(d) % rank for d in dims]
        else:
            perm = list(range(rank))
            a, b = int(args[0]) % rank, int(args[1]) % rank
            perm[a], perm[b] = perm[b], perm[a]
        return g.node("Transpose", [x], perm=perm)
    if op.method == "flatten":
        start, end = [*args, *[0, -1][len(args):]]  # Tensor.flatten(start_dim=0, end_dim=-1)
        return g.flatten(x, rank, int(start), int(end))
    if op.method == "unflatten":
        d = int(args[0]) % rank
        return g.node("Reshape", [x, g.shape_with(x, rank, d, d, [int(s) for s in args[1]])])
    if op.method == "select":
        return g.node("Gather", [x, g.i64(int(args[1]))], axis=int(args[0]) % rank)
    return _index(g, x, decode_index(args), rank)


# --------------------------------------------------------------------------------------------
# The encoder ops of precsim.integer.text_ops (the integer MiniLM / I-BERT)
# --------------------------------------------------------------------------------------------

# Rows of the attention probabilities are as long as the sequence, known only at run time: the
# int64 normalisation of Shiftmax is checked for rows up to this many tokens (shiftmax_int's own
# limit at 16 bits).
MAX_TOKENS = 1 << 16


def _const(g: _Graph, op: ConstOp, ins: list[str], shapes: Shapes) -> str:
    return g.const(op.value.numpy(), op.value.numpy().dtype, "const")


def _embedding(g: _Graph, op: EmbeddingOp, ins: list[str], shapes: Shapes) -> str:
    """Rows of the integer table: ``Gather`` on axis 0."""
    return g.node("Gather", [g.const(op.table.numpy(), op.table.numpy().dtype, f"{op.name}.table"), ins[0]], axis=0)


def _attention_probs(g: _Graph, op: AttentionProbsOp, ins: list[str], shapes: Shapes) -> str:
    """Exact scores (``MatMulInteger`` of the uint8 codes and ``k`` transposed), minus a penalty
    where the mask is False, Shiftmax at 16 bits (:func:`_shiftmax_codes`), and the
    requantization of its codes 0..M to the P grid as a table.

    With 8-bit q, k the scores stay int32: ``|score| <= A = d max|q - Zq| max|k - Zk|`` and the
    penalty is ``2A + |x_floor|`` instead of the op's 2^40. That changes nothing: an unmasked
    score stays above every masked one, so the row maxima agree; a masked score still lands at or
    below ``x_floor`` after the row maximum is subtracted, where the shift exponential clamps; and
    a row masked everywhere is shifted as a whole, which the row maximum cancels.
    """
    rank = len(shapes[op.inputs[1]])
    kt = g.node("Transpose", [ins[1]], perm=[*range(rank - 2), rank - 1, rank - 2])
    k = op._k
    limit = shapes[op.inputs[0]][-1] * op.q_qp.max_abs_centred * op.k_qp.max_abs_centred
    penalty = 2 * limit - k.exp.x_floor
    eight = op.q_qp.dtype in _EIGHT_BIT and op.k_qp.dtype in _EIGHT_BIT
    if eight and 2 * limit + penalty - 2 * k.exp.x_floor <= INT32_MAX:
        q, zq = g.as_uint8(ins[0], op.q_qp)
        kk, zk = g.as_uint8(kt, op.k_qp)
        scores = g.node("MatMulInteger", [q, kk, g.const(zq, np.uint8, "q_zp"), g.const(zk, np.uint8, "k_zp")],
                        "scores")
        dtype = torch.int32
    else:  # torch's int32 product of wider codes: exact in int64 while it does not overflow there
        scores = g.node("MatMul", [g.centred(ins[0], op.q_qp.zero_point), g.centred(kt, op.k_qp.zero_point)],
                        "scores")
        dtype, penalty = torch.int64, op.penalty
    if len(ins) > 2:
        key = ("mask", ins[2], penalty, dtype)
        if key not in g.cache:  # the same mask for every layer
            mask = ins[2] if g.dtypes.get(op.inputs[2]) == torch.bool else g.cast_any(ins[2], torch.bool)
            g.cache[key] = g.node("Where", [mask, g.typed(0, dtype), g.typed(-penalty, dtype)], "mask_add")
        scores = g.node("Add", [scores, g.cache[key]])
    p16 = _shiftmax_codes(g, scores, k, MAX_TOKENS, op.name, dtype)
    qp = op.p_qp
    table = _requant_fast(torch.arange(0, k.out_max + 1, dtype=torch.int64), op._mult, 0, qp.zero_point, qp.qmin,
                          qp.qmax, qp.dtype, op.rounding)
    return g.node("Gather", [g.const(table.numpy(), table.numpy().dtype, f"{op.name}.p_table"), p16], axis=0)


def _fine_add(g: _Graph, op: FineAddOp, ins: list[str], shapes: Shapes) -> str:
    """``a`` (int32, on the fine grid) plus ``b`` rescaled to it, one rounding shift by ``left_shift``."""
    q = op.out_qp
    b_small = op.b_qp.bits <= 16
    b = g.centred(ins[1], op.b_qp.zero_point, torch.int32 if b_small else torch.int64)
    fast = g.mbqm_bounded(b, torch.int32 if b_small else torch.int64, op.b_multiplier, op.b_shift, (),
                          op.b_qp.max_abs_centred)
    a_bound = g.bounds.get(ins[0])
    if fast is not None and fast[1] == torch.int32 and a_bound is not None and a_bound + fast[2] <= INT32_MAX:
        total, dtype, bound = g.node("Add", [ins[0], fast[0]]), torch.int32, a_bound + fast[2]  # all int32
    else:
        b64 = (fast[0] if fast[1] == torch.int64 else g.int64(fast[0])) if fast is not None else g.mbqm(
            b, op.b_multiplier, op.b_shift, (), op.b_qp.max_abs_centred, torch.int32 if b_small else torch.int64)
        total = g.node("Add", [g.int64(ins[0]), b64])
        dtype, bound = torch.int64, None if a_bound is None or fast is None else a_bound + fast[2]
    r, r_dtype, r_bound = g.rdbpot(total, op.left_shift, dtype, bound)
    return g.finish(r, q, q.qmin, q.qmax, r_dtype, r_bound)


def _mean_pool(g: _Graph, op: MeanPoolOp, ins: list[str], shapes: Shapes) -> str:
    """``floor((2^(L+1) sum_t (x - Z) m + c) / (2 c))`` over the tokens (axis 1), ``c = max(sum_t m, 1)``;
    the cast to the output dtype wraps as torch's ``.to`` does."""
    m = g.node("Unsqueeze", [g.int64(ins[1]), g.i64([-1])])
    axis = g.i64([1])
    total = g.node("ReduceSum", [g.node("Mul", [g.centred(ins[0], op.in_qp.zero_point), m]), axis], keepdims=0)
    count = g.node("Max", [g.node("ReduceSum", [m, axis], keepdims=0), g.i64(1)])
    num = g.node("Add", [g.mul(total, 1 << (op.left_shift + 1)), count])
    return g.cast(g.floor_div(num, g.mul(count, 2)), op.out_qp.dtype)


# --- AtenOp: one ONNX form per ATen op --------------------------------------------------------------


@dataclass
class _Ref:
    """An AtenOp argument that is a graph value: its ONNX name, torch dtype (None: a size, a 0-D
    int64 in the graph) and rank."""

    name: str
    dtype: torch.dtype | None
    rank: int

    @property
    def onnx_dtype(self) -> torch.dtype:
        return torch.int64 if self.dtype is None else self.dtype


def _decode(code: Any, refs: list[_Ref]) -> Any:
    """:func:`~precsim.integer.text_ops.decode_arg` with graph values as :class:`_Ref`."""
    if isinstance(code, list):
        tag = code[0]
        if tag == "ref":
            return refs[code[1]]
        if tag == "list":
            return [_decode(c, refs) for c in code[1]]
        if tag == "torch":
            return getattr(torch, code[1])
        if tag == "device":
            return None
        raise ExportError(f"unknown argument code {code!r}")
    return code


def _as(g: _Graph, v: Any, dtype: torch.dtype, where: str) -> str:
    """A graph value cast to ``dtype`` (no node if it has it), or a Python int/bool as a 0-D constant."""
    if isinstance(v, _Ref):
        return v.name if v.onnx_dtype == dtype else g.cast_any(v.name, dtype)
    if isinstance(v, bool) or isinstance(v, int):
        return g.const(v, _NP_ANY[dtype], "k")
    raise ExportError(f"{where}: the argument {v!r} has no integer form")


def _sizes(g: _Graph, items: list[Any], expand: bool = False) -> str:
    """A size list (ints and sizes read at run time) as a 1-D int64 tensor; ``expand``: -1 becomes
    1 (``Expand`` keeps a dim that its shape gives as 1, as torch's expand keeps one given as -1)."""
    parts: list[str] = []
    run: list[int] = []
    for it in items:
        if isinstance(it, _Ref):
            if run:
                parts.append(g.i64(run))
                run = []
            v = it.name if it.onnx_dtype == torch.int64 else g.int64(it.name)
            parts.append(g.node("Unsqueeze", [v, g.i64([0])]) if it.rank == 0 else v)
        else:
            run.append(1 if expand and it == -1 else int(it))
    if run or not parts:
        parts.append(g.i64(run))
    return g.node("Concat", parts, axis=0) if len(parts) > 1 else parts[0]


def _aten_arith(onnx_op: str) -> Callable[..., str]:
    def emit(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
        """Computed in the result's dtype if int32/int64, else in int64 and cast (wrapping as torch)."""
        work = out.onnx_dtype if out.onnx_dtype in (torch.int32, torch.int64) else torch.int64
        x, y = _as(g, a[0], work, where), _as(g, a[1], work, where)
        alpha = kw.get("alpha", 1)
        if alpha != 1:
            y = g.node("Mul", [y, _as(g, alpha, work, where)])
        r = g.node(onnx_op, [x, y])
        return r if work == out.onnx_dtype else g.cast_any(r, out.onnx_dtype)
    return emit


def _aten_compare(onnx_op: str, negate: bool = False) -> Callable[..., str]:
    def emit(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
        """Both operands in int64 (exact for every integer and bool value)."""
        r = g.node(onnx_op, [_as(g, a[0], torch.int64, where), _as(g, a[1], torch.int64, where)])
        return g.node("Not", [r]) if negate else r
    return emit


def _aten_bitwise(logical: str, bitwise: str) -> Callable[..., str]:
    def emit(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
        op = logical if out.onnx_dtype == torch.bool else bitwise
        return g.node(op, [_as(g, a[0], out.onnx_dtype, where), _as(g, a[1], out.onnx_dtype, where)])
    return emit


def _aten_identity(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    return a[0].name


def _aten_to(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    return _as(g, a[0], out.onnx_dtype, where)


def _aten_reshape(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    return g.node("Reshape", [a[0].name, _sizes(g, a[1])], allowzero=1)  # a 0 is a size 0, as in torch


def _aten_expand(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    return g.node("Expand", [a[0].name, _sizes(g, a[1], expand=True)])


def _aten_transpose(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    rank = a[0].rank
    perm = list(range(rank))
    i, j = int(a[1]) % rank, int(a[2]) % rank
    perm[i], perm[j] = perm[j], perm[i]
    return g.node("Transpose", [a[0].name], perm=perm)


def _aten_permute(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    return g.node("Transpose", [a[0].name], perm=[int(d) % a[0].rank for d in a[1]])


def _aten_unsqueeze(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    return g.node("Unsqueeze", [a[0].name, g.i64([int(a[1])])])  # negative dims count from the result's end


def _aten_sym_size(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    return g.node("Gather", [g.node("Shape", [a[0].name]), g.i64(int(a[1]) % a[0].rank)], axis=0)


def _aten_slice(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    x, dim, start, end, step = [*a, *[0, None, None, 1][len(a) - 1:]]

    def one(v: Any, default: int) -> str:
        return _sizes(g, [default if v is None else v])

    return g.node("Slice", [x.name, one(start, 0), one(end, INT64_MAX), g.i64([int(dim) % x.rank]), one(step, 1)])


def _aten_select(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    x, dim, index = a
    return g.node("Gather", [x.name, _as(g, index, torch.int64, where)], axis=int(dim) % x.rank)


def _aten_arange(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    """``Range`` in the result's dtype: arange(end), arange(start, end), arange(start, end, step)."""
    start, end, step = (0, a[0], 1) if len(a) == 1 else (a[0], a[1], a[2] if len(a) > 2 else 1)
    if out.onnx_dtype not in (torch.int16, torch.int32, torch.int64):
        raise ExportError(f"{where}: arange of dtype {out.onnx_dtype}")
    return g.node("Range", [_as(g, v, out.onnx_dtype, where) for v in (start, end, step)])


def _aten_new_ones(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    one = g.const(1, _NP_ANY[out.onnx_dtype], "one")
    return g.node("Expand", [one, _sizes(g, a[1])]) if a[1] else one


def _aten_cumsum(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    work = out.onnx_dtype if out.onnx_dtype in (torch.int32, torch.int64) else torch.int64
    r = g.node("CumSum", [_as(g, a[0], work, where), g.i64(int(a[1]))])
    return r if work == out.onnx_dtype else g.cast_any(r, out.onnx_dtype)


def _aten_not(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    op = "Not" if out.onnx_dtype == torch.bool else "BitwiseNot"
    return g.node(op, [_as(g, a[0], out.onnx_dtype, where)])


def _aten_flatten(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    start, end = [*a[1:], *[0, -1][len(a) - 1:]]
    return g.flatten(a[0].name, a[0].rank, int(start), int(end))


def _aten_unflatten(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    x, dim = a[0], int(a[1]) % a[0].rank
    parts = [g.node("Shape", [x.name], start=0, end=dim)] if dim else []
    parts.append(_sizes(g, a[2]))
    if dim < x.rank - 1:
        parts.append(g.node("Shape", [x.name], start=dim + 1))
    return g.node("Reshape", [x.name, g.node("Concat", parts, axis=0) if len(parts) > 1 else parts[0]], allowzero=1)


def _aten_index(g: _Graph, a: list[Any], kw: dict[str, Any], out: _Ref, where: str) -> str:
    """``x[i0, i1, ...]`` with integer index tensors (None: a whole dim) that broadcast together:
    one tensor is a ``Gather``; several adjacent ones are expanded to their common shape, stacked
    and read with ``GatherND`` (the indexed dims moved to the front and the result's back)."""
    x, indices = a[0], list(a[1])
    pos = [i for i, t in enumerate(indices) if t is not None]
    if not pos or pos != list(range(pos[0], pos[-1] + 1)):
        raise ExportError(f"{where}: aten.index with index tensors that are not adjacent")
    if any(not isinstance(indices[i], _Ref) or indices[i].onnx_dtype in (torch.bool, torch.uint8) for i in pos):
        raise ExportError(f"{where}: aten.index with a boolean mask (a data-dependent shape)")
    idx = [_as(g, indices[i], torch.int64, where) for i in pos]
    if len(idx) == 1:
        return g.node("Gather", [x.name, idx[0]], axis=pos[0])
    total = idx[0]
    for t in idx[1:]:
        total = g.node("Add", [total, t])
    shape = g.node("Shape", [total])
    last = g.i64([-1])
    stacked = g.node("Concat", [g.node("Unsqueeze", [g.node("Expand", [t, shape]), last]) for t in idx], axis=-1)
    p0, k = pos[0], len(pos)
    front = x.name if p0 == 0 else g.node("Transpose", [x.name], perm=[*pos, *range(p0), *range(p0 + k, x.rank)])
    r = g.node("GatherND", [front, stacked])
    if p0 == 0:
        return r
    s = out.rank - (x.rank - k)  # rank of the broadcast index
    return g.node("Transpose", [r], perm=[*range(s, s + p0), *range(s), *range(s + p0, out.rank)])


_ATEN: dict[str, Callable[..., str]] = {
    "view": _aten_reshape, "reshape": _aten_reshape, "_unsafe_view": _aten_reshape, "expand": _aten_expand,
    "transpose": _aten_transpose, "permute": _aten_permute, "unsqueeze": _aten_unsqueeze,
    "contiguous": _aten_identity, "clone": _aten_identity, "alias": _aten_identity,
    "to": _aten_to, "_to_copy": _aten_to, "sym_size": _aten_sym_size, "slice": _aten_slice, "select": _aten_select,
    "arange": _aten_arange, "new_ones": _aten_new_ones, "index": _aten_index, "cumsum": _aten_cumsum,
    "flatten": _aten_flatten, "unflatten": _aten_unflatten,
    "add": _aten_arith("Add"), "sub": _aten_arith("Sub"), "mul": _aten_arith("Mul"),
    "ge": _aten_compare("GreaterOrEqual"), "gt": _aten_compare("Greater"), "le": _aten_compare("LessOrEqual"),
    "lt": _aten_compare("Less"), "eq": _aten_compare("Equal"), "ne": _aten_compare("Equal", negate=True),
    "__and__": _aten_bitwise("And", "BitwiseAnd"), "bitwise_and": _aten_bitwise("And", "BitwiseAnd"),
    "__or__": _aten_bitwise("Or", "BitwiseOr"), "bitwise_or": _aten_bitwise("Or", "BitwiseOr"),
    "bitwise_not": _aten_not, "logical_not": lambda g, a, kw, out, where: g.node(
        "Not", [_as(g, a[0], torch.bool, where)]),
}


def _aten(g: _Graph, op: AtenOp, ins: list[str], shapes: Shapes) -> str:
    """The ATen op on the logical tensors (or sizes), by its entry in ``_ATEN``."""
    packet = op.target.partition(".")[0]
    emit = _ATEN.get(packet)
    if emit is None:
        raise ExportError(f"{op.name}: aten.{op.target} has no ONNX form in export_onnx (mapped: "
                          f"{', '.join(sorted(_ATEN))})")
    refs = [_Ref(name, g.dtypes[m], len(shapes[m])) for name, m in zip(ins, op.inputs, strict=True)]
    args = [_decode(c, refs) for c in op.args]
    kwargs = {k: _decode(v, refs) for k, v in op.kwargs.items()}
    out = _Ref("", g.dtypes[op.output], len(shapes[op.output]))
    try:
        return emit(g, args, kwargs, out, f"{op.name} (aten.{op.target})")
    except (IndexError, TypeError, AttributeError) as err:  # arguments of an overload this mapping does not read
        raise ExportError(f"{op.name}: aten.{op.target} with arguments {op.args} has no ONNX form here "
                          f"({type(err).__name__}: {err})") from None


_EMITTERS: dict[type[Op], Callable[[_Graph, Any, list[str], Shapes], str]] = {
    ConvOp: _conv, AddOp: _add, RequantOp: _requant, ClampOp: _clamp, AvgPoolOp: _avgpool, MaxPoolOp: _maxpool,
    FlattenOp: _flatten, ReshapeOp: _reshape, CatOp: _cat,
    MatMulOp: _matmul, ShiftmaxOp: _shiftmax, ShiftGeluOp: _shift_gelu, IGeluOp: _i_gelu, ILayerNormOp: _i_layernorm,
    AddConstOp: _add_const, LayoutOp: _layout,
    ConstOp: _const, EmbeddingOp: _embedding, AttentionProbsOp: _attention_probs, FineAddOp: _fine_add,
    MeanPoolOp: _mean_pool, AtenOp: _aten,
}


def _emit(g: _Graph, op: Op, names: dict[str, str], shapes: Shapes) -> None:
    emitter = _EMITTERS.get(type(op))
    if emitter is None:
        raise ExportError(f"{op.name}: no ONNX form for integer op {op.kind!r}")
    since = len(g.nodes)
    g.scope = f"{op.kind}:{op.name}"
    result = emitter(g, op, [names[i] for i in op.inputs], shapes)
    out = names[op.output] = g.fresh(op.output.replace(".", "_").replace(":", "_"))
    g.name_as(result, out, since)
    if result in g.bounds:
        g.bounds[out] = g.bounds[result]


def export_onnx(imodel: IntegerModel, path: str | Path, example: Tensor | dict[str, Tensor]) -> Any:
    """Write ``imodel`` as an ONNX model (opset 21, integer ops); returns the ``onnx.ModelProto``.

    ``example``: for an image model, a float input batch (its shape fixes the non-batch
    dimensions; the batch dimension stays dynamic), graph input ``input`` (float32); for a model
    with integer keyword inputs (a text encoder, ``imodel.inputs``), a dict of example tensors,
    graph inputs of those names and dtypes whose first two dims (batch, sequence) stay dynamic.
    Outputs ``output`` (float32) and ``output_codes`` (the integer codes). Both rounding modes of
    the integer model are written out exactly (int64 ``Mul``/``Add`` and a flooring division),
    the CNN ops, the integer vision-transformer ops and the encoder ops alike.
    """
    onnx = _import_onnx()
    helper = onnx.helper
    g = _Graph(onnx, imodel.rounding)
    g.dynamic = imodel.inputs is not None
    with torch.no_grad():
        shapes, g.dtypes = _trace(imodel, example)
    oq = imodel.output_qp
    out_type = _onnx_type(onnx, oq.dtype)
    if imodel.inputs is None:
        iq = imodel.input_qp
        assert iq is not None
        if iq.dtype not in (torch.uint8, torch.int8, torch.int16):
            raise ExportError(f"input codes of dtype {iq.dtype}: QuantizeLinear makes 8- or 16-bit codes")
        codes = g.node("QuantizeLinear", ["input", g.const(iq.scale, np.float32, "in_scale"),
                                          g.const(iq.zero_point, _np_dtype(iq.dtype), "in_zp")], "codes")
        full = torch.iinfo(iq.dtype)
        if (iq.qmin, iq.qmax) != (full.min, full.max):  # narrower than the storage type: saturate to the format
            codes = g.node("Clip", [codes, g.const(iq.qmin, _np_dtype(iq.dtype), "lo"),
                                    g.const(iq.qmax, _np_dtype(iq.dtype), "hi")])
        names = {imodel.input_name: codes}
        graph_inputs = [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT,
                                                      ["batch", *shapes[imodel.input_name][1:]])]
    else:  # integer keyword inputs, used as they are
        names = {n: n for n in imodel.inputs}
        dynamic = ["batch", "sequence"]
        graph_inputs = [helper.make_tensor_value_info(
            n, _onnx_any_type(onnx, g.dtypes[n]), [*dynamic[:len(shapes[n])], *shapes[n][2:]])  # type: ignore[arg-type]
            for n in imodel.inputs]
    for op in imodel.ops:
        _emit(g, op, names, shapes)
    result = names[imodel.output_name]
    g.nodes.append(helper.make_node("Identity", [result], ["output_codes"], name="io/output_codes"))
    g.nodes.append(helper.make_node("DequantizeLinear", [result, g.const(oq.scale, np.float32, "out_scale"),
                                                         g.const(oq.zero_point, _np_dtype(oq.dtype), "out_zp")],
                                    ["output"], name="io/output"))
    out_shape = ["batch", *shapes[imodel.output_name][1:]]
    graph = helper.make_graph(
        g.nodes, "precsim_integer_model", graph_inputs,
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, out_shape),
         helper.make_tensor_value_info("output_codes", out_type, out_shape)],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="precsim")
    onnx.checker.check_model(model)
    onnx.save(model, str(Path(path)))
    return model
