"""The integer model against the simulation it was converted from, on the MNIST test split.

One short training run, float then QAT (zoo ResNet, uint8 activations, int8 per-channel weights, fold_bn with frozen
statistics) is shared by this module and test_onnx.py through :func:`qat_resnet`.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass

import pytest
import torch
from torch import fx, nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import TensorDataset

import precsim
from precsim.integer.convert import ConversionError, convert, integer_config
from precsim.integer.exact import integer_exact
from precsim.integer.model import IntegerModel, describe
from precsim.integer.ops import ConvOp, to_nchw, to_nhwc
from precsim.qat.bias import layer_bias_codes
from precsim.qat.fold import trace
from precsim.zoo import get_model, load_dataset, train_steps

WIDTHS = (4, 8, 16)


@dataclass
class Trained:
    model: nn.Module  # the QAT model, eval mode
    float_model: nn.Module  # the float model QAT started from
    train: TensorDataset
    test: TensorDataset


def _recalibrate_bn(model: nn.Module, data: TensorDataset, batches: int = 8) -> None:
    """Exact BatchNorm statistics for the final weights (the running averages lag a fast run)."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        for i in range(batches):
            model(data.tensors[0][i * 256:(i + 1) * 256])
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = 0.1


@functools.lru_cache(maxsize=1)
def qat_resnet() -> Trained:
    """Float training, then a short QAT run with BN folding (statistics frozen after 10 steps).

    200 float steps (3.2 epochs of the 4,000 training images) at lr 1e-2 reach 93-95% test
    accuracy in about 3 seconds; a weaker model has many images whose two top logits are within a
    code, and the end-to-end argmax bounds below would measure those near-ties, not the arithmetic.
    """
    torch.manual_seed(0)
    train, test = load_dataset("mnist5k")
    model = get_model("resnet", in_channels=1, num_classes=10, widths=WIDTHS, activation="relu")
    train_steps(model, train, steps=200, lr=1e-2, seed=0)
    _recalibrate_bn(model, train)
    float_model = copy.deepcopy(model).eval()
    precsim.prepare(model, integer_config(model, fold_bn={"freeze_after": 10}))
    train_steps(model, train, steps=20, lr=1e-3, seed=1)
    model.eval()
    return Trained(model, float_model, train, test)


@dataclass
class Outputs:
    imodel: IntegerModel
    sim_codes: torch.Tensor  # plain fake-quant simulation, as output codes
    int_codes: torch.Tensor  # the integer model
    exact_codes: torch.Tensor  # the simulation in fixed-point mode
    labels: torch.Tensor


def to_codes(y: torch.Tensor, imodel: IntegerModel) -> torch.Tensor:
    qp = imodel.output_qp
    return (torch.round(y / qp.scale_tensor()) + qp.zero_point).to(torch.int64)


@functools.lru_cache(maxsize=2)
def outputs(rounding: str = "gemmlowp") -> Outputs:
    t = qat_resnet()
    x, labels = t.test.tensors
    imodel = convert(t.model, example=x[:1], rounding=rounding)
    with torch.no_grad():
        sim = t.model(x)
    with integer_exact(t.model, rounding=rounding) as exact_model:
        exact = exact_model(x)
    return Outputs(imodel, to_codes(sim, imodel), imodel.output_codes(x).to(torch.int64), to_codes(exact, imodel),
                   labels)


ROUNDINGS = ["gemmlowp", "single"]


# --------------------------------------------------------------------------------------------
# Agreement with the simulation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_fixed_point_simulation_is_code_exact(rounding: str) -> None:
    o = outputs(rounding)
    assert o.imodel.rounding == rounding
    assert o.int_codes.shape == (1000, 10)
    assert torch.equal(o.exact_codes, o.int_codes)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_fixed_point_mode_predictions_identical(rounding: str) -> None:
    o = outputs(rounding)
    assert torch.equal(o.exact_codes.argmax(1), o.int_codes.argmax(1))  # 100% >= 99.9%
    acc_exact = (o.exact_codes.argmax(1) == o.labels).float().mean().item()
    acc_int = (o.int_codes.argmax(1) == o.labels).float().mean().item()
    assert acc_exact == acc_int
    assert acc_int > 0.9  # a trained model (measured 93.3-94.6%), so few images are near-ties


