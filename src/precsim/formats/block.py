"""Block (microscaling) formats: OCP MX and NVFP4.

A block of ``block_size`` consecutive elements along one axis shares one scale. By default
that is the axis a following layer reduces over, as MX hardware blocks dot products (and
microxcaling, the MX reference library, blocks convolutions): the channel axis of image-like
tensors (N, C, H, W[, D]; conv weights O, I, kh, kw) and the last axis of the others (Linear
inputs and weights). Before 2026-12, blocks ran along the last axis of every tensor (W).

- MX (OCP Microscaling v1.0): the scale is a power of two X = 2^(floor(log2(amax)) - emax_elem)
  stored as E8M0 (clamped to 2^-127..2^127; an all-zero block gets 2^-127). Elements are
  rounded in the element format and saturate at its max, since amax / X can exceed it.
  Exponents are read from the float bits. A block holding NaN or Inf has a NaN scale: the whole
  block becomes NaN, as the spec says.
- NVFP4: E2M1 elements in blocks of 16, a per-block scale in FP8 E4M3 (RNE, saturating) and a
  float32 per-tensor scale amax / (6 * 448), so that the largest block scale fits E4M3.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from precsim.formats.base import FormatRow
from precsim.formats.float import FLOATS, FloatFormat
from precsim.formats.integer import IntFormat, fake_quantize
from precsim.formats.options import need_int, take
from precsim.formats.random import bits_for
from precsim.formats.rounding import Rounding, exp2i, float_bits, round_float

SCALES: tuple[str, ...] = ("e8m0", "e4m3")
_E4M3 = FloatFormat(4, 3, specials="fn", name="fp8_e4m3")
# preset name -> (element preset, block size, scale)
BLOCKS: dict[str, tuple[str, int, str]] = {
    "mxfp8_e4m3": ("fp8_e4m3", 32, "e8m0"),
    "mxfp8_e5m2": ("fp8_e5m2", 32, "e8m0"),
    "mxfp6_e2m3": ("fp6_e2m3", 32, "e8m0"),
    "mxfp6_e3m2": ("fp6_e3m2", 32, "e8m0"),
    "mxfp4": ("fp4_e2m1", 32, "e8m0"),
    "mxint8": ("int8", 32, "e8m0"),
    "nvfp4": ("fp4_e2m1", 16, "e4m3"),
}


@dataclass(frozen=True)
class BlockFormat:
    """``element`` values sharing a scale per block of ``block_size`` along ``axis`` (None: see
    :meth:`block_axis`)."""

    params = ()
    default_ste = "plain"
    observed = False
    state = None
    ste_clip = None
    gradient_limit = 2.0**127  # each block scales to its own range: S only keeps S g finite

    element: FloatFormat | IntFormat
    block_size: int = 32
    axis: int | None = None
    scale: str = "e8m0"
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        if not (isinstance(self.block_size, int) and self.block_size >= 1):
            raise ValueError(f"block_size={self.block_size!r} not allowed; allowed: integers >= 1")
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            raise ValueError(f"axis={self.axis!r} not allowed; allowed: an integer, or none for the channel axis "
                             "of 4-D and 5-D tensors and the last axis of others")
        if self.scale not in SCALES:
            raise ValueError(f"block scale {self.scale!r} not allowed; allowed: {', '.join(SCALES)}")
        if isinstance(self.element, IntFormat) and (not self.element.signed or self.scale != "e8m0"):
            raise ValueError("integer block elements must be signed with an e8m0 scale (MXINT)")
        if isinstance(self.element, FloatFormat) and self.element.bias != 0:
            raise ValueError("block element formats must have b=0 (the block scale is the shift)")
        if not self.name:
            object.__setattr__(self, "name", f"block({self.element.name},{self.block_size},{self.scale})")

    @property
    def storage_bits(self) -> float:
        return self.bits_per_element

    def scale_exponents(self, x: Tensor) -> Tensor | None:
        """The E8M0 exponent each block of ``x`` asks for, before the clamp to [-127, 127], for
        the blocks that hold a nonzero finite value (telemetry: how many scales sit at the
        limits, where elements then saturate or flush); None for an E4M3-scaled format."""
        if self.scale != "e8m0":
            return None
        axis = self.block_axis(x.dim())
        rows = x.detach().float().movedim(axis, -1) if x.dim() else x.detach().float().reshape(1)
        pad = (-rows.shape[-1]) % self.block_size
        if pad:
            rows = torch.nn.functional.pad(rows, (0, pad))
        amax = rows.reshape(-1, self.block_size).abs().amax(dim=1)
        amax = amax[(amax > 0) & torch.isfinite(amax)]
        return torch.floor(torch.log2(amax)).to(torch.int32) - self.element_max_exponent

    @property
    def element_max_exponent(self) -> int:
        """emax of the element: 0 for MXINT (codes are k * 2^-(bits-2))."""
        if isinstance(self.element, IntFormat):
            return 0
        return self.element.max_exponent

    @property
    def bits_per_element(self) -> float:
        scale_bits = 8
        return self.element.bits + scale_bits / self.block_size

    def block_axis(self, ndim: int) -> int:
        """The axis (>= 0) blocks run along in a tensor of ``ndim`` dimensions: ``axis``, or by
        default 1 (channels) for 4 dimensions or more and the last axis otherwise. (A Conv1d's
        (N, C, L) is ambiguous with a sequence's (N, T, F): it takes the last axis unless given
        ``axis=1``.)"""
        if self.axis is None:
            return 1 if ndim >= 4 else max(ndim - 1, 0)
        if not -max(ndim, 1) <= self.axis < max(ndim, 1):
            raise ValueError(f"{self.name}: block axis {self.axis} not allowed for a {ndim}-D tensor; "
                             f"allowed: {-max(ndim, 1)}..{max(ndim, 1) - 1}")
        return self.axis % max(ndim, 1)

    def describe(self) -> str:
        scale = "E8M0 power of two" if self.scale == "e8m0" else "FP8 E4M3 x float32 per-tensor"
        along = ("the channel axis of 4-D/5-D tensors, else the last axis" if self.axis is None
                 else f"axis {self.axis}")
        return (
            f"{self.name}: block format, {self.element.name} elements, one {scale} scale per "
            f"{self.block_size} elements along {along} ({self.bits_per_element:g} bits "
            f"per element); elements saturate; a block with NaN/Inf becomes NaN"
        )

    def __str__(self) -> str:
        return self.describe()

    @property
    def spec(self) -> str:
        """The preset with this element and scale, and the options that differ from it (the name
        where no preset has them)."""
        for preset, (elem_name, size, scale) in BLOCKS.items():
            if scale == self.scale and _element(elem_name) == self.element:
                opts = [f"block={self.block_size}"] if self.block_size != size else []
                opts += [f"axis={self.axis}"] if self.axis is not None else []
                return preset + (f"({','.join(opts)})" if opts else "")
        return self.name

    def table_row(self) -> FormatRow:
        elem = self.element
        if isinstance(elem, IntFormat):  # MXINT: codes k * 2^-(bits-2)
            top, sub, specials = f"{elem.qmax * 2.0 ** -(elem.bits - 2):.6g}", "-", "none"
        else:
            top = f"{elem.max:.6g}"
            sub = "-" if elem.mantissa_bits == 0 else f"{elem.smallest_subnormal:.6g} x S"
            specials = elem.specials
        return FormatRow("block", f"{self.bits_per_element:g}", f"{top} x S", sub,
                         f"{specials}; NaN/Inf -> NaN block", "saturate")

    def blocks(self, x: Tensor) -> tuple[Tensor, int]:
        """``x`` as (..., blocks, block_size) with the block axis last and zero padding; and its length."""
        y = x.movedim(self.block_axis(x.dim()), -1)
        n = y.shape[-1]
        pad = (-n) % self.block_size
        if pad:  # zero only the tail (F.pad fills the whole tensor first, then copies)
            padded = y.new_empty(*y.shape[:-1], n + pad)
            padded[..., n:].zero_()
            padded[..., :n].copy_(y)
            y = padded
        return y.reshape(*y.shape[:-1], -1, self.block_size), n

    def unblock(self, b: Tensor, n: int) -> Tensor:
        """The inverse of :meth:`blocks` (padding dropped, block axis back in place)."""
        y = b.reshape(*b.shape[:-2], -1)[..., :n]
        return y.movedim(-1, self.block_axis(y.dim()))

    def quantize(
        self,
        x: Tensor,
        rounding: Rounding = "nearest",
        seed: Tensor | None = None,
        random_bits: Tensor | None = None,
    ) -> Tensor:
        """Round ``x`` block by block. Stochastic rounding numbers the elements for the random
        bits in the padded block layout when blocks run along the last axis, and in ``x``'s own
        order along any other (as :meth:`quantize_blocks` with ``dim`` sees them)."""
        if x.dim() == 0:
            return self.quantize(x.reshape(1), rounding, seed, random_bits).reshape(())
        if rounding == "stochastic" and random_bits is None and self.block_axis(x.dim()) != x.dim() - 1:
            random_bits = bits_for(x.shape, rounding, seed, None)
        blocks, n = self.blocks(x)
        if random_bits is not None:
            random_bits, _ = self.blocks(random_bits)
        out = self.unblock(self.quantize_blocks(blocks, rounding, seed, random_bits), n)
        # x's layout, not a permuted view: ``randn_like`` and friends follow a view's strides
        return out if self.block_axis(x.dim()) == x.dim() - 1 else out.contiguous()

    def quantize_blocks(
        self,
        blocks: Tensor,
        rounding: Rounding = "nearest",
        seed: Tensor | None = None,
        random_bits: Tensor | None = None,
        row_stride: int | None = None,
        dim: int = -1,
    ) -> Tensor:
        """Round ``blocks`` shaped (..., blocks, block_size), one scale per last-axis row; or
        with ``dim``, one scale per line along that dimension (blocks across the memory
        layout, as a channel axis runs: (outer, blocks, block_size, inner) with ``dim=2``).

        A block dimension shorter than ``block_size`` is a block whose zero padding was left
        out: zeros change neither a block's max nor its other elements, so the result is that
        of the padded block. ``row_stride`` (the padded row length) then numbers the elements
        of last-axis rows for the random bits as the padded layout does
        (:func:`precsim.formats.random.random_bits`).
        """
        random_bits = bits_for(blocks.shape, rounding, seed, random_bits, row_stride)
        # max |x| per block as a float reduction (exact: max never rounds, and float order is
        # the bit order for magnitudes), then read as bits: a NaN block gets a NaN (its sign
        # bit cleared, so that it sorts above Inf). Not an integer amax of the bit patterns:
        # Inductor's CPU code reduces an int32 vector to a scalar element by element, which
        # made the whole MX kernel 1.9x clone against 1.1x for the float reduction.
        amax_bits = float_bits(blocks.abs().amax(dim=dim, keepdim=True)) & 0x7FFFFFFF
        if self.scale == "e8m0":
            out = self._quantize_mx(blocks, amax_bits, rounding, random_bits)
        else:
            out = self._quantize_nv(blocks, amax_bits.view(torch.float32), rounding, random_bits)
        return torch.where(amax_bits < 0x7F800000, out, torch.nan)  # a NaN/Inf block is NaN

    def _quantize_mx(self, blocks: Tensor, amax_bits: Tensor, rounding: Rounding, rb: Tensor | None) -> Tensor:
        # floor(log2(amax)) is the exponent field; zero and subnormal blocks get the bottom
        # scale 2^-127 through the clamp (emax_elem >= 0)
        shared = ((amax_bits >> 23) - 127 - self.element_max_exponent).clamp(-127, 127)
        elem = self.element
        if isinstance(elem, IntFormat):
            scale = exp2i(shared - (elem.bits - 2))
            zero = torch.zeros_like(scale)
            return fake_quantize(blocks, scale, zero, elem.qmin, elem.qmax, rounding, rb)
        if rounding == "nearest":  # the same bits on the element's constant grid (see round_scaled)
            return self.round_scaled(blocks * exp2i(-shared), rounding) * exp2i(shared)
        return round_float(
            blocks,
            mantissa_bits=elem.mantissa_bits,
            min_exponent=elem.min_exponent + shared,
            max_value=elem.max * exp2i(shared),
            overflow="saturate",
            negative_zero=elem.has_negative_zero,
            rounding=rounding,
            random_bits=rb,
        )

    def power_scale(self, blocks: Tensor, dim: int = -1) -> Tensor:
        """Per block (along ``dim``): the MX scale X = 2^shared, or NaN for a block holding NaN
        or Inf. For :meth:`round_scaled`; E8M0 scales only."""
        amax_bits = float_bits(blocks.abs().amax(dim=dim, keepdim=True)) & 0x7FFFFFFF
        shared = ((amax_bits >> 23) - 127 - self.element_max_exponent).clamp(-127, 127)
        return torch.where(amax_bits >= 0x7F800000, torch.nan, exp2i(shared))

    def round_scaled(self, y: Tensor, rounding: Rounding, random_bits: Tensor | None = None) -> Tensor:
        """Round ``y = x / X`` (a finite block divided by its MX scale) onto the element grid.

        ``round_scaled(x / X) * X`` is :meth:`quantize_blocks` of a finite block, bit for bit,
        for float elements: dividing and multiplying by a power of two are exact except where
        ``x / X`` falls below 2^-126, far below half the element's smallest step (2^-17 at
        least), which rounds to zero, and rounds up stochastically with probability zero, from
        either representation. Unlike a grid moved by a tensor of exponents, this grid is
        constant, so the rounding needs no per-block values: a kernel over a flat tensor, with
        no loop per block (1.7x faster on rows of 28).
        """
        elem = self.element
        assert isinstance(elem, FloatFormat) and self.scale == "e8m0"
        return round_float(y, mantissa_bits=elem.mantissa_bits, min_exponent=elem.min_exponent, max_value=elem.max,
                           overflow="saturate", negative_zero=elem.has_negative_zero, rounding=rounding,
                           random_bits=random_bits)

    def _quantize_nv(self, blocks: Tensor, amax: Tensor, rounding: Rounding, rb: Tensor | None) -> Tensor:
        elem = self.element
        assert isinstance(elem, FloatFormat)
        finite_amax = torch.where(torch.isfinite(amax), amax, torch.zeros_like(amax))
        tensor_scale = finite_amax.amax() / (elem.max * _E4M3.max)
        tensor_scale = torch.where(tensor_scale > 0, tensor_scale, torch.ones_like(tensor_scale))
        block_scale = _E4M3.quantize(finite_amax / elem.max / tensor_scale)
        scale = block_scale * tensor_scale
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        q = elem.quantize(blocks / safe, rounding, random_bits=rb)
        # q * block_scale is exact (2 x 4 significant bits): one rounding for the value e2m1 x bs x ts
        return torch.where(scale > 0, (q * block_scale) * tensor_scale, torch.zeros_like(q))


def parse_block(name: str, spec: str, opts: dict[str, object]) -> BlockFormat | None:
    """A preset of :data:`BLOCKS` (options: ``block``, ``axis``)."""
    if name not in BLOCKS:
        return None
    elem_name, size, scale = BLOCKS[name]
    kw = take(spec, opts, {"block": "block_size", "block_size": "block_size", "axis": "axis"})
    for k in kw:
        need_int(spec, k, kw[k])
    return BlockFormat(_element(elem_name), block_size=kw.get("block_size", size), axis=kw.get("axis"),  # type: ignore[arg-type]
                       scale=scale, name=name if not kw else spec.strip())


def _element(name: str) -> FloatFormat | IntFormat:
    """A block preset's element format."""
    return IntFormat(8, name="int8") if name == "int8" else FloatFormat(*FLOATS[name], name=name)
