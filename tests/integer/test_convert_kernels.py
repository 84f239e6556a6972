"""Integer kernels and layer types, on small calibrated models (no training needed).

Every model is converted, in both requantization rounding modes; the integer kernels
(channels-last im2col + int32 matmul with the zero-point terms precomputed, fused fixed-point
requantization) must give the codes of the float64 reference path (channels-first, the
fixedpoint.py functions) exactly, and the plain fake-quant simulation to within 1 LSB (2 through
several layers with gemmlowp's double rounding: see _check).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import precsim
from precsim.integer.convert import convert, integer_config
from precsim.integer.exact import integer_exact
from precsim.integer.fixedpoint import multiply_by_quantized_multiplier
from precsim.integer.model import IntegerModel
from precsim.integer.ops import AddOp, AvgPoolOp, ConvOp, FixedPointMultiplier, QParams, RequantOp, to_nhwc
from precsim.zoo import Add

ROUNDINGS = ["gemmlowp", "single"]


@pytest.fixture(autouse=True)
def _seed() -> None:
    """The same models whatever ran before: the layers below draw their initial weights from the global RNG."""
    torch.manual_seed(0)


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_fused_multiplier_is_bit_exact_with_fixedpoint(rounding: str) -> None:
    g = torch.Generator().manual_seed(0)
    shifts = list(range(-40, 8)) + [-62, -61, -33, -32, 29, 30, 31]
    for shift in shifts:
        for m0 in (0, 1, 1 << 30, (1 << 31) - 1, 1518500250, 1073741825):
            x = torch.cat([torch.randint(-2**31, 2**31, (2000,), generator=g),
                           torch.randint(-4096, 4096, (2000,), generator=g),
                           torch.tensor([-2**31, 2**31 - 1, 0, 1, -1])])
            expected = multiply_by_quantized_multiplier(x, m0, shift, rounding=rounding).long()
            assert torch.equal(FixedPointMultiplier(m0, shift, rounding)(x), expected), (m0, shift)
    m0 = torch.randint(1 << 30, 1 << 31, (7,), generator=g).int()
    sh = torch.tensor([-1, -5, 0, 2, -31, -40, -62], dtype=torch.int32)
    x = torch.randint(-2**20, 2**20, (300, 7), generator=g)
    assert torch.equal(FixedPointMultiplier(m0, sh, rounding)(x),
                       multiply_by_quantized_multiplier(x, m0, sh, axis=-1, rounding=rounding).long())
    ties = torch.arange(-5000, 5000)  # x * 2^30 / 2^31 = x / 2: every odd x is a tie, and more below
    for e in range(0, 12):
        assert torch.equal(FixedPointMultiplier(1 << 30, -e, rounding)(ties),
                           multiply_by_quantized_multiplier(ties, 1 << 30, -e, rounding=rounding).long())


def test_fused_multiplier_rounding_is_checked() -> None:
    with pytest.raises(ValueError, match=r"'half_even'.*allowed: 'gemmlowp', 'single'"):
        FixedPointMultiplier(1 << 30, -3, "half_even")


def _codes(y: torch.Tensor, imodel: IntegerModel) -> torch.Tensor:
    qp = imodel.output_qp
    return (torch.round(y / qp.scale_tensor()) + qp.zero_point).long()


def _check(model: nn.Module, x: torch.Tensor, sim_tolerance: int | None = None,
           rounding: str = "gemmlowp") -> IntegerModel:
    """Integer == fixed-point simulation exactly; plain simulation within ``sim_tolerance`` codes.

    Default tolerance: 1 code with single rounding (measured: 0 on 40 seeds of Residual and 90
    models of Convs); 2 with gemmlowp's double rounding, whose per-layer 1-code flips can add up
    through several layers (measured: 2 codes on 2 of 40 seeds of Residual, 1 of 90 Convs models).
    """
    if sim_tolerance is None:
        sim_tolerance = 2 if rounding == "gemmlowp" else 1
    model.eval()
    imodel = convert(model, rounding=rounding)
    assert imodel.rounding == rounding
    ints = imodel.output_codes(x).long()
    with integer_exact(model, rounding=rounding):
        exact = _codes(model(x), imodel)
    assert torch.equal(ints, exact)
    with torch.no_grad():
        sim = _codes(model(x), imodel)
    assert int((sim - ints).abs().max()) <= sim_tolerance
    return imodel


def _calibrated(model: nn.Module, shape: tuple[int, ...], cfg: dict | None = None, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    cfg = integer_config(model) if cfg is None else cfg
    data = [torch.randn(16, *shape) for _ in range(4)]
    return precsim.calibrate(model, data, cfg)


class Convs(nn.Module):
    """Strides, padding, dilation, groups, bias, a ReLU6, max pooling and average pooling."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=1, padding=1)
        self.r1 = nn.ReLU6()
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=2, dilation=2, groups=4)
        self.bn2 = nn.BatchNorm2d(8)
        self.r2 = nn.ReLU()
        self.mp = nn.MaxPool2d(2, 2, padding=1)
        self.c3 = nn.Conv2d(8, 6, (1, 3), stride=(1, 2), padding=(0, 1), bias=False)
        self.ap = nn.AvgPool2d(2)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(6 * 2 * 1, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.r1(self.c1(x))
        x = self.mp(self.r2(self.bn2(self.c2(x))))
        return self.fc(self.flat(self.ap(self.c3(x))))


@pytest.mark.parametrize("rounding", ROUNDINGS)
@pytest.mark.parametrize("activation, weight", [
    ("uint8", {"format": "int8", "granularity": "per_channel"}),
    ("int8", "int8"),
    ("int8(symmetric=false)", {"format": "uint8", "granularity": "per_channel"}),  # affine weights: Z2 terms
    ("uint4", "int4"),
    ("uint8", "int4"),
    ("int8", {"format": "uint8", "granularity": "per_channel"}),
])
def test_layer_zoo_matches(activation: str, weight: object, rounding: str) -> None:
    model = Convs()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2)
    model = _calibrated(model, (3, 13, 9), integer_config(model, activation, weight))
    imodel = _check(model, torch.randn(12, 3, 13, 9), rounding=rounding)
    kinds = [op.kind for op in imodel.ops]
    assert kinds.count("conv") == 4 and "maxpool" in kinds and "avgpool" in kinds
    if weight != "int8" and weight != "int4":
        assert all(op.w_scale.numel() > 1 for op in imodel.ops if isinstance(op, ConvOp))


