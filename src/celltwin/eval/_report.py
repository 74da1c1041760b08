"""Human-readable report of an evaluation: ``report.md``, ``report.html`` and PNG figures.

Every figure has a bounded size whatever the number of perturbations (at most
:data:`MAX_FIGSIZE` inches at :data:`DPI` dpi, i.e. 1320 x 880 pixels; no ``bbox_inches="tight"``,
which could grow a figure past it) and only readable labels:

* ``scores.png``: the distribution of each per-perturbation metric (histogram, mean and median);
* ``ranking_{metric}.png``: for each per-perturbation metric, the best and the worst
  :data:`TOP_K` perturbations as labelled horizontal bars (all of them, sorted, when there are at
  most ``2 * TOP_K``); "best" follows the metric's direction in :mod:`celltwin.eval._registry`
  (metrics without one show the highest and the lowest values);
* ``effects.png``: predicted vs real pseudobulk deltas (a fixed-seed subsample of at most
  :data:`_MAX_POINTS` points: the same file for the same result);
* ``de_counts.png`` (profiles with DE): significant DE genes per perturbation, real vs predicted.

``report.html`` is self-contained (no script, no external resource: the PNGs are embedded as
base64 ``data:`` URIs, names escaped with :func:`html.escape`): the metric summary, the figures,
the best / worst perturbations of each metric as text and a per-perturbation table.
``report.md`` holds the summary and links the PNGs. Every file is written atomically; with a
``prefix`` (a cell type) each name is ``{prefix}{name}``. Figures are drawn on matplotlib
``Figure`` objects rendered by the Agg canvas (no pyplot state, no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from celltwin._io import atomic_path

__all__ = ["DPI", "MAX_FIGSIZE", "TOP_K", "Ranking", "rank_perturbations", "write_report"]

_MAX_POINTS = 50_000  # points drawn in the effect-size scatter (deterministic subsample)
DPI = 110
MAX_FIGSIZE = (12.0, 8.0)  # inches: every figure of the report fits in this
TOP_K = 15  # best / worst perturbations labelled per metric
_LABEL_CHARS = 32  # perturbation names longer than this are shortened in figures (full in the HTML)
_BLUE, _GREEN, _RED, _GREY = "#4C72B0", "#55A868", "#C44E52", "#8C8C8C"


@dataclass
class Ranking:
    """Best and worst perturbations of one metric (indices into the results' rows)."""

    metric: str
    higher_is_better: bool | None  # None: no direction; "best" = highest values
    best: np.ndarray  # best first
    worst: np.ndarray  # worst first
    n_valid: int  # perturbations with a finite value

    @property
    def words(self) -> tuple[str, str]:
        return ("best", "worst") if self.higher_is_better is not None else ("highest", "lowest")


def _direction(metric: str) -> tuple[bool | None, bool]:
    """``(higher_is_better, per_perturbation)`` of a metric column (unknown names: ``(None, True)``)."""
    from celltwin.eval._registry import METRICS

    m = METRICS.get(metric)
    return (None, True) if m is None else (m.higher_is_better, m.per_perturbation)


def rank_perturbations(values: np.ndarray, names: np.ndarray, higher_is_better: bool | None,
                       k: int = TOP_K, metric: str = "") -> Ranking:
    """The ``k`` best and ``k`` worst perturbations by ``values`` (non-finite values left out).

    Order is deterministic: by value, ties by name. ``higher_is_better`` ``False`` ranks the lowest
    values best; ``None`` ranks the highest first (labelled highest / lowest).
    """
    v = np.asarray(values, dtype=np.float64)
    names = np.asarray(names).astype(str)
    ok = np.flatnonzero(np.isfinite(v))
    key = v[ok] if higher_is_better is False else -v[ok]
    order = ok[np.lexsort((names[ok], key))]  # best first; ties by name
    worst_first = ok[np.lexsort((names[ok], -key))]
    return Ranking(metric, higher_is_better, order[:k], worst_first[:k], int(ok.size))


def _metric_values(result: Any, metric: str) -> np.ndarray:
    """The metric's per-perturbation values as float64, nulls (``result.nulls``) as NaN."""
    v = np.asarray(result.results[metric].to_numpy(dtype=float, na_value=np.nan), dtype=np.float64).copy()
    null = getattr(result, "nulls", {}).get(metric)
    if null is not None and len(null) == v.size:
        v[np.asarray(null, dtype=bool)] = np.nan
    return v


def _short(name: str, limit: int = _LABEL_CHARS) -> str:
    return name if len(name) <= limit else name[: limit - 1] + "\u2026"


def _figure(w: float, h: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(min(w, MAX_FIGSIZE[0]), min(h, MAX_FIGSIZE[1])), dpi=DPI, layout="constrained")


def _png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI)  # exactly figsize * dpi pixels
    return buf.getvalue()


