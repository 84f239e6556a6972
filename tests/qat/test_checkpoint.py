"""Proof 6: a checkpoint restores observers, DSE state, scalers and the stochastic stream exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import precsim

from ._models import SmallCNN, image_batches, make

CFG = {
    "activation": {"format": "int8", "rounding": "stochastic"},
    "weight": {"format": "int8", "granularity": "per_channel", "rounding": "stochastic"},
    "gradient": {"format": "fp8_e5m2", "rounding": "stochastic", "scale": "dynamic"},
    "weight_gradient": {"format": "bf16", "rounding": "stochastic"},
    "rules": [
        {"match": "conv2", "activation": {"format": "int8", "granularity": "per_channel", "observer": "percentile"}},
        {"match": "bn2", "activation": {"format": "dse(e=4,m=3,delayed=true)", "rounding": "stochastic"}},
        {"match": "relu1", "activation": {"format": "uint8", "observer": "running_minmax"}},
        {"type": "Linear", "weight": {"format": "int4", "observer": "moving_average", "momentum": 0.5}},
    ],
}


def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, lr: float = 0.1):
    model.train()
    model.zero_grad()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p -= lr * p.grad
    return out.detach(), grads


def test_state_dict_round_trip_is_exact(tmp_path) -> None:
    batches = image_batches(6)
    a = precsim.prepare(make(SmallCNN), CFG, seed=7)
    for x, y in batches[:3]:
        _step(a, x, y)
    state = {k: v.clone() for k, v in a.state_dict().items()}
    assert state["conv2.precsim_activation.observer.min_val"].shape == (8,)
    assert state["conv1.parametrizations.weight.0.observer.min_val"].shape == (4,)
    assert bool(state["bn2.precsim_activation.dse_ready"])
    assert int(state["fc.precsim_activation.step"]) == 3
    path = tmp_path / "ckpt.pt"
    torch.save(state, path)

    b = precsim.prepare(make(SmallCNN, seed=99), CFG, seed=7)  # other weights, fresh observers
    x_eval = image_batches(1, seed=42)[0][0]
    a.eval()
    b.eval()
    assert not torch.equal(a(x_eval), b(x_eval))
    missing, unexpected = b.load_state_dict(torch.load(path), strict=True)
    assert not missing and not unexpected
    for k, v in state.items():
        assert torch.equal(v, b.state_dict()[k]), k
    with torch.no_grad():
        assert torch.equal(a(x_eval), b(x_eval))

    # the training stream continues identically: stochastic rounding, observers, DSE, scaler
    for x, y in batches[3:]:
        out_a, grads_a = _step(a, x, y)
        out_b, grads_b = _step(b, x, y)
        assert torch.equal(out_a, out_b)
        assert all(torch.equal(ga, gb) for ga, gb in zip(grads_a, grads_b, strict=True))
    a.eval()
    b.eval()
    assert torch.equal(a(x_eval), b(x_eval))


def test_stream_depends_on_step_counter() -> None:
    """Without the saved counters a fresh model would draw other random bits."""
    batches = image_batches(4)
    a = precsim.prepare(make(SmallCNN), CFG, seed=7)
    for x, y in batches[:3]:
        _step(a, x, y)
    state = {k: v for k, v in a.state_dict().items() if not k.endswith(".step")}
    b = precsim.prepare(make(SmallCNN), CFG, seed=7)
    b.load_state_dict(state, strict=False)
    out_a, _ = _step(a, *batches[3])
    out_b, _ = _step(b, *batches[3])
    assert not torch.equal(out_a, out_b)


# --- the config fingerprint of each quantization point ------------------------------------------

SAVED = {"activation": "int8", "weight": {"format": "int8", "granularity": "per_channel"}}


def _trained(cfg: dict) -> nn.Module:
    model = precsim.prepare(make(SmallCNN), cfg, seed=7)
    _step(model, *image_batches(1)[0])
    return model


def test_state_dict_carries_each_points_fingerprint() -> None:
    from precsim.qat.fingerprint import decode

    model = _trained(CFG)
    state = model.state_dict()
    points = dict(precsim.quantizers(model))
    assert {k.removesuffix("._extra_state") for k in state if k.endswith("._extra_state")} == set(points)
    assert all(isinstance(v, torch.Tensor) for v in state.values())  # safetensors, clone loops, .to() still work
    assert decode(state["conv1.parametrizations.weight.0._extra_state"]) == {
        "role": "weight", "format": "int8(axis=0)", "observer": "minmax",
        "gradient": precsim.parse_format("bf16").spec}  # the canonical spec: equal formats, equal fingerprints
    assert decode(state["conv2.precsim_activation._extra_state"]) == {
        "role": "activation", "format": "int8(axis=1)", "observer": "percentile(99.99)",
        "gradient": precsim.parse_format("fp8_e5m2").spec,
        "gradient_scale": "dynamic"}
    assert decode(state["bn2.precsim_activation._extra_state"])["format"] == "dse(e=4,m=3,delayed=true)"


@pytest.mark.parametrize("other, differing", [
    ({"activation": "int4", "weight": "int4"}, 10),  # every point: 5 listed, 5 counted
    ({"activation": "int8", "weight": "int8"}, 3),  # per-tensor weights (they would take (C,) ranges)
    ({"activation": "int8", "weight": {"format": "int8", "granularity": "per_channel", "observer": "moving_average"}},
     3),
])
def test_loading_another_config_raises_naming_the_points(other: dict, differing: int) -> None:
    saved = _trained(SAVED).state_dict()
    model = precsim.prepare(make(SmallCNN, seed=99), other, seed=7)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError) as err:
        model.load_state_dict(saved)
    text = str(err.value)
    assert f"{differing} of 10 quantization points differ" in text
    assert "conv1.parametrizations.weight.0: saved {role=weight, format=int8(axis=0), observer=minmax}" in text
    assert "precsim.loading_any_config()" in text
    assert text.count(": saved {") == min(differing, 5)
    assert ("... and 5 more" in text) == (differing == 10)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # nothing was loaded


@pytest.mark.parametrize("change", [
    {"weight": "int8"},
    {"activation": {"format": "uint8"}},
    {"activation": {"format": "int8", "observer": "running_minmax"}},
    {"activation": {"format": "int8", "observer": "percentile", "percentile": 99.0}},
    {"activation": {"format": "int8", "delayed": True}},
    {"gradient": "bf16"},
    {"gradient": {"format": "fp8_e5m2", "scale": 1024}},
    {"gradient": {"format": "int8", "delayed": True}},
])
def test_every_setting_that_gives_buffers_their_meaning_counts(change: dict) -> None:
    base = {"activation": {"format": "int8", "observer": "percentile"}, "weight": {"format": "int8",
            "granularity": "per_channel"}, "gradient": {"format": "fp8_e5m2", "scale": "dynamic"}}
    saved = precsim.prepare(nn.Linear(4, 3), base).state_dict()
    with pytest.raises(RuntimeError, match="quantization points? differ"):
        precsim.prepare(nn.Linear(4, 3), {**base, **change}).load_state_dict(saved)


def test_rounding_ste_and_momentum_are_not_part_of_it() -> None:
    saved = precsim.prepare(nn.Linear(4, 3), {"activation": "int8"}).state_dict()
    other = {"activation": {"format": "int8", "rounding": "stochastic", "ste": "plain", "momentum": 0.5}}
    model = precsim.prepare(nn.Linear(4, 3), other)
    missing, unexpected = model.load_state_dict(saved, strict=True)
    assert not missing and not unexpected


def test_loading_any_config_takes_the_buffers_as_they_are() -> None:
    saved = _trained(SAVED).state_dict()
    model = precsim.prepare(make(SmallCNN, seed=99), {"activation": "int8", "weight": "int8"}, seed=7)
    with precsim.loading_any_config():
        missing, unexpected = model.load_state_dict(saved)
    assert not missing and not unexpected
    assert model.conv1.parametrizations.weight[0].observer.min_val.shape == (4,)  # as saved
    with pytest.raises(RuntimeError, match="another config"):  # only inside the block
        model.load_state_dict(saved)


def test_state_dict_saved_before_fingerprints_loads_strictly(tmp_path) -> None:
    a = _trained(CFG)
    old = {k: v for k, v in a.state_dict().items() if not k.endswith("._extra_state")}
    torch.save(old, tmp_path / "old.pt")
    b = precsim.prepare(make(SmallCNN, seed=99), CFG, seed=7)
    missing, unexpected = b.load_state_dict(torch.load(tmp_path / "old.pt", weights_only=True), strict=True)
    assert not missing and not unexpected
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in old.items())
    # into a model prepared otherwise: nothing to compare, so it loads as before fingerprints
    old = {k: v for k, v in _trained(SAVED).state_dict().items() if not k.endswith("._extra_state")}
    precsim.prepare(make(SmallCNN), {"activation": "int4", "weight": "int4"}).load_state_dict(old)


def test_a_quantizer_loaded_on_its_own_checks_too() -> None:
    """Outside a prepared model's load (a quantizer or a submodule loaded alone), each point
    reports itself through torch's error."""
    saved = precsim.prepare(nn.Linear(4, 3), {"activation": "int8"}).precsim_activation.state_dict()
    point = precsim.prepare(nn.Linear(4, 3), {"activation": "int4"}).precsim_activation
    with pytest.raises(RuntimeError, match=r"the quantizer: saved \{role=activation, format=int8"):
        point.load_state_dict(saved)
    with precsim.loading_any_config():
        point.load_state_dict(saved)