def test_rounding_modes_give_different_integer_models() -> None:
    """The mode reaches the kernels: double and single rounding disagree on some logits, by a few
    codes (a 1-code difference per layer compounds through the network; how many logits differ
    depends on the trained weights, so only the size of the differences is asserted)."""
    g, s = outputs("gemmlowp"), outputs("single")
    diff = (g.int_codes - s.int_codes).abs()
    assert 1 <= int(diff.max()) <= 8
    assert diff.float().mean().item() < 0.05 * g.int_codes.float().std().item()


def _agreement(o: Outputs) -> tuple[torch.Tensor, int, int, int]:
    """|sim - int| per logit code, images whose argmax differs, correct answers of the simulation and the integer model."""
    diff = (o.sim_codes - o.int_codes).abs()
    sim_top, int_top = o.sim_codes.argmax(1), o.int_codes.argmax(1)
    top2 = o.int_codes.topk(2, dim=1).values
    flipped = sim_top != int_top
    # an argmax can only flip where the integer model's two top logits are within the two codes'
    # differences: int[j] - int[i] <= (int[j] - sim[j]) + (sim[i] - int[i]) for sim's i, int's j
    moved = diff.gather(1, sim_top[:, None])[:, 0] + diff.gather(1, int_top[:, None])[:, 0]
    assert bool((top2[:, 0] - top2[:, 1])[flipped].le(moved[flipped]).all())
    return diff, int(flipped.sum()), int((sim_top == o.labels).sum()), int((int_top == o.labels).sum())


def test_plain_simulation_is_close() -> None:
    """Plain fake quantization (with ``bias: int32``, integer_config's default) against the gemmlowp integer model.

    Per requantization the two differ by at most 1 LSB (test_each_layer_within_one_lsb), on up to
    about 0.7% of a layer's outputs: gemmlowp's double rounding (SRDHM to 2^-n of a code, then
    RoundingDivideByPOT) moves values within 2^-(n+1) of a .5 tie to the other side; float32
    noise adds almost nothing once the bias is rounded as the integer model rounds it. Through
    ten layers and three residual adds those flips cascade: MNIST's constant background makes
    thousands of outputs share one accumulator, so one flipped code moves whole regions.
    Measured (docs/integer.md; the trained model depends on the float kernels, so two builds,
    two CPUs or two thread counts differ): 78.9-79.6% of logit codes equal, max 2 LSB (on 1-3 of
    the 10,000 logits; 3 on a less trained model); argmax equal on 999-1,000 of 1,000 images,
    every disagreement an image whose two top logits are within a code or two (7-11 images of
    this 93-95% accurate model); accuracy 93.4 vs 93.3 (94.6 vs 94.6 with one thread). On
    another CPU (2026-12-02) the stem's flat background sat near a tie and the flips cascaded:
    27% of logit codes equal, 69.5% within 1, max 5, argmax equal on 985, accuracy 93.3 vs 94.1. Issue 6's
    "<= 1 LSB, >= 99.9% argmax" is not guaranteed with double rounding (integer_exact, or
    rounding="single" below, meet it); the bounds here are the measured ones with a margin.
    """
    diff, flipped, correct_sim, correct_int = _agreement(outputs())
    assert int(diff.max()) <= 8
    assert (diff <= 1).float().mean().item() >= 0.6
    assert flipped <= 30  # argmax equal on >= 97% of the 1,000 images
    assert abs(correct_sim - correct_int) <= 15  # accuracy within 1.5 points


