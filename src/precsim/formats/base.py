"""The Format interface: what every number format is to the rest of precsim.

A format is a frozen record (gfloat's idea: one record describes it); rounding is a pure
function of the record, the values and the rounding mode. Everything outside ``formats/``
(the compiled kernels, the :class:`~precsim.qat.quantizer.Quantizer`, the CLI's table, the
config checks) drives a format through this interface and never asks which family it is.

Per-call state is the part of a rounding that depends on the tensor, not only on the format.
A format says which kind it has:

- none: every element rounds on a fixed grid (FlexFP and the OCP floats), or the format
  computes what it needs inside its own rounding (block scales, per-group integer scales);
- ``observed``: the scale comes from a range that an observer keeps across calls
  (integers per tensor or per channel: r = S (q - Z));
- ``state`` (a :class:`MeasuredState`): one small tensor measured on each tensor and passed
  back to the rounding as parameters (DSE's exponent shift; an integer gradient's [min, max]).
  Delayed rounding uses the previous call's measurement, so the rounding and the measurement
  share one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple, Protocol, runtime_checkable

from torch import Tensor


class FormatRow(NamedTuple):
    """A format's row in ``precsim formats``. Scaled formats give magnitudes in units of their
    scale: ``x S`` (integer or block scale), ``x 2^b`` (DSE's dynamic shift)."""

    kind: str
    bits: str
    max: str
    min_subnormal: str
    specials: str
    overflow: str


@dataclass(frozen=True)
class MeasuredState:
    """A format's per-call state measured on each tensor (see the module docstring).

    ``buffers`` names the state buffer and its ready flag in a quantizer (so checkpoints keep
    their keys); ``size`` is the state's shape (``()`` for one number) and ``integer`` its dtype
    (int32, else float32); ``delayed``: the format itself rounds on the previous call's state.
    """

    buffers: tuple[str, str]
    size: tuple[int, ...]
    integer: bool
    delayed: bool = False


@runtime_checkable
class Format(Protocol):
    """What every format family implements. A new family is one file in ``formats/`` with a
    class like this and a :class:`~precsim.formats.parse.Family` registered in
    :data:`precsim.formats.parse.FAMILIES` (or through :func:`~precsim.formats.parse.register_family`)."""

    name: str
    params: ClassVar[tuple[str, ...]]  # keyword parameters of quantize besides seed / random_bits
    default_ste: ClassVar[str]  # a quantizer's straight-through estimator unless set: clipped or plain

    @property
    def spec(self) -> str:
        """The canonical spec string: ``parse_format(fmt.spec) == fmt``."""
        ...

    def describe(self) -> str:
        """One line for people: layout, range, specials, overflow."""
        ...

    def table_row(self) -> FormatRow:
        """The format's row in ``precsim formats``."""
        ...

    def quantize(self, x: Tensor, rounding: Any = "nearest", seed: Tensor | None = None,
                 random_bits: Tensor | None = None, **params: Any) -> Tensor:
        """Round float32 ``x`` (eager; the reference the compiled kernels are checked against)."""
        ...

    @property
    def storage_bits(self) -> float:
        """Bits per element in memory, shared scales included (MXFP8: 8 + 8/32 = 8.25): the
        default cost of a format in ``precsim search``. A scale per tensor or per channel counts
        as nothing."""
        ...

    @property
    def observed(self) -> bool:
        """Whether the scale comes from an observer's range (see the module docstring); such a
        format also has ``axis``, ``qmin``, ``qmax`` and ``qparams(lo, hi)``."""
        ...

    @property
    def state(self) -> MeasuredState | None:
        """The per-call state measured on each tensor, or None (else see :class:`StatefulFormat`)."""
        ...

    @property
    def ste_clip(self) -> float | None:
        """A clipped straight-through estimator passes gradients where |x| <= this (None: where
        the grid of an observed format reaches, or everywhere)."""
        ...

    @property
    def gradient_limit(self) -> float:
        """The magnitude a dynamic gradient scale S keeps max |g| * S under: a fixed grid's max;
        formats that scale each tensor or block to its own range only need S g finite."""
        ...


class StatefulFormat(Format, Protocol):
    """A format whose :attr:`~Format.state` is set."""

    def measure(self, x: Tensor) -> Tensor:
        """The state (see :attr:`state`) of ``x`` (pure; only where :attr:`state` is set)."""
        ...

    def state_params(self, state: Tensor) -> dict[str, Tensor]:
        """The keyword parameters of :meth:`quantize` that round on a measured ``state``."""
        ...


class ObservedFormat(Format, Protocol):
    """A format whose scale comes from an observer's range (:attr:`~Format.observed`)."""

    axis: int | None  # the channel axis of per-channel scales (None: one scale per tensor)

    @property
    def qmin(self) -> int: ...

    @property
    def qmax(self) -> int: ...

    def qparams(self, lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
        """Scale and zero point covering [lo, hi] (float32 tensors shaped like them)."""
        ...


def rounding_options(fmt: Format, stored: Tensor | None, rounding: str) -> tuple[tuple[str, Any], ...]:
    """Static keyword options of ``fmt.quantize`` for a stored state (faster paths with the same
    bits, which a format may offer through ``fast_options``), as hashable pairs."""
    fast = getattr(fmt, "fast_options", None)
    return () if fast is None or stored is None else tuple(sorted(fast(stored, rounding).items()))
