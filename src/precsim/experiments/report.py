"""What a person reads: the terminal table, curves.png and report.md.

The plot uses matplotlib's Agg backend (no display needed) and is drawn from the same rows and
curves that results.csv/curves.csv hold, so the report can always be rebuilt from those files.
"""

from __future__ import annotations

import io
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from precsim.experiments.checkpoint import atomic_write_bytes, atomic_write_text

CURVES_PNG = "curves.png"
REPORT_MD = "report.md"
_TABLE_COLUMNS = (("scheme", "scheme"), ("accuracy", "acc %"), ("auc", "auc %"), ("loss", "loss"), ("time_s", "time s"),
                  ("time_ratio", "x fp32"), ("compile_s", "compile s"), ("epochs", "epochs"), ("formats", "formats"))


def _cell(key: str, v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if key in ("accuracy", "auc"):
        return f"{100 * v:.2f}"
    if key == "loss":
        return f"{v:.4f}"
    if key in ("time_s", "compile_s"):
        return f"{v:.1f}"
    if key == "time_ratio":
        return f"{v:.2f}"
    return str(v)


def table_cells(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    header = [h for _, h in _TABLE_COLUMNS]
    body = [[_cell(k, r.get(k)) for k, _ in _TABLE_COLUMNS] for r in rows]
    return header, body


def format_table(rows: list[dict[str, Any]]) -> str:
    """A fixed-width table for the terminal."""
    header, body = table_cells(rows)
    width = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    numeric = {1, 2, 3, 4, 5, 6, 7}

    def line(cells: list[str]) -> str:
        return "  ".join(c.rjust(width[i]) if i in numeric else c.ljust(width[i]) for i, c in enumerate(cells)).rstrip()

    return "\n".join([line(header), line(["-" * w for w in width]), *(line(b) for b in body)])


def markdown_table(rows: list[dict[str, Any]]) -> str:
    header, body = table_cells(rows)
    align = ["---" if i in (0, len(header) - 1) else "---:" for i in range(len(header))]
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in b) + " |" for b in body]
    return "\n".join(lines)


def plot_curves(curves: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Test accuracy and test loss vs epoch, one line per scheme (train loss dotted)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    by_scheme: dict[str, list[dict[str, Any]]] = {}
    for c in curves:
        by_scheme.setdefault(c["scheme"], []).append(c)
    # x: epochs done at each evaluation (several per epoch), from the steps of epoch 1
    per_epoch = max((c["step"] for c in curves if c["epoch"] == 1 and c.get("step")), default=0)

    def x_of(c: dict[str, Any]) -> float:
        return c["step"] / per_epoch if per_epoch and c.get("step") else float(c["epoch"])

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.2))
    markers = "osD^v<>pPX*h"
    colors = plt.get_cmap("tab10").colors  # type: ignore[attr-defined]
    for k, (name, cs) in enumerate(by_scheme.items()):
        cs = sorted(cs, key=x_of)
        ep = [x_of(c) for c in cs]
        style = {"color": colors[k % len(colors)], "marker": markers[k % len(markers)], "markersize": 4}
        diverged = any(not math.isfinite(c["train_loss"]) for c in cs)
        ax_acc.plot(ep, [100 * c["test_accuracy"] for c in cs], label=name + (" (diverged)" if diverged else ""),
                    **style)
        ax_loss.plot(ep, [c["test_loss"] for c in cs], label=f"{name}", **style)
        ax_loss.plot(ep, [c["train_loss"] for c in cs], linestyle=":", color=style["color"], linewidth=1)
    ax_acc.set(xlabel="epoch", ylabel="test accuracy (%)", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="loss (solid: test, dotted: train)", title="loss")
    finite = [c[k] for c in curves for k in ("test_loss", "train_loss") if c[k] == c[k] and c[k] > 0
              and math.isfinite(c[k])]
    if finite and max(finite) / min(finite) > 20:
        ax_loss.set_yscale("log")
    for ax in (ax_acc, ax_loss):
        ax.grid(True, alpha=0.3)
        if curves and max(c["epoch"] for c in curves) <= 20:
            ax.set_xticks(range(0, max(c["epoch"] for c in curves) + 1))
    ax_acc.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def diverged_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Where each diverged scheme first met a NaN/Inf (from the sweep's telemetry replay)."""
    broken = [r for r in rows if r.get("diverged") or r.get("stopped_early")]
    if not broken:
        return []
    lines = ["## Diverged schemes", ""]
    for r in broken:
        where = r.get("first_nonfinite") or "not recorded (telemetry off, or no quantization point met it)"
        lines.append(f"- `{r['scheme']}`: first NaN/Inf at {where}.")
    return [*lines, "", "Per-point telemetry of every scheme: `stats/<scheme>.csv` and `stats/<scheme>.png`.", ""]


def write_report(out: str | Path, rows: list[dict[str, Any]], curves: list[dict[str, Any]],
                 spec: dict[str, Any], world_size: int, total_time_s: float | None = None) -> None:
    """curves.png and report.md in ``out``."""
    out = Path(out)
    model = spec["model"]
    kwargs = ", ".join(f"{k}={v}" for k, v in model.items() if k != "name")
    title = f"{model['name']}({kwargs}) on {spec['dataset']['name']}, {spec['epochs']} epochs"
    plot_curves(curves, out / CURVES_PNG, title)
    opt = spec["optimizer"]
    lines = [
        "# precsim sweep",
        "",
        f"- model: `{model['name']}({kwargs})`",
        f"- dataset: `{spec['dataset']['name']}` (split seed {spec['dataset']['seed']}, "
        f"test fraction {spec['dataset']['test_fraction']}"
        + (f", train subset {spec['train_subset']}" if spec.get("train_subset") else "")
        + (f", test subset {spec['test_subset']}" if spec.get("test_subset") else "") + ")",
        f"- training: {spec['epochs']} epochs, batch {spec['batch_size']}"
        + (f", at most {spec['max_steps']} steps/epoch" if spec.get("max_steps") else "")
        + f", {opt['name']} lr {opt['lr']} ({opt['schedule']}), momentum {opt['momentum']}, "
        f"weight decay {opt['weight_decay']}, seed {spec['seed']}",
        f"- device: {spec['device']}, processes: {world_size}",
        f"- written: {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}"
        + (f", sum of scheme times {total_time_s:.0f} s" if total_time_s is not None else ""),
        "",
        "accuracy and loss: test split after the last epoch; auc: the mean test accuracy over all "
        f"{spec.get('evals_per_epoch', 1)} evaluations per epoch (the area under the curve: how fast a scheme "
        "learns, where final accuracies meet); time s: training + evaluations of "
        "the scheme (rank 0's wall clock); x fp32: time over the FP32 row's.",
        "",
        markdown_table(rows),
        "",
        *diverged_lines(rows),
        f"![accuracy and loss per epoch]({CURVES_PNG})",
        "",
    ]
    atomic_write_text(out / REPORT_MD, "\n".join(lines))


__all__ = ["CURVES_PNG", "REPORT_MD", "format_table", "markdown_table", "plot_curves", "write_report"]
