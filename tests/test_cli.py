"""``precsim formats`` (in process and as ``python -m precsim``)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

import pytest

from precsim import cli
from precsim.formats import format_names, parse_format


def table_rows(out: str) -> dict[str, list[str]]:
    lines = out.splitlines()
    header = lines[0].split()
    assert header[:3] == ["name", "kind", "bits"] and "overflow" in header
    assert set(lines[1]) <= {"-", " "}
    rows = {}
    for line in lines[2:]:
        if not line.strip():
            break
        cols = [c for c in line.split("  ") if c.strip()]
        rows[cols[0].strip()] = [c.strip() for c in cols]
    return rows


def test_formats_lists_every_preset(capsys) -> None:
    assert cli.main(["formats"]) == 0
    out = capsys.readouterr().out
    rows = table_rows(out)
    assert list(rows) == format_names()
    for name, row in rows.items():
        fmt = parse_format(name)
        assert len(row) == 7, row
        _, kind, bits, top, sub, specials, overflow = row
        if kind == "float":
            assert bits == str(fmt.bits) and float(top) == pytest.approx(fmt.max, rel=1e-5)
            assert float(sub) == pytest.approx(fmt.smallest_subnormal, rel=1e-5)
            assert specials == fmt.specials and overflow == fmt.overflow
        elif kind == "int":
            assert bits == str(fmt.bits) and top == f"{fmt.qmax} x S" and sub == "-" and overflow == "saturate"
        else:
            assert kind == "block" and float(bits) == fmt.bits_per_element and top.endswith("x S")
            assert "NaN block" in specials
    assert rows["fp8_e4m3"][1:] == ["float", "8", "448", "0.00195312", "fn", "saturate"]
    assert rows["fp8_e5m2"][3] == "57344" and rows["fp8_e5m2"][6] == "inf"
    assert rows["mxfp4"][1:4] == ["block", "4.25", "6 x S"]
    assert rows["nvfp4"][2] == "4.5"
    assert rows["int8"][1:5] == ["int", "8", "127 x S", "-"]
    assert "Families:" in out


def test_formats_kind_filter(capsys) -> None:
    assert cli.main(["formats", "--kind", "int"]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert set(rows) == {"int8", "uint8", "int4"}


def test_no_command_prints_help(capsys) -> None:
    assert cli.main([]) == 2
    assert "formats" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["nosuch"])


def test_registry_accepts_new_commands(capsys, monkeypatch) -> None:
    """Other subcommands (e.g. ``sweep``) plug in through the registry."""
    monkeypatch.setattr(cli, "COMMANDS", dict(cli.COMMANDS))

    def add_parser(subparsers) -> argparse.ArgumentParser:
        p = subparsers.add_parser("hello", help="say hello")
        p.add_argument("--times", type=int, default=1)
        return p

    def run(args: argparse.Namespace) -> int:
        print("hello " * args.times)
        return 3

    cli.register("hello", add_parser, run)
    assert cli.main(["hello", "--times", "2"]) == 3
    assert capsys.readouterr().out.strip() == "hello hello"
    assert cli.main(["formats", "--kind", "dse"]) == 0  # the old ones still work


def test_python_dash_m() -> None:
    env = dict(os.environ)
    src = str(Path(cli.__file__).resolve().parents[1])
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    res = subprocess.run([sys.executable, "-m", "precsim", "formats"], capture_output=True, text=True, env=env,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    rows = table_rows(res.stdout)
    assert list(rows) == format_names()
