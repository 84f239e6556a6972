"""precsim: simulate number formats inside float32 PyTorch, and show the integer model."""

from precsim.formats import (
    BlockFormat,
    DSEFormat,
    FloatFormat,
    Format,
    IntFormat,
    format_names,
    parse_format,
)
from precsim.runtime.quantize import quantize

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

from precsim.qat.config import QuantConfig, RoleSpec  # noqa: E402
from precsim.qat.fingerprint import loading_any_config  # noqa: E402
from precsim.qat.prepare import QuantPoint, prepare, quantizers, summary, summary_rows  # noqa: E402

__all__ += ["QuantConfig", "QuantPoint", "RoleSpec", "loading_any_config", "prepare", "quantizers", "summary",
            "summary_rows"]

from precsim.qat.optim import QuantizedOptimizer  # noqa: E402
from precsim.runtime.allocator import tune_allocator  # noqa: E402
from precsim.runtime.backend import set_compile  # noqa: E402

__all__ += ["QuantizedOptimizer", "set_compile", "tune_allocator"]

from precsim.integer.convert import ConversionError, convert, integer_config  # noqa: E402
from precsim.integer.exact import integer_exact  # noqa: E402
from precsim.integer.ibert_config import ibert_config  # noqa: E402
from precsim.integer.ivit_config import ivit_config  # noqa: E402
from precsim.integer.model import IntegerModel, describe  # noqa: E402
from precsim.integer.onnx_export import export_onnx  # noqa: E402
from precsim.qat.calibrate import calibrate  # noqa: E402
from precsim.qat.fold import fold_conv_bn  # noqa: E402
from precsim.qat.telemetry import collect_stats  # noqa: E402

__all__ += ["ConversionError", "IntegerModel", "calibrate", "collect_stats", "convert", "describe", "export_onnx", "fold_conv_bn",
            "ibert_config", "integer_config", "integer_exact", "ivit_config"]
