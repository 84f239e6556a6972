"""Telemetry: what each quantization point does to its tensors, sampled so it can stay on.

``with precsim.collect_stats(model, every=50) as stats:`` records, on every 50th call of each
point (its first call included), forward and backward alike:

- ``qsnr_db``: 10 log10(sum x^2 / sum (x - Q(x))^2) over the finite inputs that stay finite
  (inf: exact; a call with none is left out of the mean);
- ``saturated_pct``: finite inputs beyond the largest finite magnitude the point produced
  (clipped to the grid's edge), or turned into Inf/NaN (overflow);
- ``underflow_pct``: finite nonzero inputs rounded to zero;
- ``nonfinite_in_pct`` / ``nonfinite_pct``: NaN/Inf in the input / in the output;
- ``amax``: the largest finite |x|;
- block formats with an E8M0 scale (MX): ``scale_exp_min`` / ``scale_exp_max``, the range of
  the exponents the blocks' scales ask for (before the clamp to [-127, 127]), and
  ``scale_limit_pct``, the blocks whose scale sits at a limit (clamped), where the elements then
  saturate or flush to zero (empty for other formats).

Per point and direction the table shows the mean over sampled calls (``amax`` and
``scale_exp_max``: the maximum, ``scale_exp_min``: the minimum).
``stats.overflows()`` gives the overflow events of integer accumulators (every call) since
collection began. ``stats.first_nonfinite`` is the first sampled (step, point, role, direction) whose output held
a NaN or Inf, ``step`` being the point's training-step counter.

A sampled call costs two passes over the tensor, work on at most :data:`SAMPLE` of its
elements and one device sync; the others cost one context-variable read. The backward of a
sampled call writes the rounded gradient into a new tensor, not into the gradient it reads.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from precsim.qat.accumulator import overflows
from precsim.qat.prepare import point_rows
from precsim.qat.quantizer import STATS

__all__ = ["METRICS", "Stats", "collect_stats", "measure", "point_name"]

METRICS = ("qsnr_db", "saturated_pct", "underflow_pct", "nonfinite_in_pct", "nonfinite_pct", "amax",
           "scale_exp_min", "scale_exp_max", "scale_limit_pct")
_EXTREMES = {"amax": max, "scale_exp_min": min, "scale_exp_max": max}  # the others are means


SAMPLE = 65536  # elements of a larger tensor that the percentages and QSNR are estimated from


def _sample(n: int, device: torch.device) -> Tensor | None:
    """:data:`SAMPLE` positions spread over ``n`` by the golden-ratio (Weyl) sequence, None for
    all of them. A fixed stride would alias with a tensor's own period (every 10th value an
    outlier, read through a stride of 16, counts 20%); this sequence does not repeat."""
    if n <= SAMPLE:
        return None
    k = torch.arange(SAMPLE, dtype=torch.float64, device=device)
    return ((k * 0.6180339887498949) % 1.0 * n).long()


def _counts(x: Tensor, q: Tensor, top: Tensor) -> list[float]:
    """[signal, noise, saturated, underflow, nonfinite in, nonfinite out, kept, n] over x, q."""
    fin, qfin = torch.isfinite(x), torch.isfinite(q)
    ok = fin & qfin
    kept = torch.where(ok, x, 0.0)
    err = torch.where(ok, x - q, 0.0)
    return torch.stack([
        torch.dot(kept, kept), torch.dot(err, err), (fin & (~qfin | (x.abs() > top))).sum(),
        (fin & (x != 0) & (q == 0)).sum(), (~fin).sum(), (~qfin).sum(), ok.sum(), torch.tensor(x.numel()),
    ]).tolist()


@torch.no_grad()
def measure(x: Tensor, q: Tensor) -> dict[str, float]:
    """The metrics of one rounding ``x -> q`` (see the module doc).

    Cheap enough to sample while training: two passes over the whole tensor (max |x| and max
    |q|, which are also the check for NaN/Inf), then the percentages and the QSNR on
    :data:`SAMPLE` elements spread over it (the whole tensor when it is smaller). A tensor
    holding NaN/Inf (rare, and the call one wants exact numbers of) is counted in full."""
    x, q = x.detach().float().reshape(-1), q.detach().float().reshape(-1)
    if x.numel() == 0:
        return dict.fromkeys(METRICS[:6], 0.0) | {"qsnr_db": math.nan}
    inf = float("inf")
    peak_x, peak_q = torch.linalg.vector_norm(x, inf), torch.linalg.vector_norm(q, inf)
    pick = _sample(x.numel(), x.device)
    xs, qs = (x, q) if pick is None else (x[pick], q[pick])
    counts = _counts(xs, qs, peak_q)
    amax, top = float(peak_x), float(peak_q)
    if not (math.isfinite(amax) and math.isfinite(top)):  # NaN/Inf somewhere: count everything, in full
        fin, qfin = torch.isfinite(x), torch.isfinite(q)
        amax = float(torch.where(fin, x.abs(), 0.0).max())
        counts = _counts(x, q, torch.where(fin & qfin, q.abs(), 0.0).max())
    signal, noise, sat, under, bad_in, bad_out, kept, n = counts
    if kept == 0:
        qsnr = math.nan  # nothing finite to compare: left out of the mean
    else:
        qsnr = math.inf if noise == 0 else (10 * math.log10(signal / noise) if signal > 0 else -math.inf)
    return {"qsnr_db": qsnr, "saturated_pct": 100 * sat / n, "underflow_pct": 100 * under / n,
            "nonfinite_in_pct": 100 * bad_in / n, "nonfinite_pct": 100 * bad_out / n, "amax": amax}


@dataclass
class _Series:
    samples: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)

    def add(self, m: dict[str, float]) -> None:
        self.samples += 1
        for k, v in m.items():
            if math.isnan(v):
                continue  # nothing to say this call (no finite value, or not a block format)
            if k in _EXTREMES:
                self.sums[k] = _EXTREMES[k](self.sums.get(k, v), v)
            else:
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1

    def value(self, k: str) -> float:
        """The mean over the samples that had it (amax, scale exponents: the extreme)."""
        if not self.counts.get(k):
            return 0.0 if k == "amax" else math.nan
        return self.sums[k] if k in _EXTREMES else self.sums[k] / self.counts[k]


def block_scales(fmt: Any, x: Tensor) -> dict[str, float]:
    """The scale metrics of one call (NaN where ``fmt`` has no E8M0 block scales)."""
    exps = fmt.scale_exponents(x) if hasattr(fmt, "scale_exponents") else None
    if exps is None or exps.numel() == 0:
        return {"scale_exp_min": math.nan, "scale_exp_max": math.nan, "scale_limit_pct": math.nan}
    at_limit = ((exps <= -127) | (exps >= 127)).float().mean()
    return {"scale_exp_min": float(exps.min()), "scale_exp_max": float(exps.max()),
            "scale_limit_pct": 100 * float(at_limit)}


class Stats:
    """Per-point telemetry of one model (see the module doc).

    Kept by point name, not by object, so that it can be saved with a checkpoint
    (:meth:`state_dict`) and continued in a new process on a rebuilt model."""

    def __init__(self, model: nn.Module, every: int) -> None:
        if not (isinstance(every, int) and every >= 1):
            raise ValueError(f"every={every!r} not allowed; allowed: an integer >= 1 (1: every call)")
        self.model, self.every = model, every
        self.calls: dict[str, int] = {}
        self.series: dict[tuple[str, str], _Series] = {}
        self.first_nonfinite: tuple[int, str, str, str] | None = None
        self.first_metrics: dict[str, Any] | None = None  # that call's numbers, and the point's format
        self._names: dict[int, str | None] = {}  # id(point) -> its name (None: another model's point)
        self._overflows_before = overflows(model)  # integer accumulators' counts when collection began
        self._rows: dict[str, dict[str, str]] = {}

    def sample(self, q: nn.Module) -> bool:
        """Whether this call of point ``q`` is recorded (every ``every``-th, from the first; never
        for a point of another model)."""
        name = self._name(q)
        if name is None:
            return False
        n = self.calls.get(name, 0)
        self.calls[name] = n + 1
        return n % self.every == 0

    def _name(self, q: nn.Module) -> str | None:
        """The point's name in the model (module.op.call.operand); None for another model's."""
        if id(q) not in self._names:  # points may be created while the model runs (points: operands)
            for _, p, r in point_rows(self.model):
                name = point_name(r)
                self._names[id(p)], self._rows[name] = name, r
            # a point exists before its first call: one not found now belongs to another model
            self._names.setdefault(id(q), None)
        return self._names.get(id(q))

    def record(self, q: Any, direction: str, x: Tensor, out: Tensor) -> None:
        name = self._name(q)
        assert name is not None
        m = measure(x, out)
        spec = q.grad_spec if direction == "backward" else q.spec
        m.update(block_scales(spec.format if spec is not None else None, x))
        self.series.setdefault((name, direction), _Series()).add(m)
        if self.first_nonfinite is None and m["nonfinite_pct"] > 0:
            r = self._rows[name]
            self.first_nonfinite = (int(q.step), name, r["role"], direction)
            fmt = (r["gradient"] if direction == "backward" else r["format"]).split(" (")[0]
            self.first_metrics = {**m, "format": fmt, "max": _largest(fmt)}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per point and direction: module, op, call, operand, role, direction,
        samples, and the metrics (means over samples; amax the maximum)."""
        for _, p, _ in point_rows(self.model):  # names of points created since the last call
            self._name(p)
        out = []
        for name, r in self._rows.items():
            for direction in ("forward", "backward"):
                s = self.series.get((name, direction))
                if s is None:
                    continue
                row: dict[str, Any] = {k: r[k] for k in ("module", "op", "call", "operand", "role")}
                row.update(direction=direction, samples=s.samples)
                row.update({k: s.value(k) for k in METRICS})
                out.append(row)
        return out

    def overflows(self) -> dict[str, int]:
        """Integer-accumulator overflow events since collection began, per accumulator point
        (every call counts, not only sampled ones: the accumulator counts them itself)."""
        now = overflows(self.model)
        return {name: n - self._overflows_before.get(name, 0) for name, n in now.items()}

    def state_dict(self) -> dict[str, Any]:
        """Plain data (str, int, float, lists, dicts): what a checkpoint keeps to continue."""
        return {"every": self.every, "calls": dict(self.calls),
                "series": [[name, d, s.samples, dict(s.sums), dict(s.counts)]
                           for (name, d), s in self.series.items()],
                "first_nonfinite": list(self.first_nonfinite) if self.first_nonfinite else None,
                "first_metrics": dict(self.first_metrics) if self.first_metrics else None,
                "overflows_before": dict(self._overflows_before)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("every") != self.every:
            raise ValueError(f"telemetry saved with every={state.get('every')!r} cannot continue with "
                             f"every={self.every!r}: the sampled calls would differ")
        self.calls = {str(k): int(v) for k, v in state["calls"].items()}
        self.series = {(name, d): _Series(int(n), dict(sums), dict(counts))
                       for name, d, n, sums, counts in state["series"]}
        first = state.get("first_nonfinite")
        self.first_nonfinite = (int(first[0]), first[1], first[2], first[3]) if first else None
        self.first_metrics = state.get("first_metrics")
        self._overflows_before = {str(k): int(v) for k, v in state.get("overflows_before", {}).items()}

    def table(self) -> str:
        """The rows as a text table."""
        rows = self.rows()
        if not rows:
            return "(no samples)"
        cols = ["module", "op", "operand", "role", "direction", "samples", *METRICS]
        cells = [[_cell(r[c]) for c in cols] for r in rows]
        width = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        lines = ["  ".join(c.ljust(w) for c, w in zip(cols, width, strict=True))]
        lines += ["  ".join(v.ljust(w) for v, w in zip(row, width, strict=True)) for row in cells]
        events = self.overflows()
        if events:
            lines += ["", "integer accumulator overflow events:"]
            lines += [f"  {name}: {n}" for name, n in events.items()]
        return "\n".join(lines)


def point_name(row: dict[str, str]) -> str:
    """``stem.conv.output``, ``stem.conv.weight``, ``encoder.layer.0.attention.self.attention.0.q``:
    a summary row's module, op, call and operand, without repeats."""
    parts = [row["module"], row["op"], row["call"]]
    if row["operand"] != row["op"]:
        parts.append(row["operand"])
    return ".".join(p for p in parts if p)


def _largest(spec: str) -> float | None:
    """The largest finite value of a format spec (None where it has none: fp32, or a scale that
    follows the data)."""
    from precsim.formats import parse_format

    try:
        value = getattr(parse_format(spec), "max", None)
    except ValueError:
        return None
    return float(value) if isinstance(value, (int, float)) else None


def _cell(v: Any) -> str:
    return f"{v:.2f}" if isinstance(v, float) else str(v)


@contextmanager
def collect_stats(model: nn.Module, every: int = 50) -> Iterator[Stats]:
    """Record per-point telemetry of ``model`` while inside (training and evaluation alike)."""
    stats = Stats(model, every)
    token = STATS.set(stats)
    try:
        yield stats
    finally:
        STATS.reset(token)
