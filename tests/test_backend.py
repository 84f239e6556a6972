"""The compiled fast path gives the same bits as the eager reference."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import precsim
from precsim.formats import parse_format
from precsim.formats.backend import compile_enabled, run_quantize, set_compile
from precsim.formats.random import draw_seed


@pytest.fixture
def compiled():
    before = compile_enabled()
    set_compile(True)
    yield
    set_compile(before)


def _data() -> torch.Tensor:
    """Normal values across many binades, subnormals, ties, specials."""
    torch.manual_seed(0)
    x = torch.randn(64, 96) * torch.exp2(torch.randint(-40, 40, (64, 96)).float())
    x[0, :8] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan"), 1e-40, -3e-39, 0.5])
    x[1] = torch.arange(96) * 0.0625 + 0.03125  # ties for coarse grids
    return x


CASES = [  # every family x rounding the kernel benchmark times, plus the special grids
    ("fp8_e4m3", "nearest", {}),
    ("fp8_e4m3", "stochastic", {}),
    ("bf16", "nearest", {}),
    ("bf16", "toward_zero", {}),
    ("hfp8_fwd", "stochastic", {}),
    ("int8", "stochastic", {}),
    ("int8(axis=0)", "nearest", {}),
    ("int8(axis=0)", "stochastic", {"scale": torch.rand(64) + 0.01, "zero_point": torch.zeros(64)}),
    ("int8(axis=0)", "stochastic", {}),
    ("dse(e=4,m=3)", "nearest", {}),
    ("dse(e=5,m=2)", "stochastic", {}),
    ("mxfp8_e4m3", "nearest", {}),
    ("mxfp8_e4m3", "stochastic", {}),
    ("mxfp4", "stochastic", {}),
    ("mxint8", "nearest", {}),
    ("nvfp4", "nearest", {}),
    ("nvfp4", "stochastic", {}),
]


@pytest.mark.parametrize(("spec", "rounding", "params"), CASES)
def test_compiled_equals_eager(compiled, spec: str, rounding: str, params: dict) -> None:
    fmt = parse_format(spec)
    x = _data()
    seed = draw_seed(torch.Generator().manual_seed(3))
    if "scale" in params:
        params = {"scale": params["scale"].reshape(64, 1), "zero_point": params["zero_point"].reshape(64, 1)}
    eager = fmt.quantize(x, rounding, seed=seed, **params)
    fast = run_quantize(fmt, x, rounding, seed, **params)
    assert torch.equal(eager.view(torch.int32), fast.view(torch.int32))
    # a second shape reuses the dynamic-shape kernel and still agrees
    y = x[:32, :64].contiguous()
    p2 = {k: v[:32] for k, v in params.items()}
    assert torch.equal(fmt.quantize(y, rounding, seed=seed, **p2).view(torch.int32),
                       run_quantize(fmt, y, rounding, seed, **p2).view(torch.int32))


CONFIGS = {  # the quantizer paths: float + mask, observer, DSE (delayed), MX, dynamic gradient scale
    "fp8_sr": {"activation": "fp8_e4m3", "weight": "fp8_e4m3",
               "gradient": {"format": "fp8_e4m3", "rounding": "stochastic"}},
    "int8": {"activation": "int8", "weight": "int8(axis=0)", "gradient": {"format": "int8", "rounding": "stochastic"}},
    "dse_mx_dynamic": {"activation": "dse(e=4,m=3,delayed=true)", "weight": "mxfp8_e4m3",
                       "gradient": {"format": "mxfp8_e5m2", "scale": "dynamic"},
                       "weight_gradient": {"format": "dse(e=5,m=2)", "scale": "dynamic", "rounding": "stochastic"}},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_prepared_model_same_with_compiled_kernels(compiled, name: str) -> None:
    """Training steps through compiled quantizers equal the eager ones: outputs, gradients, state."""

    def run() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(80, 96), nn.ReLU(), nn.Linear(96, 10))
        precsim.prepare(model, CONFIGS[name], seed=1)
        x = torch.randn(64, 80)
        outs = []
        for _ in range(2):  # the second step sees observer, delayed-shift and scale state
            model.zero_grad()
            out = model(x)
            out.square().sum().backward()
            outs += [out.detach()] + [p.grad.clone() for p in model.parameters()]
        return outs, model.state_dict()

    fast, fast_state = run()
    set_compile(False)
    ref, ref_state = run()
    for a, b in zip(fast, ref, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    for k, v in ref_state.items():
        assert torch.equal(fast_state[k], v), k
