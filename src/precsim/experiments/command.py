"""``precsim sweep``: the command line of the experiments package.

``add_parser(subparsers)`` adds the ``sweep`` subcommand to precsim's CLI and ``run(args)``
executes it; ``python -m precsim.experiments.command sweep ...`` runs it standalone.

Examples::

    precsim sweep                                   # default sweep -> ./precsim-out
    precsim sweep --config examples/sweep.yaml --out runs/a
    precsim sweep --schemes fp32,flexfp8_dse --epochs 1
    precsim sweep --nproc 2                         # 2-process DDP (gloo on CPU)
    torchrun --nproc-per-node 2 -m precsim sweep    # the same, launched by hand
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from typing import Any

from precsim.experiments.spec import DEFAULT_OUT


def add_parser(subparsers: Any) -> None:
    """Add the ``sweep`` subcommand to an argparse subparsers object."""
    p = subparsers.add_parser(
        "sweep",
        help="train a model under several number-format schemes and compare them",
        description="Train a small model under several quantization schemes (default: Tamiya et al.'s "
                    "Table 1 plus MXFP8 and MXFP4 on a ResNet and the 5,000-digit MNIST subset), and write "
                    f"results.csv/json, curves.csv/png and report.md to an output folder (default ./{DEFAULT_OUT}). "
                    "Rerunning with the same folder skips finished schemes and resumes an interrupted one.",
    )
    p.add_argument("--config", metavar="YAML", help="sweep config (model, dataset, optimizer, epochs, schemes, ...)")
    p.add_argument("--schemes", metavar="A,B,...", help="run only these schemes (names from the config or built-in)")
    p.add_argument("--epochs", type=int, help="override the number of epochs")
    p.add_argument("--out", metavar="DIR", help=f"output folder (default: the config's, else ./{DEFAULT_OUT})")
    p.add_argument("--seed", type=int, help="override the seed (initial weights, data order, rounding)")
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), help="override the device")
    p.add_argument("--batch-size", type=int, help="override the global batch size")
    p.add_argument("--train-subset", type=int, metavar="N", help="train on the first N training images only")
    p.add_argument("--max-steps", type=int, metavar="N", help="at most N optimizer steps per epoch")
    p.add_argument("--fresh", "--force", action="store_true", dest="fresh",
                   help="delete precsim's earlier results/checkpoints in the output folder and start over")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="data-parallel over N processes: re-launch through torch.distributed.run")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--no-compile", action="store_true",
                   help="round with the eager reference kernels instead of compiled ones (same bits, slower; "
                        "skips the first-call compilation, a few seconds per format, cached on disk)")
    p.add_argument("--list-schemes", action="store_true", help="print the built-in schemes and exit")
    p.add_argument("--dry-run", action="store_true", help="validate the config, print the resolved spec, and exit")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Execute ``precsim sweep``; the process exit status."""
    from precsim.experiments import distributed as D
    from precsim.experiments.schemes import schemes_table

    if args.list_schemes:
        print(schemes_table())
        return 0
    if args.nproc is not None and args.nproc < 1:
        print(f"precsim sweep: error: --nproc must be >= 1, got {args.nproc}", file=sys.stderr)
        return 2
    try:
        spec = _load(args)
    except ValueError as err:
        print(f"precsim sweep: error: {err}", file=sys.stderr)
        return 2
    if args.dry_run:
        import yaml

        print(yaml.safe_dump(spec.to_dict(), sort_keys=False), end="")
        return 0
    if args.nproc is not None and args.nproc > 1 and not D.launched_by_torchrun():
        if spec.batch_size % args.nproc:
            print(f"precsim sweep: error: batch_size {spec.batch_size} is not divisible by --nproc {args.nproc}",
                  file=sys.stderr)
            return 2
        return D.relaunch(args.nproc, relaunch_args(args))
    return _run_sweep(spec, args)


_VALUE_FLAGS = (("--config", "config"), ("--schemes", "schemes"), ("--epochs", "epochs"), ("--out", "out"),
                ("--seed", "seed"), ("--device", "device"), ("--batch-size", "batch_size"),
                ("--train-subset", "train_subset"), ("--max-steps", "max_steps"))
_SWITCHES = (("--fresh", "fresh"), ("--no-progress", "no_progress"), ("--no-compile", "no_compile"))


def relaunch_args(args: argparse.Namespace) -> list[str]:
    """The sweep's options as argv again, without --nproc (what each torchrun worker gets)."""
    out: list[str] = []
    for flag, dest in _VALUE_FLAGS:
        value = getattr(args, dest, None)
        if value is not None:
            out += [flag, str(value)]
    out += [flag for flag, dest in _SWITCHES if getattr(args, dest, False)]
    return out


def _load(args: argparse.Namespace) -> Any:
    from precsim.experiments.spec import load_spec

    spec = load_spec(args.config, schemes=args.schemes, epochs=args.epochs, out=args.out, seed=args.seed,
                     device=args.device, batch_size=args.batch_size, train_subset=args.train_subset,
                     max_steps=args.max_steps, compile=False if getattr(args, "no_compile", False) else None)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if spec.batch_size % world:
        raise ValueError(f"batch_size {spec.batch_size} is not divisible by the {world} processes")
    return spec


def _run_sweep(spec: Any, args: argparse.Namespace) -> int:
    from precsim.experiments.sweep import run_sweep
    from precsim.runtime.allocator import tune_allocator

    tune_allocator()  # this process is ours: keep freed memory (see precsim.runtime.allocator)

    rank = os.environ.get("RANK") if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    where = f" (rank {rank})" if rank is not None else ""
    try:
        run_sweep(spec, fresh=args.fresh, progress=not args.no_progress,
                  command=shlex.join(["precsim", "sweep", *relaunch_args(args)]))
    except ValueError as err:
        print(f"precsim sweep{where}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk, a read-only folder, ...: nothing written so far is lost
        print(f"precsim sweep{where}: error: {err}. Finished schemes and epochs are saved in {spec.out}; "
              "fix the cause (free disk space, permissions) and run the same command again to continue.",
              file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\nprecsim sweep{where}: interrupted. Finished schemes and epochs are saved in {spec.out}; "
              "run the same command again to resume.", file=sys.stderr)
        return 130
    return 0


def build_parser() -> argparse.ArgumentParser:
    """A parser with just the ``sweep`` subcommand (for ``python -m precsim.experiments.command``)."""
    parser = argparse.ArgumentParser(prog="precsim")
    sub = parser.add_subparsers(dest="command", required=True)
    add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """``main(["sweep", "--epochs", "1"])``; ``argv`` defaults to ``sys.argv[1:]``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
