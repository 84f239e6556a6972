"""``precsim analyze`` and ``precsim search``: the command-line side of a study.

    precsim analyze [--config study.yaml] [--out DIR] [--fresh] [--no-progress]
    precsim search  [--config study.yaml] [--budget B] [--out DIR] [--fresh] [--no-progress]

With no ``--config`` both study the default sweep's ResNet on MNIST-5k
(:mod:`precsim.experiments.study` has the YAML layout). Both resume: run the same command again
after an interruption and the measurements already made are reused.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_OUTS = {"analyze": "precsim-analyze", "search": "precsim-search"}
_HELP = {"analyze": "sensitivity of each point group to each candidate format",
         "search": "the best mixed format assignment under a cost budget"}


def add_parser(subparsers: argparse._SubParsersAction, name: str) -> argparse.ArgumentParser:
    p = subparsers.add_parser(name, help=_HELP[name], description=f"precsim {name}: {_HELP[name]}.")
    p.add_argument("--config", help="a study YAML (default: the zoo ResNet on MNIST-5k)")
    p.add_argument("--out", default=DEFAULT_OUTS[name], help=f"output folder (default: {DEFAULT_OUTS[name]})")
    p.add_argument("--fresh", action="store_true", help="measure everything again instead of resuming")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    if name == "search":
        p.add_argument("--budget", type=float, help="one budget: average cost per element (bits by default)")
    return p


def run(args: argparse.Namespace) -> int:
    from precsim.experiments.lock import FolderBusyError
    from precsim.experiments.study import load_study

    name = args.command

    def say(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    try:
        study = load_study(args.config, budget=getattr(args, "budget", None), search=name == "search")
        if name == "analyze":
            from precsim.experiments.sensitivity import run_analyze

            run_analyze(study, Path(args.out), fresh=args.fresh, progress=not args.no_progress, log=say)
        else:
            from precsim.experiments.search import run_search

            for s in run_search(study, Path(args.out), fresh=args.fresh, progress=not args.no_progress, log=say):
                what = "uniform " + s["label"] if s["kind"] == "uniform" else f"mixed ({s['quantized_groups']} groups)"
                print(f"budget {s['budget']:g}: {what}, cost {s['cost']:.3f}, held-out {study.task.metric} "
                      f"{s['metric']:.4f} -> {args.out}/budget-{s['budget']:g}.yaml")
    except (ValueError, FolderBusyError) as err:
        print(f"precsim {name}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only folder: what was measured is kept
        print(f"precsim {name}: error: {err}. The measurements made are kept in {args.out}; fix the cause (free "
              "disk space, permissions) and run the same command again to continue.", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nprecsim {name}: interrupted; the measurements made are kept in {args.out}: run the same command "
              "again to continue.", file=sys.stderr)
        return 130
    return 0


__all__ = ["DEFAULT_OUTS", "add_parser", "run"]
