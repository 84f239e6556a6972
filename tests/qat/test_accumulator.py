"""Accumulators in prepared models: config keys, points: outputs and operands, integer codes,
gradients, errors, checkpoints (the arithmetic itself: tests/runtime/test_accumulate.py)."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import precsim
from precsim.qat.accumulator import overflows
from precsim.qat.config import QuantConfig
from precsim.runtime.accumulate import conv_float
from runtime.test_accumulate import columns3d


def exact_values(shape: tuple[int, ...], seed: int, ints: int = 7, spread: int = 2) -> torch.Tensor:
    """Small integers times powers of two: every in-block float32 sum is exact."""
    g = torch.Generator().manual_seed(seed)
    mant = torch.randint(-ints, ints + 1, shape, generator=g).float()
    return mant * 2.0 ** torch.randint(-spread, spread + 1, shape, generator=g).float()


def reference(a: torch.Tensor, b: torch.Tensor, fmt: str, block: int, init: torch.Tensor | None = None) -> torch.Tensor:
    """for each block of K: acc = R(acc + block sum), in float64 rounded by precsim.quantize."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    shape = (a64.shape[0], b64.shape[1])
    acc = np.zeros(shape) if init is None else precsim.quantize(
        torch.broadcast_to(init.double(), shape).contiguous(), fmt).double().numpy()
    for j in range(math.ceil(a64.shape[1] / block)):
        s = a64[:, j * block:(j + 1) * block] @ b64[j * block:(j + 1) * block]
        acc = precsim.quantize(torch.from_numpy(acc + s), fmt).double().numpy()
    return torch.from_numpy(acc.astype(np.float32))


def linear(k: int = 40, n: int = 6, bias: bool = True) -> nn.Linear:
    m = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        m.weight.copy_(exact_values((n, k), 1))
        if bias:
            m.bias.copy_(exact_values((n,), 2) * 16)
    return m


@pytest.mark.parametrize("points", ["outputs", "operands"])
def test_linear_equals_reference(points: str) -> None:
    m, x = linear(), exact_values((5, 40), 3)
    p = precsim.prepare(copy.deepcopy(m), {"points": points, "accumulator": {"format": "fp8_e5m2", "block": 6}})
    want = reference(x, m.weight.detach().t(), "fp8_e5m2", 6) + m.bias.detach()
    assert torch.equal(p(x), want)
    assert not torch.equal(want, m(x))  # the accumulator changed the result
    before = precsim.prepare(copy.deepcopy(m), {"points": points,
                                                "accumulator": {"format": "fp8_e5m2", "block": 6, "bias": "before"}})
    assert torch.equal(before(x), reference(x, m.weight.detach().t(), "fp8_e5m2", 6, init=m.bias.detach()))


def test_batched_input_through_linear() -> None:
    m, x = linear(), exact_values((2, 3, 40), 4)
    p = precsim.prepare(copy.deepcopy(m), {"accumulator": {"format": "bf16", "block": 8}})
    want = reference(x.reshape(6, 40), m.weight.detach().t(), "bf16", 8).view(2, 3, 6) + m.bias.detach()
    assert torch.equal(p(x), want)


class ConvNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.fc = nn.Linear(4 * 25, 3)
        with torch.no_grad():
            self.conv.weight.copy_(exact_values(tuple(self.conv.weight.shape), 5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.conv(x).flatten(1))


def test_conv_rule_by_type() -> None:
    net, x = ConvNet(), exact_values((2, 3, 5, 5), 6)
    p = precsim.prepare(copy.deepcopy(net), {"rules": [{"type": "Conv2d", "accumulator": {"format": "fp8_e5m2",
                                                                                          "block": 4}}]})
    assert [r["module"] for r in precsim.summary_rows(p)] == ["conv"]  # fc keeps float32 sums
    cols = F.unfold(x, 3, padding=1).transpose(1, 2).reshape(-1, 27)  # K in the order of weight.flatten(1)
    conv = reference(cols, net.conv.weight.detach().flatten(1).t(), "fp8_e5m2", 4)
    conv = conv.view(2, 25, 4).transpose(1, 2).reshape(2, 4, 5, 5)
    assert torch.equal(p.conv(x), conv)
    assert torch.allclose(p(x), net.fc(conv.flatten(1)))


class MatmulNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(exact_values((24, 5), 7))
        self.fc = linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x @ self.w)


