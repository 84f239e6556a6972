"""ONNX export: onnxruntime runs the exported integer graph and matches the integer model."""

from __future__ import annotations

import functools
import math
import sys
from typing import Any

import numpy as np
import pytest
import torch
from test_convert import outputs, qat_resnet
from test_convert_kernels import Convs, Residual
from torch import nn

import precsim
from precsim.integer import onnx_export
from precsim.integer.convert import convert, integer_config
from precsim.integer.fixedpoint import quantize_multiplier
from precsim.integer.ibert_ops import prepare_i_gelu
from precsim.integer.ivit_ops import prepare_i_layernorm, prepare_shift_gelu, prepare_shiftmax
from precsim.integer.model import IntegerModel
from precsim.integer.onnx_export import ExportError, _Graph, export_onnx
from precsim.integer.ops import Op, QParams
from precsim.integer.text_ops import IGeluOp
from precsim.integer.vit_ops import (
    AddConstOp,
    ILayerNormOp,
    LayoutOp,
    MatMulOp,
    ShiftGeluOp,
    ShiftmaxOp,
    consts_state,
    encode_index,
)
from precsim.zoo import get_model, load_dataset

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


def _run(path, x: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    y, codes = session.run(["output", "output_codes"], {"input": x.numpy()})
    return y, codes


@pytest.mark.parametrize("rounding", ["gemmlowp", "single"])
def test_onnx_resnet_matches_the_integer_model(tmp_path, rounding) -> None:  # type: ignore[no-untyped-def]
    o = outputs(rounding)
    x = qat_resnet().test.tensors[0]
    path = tmp_path / "resnet.onnx"
    model = export_onnx(o.imodel, path, x[:2])
    ops = {n.op_type for n in model.graph.node}
    assert {"ConvInteger", "MatMulInteger", "QuantizeLinear", "DequantizeLinear"} <= ops
    assert not ops & {"Conv", "MatMul", "Gemm", "QLinearConv"}  # integer kernels only
    y, codes = _run(path, x)
    diff = np.abs(codes.astype(np.int64) - o.int_codes.numpy())
    assert diff.max() <= 1
    assert (diff == 0).mean() == 1.0  # in fact code for code: the same fixed-point arithmetic
    if rounding == "single":  # the graph is not gemmlowp's: it would differ on about 20% of these codes
        assert not np.array_equal(codes.astype(np.int64), outputs("gemmlowp").int_codes.numpy())
    qp = o.imodel.output_qp
    np.testing.assert_allclose(y, (codes.astype(np.float32) - qp.zero_point) * np.float32(qp.scale), rtol=1e-6)


@pytest.mark.parametrize("rounding", ["gemmlowp", "single"])
@pytest.mark.parametrize("make, shape", [(Convs, (3, 13, 9)), (Residual, (2, 6, 6))])
def test_onnx_layer_types(tmp_path, make, shape, rounding) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    model = make()
    model = precsim.calibrate(model, [torch.randn(16, *shape) for _ in range(3)], integer_config(model))
    imodel = convert(model, rounding=rounding)
    x = torch.randn(40, *shape)
    export_onnx(imodel, tmp_path / "m.onnx", x[:1])
    _, codes = _run(tmp_path / "m.onnx", x)
    assert np.array_equal(codes.astype(np.int64), imodel.output_codes(x).long().numpy())


def test_onnx_refuses_per_channel_weight_zero_points(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = Convs()
    cfg = integer_config(model, weight={"format": "uint8", "granularity": "per_channel"})
    imodel = convert(precsim.calibrate(model, [torch.randn(8, 3, 13, 9)], cfg))
    with pytest.raises(ExportError, match="per-channel weight zero points"):
        export_onnx(imodel, tmp_path / "m.onnx", torch.randn(1, 3, 13, 9))


def test_onnx_refuses_wide_codes(tmp_path) -> None:  # type: ignore[no-untyped-def]
    model = nn.Sequential(nn.Linear(4, 4))
    cfg = {"activation": "int16", "weight": "int8", "rules": [{"match": "0", "input": "int16"}]}
    imodel = convert(precsim.calibrate(model, [torch.randn(8, 4)], cfg))
    with pytest.raises(ExportError, match="8-bit"):
        export_onnx(imodel, tmp_path / "m.onnx", torch.randn(1, 4))


def test_missing_onnx_is_a_clear_error(tmp_path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match="pip install onnx"):
        export_onnx(outputs().imodel, tmp_path / "m.onnx", torch.zeros(1, 1, 28, 28))


# --------------------------------------------------------------------------------------------
# The integer vision transformer (I-ViT ops)
# --------------------------------------------------------------------------------------------

VIT_ARCH = {"patch_size": 7, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2}  # as test_ivit_convert.ARCH
# The only nodes with float tensors: the float input's quantization, the output's dequantization.
BOUNDARY_OPS = ("DequantizeLinear", "QuantizeLinear")


@functools.lru_cache(maxsize=1)
def calibrated_vit() -> tuple[nn.Module, torch.Tensor]:
    """The tiny zoo ViT of test_ivit_convert, calibrated (not trained: the export is about the
    integer arithmetic, and calibration takes seconds) with I-ViT's quantizers on MNIST; and the
    test images plus images far outside the data (zeros, saturating values, noise)."""
    torch.manual_seed(0)
    _, test = load_dataset("mnist5k")
    images = test.tensors[0][:256]
    model = get_model("vit", **VIT_ARCH)
    model = precsim.calibrate(model, [images[:128], images[128:]], precsim.ivit_config(model))
    odd = torch.cat([torch.zeros(1, 1, 28, 28), torch.full((1, 1, 28, 28), 50.0), torch.randn(6, 1, 28, 28) * 4])
    return model, torch.cat([images, odd])


@pytest.mark.parametrize("rounding", ["gemmlowp", "single"])
def test_onnx_vit_matches_the_integer_model(tmp_path, rounding) -> None:  # type: ignore[no-untyped-def]
    """onnxruntime's logit codes (int16) equal run_integer's, every one, for a batch larger than
    the example's."""
    model, x = calibrated_vit()
    imodel = convert(model, rounding=rounding)
    kinds = {type(op).__name__ for op in imodel.ops}
    assert {"MatMulOp", "ShiftmaxOp", "ShiftGeluOp", "ILayerNormOp", "AddConstOp", "LayoutOp"} <= kinds
    path = tmp_path / "vit.onnx"
    onnx_model = export_onnx(imodel, path, x[:2])  # the batch stays dynamic
    y, codes = _run(path, x)
    want = imodel.output_codes(x)
    assert codes.dtype == np.int16 and torch.equal(torch.from_numpy(codes), want)  # code for code
    qp = imodel.output_qp
    np.testing.assert_allclose(y, (codes.astype(np.float32) - qp.zero_point) * np.float32(qp.scale), rtol=1e-6)
    ops = {n.op_type for n in onnx_model.graph.node}
    assert {"MatMulInteger", "MatMul", "CumSum", "ReduceMax"} <= ops  # q k^T on MatMulInteger, softmax v in int64


def _value_types(model: Any) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    g = inferred.graph
    types = {t.name: t.data_type for t in g.initializer}
    for v in [*g.input, *g.value_info, *g.output]:
        types[v.name] = v.type.tensor_type.elem_type
    return types


def float_ops(model: Any) -> list[str]:
    """The op types of the nodes that read or write a float tensor (every tensor's type inferred)."""
    types = _value_types(model)
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
    found = []
    for node in model.graph.node:
        names = [*node.input, *node.output]
        assert all(types.get(t, onnx.TensorProto.UNDEFINED) != onnx.TensorProto.UNDEFINED for t in names), node
        if any(types[t] in floats for t in names):
            found.append(node.op_type)
    return found


def test_onnx_vit_graph_has_no_float_arithmetic(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Every node reads and writes integer (or bool) tensors, except the boundary QuantizeLinear
    (float image in) and DequantizeLinear (float output): checked on the inferred types."""
    model, x = calibrated_vit()
    onnx_model = export_onnx(convert(model), tmp_path / "vit.onnx", x[:1])
    assert tuple(sorted(float_ops(onnx_model))) == BOUNDARY_OPS


def _single_op_model(ops: list[Op], in_qp: QParams, out_qp: QParams, rounding: str = "gemmlowp") -> IntegerModel:
    """``ops`` as a model whose float input is its codes (scale 1, zero point 0), so a test picks
    the codes the op sees."""
    return IntegerModel(ops, "x", ops[-1].output, QParams(1.0, 0, in_qp.qmin, in_qp.qmax), out_qp, rounding=rounding)


def _assert_onnx_equal(tmp_path, imodel: IntegerModel, codes: torch.Tensor) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "op.onnx"
    export_onnx(imodel, path, codes.float())
    _, got = _run(path, codes.float())
    want = imodel.run_integer(codes)
    assert torch.equal(torch.from_numpy(got.astype(np.int64)), want.to(torch.int64))


def _rows(qp: QParams, n: int, seed: int) -> torch.Tensor:
    """(1, 8, 5, n) codes: 30 random rows, then adversarial ones: all equal (zero, qmin, qmax),
    one maximum among far-negative codes (first or last), tied maxima, alternating extremes, a
    ramp, a single 1 or -1 among zeros."""
    g = torch.Generator().manual_seed(seed)
    lo, hi = qp.qmin, qp.qmax
    special = [[0] * n, [lo] * n, [hi] * n, [hi] + [lo] * n, [lo] * (n - 1) + [hi], [hi, hi] + [lo] * n,
               [lo, hi] * n, torch.linspace(lo, hi, n).round().long().tolist(), [0] * (n - 1) + [1], [-1] + [0] * n]
    rows = torch.cat([torch.randint(lo, hi + 1, (30, n), generator=g), torch.tensor([r[:n] for r in special])])
    return rows.clamp(lo, hi).reshape(1, 8, 5, n).to(qp.dtype)


@pytest.fixture(params=["tables", "arithmetic"])
def lut(request, monkeypatch) -> str:  # type: ignore[no-untyped-def]
    """Export element-wise functions of clipped integers as tables (the default) or written out."""
    if request.param == "arithmetic":
        monkeypatch.setattr(onnx_export, "LUT_MAX", 0)
    return str(request.param)


@pytest.mark.parametrize("sum_preserving", [True, False])
@pytest.mark.parametrize(("scale", "bits", "in_qp"), [
    (0.01, 16, QParams(0.01, 0, -128, 127)),
    (0.6, 16, QParams(0.6, 0, -128, 127)),
    (2.0, 8, QParams(2.0, 0, -128, 127)),
    (0.05, 16, QParams(0.05, 0, -32768, 32767)),  # 16-bit codes: differences far below x_floor
])
def test_onnx_shiftmax_exact(tmp_path, scale, bits, in_qp, sum_preserving, lut) -> None:  # type: ignore[no-untyped-def]
    op = ShiftmaxOp.make("sm", ["x"], "y", in_qp, prepare_shiftmax(scale, bits, sum_preserving=sum_preserving))
    for n in (1, 9):
        _assert_onnx_equal(tmp_path, _single_op_model([op], in_qp, op.out_qp), _rows(in_qp, n, seed=n))


@pytest.mark.parametrize(("scale", "out_scale", "in_qp"), [
    (0.02, 0.02, QParams(0.02, 0, -128, 127)),
    (0.05, 0.03, QParams(0.05, 0, -128, 127)),
    (0.9, 0.1, QParams(0.9, 0, -128, 127)),
    (1e-3, 0.03, QParams(1e-3, 0, -32768, 32767)),
])
def test_onnx_shift_gelu_exact_on_every_code(tmp_path, scale, out_scale, in_qp, lut) -> None:  # type: ignore[no-untyped-def]
    out_qp = QParams(out_scale, 0, -128, 127)
    op = ShiftGeluOp("g", ["x"], "y", in_qp, out_qp, consts_state(prepare_shift_gelu(scale, out_scale, 8)))
    codes = torch.arange(in_qp.qmin, in_qp.qmax + 1).reshape(1, 1, 1, -1).to(in_qp.dtype)
    _assert_onnx_equal(tmp_path, _single_op_model([op], in_qp, out_qp), codes)


@pytest.mark.parametrize(("scale", "out_scale", "bits"), [(0.08 / 256, 0.08, 8), (0.05, 0.05, 8), (2.93e-6, 7.5e-4, 16)])
def test_onnx_i_gelu_exact(tmp_path, scale, out_scale, bits, lut) -> None:  # type: ignore[no-untyped-def]
    """I-BERT's i-GELU on every 16-bit code (the model input of an exported graph is at most 16-bit;
    with MiniLM's int16 scales the input is first rounded to a coarser grid)."""
    top = (1 << (bits - 1)) - 1
    in_qp, out_qp = QParams(scale, 0, -(2**15), 2**15 - 1), QParams(out_scale, 0, -top - 1, top)
    op = IGeluOp("g", ["x"], "y", in_qp, out_qp, consts_state(prepare_i_gelu(scale, out_scale, bits)))
    codes = torch.arange(-(2**15), 2**15, dtype=torch.int16).reshape(1, 1, 1, -1)
    _assert_onnx_equal(tmp_path, _single_op_model([op], in_qp, out_qp), codes)


@pytest.mark.parametrize(("n", "eps", "out_bits"), [(24, 1e-5, 8), (24, 0.0, 16), (7, 1e-5, 8), (1, 0.0, 8)])
def test_onnx_i_layernorm_exact(tmp_path, n, eps, out_bits) -> None:  # type: ignore[no-untyped-def]
    """Random, constant (variance 0: std from eps, or clamped to 1 with eps = 0), full-range and
    one-outlier rows of 16-bit codes."""
    g = torch.Generator().manual_seed(n)
    w, b = torch.randn(n, generator=g), torch.randn(n, generator=g) * 0.1
    in_qp = QParams(1e-3, 0, -32768, 32767)
    out_qp = QParams(0.03, 0, -(2 ** (out_bits - 1)), 2 ** (out_bits - 1) - 1)
    k = prepare_i_layernorm(1e-3, n, 0.03, w, b, eps=eps, in_bits=16, out_bits=out_bits)
    op = ILayerNormOp("ln", ["x"], "y", in_qp, out_qp, consts_state(k))
    _assert_onnx_equal(tmp_path, _single_op_model([op], in_qp, out_qp), _rows(in_qp, n, seed=n))
    small = torch.randint(-3, 4, (1, 2, 5, n), generator=g).to(torch.int16)  # tiny variances
    _assert_onnx_equal(tmp_path, _single_op_model([op], in_qp, out_qp), small)


def test_onnx_isqrt_fixed_steps_are_exact() -> None:
    """The unrolled Newton square root against math.isqrt on [1, 2^62): every n below 2^16, and
    around every square m^2 (m^2 - 1 makes plain Newton oscillate) and power of two, at every
    bit length, plus random values of every bit length."""
    rng = np.random.default_rng(0)
    roots = {int(m) for j in range(32) for m in (2**j - 1, 2**j, 2**j + 1, 3 * 2**j // 2)}
    roots |= {int(m) for m in rng.integers(1, 2**31, 2000)} | {2**31 - 1}
    values = set(range(1, 1 << 16))
    values |= {m * m + d for m in roots if m > 0 for d in (-1, 0, 1) if 1 <= m * m + d < 2**62}
    values |= {2**j + d for j in range(62) for d in (-1, 0, 1) if 1 <= 2**j + d < 2**62}
    values |= {int(v) >> int(s) for v, s in zip(rng.integers(1, 2**62, 4000), rng.integers(0, 62, 4000), strict=True)}
    n = np.array(sorted(v for v in values if v >= 1), dtype=np.int64)
    g = _Graph(onnx)
    root = g.isqrt("n")
    graph = onnx.helper.make_graph(
        g.nodes, "isqrt", [onnx.helper.make_tensor_value_info("n", onnx.TensorProto.INT64, [None])],
        [onnx.helper.make_tensor_value_info(root, onnx.TensorProto.INT64, [None])], g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"n": n})
    want = np.array([math.isqrt(int(v)) for v in n], dtype=np.int64)
    assert len(n) > 70_000
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("rounding", ["gemmlowp", "single"])
@pytest.mark.parametrize(("k", "qp"), [
    (16, QParams(0.02, 3, -128, 127)),  # int8 codes, zero point: MatMulInteger
    (37, QParams(0.01, 120, 0, 255)),  # uint8 codes: MatMulInteger
    (40, QParams(1e-3, 0, -32768, 32767)),  # int16 codes, 40 * 2^30 > 2^31: int64 plan with a pre-shift
])
def test_onnx_matmul_exact(tmp_path, k, qp, rounding) -> None:  # type: ignore[no-untyped-def]
    """x @ x^T per head (a LayoutOp then a MatMulOp), with extreme rows and columns."""
    out_qp = QParams(0.5, -3, -128, 127)
    # a multiplier that puts typical sums (about sqrt(K) max|q - Z|^2 / 3) near 40 codes, extreme ones saturating
    m0, shift = quantize_multiplier(120 / (math.sqrt(k) * qp.max_abs_centred**2))
    ops: list[Op] = [LayoutOp("t", ["x"], "xt", "transpose", [-2, -1]),
                     MatMulOp("mm", ["x", "xt"], "y", qp, qp, out_qp, m0, shift, -128, 127, factor=0.7, rounding=rounding)]
    codes = torch.randint(qp.qmin, qp.qmax + 1, (2, 3, 6, k), generator=torch.Generator().manual_seed(k))
    codes[0, 0, 0], codes[0, 0, 1], codes[1, 2, 3] = qp.qmax, qp.qmin, qp.zero_point
    _assert_onnx_equal(tmp_path, _single_op_model(ops, qp, out_qp, rounding), codes.to(qp.dtype))
    assert (ops[1].plan(k)[0] == torch.int64) == (qp.bits > 8)  # type: ignore[attr-defined]


@pytest.mark.parametrize("rounding", ["gemmlowp", "single"])
@pytest.mark.parametrize("prefix", [True, False])
def test_onnx_add_const_exact(tmp_path, rounding, prefix) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(1)
    in_qp, out_qp = QParams(0.05, 2, -128, 127), QParams(0.002, 0, -32768, 32767)
    m0, shift = quantize_multiplier(in_qp.scale / out_qp.scale)
    pre = torch.from_numpy(rng.integers(-(2**25), 2**25, size=(1, 1, 8))) if prefix else torch.zeros(0, dtype=torch.int64)
    offset = torch.from_numpy(rng.integers(-(2**25), 2**25, size=(1, 7, 8)))
    op = AddConstOp("pos", ["x"], "y", in_qp, out_qp, m0, shift, 15, pre, offset, 1, -32768, 32767, rounding)
    codes = torch.from_numpy(rng.integers(-128, 128, size=(3, 7, 8))).to(torch.int8)
    codes[0] = 127
    codes[1] = -128
    _assert_onnx_equal(tmp_path, _single_op_model([op], in_qp, out_qp, rounding), codes)


@pytest.mark.parametrize(("method", "args"), [
    ("permute", [2, 0, 3, 1]), ("permute", [[0, 3, 1, 2]]), ("transpose", [-2, -1]), ("unflatten", [-1, [2, 3]]),
    ("unflatten", [1, [2, -1]]), ("flatten", [2]), ("flatten", [1, 2]), ("select", [1, 2]), ("select", [-1, -1]),
    ("getitem", encode_index((slice(None), 0))), ("getitem", encode_index((..., slice(1, 5, 2)))),
    ("getitem", encode_index((slice(None), None, -1, slice(-3, None)))), ("getitem", encode_index((0, ..., None))),
])
def test_onnx_layout_ops(tmp_path, method, args) -> None:  # type: ignore[no-untyped-def]
    qp = QParams(1.0, 0, -32768, 32767)
    codes = torch.arange(2 * 4 * 5 * 6).reshape(2, 4, 5, 6).to(torch.int16)
    _assert_onnx_equal(tmp_path, _single_op_model([LayoutOp("l", ["x"], "y", method, args)], qp, qp), codes)


def _run_pieces(g: _Graph, x: np.ndarray, outs: list[str]) -> list[np.ndarray]:
    """The graph ``g`` built on input "x" (x's dtype), its ``outs`` computed by onnxruntime."""
    elem = onnx.helper.np_dtype_to_tensor_dtype(x.dtype)
    inferred = onnx.shape_inference.infer_shapes(onnx.helper.make_model(
        onnx.helper.make_graph(g.nodes, "pieces", [onnx.helper.make_tensor_value_info("x", elem, [None])], [],
                               g.inits), opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10))
    types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
    graph = onnx.helper.make_graph(g.nodes, "pieces", [onnx.helper.make_tensor_value_info("x", elem, [None])],
                                   [onnx.helper.make_tensor_value_info(o, types[o], [None]) for o in outs], g.inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 21)], ir_version=10)
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(outs, {"x": x})


@pytest.mark.parametrize("rounding", ["gemmlowp", "single"])
def test_onnx_requantization_forms_exact(rounding) -> None:  # type: ignore[no-untyped-def]
    """The exporter's MultiplyByQuantizedMultiplier forms (bounded: Abs/Sign; general: sign step
    and uint64 floor shift) and rounding shifts against the integer kernels' FixedPointMultiplier
    and shift_right_rounded: multipliers at both ends of [2^30, 2^31) (2^30 exactly: the one
    where x = -1 gives p = -2^30), right shifts 0..31 and left shifts, inputs around every tie."""
    from precsim.integer.fixedpoint import shift_right_rounded
    from precsim.integer.ops import FixedPointMultiplier

    rng = np.random.default_rng(0)
    small = np.concatenate([np.arange(-4096, 4097), rng.integers(-(2**20), 2**20, 20000),
                            [2**20, -(2**20), 2**20 - 1, -(2**20) + 1]]).astype(np.int32)
    wide = np.concatenate([small, rng.integers(-(2**31), 2**31, 20000),
                           [2**31 - 1, -(2**31), -(2**31) + 1, 2**30, -(2**30), -(2**30) - 1]]).astype(np.int32)
    for m0 in (1 << 30, (1 << 30) + 1, 1518500250, (1 << 31) - 1):
        for shift in (-31, -20, -9, -1, 0, 3, 11):
            g = _Graph(onnx, rounding)
            outs = [g.mbqm("x", m0, shift, (), dtype=torch.int32)]
            bounded = g.mbqm_bounded("x", torch.int32, m0, shift, (), 2**20)
            if bounded is not None:
                outs.append(bounded[0])
            got = _run_pieces(g, wide, outs[:1]) + (_run_pieces(g, small, outs[1:]) if bounded else [])
            mult = FixedPointMultiplier(m0, shift, rounding)
            np.testing.assert_array_equal(got[0], mult(torch.from_numpy(wide)).numpy(), err_msg=f"{m0} {shift}")
            if bounded is not None:
                want = mult(torch.from_numpy(small)).numpy()
                np.testing.assert_array_equal(got[1].astype(np.int64), want, err_msg=f"bounded {m0} {shift}")
                assert np.abs(want).max() <= bounded[2]
    x64 = np.concatenate([wide.astype(np.int64) * 3, [2**61, -(2**61), 2**62 - 1, -(2**62)]])
    for e in (1, 2, 7, 31):
        g = _Graph(onnx, rounding)
        r64 = g.rdbpot("x", e)[0]
        shifted = g.floor_shift("x", e, add=5)
        got_r, got_s = _run_pieces(g, x64, [r64, shifted])
        np.testing.assert_array_equal(got_r, shift_right_rounded(torch.from_numpy(x64), e, rounding).numpy())
        np.testing.assert_array_equal(got_s, (torch.from_numpy(x64) + 5) >> e)
        g = _Graph(onnx, rounding)
        r32, dtype, _ = g.rdbpot("x", e, torch.int32, 2**31 - 1 - (1 << (e - 1)))
        (got,) = _run_pieces(g, small, [r32])
        np.testing.assert_array_equal(got, shift_right_rounded(torch.from_numpy(small), e, rounding).numpy())
    g = _Graph(onnx)
    q = g.floor_div("x", 7)
    (got,) = _run_pieces(g, x64, [q])
    np.testing.assert_array_equal(got, np.floor_divide(x64, 7))
