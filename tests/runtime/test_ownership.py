"""Backward rounds a gradient in place only when it owns it, and the result is the same."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

import precsim
from precsim.qat.markers import Add
from precsim.runtime.backend import compile_enabled, set_compile
from precsim.runtime.ownership import owns_gradient
from qat._models import ResidualMLP


class _Check(torch.autograd.Function):
    """Records, in backward, whether it owns its incoming gradient."""

    seen: list[bool] = []

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        refs = sys.getrefcount(grad)
        _Check.seen.append(owns_gradient(grad, refs))
        return grad


def _owned(build) -> list[bool]:  # type: ignore[no-untyped-def]
    _Check.seen = []
    build(torch.randn(4, 6, requires_grad=True))
    return _Check.seen


def test_a_private_gradient_is_owned() -> None:
    assert _owned(lambda x: (_Check.apply(x) * 2).sum().backward()) == [True]
    assert _owned(lambda x: torch.relu(_Check.apply(x)).sum().backward()) == [True]


def _kept_by_hook(x: torch.Tensor) -> None:
    y = _Check.apply(x)
    kept = []
    y.register_hook(kept.append)
    (y * 2).sum().backward()


@pytest.mark.parametrize("build", [
    lambda x: (_Check.apply(x) + _Check.apply(x)).square().sum().backward(),  # an add shares one tensor
    lambda x: (_Check.apply(x) + x).square().sum().backward(),
    lambda x: _Check.apply(x).backward(torch.ones(4, 6)),  # the caller's tensor
    lambda x: _Check.apply(x).sum().backward(),  # an expanded view
    _kept_by_hook,  # a hook keeps a reference
    lambda x: (_Check.apply(x) * 2).sum().backward(create_graph=True),
], ids=["add-shared", "add-with-leaf", "caller-grad", "expanded", "hook", "create-graph"])
def test_a_shared_gradient_is_not_owned(build) -> None:  # type: ignore[no-untyped-def]
    assert _owned(build) and not any(_owned(build))


class _ConvResidual(nn.Module):
    """4-D activations: MX blocks of 8 channels, or rows of 7 with ``axis=-1`` (its
    rows-shorter-than-a-block path)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.relu, self.conv2, self.add = nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), Add()
        self.head = nn.Linear(8 * 49, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.relu(self.conv1(x))
        return self.head(self.add(self.conv2(h), h).flatten(1))


CONFIGS = {
    "int8": {"activation": "int8", "weight": "int8"},
    "int8+grad": {"activation": "int8", "weight": "int8", "gradient": "int8"},
    "fp8 clipped, SR grad": {"activation": {"format": "fp8_e4m3", "ste": "clipped"}, "weight": "fp8_e4m3",
                             "gradient": {"format": "hfp8_bwd", "rounding": "stochastic"}},
    "mx grad": {"activation": "int8", "gradient": "mxfp8_e5m2"},
    "mx channels, mx grad": {"activation": "mxfp8_e4m3", "weight": "mxfp8_e4m3", "gradient": "mxfp8_e5m2"},
    "mx rows, mx grad": {"activation": "mxfp8_e4m3(axis=-1)", "weight": "mxfp8_e4m3(axis=-1)",
                         "gradient": "mxfp8_e5m2(axis=-1)"},
    "mx rows, scaled mx grad": {"activation": "mxfp8_e4m3(axis=-1)",
                                "gradient": {"format": "mxfp8_e5m2(axis=-1)", "scale": "dynamic"}},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_in_place_backward_equals_eager(name: str, monkeypatch: pytest.MonkeyPatch, requires_compiler: None) -> None:
    """Compiled (in place where owned) and eager (never in place) gradients are bit-identical on
    a residual model, and a gradient the caller passes in is left as it was."""

    def run() -> list[torch.Tensor]:
        torch.manual_seed(0)
        rows = name.startswith(("mx rows", "mx channels"))
        model = _ConvResidual() if rows else ResidualMLP()
        precsim.prepare(model, CONFIGS[name], seed=3)
        x = torch.randn(32, 4, 7, 7, requires_grad=True) if rows else torch.randn(128, 96, requires_grad=True)
        out = model(x)
        g = torch.randn_like(out)
        g_before = g.clone()
        out.backward(g)
        assert torch.equal(g, g_before)
        return [x.grad] + [p.grad for p in model.parameters()]

    import precsim.qat.quantizer as quantizer

    owned = []

    def spy(grad: torch.Tensor, refs: int) -> bool:
        owned.append(owns_gradient(grad, refs))
        return owned[-1]

    monkeypatch.setattr(quantizer, "owns_gradient", spy)
    before = compile_enabled()
    try:
        set_compile(True)
        fast = run()
        assert any(owned) and not all(owned)  # both paths ran: in place, and into a new tensor
        set_compile(False)
        ref = run()
    finally:
        set_compile(before)
    for a, b in zip(fast, ref, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
