"""Train one scheme: seeded data order, train/eval loop, per-epoch metrics, wall time, resume.

Determinism is what makes resume exact. Epoch ``k`` shuffles the training set with a fresh
``torch.Generator`` seeded from ``(seed, k)``, so the data order needs no saved state; the
learning rate is a function of the global step; model, optimizer and quantizer state come
back from the checkpoint. A run resumed after epoch ``k`` therefore takes exactly the steps
the uninterrupted run took.

Every scheme starts from the same initial weights (``torch.manual_seed(seed)`` before the
model is built) and sees the same batches, so rows differ only by their number formats.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from precsim.experiments import distributed as D
from precsim.experiments.checkpoint import load_checkpoint, restore_rng, save_checkpoint
from precsim.experiments.spec import SchemeSpec, SweepSpec, model_kwargs_for
from precsim.experiments.telemetry import (
    describe_first,
    recording,
    replay_until_first_nonfinite,
    telemetry_for,
    write_stats,
)
from precsim.formats.random import mix_seed
from precsim.runtime.backend import compile_seconds

# One row per evaluation: ``epoch`` is the epoch it fell in (1-based), ``step`` the optimizer steps
# done by then, ``train_*`` the means over the steps since the previous evaluation, ``interval_s``
# the wall time since it (training and this evaluation), ``time_s`` the scheme's total so far.
CURVE_COLUMNS: tuple[str, ...] = ("scheme", "epoch", "step", "train_loss", "train_accuracy", "test_loss",
                                  "test_accuracy", "lr", "interval_s", "time_s")


@dataclass(frozen=True)
class Data:
    """The train/test tensors, in memory (the bundled datasets are small)."""

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor


def load_data(spec: SweepSpec) -> Data:
    """The spec's dataset and subsets; a missing file becomes a ValueError naming it."""
    from precsim.zoo import load_dataset

    try:
        train, test = load_dataset(spec.dataset, root=spec.dataset_root, seed=spec.split_seed,
                                   test_fraction=spec.test_fraction)
    except (FileNotFoundError, ModuleNotFoundError) as err:
        raise ValueError(f"dataset {spec.dataset!r}: {err}") from None
    tx, ty = train.tensors
    vx, vy = test.tensors
    if spec.train_subset is not None:
        tx, ty = tx[: spec.train_subset], ty[: spec.train_subset]
    if spec.test_subset is not None:
        vx, vy = vx[: spec.test_subset], vy[: spec.test_subset]
    if len(tx) < spec.batch_size:
        raise ValueError(f"the training set has {len(tx)} images, fewer than batch_size {spec.batch_size}")
    return Data(tx.contiguous(), ty.contiguous(), vx.contiguous(), vy.contiguous())


def steps_per_epoch(spec: SweepSpec, n_train: int) -> int:
    """Full global batches per epoch (the last partial batch is dropped), capped by max_steps."""
    steps = n_train // spec.batch_size
    return min(steps, spec.max_steps) if spec.max_steps is not None else steps


def epoch_order(spec: SweepSpec, n_train: int, epoch: int) -> Tensor:
    """The permutation of epoch ``epoch`` (0-based): a function of (seed, epoch) only."""
    g = torch.Generator().manual_seed(mix_seed(spec.seed, epoch) & 0x7FFFFFFF)
    return torch.randperm(n_train, generator=g)


def lr_at(spec: SweepSpec, step: int, total_steps: int) -> float:
    """Learning rate of global step ``step``: constant, or cosine from lr down to 0."""
    if spec.schedule == "constant" or total_steps <= 1:
        return spec.lr
    return spec.lr * 0.5 * (1.0 + math.cos(math.pi * step / total_steps))


def build_model(spec: SweepSpec, scheme: SchemeSpec) -> nn.Module:
    """The zoo model with the spec's seed for its initial weights, prepared for ``scheme``."""
    from precsim.qat.prepare import prepare
    from precsim.zoo import get_model
    from precsim.zoo.data import SHAPES

    torch.manual_seed(spec.seed)
    model = get_model(spec.model, **model_kwargs_for(spec))
    with warnings.catch_warnings():  # said once already, when the spec was checked (check_buildable)
        warnings.filterwarnings("ignore", message="precsim: rule .* matches no module")
        # operand points are made by a forward pass: before DDP wraps the model, so it sees them
        return prepare(model, scheme.config, seed=spec.seed, example_inputs=torch.zeros(2, *SHAPES[spec.dataset]))


