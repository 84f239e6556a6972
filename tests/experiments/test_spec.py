"""Spec loading and validation: every bad config fails before anything is trained."""

from __future__ import annotations

from pathlib import Path

import pytest

from precsim.experiments import command
from precsim.experiments.schemes import BUILTIN_SCHEMES, DEFAULT_SCHEMES
from precsim.experiments.spec import load_spec
from precsim.qat.config import QuantConfig

from ._helpers import tiny_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def test_example_yaml_loads() -> None:
    spec = load_spec(EXAMPLES / "sweep.yaml")
    assert spec.model == "resnet" and spec.dataset == "mnist5k"
    assert [s.name for s in spec.schemes] == ["fp32", "flexfp8_dse", "int8_sr", "fp8_first_last_bf16",
                                              "bf16_allreduce"]
    assert spec.scheme("bf16_allreduce").allreduce == "bf16"
    assert spec.scheme("int8_sr").config["gradient"] == {"format": "int8", "rounding": "stochastic"}


def test_default_spec_is_table1_plus_mx() -> None:
    spec = load_spec(None)
    assert [s.name for s in spec.schemes] == list(DEFAULT_SCHEMES)
    assert {"fp32", "qint8", "qint8_grad8", "bf16", "flexfp8", "flexfp8_gs10k", "flexfp8_dse", "mxfp8",
            "mxfp4"} == set(DEFAULT_SCHEMES)
    assert spec.model == "resnet" and spec.dataset == "mnist5k" and spec.out == "precsim-out"
    assert spec.scheme("fp32").is_baseline and not spec.scheme("bf16").is_baseline


@pytest.mark.parametrize("name", list(BUILTIN_SCHEMES))
def test_builtin_schemes_are_valid_prepare_configs(name: str) -> None:
    QuantConfig.from_any(BUILTIN_SCHEMES[name])


def test_paper_formats_in_builtin_schemes() -> None:
    assert BUILTIN_SCHEMES["flexfp8"]["activation"] == "hfp8_fwd"
    assert BUILTIN_SCHEMES["flexfp8"]["gradient"] == "hfp8_bwd"
    assert BUILTIN_SCHEMES["flexfp8_gs10k"]["gradient"] == {"format": "hfp8_bwd", "scale": 10000}
    assert BUILTIN_SCHEMES["flexfp8_dse"]["weight"] == "dse(e=4,m=3)"
    assert BUILTIN_SCHEMES["qint8"].get("gradient") is None
    assert BUILTIN_SCHEMES["qint8_grad8"]["gradient"] == "int8"


def test_overrides_and_scheme_subset() -> None:
    spec = load_spec(tiny_config(), schemes="qint8,bf16", epochs=4, out="x", seed=3, batch_size=16)
    assert [s.name for s in spec.schemes] == ["qint8", "bf16"]  # bf16: a built-in name not in the config
    assert (spec.epochs, spec.out, spec.seed, spec.batch_size) == (4, "x", 3, 16)


def test_fingerprint_ignores_out_and_schemes_only() -> None:
    a = load_spec(tiny_config(), out="a")
    assert a.fingerprint() == load_spec(tiny_config(schemes=["bf16"]), out="b").fingerprint()
    assert a.fingerprint() != load_spec(tiny_config(), epochs=2).fingerprint()
    assert a.fingerprint() != a.fingerprint(world_size=2)


def test_inline_config_file_and_builtin_schemes(tmp_path: Path, write_config) -> None:
    (tmp_path / "q.yaml").write_text("activation: int8\nweight: int4\n")
    spec = load_spec(write_config(tiny_config(schemes=[
        {"name": "inline", "weight": "int4"},
        {"name": "file", "config": "q.yaml"},  # relative to the sweep YAML
        {"name": "ref", "builtin": "mxfp8", "allreduce": "bf16"},
    ]) | {"dataset": "digits", "model": "mlp"}))
    assert spec.scheme("inline").config == {"weight": "int4"}
    assert spec.scheme("file").config == {"activation": "int8", "weight": "int4"}
    assert spec.scheme("ref").config == BUILTIN_SCHEMES["mxfp8"]


