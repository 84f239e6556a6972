"""Agreement with torch's own casts: x.to(dtype).float() for bf16, fp16 and the float8 types.

torch 2.13 (CPU) differs between its float8 types on overflow:
- ``float8_e4m3fn`` saturates: every finite |x| past 448 *and* ±Inf become ±448, which is our
  default (``overflow=saturate``) and differs from ml_dtypes (NaN) and from ``overflow=nan``;
- ``float8_e4m3fnuz`` / ``float8_e5m2fnuz`` turn overflow and ±Inf into NaN (our
  ``overflow=nan``; our default saturates);
- ``float8_e5m2`` overflows to ±Inf like IEEE (our default).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from precsim.formats import parse_format
from precsim.runtime import quantize

from ._helpers import assert_same_bits, boundaries, every_exponent, ties

CASTS = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp8_e4m3": torch.float8_e4m3fn,
    "fp8_e5m2": torch.float8_e5m2,
    "fp8_e4m3fnuz(overflow=nan)": torch.float8_e4m3fnuz,
    "fp8_e5m2fnuz(overflow=nan)": torch.float8_e5m2fnuz,
}


def torch_values(dtype: torch.dtype) -> np.ndarray:
    n = torch.finfo(dtype).bits
    codes = torch.arange(2**n, dtype=torch.int32).to(torch.int16 if n == 16 else torch.uint8)
    return codes.view(dtype).float().numpy()


@pytest.mark.parametrize("spec", list(CASTS))
def test_matches_torch_cast(spec: str) -> None:
    dtype = CASTS[spec]
    fmt = parse_format(spec)
    vals = torch_values(dtype)
    fin = np.unique(np.abs(vals[np.isfinite(vals)]))
    assert fmt.max == fin[-1] and fmt.smallest_subnormal == fin[1]
    rng = np.random.default_rng(5)
    x = np.concatenate([
        every_exponent(rng, 16),
        ties(vals, rng, limit=40000),
        boundaries(fmt.smallest_subnormal, fmt.smallest_normal, fmt.max, float(fin[-1] - fin[-2])),
    ])
    xt = torch.from_numpy(x)
    assert_same_bits(quantize(xt, spec), xt.to(dtype).float(), x, spec)


def test_torch_e4m3fn_saturates_including_inf() -> None:
    """torch's float8_e4m3fn cast saturates finite overflow and ±Inf to ±448: our default agrees
    and ``overflow=nan`` (ml_dtypes' behaviour) does not."""
    x = torch.tensor([464.0, 465.0, 480.0, 1e6, 3e38, float("inf")])
    x = torch.cat([x, -x])
    t = x.to(torch.float8_e4m3fn).float()
    assert torch.equal(t, torch.sign(x) * 448)
    assert torch.equal(quantize(x, "fp8_e4m3"), t)
    nan_variant = quantize(x, "fp8_e4m3(overflow=nan)")
    assert torch.isnan(nan_variant[torch.abs(x) > 464]).all()
    assert nan_variant[0] == 448 and nan_variant[6] == -448  # 464 ties down to 448


def test_torch_fnuz_overflow_is_nan_our_default_saturates() -> None:
    for spec, dtype in [("fp8_e4m3fnuz", torch.float8_e4m3fnuz), ("fp8_e5m2fnuz", torch.float8_e5m2fnuz)]:
        fmt = parse_format(spec)
        x = torch.tensor([fmt.max * 2, float("inf"), -float("inf")])
        assert torch.isnan(x.to(dtype).float()).all()
        assert torch.equal(quantize(x, spec), torch.tensor([fmt.max, fmt.max, -fmt.max]))
