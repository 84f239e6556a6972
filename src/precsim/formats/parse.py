"""Format specs: ``"fp8_e4m3"``, ``"flexfp(e=4,m=3,b=-4)"``, ``"int8(axis=0)"`` -> Format."""

from __future__ import annotations

import re

from precsim.formats.block import BlockFormat
from precsim.formats.dse import DSEFormat
from precsim.formats.float import FloatFormat
from precsim.formats.integer import IntFormat

Format = FloatFormat | IntFormat | DSEFormat | BlockFormat
FORMAT_TYPES = (FloatFormat, IntFormat, DSEFormat, BlockFormat)

# name -> (exponent bits, mantissa bits, shift b, specials)
FLOATS: dict[str, tuple[int, int, int, str]] = {
    "fp32": (8, 23, 0, "ieee"),
    "bf16": (8, 7, 0, "ieee"),
    "fp16": (5, 10, 0, "ieee"),
    "fp8_e4m3": (4, 3, 0, "fn"),
    "fp8_e5m2": (5, 2, 0, "ieee"),
    "fp8_e4m3fnuz": (4, 3, 0, "fnuz"),
    "fp8_e5m2fnuz": (5, 2, 0, "fnuz"),
    "fp8_e4m3b11fnuz": (4, 3, -3, "fnuz"),
    "fp6_e2m3": (2, 3, 0, "finite"),
    "fp6_e3m2": (3, 2, 0, "finite"),
    "fp4_e2m1": (2, 1, 0, "finite"),
    "hfp8_fwd": (4, 3, -4, "ieee"),  # HFP8 forward 1-4-3, exponent bias 11 (Table 1 of Tamiya et al.)
    "hfp8_bwd": (5, 2, 0, "ieee"),  # HFP8 backward 1-5-2
}
ALIASES: dict[str, str] = {
    "float32": "fp32",
    "bfloat16": "bf16",
    "float16": "fp16",
    "half": "fp16",
    "fp8_e4m3fn": "fp8_e4m3",
    "e4m3": "fp8_e4m3",
    "e5m2": "fp8_e5m2",
    "mxfp4_e2m1": "mxfp4",
}
# name -> (element preset, block size, scale)
BLOCKS: dict[str, tuple[str, int, str]] = {
    "mxfp8_e4m3": ("fp8_e4m3", 32, "e8m0"),
    "mxfp8_e5m2": ("fp8_e5m2", 32, "e8m0"),
    "mxfp6_e2m3": ("fp6_e2m3", 32, "e8m0"),
    "mxfp6_e3m2": ("fp6_e3m2", 32, "e8m0"),
    "mxfp4": ("fp4_e2m1", 32, "e8m0"),
    "mxint8": ("int8", 32, "e8m0"),
    "nvfp4": ("fp4_e2m1", 16, "e4m3"),
}
FAMILIES = ("flexfp(e=,m=,b=)", "dse(e=,m=)", "intN / uintN (N = 2..16)")

_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$")
_INT = re.compile(r"^(u?)int(\d+)$")


def format_names() -> list[str]:
    """Every preset name, in table order."""
    return [*FLOATS, *BLOCKS, "int8", "uint8", "int4"]


def _allowed() -> str:
    return f"{', '.join([*FLOATS, *BLOCKS])}, or {', '.join(FAMILIES)}"


def _value(key: str, text: str) -> int | str | bool | None:
    t = text.strip()
    low = t.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":
        return None
    try:
        return int(t)
    except ValueError:
        return t


def _options(name: str, body: str | None) -> dict[str, object]:
    if not body or not body.strip():
        return {}
    opts: dict[str, object] = {}
    for item in body.split(","):
        if "=" not in item:
            raise ValueError(f"format {name!r}: option {item.strip()!r} must be key=value")
        k, v = item.split("=", 1)
        opts[k.strip()] = _value(k.strip(), v)
    return opts


def _take(name: str, opts: dict[str, object], allowed: dict[str, str]) -> dict[str, object]:
    """Rename spec keys to constructor keys, rejecting unknown ones."""
    bad = [k for k in opts if k not in allowed]
    if bad:
        raise ValueError(f"format {name!r}: unknown option {bad[0]!r}; allowed: {', '.join(allowed)}")
    return {allowed[k]: v for k, v in opts.items()}


def _need_int(name: str, key: str, v: object) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"format {name!r}: {key}={v!r} must be an integer")
    return v


def parse_format(spec: str | Format) -> Format:
    """Turn a spec string into a frozen Format (a Format passes through).

    Raises ValueError naming the bad part and what is allowed.
    """
    if isinstance(spec, FORMAT_TYPES):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a format is a spec string or a Format, got {type(spec).__name__}: {spec!r}")
    match = _SPEC.match(spec)
    if not match:
        raise ValueError(f"cannot parse format {spec!r}; allowed: {_allowed()}")
    name, body = match.group(1).lower(), match.group(2)
    name = ALIASES.get(name, name)
    opts = _options(spec, body)

    if name in FLOATS:
        e, m, b, specials = FLOATS[name]
        kw = _take(spec, opts, {"overflow": "overflow"})
        return FloatFormat(e, m, b, specials, name=name if not kw else spec.strip(), **kw)  # type: ignore[arg-type]
    if name == "flexfp":
        kw = _take(spec, opts, {"e": "e", "m": "m", "b": "b", "specials": "specials", "overflow": "overflow"})
        if "e" not in kw or "m" not in kw:
            raise ValueError(f"format {spec!r}: flexfp needs e= and m= (and optionally b=, specials=, overflow=)")
        e, m = _need_int(spec, "e", kw.pop("e")), _need_int(spec, "m", kw.pop("m"))
        b = _need_int(spec, "b", kw.pop("b", 0))
        return FloatFormat(e, m, b, **kw)  # type: ignore[arg-type]
    if name == "dse":
        kw = _take(spec, opts, {"e": "e", "m": "m", "specials": "specials", "overflow": "overflow", "delayed": "delayed"})
        if "e" not in kw or "m" not in kw:
            raise ValueError(f"format {spec!r}: dse needs e= and m= (and optionally specials=, delayed=)")
        e, m = _need_int(spec, "e", kw.pop("e")), _need_int(spec, "m", kw.pop("m"))
        delayed = kw.pop("delayed", False)
        return DSEFormat(FloatFormat(e, m, 0, **kw), delayed=delayed)  # type: ignore[arg-type]
    if name in BLOCKS:
        elem_name, size, scale = BLOCKS[name]
        kw = _take(spec, opts, {"block": "block_size", "block_size": "block_size", "axis": "axis"})
        element = parse_format(elem_name)
        for k in kw:
            _need_int(spec, k, kw[k])
        return BlockFormat(element, block_size=kw.get("block_size", size), axis=kw.get("axis"),  # type: ignore[arg-type]
                           scale=scale, name=name if not kw else spec.strip())
    int_match = _INT.match(name)
    if int_match:
        bits = int(int_match.group(2))
        if not 2 <= bits <= 16:
            raise ValueError(f"format {spec!r}: integer bits {bits} not allowed; allowed: 2..16")
        kw = _take(spec, opts, {"symmetric": "symmetric", "narrow": "narrow", "axis": "axis",
                                "group": "group_size", "group_size": "group_size"})
        return IntFormat(bits, signed=not int_match.group(1), **kw)  # type: ignore[arg-type]
    raise ValueError(f"unknown format {spec!r}; allowed: {_allowed()}")
