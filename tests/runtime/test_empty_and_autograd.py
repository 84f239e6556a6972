"""Empty and 0-d tensors work for every format, and ``precsim.quantize`` has one autograd
contract for every format: the straight-through estimator."""

from __future__ import annotations

import pytest
import torch

import precsim

SPECS = ["fp32", "bf16", "fp16", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "hfp8_fwd", "flexfp(e=4,m=3,b=-4)", "int8",
         "uint8", "int8(axis=0)", "int4(group=32)", "dse(e=4,m=3)", "mxfp8_e4m3", "mxfp4", "mxint8", "nvfp4"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("shape", [(0,), (0, 32), (3, 0, 32)])
@pytest.mark.parametrize("rounding", ["nearest", "stochastic"])
def test_empty_tensors_give_empty_results(spec: str, shape: tuple[int, ...], rounding: str) -> None:
    x = torch.empty(shape)
    y = precsim.quantize(x, spec, rounding=rounding)
    assert y.shape == x.shape and y.dtype == torch.float32


@pytest.mark.parametrize("spec", [s for s in SPECS if "group" not in s])
def test_zero_d_tensors_round_like_one_element(spec: str) -> None:
    x = torch.tensor(1.3)
    y = precsim.quantize(x, spec)
    assert y.shape == () and y.item() == precsim.quantize(x.reshape(1), spec).item()


def test_zero_d_with_groups_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="int4.*group=32.*0-d tensor"):
        precsim.quantize(torch.tensor(1.3), "int4(group=32)")


@pytest.mark.parametrize("spec", SPECS)
def test_gradient_is_straight_through_for_every_format(spec: str) -> None:
    """d quantize(x) / dx = 1 everywhere, also where the format saturates or the value is
    outside an automatic integer scale's range; the values are those without autograd."""
    torch.manual_seed(0)
    x = (torch.randn(4, 64) * 100).requires_grad_()
    y = precsim.quantize(x, spec)
    assert y.requires_grad
    assert torch.equal(y.detach().view(torch.int32), precsim.quantize(x.detach(), spec).view(torch.int32))
    g = torch.randn(4, 64)
    y.backward(g)
    assert torch.equal(x.grad, g)


def test_no_graph_without_requires_grad_and_under_no_grad() -> None:
    x = torch.randn(64, requires_grad=True)
    with torch.no_grad():
        assert not precsim.quantize(x, "int8").requires_grad
    assert not precsim.quantize(torch.randn(64), "fp8_e4m3").requires_grad


def test_gradient_keeps_the_input_dtype() -> None:
    x = torch.randn(64, dtype=torch.float64, requires_grad=True)
    precsim.quantize(x, "mxfp4").sum().backward()
    assert x.grad.dtype == torch.float64 and torch.equal(x.grad, torch.ones(64, dtype=torch.float64))


def test_a_prepared_model_takes_a_zero_size_batch() -> None:
    from precsim.zoo import get_model

    model = precsim.prepare(get_model("resnet"), {"activation": "int8", "weight": "mxfp8_e4m3",
                                                  "gradient": "int8"})
    out = model(torch.empty(0, 1, 28, 28))
    assert out.shape == (0, 10)
    out.sum().backward()


@pytest.mark.parametrize(("spec", "inf", "block_nan"), [
    ("bf16", float("inf"), False),
    ("fp8_e5m2", float("inf"), False),
    ("fp8_e4m3", 448.0, False),
    ("fp4_e2m1", 6.0, False),
    ("dse(e=4,m=3)", float("inf"), False),
    ("int8", 1.5, False),  # symmetric over the finite values [-1.5, 1]: Inf saturates to 127 S = 1.5
    ("int8(axis=0)", 1.5, False),
    ("mxfp8_e4m3", float("nan"), True),
    ("mxint8", float("nan"), True),
    ("nvfp4", float("nan"), True),
])
def test_inf_and_nan_follow_the_documented_policy(spec: str, inf: float, block_nan: bool) -> None:
    """NaN stays NaN; +Inf becomes the format's Inf or its largest value (for an integer with
    an automatic scale: the top of the range measured over finite values); a block holding a
    non-finite value is NaN, and only that block."""
    x = torch.ones(2, 64)
    x[0, 1] = -1.5
    x[0, 0], x[0, 2] = float("inf"), float("nan")
    y = precsim.quantize(x, spec)
    top = y[0, 0].item()
    assert (top != top) if inf != inf else top == pytest.approx(inf, rel=0.01)
    assert y[0, 2].isnan()
    assert y[0, 3].isnan() == block_nan
    assert torch.isfinite(y[1]).all()  # the other row (its own block or channel) stays finite