def test_rule_with_op_matmul_under_points_operands() -> None:
    net, x = MatmulNet(), exact_values((4, 24), 8)
    cfg = {"points": "operands", "rules": [{"op": "matmul", "accumulator": {"format": "flexfp(e=5,m=3)", "block": 4}}]}
    p = precsim.prepare(copy.deepcopy(net), cfg)
    h = reference(x, net.w.detach(), "flexfp(e=5,m=3)", 4)
    assert torch.equal(p(x), net.fc(h))
    ops = {(r["op"], r["role"]) for r in precsim.summary_rows(p)}
    assert ops == {("matmul", "accumulator")}


def test_fp32_accumulator_is_the_plain_gemm() -> None:
    net, x = ConvNet(), exact_values((2, 3, 5, 5), 9)
    for cfg in ({"accumulator": "fp32"}, {"accumulator": {"format": "fp32", "block": 4}}, {}):
        p = precsim.prepare(copy.deepcopy(net), cfg)
        assert precsim.summary(p) == "(no quantizers)"
        assert torch.equal(p(x), net(x))


def test_integer_accumulator_on_codes_with_overflow_counts() -> None:
    """int8 input and weight (scales 2^-3 and 2^-4 by construction): the int16 accumulator sums
    their codes, wraps or saturates, and counts the adds that left the range."""
    k, n = 64, 4
    m = nn.Linear(k, n, bias=False)
    g = torch.Generator().manual_seed(10)
    codes_w = torch.randint(-127, 128, (n, k), generator=g).float()
    codes_w[:, 0] = 127
    codes_x = torch.randint(-127, 128, (3, k), generator=g).float()
    codes_x[:, 0] = 127
    with torch.no_grad():
        m.weight.copy_(codes_w / 16)
    x = codes_x / 8
    want_exact = (codes_x.double() @ codes_w.double().t()).float() / 128
    for overflow in ("wrap", "saturate"):
        cfg = {"input": {"format": "int8", "observer": "minmax"}, "weight": "int8",
               "accumulator": {"format": "int16", "block": 4, "overflow": overflow}}
        p = precsim.prepare(copy.deepcopy(m), cfg)
        got = p(x)
        acc = np.zeros((3, n), np.int64)
        events = 0
        for j in range(0, k, 4):
            s = acc + (codes_x[:, j:j + 4].double() @ codes_w[:, j:j + 4].double().t()).long().numpy()
            events += int(((s < -2**15) | (s > 2**15 - 1)).sum())
            acc = np.clip(s, -2**15, 2**15 - 1) if overflow == "saturate" else (s + 2**15) % 2**16 - 2**15
        assert torch.equal(got, torch.from_numpy(acc).float() / 128)
        assert events > 0 and overflows(p) == {"precsim_accumulator": events}
        assert f"{overflow}, {events} overflows" in precsim.summary(p)
        assert not torch.equal(got, want_exact)
    wide = precsim.prepare(copy.deepcopy(m), {**cfg, "accumulator": "int32"})
    assert torch.equal(wide(x), want_exact) and overflows(wide) == {"precsim_accumulator": 0}


def test_integer_accumulator_needs_integer_operands() -> None:
    p = precsim.prepare(linear(), {"weight": "int8", "accumulator": "int16"})
    with pytest.raises(ValueError, match="operand 'input' is not rounded by an integer point.*'input' role"):
        p(torch.randn(2, 40))


