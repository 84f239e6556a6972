"""Bad specs and bad arguments raise ValueError naming what is allowed."""

from __future__ import annotations

import pytest
import torch

from precsim.formats import FloatFormat, IntFormat, parse_format
from precsim.runtime import quantize

BAD_SPECS = [
    ("flexfp(e=9,m=30)", r"e=9 not allowed; allowed: integers 1\.\.8"),
    ("flexfp(e=4,m=30)", r"m=30 not allowed; allowed: integers 0\.\.23"),
    ("int1", r"integer bits 1 not allowed; allowed: 2\.\.16"),
    ("int17", r"integer bits 17 not allowed; allowed: 2\.\.16"),
    ("uint0", r"integer bits 0 not allowed; allowed: 2\.\.16"),
    ("fp8_e9m9", r"unknown format 'fp8_e9m9'; allowed: fp32, bf16, .*fp8_e4m3.*mxfp4.*flexfp\(e=,m=,b=\)"),
    ("nosuch", r"unknown format 'nosuch'; allowed: .*nvfp4.*intN / uintN"),
    ("mxfp4(block=0)", r"block_size=0 not allowed; allowed: integers >= 1"),
    ("flexfp(e=4)", r"flexfp needs e= and m= \(and optionally b=, specials=, overflow=\)"),
    ("dse(m=3)", r"dse needs e= and m="),
    ("fp8_e4m3(overflow=inf)", r"overflow='inf' needs a format with Inf.*allowed: saturate, nan"),
    ("fp4_e2m1(overflow=nan)", r"overflow='nan' needs a format with a NaN code.*allowed: saturate"),
    ("flexfp(e=4,m=3,overflow=wrap)", r"overflow='wrap' not allowed; allowed: saturate, inf, nan"),
    ("flexfp(e=4,m=3,specials=ocp)", r"specials='ocp' not allowed; allowed: ieee, fn, fnuz, finite"),
    ("flexfp(e=8,m=7,b=5)", r"reaches past float32.*allowed: smallest subnormal >= 2\^-149 and max <= 3\.403e\+38"),
    ("flexfp(e=4,m=x)", r"m='x' must be an integer"),
    ("int8(foo=1)", r"unknown option 'foo'; allowed: symmetric, narrow, axis, group, group_size"),
    ("fp8_e4m3(foo=1)", r"unknown option 'foo'; allowed: overflow"),
    ("flexfp(e=4,m=3,q=1)", r"unknown option 'q'; allowed: e, m, b, specials, overflow"),
    ("dse(e=4,m=3,b=2)", r"unknown option 'b'; allowed: e, m, specials, overflow, delayed"),
    ("mxfp4(size=3)", r"unknown option 'size'; allowed: block, block_size, axis"),
    ("int8(narrow=yes)", r"narrow='yes' not allowed; allowed: true, false"),
    ("int8(symmetric=2)", r"symmetric=2 not allowed; allowed: true, false"),
    ("dse(e=4,m=3,delayed=maybe)", r"delayed='maybe' not allowed; allowed: true, false"),
    ("int8(group=0)", r"group_size=0 not allowed; allowed: integers >= 1"),
    ("uint8(narrow=true)", r"narrow=True needs a signed format"),
    ("int8(axis)", r"option 'axis' must be key=value"),
    ("fp8(", r"cannot parse format 'fp8\('; allowed: "),
    ("", r"cannot parse format ''; allowed: "),
]


@pytest.mark.parametrize("spec,match", BAD_SPECS, ids=[s or "empty" for s, _ in BAD_SPECS])
def test_bad_spec(spec: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_format(spec)
    with pytest.raises(ValueError, match=match):  # the same through quantize
        quantize(torch.ones(4), spec)


def test_not_a_spec() -> None:
    with pytest.raises(ValueError, match="a format is a spec string or a Format, got int"):
        parse_format(42)  # type: ignore[arg-type]


def test_bad_rounding() -> None:
    for r in ("up", "nearest_even", "STOCHASTIC", ""):
        with pytest.raises(ValueError, match=r"unknown rounding .*; allowed: nearest, stochastic, toward_zero"):
            quantize(torch.ones(4), "fp8_e4m3", rounding=r)  # type: ignore[arg-type]


@pytest.mark.parametrize("x", [torch.ones(3, dtype=torch.int32), torch.ones(3, dtype=torch.bool), [1.0, 2.0], 3.0,
                               torch.ones(3, dtype=torch.complex64)])
def test_wrong_input_type(x) -> None:
    with pytest.raises(ValueError, match="quantize needs a floating-point tensor"):
        quantize(x, "fp8_e4m3")


def test_unknown_parameter() -> None:
    with pytest.raises(ValueError, match=r"unknown parameter 'scale'.*allowed: random_bits"):
        quantize(torch.ones(3), "fp8_e4m3", scale=2.0)
    with pytest.raises(ValueError, match=r"unknown parameter 'shift'.*allowed: random_bits, scale, zero_point"):
        quantize(torch.ones(3), "int8", shift=2)
    with pytest.raises(ValueError, match=r"unknown parameter 'scale'.*allowed: random_bits, shift"):
        quantize(torch.ones(3), "dse(e=4,m=3)", scale=2)


def test_constructor_checks() -> None:
    with pytest.raises(ValueError, match="exponent shift b=0.5 must be an integer"):
        FloatFormat(4, 3, 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="specials='fn' needs at least 1 mantissa bit"):
        FloatFormat(4, 0, specials="fn")
    with pytest.raises(ValueError, match="axis='x' not allowed"):
        IntFormat(8, axis="x")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="a DSE element must have b=0"):
        from precsim.formats import DSEFormat

        DSEFormat(FloatFormat(4, 3, 2))
    with pytest.raises(ValueError, match="block scale 'e5m2' not allowed; allowed: e8m0, e4m3"):
        from precsim.formats import BlockFormat

        BlockFormat(FloatFormat(4, 3, 0, "fn"), scale="e5m2")
