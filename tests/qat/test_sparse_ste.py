"""The clipped STE kept as the indices of the few clipped elements (compiled kernels, CPU)
gives the gradients of the mask it replaces, bit for bit."""

from __future__ import annotations

import pytest
import torch

import precsim
import precsim.qat.quantizer as quantizer
from precsim.qat.config import parse_role
from precsim.qat.quantizer import Quantizer, SteArgs, is_sparse
from precsim.runtime.backend import compile_enabled, set_compile

from ._models import ResidualMLP


def _inside(x: torch.Tensor, q: Quantizer) -> torch.Tensor:
    """Where x lies within half a step of the int8 grid of the observer's current range."""
    lo, hi = q.observer.min_val, q.observer.max_val
    scale = torch.maximum(-lo.clamp(max=0), hi.clamp(min=0)) / 127
    return (x >= -128.5 * scale) & (x <= 127.5 * scale)


@pytest.mark.parametrize("owned", [False, True])
def test_few_clipped_elements_are_kept_as_indices(compiled, owned: bool) -> None:
    """A few values beyond the moving-average range (and a NaN) are stored as their flat
    indices; backward zeroes exactly those (Inf * 0 = NaN there, as mask * g gives), whether it
    writes into its own gradient or into a copy of the caller's."""
    q = Quantizer("activation", parse_role("activation", "int8")).train()
    q(torch.randn(64, 96))  # a first range
    x = torch.randn(64, 96) * 0.5
    x[3, 7], x[40, 1], x[63, 95] = 80.0, -90.0, float("nan")
    x.requires_grad_()
    y = q(x)
    inside = _inside(x.detach(), q)
    saved = y.grad_fn.saved_tensors
    assert len(saved) == 1 and saved[0].dtype == torch.int64
    assert torch.equal(saved[0], (~inside).view(-1).nonzero().squeeze(1))
    g = torch.randn(64, 96)
    g[3, 7], g[5, 5] = float("inf"), -0.0
    g_before = g.clone()
    if owned:
        (y * g).sum().backward()  # mul's backward makes a gradient of its own
    else:
        y.backward(g)
    assert torch.equal(g, g_before)
    expected = g * inside
    assert expected[3, 7].isnan()
    assert torch.equal(x.grad.view(torch.int32), expected.view(torch.int32))


def test_many_clipped_elements_keep_the_input(compiled) -> None:
    """Past 1/64 of the elements clipped, backward rebuilds the mask from the input instead."""
    q = Quantizer("activation", parse_role("activation", "int8")).train()
    q(torch.randn(64, 96))
    x = (torch.randn(64, 96) * 4).requires_grad_()
    y = q(x)
    inside = _inside(x.detach(), q)
    assert (~inside).sum() > x.numel() / 64
    assert y.grad_fn.saved_tensors[0].dtype == torch.float32
    g = torch.randn(64, 96)
    y.backward(g)
    assert torch.equal(x.grad, g * inside)


CONFIGS = {
    "int8": {"activation": "int8", "weight": "int8"},
    "int8, delayed": {"activation": {"format": "int8", "delayed": True}, "weight": "int8(axis=0)"},
    "int8 grad": {"activation": "int8", "gradient": {"format": "int8", "rounding": "stochastic"}},
    "scaled fp8 grad": {"activation": "int8", "gradient": {"format": "fp8_e5m2", "scale": "dynamic"}},
    "mx grad": {"activation": "int8", "gradient": "mxfp8_e5m2"},
    "input": {"input": "int8", "activation": "fp8_e4m3"},
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_with_sparse_ste_equals_eager(name: str, monkeypatch: pytest.MonkeyPatch, requires_compiler: None) -> None:
    """Training steps whose inputs outgrow the moving-average range, compiled (indices of the
    clipped elements) and eager (the mask): same outputs, gradients and state, bit for bit."""

    def run() -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        model = ResidualMLP()
        precsim.prepare(model, CONFIGS[name], seed=2)
        outs = []
        for step in range(4):
            x = torch.randn(128, 96) * (1.0 + 0.05 * step)  # slightly wider each step
            x[step, 3] = 40.0 * (step + 1)  # an outlier beyond the range
            model.zero_grad()
            out = model(x)
            out.square().sum().backward()
            outs += [out.detach()] + [p.grad.clone() for p in model.parameters()]
        return outs, model.state_dict()

    kinds: list[str] = []
    original = quantizer.clipped_ste

    def spy(*args: torch.Tensor | None) -> SteArgs | None:
        ste = original(*args)  # type: ignore[arg-type]
        kinds.append("none" if ste is None else "sparse" if is_sparse(ste) else "dense")
        return ste

    monkeypatch.setattr(quantizer, "clipped_ste", spy)
    before = compile_enabled()
    try:
        set_compile(True)
        fast, fast_state = run()
        assert "sparse" in kinds  # the indices path ran
        set_compile(False)
        ref, ref_state = run()
    finally:
        set_compile(before)
    for a, b in zip(fast, ref, strict=True):
        assert torch.equal(a.view(torch.int32), b.view(torch.int32))
    for k, v in ref_state.items():
        assert torch.equal(fast_state[k], v), k