def test_straight_through_gradients_are_the_plain_gemms() -> None:
    m, x = linear(), exact_values((5, 40), 11)
    p = precsim.prepare(copy.deepcopy(m), {"accumulator": {"format": "fp8_e5m2", "block": 4}})
    g = exact_values((5, 6), 12)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    (p(xa) * g).sum().backward()
    (m(xb) * g).sum().backward()
    assert torch.equal(xa.grad, xb.grad)
    assert torch.equal(p.weight.grad, m.weight.grad) and torch.equal(p.bias.grad, m.bias.grad)


def test_gradient_accumulator_runs_the_backward_gemms() -> None:
    m, x = linear(), exact_values((5, 40), 13)
    cfg = {"accumulator": {"format": "fp16"}, "gradient_accumulator": {"format": "fp8_e5m2", "block": 2}}
    p = precsim.prepare(copy.deepcopy(m), cfg)
    g = exact_values((5, 6), 14)
    xa = x.clone().requires_grad_()
    (p(xa) * g).sum().backward()
    assert torch.equal(xa.grad, reference(g, m.weight.detach(), "fp8_e5m2", 2))  # g W: K = out_features
    assert torch.equal(p.weight.grad, reference(g.t(), x, "fp8_e5m2", 2))  # (x^T g)^T = g^T x: K = rows
    assert not torch.equal(xa.grad, g @ m.weight.detach())


def test_stochastic_rounding_in_train_nearest_in_eval() -> None:
    m, x = linear(), torch.randn(8, 40)
    cfg = {"accumulator": {"format": "flexfp(e=5,m=3)", "block": 4, "rounding": "stochastic"}}
    p = precsim.prepare(copy.deepcopy(m), cfg, seed=1)
    first, second = p(x), p(x)
    assert not torch.equal(first, second)  # the step advances the seed
    again = precsim.prepare(copy.deepcopy(m), cfg, seed=1)
    assert torch.equal(again(x), first)  # reproducible
    p.eval()
    near = precsim.prepare(copy.deepcopy(m), {"accumulator": {"format": "flexfp(e=5,m=3)", "block": 4}}).eval()
    assert torch.equal(p(x), near(x))


@pytest.mark.parametrize("points", ["outputs", "operands"])
def test_state_dict_round_trip(points: str) -> None:
    net, x = ConvNet(), torch.randn(2, 3, 5, 5)
    cfg = {"points": points, "activation": "int8", "weight": "int8", **({"input": "int8"} if points == "outputs" else {}),
           "accumulator": {"format": "int16", "block": 2, "overflow": "saturate"}}
    p = precsim.prepare(copy.deepcopy(net), cfg)
    out = p(x * 50)
    state = p.state_dict()
    assert any(k.endswith("overflows") for k in state)
    q = precsim.prepare(copy.deepcopy(net), cfg)
    q.load_state_dict(state)  # points: operands: before q ever ran
    assert overflows(q) == overflows(p)
    q.eval(), p.eval()
    assert torch.equal(q(x), p(x))
    assert out.shape == (2, 3)
    other = precsim.prepare(copy.deepcopy(net), {**cfg, "accumulator": "int24"})
    other(x)
    with pytest.raises(RuntimeError, match="int24"):
        other.load_state_dict(state)


def test_resnet_from_the_zoo_trains_with_accumulators() -> None:
    from precsim.zoo import get_model

    model = get_model("resnet")
    p = precsim.prepare(model, {"accumulator": {"format": "fp16", "block": 32, "promote": 128}})
    x, y = torch.randn(2, 1, 28, 28), torch.tensor([1, 2])
    F.cross_entropy(p(x), y).backward()
    rows = precsim.summary_rows(p)
    assert len(rows) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in model.modules())
    assert all(prm.grad is not None for prm in p.parameters())


