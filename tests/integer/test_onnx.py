"""ONNX export: onnxruntime runs the exported integer graph and matches the integer model."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
from test_convert import outputs, qat_resnet
from test_convert_kernels import Convs, Residual
from torch import nn

import precsim
from precsim.integer.convert import convert, integer_config
from precsim.integer.onnx_export import ExportError, export_onnx

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
