"""What a number is: frozen format records behind one interface (:class:`Format`) and pure
rounding functions. Nothing here compiles or keeps state; see :mod:`precsim.runtime`."""

from precsim.formats.base import Format, FormatRow, MeasuredState
from precsim.formats.block import BlockFormat
from precsim.formats.dse import DSEFormat
from precsim.formats.float import FloatFormat
from precsim.formats.integer import IntFormat
from precsim.formats.parse import Family, format_names, parse_format, register_family
from precsim.formats.rounding import ROUNDINGS, Rounding

__all__ = [
    "ROUNDINGS",
    "BlockFormat",
    "DSEFormat",
    "Family",
    "FloatFormat",
    "Format",
    "FormatRow",
    "IntFormat",
    "MeasuredState",
    "Rounding",
    "format_names",
    "parse_format",
    "register_family",
]
