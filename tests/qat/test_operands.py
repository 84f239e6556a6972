"""points: operands -- every floating operand of every GEMM a model runs, in unmodified models."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import precsim
from precsim.qat.operands import einsum_axes

MX = "mxfp8_e4m3"


class Functional(nn.Module):
    """Written with functional ops only: no precsim markers, nothing to edit."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.w = nn.Parameter(torch.randn(64, 32) / 8)
        self.proj = nn.Linear(64, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x @ self.w.t()                                     # matmul: activation @ weight view
        h = self.proj(h)                                       # linear
        q = k = v = h.view(2, 8, 2, 32).transpose(1, 2)        # (B, heads, T, d)
        a = F.scaled_dot_product_attention(q, k, v)            # attention: q k^T and P v
        s = torch.einsum("bhtd,bhsd->bhts", q, k)              # einsum
        t = torch.bmm(h, h.transpose(1, 2))                    # bmm
        return a.sum(-1).sum(-1) + s.mean((-1, -2, -3)) + t.mean((-1, -2))


def _points(model: nn.Module) -> set[tuple[str, str, str, str]]:
    return {(r["module"], r["op"], r["operand"], r["role"]) for r in precsim.summary_rows(model)}


def test_a_functional_model_gets_every_operand_point_with_no_edits() -> None:
    model = precsim.prepare(Functional(), {"points": "operands", "activation": "int8", "weight": "int8"})
    assert "first forward pass" in precsim.summary(model)
    model(torch.randn(2, 8, 32))
    assert _points(model) == {
        ("(model)", "matmul", "a", "activation"), ("(model)", "matmul", "b", "weight"),
        ("proj", "linear", "input", "activation"), ("proj", "linear", "weight", "weight"),
        *{("(model)", "attention", o, "activation") for o in "qkpv"},
        ("(model)", "einsum", "op0", "activation"), ("(model)", "einsum", "op1", "activation"),
    } | {("(model)", "matmul", o, "activation") for o in "ab"}
    calls = {(r["op"], r["call"]) for r in precsim.summary_rows(model) if r["op"] == "matmul"}
    assert calls == {("matmul", "0"), ("matmul", "1")}  # x @ w.t() and the bmm: two calls, two points each


def test_outputs_placement_is_unchanged_by_default() -> None:
    model = precsim.prepare(Functional(), {"activation": "int8"})
    assert {(r["module"], r["op"]) for r in precsim.summary_rows(model)} == {("proj", "output")}


def _eval_point_formats(model: nn.Module) -> dict[tuple[str, str, str], str]:
    return {(r["module"], r["op"], r["operand"]): r["format"] for r in precsim.summary_rows(model)}


def test_a_gemm_output_is_the_gemm_of_independently_quantized_operands() -> None:
    """Bit for bit, in eval(): precsim.quantize with the documented (reduction) axis."""
    torch.manual_seed(1)
    lin = nn.Linear(64, 48)
    conv = nn.Conv2d(64, 16, 3, padding=1)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.conv = lin, conv

        def forward(self, x, y, b):  # noqa: ANN001, ANN201
            return self.lin(x), self.conv(y), x @ b

    model = precsim.prepare(Net(), {"points": "operands", "activation": MX, "weight": MX}).eval()
    x, y, b = torch.randn(4, 7, 64) * 3, torch.randn(2, 64, 5, 5), torch.randn(64, 40)
    with torch.no_grad():
        out_lin, out_conv, out_mm = model(x, y, b)

    def q(t: torch.Tensor, axis: int) -> torch.Tensor:
        return precsim.quantize(t, f"{MX}(axis={axis})")

    assert torch.equal(out_lin, F.linear(q(x, 2), q(lin.weight, 1), lin.bias))
    assert torch.equal(out_conv, F.conv2d(q(y, 1), q(conv.weight, 1), conv.bias, padding=1))
    assert torch.equal(out_mm, q(x, 2) @ q(b, 0))  # b's K is its axis -2
    # the axes differ from the format's own: the test would fail on last-axis blocks
    assert not torch.equal(q(b, 0), precsim.quantize(b, MX))


def test_attention_is_its_two_gemms_with_quantized_operands() -> None:
    class Attn(nn.Module):
        def forward(self, q, k, v, mask):  # noqa: ANN001, ANN201
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    torch.manual_seed(2)
    q, k, v = (torch.randn(2, 3, 40, 32) for _ in range(3))
    mask = torch.rand(40, 40) > 0.2
    mask.fill_diagonal_(True)
    model = precsim.prepare(Attn(), {"points": "operands", "activation": MX}).eval()
    with torch.no_grad():
        out = model(q, k, v, mask)
        # with no format the decomposition is SDPA's math
        plain = precsim.prepare(Attn(), {"points": "operands", "activation": "fp32"})
        torch.testing.assert_close(plain(q, k, v, mask), F.scaled_dot_product_attention(q, k, v, attn_mask=mask))

    def qz(t: torch.Tensor, axis: int) -> torch.Tensor:
        return precsim.quantize(t, f"{MX}(axis={axis})")

    scores = (qz(q, 3) @ qz(k, 3).transpose(-2, -1)) / math.sqrt(32)
    p = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    assert torch.equal(out, qz(p, 3) @ qz(v, 2))  # P along keys (its last axis), v along its axis -2
    formats = {(r["operand"], r["format"]) for r in precsim.summary_rows(model)}
    assert formats == {(o, MX) for o in "qkpv"}


@pytest.mark.parametrize(("block_axis", "expected"), [
    ("reduction", {("lin", "linear", "input"): 2, ("lin", "linear", "weight"): 1, ("conv", "conv", "input"): 1,
                   ("conv", "conv", "weight"): 1, ("(model)", "matmul", "a"): 2, ("(model)", "matmul", "b"): 1,
                   ("(model)", "attention", "q"): 3, ("(model)", "attention", "k"): 3,
                   ("(model)", "attention", "p"): 3, ("(model)", "attention", "v"): 2}),
    ("last", {}),  # the format's own rule, as for module outputs
])
def test_block_formats_group_each_operand_along_its_reduction_axis(block_axis: str, expected: dict) -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin, self.conv = nn.Linear(32, 32), nn.Conv2d(32, 8, 1)

        def forward(self, x, y):  # noqa: ANN001, ANN201
            h = self.lin(x)
            t = h.view(2, 4, 8, 32)
            return F.scaled_dot_product_attention(t, t, t), self.conv(y), h @ h.transpose(1, 2)

    model = precsim.prepare(Net(), {"points": "operands", "activation": MX, "weight": MX, "block_axis": block_axis})
    model(torch.randn(2, 32, 32), torch.randn(1, 32, 4, 4))
    axes = {(m, op, o): q.spec.format.axis for (m, op, o), q in _quantizers(model).items()}
    assert axes == (expected or dict.fromkeys(axes))


def _quantizers(model: nn.Module) -> dict[tuple[str, str, str], precsim.qat.quantizer.Quantizer]:
    rows = precsim.summary_rows(model)
    qs = [q for _, q in precsim.quantizers(model)]
    return {(r["module"], r["op"], r["operand"]): q for r, q in zip(rows, qs, strict=True)}


def test_einsum_reduction_axes() -> None:
    assert einsum_axes("bhtd,bhsd->bhts") == [3, 3]
    assert einsum_axes("ij,jk") == [1, 0]            # implicit output "ik"
    assert einsum_axes("...ij,...jk->...ik") == [-1, -2]
    assert einsum_axes("i,j->ij") == [None, None]    # an outer product sums nothing


def test_rules_select_points_by_op_module_and_type() -> None:
    cfg = {"points": "operands", "activation": MX, "weight": "int8",
           "rules": [{"op": "matmul", "activation": "bf16"},
                     {"op": "attention", "activation": "fp8_e4m3"},
                     {"type": "Linear", "weight": "int4"},
                     {"op": "softmax", "activation": "int8"},
                     {"op": ["gelu", "layer_norm", "add"], "activation": "int4"},
                     {"match": "skip", "activation": "fp32", "weight": "fp32"},
                     {"match": "norm", "activation": "bf16"}]}  # changes the op points it selects

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj, self.skip, self.norm = nn.Linear(16, 16), nn.Linear(16, 16), nn.LayerNorm(16)

        def forward(self, x):  # noqa: ANN001, ANN201
            h = self.proj(x)
            h = F.layer_norm(F.gelu(h) + x, (16,)) + 1.0  # the scalar add is no residual: no point
            h = self.norm(h)
            t = h.view(2, 1, 4, 16)
            return torch.softmax(h @ h.transpose(1, 2), -1), F.scaled_dot_product_attention(t, t, t), self.skip(x)

    model = precsim.prepare(Net(), cfg)
    model(torch.randn(2, 4, 16))
    formats = _eval_point_formats(model)
    assert formats[("proj", "linear", "input")] == MX and formats[("proj", "linear", "weight")] == "int4"
    assert formats[("(model)", "matmul", "a")] == formats[("(model)", "matmul", "b")] == "bf16"
    assert {formats[("(model)", "attention", o)] for o in "qkpv"} == {"fp8_e4m3"}
    assert formats[("(model)", "softmax", "output")] == "int8"  # a non-GEMM op, named by a rule
    assert {formats[("(model)", op, "output")] for op in ("gelu", "layer_norm", "add")} == {"int4"}
    assert sum(r["op"] == "add" for r in precsim.summary_rows(model)) == 1
    assert formats[("norm", "layer_norm", "output")] == "bf16"
    assert not any(m == "skip" for m, _, _ in formats)


@pytest.mark.parametrize(("config", "message"), [
    ({"points": "gemms"}, "points 'gemms' not allowed; allowed: outputs, operands"),
    ({"points": "operands", "rules": [{"op": "conv2d", "activation": "int8"}]},
     "op 'conv2d' (in rule 0) not allowed; allowed: linear, conv, matmul, einsum, attention, softmax"),
    ({"rules": [{"op": "matmul", "activation": "int8"}]}, "it needs points: operands"),
    ({"points": "operands", "block_axis": "first"}, "block_axis 'first' not allowed; allowed: reduction, last"),
    ({"points": "operands", "input": "int8"}, "role 'input' is for points: outputs"),
    ({"points": "operands", "fold_bn": True}, "fold_bn and bias: int32 need points: outputs"),
])
def test_a_bad_points_or_op_value_names_the_allowed_ones(config: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        precsim.prepare(Functional(), config)


def test_gradients_are_rounded_at_operand_points() -> None:
    """dL/dx is the gradient format's rounding of the GEMM's gradient w.r.t. Q(x), and the weight
    gradient the weight_gradient format's rounding of dL/dQ(w)."""
    torch.manual_seed(3)
    lin = nn.Linear(32, 24)
    model = precsim.prepare(lin, {"points": "operands", "activation": "bf16", "weight": "bf16",
                                  "gradient": "fp8_e5m2", "weight_gradient": "fp8_e4m3"})
    x = torch.randn(8, 32, requires_grad=True)
    dy = torch.randn(8, 24)
    model(x).backward(dy)
    xq, wq = precsim.quantize(x.detach(), "bf16"), precsim.quantize(lin.weight.detach(), "bf16")
    assert torch.equal(x.grad, precsim.quantize(dy @ wq, "fp8_e5m2"))
    assert torch.equal(lin.weight.grad, precsim.quantize(dy.t() @ xq, "fp8_e4m3"))
    assert torch.equal(lin.bias.grad, dy.sum(0))  # the bias is no GEMM operand


def _trained(cfg: dict, steps: int = 3) -> nn.Module:
    model = precsim.prepare(Functional(), cfg, seed=5)
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    torch.manual_seed(6)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(2, 8, 32)).sum().backward()
        opt.step()
    return model


CFG = {"points": "operands", "activation": {"format": "int8", "observer": "moving_average"},
       "weight": {"format": "int8", "granularity": "per_channel"},
       "gradient": {"format": "fp8_e5m2", "rounding": "stochastic"}}


def test_state_dict_round_trip_restores_every_operand_point_before_any_forward_pass() -> None:
    trained = _trained(CFG)
    state = trained.state_dict()
    assert any(".precsim_operands." in k and k.endswith("min_val") for k in state)
    fresh = precsim.prepare(Functional(), CFG, seed=5)  # no forward pass yet: no points
    fresh.load_state_dict(state)  # strict: the points are created from the state_dict
    assert _points(fresh) == _points(trained)
    x = torch.randn(2, 8, 32)
    for mode in ("eval", "train"):  # train: the stochastic streams continue alike
        getattr(trained, mode)(), getattr(fresh, mode)()
        assert torch.equal(trained(x), fresh(x))
    other = precsim.prepare(Functional(), {**CFG, "weight": "int4"})
    with pytest.raises(RuntimeError, match="prepared with another config"):
        other.load_state_dict(state)


def test_a_deep_copy_of_a_prepared_model_keeps_its_points_and_names() -> None:
    import copy

    model = _trained(CFG, steps=1)
    twin = copy.deepcopy(model)
    assert _points(twin) == _points(model)
    x = torch.randn(2, 8, 32)
    model.eval(), twin.eval()
    assert torch.equal(twin(x), model(x))
    fresh = copy.deepcopy(precsim.prepare(Functional(), CFG))  # copied before any point exists
    fresh(x)
    assert _points(fresh) == _points(model)


def test_example_inputs_and_calibrate_create_points_without_changing_state() -> None:
    model = precsim.prepare(Functional(), CFG, example_inputs=torch.randn(2, 8, 32))
    assert len(precsim.quantizers(model)) == 12
    assert all(not bool(q.observer.initialized) for _, q in precsim.quantizers(model) if q.observer is not None)
    assert all(int(q.step) == 0 for _, q in precsim.quantizers(model))
    calibrated = precsim.calibrate(Functional(), [{"x": torch.randn(2, 8, 32)} for _ in range(3)], CFG)
    acts = [q for _, q in precsim.quantizers(calibrated) if q.role == "activation"]
    assert acts and all(bool(q.observer.initialized) for q in acts)


def test_a_module_error_leaves_no_mode_behind() -> None:
    class Boom(nn.Module):
        def forward(self, x):  # noqa: ANN001, ANN201
            raise RuntimeError("boom")

    model = precsim.prepare(nn.Sequential(nn.Linear(4, 4), Boom()), {"points": "operands", "activation": "int8"})
    with pytest.raises(RuntimeError, match="boom"):
        model(torch.randn(2, 4))
    assert not torch.overrides._is_torch_function_mode_enabled()
    assert model.precsim_mode.stack == []
    x = torch.randn(3, 3)
    assert torch.equal(x @ x, torch.matmul(x, x))  # outside the model nothing is rounded
    assert len(precsim.quantizers(model)) == 1  # only the Linear's input ran, no point outside


def test_ddp_with_operand_points_matches_plain() -> None:
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        x0 = torch.randn(2, 8, 32)
        plain = precsim.prepare(Functional(), CFG, seed=0, example_inputs=x0)
        wrapped = nn.parallel.DistributedDataParallel(precsim.prepare(Functional(), CFG, seed=0, example_inputs=x0))
        assert {n for n, _ in wrapped.module.named_buffers()} == {n for n, _ in plain.named_buffers()}
        for _ in range(2):
            x = torch.randn(2, 8, 32)
            for m in (plain, wrapped):
                m.zero_grad()
                m(x).sum().backward()
            for p, q in zip(plain.parameters(), wrapped.module.parameters(), strict=True):
                assert torch.equal(p.grad, q.grad)
    finally:
        dist.destroy_process_group()
