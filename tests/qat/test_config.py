"""Proofs 4 and 9: rules select exactly the intended modules; bad configs fail clearly."""

from __future__ import annotations

import re
import warnings

import pytest
import torch
from torch import nn

import precsim
from precsim.qat.prepare import summary_rows

from ._models import MLP, SmallCNN, make

ISSUE_CONFIG = {
    "activation": "int8",
    "weight": {"format": "int8", "granularity": "per_channel", "observer": "minmax"},
    "gradient": {"format": "fp8_e5m2", "rounding": "stochastic"},
    "rules": [
        {"type": "Linear", "weight": "int4"},
        {"match": "layer4.*", "gradient": "bf16"},
        {"match": "conv1", "activation": "fp32", "weight": "fp32", "gradient": "fp32"},
    ],
}

ISSUE_YAML = """
activation: int8
weight: {format: int8, granularity: per_channel, observer: minmax}
gradient: {format: fp8_e5m2, rounding: stochastic}
rules:
  - {type: Linear, weight: int4}
  - {match: "layer4.*", gradient: bf16}
  - {match: conv1, activation: fp32, weight: fp32, gradient: fp32}
"""


class Named(nn.Module):
    """Names as in a ResNet: conv1, bn1, relu, layer1..layer4 (blocks with conv1/bn1), fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.layer1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4))
        self.layer4 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.layer4(self.layer1(x))
        return self.fc(self.flatten(self.pool(x)))


FP8_SR = "fp8_e5m2 (stochastic)"
EXPECTED = {
    # (module, role): (format, observer, rounding, gradient)
    ("bn1", "activation"): ("int8", "moving_average", "nearest", FP8_SR),
    ("relu", "activation"): ("int8", "moving_average", "nearest", FP8_SR),
    ("layer1.0", "activation"): ("int8", "moving_average", "nearest", FP8_SR),
    ("layer1.0", "weight"): ("int8(axis=0)", "minmax", "nearest", "-"),
    ("layer1.1", "activation"): ("int8", "moving_average", "nearest", FP8_SR),
    ("layer4.0", "activation"): ("int8", "moving_average", "nearest", "bf16 (nearest)"),
    ("layer4.0", "weight"): ("int8(axis=0)", "minmax", "nearest", "-"),
    ("layer4.1", "activation"): ("int8", "moving_average", "nearest", "bf16 (nearest)"),
    ("layer4.2", "activation"): ("int8", "moving_average", "nearest", "bf16 (nearest)"),
    ("fc", "activation"): ("int8", "moving_average", "nearest", FP8_SR),
    ("fc", "weight"): ("int4", "minmax", "nearest", "-"),
}


def _table(model: nn.Module) -> dict:
    return {(r["module"], r["role"]): (r["format"], r["observer"], r["rounding"], r["gradient"])
            for r in summary_rows(model)}


@pytest.mark.parametrize("source", ["dict", "yaml"])
def test_issue_config_selects_exactly(source: str, tmp_path) -> None:
    cfg = ISSUE_CONFIG
    if source == "yaml":
        path = tmp_path / "qat.yaml"
        path.write_text(ISSUE_YAML)
        cfg = str(path)
    model = precsim.prepare(Named(), cfg)
    assert _table(model) == EXPECTED
    assert not hasattr(model.conv1, "precsim_activation")
    assert not hasattr(model.conv1, "parametrizations")
    assert "layer4.0" in precsim.summary(model)
    model(torch.randn(2, 1, 6, 6)).sum().backward()


def test_yaml_path_object_and_quantconfig() -> None:
    cfg = precsim.QuantConfig.from_any(ISSUE_CONFIG)
    model = precsim.prepare(Named(), cfg)
    assert _table(model) == EXPECTED


def test_rule_matching_nothing_warns() -> None:
    cfg = {"activation": "int8", "rules": [{"match": "decoder.*", "weight": "int4"},
                                           {"type": "Embedding", "activation": "bf16"}]}
    with pytest.warns(UserWarning) as record:
        precsim.prepare(make(MLP), cfg)
    messages = [str(w.message) for w in record]
    assert len(messages) == 2
    assert "decoder.*" in messages[0] and "matches no module" in messages[0]
    assert "Embedding" in messages[1] and "matches no module" in messages[1]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        precsim.prepare(make(MLP), {"activation": "int8", "rules": [{"match": "fc*", "weight": "int4"}]})


def test_later_rules_win_and_glob_reaches_leaves_only() -> None:
    cfg = {"activation": "int8", "rules": [
        {"match": "layer4.*", "activation": "bf16"},
        {"match": "layer4.1", "activation": "fp8_e4m3"},
    ]}
    table = _table(precsim.prepare(Named(), cfg))
    assert table[("layer4.0", "activation")][0] == "bf16"
    assert table[("layer4.1", "activation")][0] == "fp8_e4m3"
    assert ("layer4", "activation") not in table  # the container itself is not a quantization point


def test_prepare_twice_is_an_error() -> None:
    model = precsim.prepare(make(MLP), {"activation": "int8"})
    with pytest.raises(ValueError, match="already prepared"):
        precsim.prepare(model, {"activation": "int8"})


BAD = [
    ({"activations": "int8"}, ["'activations'", "activation", "weight_gradient", "rules"]),
    ({"rules": [{"match": "fc", "gradients": "bf16"}]}, ["'gradients'", "gradient", "match"]),
    ({"activation": "fp9"}, ["'fp9'", "activation", "bf16", "fp8_e4m3"]),
    ({"weight": "int99"}, ["99", "2..16"]),
    ({"activation": {"format": "int8", "rounding": "up"}}, ["'up'", "nearest", "stochastic", "toward_zero"]),
    ({"activation": {"format": "int8", "observer": "max"}}, ["'max'", "minmax", "moving_average", "percentile"]),
    ({"weight": {"format": "int8", "granularity": "per_row"}}, ["'per_row'", "per_tensor", "per_channel"]),
    ({"weight": {"format": "bf16", "granularity": "per_channel"}}, ["per_channel", "integer"]),
    ({"activation": {"format": "int8", "scale": 1024}}, ["'activation'", "scale", "gradient"]),
    ({"gradient": {"format": "fp8_e5m2", "scale": -1}}, ["-1", "dynamic"]),
    ({"gradient": {"format": "fp8_e5m2", "ste": "smooth"}}, ["'smooth'", "clipped", "plain"]),
    ({"activation": {"format": "int8", "momentum": 2.0}}, ["momentum", "2.0"]),
    ({"activation": {"fmt": "int8"}}, ["'fmt'", "format"]),
    ({"rules": [{"weight": "int4"}]}, ["rule 0", "match", "type"]),
    ({"rules": {"match": "fc"}}, ["rules", "list"]),
    ({"seed": "zero"}, ["seed", "'zero'"]),
]


@pytest.mark.parametrize(("cfg", "words"), BAD, ids=[str(c)[:40] for c, _ in BAD])
def test_bad_config_raises_value_error_naming_the_problem(cfg, words) -> None:
    with pytest.raises(ValueError) as info:
        precsim.prepare(make(SmallCNN), cfg)
    for word in words:
        assert word in str(info.value), (word, str(info.value))


def test_missing_yaml_path(tmp_path) -> None:
    path = tmp_path / "nope.yaml"
    with pytest.raises(ValueError, match=re.escape(str(path))):
        precsim.prepare(make(MLP), str(path))
    bad = tmp_path / "list.yaml"
    bad.write_text("- int8\n")
    with pytest.raises(ValueError, match="mapping"):
        precsim.prepare(make(MLP), bad)