def build_optimizer(spec: SweepSpec, model: nn.Module) -> torch.optim.Optimizer:
    if spec.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), lr=spec.lr, momentum=spec.momentum,
                               weight_decay=spec.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=spec.lr, betas=(spec.momentum, 0.999),
                            weight_decay=spec.weight_decay)


def warm_up(spec: SweepSpec, data: Data, ctx: D.DistContext) -> None:
    """One untimed step of the plain model, so that lazy imports and first-call kernel setup
    are not billed to whichever scheme runs first (usually the FP32 row all ratios divide by).
    Leaves every RNG as it was; the model and optimizer are thrown away."""
    from precsim.zoo import get_model

    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        model = get_model(spec.model, **model_kwargs_for(spec)).to(ctx.device)
        optimizer = build_optimizer(spec, model)
        per_rank = spec.batch_size // ctx.world_size
        xb, yb = data.train_x[:per_rank].to(ctx.device), data.train_y[:per_rank].to(ctx.device)
        F.cross_entropy(model(xb), yb).backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            model(data.test_x[: spec.eval_batch_size].to(ctx.device))


def warm_up_scheme(spec: SweepSpec, scheme: SchemeSpec, data: Data, ctx: D.DistContext) -> float:
    """Seconds spent running ``scheme``'s kernels once, before its timed run.

    Two training steps (a delayed format's first step takes other kernels than the later ones)
    and one evaluation batch of a throwaway copy of the prepared model: this compiles the
    rounding kernels the run will call (a few seconds each on an empty Inductor cache; with a
    warm one Dynamo still traces each, about a second), so that the scheme's time is training,
    the same on a fresh machine and a warm one. Leaves every RNG as it was."""
    start = time.perf_counter()
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        model = build_model(spec, scheme).to(ctx.device)
        optimizer = build_optimizer(spec, model)
        per_rank = spec.batch_size // ctx.world_size
        xb, yb = data.train_x[:per_rank].to(ctx.device), data.train_y[:per_rank].to(ctx.device)
        model.train()
        for _ in range(2):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            optimizer.step()
        model.eval()
        with torch.no_grad():
            model(data.test_x[: spec.eval_batch_size].to(ctx.device))
    return time.perf_counter() - start