def test_plain_simulation_meets_issue_bounds_with_single_rounding() -> None:
    """Issue 6's bounds, end to end, for the integer model with TFLite's single rounding.

    One rounding of ``acc M0 2^-(31+n)`` is fake quantization's ``round(y / S)`` up to float32
    noise and the multiplier's 2^-31 relative error, so layers differ only within that noise of a
    tie (a few outputs per million, test_each_layer_within_one_lsb) and almost nothing cascades.
    Measured: 99.92-99.93% of logit codes equal, max 1 LSB, argmax equal on all 1,000 images,
    accuracy 93.4 vs 93.4 (94.6 vs 94.6 with one thread).
    """
    o = outputs("single")
    diff, flipped, correct_sim, correct_int = _agreement(o)
    n = o.labels.numel()
    assert int(diff.max()) <= 1  # never more than 1 LSB apart
    assert flipped <= n // 1000  # argmax equal on >= 99.9% of images
    assert abs(correct_sim - correct_int) <= n // 1000  # accuracy within 0.1 point
    assert (diff == 0).float().mean().item() >= 0.995


def _layer_modules(model: nn.Module, graph: fx.Graph, op: ConvOp) -> list[nn.Module]:
    """The prepared modules from the conv/linear ``op.name`` to the quantizer that makes ``op.output``."""
    modules = dict(model.named_modules())
    node = next(n for n in graph.nodes if n.op == "call_module" and n.target == op.name)
    chain = [modules[str(node.target)]]
    while node.name != op.output:
        (node,) = list(node.users)  # conv -> folded BatchNorm -> ReLU: one consumer each
        chain.append(modules[str(node.target)])
    return chain


@pytest.mark.parametrize(("rounding", "max_fraction"), [("gemmlowp", 0.2), ("single", 0.0005)])
def test_each_layer_within_one_lsb(rounding: str, max_fraction: float) -> None:
    """The 1-LSB contract per requantization: the same input codes through one conv/linear layer.

    Simulation: dequantize the codes, the float32 conv with the rounded weights and the int32
    bias (S_in S_w round(b / (S_in S_w)), the integer model's codes), folded BatchNorm, ReLU and
    fake quantization ``round(y / S_out)``. Integer op: the exact accumulator with the same
    bias, requantized by ``M0 2^-31 2^-n``. Both round the same real value ``v = M acc``: the
    simulation up to float32 noise (|error| << 1/2 code), the integer op up to its multiplier
    error (2^-31 relative) and double rounding (<= 2^-(n+1) codes). Each result is within
    1/2 + that of ``v``, so they are at most 1 code apart, and differ only where ``v`` lies that
    close to a .5 tie. Without the int32 bias the simulation's value is ``M acc + M e`` with a
    bias error ``|e| <= 1/2``, and M/2 codes can be more than that.

    Max 1 is the contract; the fraction of differing outputs depends on the trained model (and
    so on the float kernels and thread count): measured 0.03-0.24% per layer with gemmlowp's
    double rounding, but 13.5% in the stem with the model trained on another CPU (2026-12-02, an
    Intel Xeon): there many stem outputs sit within 2^-10 of a .5 tie, e.g. 19.4993 codes, which
    SRDHM rounds to 19.5 (n = 9 fraction bits) and RoundingDivideByPOT then to 20, while the
    simulation rounds it to 19 (MNIST's repeated patches repeat those accumulators).
    With single rounding only float32 noise is left: measured 0-7 outputs per conv layer of
    0.8-3.1 million (at most 0.0005%). The fraction bounds are loose on purpose.
    """
    o, t = outputs(rounding), qat_resnet()
    x = t.test.tensors[0]
    graph = trace(t.model)
    env = {o.imodel.input_name: to_nhwc(o.imodel.quantize_input(x))}
    checked = []
    for op in o.imodel.ops:
        env[op.output] = op.run(*(env[n] for n in op.inputs))
        if not isinstance(op, ConvOp):
            continue
        q_in, q_out = to_nchw(env[op.inputs[0]]).long(), to_nchw(env[op.output]).long()
        y = (q_in.float() - op.in_qp.zero_point) * op.in_qp.scale_tensor()
        with torch.no_grad():
            for m in _layer_modules(t.model, graph, op):
                y = m(y)
        sim = torch.round(y / op.out_qp.scale_tensor()).long() + op.out_qp.zero_point
        diff = (sim - q_out).abs()
        assert int(diff.max()) <= 1, op.name
        assert diff.float().mean().item() < max_fraction, op.name
        checked.append(op.name)
    assert len(checked) == 10


