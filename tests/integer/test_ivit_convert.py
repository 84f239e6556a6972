"""The integer-only ViT (I-ViT) against the simulation it was converted from.

One short run (a tiny zoo ViT: width 32, depth 1, 2 heads; float training, then QAT with
:func:`precsim.ivit_config`) is shared by the tests through :func:`qat_vit`. The integer model
replaces softmax, GELU and LayerNorm by I-ViT's integer approximations, so its codes are not
the simulation's; the bounds below are measured on this run (see each test) with a margin, and
tight enough that a wrong scale, factor or layout anywhere in the lowering breaks them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from test_convert import run_integer_dtypes
from test_fixedpoint import ref_mbqm, ref_mbqm_single, ref_rdbpot, ref_shift_single
from test_ivit_ops import ref_gelu_consts, ref_i_layernorm, ref_ln_consts, ref_shift_gelu, ref_shiftmax
from torch import nn

import precsim
from precsim.integer.convert import ConversionError, convert
from precsim.integer.ivit_ops import prepare_i_layernorm, prepare_shift_gelu, prepare_shiftmax
from precsim.integer.model import IntegerModel, describe
from precsim.integer.ops import ConvOp, QParams, op_from_state, to_nchw, to_nhwc
from precsim.integer.vit_ops import (
    AddConstOp,
    ILayerNormOp,
    LayoutOp,
    MatMulOp,
    ShiftGeluOp,
    ShiftmaxOp,
    consts_state,
    decode_index,
    encode_index,
)
from precsim.qat.prepare import summary_rows
from precsim.zoo import Add, MatMul, get_model, load_dataset, train_steps

ARCH = {"patch_size": 7, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2}
# Per-layer bounds for test_layers_agree_with_simulation, in 8-bit steps (see layer_errors):
# about twice the values measured on this run (in brackets).
BOUNDS = {
    "blocks.0.norm1": 4.0,  # [2.0]
    "blocks.0.attn.qkv": 3.0,  # [1.0]
    "blocks.0.attn.matmul_qk": 3.0,  # [1.0]
    "blocks.0.attn.softmax": 7.0,  # [3.3]
    "blocks.0.attn.matmul_av": 6.0,  # [3.0]
    "blocks.0.attn.proj": 6.0,  # [3.0]
    "blocks.0.add1": 3.0,  # [1.3]
    "blocks.0.norm2": 8.0,  # [4.0]
    "blocks.0.mlp.fc1": 8.0,  # [4.0]
    "blocks.0.mlp.act": 10.0,  # [5.0]
    "blocks.0.mlp.fc2": 10.0,  # [5.0]
    "blocks.0.add2": 6.0,  # [2.7]
    "norm": 12.0,  # [6.0]
    "head": 10.0,  # [4.6]
}
N_TEST = 500


@dataclass
class Trained:
    model: nn.Module  # the QAT model, eval mode
    imodel: IntegerModel
    x: torch.Tensor
    labels: torch.Tensor
    sim: torch.Tensor  # simulated logits
    out: torch.Tensor  # integer model's logits (dequantized)


@functools.lru_cache(maxsize=1)
def qat_vit() -> Trained:
    """250 float steps, then 40 QAT steps with I-ViT's quantizers (7x7 patches: 17 tokens, so the run
    is short); converted."""
    torch.manual_seed(0)
    train, test = load_dataset("mnist5k")
    model = get_model("vit", **ARCH)
    train_steps(model, train, steps=250, lr=3e-3, seed=0)
    model.eval()
    precsim.prepare(model, precsim.ivit_config(model))
    train_steps(model, train, steps=40, lr=5e-4, seed=1)
    model.eval()
    x, labels = test.tensors[0][:N_TEST], test.tensors[1][:N_TEST]
    imodel = convert(model)
    with torch.no_grad():
        sim = model(x)
    return Trained(model, imodel, x, labels, sim, imodel(x))


def _acc(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return (logits.argmax(1) == labels).float().mean().item() * 100


# --------------------------------------------------------------------------------------------
# Conversion and agreement with the simulation
# --------------------------------------------------------------------------------------------


def test_vit_lowers_to_ivit_ops() -> None:
    t = qat_vit()
    kinds = [type(op).__name__ for op in t.imodel.ops]
    assert kinds.count("MatMulOp") == 2 and kinds.count("ShiftmaxOp") == 1 and kinds.count("ShiftGeluOp") == 1
    assert kinds.count("ILayerNormOp") == 3 and kinds.count("AddConstOp") == 1 and kinds.count("AddOp") == 2
    convs = {op.name: op for op in t.imodel.ops if isinstance(op, ConvOp)}
    assert set(convs) == {"patch_embed.proj", "blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1",
                          "blocks.0.mlp.fc2", "head"}
    for op in convs.values():  # dyadic requantization M0 2^(shift-31) = S_in S_w / S_out for every linear layer
        m = op.multiplier.double() * torch.pow(2.0, op.shift.double() - 31)
        torch.testing.assert_close(m, op.in_scale * op.w_scale.double() / op.out_qp.scale, rtol=2**-30, atol=0)
    qk = next(op for op in t.imodel.ops if isinstance(op, MatMulOp) and op.name.endswith("matmul_qk"))
    assert 2**30 <= qk.multiplier < 2**31
    real = qk.a_qp.scale * qk.b_qp.scale / qk.out_qp.scale
    assert qk.multiplier * 2.0 ** (qk.shift - 31) == pytest.approx(real, rel=2**-30)
    sm = next(op for op in t.imodel.ops if isinstance(op, ShiftmaxOp))
    # matmul_qk is quantized before the float model's `* scale`: the constant becomes part of the
    # scale of the codes Shiftmax reads (no op, no rounding)
    assert sm.in_qp.scale == pytest.approx(qk.out_qp.scale * 16**-0.5, rel=1e-12)
    res = [op for op in t.imodel.ops if type(op).__name__ in ("AddOp", "AddConstOp")]
    assert all(op.out_qp.dtype == torch.int16 for op in res)  # the residual stream is 16-bit
    assert sm.out_qp.qmax == 2**16 - 1


def test_integer_vit_agrees_with_simulation() -> None:
    """Measured (this run, 500 test images): argmax agrees on 99.6%, accuracy 85.2% simulated vs
    85.6% integer; the logits differ by 0.7% of their spread on average. The integer ops approximate
    softmax (< 0.02 abs.), GELU (< 0.026) and LayerNorm, so codes are close, not equal."""
    t = qat_vit()
    agree = (t.sim.argmax(1) == t.out.argmax(1)).float().mean().item()
    assert agree >= 0.98
    assert abs(_acc(t.sim, t.labels) - _acc(t.out, t.labels)) <= 1.0
    assert _acc(t.out, t.labels) > 75  # the short run learned something
    spread = (t.sim.max(1).values - t.sim.min(1).values).mean()
    assert ((t.out - t.sim).abs().mean() / spread).item() < 0.02


def layer_errors(t: Trained, n: int = 64) -> dict[str, float]:
    """Per layer: max |integer - simulated| of the quantized output, in 8-bit steps of the layer's
    range (``max|real| / 127``; for a 16-bit output one step is 258 codes), so 8- and 16-bit
    layers read alike. Forward hooks registered after prepare's see the quantized outputs."""
    x = t.x[:n]
    sim: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: sim.__setitem__(name, out))
             for name, m in t.model.named_modules() if hasattr(m, "precsim_activation")]
    try:
        with torch.no_grad():
            t.model(x)
    finally:
        for h in hooks:
            h.remove()
    record: list[tuple[str, str, torch.Tensor]] = []
    t.imodel.run_integer(t.imodel.quantize_input(x), record=record)
    codes = {name: to_nchw(v) for name, what, v in record if what == "output"}  # a layer's last op wins
    ops = {op.name: op for op in t.imodel.ops}
    worst = {}
    for name, y in sim.items():
        qp = ops[name].out_qp
        real = (codes[name].double() - qp.zero_point) * qp.scale
        step = qp.scale * max(-qp.qmin, qp.qmax) / 127
        worst[name] = ((real - y.double()).abs().max() / step).item()
    return worst


