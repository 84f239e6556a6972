"""The module-level graph captured with torch.export equals torch.fx's on models fx can trace,
and captures models fx cannot (qat/module_graph.py)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import precsim
from precsim.qat.graph import trace
from precsim.zoo import get_model

from ._models import Branchy


def wiring(graph: fx.Graph) -> list[tuple[str, tuple[str, ...]]]:
    """Each module call with where its tensor arguments come from (a module, the input, a
    parameter), seen through the ops between modules."""
    def origin(arg: object) -> str:
        if not isinstance(arg, fx.Node):
            return repr(arg)
        if arg.op == "call_module":
            return str(arg.target)
        if arg.op == "placeholder":
            return "input"
        if arg.op == "get_attr":
            return f"attr {arg.target}"
        if arg.target == "size" or arg.target is getattr or any(a.target is getattr for a in arg.all_input_nodes):
            return "a size"  # (torch.fx reads it off the tensor at hand, torch.export off the first with it)
        sources = [origin(a) for a in arg.all_input_nodes]
        return "(" + ", ".join(sources) + ")"
    return [(str(n.target), tuple(origin(a) for a in n.args)) for n in graph.nodes if n.op == "call_module"]


@pytest.mark.parametrize("name", ["mlp", "resnet", "vit"])
def test_export_graph_equals_the_fx_graph_on_the_zoo(name: str) -> None:
    model = get_model(name)
    cfg = precsim.ivit_config(model) if name == "vit" else precsim.integer_config(model)
    precsim.prepare(model, cfg)
    exported = trace(model, torch.randn(1, 1, 28, 28))
    assert wiring(exported) == wiring(trace(model))
    out = next(n for n in exported.nodes if n.op == "output").args[0]
    assert out.op == "call_module"  # type: ignore[union-attr]


def test_a_model_fx_cannot_trace_is_captured_and_keeps_its_quantizer_state() -> None:
    torch.manual_seed(0)
    model = Branchy().eval()
    x = torch.randn(6, 8, 8)
    with pytest.raises(ValueError, match="torch.fx cannot trace it.*example inputs"):
        precsim.integer_config(model)
    cfg = precsim.integer_config(model, example_inputs=x)
    assert {"match": "conv", "input": "uint8"} in cfg["rules"]
    precsim.prepare(model, cfg, example_inputs=x)  # BN folding and int32 biases read the exported graph
    assert type(model.conv.parametrizations.weight[0]).__name__ == "FoldedWeight"
    precsim.calibrate(model, [x], None)
    state = copy.deepcopy(model.state_dict())
    graph = trace(model, x[:1])
    assert [n.target for n in graph.nodes if n.op == "call_module"] == [
        "conv", "bn", "relu", "conv2", "add", "relu2", "pool", "fc"]
    after = model.state_dict()
    assert all(torch.equal(state[k], after[k]) for k in state)  # quantizers bypassed: nothing observed or counted
    assert model.training is False


def test_capture_errors_name_the_cause() -> None:
    class ValueBranch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x) if x.sum() > 0 else self.fc(-x)  # data-dependent: no graph exists

    with pytest.raises(ValueError, match="torch.fx cannot trace it.*torch.export could not capture ValueBranch"):
        trace(ValueBranch(), torch.randn(2, 4))  # neither capture can: both reasons
    with pytest.raises(ValueError, match="example inputs do not fit"):
        trace(Branchy(), (torch.randn(2, 8, 8), torch.randn(2, 8, 8)))


def test_torch_fx_is_the_fallback_where_torch_export_fails() -> None:
    """A model torch.export cannot capture but torch.fx can trace (here: inputs that do not fit
    forward(), which fx does not need) still gives its graph."""
    graph = trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), (torch.randn(2, 4), torch.randn(2, 4)))
    assert [n.target for n in graph.nodes if n.op == "call_module"] == ["0", "1"]


def test_ops_between_modules_read_as_torch_fx_records_them() -> None:
    class Between(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(6, 6), nn.Linear(2, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.a(x)) * 0.5
            y = y.reshape(x.shape[0], 2, 3).transpose(1, 2)[:, 1:]
            return self.b(y.transpose(1, 2)[:, 0])

    graph = trace(Between(), torch.randn(4, 6))
    ops = [(n.op, n.target) for n in graph.nodes if n.op in ("call_function", "call_method")]
    assert ("call_function", F.relu) in ops and ("call_method", "reshape") in ops
    assert ("call_method", "transpose") in ops
    import operator
    assert ("call_function", operator.mul) in ops and ("call_function", operator.getitem) in ops
    reshape = next(n for n in graph.nodes if n.target == "reshape")
    assert reshape.args[1:] == (-1, 2, 3)  # the batch stays free


def test_capture_restores_each_module_s_own_mode() -> None:
    model = get_model("resnet").train()
    model.stem.bn.eval()  # a frozen BatchNorm in a model that trains
    trace(model, torch.randn(2, 1, 28, 28))
    assert model.training and model.get_submodule("layer1.0.bn1").training and not model.stem.bn.training
