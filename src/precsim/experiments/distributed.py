"""Data-parallel sweeps: torchrun/DDP setup, rank-0-only writes, and a quantized all-reduce.

``torchrun --nproc-per-node N -m precsim sweep ...`` starts N processes; each trains every
scheme under :class:`~torch.nn.parallel.DistributedDataParallel` (gloo on CPU, nccl on GPUs).
The global batch stays the configured ``batch_size``: each rank takes its contiguous
``batch_size / N`` slice of the same seeded global batch, so the samples that make up a step
are exactly those of a single-process run (a ``DistributedSampler`` would stride through the
permutation instead and give different batches). ``precsim sweep --nproc N`` re-launches
itself through ``python -m torch.distributed.run``.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

# The module that ``--nproc`` re-launches: ``python -m <this> sweep <args>``. Switch it to
# "precsim" once ``precsim/__main__.py`` routes the ``sweep`` subcommand.
RELAUNCH_MODULE = "precsim.experiments.command"


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: rank, world size and its device."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_distributed(device: str) -> DistContext:
    """Join the process group torchrun set up (or stay single-process when there is none)."""
    if not launched_by_torchrun():
        if device == "cuda":
            return DistContext(device=torch.device("cuda", torch.cuda.current_device()))
        return DistContext(device=torch.device(device))
    rank = int(os.environ["RANK"])
    world = int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
        backend = "nccl"
    else:
        dev = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistContext(rank, world, local_rank, dev)


def shutdown(ctx: DistContext) -> None:
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def all_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Element-wise sum over ranks (float64, so counts stay exact)."""
    if not ctx.distributed:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.all_reduce(t)
    return t.tolist()


def broadcast_object(ctx: DistContext, obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (to share a decision, e.g. an error message)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def sync_buffers(ctx: DistContext, model: nn.Module) -> None:
    """Copy rank 0's buffers (BatchNorm statistics, observer ranges) to every rank.

    Each rank's last forward pass updated its buffers from its own data slice, so they differ
    after training; evaluation and checkpoints must use one set.
    """
    if not ctx.distributed:
        return
    for buf in model.buffers():
        if buf.dtype == torch.bool:
            tmp = buf.to(torch.uint8)
            dist.broadcast(tmp, src=0)
            buf.copy_(tmp.bool())
        else:
            dist.broadcast(buf, src=0)


def parameter_digest(model: nn.Module) -> str:
    """SHA-256 of every parameter's bytes, in name order: equal digests = identical replicas."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def gather_digests(ctx: DistContext, digest: str) -> list[str]:
    """Every rank's digest, in rank order."""
    if not ctx.distributed:
        return [digest]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, digest)
    return [str(d) for d in out]


# ---------------------------------------------------------------------------- DDP wrapping


def quantized_allreduce_hook(fmt: str) -> Callable[[Any, dist.GradBucket], torch.futures.Future[torch.Tensor]]:
    """A DDP communication hook that simulates an all-reduce carried in ``fmt``.

    Each rank rounds its share ``g / N`` to ``fmt`` (what it would send), the shares are summed
    in float32 (the reduction's accumulator), and the sum is rounded to ``fmt`` again (what
    every rank would receive). Like torch's ``fp16_compress_hook``, with any precsim format.
    """
    from precsim.formats import parse_format
    from precsim.runtime import quantize

    parsed = parse_format(fmt)

    # No annotations on ``hook``: DDP compares them with the real classes, and this module's
    # ``from __future__ import annotations`` would turn them into strings that fail the check.
    def hook(state, bucket):  # type: ignore[no-untyped-def]
        buf = bucket.buffer()
        world = dist.get_world_size()
        send = quantize(buf / world, parsed)
        fut = dist.all_reduce(send, async_op=True).get_future()

        def receive(f):  # type: ignore[no-untyped-def]
            buf.copy_(quantize(f.value()[0], parsed))
            return buf

        return fut.then(receive)

    return hook


def wrap_model(ctx: DistContext, model: nn.Module, allreduce: str | None) -> nn.Module:
    """DDP-wrap ``model`` when running distributed (with the quantized all-reduce if asked)."""
    if not ctx.distributed:
        if allreduce is not None:
            import warnings

            warnings.warn(f"allreduce: {allreduce} has no effect in a single process; run with --nproc N "
                          "or torchrun to simulate a quantized all-reduce", stacklevel=2)
        return model
    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(model, device_ids=ids)
    if allreduce is not None:
        ddp.register_comm_hook(None, quantized_allreduce_hook(allreduce))
    return ddp


def unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


# ---------------------------------------------------------------------------- relaunch


def relaunch_command(nproc: int, sweep_args: list[str]) -> list[str]:
    """The torchrun command line that ``--nproc N`` runs (``sweep_args`` without --nproc)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            "-m", RELAUNCH_MODULE, "sweep", *sweep_args]


def relaunch(nproc: int, sweep_args: list[str]) -> int:
    """Run the sweep again under torchrun with ``nproc`` processes; its exit status."""
    cmd = relaunch_command(nproc, sweep_args)
    print("precsim sweep: launching", " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd)
    try:
        return proc.wait()
    except KeyboardInterrupt:  # the children got the same Ctrl-C; let them checkpoint and exit
        return proc.wait()


__all__ = ["RELAUNCH_MODULE", "DistContext", "all_sum", "barrier", "broadcast_object", "gather_digests",
           "init_distributed", "launched_by_torchrun", "parameter_digest", "quantized_allreduce_hook",
           "relaunch", "relaunch_command", "shutdown", "sync_buffers", "unwrap", "wrap_model"]