@torch.no_grad()
def evaluate(ctx: D.DistContext, model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> tuple[float, float]:
    """(mean loss, accuracy) on ``x, y``; under DDP each rank takes every N-th image, then sums."""
    model.eval()
    idx = torch.arange(ctx.rank, len(x), ctx.world_size)
    loss_sum = correct = 0.0
    for start in range(0, len(idx), batch_size):
        sel = idx[start:start + batch_size]
        xb, yb = x[sel].to(ctx.device), y[sel].to(ctx.device)
        out = model(xb)
        loss_sum += F.cross_entropy(out, yb, reduction="sum").item()
        correct += (out.argmax(1) == yb).sum().item()
    loss_sum, correct, count = D.all_sum(ctx, [loss_sum, correct, float(len(idx))])
    return loss_sum / count, correct / count


class _Bar:
    """A tqdm bar over all steps of a scheme (or nothing, when progress is off)."""

    def __init__(self, enabled: bool, total: int, initial: int, desc: str) -> None:
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                            mininterval=0.5)

    def update(self, **postfix: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def summarize(spec: SweepSpec, scheme: SchemeSpec, curves: list[dict[str, Any]], progress: dict[str, Any],
              ctx: D.DistContext, in_sync: bool | None) -> dict[str, Any]:
    """The results row of a finished scheme (time_ratio is filled in by the results store)."""
    last = curves[-1]
    accs = [c["test_accuracy"] for c in curves if c["test_accuracy"] == c["test_accuracy"]]
    return {
        "scheme": scheme.name,
        "description": scheme.description,
        "formats": formats_summary(scheme),
        "accuracy": last["test_accuracy"],
        "loss": last["test_loss"],
        "auc": auc(curves),
        "best_accuracy": max(accs) if accs else float("nan"),
        "train_loss": last["train_loss"],
        "train_accuracy": last["train_accuracy"],
        "time_s": last["time_s"],
        "train_time_s": progress["train_time_s"],
        "cpu_time_s": progress["cpu_time_s"],
        "time_ratio": None,
        "compile_s": progress.get("compile_s", 0.0),
        "epochs": completed_epochs(curves),
        "steps": progress["steps"],
        "diverged": not math.isfinite(last["test_loss"]) or not math.isfinite(last["train_loss"]),
        "stopped_early": bool(progress["stopped"]),
        "first_nonfinite": None,  # where a diverged scheme first met a NaN/Inf (telemetry)
        "world_size": ctx.world_size,
        "device": ctx.device.type,
        "allreduce": scheme.allreduce,
        "replicas_in_sync": in_sync,
        "baseline": scheme.is_baseline,
        "scheme_fingerprint": scheme.fingerprint,
    }


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, xb: Tensor, yb: Tensor,
               lr: float) -> tuple[Tensor, float]:
    """One optimizer step at learning rate ``lr``: (the outputs, the loss)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.zero_grad(set_to_none=True)
    out = net(xb)
    loss = F.cross_entropy(out, yb)
    loss.backward()
    optimizer.step()
    return out, loss.item()


def replay_training(spec: SweepSpec, scheme: SchemeSpec, data: Data, ctx: D.DistContext, until: int) -> Any:
    """The scheme's first ``until`` steps again, from its initial weights, with every call of every
    point recorded, up to the first NaN/Inf (:mod:`precsim.experiments.telemetry`). Training is a
    function of the seed, so these are the run's steps; leaves every RNG as it was."""
    with torch.random.fork_rng(devices=[ctx.device] if ctx.device.type == "cuda" else []):
        model = build_model(spec, scheme).to(ctx.device)
        optimizer = build_optimizer(spec, model)
        net = D.wrap_model(ctx, model, scheme.allreduce)
        net.train()
        n_train = len(data.train_x)
        steps = steps_per_epoch(spec, n_train)
        per_rank = spec.batch_size // ctx.world_size
        lo, hi = ctx.rank * per_rank, (ctx.rank + 1) * per_rank

        def run() -> Any:
            for k in range(until):
                epoch, i = divmod(k, steps)
                batch = epoch_order(spec, n_train, epoch)[i * spec.batch_size:(i + 1) * spec.batch_size][lo:hi]
                train_step(net, optimizer, data.train_x[batch].to(ctx.device), data.train_y[batch].to(ctx.device),
                           lr_at(spec, k, steps * spec.epochs))
                yield k

        return replay_until_first_nonfinite(model, run())


def eval_points(steps: int, per_epoch: int) -> set[int]:
    """The steps of an epoch after which the test split is evaluated: ``per_epoch`` points spread
    evenly, the epoch's last step always among them (fewer when the epoch has fewer steps)."""
    return {max(1, round(steps * k / per_epoch)) for k in range(1, per_epoch + 1)} | {steps}


def completed_epochs(curves: list[dict[str, Any]]) -> int:
    """The epochs a scheme's curves reach (the last one possibly cut short by divergence)."""
    return int(curves[-1]["epoch"]) if curves else 0


def auc(curves: list[dict[str, Any]]) -> float:
    """The area under the test-accuracy curve, as the mean over its evaluations: where the final
    accuracies of schemes meet (a small task saturates), how fast each got there still differs."""
    accs = [c["test_accuracy"] for c in curves]
    return sum(accs) / len(accs) if accs else float("nan")


def parameters_finite(model: nn.Module) -> bool:
    """False once any weight is Inf/NaN: from then on every output and update is NaN too."""
    return all(bool(torch.isfinite(p).all()) for p in model.parameters())


