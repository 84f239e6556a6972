"""Format specs: ``"fp8_e4m3"``, ``"flexfp(e=4,m=3,b=-4)"``, ``"int8(axis=0)"`` -> Format.

Each family parses its own names (in its own file); :data:`FAMILIES` is the one table that
lists them. A family defined elsewhere (a test, a user's package) joins with
:func:`register_family` and then works everywhere a spec string does: configs, sweeps,
``precsim.quantize`` and ``precsim formats``.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from precsim.formats.base import Format
from precsim.formats.block import BLOCKS, parse_block
from precsim.formats.dse import parse_dse
from precsim.formats.float import FLOATS, parse_float
from precsim.formats.integer import parse_int
from precsim.formats.options import parse_options


class Family(NamedTuple):
    """A format family: ``kind`` is the word its formats' table rows start with;
    ``parse(name, spec, options)`` returns its Format, or None when ``name`` is not one of its
    names; ``presets`` are the names ``precsim formats`` lists; ``usage`` says how its
    parametrized specs are written (for error messages and help)."""

    kind: str
    parse: Callable[[str, str, dict[str, object]], Format | None]
    presets: tuple[str, ...]
    usage: str = ""


FAMILIES: list[Family] = [
    Family("float", parse_float, tuple(FLOATS), "flexfp(e=,m=,b=)"),
    Family("block", parse_block, tuple(BLOCKS)),
    Family("dse", parse_dse, (), "dse(e=,m=)"),
    Family("int", parse_int, ("int8", "uint8", "int4"), "intN / uintN (N = 2..16)"),
]
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

_SPEC = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*$")


def register_family(family: Family) -> None:
    """Add a format family (its names must not be taken: the first family to claim a name wins)."""
    FAMILIES.append(family)


def format_names() -> list[str]:
    """Every preset name, in table order."""
    return [name for family in FAMILIES for name in family.presets]


def format_kinds() -> list[str]:
    """The kinds of format, one per family, in table order."""
    return list(dict.fromkeys(family.kind for family in FAMILIES))


def family_usages() -> list[str]:
    """How each family's parametrized specs are written."""
    return [family.usage for family in FAMILIES if family.usage]


def _allowed() -> str:
    return f"{', '.join(format_names())}, or {', '.join(family_usages())}"


def parse_format(spec: str | Format) -> Format:
    """Turn a spec string into a frozen Format (a Format passes through).

    Raises ValueError naming the bad part and what is allowed.
    """
    if not isinstance(spec, str) and isinstance(spec, Format):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a format is a spec string or a Format, got {type(spec).__name__}: {spec!r}")
    match = _SPEC.match(spec)
    if not match:
        raise ValueError(f"cannot parse format {spec!r}; allowed: {_allowed()}")
    name = match.group(1).lower()
    name = ALIASES.get(name, name)
    opts = parse_options(spec, match.group(2))
    for family in FAMILIES:
        fmt = family.parse(name, spec, opts)
        if fmt is not None:
            return fmt
    raise ValueError(f"unknown format {spec!r}; allowed: {_allowed()}")
