"""``bias: int32``: the simulated conv/linear adds its bias as int32 codes at S_in * S_w (precsim.qat.bias)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import precsim
from precsim.integer.convert import convert
from precsim.integer.ops import ConvOp
from precsim.qat.bias import bias_setting, input_quantizer, layer_bias_codes, round_half_away
from precsim.qat.config import QuantConfig
from precsim.qat.graph import trace
from precsim.qat.quantizer import Quantizer


class Net(nn.Module):
    """conv (+ BatchNorm) -> ReLU -> flatten -> fc, on 2x6x6 inputs."""

    def __init__(self, bn: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, bias=True)
        self.bn = nn.BatchNorm2d(4) if bn else nn.Identity()
        self.relu = nn.ReLU()
        self.flat = nn.Flatten()
        self.fc = nn.Linear(64, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.relu(self.bn(self.conv(x)))))


def _config(**extra: object) -> dict:
    cfg = {"activation": "uint8", "weight": {"format": "int8", "granularity": "per_channel"}, "bias": "int32",
           "rules": [{"match": "conv", "input": "uint8"}]}
    cfg.update(extra)
    return cfg


def _batches(n: int = 3) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(16, 2, 6, 6, generator=g) for _ in range(n)]


def _net(bn: bool = False, seed: int = 0) -> Net:
    torch.manual_seed(seed)
    net = Net(bn)
    with torch.no_grad():  # biases of several input steps, so rounding them matters
        net.conv.bias.uniform_(-0.5, 0.5)
        net.fc.bias.uniform_(-0.5, 0.5)
        if bn:
            net.bn.running_mean.uniform_(-0.3, 0.3)
            net.bn.running_var.uniform_(0.5, 2.0)
            net.bn.weight.uniform_(0.5, 1.5)
            net.bn.bias.uniform_(-0.5, 0.5)
    return net


def _act_scale(q: Quantizer) -> torch.Tensor:
    obs = q.observer
    lo, hi = torch.clamp(obs.min_val, max=0.0), torch.clamp(obs.max_val, min=0.0)
    return (hi - lo) / 255  # uint8, affine


def _weight_scale(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1).abs().amax(1) / 127  # int8 symmetric, per output channel


# --------------------------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------------------------


def test_config_parses_bias() -> None:
    cfg = QuantConfig.from_dict({"bias": "int32", "rules": [{"type": "Linear", "bias": "fp32"}]})
    assert cfg.bias == "int32" and cfg.rules[0].bias == "fp32"
    assert QuantConfig.from_dict({}).bias == "fp32"
    net = Net()
    assert bias_setting("conv", net.conv, cfg) == "int32"
    assert bias_setting("fc", net.fc, cfg) == "fp32"  # the later rule wins


@pytest.mark.parametrize("raw, where", [
    ({"bias": "int8"}, ""),
    ({"bias": True}, ""),
    ({"bias": None}, ""),
    ({"rules": [{"match": "fc", "bias": "int16"}]}, " (in rule 0)"),
])
def test_bad_bias_values_name_the_allowed_ones(raw: dict, where: str) -> None:
    with pytest.raises(ValueError, match=r"bias .* not allowed; allowed: int32 .*fp32") as err:
        QuantConfig.from_dict(raw)
    assert where in str(err.value)


def test_a_bias_only_rule_adds_no_quantizers() -> None:
    class WithGelu(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 4)
            self.gelu = nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.gelu(self.fc(x))

    model = precsim.prepare(WithGelu(), {"activation": "uint8", "weight": "int8",
                                         "rules": [{"match": "*", "bias": "fp32"}]})
    assert not hasattr(model.gelu, "precsim_activation")


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def test_bias_is_rounded_at_input_times_weight_scale() -> None:
    """Against an independent reference: uint8 affine S_in from the observed range, int8 per-channel S_w."""
    net = precsim.calibrate(_net(), _batches(), _config())
    s_conv = (_act_scale(net.conv.precsim_input).double()
              * _weight_scale(net.conv.parametrizations.weight.original).double())
    s_fc = _act_scale(net.relu.precsim_activation).double() * _weight_scale(net.fc.parametrizations.weight.original)
    for layer, scale in ((net.conv, s_conv), (net.fc, s_fc.double())):
        b = layer.parametrizations.bias.original.double()
        codes = round_half_away(b / scale)
        assert (codes.abs() >= 1).any() and not torch.equal(codes * scale, b)  # rounding does something
        assert torch.equal(layer.bias, (codes * scale).float())
        assert torch.equal(layer_bias_codes(layer), codes.long())


def test_round_half_away_from_zero() -> None:
    assert round_half_away(torch.tensor([-2.5, -1.5, -0.5, 0.5, 1.5, 2.5, 0.49])).tolist() == [-3, -2, -1, 1, 2, 3, 0]


def test_input_quantizer_found_through_flatten_and_relu() -> None:
    net = precsim.prepare(_net(), _config(rules=[{"match": "conv", "input": "uint8"},
                                                 {"match": "relu", "activation": "fp32"}]))
    modules = dict(net.named_modules())
    nodes = {n.target: n for n in trace(net).nodes if n.op == "call_module"}
    assert input_quantizer(nodes["conv"], modules) is net.conv.precsim_input
    assert input_quantizer(nodes["fc"], modules) is net.conv.precsim_activation  # ReLU and Flatten keep codes


def test_fp32_bias_is_untouched() -> None:
    net = precsim.calibrate(_net(), _batches(), _config(bias="fp32"))
    assert not hasattr(net.conv, "parametrizations") or "bias" not in net.conv.parametrizations
    assert layer_bias_codes(net.conv) is None


def test_folded_bias_is_rounded_with_running_statistics_only() -> None:
    net = precsim.calibrate(_net(bn=True), _batches(), _config(fold_bn=True))
    bn = net.bn
    beta = bn.parametrizations.bias.original
    s = bn.weight * torch.rsqrt(bn.running_var + bn.eps)
    folded = beta + (net.conv.bias - bn.running_mean) * s  # b' = beta + (b - mean) s
    with torch.no_grad():
        scale = _act_scale(net.conv.precsim_input).double() * _weight_scale(
            net.conv.parametrizations.weight.original * s.reshape(-1, 1, 1, 1)).double()
        codes = round_half_away(folded.double() / scale)
        added = bn.bias + (net.conv.bias - bn.running_mean) * s  # what the BatchNorm adds now
    assert float((added.double() / scale - codes).abs().max()) < 1e-2  # on the grid, up to float32 rounding
    assert torch.equal(layer_bias_codes(net.conv), codes.long())
    bn.train()  # batch statistics: no folded bias exists, beta is left as it is
    assert torch.equal(bn.bias, beta)


@pytest.mark.parametrize("bn", [False, True])
def test_convert_uses_the_simulated_codes(bn: bool) -> None:
    cfg = _config(fold_bn=True) if bn else _config()
    net = precsim.calibrate(_net(bn), _batches(), cfg)
    imodel = convert(net)
    ops = {op.name: op for op in imodel.ops if isinstance(op, ConvOp)}
    for name in ("conv", "fc"):
        assert torch.equal(ops[name].bias.long(), layer_bias_codes(net.get_submodule(name)))


# --------------------------------------------------------------------------------------------
# Gradients and state
# --------------------------------------------------------------------------------------------


def test_gradient_passes_straight_through() -> None:
    net = precsim.calibrate(_net(), _batches(), _config(rules=[{"match": "conv", "input": "uint8"},
                                                              {"match": "fc", "activation": "fp32"}]))
    g = torch.randn(16, 3, generator=torch.Generator().manual_seed(1))
    (net(_batches(1)[0]) * g).sum().backward()
    grad = net.fc.parametrizations.bias.original.grad
    torch.testing.assert_close(grad, g.sum(0))  # d(sum g * (W x + b_q))/db = sum g: the rounding passes it as is


def test_folded_gradient_passes_straight_through() -> None:
    net = precsim.calibrate(_net(bn=True), _batches(), _config(fold_bn=True))
    seen: list[torch.Tensor] = []

    def keep_grad(module: nn.Module, args: object, out: torch.Tensor) -> None:
        out.register_hook(seen.append)

    net.bn.register_forward_hook(keep_grad)
    net(_batches(1)[0]).square().sum().backward()
    torch.testing.assert_close(net.bn.parametrizations.bias.original.grad, seen[0].sum((0, 2, 3)))


def test_state_dict_round_trip() -> None:
    a = precsim.calibrate(_net(bn=True), _batches(), _config(fold_bn=True))
    b = precsim.prepare(_net(bn=True, seed=1), _config(fold_bn=True))
    state = a.state_dict()
    assert "bn.parametrizations.bias.original" in state and "fc.parametrizations.bias.original" in state
    b.load_state_dict(state)
    b.eval()
    x = _batches(1)[0]
    with torch.no_grad():
        assert torch.equal(a(x), b(x))
        assert torch.equal(a.bn.bias, b.bn.bias)


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------


def test_unquantized_input_is_named() -> None:
    with pytest.raises(ValueError, match=r"bias: int32 for 'conv': its input is not integer-quantized"):
        precsim.prepare(_net(), _config(rules=[]))


def test_unquantized_weight_is_named() -> None:
    with pytest.raises(ValueError, match=r"bias: int32 for 'fc': its weights are not quantized"):
        precsim.prepare(_net(), _config(rules=[{"match": "conv", "input": "uint8"}, {"match": "fc", "weight": "fp32"}]))


def test_float_input_format_is_named() -> None:
    with pytest.raises(ValueError, match=r"bias: int32 for 'conv': its input is quantized to fp8_e4m3"):
        precsim.prepare(_net(), _config(rules=[{"match": "conv", "input": "fp8_e4m3"}]))


def test_a_rule_can_switch_a_layer_off() -> None:
    net = precsim.prepare(_net(), _config(rules=[{"match": "conv", "bias": "fp32"}]))  # conv has no input quantizer
    assert layer_bias_codes(net.conv) is None
    assert "bias" in net.fc.parametrizations


def test_a_checkpoint_without_int32_biases_loads() -> None:
    """A model trained with ``bias: fp32`` keeps ``bias`` in its state_dict; switching to int32 still loads it."""
    a = precsim.calibrate(_net(bn=True), _batches(), _config(fold_bn=True, bias="fp32"))
    b = precsim.prepare(_net(bn=True, seed=1), _config(fold_bn=True))
    b.load_state_dict(a.state_dict())
    assert torch.equal(b.bn.parametrizations.bias.original, a.bn.bias)
    assert torch.equal(b.fc.parametrizations.bias.original, a.fc.bias)


# --------------------------------------------------------------------------------------------
# Layout ops keep S_in: the zoo ViT
# --------------------------------------------------------------------------------------------


def test_vit_inputs_found_through_layout_ops() -> None:
    """attn.proj's input reaches it from matmul_av through transpose + flatten, head's from the LayerNorm
    through indexing: both keep codes and scale, so every ViT linear gets an int32 bias, and convert()
    adds exactly the simulated codes."""
    from precsim.zoo import get_model

    torch.manual_seed(0)
    vit = get_model("vit", patch_size=7, dim=16, depth=1, heads=2, mlp_ratio=2)
    cfg = precsim.ivit_config(vit)
    cfg["bias"] = "int32"
    g = torch.Generator().manual_seed(1)
    vit = precsim.calibrate(vit, [torch.rand(16, 1, 28, 28, generator=g) for _ in range(2)], cfg)
    modules = dict(vit.named_modules())
    nodes = {n.target: n for n in trace(vit).nodes if n.op == "call_module"}
    assert input_quantizer(nodes["blocks.0.attn.proj"], modules) is vit.blocks[0].attn.matmul_av.precsim_activation
    assert input_quantizer(nodes["head"], modules) is vit.norm.precsim_activation
    assert input_quantizer(nodes["blocks.0.attn.qkv"], modules) is vit.blocks[0].norm1.precsim_activation
    linears = [n for n, m in modules.items() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert len(linears) == 6 and all(layer_bias_codes(modules[n]) is not None for n in linears)
    imodel = convert(vit.eval())
    convs = [op for op in imodel.ops if isinstance(op, ConvOp)]
    assert sorted(op.name for op in convs) == sorted(linears)
    for op in convs:
        assert torch.equal(layer_bias_codes(modules[op.name]), op.bias.long()), op.name
    codes = imodel.quantize_input(torch.rand(4, 1, 28, 28, generator=g))
    assert torch.equal(imodel.run_integer(codes).long(), imodel.run_reference(codes))


class Scaled(nn.Module):
    """fc1 -> x * a, / b -> fc2: constant factors between fc1's output quantizer and fc2."""

    def __init__(self, times: float = 2.0, over: float = 4.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 4)
        self.fc2 = nn.Linear(4, 2)
        self.times, self.over = times, over
        with torch.no_grad():
            self.fc2.bias.uniform_(-0.5, 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.fc1(x).transpose(0, 1).transpose(0, 1) * self.times / self.over)


