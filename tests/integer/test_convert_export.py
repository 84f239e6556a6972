"""convert() on a torch.export capture (an example batch given) equals convert() on the torch.fx
trace, code for code, and converts models torch.fx cannot trace."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import precsim
from precsim.integer.convert import ConversionError
from precsim.zoo import get_model
from qat._models import Branchy


def calibrated(model: nn.Module, cfg: dict, x: torch.Tensor, example: torch.Tensor | None = None) -> nn.Module:
    precsim.prepare(model, cfg, example_inputs=example)
    return precsim.calibrate(model.eval(), [x[:8], x[8:]], None)


@pytest.mark.parametrize("name", ["resnet", "vit"])
def test_export_and_fx_give_the_same_integer_model(name: str) -> None:
    torch.manual_seed(0)
    model = get_model(name).eval()
    x = torch.randn(16, 1, 28, 28)
    cfg = precsim.ivit_config(model) if name == "vit" else precsim.integer_config(model)
    twin = copy.deepcopy(model)
    calibrated(model, cfg, x)
    calibrated(twin, cfg, x, example=x[:2])  # BN folding and biases from the exported graph
    by_fx = precsim.convert(model)
    by_export = precsim.convert(model, example=x[:1])
    from_export_prepare = precsim.convert(twin, example=x[:3])
    t = torch.randn(5, 1, 28, 28)  # another batch size than any capture's
    assert [type(op).__name__ for op in by_export.ops] == [type(op).__name__ for op in by_fx.ops]
    assert torch.equal(by_export.run_integer(by_export.quantize_input(t)), by_fx.run_integer(by_fx.quantize_input(t)))
    assert torch.equal(from_export_prepare(t), by_fx(t))


class Plain(Branchy):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


def test_convert_a_model_torch_fx_cannot_trace() -> None:
    torch.manual_seed(1)
    branchy, plain = Branchy().eval(), Plain().eval()
    plain.load_state_dict(branchy.state_dict())
    x = torch.randn(16, 8, 8)
    calibrated(branchy, precsim.integer_config(branchy, example_inputs=x), x, example=x)
    calibrated(plain, precsim.integer_config(plain), x.unsqueeze(1))
    with pytest.raises(ConversionError, match="torch.fx cannot trace it"):
        precsim.convert(branchy)
    imodel = precsim.convert(branchy, example=x[:1])  # the branch taken: 3-D images, unsqueezed inside
    t = torch.randn(7, 8, 8)
    assert torch.equal(imodel(t), precsim.convert(plain)(t.unsqueeze(1)))
    assert (imodel(t) - branchy(t)).abs().max() <= 2 * imodel.output_qp.scale + 1e-6
    with precsim.integer_exact(branchy, example=x[:1]) as exact:  # the simulation of that integer model
        assert torch.equal(exact(t), imodel(t))


def test_an_unsupported_op_between_modules_names_the_aten_op_and_its_line() -> None:
    class Sigmoid(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(torch.sigmoid(self.a(x)))

    model = Sigmoid()
    x = torch.randn(8, 4)
    cfg = precsim.integer_config(model, example_inputs=x, bias="fp32")
    calibrated(model, cfg, torch.cat([x, x]), example=x)
    with pytest.raises(ConversionError, match=r"sigmoid.*test_convert_export\.py.*line \d+"):
        precsim.convert(model, example=x)


def test_an_exported_capture_runs_in_onnxruntime_code_for_code(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The unsqueeze inside the captured branch becomes indexing, which ONNX export knows."""
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(2)
    model = Branchy().eval()
    x = torch.randn(16, 8, 8)
    calibrated(model, precsim.integer_config(model, example_inputs=x), x, example=x)
    imodel = precsim.convert(model, example=x[:1])
    path = tmp_path / "branchy.onnx"
    precsim.export_onnx(imodel, str(path), x[:2])
    session = ort.InferenceSession(str(path))
    t = torch.randn(5, 8, 8)
    names = [o.name for o in session.get_outputs()]
    codes = session.run(None, {"input": t.numpy()})[names.index("output_codes")]
    assert torch.equal(torch.from_numpy(codes).long(), imodel.run_integer(imodel.quantize_input(t)).long())


def test_convert_refuses_a_simulation_whose_sums_it_cannot_reproduce() -> None:
    """The integer model sums exactly in int32: a rounded (float or narrow) accumulator, or an
    int32 one that overflowed, is refused naming the point; a quiet int32 one converts."""
    torch.manual_seed(3)
    x, base = torch.randn(16, 8), nn.Sequential(nn.Linear(8, 4)).eval()

    def prepared(accumulator: object) -> nn.Module:
        model = copy.deepcopy(base)
        cfg = {**precsim.integer_config(model), "accumulator": accumulator}
        return precsim.calibrate(model, [x], cfg)

    model = prepared("int32")
    imodel = precsim.convert(model)
    assert (imodel(x) - model(x)).abs().max() <= imodel.output_qp.scale + 1e-6
    for accumulator, why in (("fp16", "sums the integer model does not round"),
                             ({"format": "int16", "block": 4}, "sums the integer model does not round")):
        with pytest.raises(ConversionError, match=rf"'0.precsim_accumulator' simulates an accumulator .*{why}"):
            precsim.convert(prepared(accumulator))
    model.get_submodule("0.precsim_accumulator").overflows.fill_(3)
    with pytest.raises(ConversionError, match="3 overflow events"):
        precsim.convert(model)