def _direction_text(hib: bool | None) -> str:
    return {True: "higher is better", False: "lower is better"}.get(hib, "no direction")  # type: ignore[arg-type]


def _distributions(result: Any, metrics: list[str]):
    n = len(metrics)
    if n == 0:
        fig = _figure(6, 2)
        fig.text(0.5, 0.5, "no per-perturbation metric in this profile", ha="center", va="center")
        return fig
    ncols = min(4, n) if n > 3 else n
    nrows = math.ceil(n / ncols)
    fig = _figure(3.4 * ncols, 2.5 * nrows + 0.5)
    axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
    small = n > 8
    for ax, m in zip(axes, metrics, strict=False):
        v = _metric_values(result, m)
        fin = v[np.isfinite(v)]
        hib, _ = _direction(m)
        if fin.size:
            bins = int(min(30, max(5, round(math.sqrt(fin.size)))))
            ax.hist(fin, bins=bins, color=_BLUE, alpha=0.85)
            ax.axvline(float(fin.mean()), color=_RED, lw=1.2, label=f"mean {fin.mean():.3g}")
            ax.axvline(float(np.median(fin)), color="black", lw=1.0, ls="--", label=f"median {np.median(fin):.3g}")
            ax.legend(fontsize=6 if small else 7, loc="best")
        else:
            ax.text(0.5, 0.5, "no finite value", ha="center", va="center", transform=ax.transAxes)
        missing = v.size - fin.size
        ax.set_title(m + (f" ({missing} missing)" if missing else ""), fontsize=7 if small else 9)
        ax.set_xlabel(f"value ({_direction_text(hib)})", fontsize=6 if small else 8)
        ax.set_ylabel("perturbations", fontsize=6 if small else 8)
        ax.tick_params(labelsize=6 if small else 7)
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(f"Distribution of each metric over {len(result.results)} perturbations", fontsize=10)
    return fig


def _bars(ax, idx: np.ndarray, values: np.ndarray, perts: np.ndarray, color: str, title: str, xlabel: str) -> None:
    y = np.arange(idx.size)
    vals = values[idx]
    ax.barh(y, vals, color=color, alpha=0.9)
    ax.set_yticks(y)
    ax.set_yticklabels([_short(str(perts[i])) for i in idx], fontsize=8)
    ax.invert_yaxis()  # first (best / worst) at the top
    span = float(np.max(np.abs(vals))) if vals.size else 1.0
    for yy, v in zip(y, vals, strict=True):
        ax.text(v + (0.01 * span if v >= 0 else -0.01 * span), yy, f"{v:.3g}", va="center",
                ha="left" if v >= 0 else "right", fontsize=7)
    ax.margins(x=0.15)
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.grid(True, axis="x", alpha=0.3)