def formats_summary(scheme: SchemeSpec) -> str:
    """``act=int8 w=int8 grad=fp32 wgrad=fp32`` (+ ``rules=N``), for tables."""
    cfg = scheme.config
    parts = []
    for role, short in (("activation", "act"), ("input", "in"), ("weight", "w"), ("gradient", "grad"),
                        ("weight_gradient", "wgrad")):
        v = cfg.get(role)
        if v is None and role == "input":
            continue
        if isinstance(v, dict):
            text = str(v.get("format", "fp32"))
            if v.get("scale") is not None:
                text += f"*{v['scale']:g}" if isinstance(v["scale"], (int, float)) else f"*{v['scale']}"
        else:
            text = "fp32" if v is None else str(v)
        parts.append(f"{short}={text}")
    if cfg.get("rules"):
        parts.append(f"rules={len(cfg['rules'])}")
    if scheme.allreduce:
        parts.append(f"allreduce={scheme.allreduce}")
    return " ".join(parts)


def train_scheme(spec: SweepSpec, scheme: SchemeSpec, data: Data, ctx: D.DistContext, *,
                 checkpoint_path: Path, spec_fingerprint: str, label: str = "", show_progress: bool = True,
                 debug_dir: Path | None = None, after_epoch: Callable[[int], None] | None = None,
                 log: Callable[[str], None] | None = None,
                 stats_dir: Path | None = None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Train ``scheme`` for ``spec.epochs`` epochs, resuming from ``checkpoint_path`` if present.

    Returns (results row, per-epoch curves). Only rank 0 writes the checkpoint. ``after_epoch``
    (tests/debugging) is called with the finished epoch number after each checkpoint. The
    scheme's kernels are compiled first (:func:`warm_up_scheme`), outside its timed epochs; a
    kernel that still compiles inside them (a path taken only later, such as the first values
    that clip) has its compile time taken out of the epoch's. Both are the row's ``compile_s``
    (summed over resumed runs), so that ``time_s`` is training and evaluation alone.
    """
    if log is not None and scheme.config:
        log(f"{label or scheme.name}: compiling kernels for {scheme.name} (first run only, cached)")
    compile_s = warm_up_scheme(spec, scheme, data, ctx)
    model = build_model(spec, scheme).to(ctx.device)
    optimizer = build_optimizer(spec, model)
    state = load_checkpoint(checkpoint_path, scheme_fingerprint=scheme.fingerprint,
                            spec_fingerprint=spec_fingerprint)
    start_epoch, curves = 0, []
    progress: dict[str, Any] = {"elapsed_s": 0.0, "train_time_s": 0.0, "cpu_time_s": 0.0, "steps": 0,
                                "stopped": False, "compile_s": 0.0}
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        restore_rng(state["rng"])
        start_epoch, curves = int(state["epoch"]), list(state["curves"])
        progress.update(state["progress"])
        if log is not None:
            log(f"{label or scheme.name}: resuming after epoch {start_epoch}/{spec.epochs} from {checkpoint_path}")
    progress["compile_s"] = progress.get("compile_s", 0.0) + compile_s
    net = D.wrap_model(ctx, model, scheme.allreduce)

    n_train = len(data.train_x)
    steps = steps_per_epoch(spec, n_train)
    total = steps * spec.epochs
    checks = eval_points(steps, spec.evals_per_epoch)
    per_rank = spec.batch_size // ctx.world_size
    lo, hi = ctx.rank * per_rank, (ctx.rank + 1) * per_rank
    stats = telemetry_for(spec.telemetry, not scheme.is_baseline, model,
                          (state or {}).get("progress", {}).get("stats"))
    bar = _Bar(show_progress and ctx.is_main, total, start_epoch * steps, label or scheme.name)
    try:
        with recording(stats):
            for epoch in range(start_epoch, spec.epochs if not progress["stopped"] else start_epoch):
                t0, c0, k0 = time.perf_counter(), time.process_time(), compile_seconds()
                order = epoch_order(spec, n_train, epoch)
                net.train()
                loss_sum = correct = count = 0.0
                lr, t_eval, t_last = spec.lr, 0.0, 0.0
                for i in range(steps):
                    batch = order[i * spec.batch_size:(i + 1) * spec.batch_size][lo:hi]
                    xb, yb = data.train_x[batch].to(ctx.device), data.train_y[batch].to(ctx.device)
                    lr = lr_at(spec, epoch * steps + i, total)
                    out, loss_value = train_step(net, optimizer, xb, yb, lr)
                    loss_sum += loss_value * len(yb)
                    correct += (out.argmax(1) == yb).sum().item()
                    count += len(yb)
                    progress["steps"] += 1
                    bar.update(epoch=f"{epoch + 1}/{spec.epochs}", loss=f"{loss_value:.3f}")
                    if spec.stop_on_divergence and not parameters_finite(model):
                        progress["stopped"] = True  # a NaN model stays NaN: stop paying for it
                    if i + 1 in checks or progress["stopped"]:
                        t1 = time.perf_counter()
                        loss_sum, correct, count = D.all_sum(ctx, [loss_sum, correct, count])
                        D.sync_buffers(ctx, model)
                        test_loss, test_acc = evaluate(ctx, model, data.test_x, data.test_y, spec.eval_batch_size)
                        net.train()
                        t_eval += time.perf_counter() - t1
                        done = time.perf_counter() - t0 - (compile_seconds() - k0)  # this epoch so far
                        interval, t_last = done - t_last, done
                        curves.append({"scheme": scheme.name, "epoch": epoch + 1, "step": progress["steps"],
                                       "train_loss": loss_sum / count, "train_accuracy": correct / count,
                                       "test_loss": test_loss, "test_accuracy": test_acc, "lr": lr,
                                       "interval_s": interval, "time_s": progress["elapsed_s"] + done})
                        loss_sum = correct = count = 0.0
                        if bar.bar is not None:
                            bar.bar.set_postfix(epoch=f"{epoch + 1}/{spec.epochs}", test_acc=f"{test_acc:.4f}",
                                                refresh=True)
                    if progress["stopped"]:
                        break
                # a kernel that compiles only now (say, the first time values clip) is compile time too
                late_compile = compile_seconds() - k0
                epoch_time = time.perf_counter() - t0 - late_compile
                progress["compile_s"] += late_compile
                progress["cpu_time_s"] += time.process_time() - c0
                progress["train_time_s"] += epoch_time - t_eval
                progress["elapsed_s"] += epoch_time
                if stats is not None:
                    progress["stats"] = stats.state_dict()
                if ctx.is_main:
                    save_checkpoint(checkpoint_path, scheme=scheme.name, scheme_fingerprint=scheme.fingerprint,
                                    spec_fingerprint=spec_fingerprint, epoch=epoch + 1, model=model,
                                    optimizer=optimizer, curves=curves, progress=progress)
                if after_epoch is not None:
                    after_epoch(epoch + 1)
                if progress["stopped"]:
                    if log is not None:
                        log(f"{label or scheme.name}: weights became Inf/NaN in epoch {epoch + 1} (after "
                            f"{progress['steps']} steps); stopped training this scheme")
                    break
    finally:
        bar.close()
    digest = D.parameter_digest(model)
    digests = D.gather_digests(ctx, digest)
    in_sync = all(d == digests[0] for d in digests) if ctx.distributed else None
    if debug_dir is not None:
        from precsim.experiments.checkpoint import atomic_write_text

        atomic_write_text(debug_dir / f"{scheme.name}.rank{ctx.rank}.sha256", digest + "\n")
    row = summarize(spec, scheme, curves, progress, ctx, in_sync)
    if stats is not None:
        if row["diverged"] or progress["stopped"]:  # name where it broke, from an exact replay
            first = replay_training(spec, scheme, data, ctx, progress["steps"])
            row["first_nonfinite"] = describe_first(first) or describe_first(stats)
            if ctx.is_main and stats_dir is not None:
                write_stats(stats_dir, f"{scheme.name}.replay", first)
        if ctx.is_main and stats_dir is not None:
            write_stats(stats_dir, scheme.name, stats)
    if ctx.is_main:  # the finished checkpoint holds the row: a damaged results file then loses nothing
        save_checkpoint(checkpoint_path, scheme=scheme.name, scheme_fingerprint=scheme.fingerprint,
                        spec_fingerprint=spec_fingerprint, epoch=completed_epochs(curves), model=model, optimizer=optimizer,
                        curves=curves, progress=progress, row=row)
    return row, curves


__all__ = ["CURVE_COLUMNS", "Data", "build_model", "build_optimizer", "epoch_order", "evaluate", "load_data",
           "lr_at", "parameters_finite", "steps_per_epoch", "summarize", "train_scheme", "warm_up", "warm_up_scheme"]
