"""Presets parse to frozen, hashable dataclasses that describe themselves and round-trip."""

from __future__ import annotations

import dataclasses

import pytest

from precsim.formats import BlockFormat, DSEFormat, FloatFormat, IntFormat, format_names, parse_format
from precsim.formats.parse import ALIASES, BLOCKS, FLOATS

PRESETS = [*FLOATS, *BLOCKS, "int8", "uint8", "int4", "int16", "uint2"]


def test_format_names_cover_the_tables() -> None:
    names = format_names()
    assert set(FLOATS) <= set(names) and set(BLOCKS) <= set(names)
    assert {"int8", "uint8", "int4"} <= set(names)
    assert len(names) == len(set(names))


@pytest.mark.parametrize("name", PRESETS)
def test_preset_parses_frozen_hashable(name: str) -> None:
    fmt = parse_format(name)
    assert parse_format(name) == fmt and hash(parse_format(name)) == hash(fmt)
    assert parse_format(fmt) is fmt  # a Format passes through
    assert parse_format(f"  {name.upper()}  ") == fmt  # case and spaces
    field = dataclasses.fields(fmt)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(fmt, field, 3)
    assert len({fmt, parse_format(name)}) == 1
    text = fmt.describe()
    assert str(fmt) == text and fmt.name in text
    assert "bits" in text
    if isinstance(fmt, FloatFormat):
        assert f"max {fmt.max:.6g}" in text and "specials:" in text and f"overflow -> {fmt.overflow}" in text
        assert f"{fmt.bits} bits" in text
    elif isinstance(fmt, IntFormat):
        assert f"{fmt.bits} bits" in text and f"{fmt.qmin}..{fmt.qmax}" in text and "NaN" in text
    else:
        assert isinstance(fmt, BlockFormat)
        assert f"{fmt.bits_per_element:g} bits" in text and fmt.element.name in text and "NaN" in text


def test_preset_values() -> None:
    e4m3 = parse_format("fp8_e4m3")
    assert (e4m3.max, e4m3.smallest_subnormal, e4m3.specials, e4m3.overflow) == (448, 2**-9, "fn", "saturate")
    assert parse_format("fp8_e5m2").max == 57344 and parse_format("fp8_e5m2").overflow == "inf"
    assert parse_format("fp8_e4m3fnuz").max == 240 and not parse_format("fp8_e4m3fnuz").has_negative_zero
    assert parse_format("fp8_e4m3b11fnuz").max == 30 and parse_format("fp8_e4m3b11fnuz").exponent_bias == 11
    assert parse_format("hfp8_fwd").exponent_bias == 11 and parse_format("hfp8_fwd").max == 15
    assert parse_format("fp6_e2m3").max == 7.5 and parse_format("fp6_e3m2").max == 28
    assert parse_format("fp4_e2m1").max == 6
    assert parse_format("bf16") == parse_format("flexfp(e=8,m=7,b=0)")
    assert parse_format("fp16") == parse_format("flexfp(e=5,m=10)")
    assert parse_format("fp32").is_float32
    mx = parse_format("mxfp8_e4m3")
    assert mx.block_size == 32 and mx.scale == "e8m0" and mx.element == e4m3 and mx.bits_per_element == 8.25
    assert parse_format("mxint8").element == IntFormat(8)
    nv = parse_format("nvfp4")
    assert nv.block_size == 16 and nv.scale == "e4m3" and nv.bits_per_element == 4.5


def test_aliases() -> None:
    for alias, name in ALIASES.items():
        assert parse_format(alias) == parse_format(name)


def test_equality_ignores_name_but_not_content() -> None:
    a = parse_format("fp8_e4m3")
    b = FloatFormat(4, 3, 0, "fn", name="mine")
    assert a == b and hash(a) == hash(b)
    assert a != parse_format("fp8_e4m3(overflow=nan)")
    assert parse_format("flexfp(e=4,m=3,b=-4)") != parse_format("flexfp(e=4,m=3,b=-3)")
    assert parse_format("int8(axis=0)") != parse_format("int8")
    assert parse_format("mxfp4(block=16)") != parse_format("mxfp4")
    assert parse_format("mxfp4(block=16)").block_size == 16


ROUND_TRIP = [
    *FLOATS, "int8", "uint8", "int4",
    "flexfp(e=4,m=3,b=-4)", "flexfp(e=3,m=0,b=2,specials=fnuz)", "flexfp(e=5,m=2,overflow=saturate)",
    "flexfp(e=4,m=3,specials=fn,overflow=nan)", "flexfp(e=2,m=1,specials=finite)", "fp8_e4m3(overflow=nan)",
    "int8(axis=0)", "int4(axis=-1,group=32)", "uint8(symmetric=true)", "int8(symmetric=false,narrow=true)",
    "int16(group=8)", "int3(narrow=true,axis=2)",
    "dse(e=4,m=3)", "dse(e=5,m=2,delayed=true)", "dse(e=4,m=3,specials=fn)",
    "dse(e=4,m=3,specials=fn,overflow=nan)", "dse(e=5,m=2,overflow=saturate)",
]


@pytest.mark.parametrize("spec", ROUND_TRIP)
def test_spec_round_trip(spec: str) -> None:
    fmt = parse_format(spec)
    assert isinstance(fmt, (FloatFormat, IntFormat, DSEFormat))
    again = parse_format(str(fmt.spec))
    assert again == fmt
    assert again.spec == fmt.spec