def test_constant_factors_scale_the_input_scale() -> None:
    """fc2's input codes are fc1's output codes at S * 3 / 4: its bias is rounded at that S_in
    times S_w (in the order the factors apply), and convert derives the same codes."""
    torch.manual_seed(0)
    cfg = {"activation": "uint8", "weight": "int8", "bias": "int32", "rules": [{"match": "fc1", "input": "uint8"}]}
    g = torch.Generator().manual_seed(1)
    net = precsim.calibrate(Scaled(3.0, 4.0), [torch.randn(16, 4, generator=g) for _ in range(3)], cfg)
    s_in = float(_act_scale(net.fc1.precsim_activation)) * 3.0 * 0.25
    s_w = net.fc2.parametrizations.weight.original.abs().amax() / 127
    want = round_half_away(net.fc2.parametrizations.bias.original.double() / (s_in * s_w.double()))
    assert torch.equal(layer_bias_codes(net.fc2), want.long())
    imodel = convert(net)
    ops = {op.name: op for op in imodel.ops if isinstance(op, ConvOp)}
    assert torch.equal(ops["fc2"].bias.long(), layer_bias_codes(net.fc2))
    assert "S_in*3*0.25*S_w" in repr(net.fc2)


def test_scale_changing_op_is_named() -> None:
    """A negative factor is not folded into the scale (convert refuses it too): no S_in for fc2."""
    cfg = {"activation": "uint8", "weight": "int8", "bias": "int32", "rules": [{"match": "fc1", "input": "uint8"}]}
    with pytest.raises(ValueError, match=r"bias: int32 for 'fc2': .*'mul' \(graph node 'mul'\), which makes new "
                                         r"values at another scale"):
        precsim.prepare(Scaled(times=-2.0), cfg)
