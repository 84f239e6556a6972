"""collect_stats: per-point telemetry, forward and backward, checked against direct computation."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import precsim
from precsim.qat.telemetry import measure


def _by(stats, direction: str) -> dict[tuple[str, str, str], dict]:  # noqa: ANN001
    return {(r["module"], r["op"], r["operand"]): r for r in stats.rows() if r["direction"] == direction}


def test_measure_counts_saturation_underflow_and_non_finite_values() -> None:
    x = torch.tensor([1000.0, -500.0, 1.0, 1e-12, 0.0, float("nan"), 3.0, 2.0])
    q = precsim.quantize(x, "fp8_e4m3")  # saturates at 448; 1e-12 flushes to zero
    m = measure(x, q)
    assert m["saturated_pct"] == 100 * 2 / 8
    assert m["underflow_pct"] == 100 * 1 / 8
    assert m["nonfinite_in_pct"] == m["nonfinite_pct"] == 100 * 1 / 8
    assert m["amax"] == 1000.0
    keep = torch.isfinite(x)
    err = (x[keep] - q[keep]).pow(2).sum().item()
    assert m["qsnr_db"] == pytest.approx(10 * math.log10(x[keep].pow(2).sum().item() / err), rel=1e-6)
    assert measure(torch.ones(4), torch.ones(4))["qsnr_db"] == math.inf
    inf = measure(torch.tensor([1.0, 20.0]), precsim.quantize(torch.tensor([1.0, 20.0]), "hfp8_fwd"))
    assert inf["nonfinite_pct"] == 50.0 and inf["saturated_pct"] == 50.0  # overflow to Inf counts as both


def test_exactly_ten_percent_above_448_reads_ten_percent_saturated_and_large_tensors_are_estimated() -> None:
    x = torch.linspace(-1, 1, 1000)
    x[::10] = 500.0  # 100 of 1000
    assert measure(x, precsim.quantize(x, "fp8_e4m3"))["saturated_pct"] == 10.0
    big = torch.randn(1 << 20)
    big[::10] = 1000.0
    m = measure(big, precsim.quantize(big, "fp8_e4m3"))  # estimated on 65536 values: no aliasing with the period
    assert m["saturated_pct"] == pytest.approx(10.0, abs=0.5) and m["amax"] == 1000.0
    big[12345] = float("inf")  # one non-finite value is always counted, on the whole tensor
    assert measure(big, precsim.quantize(big, "bf16"))["nonfinite_pct"] == pytest.approx(100 / (1 << 20))


def test_forward_and_backward_rows_match_the_points_own_rounding() -> None:
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    model = precsim.prepare(nn.Sequential(lin), {"points": "operands", "activation": "int8", "weight": "bf16",
                                                 "gradient": "fp8_e5m2"})
    x = torch.randn(16, 64, requires_grad=True)
    dy = torch.randn(16, 32) * 1e-6  # small: some of it flushes to zero in e5m2
    with precsim.collect_stats(model, every=1) as stats:
        model(x).backward(dy)
    fwd, bwd = _by(stats, "forward"), _by(stats, "backward")
    assert set(fwd) == {("0", "linear", "input"), ("0", "linear", "weight")}
    point = dict(precsim.quantizers(model))["0.precsim_operands.linear_0_input"]
    point.eval()  # rounds on the range the recorded call measured (the first call sets it)
    with torch.no_grad():
        expected = measure(x, point(x))
    assert fwd[("0", "linear", "input")]["qsnr_db"] == pytest.approx(expected["qsnr_db"], rel=1e-6)
    assert fwd[("0", "linear", "weight")]["qsnr_db"] == pytest.approx(
        measure(lin.weight, precsim.quantize(lin.weight.detach(), "bf16"))["qsnr_db"], rel=1e-6)
    wq = precsim.quantize(lin.weight.detach(), "bf16")
    g = dy @ wq  # what reaches the input point in backward, before its rounding
    assert bwd[("0", "linear", "input")]["underflow_pct"] == pytest.approx(
        measure(g, precsim.quantize(g, "fp8_e5m2"))["underflow_pct"])
    assert bwd[("0", "linear", "input")]["underflow_pct"] > 0
    assert torch.equal(x.grad, precsim.quantize(g, "fp8_e5m2"))  # the recorded copy changed nothing
    assert stats.first_nonfinite is None
    assert "qsnr_db" in stats.table() and "backward" in stats.table()


def test_sampling_every_n_calls_and_nothing_outside() -> None:
    model = precsim.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), {"activation": "int8"})
    x = torch.randn(4, 8)
    model(x)  # before: not recorded
    with precsim.collect_stats(model, every=3) as stats:
        for _ in range(7):
            model(x)
    model(x)
    assert {r["samples"] for r in stats.rows()} == {3}  # calls 1, 4 and 7
    with pytest.raises(ValueError, match="every=0 not allowed; allowed: an integer >= 1"):
        with precsim.collect_stats(model, every=0):
            pass


def test_first_nonfinite_names_the_point_role_and_direction_of_an_overflow() -> None:
    """hfp8_fwd (1-4-3, exponent bias 11) tops out at 15 and overflows to Inf: the FlexFP8 collapse
    of the default sweep, seen at the point where it starts."""
    model = precsim.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)),
                            {"activation": "hfp8_fwd", "gradient": "hfp8_bwd"})
    model.train()
    with precsim.collect_stats(model, every=1) as stats:
        model(torch.randn(2, 8)).sum().backward()  # small values: all finite
        assert stats.first_nonfinite is None
        model(torch.randn(2, 8) * 100).sum().backward()
    step, point, role, direction = stats.first_nonfinite
    assert (step, point, role, direction) == (2, "0.output", "activation", "forward")
    row = _by(stats, "forward")[("0", "output", "output")]
    assert row["nonfinite_pct"] > 0 and row["saturated_pct"] > 0 and row["samples"] == 2


def test_points_of_another_model_are_not_recorded() -> None:
    a = precsim.prepare(nn.Sequential(nn.Linear(4, 4)), {"activation": "int8"})
    b = precsim.prepare(nn.Sequential(nn.Linear(4, 4)), {"activation": "int8"})
    with precsim.collect_stats(a, every=1) as stats:
        b(torch.randn(2, 4))
        a(torch.randn(2, 4))
    assert [r["module"] for r in stats.rows()] == ["0"]


def test_stats_continue_from_a_saved_state_on_a_rebuilt_model() -> None:
    """A checkpoint keeps the stats by point name: a rebuilt model continues them exactly as one
    uninterrupted run would (the same calls sampled, the same means)."""
    cfg = {"activation": "int8", "gradient": "fp8_e5m2"}
    xs = [torch.randn(4, 8) for _ in range(7)]

    def build() -> nn.Module:
        torch.manual_seed(0)
        return precsim.prepare(nn.Sequential(nn.Linear(8, 8), nn.ReLU()), cfg)

    whole = build()
    with precsim.collect_stats(whole, every=3) as ref:
        for x in xs:
            whole(x).sum().backward()
    first = build()
    with precsim.collect_stats(first, every=3) as part:
        for x in xs[:4]:
            first(x).sum().backward()
    state = part.state_dict()
    second = build()
    second.load_state_dict(first.state_dict())
    with precsim.collect_stats(second, every=3) as rest:
        rest.load_state_dict(state)
        for x in xs[4:]:
            second(x).sum().backward()
    assert rest.rows() == ref.rows() and [r["samples"] for r in ref.rows()] == [3, 3, 3, 3]
    with pytest.raises(ValueError, match="every=3 cannot continue with every=5"):
        precsim.qat.telemetry.Stats(second, 5).load_state_dict(state)


def test_the_first_nonfinite_call_keeps_its_numbers_and_the_formats_limit() -> None:
    model = precsim.prepare(nn.Sequential(nn.Linear(4, 4)), {"activation": "hfp8_fwd"})
    with precsim.collect_stats(model, every=1) as stats:
        model(torch.full((1, 4), 100.0))
    assert stats.first_nonfinite == (1, "0.output", "activation", "forward")
    m = stats.first_metrics
    assert m["format"] == "hfp8_fwd" and m["max"] == 15.0 and m["amax"] > 15 and m["nonfinite_pct"] > 0


def test_mx_block_scales_report_their_exponent_range_and_the_blocks_at_the_e8m0_limits() -> None:
    """One block of 32 asks for a scale below 2^-127 (values ~1e-40, float32 subnormals): 1 of 4
    blocks at the limit; the others' exponents are floor(log2 amax) - 8 (E4M3's emax)."""
    x = torch.ones(4, 32)
    x[0] = 1e-40
    x[1] *= 2.0**20
    x[2, 0] = 0.0  # a block with a zero still has a nonzero max
    model = precsim.prepare(nn.Sequential(nn.Identity()), {"rules": [{"type": "Identity", "activation": "mxfp8_e4m3"}]})
    with precsim.collect_stats(model, every=1) as stats:
        model(x)
    (row,) = stats.rows()
    assert row["scale_limit_pct"] == 25.0
    assert row["scale_exp_min"] == math.floor(math.log2(1e-40)) - 8 and row["scale_exp_max"] == 20 - 8
    plain = precsim.prepare(nn.Sequential(nn.Identity()), {"rules": [{"type": "Identity", "activation": "int8"}]})
    with precsim.collect_stats(plain, every=1) as stats:
        plain(x)
    assert math.isnan(stats.rows()[0]["scale_limit_pct"])  # not a block format: nothing to say


def test_integer_accumulator_overflow_events_are_counted_while_collecting() -> None:
    torch.manual_seed(0)
    model = precsim.prepare(nn.Sequential(nn.Linear(256, 8)), {
        "points": "operands", "activation": "int8", "weight": "int8",
        "accumulator": {"format": "int12", "overflow": "wrap"}})
    x = torch.randn(16, 256) * 4
    model(x)  # before: not counted
    with precsim.collect_stats(model, every=1) as stats:
        model(x)
        model(x)
    events = stats.overflows()
    (name,) = events
    from precsim.qat.accumulator import overflows

    total = overflows(model)[name]
    assert events[name] > 0 and total == events[name] * 3 // 2  # three calls in all, two inside
    assert "overflow events" in stats.table()
