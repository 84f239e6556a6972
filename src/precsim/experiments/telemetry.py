"""What a sweep records of each scheme's points: sampled telemetry, and where a diverged one broke.

Every scheme that quantizes something trains inside :func:`precsim.collect_stats` (every
``telemetry``-th call of each point, 50 by default: a few percent of a step). Its stats travel in
the checkpoint, so a resumed run continues them, and are written when the scheme ends:
``stats/<scheme>.csv`` (one row per point and direction), ``stats/<scheme>.png`` (a heatmap of
points x metric) and, with integer accumulators, ``stats/<scheme>.overflows.csv``.

A scheme that diverged usually broke between two sampled calls. It is then replayed from its
first step with every call recorded, up to the step where it stopped: training is a function of
the seed, so the replay takes the same steps, and the first NaN/Inf it sees is the run's. Its
point, direction and numbers go into the results row (``first_nonfinite``) and the report, and
the replay's own stats into ``stats/<scheme>.replay.csv`` and ``.png``.
"""

from __future__ import annotations

import contextlib
import io
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from torch import nn

from precsim.experiments.checkpoint import atomic_write_bytes, atomic_write_text
from precsim.qat.quantizer import STATS
from precsim.qat.telemetry import METRICS, Stats

STATS_DIR = "stats"
STATS_COLUMNS = ("module", "op", "call", "operand", "role", "direction", "samples", *METRICS)
HEATMAP_METRICS = ("qsnr_db", "saturated_pct", "underflow_pct", "nonfinite_pct", "scale_limit_pct")


def telemetry_for(every: int, quantizes: bool, model: nn.Module, saved: dict[str, Any] | None) -> Stats | None:
    """A collector for a scheme's model (None: telemetry off, or nothing to record), continuing
    the stats a checkpoint saved."""
    if every <= 0 or not quantizes:
        return None
    stats = Stats(model, every)
    if saved is not None:
        stats.load_state_dict(saved)
    return stats


@contextlib.contextmanager
def recording(stats: Stats | None) -> Iterator[None]:
    """Record into ``stats`` while inside (nothing when it is None)."""
    if stats is None:
        yield
        return
    token = STATS.set(stats)
    try:
        yield
    finally:
        STATS.reset(token)


def describe_first(stats: Stats) -> str | None:
    """The first NaN/Inf a run met, in words and numbers, e.g. ``step 11, layer1.0.conv2.output
    (activation, forward): overflow: hfp8_fwd tops out at 15, inputs up to 15.56; 0.39% of the
    output Inf/NaN``."""
    if stats.first_nonfinite is None:
        return None
    step, point, role, direction = stats.first_nonfinite
    m = stats.first_metrics or {}
    where = f"step {step}, {point} ({role}, {direction})"
    fmt, top, amax = m.get("format", "?"), m.get("max"), m.get("amax", math.nan)
    out_pct = f"{_pct(m.get('nonfinite_pct', math.nan))} of the output Inf/NaN"
    if m.get("nonfinite_in_pct", 0) > 0:
        return (f"{where}: its input already held NaN/Inf ({_pct(m['nonfinite_in_pct'])}), made by an "
                f"unquantized op before it; {out_pct}")
    if top is not None and amax > top:
        return (f"{where}: overflow: {fmt} tops out at {top:g}, inputs up to {amax:.4g} "
                f"({_pct(m.get('saturated_pct', math.nan))} beyond it); {out_pct}")
    return f"{where}: {fmt}, inputs up to {amax:.4g}; {out_pct}"


def _pct(x: float) -> str:
    """A percentage readable at any size: one value in a million is 0.0001%, not 0.00%."""
    return f"{x:.2f}%" if x >= 0.01 or x == 0 else f"{x:.2g}%"


def write_stats(folder: Path, scheme: str, stats: Stats) -> None:
    """``<scheme>.csv`` and ``<scheme>.png`` in ``folder`` (atomically)."""
    import csv

    rows = stats.rows()
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(STATS_COLUMNS), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    atomic_write_text(folder / f"{scheme}.csv", buf.getvalue())
    events = stats.overflows()
    if events:  # integer accumulators: overflow events over the whole run
        atomic_write_text(folder / f"{scheme}.overflows.csv",
                          "accumulator,overflow_events\n" + "".join(f"{k},{v}\n" for k, v in events.items()))
    if rows:
        every = "every call" if stats.every == 1 else f"every {stats.every}th call"
        atomic_write_bytes(folder / f"{scheme}.png", heatmap(rows, f"{scheme}: per-point telemetry ({every})"))


def heatmap(rows: list[dict[str, Any]], title: str) -> bytes:
    """Points (forward and backward rows) x metrics, each column coloured on its own scale (QSNR:
    red is low; the percentages: red is high), with the numbers written in."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    import numpy as np

    labels = [f"{r['module']}.{r['operand'] if r['op'] in ('output', 'weight') else r['op'] + '.' + r['operand']}"
              f" [{r['direction'][0]}]" for r in rows]
    values = np.array([[r[k] for k in HEATMAP_METRICS] for r in rows], dtype=float)
    shade = np.zeros_like(values)
    for j, key in enumerate(HEATMAP_METRICS):
        col = np.where(np.isfinite(values[:, j]), values[:, j], np.nan)
        if key == "qsnr_db":  # low QSNR is bad; exact (inf) is best
            col = np.where(np.isposinf(values[:, j]), np.nanmax(np.append(col, 0.0)), col)
            lo, hi = np.nanmin(np.append(col, 0.0)), np.nanmax(np.append(col, 1.0))
            shade[:, j] = 1 - (col - lo) / (hi - lo or 1.0)
        else:
            shade[:, j] = np.clip(col / 100.0, 0, 1) ** 0.35  # a few percent already shows
    shade = np.nan_to_num(shade, nan=0.0)  # nothing measured (not a block format, no finite value)
    fig, ax = plt.subplots(figsize=(8.5, 1.2 + 0.22 * len(rows)))
    ax.imshow(shade, cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for i in range(values.shape[0]):
        for j in range(values.shape[1]):
            v = values[i, j]
            text = "inf" if v == math.inf else "-" if math.isnan(v) else f"{v:.3g}"
            ax.text(j, i, text, ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(HEATMAP_METRICS)), HEATMAP_METRICS, fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=7)
    ax.xaxis.tick_top()
    ax.set_title(title, fontsize=9, pad=24)
    fig.tight_layout()
    out = io.BytesIO()
    fig.savefig(out, format="png", dpi=100)
    plt.close(fig)
    return out.getvalue()


def replay_until_first_nonfinite(model: nn.Module, steps: Iterator[Any]) -> Stats:
    """Run ``steps`` (each call trains one step of ``model``) with every call recorded, until the
    first NaN/Inf; the stats of that replay. (The caller keeps the RNGs as they were.)"""
    stats = Stats(model, 1)
    with recording(stats):
        for _ in steps:
            if stats.first_nonfinite is not None:
                break
    return stats


__all__ = ["HEATMAP_METRICS", "STATS_COLUMNS", "STATS_DIR", "describe_first", "heatmap", "recording",
           "replay_until_first_nonfinite", "telemetry_for", "write_stats"]