class Residual(nn.Module):
    """Add modules and inline ``+`` (fused with the ReLU that follows), torch.cat, x.flatten()."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.ra = nn.ReLU()
        self.b = nn.Conv2d(2, 4, 1)
        self.add = Add()
        self.relu = nn.ReLU()
        self.c = nn.Conv2d(4, 4, 3, padding=1)
        self.d = nn.Conv2d(4, 4, 3, padding=1)
        self.relu2 = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.relu(self.add(self.ra(self.a(x)), self.b(x)))
        z = self.relu2(self.c(y) + self.d(y))
        p = self.pool(torch.cat([z, z], dim=1))
        return self.fc(p.flatten(1))


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_residual_adds_and_concatenation(rounding: str) -> None:
    model = _calibrated(Residual(), (2, 6, 6))
    imodel = _check(model, torch.randn(20, 2, 6, 6), rounding=rounding)
    kinds = [op.kind for op in imodel.ops]
    assert kinds.count("add") == 2 and "cat" in kinds
    assert all(op.lo == op.out_qp.zero_point for op in imodel.ops if op.kind == "add")  # ReLU in the clamp


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(20, 16)
        self.relu = nn.ReLU()
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.relu(self.fc1(self.flatten(x))))


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_mlp_without_folding_requantizes_relu(rounding: str) -> None:
    """Linear -> ReLU with both outputs quantized: the ReLU becomes its own requantization."""
    model = Mlp()
    cfg = {"activation": "uint8", "weight": "int8", "rules": [{"match": "fc1", "input": "int8"}]}
    model = _calibrated(model, (4, 5), cfg)
    imodel = _check(model, torch.randn(50, 4, 5), rounding=rounding)
    assert [op.kind for op in imodel.ops] == ["flatten", "conv", "requant", "conv"]


def test_input_quantpoint_and_quantized_add() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = precsim.QuantPoint()
            self.a = nn.Linear(6, 6)
            self.b = nn.Linear(6, 6)
            self.add = Add()
            self.out = nn.Linear(6, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.q(x)
            return self.out(self.add(self.a(x), self.b(x)))

    cfg = {"activation": "int8", "weight": "int8", "rules": [{"type": "Add", "activation": "int8"}]}
    model = _calibrated(Net(), (6,), cfg)
    imodel = _check(model, torch.randn(64, 6))
    assert [op.kind for op in imodel.ops] == ["conv", "conv", "add", "conv"]


@pytest.mark.parametrize("rounding", ROUNDINGS)
def test_int16_activations_use_int64_accumulators(rounding: str) -> None:
    """K x 2^15 x 2^7 overflows int32: detected, said, and still exact."""
    model = nn.Sequential(nn.Conv2d(256, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))
    cfg = {"activation": "int16", "weight": "int8", "rules": [{"match": "0", "input": "int16"}]}
    model = _calibrated(model, (256, 4, 4), cfg)
    with pytest.warns(UserWarning, match="exceeds int32"):
        imodel = convert(model.eval())
    conv = imodel.ops[0]
    assert isinstance(conv, ConvOp) and conv.acc_dtype == "int64" and conv.pre_shift > 0
    assert "int64" in precsim.describe(imodel) and any("int64" in n for n in imodel.notes)
    record: list[tuple[str, str, torch.Tensor]] = []
    x = torch.randn(6, 256, 4, 4)
    imodel.run_integer(imodel.quantize_input(x), record=record)
    assert {t.dtype for layer, what, t in record if what == "accumulator" and layer == "0"} == {torch.int64}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _check(model, x, rounding=rounding)


def test_calibrated_resnet_relu6() -> None:
    from precsim.zoo import get_model

    model = get_model("resnet", widths=(4, 8), activation="relu6")
    imodel = _check(_calibrated(model, (1, 12, 12)), torch.randn(16, 1, 12, 12))
    stem = next(op for op in imodel.ops if op.name == "stem.conv")
    assert isinstance(stem, ConvOp)
    six = int(torch.round(torch.tensor(6.0) / stem.out_qp.scale_tensor())) + stem.out_qp.zero_point
    assert stem.hi == min(stem.out_qp.qmax, six)


# --------------------------------------------------------------------------------------------
# Every requantizing op honours the rounding mode
# --------------------------------------------------------------------------------------------


def _half_up(v: torch.Tensor, e: int) -> torch.Tensor:
    """floor(v / 2^e + 1/2) exactly (Python ints): single rounding's rule."""
    return torch.tensor([(int(a) + (1 << (e - 1))) >> e for a in v.flatten().tolist()]).reshape(v.shape)