def test_simulation_adds_the_integer_models_bias_codes() -> None:
    """convert() re-derives round_half_away(b / (S_in S_w)) from the already rounded bias: the same codes."""
    o, t = outputs(), qat_resnet()
    convs = [op for op in o.imodel.ops if isinstance(op, ConvOp)]
    for op in convs:
        codes = layer_bias_codes(t.model.get_submodule(op.name))
        assert codes is not None, op.name
        assert torch.equal(codes, op.bias.long()), op.name
    assert any(bool((op.bias != 0).any()) for op in convs)


def test_call_dequantizes_the_codes() -> None:
    o = outputs()
    x = qat_resnet().test.tensors[0][:16]
    y = o.imodel(x)
    assert y.dtype == torch.float32
    assert torch.equal(to_codes(y, o.imodel), o.int_codes[:16])


def test_integer_exact_restores_the_model() -> None:
    t = qat_resnet()
    x = t.test.tensors[0][:8]
    with torch.no_grad():
        before = t.model(x)
    with integer_exact(t.model):
        pass
    assert "forward" not in t.model.__dict__
    with torch.no_grad():
        assert torch.equal(t.model(x), before)


# --------------------------------------------------------------------------------------------
# The integer model itself
# --------------------------------------------------------------------------------------------


def test_jacob_constants() -> None:
    o = outputs()
    convs = [op for op in o.imodel.ops if isinstance(op, ConvOp)]
    assert {op.name for op in convs} >= {"stem.conv", "layer1.0.conv1", "layer2.0.shortcut.conv", "fc"}
    for op in convs:
        nz = op.multiplier != 0
        assert op.multiplier.dtype == torch.int32 and op.bias.dtype == torch.int32
        assert bool(((op.multiplier[nz] >= 2**30) & (op.multiplier[nz].long() < 2**31)).all())  # M0 in [2^30, 2^31)
        assert op.weight.dtype == torch.int8 and op.in_qp.dtype == torch.uint8 and op.acc_dtype == "int32"
        assert op.acc_bound < 2**31
        # M0 2^(shift - 31) approximates S_in S_w / S_out
        m = op.multiplier.double() * torch.pow(2.0, op.shift.double() - 31)
        real = op.in_scale * op.w_scale.double() / op.out_qp.scale
        torch.testing.assert_close(m, real, rtol=2**-30, atol=0)
    relu_out = next(op for op in convs if op.name == "stem.conv")
    assert relu_out.lo == relu_out.out_qp.zero_point  # ReLU folded into the clamp


