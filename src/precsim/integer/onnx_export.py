"""export_onnx(imodel, path, example): the integer model as a standard ONNX graph.

Design choice: integer kernels plus requantization written out in ONNX integer arithmetic, not
QLinearConv/QLinearMatMul. ONNX Runtime's QLinear* kernels requantize in float (``acc * (S1 S2 /
S3)`` rounded half to even); over a deep network their results drift a code or two from
gemmlowp's fixed-point rounding. Here each layer is:

* ``ConvInteger`` / ``MatMulInteger`` (uint8 operands: signed codes are shifted by +128 with their
  zero points, because onnxruntime's u8s8 kernels on x86 without VNNI saturate pairs of products
  to int16; scalar zero points) -> int32 accumulator,
* ``Cast`` to int64, ``Add`` the int32 bias,
* ``MultiplyByQuantizedMultiplier`` in int64: ``Mul`` by M0, then SaturatingRoundingDoublingHighMul
  and RoundingDivideByPOT fused into one flooring division by ``2^(31 + n)`` after adding
  ``2^30 + 2^(n-1) 2^31 - [p < -2^30] 2^31`` (see :class:`precsim.integer.ops.FixedPointMultiplier`);
  for an integer model with ``rounding="single"``, TFLite's single rounding: ``Add`` ``2^(30 + n)``
  and floor-divide by ``2^(31 + n)``,
* ``Add`` the output zero point, ``Clip`` to the (ReLU-folded) bounds, ``Cast`` to uint8/int8.

Residual adds, requantizations and pooling sums use the same int64 pieces. The graph takes the
float image (``QuantizeLinear`` at the boundary) and returns ``output`` (float, through
``DequantizeLinear``) and ``output_codes`` (the integer model's codes), so onnxruntime's
result can be compared with :meth:`IntegerModel.run_integer` code for code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

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
    to_nchw,
)

__all__ = ["export_onnx"]

OPSET = 21
IR_VERSION = 10  # onnxruntime 1.18+ reads it


class ExportError(ValueError):
    """The integer model uses something the ONNX graph cannot express."""


def _import_onnx() -> Any:
    try:
        import onnx  # noqa: PLC0415 - optional dependency, imported on use
    except ImportError as err:
        raise ImportError("precsim.export_onnx needs the optional 'onnx' package: pip install onnx "
                          "(and onnxruntime to run the exported model)") from err
    return onnx


class _Graph:
    """Collects ONNX nodes and constants with generated names."""

    def __init__(self, onnx: Any, rounding: str = "gemmlowp") -> None:
        self.onnx, self.helper = onnx, onnx.helper
        self.rounding = rounding
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.count = 0

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
        self.nodes.append(self.helper.make_node(op, inputs, [out], **attrs))
        return out

    # --- integer pieces (int64) ----------------------------------------------------------------
    def floor_div(self, t: str, d: str) -> str:
        """floor(t / d) for d > 0 from ONNX's truncating integer Div."""
        q = self.node("Div", [t, d])
        r = self.node("Sub", [t, self.node("Mul", [q, d])])
        neg = self.node("Cast", [self.node("Less", [r, self.i64(0)])], to=self.onnx.TensorProto.INT64)
        return self.node("Sub", [q, neg])

    def mbqm(self, x: str, m0: Any, shift: Any, shape: tuple[int, ...]) -> str:
        """MultiplyByQuantizedMultiplier of int64 ``x`` (int32-range values), per channel via ``shape``."""
        m = np.asarray(m0, dtype=np.int64).reshape(shape)
        s = np.asarray(shift, dtype=np.int64).reshape(shape)
        left, right = np.maximum(s, 0), np.maximum(-s, 0)
        if (right > 31).any():
            raise ExportError("a requantization right shift above 31 is not exported")
        if self.rounding == "single":  # one rounding: (x M0 + 2^(t-1)) >> t, t = 31 - shift in 0..62
            t = 31 - s
            p = self.node("Mul", [x, self.i64(m)])  # |x M0| < 2^62
            half = np.where(t > 0, np.left_shift(np.int64(1), np.maximum(t - 1, 0)), 0)
            y = self.floor_div(self.node("Add", [p, self.i64(half)]), self.i64(np.left_shift(np.int64(1), t)))
            if (s > 0).any():  # saturate as fixedpoint.multiply_by_quantized_multiplier_single does
                y = self.node("Clip", [y, self.i64(-(2**31)), self.i64(2**31 - 1)])
            return y
        if (left > 0).any():
            x = self.node("Mul", [x, self.i64(np.left_shift(np.int64(1), left))])
            x = self.node("Clip", [x, self.i64(-(2**31)), self.i64(2**31 - 1)])
        p = self.node("Mul", [x, self.i64(m)])
        half = np.where(right > 0, np.left_shift(np.int64(1), np.maximum(right - 1, 0)), 0)
        add_pos = (1 << 30) + half * (1 << 31)
        add_neg = np.where(right > 0, add_pos - (1 << 31), add_pos)
        low = self.node("Less", [p, self.i64(-(1 << 30))])
        t = self.node("Add", [p, self.node("Where", [low, self.i64(add_neg), self.i64(add_pos)])])
        return self.floor_div(t, self.i64(np.left_shift(np.int64(1), right + 31)))

    def rdbpot(self, x: str, exponent: int) -> str:
        """x / 2^e rounded as fixedpoint.shift_right_rounded: ties away from zero (gemmlowp's
        RoundingDivideByPOT), or toward +inf with single rounding."""
        if exponent == 0:
            return x
        if self.rounding == "single":
            return self.floor_div(self.node("Add", [x, self.i64(1 << (exponent - 1))]), self.i64(1 << exponent))
        neg = self.node("Cast", [self.node("Less", [x, self.i64(0)])], to=self.onnx.TensorProto.INT64)
        t = self.node("Sub", [self.node("Add", [x, self.i64(1 << (exponent - 1))]), neg])
        return self.floor_div(t, self.i64(1 << exponent))

    def finish(self, x: str, qp: QParams, lo: int, hi: int, out: str) -> str:
        """+ Z_out, clamp, cast to the code dtype, named ``out``."""
        y = self.node("Clip", [self.node("Add", [x, self.i64(qp.zero_point)]), self.i64(lo), self.i64(hi)])
        self.nodes.append(self.helper.make_node("Cast", [y], [out], to=_onnx_type(self.onnx, qp.dtype)))
        return out

    def as_uint8(self, x: str, qp: QParams) -> tuple[str, int]:
        """Codes as uint8 (int8 codes shifted by +128) and the matching zero point."""
        if qp.dtype == torch.uint8:
            return x, qp.zero_point
        shifted = self.node("Add", [self.node("Cast", [x], to=self.onnx.TensorProto.INT16), self.const(128, np.int16)])
        return self.node("Cast", [shifted], to=self.onnx.TensorProto.UINT8), qp.zero_point + 128

    def centred(self, x: str, zp: int) -> str:
        return self.node("Sub", [self.node("Cast", [x], to=self.onnx.TensorProto.INT64), self.i64(zp)])