def _ranking_figure(rk: Ranking, values: np.ndarray, perts: np.ndarray):
    good, bad = rk.words
    direction = _direction_text(rk.higher_is_better)
    if rk.n_valid <= 2 * TOP_K:  # few perturbations: all of them, sorted
        n = max(1, rk.n_valid)
        fig = _figure(8, 0.24 * n + 1.4)
        ax = fig.subplots(1, 1)
        _bars(ax, rk.best, values, perts, _BLUE, f"all {rk.n_valid} perturbations, {good} first",
              f"{rk.metric} ({direction})")
    else:
        fig = _figure(12, 0.24 * TOP_K + 1.6)
        left, right = fig.subplots(1, 2)
        _bars(left, rk.best, values, perts, _GREEN, f"{good} {rk.best.size}", f"{rk.metric} ({direction})")
        _bars(right, rk.worst, values, perts, _RED, f"{bad} {rk.worst.size}", f"{rk.metric} ({direction})")
    fig.suptitle(f"{rk.metric}: {good} and {bad} perturbations of {rk.n_valid}", fontsize=10)
    return fig


def _effects_figure(result: Any):
    bulk = getattr(result, "bulk", {}) or {}
    if "delta_real" not in bulk or "delta_pred" not in bulk:
        return None, float("nan")
    dr = np.asarray(bulk["delta_real"], dtype=np.float64).ravel()
    dp = np.asarray(bulk["delta_pred"], dtype=np.float64).ravel()
    if dr.size > _MAX_POINTS:
        idx = np.random.default_rng(0).choice(dr.size, _MAX_POINTS, replace=False)
        dr, dp = dr[idx], dp[idx]
    fig = _figure(5.5, 5.5)
    ax = fig.subplots(1, 1)
    ax.scatter(dr, dp, s=2, alpha=0.3, color=_GREEN, rasterized=True)
    lim = float(np.nanmax(np.abs(np.concatenate([dr, dp, [1e-6]]))))
    ax.plot([-lim, lim], [-lim, lim], color=_GREY, lw=0.8)
    ax.set_xlabel("real delta (perturbation - control pseudobulk, log1p)")
    ax.set_ylabel("predicted delta (log1p)")
    ok = np.isfinite(dr) & np.isfinite(dp)
    r = (float(np.corrcoef(dr[ok], dp[ok])[0, 1])
         if ok.sum() > 1 and dr[ok].std() > 0 and dp[ok].std() > 0 else float("nan"))
    ax.set_title(f"Effect sizes, every (perturbation, gene) (Pearson r = {r:.3f})", fontsize=9)
    return fig, r


def _de_figure(n_real: np.ndarray, n_pred: np.ndarray):
    fig = _figure(5.5, 5.5)
    ax = fig.subplots(1, 1)
    ax.scatter(n_real, n_pred, s=12, color=_RED, alpha=0.7)
    hi = max(1, int(max(n_real.max(initial=0), n_pred.max(initial=0))))
    ax.plot([0, hi], [0, hi], color=_GREY, lw=0.8)
    ax.set_xlabel("significant DE genes, real (FDR < 0.05)")
    ax.set_ylabel("significant DE genes, predicted (FDR < 0.05)")
    ax.set_title(f"DE gene counts of {n_real.size} perturbations", fontsize=9)
    return fig


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def write_report(result: Any, outdir: Path, prefix: str = "") -> list[Path]:
    """Write ``report.md``, ``report.html``, ``scores.png``, ``ranking_{metric}.png``, ``effects.png``
    and (profiles with DE) ``de_counts.png``, each name preceded by ``prefix``; returns the paths."""
    out = Path(outdir)
    written: list[Path] = []
    images: dict[str, bytes] = {}

    def save(fig, name: str) -> str:
        data = _png(fig)
        path = out / f"{prefix}{name}"
        with atomic_path(path) as tmp:
            tmp.write_bytes(data)
        written.append(path)
        images[name] = data
        return name

    res = result.results
    metrics = [c for c in res.columns if c != "perturbation"]
    perts = res["perturbation"].astype(str).to_numpy()
    per_pert = [m for m in metrics if _direction(m)[1]]

    # 1. distributions; 2. best / worst of each per-perturbation metric
    save(_distributions(result, per_pert), "scores.png")
    rankings: list[tuple[Ranking, str | None]] = []
    for m in per_pert:
        vals = _metric_values(result, m)
        rk = rank_perturbations(vals, perts, _direction(m)[0], TOP_K, m)
        name = None
        if rk.n_valid:
            name = save(_ranking_figure(rk, vals, perts), f"ranking_{_safe(m)}.png")
        rankings.append((rk, name))
    # 3. effect sizes
    fig, pearson = _effects_figure(result)
    if fig is not None:
        save(fig, "effects.png")
    # 4. DE counts
    n_real = n_pred = None
    if result.de_real is not None and result.de_pred is not None:
        n_real = _n_sig(result.de_real, perts)
        n_pred = _n_sig(result.de_pred, perts)
        save(_de_figure(n_real, n_pred), "de_counts.png")

    summary = _summary(result, metrics)
    written.append(_write_md(result, out, prefix, metrics, perts, summary, rankings, images, n_real, n_pred))
    written.append(_write_html(result, out, prefix, metrics, perts, summary, rankings, images, n_real, n_pred,
                               pearson))
    return written