def test_layers_agree_with_simulation() -> None:
    """Exact lowerings differ by rounding flips only (the patch embedding by a tie at most: 1 step;
    the class-token/position add carries that flip: 0.85 step measured); the I-ViT
    nonlinearities add their approximation error, which later layers carry (:data:`BOUNDS`)."""
    w = layer_errors(qat_vit())
    assert w["patch_embed.proj"] <= 1.01 and w["pos_add"] <= 1.01
    for name, bound in BOUNDS.items():
        assert w[name] <= bound, (name, w[name], bound)


def test_only_integer_tensors_at_run_time() -> None:
    t = qat_vit()
    record, seen = run_integer_dtypes(t.imodel, t.imodel.quantize_input(t.x[:16]))
    assert len(record) > len(t.imodel.ops)
    assert not [(layer, what, r.dtype) for layer, what, r in record if r.dtype.is_floating_point]
    assert seen and not [d for d in seen if d.is_floating_point or d.is_complex]
    accs = {r.dtype for layer, what, r in record if what == "accumulator"}
    assert accs == {torch.int32}


@pytest.mark.parametrize("rounding", ["gemmlowp", "single"])
def test_reference_kernels_agree_code_for_code(rounding: str) -> None:
    """run_reference: channels-first, float64 products, the fixedpoint functions directly."""
    t = qat_vit()
    imodel = t.imodel if rounding == "gemmlowp" else convert(t.model, rounding=rounding)
    assert imodel.rounding == rounding
    assert {op.rounding for op in imodel.ops if hasattr(op, "rounding")} == {rounding}
    codes = imodel.quantize_input(t.x[:32])
    assert torch.equal(imodel.run_integer(codes).to(torch.int64), imodel.run_reference(codes))