def test_add_and_pool_ops_follow_the_rounding_mode() -> None:
    """AddOp's rescaling and final >> L, AvgPoolOp's and RequantOp's multiplier: kernel == reference in each
    mode, single mode equal to one half-up rounding, and the two modes differ on ties."""
    qa, qb, qo = QParams(0.1, 3, 0, 255), QParams(0.05, 0, -128, 127), QParams(0.2, 10, 0, 255)
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 256, (2, 16, 16, 1), generator=g).to(torch.uint8)  # NHWC codes
    b = torch.randint(-128, 128, (2, 16, 16, 1), generator=g).to(torch.int8)
    results = {}
    for rounding in ROUNDINGS:
        # M = 1/2 and 1/4 exactly, L = 2: many exact ties in the final >> L
        add = AddOp("add", ["a", "b"], "y", qa, qb, qo, 1 << 30, 0, 1 << 30, -1, 2, 0, 255, rounding)
        ref = add.reference(a, b)
        assert torch.equal(add.run(a, b).long(), ref), rounding
        pool = AvgPoolOp("pool", ["x"], "y", qa, qo, 0, 255, (2, 2), (2, 2), rounding=rounding)
        assert torch.equal(pool.run(a).long(), to_nhwc(pool.reference(a.permute(0, 3, 1, 2))).long()), rounding
        req = RequantOp("rq", ["x"], "y", qa, qo, 1 << 30, -1, 0, 255, rounding)
        assert torch.equal(req.run(a).long(), req.reference(a)), rounding
        results[rounding] = (ref, req.reference(a))
        if rounding == "single":
            sa = _half_up(((a.long() - 3) << 2) * (1 << 30), 31)
            sb = _half_up(((b.long() - 0) << 2) * (1 << 30), 32)
            want = torch.clamp(_half_up(sa + sb, 2) + 10, 0, 255)
            assert torch.equal(ref, want)
            assert torch.equal(req.reference(a), torch.clamp(_half_up((a.long() - 3) * (1 << 30), 32) + 10, 0, 255))
    assert not torch.equal(results["gemmlowp"][0], results["single"][0])  # negative ties differ
    assert not torch.equal(results["gemmlowp"][1], results["single"][1])