def run_integer_dtypes(
    imodel: IntegerModel, codes: torch.Tensor | None = None, **inputs: torch.Tensor
) -> tuple[list[tuple[str, str, torch.Tensor]], list[torch.dtype]]:
    """``imodel.run_integer(codes)``'s record (or with keyword ``inputs``, a text model's), and the
    dtype of every tensor any torch op made on the way."""
    record: list[tuple[str, str, torch.Tensor]] = []
    seen: list[torch.dtype] = []

    class Dtypes(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            out = func(*args, **(kwargs or {}))
            for t in out if isinstance(out, (tuple, list)) else [out]:
                if isinstance(t, torch.Tensor):
                    seen.append(t.dtype)
            return out

    with Dtypes():
        imodel.run_integer(codes, record=record, **inputs)
    return record, seen


def test_only_integer_tensors_at_run_time() -> None:
    o = outputs()
    record, seen = run_integer_dtypes(o.imodel, o.imodel.quantize_input(qat_resnet().test.tensors[0][:32]))
    assert len(record) > len(o.imodel.ops) + 1  # outputs plus accumulators and sums
    bad = [(layer, what, t.dtype) for layer, what, t in record if t.dtype.is_floating_point]
    assert not bad
    assert seen and not [d for d in seen if d.is_floating_point or d.is_complex]
    accs = {t.dtype for layer, what, t in record if what == "accumulator"}
    assert accs == {torch.int32}


def test_run_integer_rejects_floats() -> None:
    o = outputs()
    with pytest.raises(TypeError, match="integer codes"):
        o.imodel.run_integer(torch.zeros(1, 1, 28, 28))


def test_save_load_round_trip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    o = outputs()
    path = tmp_path / "resnet.int.pt"
    o.imodel.save(path)
    state = torch.load(path, weights_only=True)  # plain tensors and Python values only
    assert state["precsim_integer_model"] == 3
    loaded = IntegerModel.load(path)
    x = qat_resnet().test.tensors[0][:200]
    assert torch.equal(loaded.output_codes(x), o.imodel.output_codes(x))
    assert describe(loaded) == describe(o.imodel)


def test_save_load_keeps_the_rounding(tmp_path) -> None:  # type: ignore[no-untyped-def]
    o = outputs("single")
    path = tmp_path / "single.int.pt"
    o.imodel.save(path)
    state = torch.load(path, weights_only=True)
    assert state["rounding"] == "single"
    assert {op["rounding"] for op in state["ops"] if "rounding" in op} == {"single"}
    loaded = IntegerModel.load(path)
    assert loaded.rounding == "single"
    x = qat_resnet().test.tensors[0][:200]
    assert torch.equal(loaded.output_codes(x), o.imodel.output_codes(x))
    assert not torch.equal(loaded.output_codes(x), outputs("gemmlowp").imodel.output_codes(x))
    assert "requantization: single" in describe(loaded)
    assert "requantization: gemmlowp" in describe(outputs().imodel)
    assert "rounding='single'" in repr(loaded)


@pytest.mark.parametrize("damage", ["truncated", "empty", "garbage", "not_a_model"])
def test_a_damaged_integer_model_file_is_named(tmp_path, damage: str) -> None:  # type: ignore[no-untyped-def]
    """Truncated, empty or garbage files, or another torch file, give a ValueError naming the
    file and the way out, not a raw unpickling traceback."""
    path = tmp_path / "resnet.int.pt"
    outputs().imodel.save(path)
    data = path.read_bytes()
    if damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "garbage":
        path.write_bytes(b"\x00garbage" * 100)
    else:
        torch.save({"weights": torch.zeros(3)}, path)
    with pytest.raises(ValueError, match=r"resnet\.int\.pt.*(not a readable|not a precsim|not a valid)") as err:
        IntegerModel.load(path)
    assert "IntegerModel.save" in str(err.value) or "format version" in str(err.value)
    assert list(tmp_path.iterdir()) == [path]  # save left no temporary file behind


def test_version_1_files_load_as_gemmlowp() -> None:
    """Files written before the rounding option (format version 1) hold gemmlowp models."""
    o = outputs()
    state = o.imodel.state()
    state["precsim_integer_model"] = 1
    del state["rounding"]
    state["ops"] = [{k: v for k, v in op.items() if k != "rounding"} for op in state["ops"]]
    loaded = IntegerModel.from_state(state)
    assert loaded.rounding == "gemmlowp"
    x = qat_resnet().test.tensors[0][:100]
    assert torch.equal(loaded.output_codes(x), o.imodel.output_codes(x))
    state["precsim_integer_model"] = 4
    with pytest.raises(ValueError, match="format version 4"):
        IntegerModel.from_state(state)


def test_bad_rounding_is_named() -> None:
    t = qat_resnet()
    with pytest.raises(ValueError, match=r"'tflite'.*allowed: 'gemmlowp', 'single'"):
        convert(t.model, rounding="tflite")
    t.model.train()
    try:
        with pytest.raises(ValueError, match=r"'nearest'.*allowed: 'gemmlowp', 'single'"):
            with integer_exact(t.model, rounding="nearest"):
                pass
        assert t.model.training and "forward" not in t.model.__dict__  # left as it was
    finally:
        t.model.eval()
    state = outputs("single").imodel.state()
    state["rounding"] = "gemmlowp"  # ops that disagree with the model
    with pytest.raises(ValueError, match="requantize differently"):
        IntegerModel.from_state(state)


def test_describe_table() -> None:
    o = outputs()
    text = precsim.describe(o.imodel)
    lines = text.splitlines()
    for col in ("layer", "M0", "n", "Z_in", "Z_w", "Z_out", "S_in", "S_w", "S_out", "acc", "clamp"):
        assert col in lines[0]
    for name in ("stem.conv", "layer1.0.add", "layer2.0.shortcut.conv", "pool", "fc", "(input)", "(output)"):
        assert any(line.startswith(name) for line in lines), name
    stem = next(line for line in lines if line.startswith("stem.conv"))
    assert "uint8" in stem and "int8/ch" in stem and "int32" in stem
    assert "N=49" in next(line for line in lines if line.startswith("pool"))
    assert "constants:" in lines[-1] or any(line.startswith("constants:") for line in lines)


def test_size_is_a_quarter_of_fp32() -> None:
    o = outputs()
    fp32 = sum(p.numel() * 4 for p in qat_resnet().float_model.parameters())
    ratio = fp32 / o.imodel.nbytes()
    assert 3.0 < ratio <= 4.0


# --------------------------------------------------------------------------------------------
# Clear errors
# --------------------------------------------------------------------------------------------


class WithLayer(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 8)
        self.odd = layer
        self.fc2 = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.odd(self.fc1(x)))