def test_save_load_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    t = qat_vit()
    path = tmp_path / "vit.int.pt"
    t.imodel.save(path)
    loaded = IntegerModel.load(path)
    x = t.x[:100]
    assert torch.equal(loaded.output_codes(x), t.imodel.output_codes(x))
    assert describe(loaded) == describe(t.imodel)
    text = describe(t.imodel)
    for word in ("shiftmax", "shiftgelu", "i-layernorm", "matmul", "add const", "int16"):
        assert word in text


def _op_states_equal(a: IntegerModel, b: IntegerModel) -> bool:
    if len(a.ops) != len(b.ops):
        return False
    for oa, ob in zip(a.ops, b.ops, strict=True):
        sa, sb = oa.state(), ob.state()
        if sa.keys() != sb.keys():
            return False
        for k in sa:
            va, vb = sa[k], sb[k]
            if isinstance(va, dict):
                va, vb = repr(sorted(va.items())), repr(sorted(vb.items()))
            if isinstance(va, torch.Tensor):
                if not torch.equal(va, vb):
                    return False
            elif va != vb:
                return False
    return True


def test_reloaded_prepared_vit_is_identical(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """Observer ranges live in buffers: state_dict -> fresh prepare -> load_state_dict evaluates
    and converts identically (the I-ViT reference loses its ranges here)."""
    t = qat_vit()
    path = tmp_path / "vit.qat.pt"
    torch.save(t.model.state_dict(), path)
    fresh = get_model("vit", **ARCH)
    precsim.prepare(fresh, precsim.ivit_config(fresh))
    with pytest.raises(ConversionError, match="has not observed any data"):
        convert(fresh)  # no ranges yet: refused, not silently wrong
    fresh.load_state_dict(torch.load(path, weights_only=True))
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(t.x), t.sim)
    again = convert(fresh)
    assert _op_states_equal(again, t.imodel)
    assert torch.equal(again.output_codes(t.x[:100]), t.imodel.output_codes(t.x[:100]))


