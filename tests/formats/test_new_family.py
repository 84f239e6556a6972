"""A format family defined here, in the test, and registered at run time, works everywhere a
built-in one does: ``precsim.quantize`` (eager and compiled), ``prepare`` and training with
quantized gradients, and ``precsim formats``. Nothing else in precsim is edited to add it:
that is the Format interface's promise (docs/architecture.md, "How to add a format")."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

import precsim
from precsim.cli import main
from precsim.formats import Family, Format, FormatRow, parse_format, register_family
from precsim.formats import parse as parse_module
from precsim.formats.options import need_int, take
from precsim.formats.random import bits_for


@dataclass(frozen=True)
class Pow2Format:
    """Sign and a power of two: 0 or +-2^k for k in -2^(e-1)..2^(e-1)-1 (a logarithmic format
    with no mantissa). Saturates at the top; below half the smallest power it flushes to 0."""

    params = ()
    default_ste = "plain"
    observed = False
    state = None

    exponent_bits: int = 3
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not 1 <= self.exponent_bits <= 7:
            raise ValueError(f"pow2: e={self.exponent_bits} not allowed; allowed: 1..7")
        if not self.name:
            object.__setattr__(self, "name", self.spec)

    @property
    def spec(self) -> str:
        return f"pow2(e={self.exponent_bits})"

    @property
    def storage_bits(self) -> float:
        return 1.0 + self.exponent_bits  # sign + exponent (and a code for zero)

    @property
    def kmin(self) -> int:
        return -(2 ** (self.exponent_bits - 1))

    @property
    def kmax(self) -> int:
        return 2 ** (self.exponent_bits - 1) - 1

    @property
    def ste_clip(self) -> float:
        return 2.0**self.kmax

    @property
    def gradient_limit(self) -> float:
        return 2.0**self.kmax

    def describe(self) -> str:
        return f"{self.name}: sign and a power of two 2^{self.kmin}..2^{self.kmax}; saturates"

    def table_row(self) -> FormatRow:
        return FormatRow("log", str(1 + self.exponent_bits), f"{2.0**self.kmax:.6g}", "-", "finite", "saturate")

    def quantize(self, x: Tensor, rounding: str = "nearest", seed: Tensor | None = None,
                 random_bits: Tensor | None = None) -> Tensor:
        a = x.abs()
        _, e = torch.frexp(a)  # a = m 2^e, m in [0.5, 1): 2^(e-1) <= a < 2^e
        low = torch.ldexp(torch.ones_like(a), e - 1)
        if rounding == "nearest":
            up = a >= 1.5 * low  # the midpoint of [2^(e-1), 2^e]; ties away from zero
        elif rounding == "toward_zero":
            up = torch.zeros_like(a, dtype=torch.bool)
        else:  # stochastic: up with probability (a - low) / low
            bits = bits_for(x.shape, rounding, seed, random_bits)
            u = ((bits >> 8) & 0xFFFFFF).float() * 2.0**-24
            up = u < (a - low) / low
        q = torch.where(up, 2 * low, low).clamp(max=2.0**self.kmax)
        bottom = 2.0**self.kmin
        q = torch.where(a < bottom, torch.where(a >= bottom / 2, bottom, 0.0) if rounding == "nearest"
                        else torch.zeros_like(a), q)
        q = torch.where(a == torch.inf, 2.0**self.kmax, q)
        return torch.where(x != x, x, torch.copysign(q, x))


def parse_pow2(name: str, spec: str, opts: dict[str, object]) -> Pow2Format | None:
    if name == "pow2_e3":
        take(spec, opts, {})
        return Pow2Format(3, name="pow2_e3")
    if name != "pow2":
        return None
    kw = take(spec, opts, {"e": "exponent_bits"})
    return Pow2Format(need_int(spec, "e", kw.get("exponent_bits", 3)))


@pytest.fixture
def pow2(monkeypatch: pytest.MonkeyPatch) -> None:
    """The family registered for one test (the table restored afterwards)."""
    monkeypatch.setattr(parse_module, "FAMILIES", list(parse_module.FAMILIES))
    register_family(Family("log", parse_pow2, ("pow2_e3",), "pow2(e=)"))


def _grid(fmt: Pow2Format) -> Tensor:
    powers = torch.tensor([2.0**k for k in range(fmt.kmin, fmt.kmax + 1)])
    return torch.cat([-powers.flip(0), torch.zeros(1), powers])


def test_the_family_parses_and_satisfies_the_interface(pow2: None) -> None:
    fmt = parse_format("pow2(e=4)")
    assert isinstance(fmt, Format) and fmt == Pow2Format(4)
    assert parse_format(fmt.spec) == fmt and parse_format("pow2_e3") == Pow2Format(3)
    with pytest.raises(ValueError, match="unknown option 'm'"):
        parse_format("pow2(m=2)")


def test_quantize_rounds_to_the_nearest_grid_value(pow2: None) -> None:
    fmt = parse_format("pow2(e=3)")
    x = torch.randn(4096) * 4
    q = precsim.quantize(x, "pow2(e=3)")
    grid = _grid(fmt)  # type: ignore[arg-type]
    assert torch.isin(q, grid).all()
    # nearest: no grid value is closer than the one chosen (ties are measure zero here)
    best = (x[:, None] - grid[None, :]).abs().min(dim=1).values
    assert torch.equal((x - q).abs(), best)


def test_quantize_compiled_equals_eager(pow2: None, compiled: None) -> None:
    x = torch.randn(3, 1000) * 8
    for rounding in ("nearest", "stochastic", "toward_zero"):
        g = torch.Generator().manual_seed(5)
        fast = precsim.quantize(x, "pow2(e=3)", rounding=rounding, generator=g)
        g = torch.Generator().manual_seed(5)
        with precsim.runtime.compiling(False):
            ref = precsim.quantize(x, "pow2(e=3)", rounding=rounding, generator=g)
        assert torch.equal(fast, ref), rounding


def test_it_trains_through_prepare_with_quantized_gradients(pow2: None) -> None:
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16
    y = torch.tensor(digits.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    precsim.prepare(model, {"activation": "pow2(e=4)", "weight": "pow2(e=4)",
                            "gradient": {"format": "pow2(e=5)", "rounding": "stochastic"}}, seed=1)
    seen: list[Tensor] = []
    model[0].register_forward_hook(lambda m, a, out: seen.append(out.detach()))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for step in range(60):
        batch = slice(step * 25 % 1500, step * 25 % 1500 + 25)
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[batch]), y[batch]).backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(x[1500:]).argmax(1) == y[1500:]).float().mean().item()
    assert accuracy > 0.6, accuracy  # chance is 0.1
    grid = _grid(Pow2Format(4))
    assert all(torch.isin(out, grid).all() for out in seen)  # the layer's output is on the grid
    assert "pow2(e=4)" in precsim.summary(model)
    assert np.isfinite([p.detach().sum().item() for p in model.parameters()]).all()


def test_precsim_formats_lists_it(pow2: None) -> None:
    out = io.StringIO()
    with redirect_stdout(out):
        assert main(["formats", "--kind", "log"]) == 0
    text = out.getvalue()
    assert "pow2_e3" in text and "log" in text and "pow2(e=)" in text
