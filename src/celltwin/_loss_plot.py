"""Loss-curve plot of a training run (``loss.png``) from its metrics log (torch-free).

The training loop (:func:`celltwin.train.fit`) logs the mean of each loss part over every log
window to ``metrics.csv`` (long format ``step,split,name,value``, see
:class:`celltwin.train.metrics.MetricsLogger`; a resumed run first drops the rows after its
checkpoint, so the file always covers every step of the run). :func:`loss_curve` reads that file
into the plotted data, :func:`draw_loss_curve` draws it (a matplotlib ``Figure`` rendered by the Agg
canvas, without pyplot: no display, and a notebook's backend and open figures are left alone) and
:func:`write_loss_plot` writes the PNG atomically. The loop calls :func:`write_loss_plot` at every
checkpoint and at the end, so a killed run has the plot of its last checkpoint.

What is drawn: the training loss at each logged step (thin line and dots), an exponential moving
average of it (debiased, span ~ 1/20 of the points; drawn from 5 points on), the validation
metrics when there are any (in a second panel, their own scale: e.g. ``overlap_at_N``, ``mae``),
and a log-scale y axis when the positive losses span more than two decades.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["LossCurve", "draw_loss_curve", "loss_curve", "read_metrics", "smooth", "write_loss_plot"]

#: figure size (inches) and resolution of loss.png: at most 1100 x 770 pixels
FIGSIZE_ONE = (9.0, 4.5)
FIGSIZE_TWO = (9.0, 7.0)
DPI = 110
#: log-scale y when max/min of the (all positive) training losses exceeds this
LOG_RATIO = 100.0


@dataclass
class LossCurve:
    """The data of a loss plot (what :func:`draw_loss_curve` draws)."""

    name: str  # the plotted training metric ("loss")
    steps: list[int] = field(default_factory=list)  # optimiser steps with a logged value
    values: list[float] = field(default_factory=list)  # mean loss over the log window ending there
    smoothed: list[float] = field(default_factory=list)  # EMA of values (empty below 5 points)
    val: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # name -> (steps, values)
    log_y: bool = False


def read_metrics(path: str | Path) -> dict[tuple[str, str], tuple[list[int], list[float]]]:
    """``{(split, name): (steps, values)}`` of a ``metrics.csv`` (rows in file order; a later row
    for the same step replaces an earlier one; non-finite and unparsable values skipped)."""
    out: dict[tuple[str, str], dict[int, float]] = {}
    p = Path(path)
    if not p.exists():
        return {}
    with p.open(newline="", encoding="utf-8") as f:
        rows = csv.reader(f)
        header = next(rows, None)
        if header is None:
            return {}
        for r in rows:
            if len(r) != 4:
                continue  # a line cut by a kill while being written
            try:
                step, value = int(r[0]), float(r[3])
            except ValueError:
                continue
            if math.isfinite(value):
                out.setdefault((r[1], r[2]), {})[step] = value
    return {k: (sorted(d), [d[s] for s in sorted(d)]) for k, d in out.items()}


def smooth(values: list[float], span: int | None = None) -> list[float]:
    """Debiased exponential moving average (``alpha = 2 / (span + 1)``, TensorBoard's rule);
    ``span`` defaults to ``max(2, len(values) // 20)``."""
    if not values:
        return []
    span = max(2, len(values) // 20) if span is None else max(1, int(span))
    alpha = 2.0 / (span + 1.0)
    out, acc, weight = [], 0.0, 0.0
    for v in values:
        acc = (1 - alpha) * acc + alpha * v
        weight = (1 - alpha) * weight + alpha
        out.append(acc / weight)
    return out


def loss_curve(metrics_csv: str | Path, name: str = "loss") -> LossCurve:
    """The plotted data of a run's ``metrics.csv``: training ``name`` and every validation metric."""
    table = read_metrics(metrics_csv)
    steps, values = table.get(("train", name), ([], []))
    positive = [v for v in values if v > 0]
    log_y = len(positive) == len(values) and len(values) > 1 and max(positive) / min(positive) > LOG_RATIO
    val = {n: sv for (split, n), sv in sorted(table.items()) if split == "val"}
    return LossCurve(name=name, steps=list(steps), values=list(values),
                     smoothed=smooth(values) if len(values) >= 5 else [], val=val, log_y=log_y)


def draw_loss_curve(curve: LossCurve, title: str = ""):
    """A matplotlib Figure of ``curve`` (bounded size: :data:`FIGSIZE_ONE` / :data:`FIGSIZE_TWO`)."""
    from matplotlib.figure import Figure

    two = bool(curve.val)
    # fixed margins (not a layout engine, which doubles the cost of each save: ~0.3 s vs ~0.6 s here)
    fig = Figure(figsize=FIGSIZE_TWO if two else FIGSIZE_ONE, dpi=DPI)
    axes = fig.subplots(2, 1, sharex=True) if two else [fig.subplots(1, 1)]
    fig.subplots_adjust(left=0.1, right=0.97, bottom=0.09 if two else 0.12, top=0.94 if two else 0.91,
                        hspace=0.25)
    ax = axes[0]
    if curve.steps:
        ax.plot(curve.steps, curve.values, color="#4C72B0", lw=0.8, alpha=0.45 if curve.smoothed else 1.0,
                marker="o" if len(curve.steps) <= 60 else None, ms=3, label=f"training {curve.name}")
        if curve.smoothed:
            ax.plot(curve.steps, curve.smoothed, color="#1f3b73", lw=1.8, label="smoothed (EMA)")
        if "loss" in curve.val and curve.name == "loss":
            vs, vv = curve.val["loss"]
            ax.plot(vs, vv, color="#C44E52", marker="s", ms=4, lw=1, label="validation loss")
        ax.legend(loc="upper right", fontsize=8)
    else:
        ax.text(0.5, 0.5, "no training loss logged yet", ha="center", va="center", transform=ax.transAxes)
    if curve.log_y:
        ax.set_yscale("log")
    ax.set_ylabel(f"training {curve.name} (mean per log window{', log scale' if curve.log_y else ''})")
    ax.grid(True, alpha=0.3)
    last = f"; last {curve.values[-1]:.4g} at step {curve.steps[-1]}" if curve.steps else ""
    ax.set_title((title + ": " if title else "") + f"training {curve.name}{last}", fontsize=10)
    if two:
        vax = axes[1]
        for n, (vs, vv) in curve.val.items():
            if n == "loss" and curve.name == "loss":
                continue
            vax.plot(vs, vv, marker="o", ms=4, lw=1, label=n)
        vax.set_ylabel("validation metric")
        vax.grid(True, alpha=0.3)
        if vax.get_legend_handles_labels()[0]:
            vax.legend(loc="best", fontsize=8)
        vax.set_title("validation", fontsize=10)
    axes[-1].set_xlabel("optimiser step")
    return fig


def write_loss_plot(metrics_csv: str | Path, out_png: str | Path, *, name: str = "loss", title: str = "") -> Path:
    """Draw ``metrics_csv`` and write ``out_png`` atomically (PNG); returns ``out_png``."""
    from celltwin._io import atomic_path

    fig = draw_loss_curve(loss_curve(metrics_csv, name), title=title)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)
    out = Path(out_png)
    with atomic_path(out) as tmp:
        tmp.write_bytes(buf.getvalue())
    return out
