"""NVFP4: E2M1 elements x an E4M3 block scale (per 16) x a float32 per-tensor scale."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from precsim.formats import BlockFormat, parse_format
from precsim.runtime import quantize

from ._helpers import F32, assert_same_bits

E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], dtype=F32)


def reference(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, F32]:
    """NVFP4 written out with ml_dtypes casts: returns (output, block scales, tensor scale)."""
    blocks = x.reshape(-1, 16)
    amax = np.abs(blocks).max(axis=1, keepdims=True)
    fin_amax = np.where(np.isfinite(amax), amax, F32(0))
    ts = F32(fin_amax.max() / F32(6 * 448))
    if ts == 0:
        ts = F32(1)
    bs = ((fin_amax / F32(6)) / ts).astype(ml_dtypes.float8_e4m3fn).astype(F32)  # RNE; <= 448 here
    scale = (bs * ts).astype(F32)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = (blocks / np.where(scale > 0, scale, F32(1))).astype(ml_dtypes.float4_e2m1fn).astype(F32)  # RNE, saturating
    out = np.where(scale > 0, (q * bs).astype(F32) * ts, F32(0)).astype(F32)  # e2m1 * bs * ts
    out = np.where(np.isfinite(amax), out, np.nan).astype(F32)
    return out.reshape(x.shape), bs, ts


def sample(seed: int) -> np.ndarray:
    g = np.random.default_rng(seed)
    mags = np.exp2(g.uniform(-12, 12, (24, 1)))
    x = (g.standard_normal((24, 16)) * mags).astype(F32)
    x[3] = 0.0  # an all-zero block
    x[4, :8] = 0.0
    x[5] *= 1e-6  # tiny block: block scale in E4M3's subnormals
    return x.reshape(4, 96)


def test_matches_written_out_reference() -> None:
    fmt = parse_format("nvfp4")
    assert isinstance(fmt, BlockFormat) and fmt.block_size == 16 and fmt.scale == "e4m3"
    for seed in range(4):
        x = sample(seed)
        want, _, _ = reference(x)
        assert_same_bits(quantize(torch.from_numpy(x), fmt), want, x, "nvfp4")


def test_structure_e2m1_times_block_scale_times_tensor_scale() -> None:
    """Every output is an E2M1 value x an E4M3 block scale x the tensor scale."""
    x = sample(7)
    y = quantize(torch.from_numpy(x), "nvfp4").numpy().reshape(-1, 16)
    _, bs, ts = reference(x)
    # block scales are E4M3 values (quantizing them to fp8_e4m3 is the identity) and <= 448
    bst = torch.from_numpy(bs)
    assert torch.equal(quantize(bst, "fp8_e4m3"), bst) and bs.max() <= 448
    assert ts == F32(np.abs(x).max() / F32(2688))
    for row, b in zip(y, bs[:, 0], strict=True):
        e2m1 = np.concatenate([E2M1, -E2M1])
        cands = (e2m1 * b).astype(F32) * ts  # e2m1 * bs is exact; one rounding for * ts
        assert np.isin(row, cands.astype(F32)).all()
    # the block holding the tensor's max uses (nearly) the whole E4M3 range
    assert bs.max() >= 416


def test_saturation() -> None:
    """An element above 6 x scale (its block scale was rounded down) saturates to 6 x scale."""
    x = np.zeros(32, dtype=F32)
    x[0] = 2688.0  # tensor scale 1, block 0 scale 448
    x[16:] = 6 * 9.25  # amax / 6 / ts = 9.25 -> E4M3 rounds down to 9
    y = quantize(torch.from_numpy(x[None]), "nvfp4").numpy()[0]
    want, bs, ts = reference(x[None])
    assert ts == 1 and bs[1, 0] == 9
    assert (y[16:] == 6 * 9).all()
    assert_same_bits(y, want[0], x, "saturation")
    # and values beyond any block's reach (the tensor's max block) stay at 6 x 448 x ts
    assert y[0] == 2688


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_nan_or_inf_block_is_nan_others_unaffected(bad: float) -> None:
    x = sample(3)
    clean = quantize(torch.from_numpy(x.copy()), "nvfp4").numpy()
    x[1, 20] = bad  # block 1 of row 1 (elements 16..31)
    y = quantize(torch.from_numpy(x), "nvfp4").numpy()
    assert np.isnan(y[1, 16:32]).all()
    mask = np.ones_like(x, dtype=bool)
    mask[1, 16:32] = False
    # the tensor scale ignores the non-finite block, so the others are the same as long as
    # that block did not hold the tensor's max
    if np.abs(x[mask]).max() >= np.abs(np.where(np.isfinite(x), x, 0))[1, 16:32].max():
        assert_same_bits(y[mask], clean[mask], x[mask], "other blocks")
    want, _, _ = reference(x)
    assert_same_bits(y, want, x, "nvfp4 with bad block")


def test_all_zero_and_padding() -> None:
    assert torch.equal(quantize(torch.zeros(2, 32), "nvfp4"), torch.zeros(2, 32))
    x = sample(5)[:, :40]  # 40 = 2 full blocks + a padded partial block
    y = quantize(torch.from_numpy(np.ascontiguousarray(x)), "nvfp4").numpy()
    xp = np.concatenate([x, np.zeros((4, 8), dtype=F32)], axis=1)
    want, _, _ = reference(xp)
    assert_same_bits(y, want[:, :40], x, "padded")
