"""Proof 5: observer state equals a hand-computed reference over several steps."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import precsim
from precsim.qat.observers import Observer

from ._models import SmallCNN, image_batches, make


def _batches(n: int = 5, shape=(6, 3, 4, 4)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return [torch.randn(*shape, generator=g) * (1 + i) + i * 0.3 for i in range(n)]


def _ref_ranges(kind: str, batches, axis=None, m=0.1, q=99.99):
    """Reference in numpy: float64 statistics, the moving average as written in the issue."""
    mins, maxs = None, None
    out = []
    for b in batches:
        a = b.numpy().astype(np.float64)
        if axis is None:
            flat = a.reshape(1, -1)
        else:
            flat = np.moveaxis(a, axis, 0).reshape(a.shape[axis], -1)
        if kind == "percentile":
            lo, hi = np.percentile(flat, 100 - q, axis=1), np.percentile(flat, q, axis=1)
        else:
            lo, hi = flat.min(axis=1), flat.max(axis=1)
        if mins is None or kind == "minmax":
            mins, maxs = lo, hi  # first step: the batch's own range
        elif kind == "running_minmax":
            mins, maxs = np.minimum(mins, lo), np.maximum(maxs, hi)
        else:  # moving_average, percentile: min += m (batch_min - min)
            mins, maxs = mins + m * (lo - mins), maxs + m * (hi - maxs)
        out.append((mins.copy(), maxs.copy()))
    return out


@pytest.mark.parametrize("kind", ["minmax", "running_minmax", "moving_average", "percentile"])
@pytest.mark.parametrize("axis", [None, 1])
def test_observer_matches_reference(kind: str, axis) -> None:
    batches = _batches()
    obs = Observer(kind, axis=axis, momentum=0.25, percentile=99.0)
    ref = _ref_ranges(kind, batches, axis=axis, m=0.25, q=99.0)
    for b, (lo, hi) in zip(batches, ref, strict=True):
        obs.update(b)
        shape = () if axis is None else (b.shape[axis],)
        assert obs.min_val.shape == shape and obs.max_val.shape == shape
        np.testing.assert_allclose(obs.min_val.numpy().reshape(-1), lo.reshape(-1), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(obs.max_val.numpy().reshape(-1), hi.reshape(-1), rtol=1e-6, atol=1e-6)
        if kind in ("minmax", "running_minmax"):  # no arithmetic: exact
            assert np.array_equal(obs.min_val.numpy().reshape(-1), lo.reshape(-1).astype(np.float32))
    lo, hi = obs.range_for(batches[0])
    if axis is not None:
        assert lo.shape == (1, 3, 1, 1) and hi.shape == (1, 3, 1, 1)


def test_observer_ignores_non_finite_values() -> None:
    obs = Observer("running_minmax")
    obs.update(torch.tensor([1.0, -2.0, float("inf"), float("nan"), -float("inf")]))
    assert obs.min_val.item() == -2.0 and obs.max_val.item() == 1.0


def test_row_ranges_are_the_tensor_range_and_each_rows_extremes() -> None:
    """One pass gives the finite range of the whole tensor (as finite_range) and each row's
    plain min and max, NaN and Inf included (they flag a row for the clipped-STE search)."""
    from precsim.formats.integer import finite_range
    from precsim.qat.observers import row_ranges

    x = torch.randn(8, 50)
    x[1, 3], x[2, 7], x[5, :] = float("nan"), -float("inf"), float("nan")
    lo, hi, row_min, row_max = row_ranges(x)
    want_lo, want_hi = finite_range(x, None)
    assert torch.equal(lo, want_lo) and torch.equal(hi, want_hi) and torch.isfinite(lo) and torch.isfinite(hi)
    torch.testing.assert_close(row_min, x.amin(dim=1), rtol=0, atol=0, equal_nan=True)
    assert row_min[1].isnan() and row_min[2] == -float("inf") and row_max[5].isnan()
    assert torch.equal(row_max[[0, 3, 4, 6, 7]], x[[0, 3, 4, 6, 7]].amax(dim=1))
    all_nan = torch.full((2, 4), float("nan"))
    assert [float(v) for v in row_ranges(all_nan)[:2]] == [INF, -INF]  # empty: the observer keeps its range


def test_quantizer_observers_follow_reference_in_training_only() -> None:
    """Inside a prepared CNN: activation (per tensor and per channel) and weight observers."""
    model = make(SmallCNN)
    cfg = {
        "activation": {"format": "int8", "momentum": 0.3},
        "weight": {"format": "int8", "granularity": "per_channel"},
        "rules": [{"match": "conv2", "activation": {"format": "uint8", "granularity": "per_channel",
                                                    "observer": "running_minmax"}}],
    }
    precsim.prepare(model, cfg)
    seen: dict[str, list[torch.Tensor]] = {"conv1": [], "conv2": []}
    for name in seen:  # the quantizer's input is the module's own output
        q = model.get_submodule(name).precsim_activation
        q.register_forward_pre_hook(lambda mod, args, name=name: seen[name].append(args[0].detach().clone()))
    batches = image_batches(4)
    model.train()
    for x, _ in batches:
        model(x)
    ref1 = _ref_ranges("moving_average", seen["conv1"], m=0.3)[-1]
    ref2 = _ref_ranges("running_minmax", seen["conv2"], axis=1)[-1]
    obs1 = model.conv1.precsim_activation.observer
    obs2 = model.conv2.precsim_activation.observer
    np.testing.assert_allclose(obs1.min_val.numpy(), ref1[0], rtol=1e-6)
    np.testing.assert_allclose(obs1.max_val.numpy(), ref1[1], rtol=1e-6)
    assert obs2.axis == 1 and obs2.min_val.shape == (8,)
    assert np.array_equal(obs2.min_val.numpy(), ref2[0].astype(np.float32))
    assert np.array_equal(obs2.max_val.numpy(), ref2[1].astype(np.float32))
    # weights: per output channel, the current weight's range (minmax)
    wq = model.conv1.parametrizations.weight[0]
    w = model.conv1.parametrizations.weight.original.detach()
    assert wq.observer.axis == 0
    assert torch.equal(wq.observer.min_val, w.amin(dim=(1, 2, 3)))
    assert torch.equal(wq.observer.max_val, w.amax(dim=(1, 2, 3)))
    # eval: activation observers are frozen
    before = {k: v.clone() for k, v in model.state_dict().items() if "observer" in k}
    model.eval()
    model(batches[0][0] * 10)
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in before.items())


def test_eval_first_use_initializes_observer() -> None:
    model = make(nn.Linear, 4, 3)
    precsim.prepare(model, {"activation": "int8"})
    model.eval()
    x = torch.randn(5, 4)
    y = model(x)
    obs = model.precsim_activation.observer
    assert bool(obs.initialized)
    raw = nn.functional.linear(x, model.weight, model.bias).detach()
    assert obs.min_val == raw.min() and obs.max_val == raw.max()
    assert torch.equal(model(x), y)  # and later eval calls leave it alone
    assert obs.min_val == raw.min() and obs.max_val == raw.max()


@pytest.mark.parametrize("compile_kernels", [False, True])
@pytest.mark.parametrize("granularity", ["per_tensor", "per_channel"])
def test_delayed_observer_quantizes_with_previous_range(compile_kernels: bool, granularity: str) -> None:
    """``delayed: true``: step 1 measures first; step n quantizes with the range stored after
    step n-1, then stores the range after this batch (the same as the non-delayed observer's)."""
    from precsim.qat.config import parse_role
    from precsim.qat.quantizer import Quantizer
    from precsim.runtime.backend import compile_enabled, set_compile

    before = compile_enabled()
    set_compile(compile_kernels)
    try:
        role = {"format": "int8", "granularity": granularity, "momentum": 0.3}
        delayed = Quantizer("activation", parse_role("activation", {**role, "delayed": True})).train()
        plain = Quantizer("activation", parse_role("activation", role)).train()
        g = torch.Generator().manual_seed(3)
        xs = [torch.randn(64, 8, 12, generator=g) * (1 + 2 * i) for i in range(3)]
        # step 1: no stored range yet, so both measure first
        assert torch.equal(delayed(xs[0]), plain(xs[0]))
        for x in xs[1:]:
            stored = {k: v.clone() for k, v in plain.state_dict().items()}
            ref = Quantizer("activation", parse_role("activation", role)).eval()
            ref.load_state_dict(stored)  # eval: quantizes with the stored range, leaves it alone
            y, y_plain = delayed(x), plain(x)
            assert torch.equal(y, ref(x))
            assert not torch.equal(y, y_plain)  # the range grew: the non-delayed one uses it at once
            for k, v in plain.observer.state_dict().items():  # the same range afterwards
                assert torch.equal(delayed.observer.state_dict()[k], v), k
        # the state is in buffers: a reloaded quantizer continues identically
        copy = Quantizer("activation", parse_role("activation", {**role, "delayed": True})).train()
        copy.load_state_dict(delayed.state_dict())
        x = torch.randn(64, 8, 12, generator=g) * 9
        assert torch.equal(copy(x), delayed(x))
        assert all(torch.equal(a, b) for a, b in zip(copy.state_dict().values(), delayed.state_dict().values(), strict=True))
    finally:
        set_compile(before)


def test_delayed_observer_clipped_ste_uses_range_it_quantized_with() -> None:
    from precsim.qat.config import parse_role
    from precsim.qat.quantizer import Quantizer

    q = Quantizer("activation", parse_role("activation", {"format": "int8", "delayed": True})).train()
    q(torch.randn(32, 10))  # stored range about [-2.5, 2.5]
    lo, hi = q.observer.min_val.clone(), q.observer.max_val.clone()
    x = (torch.randn(32, 10) * 10).requires_grad_()
    q(x).backward(torch.ones(32, 10))
    fmt = q.spec.format
    scale, zp = fmt.qparams(lo, hi)  # the range stored before this call, not the one after it
    inside = (x >= (fmt.qmin - zp - 0.5) * scale) & (x <= (fmt.qmax - zp + 0.5) * scale)
    assert 0 < int(inside.sum()) < x.numel()
    assert torch.equal(x.grad, inside.float())


@pytest.mark.parametrize("role", [{"format": "fp8_e4m3", "delayed": True},
                                  {"format": "int8", "observer": "percentile", "delayed": True},
                                  {"format": "int8", "delayed": "yes"}])
def test_delayed_observer_rejected_where_it_does_not_apply(role) -> None:
    from precsim.qat.config import parse_role

    with pytest.raises(ValueError, match="delayed"):
        parse_role("activation", role)


INF, NAN = float("inf"), float("nan")


@pytest.mark.parametrize("kind", ["minmax", "running_minmax", "moving_average", "percentile"])
@pytest.mark.parametrize("axis", [None, 1])
def test_a_tensor_with_no_finite_value_leaves_the_range(kind: str, axis) -> None:
    """The documented policy: an observer measures the finite values; a tensor (or channel)
    with none leaves the stored range as it was ([0, 0] and not initialized before any)."""
    first = Observer(kind, axis=axis)
    first.update(torch.full((6, 3, 4), NAN))
    assert not bool(first.initialized) and not first.min_val.any() and not first.max_val.any()
    x = torch.randn(6, 3, 4)
    first.update(x)  # the first finite tensor starts the range, as if nothing came before
    obs = Observer(kind, axis=axis)
    obs.update(x)
    assert torch.equal(first.min_val, obs.min_val) and torch.equal(first.max_val, obs.max_val)
    for bad in (torch.full((6, 3, 4), NAN), torch.tensor([INF, -INF, NAN]).repeat(6, 3, 1)[..., [0, 1, 2, 0]]):
        before = obs.min_val.clone(), obs.max_val.clone()
        obs.update(bad)
        assert torch.equal(obs.min_val, before[0]) and torch.equal(obs.max_val, before[1])
    if axis is not None:  # channel 0 without a finite value keeps its range, the others move on
        y = torch.randn(6, 3, 4) * 5
        y[:, 0] = NAN
        before = obs.min_val.clone()
        obs.update(y)
        assert obs.min_val[0] == before[0] and (kind == "running_minmax" or obs.min_val[1] != before[1])


def test_percentile_observer_measures_finite_values_only() -> None:
    """One NaN used to make the percentile range NaN, and every output with it."""
    x = torch.randn(1000)
    dirty = x.clone()
    dirty[::100], dirty[1::100], dirty[2::100] = NAN, INF, -INF
    ref, obs = Observer("percentile", percentile=99.0), Observer("percentile", percentile=99.0)
    ref.update(x[torch.isfinite(dirty)])
    obs.update(dirty)
    assert torch.equal(obs.min_val, ref.min_val) and torch.equal(obs.max_val, ref.max_val)


@pytest.mark.parametrize("compile_kernels, delayed", [(False, False), (True, False), (True, True)])
def test_prepared_point_rounds_non_finite_tensors_on_its_stored_range(compile_kernels: bool, delayed: bool,
                                                                      request) -> None:
    """In a prepared model: an all-Inf/NaN tensor saturates to the ends of the grid of the range
    observed so far (±qmax S, NaN stays NaN) and leaves the range; before any finite value, the
    range is [0, 0] and S = 1 (±Inf become qmin, qmax), as for precsim.quantize."""
    if compile_kernels:
        request.getfixturevalue("compiled")
    model = precsim.prepare(nn.Linear(64, 64), {"activation": {"format": "int8", "delayed": delayed}}).train()
    point, obs = model.precsim_activation, model.precsim_activation.observer
    bad = torch.tensor([INF, -INF, NAN, INF]).repeat(16, 16).requires_grad_()  # 2-D, 1024: the compiled STE path
    y = point(bad)
    assert not bool(obs.initialized)
    torch.testing.assert_close(y, torch.where(bad.isnan(), bad, torch.where(bad > 0, 127.0, -128.0)), rtol=0, atol=0,
                               equal_nan=True)
    model(torch.randn(16, 64))
    lo, hi = obs.min_val.clone(), obs.max_val.clone()
    for train in (True, False):
        point.train(train)
        y = point(bad)
        scale = float(torch.maximum(-lo, hi)) / 127
        want = torch.where(bad.isnan(), bad, torch.where(bad > 0, 127 * scale, -128 * scale))
        torch.testing.assert_close(y, want, rtol=0, atol=0, equal_nan=True)
        assert torch.equal(obs.min_val, lo) and torch.equal(obs.max_val, hi)