def test_ivit_config_quantizers() -> None:
    model = get_model("vit", **ARCH)
    cfg = precsim.ivit_config(model)
    precsim.prepare(model, cfg)
    rows = {(r["module"], r["role"]): r["format"] for r in summary_rows(model)}
    assert rows[("patch_embed.proj", "input")] == "uint8"
    assert rows[("pos_add", "activation")] == rows[("blocks.0.add2", "activation")] == "int16"
    assert rows[("blocks.0.attn.softmax", "activation")] == "uint16"
    assert rows[("blocks.0.norm1", "activation")] == rows[("blocks.0.mlp.act", "activation")] == "int8"
    assert rows[("blocks.0.attn.matmul_qk", "activation")] == "int8"
    assert rows[("blocks.0.attn.qkv", "weight")] == "int8(axis=0)"
    assert ("blocks.0.norm1", "weight") not in rows  # I-LayerNorm quantizes its affine weight itself
    assert rows[("head", "activation")] == "int16"


# --------------------------------------------------------------------------------------------
# Each new op's kernel against NumPy int64 references
# --------------------------------------------------------------------------------------------


def _nhwc(x: torch.Tensor) -> torch.Tensor:
    return to_nhwc(x)


@pytest.mark.parametrize("rounding", ["gemmlowp", "single"])
@pytest.mark.parametrize(("k", "a_qp", "b_qp"), [
    (37, QParams(0.02, 3, -128, 127), QParams(0.01, 120, 0, 255)),
    (400, QParams(1 / 65535, 0, 0, 65535), QParams(0.03, 0, -128, 127)),  # 400 * 65535 * 128 > 2^31: int64
])
def test_matmul_op_bit_exact(k: int, a_qp: QParams, b_qp: QParams, rounding: str) -> None:
    rng = np.random.default_rng(k)
    a = rng.integers(a_qp.qmin, a_qp.qmax + 1, size=(2, 3, 5, k))
    b = rng.integers(b_qp.qmin, b_qp.qmax + 1, size=(2, 3, k, 6))
    a[0, 0, 0] = a_qp.qmax  # a worst-case row and column
    b[0, 0, :, 0] = b_qp.qmax if b_qp.qmin >= 0 else b_qp.qmin
    out_qp = QParams(0.5, -3, -128, 127)
    from precsim.integer.fixedpoint import quantize_multiplier
    m0, shift = quantize_multiplier(a_qp.scale * b_qp.scale * 0.7 / out_qp.scale)
    op = MatMulOp("mm", ["a", "b"], "y", a_qp, b_qp, out_qp, m0, shift, -128, 127, factor=0.7, rounding=rounding)
    acc_t, pre, _ = op.plan(k)
    assert (acc_t == torch.int64) == (k * a_qp.max_abs_centred * b_qp.max_abs_centred > 2**31 - 1)
    acc = (a - a_qp.zero_point) @ (b - b_qp.zero_point)
    single = rounding == "single"
    if pre:
        acc = ref_shift_single(acc, pre) if single else ref_rdbpot(acc, pre)
    want = np.clip((ref_mbqm_single if single else ref_mbqm)(acc, m0, shift + pre) + out_qp.zero_point, -128, 127)
    ta = torch.from_numpy(a).to(a_qp.dtype)
    tb = torch.from_numpy(b).to(b_qp.dtype)
    got = to_nchw(op.run(_nhwc(ta), _nhwc(tb)))
    assert got.dtype == torch.int8
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(op.reference(ta, tb).numpy(), want)
    loaded = op_from_state(op.state())
    assert torch.equal(loaded.run(_nhwc(ta), _nhwc(tb)), op.run(_nhwc(ta), _nhwc(tb)))