def _summary(result: Any, metrics: list[str]) -> list[tuple[str, str, list[float]]]:
    """``(metric, direction, [mean, median, min, max])`` per metric, from ``result.agg``."""
    means = result.agg.set_index("statistic")
    rows = []
    for m in metrics:
        vals = []
        for stat in ("mean", "50%", "min", "max"):
            try:
                vals.append(float(means.loc[stat, m]))
            except (KeyError, TypeError, ValueError):
                vals.append(float("nan"))
        rows.append((m, _direction_text(_direction(m)[0]), vals))
    return rows


def _fmt(v: float) -> str:
    return "" if v is None or not np.isfinite(v) else f"{v:.4f}"


def _write_md(result, out, prefix, metrics, perts, summary, rankings, images, n_real, n_pred) -> Path:
    cfg = result.config
    lines = ["# celltwin evaluation report", ""]
    lines += [f"Profile `{cfg.profile}`, control source `{cfg.control_source}`, {len(perts)} perturbations.", ""]
    lines += ["| metric | direction | mean | median | min | max |", "|---|---|---|---|---|---|"]
    for m, d, vals in summary:
        lines.append(f"| {m} | {d} | " + " | ".join(_fmt(v) for v in vals) + " |")
    lines += ["", f"![metric distributions]({prefix}scores.png)", ""]
    for rk, name in rankings:
        if name is not None:
            good, bad = rk.words
            lines += [f"![{rk.metric}: {good} and {bad} perturbations]({prefix}{name})", ""]
    if "effects.png" in images:
        lines += [f"![effect sizes]({prefix}effects.png)", ""]
    if n_real is not None:
        lines += [f"![DE gene counts]({prefix}de_counts.png)", ""]
        lines += ["| perturbation | sig. genes real | sig. genes pred | " + " | ".join(metrics) + " |"]
        lines += ["|---" * (3 + len(metrics)) + "|"]
        res = result.results
        for i, p in enumerate(perts):
            vals = " | ".join(f"{res[m].iloc[i]:.4f}" for m in metrics)
            lines.append(f"| {p} | {n_real[i]} | {n_pred[i]} | {vals} |")
    path = out / f"{prefix}report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5em auto; max-width: 1340px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.6em; } h2 { font-size: 1.3em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