def _prepared(model: nn.Module, cfg: dict | None = None) -> nn.Module:
    cfg = cfg or {"activation": "uint8", "weight": "int8", "rules": [{"match": "fc1", "input": "uint8"}]}
    return precsim.calibrate(model, [torch.randn(16, 8) for _ in range(2)], cfg)


def test_unprepared_model_is_refused() -> None:
    with pytest.raises(ConversionError, match="not prepared"):
        convert(get_model("resnet", widths=(4,)))


def test_unsupported_gelu_is_named() -> None:
    model = _prepared(WithLayer(nn.GELU()), {"activation": "uint8", "weight": "int8",
                                             "rules": [{"match": "fc1", "input": "uint8"},
                                                       {"type": "GELU", "activation": "uint8"}]})
    with pytest.raises(ConversionError, match=r"'odd'.*GELU"):
        convert(model)


class WithLSTM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.lstm = nn.LSTM(8, 8, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lstm(self.fc(x))[0]


def test_unsupported_lstm_is_named() -> None:
    model = precsim.calibrate(WithLSTM(), [torch.randn(2, 3, 8)], {
        "activation": "uint8", "weight": "int8", "rules": [{"match": "fc", "input": "uint8"}]})
    with pytest.raises(ConversionError, match=r"'lstm'.*LSTM"):
        convert(model)


def test_float_formats_are_refused() -> None:
    model = _prepared(WithLayer(nn.ReLU()), {"activation": "fp8_e4m3", "weight": "int8",
                                             "rules": [{"match": "fc1", "input": "uint8"}]})
    with pytest.raises(ConversionError, match="fp8_e4m3, not an integer format"):
        convert(model)


def test_unquantized_weights_are_refused() -> None:
    model = _prepared(WithLayer(nn.ReLU()), {"activation": "uint8", "rules": [{"match": "fc1", "input": "uint8"}]})
    with pytest.raises(ConversionError, match="weights of 'fc1'"):
        convert(model)


def test_unquantized_input_is_refused() -> None:
    model = _prepared(WithLayer(nn.ReLU()), {"activation": "uint8", "weight": "int8"})
    with pytest.raises(ConversionError, match="model input reaches 'fc1' unquantized"):
        convert(model)


def test_unfolded_batchnorm_is_refused() -> None:
    model = get_model("resnet", widths=(4,))
    cfg = integer_config(model, fold_bn=False)
    precsim.calibrate(model, [torch.randn(4, 1, 12, 12)], cfg)
    with pytest.raises(ConversionError, match="fold_bn"):
        convert(model)


def test_minmax_activation_observer_is_refused() -> None:
    model = _prepared(WithLayer(nn.ReLU()), {"activation": {"format": "uint8", "observer": "minmax"},
                                             "weight": "int8", "rules": [{"match": "fc1", "input": "uint8"}]})
    with pytest.raises(ConversionError, match="minmax"):
        convert(model)


def test_uncalibrated_quantizer_is_refused() -> None:
    model = precsim.prepare(WithLayer(nn.ReLU()), {"activation": "uint8", "weight": "int8",
                                                    "rules": [{"match": "fc1", "input": "uint8"}]})
    with pytest.raises(ConversionError, match="has not observed any data"):
        convert(model)