@pytest.mark.parametrize("rounding", ["gemmlowp", "single"])
def test_add_const_op_bit_exact(rounding: str) -> None:
    rng = np.random.default_rng(1)
    in_qp, out_qp = QParams(0.05, 0, -128, 127), QParams(0.002, 0, -32768, 32767)
    x = rng.integers(-128, 128, size=(3, 7, 8))
    from precsim.integer.fixedpoint import quantize_multiplier
    m0, shift = quantize_multiplier(in_qp.scale / out_qp.scale)
    left = 15
    prefix = rng.integers(-(2**25), 2**25, size=(1, 1, 8))
    offset = rng.integers(-(2**25), 2**25, size=(1, 7, 8))
    op = AddConstOp("pos", ["x"], "y", in_qp, out_qp, m0, shift, left, torch.from_numpy(prefix),
                    torch.from_numpy(offset), 1, -32768, 32767, rounding)
    single = rounding == "single"
    v = (ref_mbqm_single if single else ref_mbqm)(x * 2**left, m0, shift) + offset
    v = np.concatenate([np.broadcast_to(prefix, (3, 1, 8)), v], axis=1)
    want = np.clip(ref_shift_single(v, left) if single else ref_rdbpot(v, left), -32768, 32767)
    tx = torch.from_numpy(x).to(torch.int8)
    got = op.run(tx)
    assert got.dtype == torch.int16 and got.shape == (3, 8, 8)
    np.testing.assert_array_equal(got.numpy(), want)
    np.testing.assert_array_equal(op.reference(tx).numpy(), want)


