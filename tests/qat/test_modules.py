"""Proof 11: QuantPoint, the input role, rule-selected modules and MultiheadAttention."""

from __future__ import annotations

import torch
from torch import nn

import precsim
from precsim.qat.prepare import summary_rows

from ._models import (
    Capture,
    MHAModel,
    SmallCNN,
    TinyTransformer,
    assert_grad_representable,
    assert_representable,
    image_batches,
    make,
)


def _roles(model: nn.Module) -> set[tuple[str, str]]:
    return {(r["module"], r["role"]) for r in summary_rows(model)}


def test_default_placement_in_transformer() -> None:
    model = precsim.prepare(make(TinyTransformer), {"activation": "int8", "weight": "int8"})
    roles = _roles(model)
    assert ("res1", "activation") in roles and ("res2", "activation") in roles  # QuantPoint
    assert ("qkv", "weight") in roles and ("head", "activation") in roles
    for name in ("embed", "ln1", "ln2", "gelu", "softmax"):  # not quantized unless a rule asks
        assert not any(module == name for module, _ in roles), name


def test_rules_select_embedding_layernorm_gelu_softmax() -> None:
    cfg = {
        "weight": "int8",
        "rules": [
            {"type": "Embedding", "activation": "bf16"},
            {"type": ["LayerNorm", "GELU"], "activation": "fp8_e4m3", "gradient": "bf16"},
            {"match": "softmax", "activation": "uint8"},
        ],
    }
    model = precsim.prepare(make(TinyTransformer), cfg)
    table = {(r["module"], r["role"]): r["format"] for r in summary_rows(model)}
    assert table[("embed", "activation")] == "bf16"
    assert table[("embed", "weight")] == "int8"  # a selected module's weights take the global weight role
    assert table[("ln1", "activation")] == table[("ln2", "activation")] == "fp8_e4m3"
    assert table[("ln1", "weight")] == "int8"
    assert table[("gelu", "activation")] == "fp8_e4m3"
    assert table[("softmax", "activation")] == "uint8"
    assert ("res1", "activation") not in table  # no global activation format
    cap = Capture(model)
    tokens = torch.randint(0, 20, (3, 5), generator=torch.Generator().manual_seed(0))
    model(tokens).sum().backward()
    for name, (q, y) in cap.out.items():
        if q.spec is not None:
            assert_representable(q, y, name)
    for name, (q, g) in cap.grad.items():
        if q.grad_spec is not None:
            assert_grad_representable(q, g, name)
    assert {"ln1.precsim_activation", "gelu.precsim_activation"} <= set(cap.grad)


def test_input_role_quantizes_module_inputs() -> None:
    model = make(TinyTransformer)
    precsim.prepare(model, {"input": "fp8_e4m3", "rules": [{"match": "head", "input": "int8"}]})
    seen = {}
    for name in ("qkv", "head", "fc2"):
        model.get_submodule(name).register_forward_pre_hook(
            lambda m, args, name=name: seen.__setitem__(name, args[0].detach().clone()))
    model(torch.randint(0, 20, (2, 4)))
    assert torch.equal(precsim.quantize(seen["qkv"], "fp8_e4m3"), seen["qkv"])
    assert torch.equal(precsim.quantize(seen["fc2"], "fp8_e4m3"), seen["fc2"])
    q = model.head.precsim_input
    assert_representable(q, seen["head"], "head input")
    assert q.role == "input" and ("head", "input") in _roles(model)


def test_quantpoint_marks_a_tensor() -> None:
    point = precsim.QuantPoint()
    x = torch.randn(10)
    assert torch.equal(point(x), x)
    seq = precsim.prepare(nn.Sequential(precsim.QuantPoint()), {"activation": "fp4_e2m1", "gradient": "bf16"})
    x = torch.linspace(-5, 5, 41, requires_grad=True)
    y = seq(x)
    assert torch.equal(y, precsim.quantize(x.detach(), "fp4_e2m1"))
    (y * torch.linspace(0, 1, 41) / 3).sum().backward()
    assert torch.equal(x.grad, precsim.quantize(torch.linspace(0, 1, 41) / 3, "bf16"))


def test_multihead_attention_selected_by_type() -> None:
    cfg = {"activation": "int8", "weight": "int8", "gradient": "bf16",
           "rules": [{"type": "MultiheadAttention"}]}
    model = precsim.prepare(make(MHAModel), cfg)
    roles = _roles(model)
    assert ("attn", "activation") in roles and ("attn", "in_proj_weight") in roles
    attn = model.attn
    wq = attn.parametrizations.in_proj_weight[0]
    assert wq.spec is not None and wq.spec.format.name == "int8"
    x = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0))
    outs = {}
    attn.register_forward_hook(lambda m, a, o: outs.__setitem__("attn", o))
    cap = Capture(model)
    model.train()
    model(x).sum().backward()
    out, weights = outs["attn"]
    assert weights is not None  # the tuple's other elements pass through
    q = attn.precsim_activation
    assert_representable(q, out.detach(), "attn output")
    assert_representable(wq, cap.out["attn.parametrizations.in_proj_weight.0"][1], "in_proj_weight")
    assert_grad_representable(q, cap.grad["attn.precsim_activation"][1], "attn gradient")
    assert attn.parametrizations.in_proj_weight.original.grad is not None
    model.eval()
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)


def test_multihead_attention_without_rule_keeps_fp32_attention() -> None:
    model = precsim.prepare(make(MHAModel), {"activation": "int8", "weight": "int8"})
    roles = _roles(model)
    assert ("attn", "activation") not in roles and ("attn", "in_proj_weight") not in roles
    assert ("attn.out_proj", "weight") in roles  # out_proj is an nn.Linear


def test_integer_inputs_and_outputs_are_never_rounded() -> None:
    """An Embedding's token ids pass the input role untouched (int8 would merge ids 1 and 2)."""
    model = make(nn.Embedding, 300, 4)
    precsim.prepare(model, {"input": "int8", "activation": "bf16", "rules": [{"type": "Embedding"}]})
    ids = torch.tensor([[1, 2, 3, 250]])
    out = model(ids)
    assert torch.equal(out, precsim.quantize(model.weight.detach()[ids], "bf16"))


def test_rule_type_matches_subclasses() -> None:
    """MultiheadAttention's out_proj is a Linear subclass: a Linear rule reaches it."""
    model = precsim.prepare(make(MHAModel), {"weight": "int8", "rules": [{"type": "Linear", "weight": "int4"}]})
    table = {(r["module"], r["role"]): r["format"] for r in summary_rows(model)}
    assert table[("attn.out_proj", "weight")] == "int4"
    assert table[("inp", "weight")] == "int4"
    assert ("attn", "in_proj_weight") not in table  # MHA itself is no Linear


def test_gradient_only_point_before_inplace_relu() -> None:
    """A point with an fp32 forward returns a fresh tensor, so ReLU(inplace=True) may modify it."""
    plain = make(SmallCNN, inplace=True)
    model = precsim.prepare(make(SmallCNN, inplace=True), {"gradient": "bf16"})
    x, y = image_batches(1)[0]
    out = model(x)
    assert torch.equal(out, plain(x))  # the forward pass is untouched
    nn.functional.cross_entropy(out, y).backward()
    assert all(p.grad is not None for p in model.parameters())
