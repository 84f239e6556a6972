"""Error of the I-ViT integer-only ops against their float counterparts.

Prints, for Shiftmax, ShiftGELU and I-LayerNorm at a few input scales, the max and mean absolute
error of the dequantised integer output versus ``torch.softmax``, ``F.gelu`` (exact erf) and
``F.layer_norm`` in float64.  Run: ``python benchmarks/ivit_op_error.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from precsim.integer import i_layernorm, shift_gelu, shiftmax


def op_error_stats(op: str, scale: float, *, bits: int = 8, seed: int = 0) -> tuple[float, float, float]:
    """(max abs error, mean abs error, output scale) of one integer op at input scale ``scale``.

    softmax: 2048 rows of 197 codes uniform over real logits in [-8, 8]; ``bits`` output bits.
    gelu: every signed ``bits``-bit input code; output: signed ``bits`` bits at the input scale.
    layernorm: 256 rows of 768 Gaussian 16-bit codes (std = 0.1 * range, 1% outliers x8),
    random affine; output: signed ``bits`` bits with the scale calibrated to the float output's
    max |value| (so nothing clips).
    """
    gen = torch.Generator().manual_seed(seed)
    if op == "softmax":
        span = max(1, int(8 / scale))
        x = torch.randint(-span, span + 1, (2048, 197), generator=gen, dtype=torch.int32)
        codes, so = shiftmax(x, scale, bits)
        ref = torch.softmax(x.double() * scale, dim=-1)
    elif op == "gelu":
        x = torch.arange(-(2 ** (bits - 1)), 2 ** (bits - 1), dtype=torch.int32)
        codes, so = shift_gelu(x, scale, scale, bits)
        ref = F.gelu(x.double() * scale)
    elif op == "layernorm":
        n = 768
        x = torch.randn(256, n, generator=gen) * 3276.8
        x[torch.rand(256, n, generator=gen) < 0.01] *= 8
        x = x.round().clamp(-32768, 32767).to(torch.int32)
        w = torch.randn(n, generator=gen) * 0.3 + 1
        b = torch.randn(n, generator=gen) * 0.2
        ref = F.layer_norm(x.double() * scale, (n,), w.double(), b.double(), 1e-5)
        out_scale = float(ref.abs().max()) / (2 ** (bits - 1) - 1)
        codes, so = i_layernorm(x, scale, out_scale, w, b, in_bits=16, out_bits=bits)
    else:
        raise ValueError(f"unknown op {op!r}")
    err = (codes.double() * so - ref).abs()
    return float(err.max()), float(err.mean()), so


def main() -> None:
    """Print the error table."""
    print(f"{'op':<10} {'bits':>4} {'scale':>9} {'max abs err':>12} {'mean abs err':>13} {'out LSB/2':>10}")
    for op, scales in [
        ("softmax", [0.005, 0.02, 0.08, 0.3]),
        ("gelu", [0.0005, 0.005, 0.02, 0.05]),
        ("layernorm", [1e-3, 0.01, 0.1]),
    ]:
        for bits in (8, 16):
            for scale in scales:
                mx, mean, so = op_error_stats(op, scale, bits=bits)
                print(f"{op:<10} {bits:>4} {scale:>9.3g} {mx:>12.5f} {mean:>13.6f} {so / 2:>10.2e}")


if __name__ == "__main__":
    main()