BAD = [
    ({"accumulator": {"format": "mxfp8_e4m3"}}, ["'mxfp8_e4m3'", "allowed: a scalar float format"]),
    ({"accumulator": {"format": "int8(axis=0)"}}, ["'int8(axis=0)'", "allowed: a scalar float format"]),
    ({"accumulator": {"format": "fp16", "block": 0}}, ["block 0", "allowed: an integer >= 1"]),
    ({"accumulator": {"format": "fp16", "block": 32, "promote": 48}}, ["promote 48", "multiple of block (32)"]),
    ({"accumulator": {"format": "int4"}}, ["width 4", "allowed: 8..64"]),
    ({"accumulator": {"format": "int72"}}, ["width 72", "allowed: 8..64"]),
    ({"accumulator": {"format": "int16", "overflow": "clip"}}, ["overflow 'clip'", "allowed: wrap, saturate"]),
    ({"accumulator": {"format": "fp16", "overflow": "wrap"}}, ["overflow is for integer accumulators"]),
    ({"accumulator": {"format": "int16", "rounding": "stochastic"}}, ["rounding is for float accumulators"]),
    ({"accumulator": {"format": "fp16", "rounding": "up"}}, ["rounding 'up'", "allowed: nearest, stochastic"]),
    ({"accumulator": {"format": "fp16", "bias": "first"}}, ["bias 'first'", "allowed: after, before"]),
    ({"accumulator": {"format": "fp16", "size": 4}}, ["unknown key 'size'", "allowed: format, block"]),
    ({"accumulator": {"block": 4}}, ["missing 'format'"]),
    ({"accumulator": "flexfp(e=8,m=22)"}, ["'flexfp(e=8,m=22,b=0)'", "at most 21 mantissa bits"]),
    ({"gradient_accumulator": "int16"}, ["gradient_accumulator", "allowed: a scalar float format"]),
    ({"rules": [{"type": "Linear", "accumulator": {"format": "fp16", "block": -1}}]}, ["(in rule 0)", "block -1"]),
    ({"points": "operands", "rules": [{"op": "softmax", "accumulator": "fp16"}]},
     ["op 'softmax'", "allowed with accumulator: linear, conv, matmul, einsum, attention"]),
]


@pytest.mark.parametrize(("cfg", "parts"), BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_configs_name_the_value_and_what_is_allowed(cfg: dict, parts: list[str]) -> None:
    with pytest.raises(ValueError) as err:
        QuantConfig.from_dict(cfg)
    for part in parts:
        assert part in str(err.value), str(err.value)


class Attention(nn.Module):
    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v)


def test_attention_gemms_under_points_operands() -> None:
    from precsim.qat.operands import attention
    from precsim.runtime.accumulate import matmul_float

    q, k, v = (exact_values((2, 2, 5, 8), s) for s in (20, 21, 22))
    fmt = "flexfp(e=5,m=3)"
    p = precsim.prepare(Attention(), {"points": "operands", "rules": [{"op": "attention",
                                                                        "accumulator": {"format": fmt, "block": 4}}]})
    want = attention(lambda name, x, axis: x, q, k, v,
                     matmul=lambda x, y: matmul_float(x, y, precsim.parse_format(fmt), 4))
    assert torch.equal(p(q, k, v), want)
    assert not torch.equal(want, F.scaled_dot_product_attention(q, k, v))


def test_low_precision_models_keep_their_dtype() -> None:
    m = linear().to(torch.bfloat16)
    p = precsim.prepare(m, {"accumulator": "fp16"})
    x = exact_values((3, 40), 23).to(torch.bfloat16).requires_grad_()
    y = p(x)
    assert y.dtype == torch.bfloat16
    y.sum().backward()
    assert x.grad.dtype == torch.bfloat16 and p.weight.grad.dtype == torch.bfloat16


