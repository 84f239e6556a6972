"""What a number is: frozen format descriptions and pure rounding functions."""

from precsim.formats.block import BlockFormat
from precsim.formats.dse import DSEFormat
from precsim.formats.float import FloatFormat
from precsim.formats.integer import IntFormat
from precsim.formats.parse import Format, format_names, parse_format
from precsim.formats.quantize import quantize
from precsim.formats.rounding import ROUNDINGS, Rounding

__all__ = [
    "ROUNDINGS",
    "BlockFormat",
    "DSEFormat",
    "FloatFormat",
    "Format",
    "IntFormat",
    "Rounding",
    "format_names",
    "parse_format",
    "quantize",
]
