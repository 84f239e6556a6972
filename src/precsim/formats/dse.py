"""Dynamic shared exponent (FlexFP DSE, Tamiya et al.): a FlexFP whose shift follows the data.

The exponent shift ``b`` is chosen per tensor so that the tensor's largest finite magnitude
lands at the top of the format's range (and still rounds to a finite value). The delayed
variant uses the shift measured on the previous call, as hardware that cannot read a tensor
before writing it would; the caller keeps that state (see :meth:`DSEFormat.shift_for`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from precsim.formats.base import FormatRow, MeasuredState
from precsim.formats.float import FloatFormat
from precsim.formats.options import exponent_mantissa, take
from precsim.formats.random import bits_for
from precsim.formats.rounding import Rounding, exp2i, exponent_of, round_float


@dataclass(frozen=True)
class DSEFormat:
    """FlexFP ``element`` (its own shift must be 0) with a per-tensor shift from the data."""

    params = ("shift",)
    default_ste = "plain"
    observed = False
    ste_clip = None
    gradient_limit = 2.0**127  # a scale only has to keep S g finite (and off the lowest shift)

    element: FloatFormat
    delayed: bool = False
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not isinstance(self.delayed, bool):
            raise ValueError(f"delayed={self.delayed!r} not allowed; allowed: true, false")
        if self.element.bias != 0:
            raise ValueError(f"a DSE element must have b=0 (the shift is dynamic), got b={self.element.bias}")
        if not self.name:
            object.__setattr__(self, "name", self.spec)

    @property
    def spec(self) -> str:
        e = self.element
        extra = "" if e.specials == "ieee" else f",specials={e.specials}"
        if e.overflow != ("inf" if e.specials == "ieee" else "saturate"):
            extra += f",overflow={e.overflow}"
        delayed = ",delayed=true" if self.delayed else ""
        return f"dse(e={e.exponent_bits},m={e.mantissa_bits}{extra}{delayed})"

    @property
    def bits(self) -> int:
        return self.element.bits

    @property
    def storage_bits(self) -> float:
        return float(self.element.bits)  # the shift is one number per tensor

    @property
    def shift_range(self) -> tuple[int, int]:
        """Shifts that keep the scaled format inside float32."""
        e = self.element
        return -149 - e.min_exponent + e.mantissa_bits, 127 - e.max_exponent

    def describe(self) -> str:
        e = self.element
        when = "the previous call's" if self.delayed else "each tensor's own"
        return (
            f"{self.name}: float, {e.bits} bits (1 sign, {e.exponent_bits} exponent, "
            f"{e.mantissa_bits} mantissa) with a shared exponent shift from {when} max |x|; "
            f"range {e.max / e.smallest_subnormal:.3g}:1 within a tensor; specials: "
            f"{e.nan_codes()}; overflow -> {e.overflow}"
        )

    def __str__(self) -> str:
        return self.describe()

    def table_row(self) -> FormatRow:
        e = self.element
        sub = "-" if e.mantissa_bits == 0 else f"{e.smallest_subnormal:.6g} x 2^b"
        return FormatRow("dse", str(self.bits), f"{e.max:.6g} x 2^b", sub, e.specials, e.overflow)

    # --- per-call state: the shift ----------------------------------------------------------
    @property
    def state(self) -> MeasuredState:
        return MeasuredState(("dse_shift", "dse_ready"), (), integer=True, delayed=self.delayed)

    def measure(self, x: Tensor) -> Tensor:
        return self.shift_for(x)

    def state_params(self, state: Tensor) -> dict[str, Tensor]:
        return {"shift": state}

    def fast_options(self, stored: Tensor, rounding: str) -> dict[str, bool]:
        """``normal_grid`` where a stored shift allows the faster normal-grid rounding (reads the
        shift: on the CPU only, where reading it costs no device sync). Not asked where the
        rounding takes the scaled constant grid anyway (:meth:`quantize`, nearest)."""
        ok = (stored.device.type == "cpu" and not (self.scales_exactly and rounding == "nearest")
              and self.grid_is_normal(int(stored)))
        return {"normal_grid": True} if ok else {}

    def grid_is_normal(self, shift: int) -> bool:
        """Whether the grid shifted by ``shift`` stays within float32's normal range (its
        smallest normal exponent >= -126): true unless a tensor's max is below ~2^-118."""
        lo, hi = self.shift_range
        return self.element.min_exponent + min(max(shift, lo), hi) >= -126

    def shift_for(self, x: Tensor) -> Tensor:
        """The shift b (int32, 0-d) that puts max finite |x| at the top of the range."""
        e = self.element
        a = torch.where(torch.isfinite(x), x.abs(), torch.zeros_like(x)).amax() if x.numel() else x.new_zeros(())
        b = exponent_of(a) - e.max_exponent
        top = round_float(
            a,
            mantissa_bits=e.mantissa_bits,
            min_exponent=e.min_exponent + b,
            max_value=float("inf"),
            overflow="inf",
            negative_zero=True,
            rounding="nearest",
        )
        b = b + (top > e.max * exp2i(b)).to(torch.int32)  # max |x| would round past the top
        lo, hi = self.shift_range
        return torch.where(a > 0, b, torch.zeros_like(b)).clamp(lo, hi)

    def quantize(
        self,
        x: Tensor,
        rounding: Rounding = "nearest",
        seed: Tensor | None = None,
        random_bits: Tensor | None = None,
        shift: Tensor | int | None = None,
        normal_grid: bool = False,
    ) -> Tensor:
        """Round ``x`` with exponent shift ``shift`` (default: :meth:`shift_for` of ``x``).

        ``normal_grid``: the caller has read ``shift`` and knows :meth:`grid_is_normal` of it
        (a faster path with the same result; see :func:`round_float`)."""
        if self.delayed and shift is None:
            raise ValueError(f"{self.name} is delayed: pass shift= (the previous call's shift_for)")
        if shift is None:
            return self.quantize_measured(x, rounding, seed, random_bits)[0]
        b = torch.as_tensor(shift, dtype=torch.int32, device=x.device)
        lo, hi = self.shift_range
        b = b.clamp(lo, hi)
        random_bits = bits_for(x.shape, rounding, seed, random_bits)
        if self.scales_exactly and rounding == "nearest":
            return self._scaled(x, b, rounding, random_bits)
        e = self.element
        return round_float(
            x,
            mantissa_bits=e.mantissa_bits,
            min_exponent=e.min_exponent + b,
            max_value=e.max * exp2i(b),
            overflow=e.overflow,  # type: ignore[arg-type]
            negative_zero=e.has_negative_zero,
            rounding=rounding,
            random_bits=random_bits,
            normal_grid=normal_grid,
        )

    @property
    def scales_exactly(self) -> bool:
        """Whether x may be rounded as x / 2^b on the element's own grid, times 2^b.

        Dividing by 2^b loses bits only where x / 2^b falls below 2^-126; those values must
        round to zero from either representation, which holds when half the element's smallest
        step is at least 2^-126: every DSE element but 8-exponent-bit ones. Past the top (a
        stale, delayed shift), x / 2^b may become Inf where x is finite: both exceed the grid's
        max and overflow alike when rounding to nearest, but rounding toward zero saturates a
        finite x and not Inf, so it scales only with the tensor's own shift. Deterministic
        rounding only: stochastic rounding compares the random bits with the significand's
        dropped bits, whose alignment differs between a float32 subnormal x and the normal
        x / 2^b (both unbiased, not the same bits).
        """
        return self.element.min_exponent - self.element.mantissa_bits >= -125

    def quantize_measured(self, x: Tensor, rounding: Rounding = "nearest", seed: Tensor | None = None,
                          random_bits: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Round ``x`` with its own shift b = :meth:`shift_for`; returns (result, b).

        The measured shift puts max |x| at the top of the grid, so x / 2^b cannot overflow and
        (with :attr:`scales_exactly`, deterministic rounding) rounding x / 2^b on the element's
        constant grid, times 2^b, gives the shifted grid's bits. Compiled, that is 20% faster than a grid moved by a
        tensor exponent (:func:`round_float`'s general path). NaN keeps its bits, as there.
        """
        b = self.shift_for(x)
        if self.scales_exactly and rounding == "toward_zero":  # own shift: x / 2^b stays finite
            return self._scaled(x, b, rounding, bits_for(x.shape, rounding, seed, random_bits)), b
        return self.quantize(x, rounding, seed, random_bits, shift=b), b

    def _scaled(self, x: Tensor, b: Tensor, rounding: Rounding, random_bits: Tensor | None) -> Tensor:
        """x rounded as x / 2^b on the element's constant grid, times 2^b (see
        :attr:`scales_exactly`): a constant grid takes :func:`round_float`'s fastest path,
        20% faster compiled than a grid moved by a tensor exponent, or more. NaN keeps its
        bits, as there."""
        e = self.element
        up = (-b).clamp(max=127)  # 2^-b can exceed float32 (b down to -140): two exact factors
        y = x * exp2i(up) * exp2i(-b - up)
        q = round_float(y, mantissa_bits=e.mantissa_bits, min_exponent=e.min_exponent, max_value=e.max,
                        overflow=e.overflow,  # type: ignore[arg-type]
                        negative_zero=e.has_negative_zero, rounding=rounding, random_bits=random_bits)
        return torch.where(x != x, x, q * exp2i(b))


def parse_dse(name: str, spec: str, opts: dict[str, object]) -> DSEFormat | None:
    """``dse(e=,m=,specials=,overflow=,delayed=)``."""
    if name != "dse":
        return None
    kw = take(spec, opts, {"e": "e", "m": "m", "specials": "specials", "overflow": "overflow", "delayed": "delayed"})
    e, m = exponent_mantissa(spec, "dse", kw, "specials=, delayed=")
    delayed = kw.pop("delayed", False)
    return DSEFormat(FloatFormat(e, m, 0, **kw), delayed=delayed)  # type: ignore[arg-type]
