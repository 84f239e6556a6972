"""ONNX export of the integer MiniLM (I-BERT ops): onnxruntime matches run_integer code for code."""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from test_ibert import converted
from test_onnx import float_ops

from precsim.integer.model import IntegerModel
from precsim.integer.onnx_export import ExportError, export_onnx
from precsim.integer.ops import QParams
from precsim.integer.text_ops import AtenOp

ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


@functools.lru_cache(maxsize=1)
def exported(tmp: str) -> tuple[Path, Any]:
    """The converted MiniLM exported at the batch it was captured with (16 sentences x 48 tokens)."""
    path = Path(tmp) / "minilm.onnx"
    return path, export_onnx(converted().imodel, path, converted().test[0])


@pytest.fixture(scope="module")
def minilm_onnx(tmp_path_factory) -> tuple[Path, Any]:  # type: ignore[no-untyped-def]
    return exported(str(tmp_path_factory.mktemp("onnx_text")))


def _session(path_or_model: Any) -> Any:
    source = path_or_model.SerializeToString() if hasattr(path_or_model, "SerializeToString") else str(path_or_model)
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def test_onnx_minilm_matches_the_integer_model(minilm_onnx) -> None:  # type: ignore[no-untyped-def]
    """Sentence-embedding codes (int32) equal run_integer's, every one, on the export's shape and
    on another batch size and length (5 x 21): batch and sequence stay dynamic."""
    path, model = minilm_onnx
    c = converted()
    session = _session(path)
    assert [i.name for i in session.get_inputs()] == ["input_ids", "attention_mask", "token_type_ids"]
    for batch in (c.test[0], {k: v[:5, :21] for k, v in c.test[1].items()}):
        y, codes = session.run(["output", "output_codes"], {k: v.numpy() for k, v in batch.items()})
        want = c.imodel.run_integer(**batch)
        assert codes.dtype == np.int32 and codes.shape == tuple(want.shape)
        assert torch.equal(torch.from_numpy(codes), want)  # code for code
        np.testing.assert_allclose(y, c.imodel.dequantize_output(want).numpy(), rtol=1e-6)
    ops = {n.op_type for n in model.graph.node}
    assert {"MatMulInteger", "GatherND", "Range", "Expand", "CumSum"} <= ops
    assert not ops & {"MatMul", "Gemm", "QLinearMatMul", "Softmax", "LayerNormalization"}


def test_onnx_minilm_graph_has_no_float_arithmetic(minilm_onnx) -> None:  # type: ignore[no-untyped-def]
    """Every node reads and writes integer or bool tensors (inferred types), except the output's
    DequantizeLinear."""
    _, model = minilm_onnx
    assert float_ops(model) == ["DequantizeLinear"]


def _aten_model(ops: list[AtenOp], dtype: torch.dtype = torch.int32) -> IntegerModel:
    info = torch.iinfo(dtype)
    return IntegerModel(ops, "x", ops[-1].output, None, QParams(1.0, 0, info.min, info.max), inputs=["x"])


def R(i: int) -> list[Any]:  # noqa: N802 - reads like the encoded argument it is
    return ["ref", i]


def L(*items: Any) -> list[Any]:  # noqa: N802
    return ["list", list(items)]


# Chains of AtenOps (target, inputs, args, kwargs; op i writes "a<i>") between the int64 input x
# (3, 4, 5) and the int32 output, for the ATen mappings the MiniLM graph does not use
ATEN_CASES: dict[str, list[tuple[str, list[str], list[Any], dict[str, Any]]]] = {
    "permute": [("permute.default", ["x"], [R(0), L(2, 0, 1)], {})],
    "select": [("select.int", ["x"], [R(0), 1, -1], {})],
    "flatten": [("flatten.using_ints", ["x"], [R(0), 1, 2], {})],
    "unflatten": [("unflatten.int", ["x"], [R(0), 2, L(1, 5)], {})],
    "cumsum": [("cumsum.default", ["x"], [R(0), -1], {})],
    "sub, mul": [("sub.Tensor", ["x"], [R(0), 7], {"alpha": 3}), ("mul.Tensor", ["a0"], [R(0), -2], {})],
    "ne, logical_not": [("ne.Scalar", ["x"], [R(0), 3], {}), ("logical_not.default", ["a0"], [R(0)], {})],
    "bitwise": [("bitwise_and.Scalar", ["x"], [R(0), 6], {}), ("bitwise_or.Scalar", ["a0"], [R(0), 9], {}),
                ("bitwise_not.default", ["a1"], [R(0)], {})],
    "index, one tensor": [("arange.start_step", [], [0, 4, 2], {}),
                          ("index.Tensor", ["x", "a0"], [R(0), L(None, R(1))], {})],
    "index, inner dims": [("arange.default", [], [3], {}), ("unsqueeze.default", ["a0"], [R(0), -1], {}),
                          ("arange.default", [], [5], {}),
                          ("index.Tensor", ["x", "a1", "a2"], [R(0), L(None, R(1), R(2))], {})],
}


@pytest.mark.parametrize("case", sorted(ATEN_CASES))
def test_onnx_aten_ops(tmp_path, case) -> None:  # type: ignore[no-untyped-def]
    ops = [AtenOp(f"a{i}", inputs, f"a{i}", target, args, kwargs)
           for i, (target, inputs, args, kwargs) in enumerate(ATEN_CASES[case])]
    ops.append(AtenOp("out", [ops[-1].output], "y", "to.dtype", [R(0), ["torch", "int32"]], {}))
    imodel = _aten_model(ops)
    x = torch.arange(-30, 30).reshape(3, 4, 5)
    model = export_onnx(imodel, tmp_path / "a.onnx", {"x": x[:2]})
    (codes,) = _session(model).run(["output_codes"], {"x": x.numpy()})
    assert torch.equal(torch.from_numpy(codes), imodel.run_integer(x=x))


def test_onnx_refuses_an_unmapped_aten_op(tmp_path) -> None:  # type: ignore[no-untyped-def]
    ops = [AtenOp("sq", ["x"], "s", "squeeze.dim", [R(0), 1], {}),
           AtenOp("out", ["s"], "y", "to.dtype", [R(0), ["torch", "int32"]], {})]
    with pytest.raises(ExportError, match=r"sq: aten\.squeeze\.dim has no ONNX form"):
        export_onnx(_aten_model(ops), tmp_path / "a.onnx", {"x": torch.zeros(2, 1, 3, dtype=torch.int64)})