h3 { font-size: 1.1em; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f2f2f2; } td.name, th.name { text-align: left; font-family: ui-monospace, monospace; }
img { max-width: 100%; height: auto; display: block; margin: 0.6em 0; border: 1px solid #eee; }
.lists { display: flex; gap: 2em; flex-wrap: wrap; } .note { color: #555; }
"""


def _img(images: dict[str, bytes], name: str, alt: str) -> str:
    data = base64.b64encode(images[name]).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(alt)}">'


def _write_html(result, out, prefix, metrics, perts, summary, rankings, images, n_real, n_pred, pearson) -> Path:
    e = html.escape
    cfg = result.config
    title = "celltwin evaluation report" + (f" ({prefix.rstrip('_')})" if prefix else "")
    h: list[str] = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
                    '<meta name="viewport" content="width=device-width, initial-scale=1">',
                    f"<title>{e(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>",
                    f"<h1>{e(title)}</h1>",
                    (f"<p>Profile <code>{e(str(cfg.profile))}</code>, control source "
                     f"<code>{e(str(cfg.control_source))}</code>, {len(perts)} perturbations, "
                     f"{len(metrics)} metrics.</p>")]
    h += ['<h2 id="summary">Metrics summary</h2>', '<table id="summary-table">',
          '<tr><th class="name">metric</th><th>direction</th><th>mean</th><th>median</th><th>min</th><th>max</th></tr>']
    for m, d, vals in summary:
        h.append(f'<tr><td class="name">{e(m)}</td><td>{e(d)}</td>' + "".join(f"<td>{_fmt(v)}</td>" for v in vals)
                 + "</tr>")
    h.append("</table>")
    h += ['<h2 id="distributions">Distributions</h2>', _img(images, "scores.png", "distribution of each metric")]
    if rankings:
        h.append(f'<h2 id="rankings">Best and worst perturbations (top {TOP_K} each)</h2>')
    for rk, name in rankings:
        good, bad = rk.words
        h.append(f'<h3 id="rank-{e(_safe(rk.metric))}">{e(rk.metric)} '
                 f'<span class="note">({e(_direction_text(rk.higher_is_better))})</span></h3>')
        if name is None:
            h.append('<p class="note">no finite value</p>')
            continue
        h.append(_img(images, name, f"{rk.metric}: {good} and {bad} perturbations"))
        vals = _metric_values(result, rk.metric)
        h.append('<div class="lists">')
        for word, idx in ((good, rk.best), (bad, rk.worst)):
            h.append(f'<table class="rank {e(word)}"><tr><th>#</th><th class="name">{e(word)}</th><th>value</th></tr>')
            h += [f'<tr><td>{k + 1}</td><td class="name">{e(str(perts[i]))}</td><td>{_fmt(vals[i])}</td></tr>'
                  for k, i in enumerate(idx)]
            h.append("</table>")
        h.append("</div>")
    if "effects.png" in images:
        h += ['<h2 id="effects">Effect sizes</h2>',
              f'<p class="note">Pearson r of predicted vs real pseudobulk deltas: {pearson:.4f}</p>',
              _img(images, "effects.png", "predicted vs real pseudobulk deltas")]
    if n_real is not None:
        h += ['<h2 id="de-counts">DE gene counts</h2>', _img(images, "de_counts.png", "DE gene counts")]
    h += ['<h2 id="per-perturbation">Per-perturbation scores</h2>', '<table id="per-perturbation-table">',
          '<tr><th class="name">perturbation</th>'
          + ("<th>sig. genes real</th><th>sig. genes pred</th>" if n_real is not None else "")
          + "".join(f"<th>{e(m)}</th>" for m in metrics) + "</tr>"]
    cols = {m: _metric_values(result, m) for m in metrics}
    for i, p in enumerate(perts):
        cells = f"<td>{n_real[i]}</td><td>{n_pred[i]}</td>" if n_real is not None else ""
        h.append(f'<tr><td class="name">{e(str(p))}</td>{cells}'
                 + "".join(f"<td>{_fmt(cols[m][i])}</td>" for m in metrics) + "</tr>")
    h += ["</table>", "</body>", "</html>"]
    path = out / f"{prefix}report.html"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(h) + "\n", encoding="utf-8")
    return path


def _n_sig(table: Any, perts: np.ndarray) -> np.ndarray:
    from celltwin.eval._metrics import category_codes

    codes = category_codes(table["target"], perts)
    sig = (np.asarray(table["fdr"], dtype=np.float64).astype(np.float32) < 0.05) & (codes >= 0)
    return np.bincount(codes[sig], minlength=len(perts)).astype(np.int64)