@pytest.mark.parametrize("scale", [0.01, 0.08, 0.6])
def test_shiftmax_op_bit_exact(scale: float) -> None:
    x = torch.randint(-128, 128, (2, 3, 9, 9), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    op = ShiftmaxOp.make("sm", ["x"], "y", QParams(scale, 0, -128, 127), prepare_shiftmax(scale, 16))
    got = to_nchw(op_from_state(op.state()).run(_nhwc(x)))
    want = ref_shiftmax(x.numpy(), scale, 16, True)
    np.testing.assert_array_equal(got.numpy(), want)
    assert bool((got.sum(-1) == 2**16 - 1).all())  # rows sum to exactly 1
    err = (got.double() / (2**16 - 1) - torch.softmax(x.double() * scale, -1)).abs().max().item()
    assert err < 0.0171


@pytest.mark.parametrize(("scale", "out_scale"), [(0.02, 0.02), (0.05, 0.03)])
def test_shift_gelu_op_bit_exact(scale: float, out_scale: float) -> None:
    x = torch.arange(-128, 128, dtype=torch.int8).reshape(2, 2, 8, 8)
    op = ShiftGeluOp("g", ["x"], "y", QParams(scale, 0, -128, 127), QParams(out_scale, 0, -128, 127),
                     consts_state(prepare_shift_gelu(scale, out_scale, 8)))
    got = op_from_state(op.state()).run(x)
    assert got.dtype == torch.int8
    np.testing.assert_array_equal(got.numpy(), ref_shift_gelu(x.numpy(), ref_gelu_consts(scale, out_scale, 8)))


def test_i_layernorm_op_bit_exact() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randint(-3000, 3000, (2, 5, 24), generator=g).to(torch.int16)
    w, b = torch.randn(24, generator=g), torch.randn(24, generator=g) * 0.1
    scale, out_scale = 1e-3, 0.03
    op = ILayerNormOp("ln", ["x"], "y", QParams(scale, 0, -32768, 32767), QParams(out_scale, 0, -128, 127),
                      consts_state(prepare_i_layernorm(scale, 24, out_scale, w, b, in_bits=16, out_bits=8)))
    got = op_from_state(op.state()).run(x)
    want = ref_i_layernorm(x.numpy(), ref_ln_consts(scale, 24, out_scale, w.double().numpy(), b.double().numpy(),
                                                    1e-5, 16, 8))
    np.testing.assert_array_equal(got.numpy(), want)
    ref = nn.functional.layer_norm(x.double() * scale, (24,), w.double(), b.double())
    assert ((got.double() * out_scale - ref).abs().max() <= out_scale / 2 + 1e-3)


@pytest.mark.parametrize(("method", "args"), [
    ("permute", [2, 0, 3, 1]), ("transpose", [-2, -1]), ("unflatten", [-1, [2, 3]]), ("flatten", [2]),
    ("select", [1, 2]), ("getitem", encode_index((slice(None), 0))), ("getitem", encode_index((..., slice(1, 5, 2)))),
])
def test_layout_op_matches_torch(method: str, args: list) -> None:  # type: ignore[type-arg]
    x = torch.arange(2 * 4 * 5 * 6, dtype=torch.int32).reshape(2, 4, 5, 6).to(torch.int16)
    op = op_from_state(LayoutOp("l", ["x"], "y", method, args).state())
    if method == "getitem":
        want = x[decode_index(args)]
    elif method == "unflatten":
        want = x.unflatten(-1, (2, 3))
    else:
        want = getattr(x, method)(*args)
    assert torch.equal(to_nchw(op.run(to_nhwc(x))), want)
    assert torch.equal(op.reference(x), want)


def test_index_encoding_round_trip() -> None:
    for key in [(slice(None), 0), 3, (Ellipsis, None, slice(1, None, 2))]:
        assert decode_index(encode_index(key)) == (key if isinstance(key, tuple) else (key,))
    with pytest.raises(TypeError):
        encode_index((torch.tensor([1]),))


# --------------------------------------------------------------------------------------------
# Clear errors for ViT variants convert() does not support
# --------------------------------------------------------------------------------------------


def _calibrated(model: nn.Module, cfg: dict | None = None, shape: tuple[int, ...] = (4, 5, 8)) -> nn.Module:  # type: ignore[type-arg]
    cfg = cfg if cfg is not None else precsim.ivit_config(model)
    return precsim.calibrate(model, [torch.randn(*shape) for _ in range(2)], cfg)


class Mixer(nn.Module):
    """A token mixer with a configurable softmax/normalisation, for the error tests."""

    def __init__(self, softmax_dim: int = -1, norm: nn.Module | None = None) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.norm = norm if norm is not None else nn.LayerNorm(8)
        self.matmul = MatMul()
        self.softmax = nn.Softmax(dim=softmax_dim)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.fc(x))
        return self.out(self.matmul(self.softmax(h), h.transpose(-2, -1)))


def test_mixer_converts() -> None:
    model = _calibrated(Mixer(), shape=(4, 8, 8))
    imodel = convert(model)
    x = torch.randn(4, 8, 8)
    with torch.no_grad():
        assert (imodel(x) - model(x)).abs().max() < 0.2


