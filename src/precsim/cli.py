"""Command line: ``precsim <command> ...`` (also ``python -m precsim``).

Subcommands live in the :data:`COMMANDS` registry. Each is a :class:`Command` with two
functions: ``add_parser(subparsers)`` adds (and returns) its ``argparse`` parser, and
``run(args)`` does the work and returns the exit status. To add one, write those two functions
and call :func:`register` (or add an entry to ``COMMANDS``) before :func:`main` runs.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from precsim.formats import format_names, parse_format
from precsim.formats.parse import family_usages, format_kinds


@dataclass(frozen=True)
class Command:
    """One subcommand: how to build its parser and how to run it."""

    add_parser: Callable[[argparse._SubParsersAction], argparse.ArgumentParser]
    run: Callable[[argparse.Namespace], int]


COMMANDS: dict[str, Command] = {}


def register(name: str, add_parser: Callable[..., argparse.ArgumentParser],
             run: Callable[[argparse.Namespace], int]) -> None:
    """Add (or replace) the subcommand ``name``."""
    COMMANDS[name] = Command(add_parser, run)


# --- precsim formats ---------------------------------------------------------------------------
FORMAT_COLUMNS = ("name", "kind", "bits", "max", "min subnormal", "specials", "overflow")
def formats_table(kind: str | None = None) -> list[tuple[str, ...]]:
    """Rows (without the header) for every preset, optionally of one kind."""
    rows = [(name, *parse_format(name).table_row()) for name in format_names()]
    return [r for r in rows if kind is None or r[1] == kind]


def render_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in [header, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def add_formats_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "formats",
        help="list the preset number formats",
        description="List every preset number format: kind, bits, largest value, smallest "
        "subnormal, special values and what overflow does by default.",
    )
    p.add_argument("--kind", choices=format_kinds(), help="only formats of this kind")
    return p


def run_formats(args: argparse.Namespace) -> int:
    rows = formats_table(getattr(args, "kind", None))
    print(render_table(FORMAT_COLUMNS, rows))
    print()
    print("S: the scale (per tensor/channel/group for int; per block for block formats; nvfp4's "
          "is E4M3 x a float32 tensor scale). 2^b: DSE's shift, chosen per tensor.")
    print("specials: ieee = Inf/NaN in the top exponent code; fn = no Inf, one NaN code; "
          "fnuz = no Inf, no -0, NaN at the -0 code; finite = no Inf/NaN codes.")
    print(f"Families: {'; '.join(family_usages())}. Options: e.g. fp8_e4m3(overflow=nan), int8(axis=0), "
          "mxfp4(block=16).")
    return 0


def add_sweep_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    from precsim.experiments import command

    command.add_parser(subparsers)
    return subparsers.choices["sweep"]


def run_sweep(args: argparse.Namespace) -> int:
    from precsim.experiments import command

    return command.run(args)


def _study(name: str) -> tuple[Callable[..., argparse.ArgumentParser], Callable[[argparse.Namespace], int]]:
    def add(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
        from precsim.experiments import study_command

        return study_command.add_parser(subparsers, name)

    def run(args: argparse.Namespace) -> int:
        from precsim.experiments import study_command

        return study_command.run(args)

    return add, run


register("sweep", add_sweep_parser, run_sweep)
register("analyze", *_study("analyze"))
register("search", *_study("search"))
register("formats", add_formats_parser, run_formats)


# --- entry point -------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    from precsim import __version__

    parser = argparse.ArgumentParser(
        prog="precsim",
        description="Simulate number formats inside float32 PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"precsim {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, command in COMMANDS.items():
        sub = command.add_parser(subparsers)
        sub.set_defaults(_run=command.run, command=name)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``precsim`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