@pytest.mark.parametrize(("changes", "message"), [
    ({"model": "alexnet"}, "unknown model 'alexnet'"),
    ({"model": {"name": "resnet", "depth": 3}}, "unknown argument 'depth'"),
    ({"model": {"name": "vit", "patch_size": 5}}, "divisible by patch_size"),
    ({"dataset": {"name": "cifar10", "root": "/no/such/folder"}}, "dataset path '/no/such/folder' does not exist"),
    ({"dataset": {"name": "cifar10"}}, "needs dataset.root"),
    ({"dataset": "imagenet"}, "unknown dataset 'imagenet'"),
    ({"optimizer": {"name": "lamb"}}, "unknown optimizer 'lamb'"),
    ({"epochs": 0}, "epochs must be an integer >= 1"),
    ({"batchsize": 32}, "unknown key 'batchsize'"),
    ({"schemes": [{"name": "x", "activation": "int9000"}]}, "scheme 'x'"),
    ({"schemes": [{"name": "x", "activation": "fp7"}]}, "unknown format 'fp7'"),
    ({"schemes": [{"name": "x", "weight": {"format": "int8", "rounding": "up"}}]}, "rounding 'up' not allowed"),
    ({"schemes": [{"activation": "int8"}]}, "needs a 'name'"),
    ({"schemes": [{"name": "x", "builtin": "bf16", "weight": "int8"}]}, "only one of"),
    ({"schemes": [{"name": "x", "builtin": "bf17"}]}, "unknown built-in scheme 'bf17'"),
    ({"schemes": [{"name": "x", "activaton": "int8"}]}, "unknown key 'activaton'"),
    ({"schemes": [{"name": "x", "config": "missing.yaml"}]}, "does not exist"),
    ({"schemes": [{"name": "x", "allreduce": "fp3"}]}, "allreduce"),
    ({"schemes": ["fp32", "fp32"]}, "repeated: fp32"),
    ({"schemes": ["bf17"]}, "unknown built-in scheme 'bf17'"),
    ({"schemes": [{"name": "a/b"}]}, "may only hold"),
    ({"schemes": []}, "non-empty list"),
])
def test_bad_configs_raise_clear_errors(changes: dict, message: str) -> None:
    with pytest.raises(ValueError, match=_escape(message)):
        load_spec(tiny_config(**changes))


def _escape(text: str) -> str:
    import re

    return re.escape(text)


def test_bad_scheme_subset() -> None:
    with pytest.raises(ValueError, match="unknown scheme 'nope'"):
        load_spec(tiny_config(), schemes="fp32,nope")


def test_cli_rejects_bad_config_before_training(write_config, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    path = write_config(tiny_config(model="alexnet"))
    assert command.main(["sweep", "--config", str(path), "--out", str(out)]) == 2
    assert "unknown model 'alexnet'" in capsys.readouterr().err
    assert not out.exists()  # nothing written, nothing trained

    path = write_config(tiny_config(dataset={"name": "cifar10", "root": "nowhere"}))
    assert command.main(["sweep", "--config", str(path), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err and not out.exists()

    path = write_config(tiny_config(schemes=[{"name": "bad", "weight": {"fromat": "int8"}}]))
    assert command.main(["sweep", "--config", str(path), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "scheme 'bad'" in err and "unknown key 'fromat'" in err and not out.exists()

    assert command.main(["sweep", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_list_schemes_and_dry_run(capsys) -> None:
    assert command.main(["sweep", "--list-schemes"]) == 0
    assert "flexfp8_gs10k" in capsys.readouterr().out
    assert command.main(["sweep", "--dry-run", "--epochs", "7"]) == 0
    assert "epochs: 7" in capsys.readouterr().out


def test_relaunch_command_uses_one_module_constant() -> None:
    import argparse

    from precsim.experiments import distributed

    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    command.add_parser(sub)
    args = parser.parse_args(["sweep", "--nproc", "2", "--epochs", "1", "--schemes", "fp32", "--fresh"])
    rest = command.relaunch_args(args)
    assert rest == ["--schemes", "fp32", "--epochs", "1", "--fresh"]
    cmd = distributed.relaunch_command(2, rest)
    i = cmd.index("-m", 3)
    assert cmd[1:3] == ["-m", "torch.distributed.run"] and "--nproc-per-node" in cmd
    assert cmd[i + 1] == distributed.RELAUNCH_MODULE and cmd[i + 2] == "sweep" and "--nproc" not in cmd


def test_dry_run_reports_a_rule_that_matches_no_module(tmp_path, write_config) -> None:  # type: ignore[no-untyped-def]
    """The rule's warning comes at once, naming the scheme, with --dry-run too; the real run
    does not say it a second time for the same scheme."""
    import warnings

    from precsim.experiments.train import build_model

    scheme = {"name": "typo", "activation": "int8", "rules": [{"match": "no_such_layer.*", "activation": "fp32"}]}
    cfg = write_config(tiny_config(schemes=["fp32", scheme]))
    with pytest.warns(UserWarning, match="scheme 'typo': precsim: rule .*no_such_layer.* matches no module"):
        assert command.main(["sweep", "--config", str(cfg), "--dry-run"]) == 0
    with pytest.warns(UserWarning, match="scheme 'typo'"):
        spec = load_spec(str(cfg), out=str(tmp_path / "out"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model(spec, spec.schemes[1])
