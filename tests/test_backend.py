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


CASES = [
    ("fp8_e4m3", "nearest", {}),
    ("fp8_e4m3", "stochastic", {}),
    ("bf16", "toward_zero", {}),
    ("int8(axis=0)", "stochastic", {"scale": torch.rand(64) + 0.01, "zero_point": torch.zeros(64)}),
    ("dse(e=4,m=3)", "nearest", {}),
    ("mxfp4", "stochastic", {}),
    ("nvfp4", "nearest", {}),
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


def test_prepared_model_same_with_compiled_kernels(compiled) -> None:
    """A training step through compiled quantizers equals the eager one, gradients included."""

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(80, 96), nn.ReLU(), nn.Linear(96, 10))
        precsim.prepare(model, {"activation": "fp8_e4m3", "weight": "fp8_e4m3",
                                "gradient": {"format": "fp8_e4m3", "rounding": "stochastic"}}, seed=1)
        x = torch.randn(64, 80)
        out = model(x)
        out.square().sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    fast_out, fast_grads = run()
    set_compile(False)
    ref_out, ref_grads = run()
    assert torch.equal(fast_out, ref_out)
    for a, b in zip(fast_grads, ref_grads, strict=True):
        assert torch.equal(a, b)