def test_gradient_accumulator_on_a_conv_sums_the_weight_gradient_over_every_position() -> None:
    conv = nn.Conv2d(2, 3, 3, padding=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(exact_values((3, 2, 3, 3), 24))
    p = precsim.prepare(copy.deepcopy(conv), {"accumulator": "fp16",
                                              "gradient_accumulator": {"format": "fp8_e5m2", "block": 8}})
    x, g = exact_values((2, 2, 4, 4), 25), exact_values((2, 3, 4, 4), 26)
    (p(x) * g).sum().backward()
    cols = F.unfold(x, 3, padding=1)  # [B, K, L]
    g2 = g.flatten(2).transpose(0, 1).reshape(3, -1)  # [C_out, B*L]
    want = reference(g2, cols.transpose(1, 2).reshape(-1, 18), "fp8_e5m2", 8)  # K of this GEMM: B*L = 32
    assert torch.equal(p.weight.grad, want.view(3, 2, 3, 3))


def test_a_later_rule_turns_the_accumulator_off() -> None:
    net, x = ConvNet(), exact_values((2, 3, 5, 5), 27)
    p = precsim.prepare(copy.deepcopy(net), {"accumulator": "fp8_e5m2", "rules": [{"match": "fc", "accumulator": None}]})
    assert [r["module"] for r in precsim.summary_rows(p)] == ["conv"]
    q = precsim.prepare(copy.deepcopy(net), {"accumulator": "fp8_e5m2", "rules": [{"type": "Linear",
                                                                                   "accumulator": "fp32"}]})
    assert torch.equal(p(x), q(x))


class EinsumNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(exact_values((3, 24, 5), 30))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.einsum("hki,bhk->bih", self.w, x)  # K = k, summed; batch h; rows i, columns b


def test_einsum_gemms_take_their_accumulator_under_points_operands() -> None:
    """An einsum is a GEMM found by the operand points, so its sums are accumulated too: K in
    the order of the first operand's summed subscripts, equal to the reference per batch."""
    net, x = EinsumNet(), exact_values((4, 3, 24), 31)
    fmt = "flexfp(e=5,m=3)"
    p = precsim.prepare(copy.deepcopy(net), {"points": "operands", "rules": [
        {"op": "einsum", "accumulator": {"format": fmt, "block": 5}}]})
    got = p(x)
    for h in range(3):  # [i, k] @ [k, b] per head
        want = reference(net.w[h].detach().t(), x[:, h].t(), fmt, 5)  # [i, b]
        assert torch.equal(got[:, :, h], want.t())
    assert not torch.equal(got, net(x))
    assert {(r["op"], r["role"]) for r in precsim.summary_rows(p)} == {("einsum", "accumulator")}
    got.sum().backward()  # straight-through: the plain einsum's gradient
    plain = copy.deepcopy(net)
    plain(x).sum().backward()
    assert torch.equal(p.w.grad, plain.w.grad)


def test_einsum_forms_without_a_gemm_are_refused() -> None:
    from precsim.runtime.accumulate import einsum_as_matmul

    a = torch.randn(3, 3)
    with pytest.raises(ValueError, match="ellipses are not supported"):
        einsum_as_matmul("...ij,jk->...ik", a, a)
    with pytest.raises(ValueError, match="none repeated within an operand"):
        einsum_as_matmul("ii,ij->j", a, a)
    for eq in ("ij,jk->ik", "ik,jk->ji", "ij,ij->i", "i,j->ij", "ijz,jk->ki", "bij,bjk"):
        x, y = torch.randn(*(3 + n for n in range(len(eq.split(",")[0])))), None
        sb = eq.split("->")[0].split(",")[1]
        sizes = {c: 3 + eq.split(",")[0].find(c) if c in eq.split(",")[0] else 7 for c in sb}
        y = torch.randn(*(sizes[c] for c in sb))
        m1, m2, back = einsum_as_matmul(eq, x, y)
        torch.testing.assert_close(back(m1 @ m2), torch.einsum(eq, x, y))


def test_conv3d_and_conv1d_modules_take_float_accumulators() -> None:
    fmt = "flexfp(e=5,m=3)"
    for conv, x in ((nn.Conv3d(2, 3, 3, padding=1), exact_values((2, 2, 4, 4, 4), 36)),
                    (nn.Conv1d(2, 3, 3, padding=1), exact_values((2, 2, 9), 37))):
        with torch.no_grad():
            conv.weight.copy_(exact_values(tuple(conv.weight.shape), 38))
            conv.bias.copy_(exact_values((3,), 39) * 8)
        p = precsim.prepare(copy.deepcopy(conv), {"accumulator": {"format": fmt, "block": 5}})
        want = conv_float(x, conv.weight.detach(), precsim.parse_format(fmt), 5, padding=1)
        want = want + conv.bias.detach().view(1, -1, *[1] * (x.dim() - 2))
        got = p(x)
        assert torch.equal(got, want)
        got.sum().backward()  # straight-through: the plain conv's gradient
        plain = copy.deepcopy(conv)
        plain(x).sum().backward()
        assert torch.equal(p.weight.grad, plain.weight.grad)


def test_conv3d_takes_integer_and_gradient_accumulators_and_groups() -> None:
    """A Conv3d is a GEMM like the others: int8 codes summed in int16 (wrapping, counted) or
    int32 (exact), backward GEMMs with their own accumulator, and groups."""
    conv = nn.Conv3d(2, 3, 3, padding=1, bias=False)
    g = torch.Generator().manual_seed(41)
    codes_w = torch.randint(-127, 128, (3, 2, 3, 3, 3), generator=g).float()
    codes_w[:, 0, 0, 0, 0] = 127  # every channel's scale 2^-4 (per channel or not)
    codes_x = torch.randint(-127, 128, (2, 2, 4, 4, 4), generator=g).float()
    codes_x[0, 0, 0, 0, 0] = 127  # the input's scale 2^-3
    with torch.no_grad():
        conv.weight.copy_(codes_w / 16)
    x = codes_x / 8
    cfg = {"input": {"format": "int8", "observer": "minmax"}, "weight": "int8"}
    wide = precsim.prepare(copy.deepcopy(conv), {**cfg, "accumulator": "int32"})
    assert torch.equal(wide(x), F.conv3d(x, conv.weight.detach(), padding=1))  # code sums exact in float32
    narrow = precsim.prepare(copy.deepcopy(conv), {**cfg, "accumulator": {"format": "int16", "block": 8}})
    cols = columns3d(codes_x, (3, 3, 3), (1, 1, 1), (1, 1, 1)).double().numpy()  # [B, 54, 64]
    w = codes_w.flatten(1).double().numpy()
    acc, events = np.zeros((2, 3, 64), np.int64), 0
    for j in range(0, 54, 8):
        s_ = acc + np.einsum("ok,bkl->bol", w[:, j:j + 8], cols[:, j:j + 8]).astype(np.int64)
        events += int(((s_ < -2**15) | (s_ > 2**15 - 1)).sum())
        acc = (s_ + 2**15) % 2**16 - 2**15
    assert torch.equal(narrow(x), torch.from_numpy(acc).float().view(2, 3, 4, 4, 4) / 128)
    assert events > 0 and overflows(narrow) == {"precsim_accumulator": events}

    back = precsim.prepare(copy.deepcopy(conv), {"accumulator": "fp16",
                                                 "gradient_accumulator": {"format": "fp8_e5m2", "block": 8}})
    xe, ge = exact_values((2, 2, 3, 3, 3), 42), exact_values((2, 3, 3, 3, 3), 43)
    with torch.no_grad():
        back.weight.copy_(exact_values((3, 2, 3, 3, 3), 44))
    (back(xe) * ge).sum().backward()
    g2 = ge.flatten(2).transpose(0, 1).reshape(3, -1)  # [C_out, B*L]
    want = reference(g2, columns3d(xe, (3, 3, 3), (1, 1, 1), (1, 1, 1)).transpose(1, 2).reshape(-1, 54), "fp8_e5m2", 8)
    assert torch.equal(back.weight.grad, want.view(3, 2, 3, 3, 3))

    grouped = nn.Conv3d(4, 2, 3, padding=1, groups=2, bias=False)
    with torch.no_grad():
        grouped.weight.copy_(exact_values((2, 2, 3, 3, 3), 45))
    xg = exact_values((2, 4, 3, 3, 3), 46)
    got = precsim.prepare(copy.deepcopy(grouped), {"accumulator": {"format": "fp8_e5m2", "block": 5}})(xg)
    f = precsim.parse_format("fp8_e5m2")
    want = torch.cat([conv_float(xg[:, 2 * i:2 * i + 2], grouped.weight.detach()[i:i + 1], f, 5, padding=1)
                      for i in range(2)], dim=1)
    assert torch.equal(got, want)


def test_an_accumulated_einsum_of_three_operands_is_refused() -> None:
    class Three(nn.Module):
        def forward(self, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            return torch.einsum("ij,jk,kl->il", a, b, c)

    p = precsim.prepare(Three(), {"points": "operands", "accumulator": "fp16"})
    x = torch.randn(3, 3)
    with pytest.raises(ValueError, match="accumulated einsum 'ij,jk,kl->il' of 3 operands; allowed: two operands"):
        p(x, x, x)


def test_integer_accumulator_on_attention_sums_the_codes_of_q_k_p_v() -> None:
    """Both attention GEMMs on codes: int32 is the exact sum of code products (the float GEMM of
    the rounded operands up to float32's own rounding); a narrow width wraps and counts."""
    g = torch.Generator().manual_seed(40)
    q, k, v = (torch.randn(2, 2, 6, 16, generator=g) for _ in range(3))
    base = {"points": "operands", "activation": {"format": "int8", "observer": "minmax"}}
    rounded = precsim.prepare(Attention(), base)
    want = rounded(q, k, v)
    wide = precsim.prepare(Attention(), {**base, "rules": [{"op": "attention", "accumulator": "int32"}]})
    got = wide(q, k, v)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert overflows(wide) == {"precsim_operands.attention_0_acc": 0}
    narrow = precsim.prepare(Attention(), {**base, "rules": [
        {"op": "attention", "accumulator": {"format": "int12", "block": 4}}]})
    out = narrow(q, k, v)
    assert sum(overflows(narrow).values()) > 0 and not torch.allclose(out, want, atol=1e-3)
    float_only = precsim.prepare(Attention(), {"points": "operands", "rules": [
        {"op": "attention", "accumulator": "int16"}]})
    with pytest.raises(ValueError, match="operand 'q' is not rounded by an integer point"):
        float_only(q, k, v)


def test_integer_accumulator_on_a_bn_folded_conv_sums_its_codes() -> None:
    """With BN folding the conv multiplies Q(w s) / s: its codes are on the quantizer's grid
    divided by s per channel. int32 sums them exactly (the model without an accumulator);
    int12 wraps and counts."""
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU()).eval()
    with torch.no_grad():
        base[1].running_mean.uniform_(-0.5, 0.5)
        base[1].running_var.uniform_(0.5, 2)
        base[1].weight.uniform_(0.5, 2)
    x = torch.randn(8, 1, 6, 6)
    cfg = precsim.integer_config(base)
    assert cfg["fold_bn"] is True
    plain = precsim.calibrate(copy.deepcopy(base), [x], cfg)
    wide = precsim.calibrate(copy.deepcopy(base), [x], {**cfg, "accumulator": "int32"})
    assert torch.equal(wide(x), plain(x)) and overflows(wide) == {"0.precsim_accumulator": 0}
    narrow = precsim.calibrate(copy.deepcopy(base), [x], {**cfg, "accumulator": {"format": "int12", "block": 3}})
    assert not torch.equal(narrow(x), plain(x)) and overflows(narrow)["0.precsim_accumulator"] > 0


def test_integer_accumulators_on_an_integer_config_resnet() -> None:
    """integer_config gives only the first conv an input point; every other conv's input codes
    are those of the point upstream that int32 biases found (through ReLU, pooling, a residual
    add's quantizer). int32 sums them exactly (the float GEMM up to its float32 rounding);
    int16 on blocks of 32 overflows."""
    from precsim.zoo import get_model

    torch.manual_seed(0)
    base, x = get_model("resnet").eval(), torch.randn(16, 1, 28, 28)
    cfg = precsim.integer_config(base)
    plain = precsim.calibrate(copy.deepcopy(base), [x], cfg)
    wide = precsim.calibrate(copy.deepcopy(base), [x], {**cfg, "accumulator": "int32"})
    torch.testing.assert_close(wide(x), plain(x), rtol=1e-6, atol=1e-6)
    assert len(overflows(wide)) == 10 and sum(overflows(wide).values()) == 0  # 9 convs and the Linear
    narrow = precsim.calibrate(copy.deepcopy(base), [x], {**cfg, "accumulator": {"format": "int16", "block": 32}})
    narrow(x)
    assert sum(overflows(narrow).values()) > 0


class _Conv(nn.Module):
    """An unmodified functional conv call (bias by keyword before the weight, as a user may write)."""

    def __init__(self, dims: int, groups: int, kwargs: dict) -> None:
        super().__init__()
        self.fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        self.kwargs = {"groups": groups, **kwargs}

    def forward(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        return self.fn(x, bias=b, weight=w, **self.kwargs)


@pytest.mark.parametrize(("dims", "groups", "kwargs", "batched", "bias"), [
    (2, 1, {"padding": 1}, True, True), (2, 2, {"stride": 2, "dilation": 2, "padding": (2, 1)}, False, True), (2, 2, {}, True, False),
    (1, 1, {"padding": "same"}, False, True), (3, 1, {"padding": "valid", "stride": (1, 2, 1)}, True, True),
    (2, 1, {"padding": "same", "dilation": 1}, True, True),  # even kernel below: odd total padding
])
def test_the_straight_through_gradient_of_a_conv_is_torchs_without_a_second_forward(
        dims: int, groups: int, kwargs: dict, batched: bool, bias: bool) -> None:
    """The gradients of every operand equal the plain conv's, bit for bit; the backward runs
    aten.convolution_backward alone (no conv forward again) except for an odd "same" padding."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Calls(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.append(func.__name__)
            return func(*args, **(kwargs or {}))

    odd = kwargs.get("padding") == "same" and kwargs.get("dilation") == 1
    kernel = (2,) * dims if odd else (3,) * dims
    x = exact_values(((2,) if batched else ()) + (4,) + (7,) * dims, 50)
    w, b = exact_values((4, 4 // groups, *kernel), 51), exact_values((4,), 52) if bias else None
    model = precsim.prepare(_Conv(dims, groups, kwargs),
                            {"points": "operands", "accumulator": {"format": "fp8_e5m2", "block": 5}})
    leaves = [t.clone().requires_grad_() for t in (x, w, *([b] if bias else []))]
    plain = [t.detach().clone().requires_grad_() for t in leaves]
    out = model(leaves[0], leaves[1], leaves[2] if bias else None)
    want = _Conv(dims, groups, kwargs)(plain[0], plain[1], plain[2] if bias else None)
    assert out.shape == want.shape and not torch.equal(out, want)
    g = exact_values(tuple(out.shape), 53)
    with Calls() as calls:
        out.backward(g)
    want.backward(g)
    for got, ref in zip(leaves, plain, strict=True):
        assert torch.equal(got.grad, ref.grad)
    assert "convolution_backward" in {op.split(".")[0] for op in calls.ops}
    assert ("convolution" in {op.split(".")[0] for op in calls.ops}) == odd, calls.ops