class ScaledScores(nn.Module):
    """Attention scores with no quantizer between the product and ``* scale``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.matmul = MatMul()
        self.softmax = nn.Softmax(dim=-1)
        self.out = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.out(self.softmax(self.matmul(h, h.transpose(-2, -1)) / 4.0))


def test_constant_factor_folds_into_the_product_multiplier() -> None:
    model = ScaledScores()
    cfg = precsim.ivit_config(model)
    cfg["rules"] = [r for r in cfg["rules"] if r.get("type") != "MatMul"] + [{"type": "Softmax", "input": "int8"}]
    model = _calibrated(model, cfg, shape=(4, 8, 8))
    imodel = convert(model)
    mm = next(op for op in imodel.ops if isinstance(op, MatMulOp))
    assert mm.factor == 0.25 and mm.name == "matmul"
    real = mm.a_qp.scale * mm.b_qp.scale * 0.25 / mm.out_qp.scale
    assert mm.multiplier * 2.0 ** (mm.shift - 31) == pytest.approx(real, rel=2**-30)
    x = torch.randn(4, 8, 8)
    with torch.no_grad():
        assert (imodel(x) - model(x)).abs().max() < 4 * imodel.output_qp.scale + 0.05


def test_softmax_over_another_dim_is_named() -> None:
    with pytest.raises(ConversionError, match=r"'softmax'.*dim=1"):
        convert(_calibrated(Mixer(softmax_dim=1), shape=(4, 8, 8)))


def test_unquantized_softmax_is_named() -> None:
    model = Mixer()
    cfg = precsim.ivit_config(model)
    cfg["rules"] = [r for r in cfg["rules"] if r.get("type") != "Softmax"]
    with pytest.raises(ConversionError, match=r"'softmax'.*Shiftmax"):
        convert(_calibrated(model, cfg, shape=(4, 8, 8)))


def test_affine_layernorm_output_is_named() -> None:
    model = Mixer()
    cfg = precsim.ivit_config(model)
    cfg["rules"].append({"type": "LayerNorm", "activation": "uint8"})
    with pytest.raises(ConversionError, match=r"'norm'.*LayerNorm.*signed symmetric"):
        convert(_calibrated(model, cfg, shape=(4, 8, 8)))


def test_unsupported_norm_is_named() -> None:
    with pytest.raises(ConversionError, match=r"'norm'.*RMSNorm"):
        convert(_calibrated(Mixer(norm=nn.RMSNorm(8)), shape=(4, 8, 8)))


def test_multihead_attention_module_is_named() -> None:
    class TorchAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = self.fc(x)
            return self.attn(h, h, h)[0]

    model = TorchAttention()
    cfg = {"activation": "int8", "weight": "int8", "rules": [{"match": "fc", "input": "int8"},
                                                              {"type": "MultiheadAttention", "activation": "int8"}]}
    with pytest.raises(ConversionError, match=r"'attn'.*MultiheadAttention"):
        convert(_calibrated(model, cfg))


def test_class_token_without_quantized_sum_is_named() -> None:
    """A class token concatenated but never quantized as a sum (no Add quantizer) is refused."""
    model = get_model("vit", **ARCH)
    cfg = precsim.ivit_config(model)
    cfg["rules"] = [r for r in cfg["rules"] if r.get("type") != "Add"]
    model = _calibrated(model, cfg, shape=(2, 1, 28, 28))
    with pytest.raises(ConversionError, match=r"'pos_add'.*class token"):
        convert(model)


def test_negative_scaling_is_named() -> None:
    class Neg(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.out = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.fc(x) * -0.5)

    cfg = {"activation": "int8", "weight": "int8", "rules": [{"match": "fc", "input": "int8"}]}
    with pytest.raises(ConversionError, match="positive constant"):
        convert(_calibrated(Neg(), cfg))


def test_pos_add_model_without_class_token() -> None:
    """Tokens plus a position embedding only (no class token): AddConstOp with no prefix rows."""

    class PosOnly(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(8, 8)
            self.pos = nn.Parameter(torch.randn(1, 5, 8))
            self.add = Add()
            self.out = nn.Linear(8, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.add(self.fc(x), self.pos))

    model = _calibrated(PosOnly(), {"activation": "int8", "weight": "int8",
                                    "rules": [{"match": "fc", "input": "int8"}, {"type": "Add", "activation": "int16"}]})
    imodel = convert(model)
    assert any(isinstance(op, AddConstOp) and op.prefix.numel() == 0 for op in imodel.ops)
    x = torch.randn(3, 5, 8)
    with torch.no_grad():
        y = model(x)
    assert (imodel(x) - y).abs().max().item() <= imodel.output_qp.scale * 2.01
