"""The default path is the compiled one, for the public functions too; the eager reference is
the opt-out (``PRECSIM_COMPILE=0``) and the fallback, with the same bits."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

import precsim
from precsim.formats import parse_format
from precsim.formats.random import draw_seed
from precsim.runtime.backend import kernels

_PROBE = """
import torch, precsim
from precsim.runtime.backend import compile_enabled, kernels
torch.manual_seed(0)
x = torch.randn(4096)
y = precsim.quantize(x, "fp8_e4m3")
print(compile_enabled(), sum(k.compiles for k in kernels()), y.view(torch.int32).sum().item())
"""


def _fresh_process(env_compile: str | None) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k != "PRECSIM_COMPILE"}
    if env_compile is not None:
        env["PRECSIM_COMPILE"] = env_compile
    out = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=600,
                         check=True)
    return out.stdout.split()


def test_a_fresh_process_compiles_precsim_quantize_by_default(requires_compiler: None) -> None:
    """No environment variable, no call: ``precsim.quantize`` runs a compiled kernel; with
    ``PRECSIM_COMPILE=0`` it runs none, and the bits are the same."""
    default = _fresh_process(None)
    off = _fresh_process("0")
    assert default[:2] == ["True", "1"], default
    assert off[:2] == ["False", "0"], off
    assert default[2] == off[2]


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.float().view(torch.int32)


@pytest.mark.parametrize(("spec", "rounding", "params"), [
    ("fp8_e4m3", "nearest", {}),
    ("bf16", "stochastic", {}),
    ("int8", "nearest", {}),
    ("int8", "stochastic", {"scale": 0.05, "zero_point": 3}),
    ("int8(axis=0)", "nearest", {"scale": torch.rand(64) + 0.01}),
    ("uint4(group=32)", "nearest", {}),
    ("dse(e=4,m=3)", "stochastic", {}),
    ("dse(e=4,m=3,delayed=true)", "nearest", {"shift": -3}),
    ("mxfp8_e4m3", "nearest", {}),
    ("mxfp4", "stochastic", {}),
    ("nvfp4", "nearest", {}),
])
def test_public_quantize_compiled_equals_the_reference(compiled, spec: str, rounding: str, params: dict) -> None:
    """``precsim.quantize`` on the compiled path gives the eager reference's bits (the same
    seed drawn from the same generator), parameters given as numbers or tensors."""
    torch.manual_seed(0)
    x = torch.randn(64, 96) * torch.exp2(torch.randint(-20, 20, (64, 96)).float())
    x[0, :5] = torch.tensor([0.0, -0.0, float("inf"), -float("inf"), float("nan")])
    fmt = parse_format(spec)
    y = precsim.quantize(x, spec, rounding=rounding, generator=torch.Generator().manual_seed(7), **params)
    seed = draw_seed(torch.Generator().manual_seed(7)) if rounding == "stochastic" else None
    want = fmt.quantize(x, rounding, seed=seed, **params)
    assert torch.equal(_bits(y), _bits(want))


def test_public_quantize_compiles_once_for_every_value_and_shape(compiled) -> None:
    """Numbers given as parameters and new shapes of a per-tensor format reuse one kernel."""
    precsim.quantize(torch.randn(300), "int8", scale=0.1, zero_point=0)
    before = sum(k.compiles for k in kernels())
    for scale, shape in ((0.2, (40, 30)), (0.3, (7, 9, 11)), (1.5, (5000,)), (0.25, (2, 3, 50))):
        precsim.quantize(torch.randn(shape), "int8", scale=scale, zero_point=1)
    assert sum(k.compiles for k in kernels()) == before


def test_explicit_random_bits_compiled_equal_the_reference(compiled) -> None:
    x = torch.randn(4096)
    bits = torch.randint(-(2**31), 2**31 - 1, (4096,), dtype=torch.int32)
    for spec in ("fp8_e5m2", "int8", "mxfp8_e4m3"):
        y = precsim.quantize(x, spec, rounding="stochastic", random_bits=bits)
        want = parse_format(spec).quantize(x, "stochastic", random_bits=bits)
        assert torch.equal(_bits(y), _bits(want)), spec
