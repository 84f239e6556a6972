"""Integer formats: r = S (q - Z) (Jacob et al. 2018), per tensor, per channel or per group.

The format fixes the integer range and how scales are shared; the scale ``S`` and zero point
``Z`` are parameters of each call (given, or chosen from the tensor: max-abs for symmetric,
min/max for affine). Zero is always exactly representable: the zero point is an integer
("nudged"), as integer kernels need for zero padding.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from precsim.formats.base import FormatRow, MeasuredState
from precsim.formats.options import take
from precsim.formats.random import bits_for
from precsim.formats.rounding import Rounding, positive_zero, round_integer


def finite_only(x: Tensor) -> tuple[Tensor, Tensor]:
    """``x`` with its non-finite values made +Inf and -Inf: what a min and a max then ignore."""
    finite = x.abs() < torch.inf  # isfinite in two vector ops (compiled, isfinite takes six)
    return torch.where(finite, x, torch.inf), torch.where(finite, x, -torch.inf)


def zero_if_infinite(v: Tensor) -> Tensor:
    """A reduced min or max, 0 where no finite value was seen."""
    return torch.where(torch.isfinite(v), v, torch.zeros_like(v))


def finite_range(x: Tensor, dims: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
    """Min and max of the finite values of ``x`` over ``dims`` (None: all); +Inf and -Inf (an
    empty range, lo > hi) where there is none: what an observer must tell from [0, 0]."""
    lo, hi = finite_only(x.detach())
    if dims is None:
        return lo.amin(), hi.amax()
    return lo.amin(dim=dims), hi.amax(dim=dims)


def tensor_range(x: Tensor, dims: tuple[int, ...] | None) -> tuple[Tensor, Tensor]:
    """Min and max of the finite values of ``x`` over ``dims`` (None: all); [0, 0] where there
    is none, the range of an all-zero tensor (see :meth:`IntFormat.choose_qparams`)."""
    lo, hi = finite_range(x, dims)
    return zero_if_infinite(lo), zero_if_infinite(hi)


@dataclass(frozen=True)
class IntFormat:
    """``bits``-bit signed or unsigned integers.

    ``symmetric`` (default: True for signed, False for unsigned) fixes Z = 0; ``narrow`` drops
    the most negative code so the range is symmetric, -(2^(n-1)-1)..2^(n-1)-1. ``axis`` selects
    per-channel scales along that axis (None: one scale per tensor); ``group_size`` further
    splits that axis into groups of that many elements, one scale each.
    """

    params = ("scale", "zero_point")
    default_ste = "clipped"
    ste_clip = None  # the clip follows the grid of each call (the observed range)
    gradient_limit = 2.0**127  # each tensor scales to its own range: S only keeps S g finite

    bits: int
    signed: bool = True
    symmetric: bool | None = None
    narrow: bool = False
    axis: int | None = None
    group_size: int | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.bits, int) and 2 <= self.bits <= 16):
            raise ValueError(f"integer bits {self.bits!r} not allowed; allowed: 2..16")
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", self.signed)
        for key in ("signed", "symmetric", "narrow"):
            if not isinstance(getattr(self, key), bool):
                raise ValueError(f"{key}={getattr(self, key)!r} not allowed; allowed: true, false")
        if self.narrow and not self.signed:
            raise ValueError("narrow=True needs a signed format (it drops the code -2^(n-1))")
        if self.group_size is not None:
            if not (isinstance(self.group_size, int) and self.group_size >= 1):
                raise ValueError(f"group_size={self.group_size!r} not allowed; allowed: integers >= 1")
            if self.axis is None:
                object.__setattr__(self, "axis", -1)
        if self.axis is not None and not isinstance(self.axis, int):
            raise ValueError(f"axis={self.axis!r} not allowed; allowed: an integer or None")
        if not self.name:
            object.__setattr__(self, "name", self.spec)

    @property
    def qmin(self) -> int:
        if not self.signed:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.signed else 2**self.bits - 1

    @property
    def storage_bits(self) -> float:
        """A group's float32 scale (and its zero point, if affine) spread over its elements."""
        if self.group_size is None:
            return float(self.bits)
        per_group = 32 if self.symmetric else 32 + self.bits
        return self.bits + per_group / self.group_size

    @property
    def granularity(self) -> str:
        if self.group_size is not None:
            return f"per_group(axis={self.axis}, size={self.group_size})"
        return "per_tensor" if self.axis is None else f"per_channel(axis={self.axis})"

    @property
    def spec(self) -> str:
        base = f"{'int' if self.signed else 'uint'}{self.bits}"
        opts = []
        if self.symmetric != self.signed:
            opts.append(f"symmetric={str(self.symmetric).lower()}")
        if self.narrow:
            opts.append("narrow=true")
        if self.group_size is not None:
            opts.append(f"axis={self.axis}")
            opts.append(f"group={self.group_size}")
        elif self.axis is not None:
            opts.append(f"axis={self.axis}")
        return base + (f"({','.join(opts)})" if opts else "")

    def describe(self) -> str:
        kind = "symmetric (Z = 0)" if self.symmetric else "affine (integer zero point)"
        return (
            f"{self.name}: integer, {self.bits} bits, codes {self.qmin}..{self.qmax}, {kind}, "
            f"{self.granularity}; no Inf/NaN codes (NaN inputs stay NaN); saturates"
        )

    def __str__(self) -> str:
        return self.describe()

    def table_row(self) -> FormatRow:
        return FormatRow("int", str(self.bits), f"{self.qmax} x S", "-", "none", "saturate")

    # --- per-call state ---------------------------------------------------------------------
    @property
    def observed(self) -> bool:
        """Per tensor and per channel, the scale comes from an observer's range; per group, from
        the groups themselves."""
        return self.group_size is None

    @property
    def state(self) -> MeasuredState | None:
        """Per tensor, [min, max] measured on each tensor (gradients: see ``delayed``)."""
        if self.axis is not None or self.group_size is not None:
            return None
        return MeasuredState(("range", "range_ready"), (2,), integer=False)

    def measure(self, x: Tensor) -> Tensor:
        """[min, max] of the finite values of ``x`` (0 where there are none)."""
        return torch.stack(tensor_range(x, None))

    def state_params(self, state: Tensor) -> dict[str, Tensor]:
        scale, zero_point = self.qparams(state[0], state[1])
        return {"scale": scale, "zero_point": zero_point}

    # --- scales ---------------------------------------------------------------------------
    def qparams(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point (float32 tensors) covering [lo, hi] and containing 0."""
        lo = torch.clamp(lo.float(), max=0.0)
        hi = torch.clamp(hi.float(), min=0.0)
        if self.symmetric:
            amax = torch.maximum(-lo, hi)
            scale = amax / self.qmax
            zero_point = torch.zeros_like(scale)
        else:
            scale = (hi - lo) / (self.qmax - self.qmin)
            safe = torch.where(scale > 0, scale, torch.ones_like(scale))
            zero_point = torch.clamp(torch.round(self.qmin - lo / safe), self.qmin, self.qmax)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # all-zero data: any scale
        return scale, zero_point

    def _grouped(self, x: Tensor) -> Tensor:
        """``x`` with the channel axis last, split as (..., groups, group_size) if grouped."""
        assert self.axis is not None
        y = x.movedim(self.axis, -1)
        if self.group_size is not None:
            n = y.shape[-1]
            if n % self.group_size:
                raise ValueError(
                    f"axis {self.axis} has {n} elements, not a multiple of group_size={self.group_size}"
                )
            y = y.reshape(*y.shape[:-1], n // self.group_size, self.group_size)
        return y

    def _ungrouped(self, y: Tensor, shape: torch.Size) -> Tensor:
        assert self.axis is not None
        if self.group_size is not None:
            y = y.reshape(*y.shape[:-2], -1)
        return y.movedim(-1, self.axis).reshape(shape)

    def reduce_dims(self, x: Tensor) -> tuple[int, ...]:
        """Dimensions reduced when measuring one scale (all but the channel axis)."""
        if self.axis is None:
            return tuple(range(x.dim()))
        axis = self.axis % x.dim()
        return tuple(d for d in range(x.dim()) if d != axis)

    def choose_qparams(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point from the tensor itself, shaped to broadcast against ``x``.

        The range is that of the finite values (per tensor, channel or group). Where there is
        none (all ±Inf or NaN) it is [0, 0], as for all zeros: scale 1, so ±Inf become the
        codes' ends (qmin, qmax) and NaN stays NaN. No scale is made up from the Inf, and
        nothing raises: a diverging run stays visible, not stopped (docs/guide.md, Inf and NaN).
        """
        finite = torch.where(torch.isfinite(x), x, torch.zeros_like(x))
        if self.group_size is not None:
            g = self._grouped(finite)
            lo, hi = g.amin(dim=-1, keepdim=True), g.amax(dim=-1, keepdim=True)
        elif x.dim() == 0:
            lo, hi = finite, finite
        else:
            dims = self.reduce_dims(x)
            lo, hi = finite.amin(dim=dims, keepdim=True), finite.amax(dim=dims, keepdim=True)
        return self.qparams(lo, hi)

    def check_qparams(self, scale: Tensor | float, zero_point: Tensor | float | None) -> None:
        """Raise ValueError unless scale > 0 is finite and the zero point an in-range integer."""
        s = torch.as_tensor(scale, dtype=torch.float32)
        z = torch.as_tensor(0.0 if zero_point is None else zero_point, dtype=torch.float32)
        if bool((s <= 0).any()) or not bool(torch.isfinite(s).all()):
            raise ValueError(f"scale must be finite and > 0, got {scale}")
        if bool((z != torch.round(z)).any()) or bool(((z < self.qmin) | (z > self.qmax)).any()):
            raise ValueError(f"zero_point must be an integer in {self.qmin}..{self.qmax}, got {zero_point}")

    def check_params(self, scale: Tensor | float | None = None, zero_point: Tensor | float | None = None) -> None:
        """:meth:`check_qparams` of given parameters (for :func:`precsim.quantize`)."""
        if scale is not None:
            self.check_qparams(scale, zero_point)

    def _broadcast(self, p: Tensor | float, x: Tensor) -> Tensor:
        """A given per-channel parameter of shape (C,) reshaped to broadcast along ``axis``."""
        p = torch.as_tensor(p, dtype=torch.float32, device=x.device)
        if self.axis is None or p.dim() != 1 or self.group_size is not None:
            return p
        shape = [1] * x.dim()
        shape[self.axis % x.dim()] = p.numel()
        return p.reshape(shape)

    # --- rounding -------------------------------------------------------------------------
    def quantize(
        self,
        x: Tensor,
        rounding: Rounding = "nearest",
        seed: Tensor | None = None,
        random_bits: Tensor | None = None,
        scale: Tensor | float | None = None,
        zero_point: Tensor | float | None = None,
    ) -> Tensor:
        """Fake-quantize float32 ``x``: S (clamp(round(x / S) + Z, qmin, qmax) - Z).

        Given parameters are trusted here (hot path); :func:`precsim.quantize` validates them.
        """
        random_bits = bits_for(x.shape, rounding, seed, random_bits)
        if scale is None:
            if zero_point is not None:
                raise ValueError("zero_point given without scale")
            s, z = self.choose_qparams(x)
        else:
            s = self._broadcast(scale, x)
            z = self._broadcast(0.0 if zero_point is None else zero_point, x)
        if self.group_size is not None:
            xg = self._grouped(x)
            rg = None if random_bits is None else self._grouped(random_bits)
            if scale is not None:
                s = s.reshape(*xg.shape[:-1], 1) if s.numel() > 1 else s
                z = z.reshape(*xg.shape[:-1], 1) if z.numel() > 1 else z
            return self._ungrouped(fake_quantize(xg, s, z, self.qmin, self.qmax, rounding, rg), x.shape)
        return fake_quantize(x, s, z, self.qmin, self.qmax, rounding, random_bits)


def fake_quantize(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor,
    qmin: int,
    qmax: int,
    rounding: Rounding = "nearest",
    random_bits: Tensor | None = None,
) -> Tensor:
    """S (clamp(round(x / S) + Z, qmin, qmax) - Z); NaN stays NaN, ±Inf saturates."""
    q = round_integer(x / scale, rounding, random_bits) + zero_point
    q = torch.clamp(q, qmin, qmax)
    out = positive_zero((q - zero_point) * scale)  # zero is +0, as in eager IEEE arithmetic
    return torch.where(x != x, x, out)


def quantize_codes(x: Tensor, scale: Tensor, zero_point: Tensor, qmin: int, qmax: int) -> Tensor:
    """The integer codes clamp(round(x / S) + Z) (ties to even), as int32."""
    q = torch.round(x / scale) + zero_point
    return torch.clamp(q, qmin, qmax).to(torch.int32)


_INT = re.compile(r"^(u?)int(\d+)$")


def parse_int(name: str, spec: str, opts: dict[str, object]) -> IntFormat | None:
    """``intN`` / ``uintN`` (options: ``symmetric``, ``narrow``, ``axis``, ``group``)."""
    match = _INT.match(name)
    if not match:
        return None
    bits = int(match.group(2))
    if not 2 <= bits <= 16:
        raise ValueError(f"format {spec!r}: integer bits {bits} not allowed; allowed: 2..16")
    kw = take(spec, opts, {"symmetric": "symmetric", "narrow": "narrow", "axis": "axis",
                           "group": "group_size", "group_size": "group_size"})
    return IntFormat(bits, signed=not match.group(1), **kw)  # type: ignore[arg-type]
