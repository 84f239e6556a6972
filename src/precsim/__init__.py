"""precsim: simulate number formats inside float32 PyTorch, and show the integer model."""

from precsim.formats import (
    BlockFormat,
    DSEFormat,
    FloatFormat,
    Format,
    IntFormat,
    format_names,
    parse_format,
    quantize,
)

__version__ = "0.1.0"

__all__ = [
    "BlockFormat",
    "DSEFormat",
    "FloatFormat",
    "Format",
    "IntFormat",
    "format_names",
    "parse_format",
    "quantize",
]

from precsim.config import QuantConfig, RoleSpec  # noqa: E402
from precsim.prepare import QuantPoint, prepare, quantizers, summary  # noqa: E402

__all__ += ["QuantConfig", "QuantPoint", "RoleSpec", "prepare", "quantizers", "summary"]

from precsim.optim import QuantizedOptimizer  # noqa: E402

__all__ += ["QuantizedOptimizer"]
