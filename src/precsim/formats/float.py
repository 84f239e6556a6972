"""Sign-magnitude floating-point formats: FlexFP, IEEE-style, OCP fn/fnuz and finite-only.

A :class:`FloatFormat` is data; rounding is :func:`precsim.formats.rounding.round_float`.

FlexFP (Tamiya et al.): 1 sign bit, ``e`` exponent bits, ``m`` mantissa bits and an exponent
shift ``b``: value = (-1)^s (1.m) 2^(E - (2^(e-1) - 1) + b). So ``b`` multiplies every value by
2^b: ``flexfp(e=8,m=7,b=0)`` is bfloat16 and ``flexfp(e=5,m=10,b=0)`` is IEEE half.

``specials`` says which codes are not finite numbers:

- ``ieee``: the top exponent code holds Inf and NaN (IEEE 754, bf16, fp16, OCP E5M2);
- ``fn``: no Inf; only S.11..1.11..1 is NaN (OCP E4M3FN: max 448);
- ``fnuz``: no Inf, no -0; the code of -0 is the one NaN, and the exponent bias is one
  larger than IEEE's (Graphcore/AMD E4M3FNUZ, E5M2FNUZ, Google's E4M3B11FNUZ);
- ``finite``: every code is a number (OCP FP6/FP4, or hardware modelled without specials).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from precsim.formats.base import FormatRow
from precsim.formats.options import exponent_mantissa, need_int, take
from precsim.formats.random import bits_for
from precsim.formats.rounding import Rounding, round_float

SPECIALS: tuple[str, ...] = ("ieee", "fn", "fnuz", "finite")
OVERFLOWS: tuple[str, ...] = ("saturate", "inf", "nan")
FLOAT32_MAX = float(torch.finfo(torch.float32).max)

# preset name -> (exponent bits, mantissa bits, shift b, specials)
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


def _default_bias(e: int, specials: str) -> int:
    return 2 ** (e - 1) if specials == "fnuz" else 2 ** (e - 1) - 1


@dataclass(frozen=True)
class FloatFormat:
    """A floating-point format simulated inside float32.

    ``overflow`` defaults to ``inf`` for formats that have Inf and to ``saturate`` for those
    that do not; ``nan`` reproduces converters that turn overflow into NaN (ml_dtypes does this
    for E4M3FN and the fnuz formats).
    """

    params = ()
    default_ste = "plain"
    observed = False
    state = None

    exponent_bits: int
    mantissa_bits: int
    bias: int = 0
    specials: str = "ieee"
    overflow: str = ""
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        e, m = self.exponent_bits, self.mantissa_bits
        if not (isinstance(e, int) and 1 <= e <= 8):
            raise ValueError(f"exponent bits e={e!r} not allowed; allowed: integers 1..8")
        if not (isinstance(m, int) and 0 <= m <= 23):
            raise ValueError(f"mantissa bits m={m!r} not allowed; allowed: integers 0..23")
        if not isinstance(self.bias, int):
            raise ValueError(f"exponent shift b={self.bias!r} must be an integer")
        if self.specials not in SPECIALS:
            raise ValueError(f"specials={self.specials!r} not allowed; allowed: {', '.join(SPECIALS)}")
        if self.specials == "fn" and m == 0:
            raise ValueError("specials='fn' needs at least 1 mantissa bit (its NaN is the all-ones mantissa)")
        if self.specials == "ieee" and e == 1:
            raise ValueError("specials='ieee' needs e >= 2 (the top exponent code is reserved)")
        overflow = self.overflow or ("inf" if self.specials == "ieee" else "saturate")
        if overflow not in OVERFLOWS:
            raise ValueError(f"overflow={overflow!r} not allowed; allowed: {', '.join(OVERFLOWS)}")
        if overflow == "inf" and self.specials != "ieee":
            allowed = "saturate" if self.specials == "finite" else "saturate, nan"
            raise ValueError(
                f"overflow='inf' needs a format with Inf (specials='ieee'), not {self.specials!r}; allowed: {allowed}"
            )
        if overflow == "nan" and self.specials == "finite":
            raise ValueError("overflow='nan' needs a format with a NaN code, not specials='finite'; allowed: saturate")
        object.__setattr__(self, "overflow", overflow)
        if self.min_exponent - m < -149 or self.max > FLOAT32_MAX:
            raise ValueError(
                f"flexfp(e={e},m={m},b={self.bias}) reaches past float32 (smallest subnormal "
                f"2^{self.min_exponent - m}, max {self.max:.4g}); allowed: smallest subnormal "
                f">= 2^-149 and max <= {FLOAT32_MAX:.4g}"
            )
        if not self.name:
            object.__setattr__(self, "name", self.spec)

    # --- derived properties -------------------------------------------------------------
    @property
    def bits(self) -> int:
        return 1 + self.exponent_bits + self.mantissa_bits

    @property
    def storage_bits(self) -> float:
        return float(self.bits)

    @property
    def exponent_bias(self) -> int:
        """The encoding's exponent bias (IEEE-style bias minus the FlexFP shift ``b``)."""
        return _default_bias(self.exponent_bits, self.specials) - self.bias

    @property
    def min_exponent(self) -> int:
        """Exponent of the smallest normal number."""
        return 1 - self.exponent_bias

    @property
    def max_exponent(self) -> int:
        top_code = 2**self.exponent_bits - (2 if self.specials == "ieee" else 1)
        return top_code - self.exponent_bias

    @property
    def max(self) -> float:
        m = self.mantissa_bits
        lost = 2 if self.specials == "fn" else 1  # fn: the all-ones mantissa is NaN
        return (2.0 - lost * 2.0**-m) * 2.0**self.max_exponent

    @property
    def smallest_normal(self) -> float:
        return 2.0**self.min_exponent

    @property
    def smallest_subnormal(self) -> float:
        return 2.0 ** (self.min_exponent - self.mantissa_bits)

    @property
    def has_inf(self) -> bool:
        return self.specials == "ieee"

    @property
    def has_negative_zero(self) -> bool:
        return self.specials != "fnuz"

    @property
    def spec(self) -> str:
        parts = [f"e={self.exponent_bits}", f"m={self.mantissa_bits}", f"b={self.bias}"]
        if self.specials != "ieee":
            parts.append(f"specials={self.specials}")
        default_overflow = "inf" if self.specials == "ieee" else "saturate"
        if self.overflow != default_overflow:
            parts.append(f"overflow={self.overflow}")
        return f"flexfp({','.join(parts)})"

    @property
    def is_float32(self) -> bool:
        """True when every float32 value is representable (quantizing is the identity)."""
        return self.mantissa_bits == 23 and self.min_exponent <= -126 and self.max >= FLOAT32_MAX

    def nan_codes(self) -> str:
        return {
            "ieee": "Inf and NaN in the top exponent code",
            "fn": "no Inf; NaN = S.1..1.1..1",
            "fnuz": "no Inf, no -0; NaN = the code of -0",
            "finite": "none (all codes finite)",
        }[self.specials]

    def describe(self) -> str:
        return (
            f"{self.name}: float, {self.bits} bits (1 sign, {self.exponent_bits} exponent, "
            f"{self.mantissa_bits} mantissa), exponent bias {self.exponent_bias}; "
            f"max {self.max:.6g}, smallest normal {self.smallest_normal:.6g}, smallest "
            f"subnormal {self.smallest_subnormal:.6g}; specials: {self.nan_codes()}; "
            f"overflow -> {self.overflow}"
        )

    def __str__(self) -> str:
        return self.describe()

    def table_row(self) -> FormatRow:
        sub = "-" if self.mantissa_bits == 0 else f"{self.smallest_subnormal:.6g}"
        return FormatRow("float", str(self.bits), f"{self.max:.6g}", sub, self.specials, self.overflow)

    @property
    def ste_clip(self) -> float | None:
        return None if self.is_float32 else self.max

    @property
    def gradient_limit(self) -> float:
        return self.max

    # --- rounding -------------------------------------------------------------------------
    def quantize(
        self,
        x: Tensor,
        rounding: Rounding = "nearest",
        seed: Tensor | None = None,
        random_bits: Tensor | None = None,
    ) -> Tensor:
        """Round float32 ``x`` to this format (see :func:`round_float`)."""
        if self.is_float32:
            return x
        random_bits = bits_for(x.shape, rounding, seed, random_bits)
        return round_float(
            x,
            mantissa_bits=self.mantissa_bits,
            min_exponent=self.min_exponent,
            max_value=self.max,
            overflow=self.overflow,  # type: ignore[arg-type]
            negative_zero=self.has_negative_zero,
            rounding=rounding,
            random_bits=random_bits,
        )

    def shifted(self, b: int) -> FloatFormat:
        """The same layout with exponent shift ``b`` (values scaled by 2^b)."""
        return FloatFormat(self.exponent_bits, self.mantissa_bits, b, self.specials, self.overflow)



def parse_float(name: str, spec: str, opts: dict[str, object]) -> FloatFormat | None:
    """A preset of :data:`FLOATS` (option: ``overflow``) or ``flexfp(e=,m=,b=,specials=,overflow=)``."""
    if name in FLOATS:
        e, m, b, specials = FLOATS[name]
        kw = take(spec, opts, {"overflow": "overflow"})
        return FloatFormat(e, m, b, specials, name=name if not kw else spec.strip(), **kw)  # type: ignore[arg-type]
    if name != "flexfp":
        return None
    kw = take(spec, opts, {"e": "e", "m": "m", "b": "b", "specials": "specials", "overflow": "overflow"})
    e, m = exponent_mantissa(spec, "flexfp", kw, "b=, specials=, overflow=")
    b = need_int(spec, "b", kw.pop("b", 0))
    return FloatFormat(e, m, b, **kw)  # type: ignore[arg-type]