def _onnx_type(onnx: Any, dtype: torch.dtype) -> int:
    table = {torch.uint8: onnx.TensorProto.UINT8, torch.int8: onnx.TensorProto.INT8}
    if dtype not in table:
        raise ExportError(f"codes of dtype {dtype} have no ONNX integer kernels; export needs 8-bit (or narrower) codes")
    return table[dtype]


def _np_dtype(dtype: torch.dtype) -> Any:
    return {torch.uint8: np.uint8, torch.int8: np.int8}[dtype]


def _shapes(imodel: IntegerModel, example: Tensor) -> dict[str, tuple[int, ...]]:
    """NCHW shape of every tensor for one example batch (and resolved pooling multipliers)."""
    record: list[tuple[str, str, Tensor]] = []
    codes = imodel.quantize_input(example)
    imodel.run_integer(codes, record=record)
    shapes = {imodel.input_name: tuple(codes.shape)}
    outputs = [t for layer, what, t in record if what == "output"]
    for op, t in zip(imodel.ops, outputs, strict=True):
        shapes[op.output] = tuple(to_nchw(t).shape) if t.dim() == 4 else tuple(t.shape)
    return shapes


def _emit(g: _Graph, op: Op, names: dict[str, str], shapes: dict[str, tuple[int, ...]]) -> None:
    onnx = g.onnx
    ins = [names[i] for i in op.inputs]
    out = names[op.output] = g.fresh(op.output.replace(".", "_").replace(":", "_"))
    if isinstance(op, ConvOp):
        if op.acc_dtype != "int32":
            raise ExportError(f"{op.name}: the accumulator needs int64; ONNX ConvInteger/MatMulInteger accumulate in int32")
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
        acc = g.node("Cast", [acc], to=onnx.TensorProto.INT64)
        acc = g.node("Add", [acc, g.i64(op.bias.numpy().astype(np.int64).reshape(shape), f"{op.name}.bias")])
        g.finish(g.mbqm(acc, op.multiplier.numpy(), op.shift.numpy(), shape), op.out_qp, op.lo, op.hi, out)
    elif isinstance(op, AddOp):
        one = g.i64(1 << op.left_shift)
        a = g.mbqm(g.node("Mul", [g.centred(ins[0], op.a_qp.zero_point), one]), op.a_multiplier, op.a_shift, ())
        b = g.mbqm(g.node("Mul", [g.centred(ins[1], op.b_qp.zero_point), one]), op.b_multiplier, op.b_shift, ())
        g.finish(g.rdbpot(g.node("Add", [a, b]), op.left_shift), op.out_qp, op.lo, op.hi, out)
    elif isinstance(op, RequantOp):
        x = g.mbqm(g.centred(ins[0], op.in_qp.zero_point), op.multiplier, op.shift, ())
        g.finish(x, op.out_qp, op.lo, op.hi, out)
    elif isinstance(op, ClampOp):
        g.finish(g.centred(ins[0], op.qp.zero_point), op.qp, op.lo, op.hi, out)
    elif isinstance(op, AvgPoolOp):
        n, c, h, w = shapes[op.inputs[0]]
        if op.kernel is None:
            total = g.node("ReduceSum", [g.centred(ins[0], op.in_qp.zero_point), g.i64([2, 3])], keepdims=1)
            count = h * w
        else:  # window sums as a depthwise ConvInteger with a kernel of ones
            kh, kw = op.kernel
            ones = g.const(np.ones((c, 1, kh, kw)), np.uint8, "ones")
            x, x_zp_val = g.as_uint8(ins[0], op.in_qp)
            x_zp = g.const(x_zp_val, np.uint8, "x_zp")
            total = g.node("ConvInteger", [x, ones, x_zp, g.const(0, np.uint8, "w_zp")], group=c,
                           kernel_shape=[kh, kw], strides=list(op.stride or op.kernel))
            total = g.node("Cast", [total], to=onnx.TensorProto.INT64)
            count = kh * kw
        m0, shift = op.multiplier_for(count)
        g.finish(g.mbqm(total, m0, shift, ()), op.out_qp, op.lo, op.hi, out)
    elif isinstance(op, MaxPoolOp):
        ph, pw = op.padding
        g.nodes.append(g.helper.make_node("MaxPool", ins, [out], kernel_shape=list(op.kernel),
                                          strides=list(op.stride), pads=[ph, pw, ph, pw]))
    elif isinstance(op, FlattenOp):
        rank = len(shapes[op.inputs[0]])
        start, end = op.start_dim % rank, op.end_dim % rank
        if start == 1 and end == rank - 1:
            g.nodes.append(g.helper.make_node("Flatten", ins, [out], axis=1))
        else:
            tail = list(shapes[op.output][start + 1:])
            g.nodes.append(g.helper.make_node("Reshape", [ins[0], g.i64([0] * start + [-1] + tail)], [out]))
    elif isinstance(op, ReshapeOp):
        g.nodes.append(g.helper.make_node("Reshape", [ins[0], g.i64(list(op.shape))], [out]))
    elif isinstance(op, CatOp):
        g.nodes.append(g.helper.make_node("Concat", ins, [out], axis=op.dim))
    else:
        raise ExportError(f"{op.name}: no ONNX form for integer op {op.kind!r}")


def export_onnx(imodel: IntegerModel, path: str | Path, example: Tensor) -> Any:
    """Write ``imodel`` as an ONNX model (opset 21, integer ops); returns the ``onnx.ModelProto``.

    ``example``: a float input batch (its shape fixes the non-batch dimensions; the batch
    dimension stays dynamic). Graph input ``input`` (float32); outputs ``output`` (float32)
    and ``output_codes`` (the integer codes). Both rounding modes of the integer model are
    written out exactly (int64 ``Mul``/``Add`` and a flooring division).
    """
    onnx = _import_onnx()
    helper = onnx.helper
    g = _Graph(onnx, imodel.rounding)
    with torch.no_grad():
        shapes = _shapes(imodel, example)
    iq, oq = imodel.input_qp, imodel.output_qp
    _onnx_type(onnx, iq.dtype)  # validates the input codes
    out_type = _onnx_type(onnx, oq.dtype)
    codes = g.node("QuantizeLinear", ["input", g.const(iq.scale, np.float32, "in_scale"),
                                      g.const(iq.zero_point, _np_dtype(iq.dtype), "in_zp")], "codes")
    full = torch.iinfo(iq.dtype)
    if (iq.qmin, iq.qmax) != (full.min, full.max):  # narrower than 8 bits: saturate to the format
        codes = g.node("Clip", [codes, g.const(iq.qmin, _np_dtype(iq.dtype), "lo"),
                                g.const(iq.qmax, _np_dtype(iq.dtype), "hi")])
    names = {imodel.input_name: codes}
    for op in imodel.ops:
        _emit(g, op, names, shapes)
    result = names[imodel.output_name]
    g.nodes.append(helper.make_node("Identity", [result], ["output_codes"]))
    g.nodes.append(helper.make_node("DequantizeLinear", [result, g.const(oq.scale, np.float32, "out_scale"),
                                                         g.const(oq.zero_point, _np_dtype(oq.dtype), "out_zp")],
                                    ["output"]))
    in_shape = ["batch", *shapes[imodel.input_name][1:]]
    out_shape = ["batch", *shapes[imodel.output_name][1:]]
    graph = helper.make_graph(
        g.nodes, "precsim_integer_model",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, in_shape)],
        [helper.make_tensor_value_info("output", onnx.TensorProto.FLOAT, out_shape),
         helper.make_tensor_value_info("output_codes", out_type, out_shape)],
        g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], ir_version=IR_VERSION,
                              producer_name="precsim")
    onnx.checker.check_model(model)
    onnx.save(model, str(Path(path)))
    return model
