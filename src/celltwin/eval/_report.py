"""Human-readable report of an evaluation: ``report.md`` plus matplotlib PNGs (written atomically)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from celltwin._io import atomic_path

__all__ = ["write_report"]

_MAX_POINTS = 50_000  # points drawn in the effect-size scatter (deterministic subsample)


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    return path


def write_report(result: Any, outdir: Path) -> list[Path]:
    """Write ``report.md``, ``scores.png``, ``effects.png`` and (vcc profile) ``de_counts.png``."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    out = Path(outdir)
    written: list[Path] = []
    res = result.results
    metrics = [c for c in res.columns if c != "perturbation"]
    perts = res["perturbation"].astype(str).to_numpy()

    # 1. per-perturbation scores, one panel per metric
    fig, axes = plt.subplots(
        len(metrics), 1, figsize=(max(6, 0.12 * len(perts) + 2), 2.4 * len(metrics)), squeeze=False
    )
    for ax, m in zip(axes[:, 0], metrics, strict=True):
        ax.bar(np.arange(len(perts)), res[m].to_numpy(dtype=float), color="#4C72B0")
        ax.set_ylabel(m, fontsize=8)
        ax.set_xticks(np.arange(len(perts)))
        ax.set_xticklabels(perts if len(perts) <= 60 else [""] * len(perts), rotation=90, fontsize=6)
    axes[-1, 0].set_xlabel("perturbation")
    fig.suptitle("Per-perturbation scores")
    written.append(_save(fig, out / "scores.png"))
    plt.close(fig)

    # 2. predicted vs real pseudobulk deltas (effect sizes)
    dr = np.asarray(result.bulk["delta_real"], dtype=np.float64).ravel()
    dp = np.asarray(result.bulk["delta_pred"], dtype=np.float64).ravel()
    if dr.size > _MAX_POINTS:
        idx = np.random.default_rng(0).choice(dr.size, _MAX_POINTS, replace=False)
        dr, dp = dr[idx], dp[idx]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.scatter(dr, dp, s=2, alpha=0.3, color="#55A868", rasterized=True)
    lim = float(np.nanmax(np.abs(np.concatenate([dr, dp, [1e-6]]))))
    ax.plot([-lim, lim], [-lim, lim], color="grey", lw=0.8)
    ax.set_xlabel("real delta (pert - control, log1p)")
    ax.set_ylabel("predicted delta")
    r = float(np.corrcoef(dr, dp)[0, 1]) if dr.size > 1 and dr.std() > 0 and dp.std() > 0 else float("nan")
    ax.set_title(f"Effect sizes (Pearson r = {r:.3f})")
    written.append(_save(fig, out / "effects.png"))
    plt.close(fig)

    lines = ["# celltwin evaluation report", ""]
    cfg = result.config
    lines += [
        f"Profile `{cfg.profile}`, control source `{cfg.control_source}`, {len(perts)} perturbations.",
        "",
    ]
    means = result.agg.set_index("statistic")
    lines += ["| metric | mean | median | min | max |", "|---|---|---|---|---|"]
    for m in metrics:
        lines.append(
            f"| {m} | {means.loc['mean', m]:.4f} | {means.loc['50%', m]:.4f} | {means.loc['min', m]:.4f} | {means.loc['max', m]:.4f} |"
        )
    lines += ["", "![per-perturbation scores](scores.png)", "", "![effect sizes](effects.png)", ""]

    # 3. DE overlap: number of significant genes, real vs predicted
    if result.de_real is not None and result.de_pred is not None:
        n_real = _n_sig(result.de_real, perts)
        n_pred = _n_sig(result.de_pred, perts)
        fig, ax = plt.subplots(figsize=(4.5, 4.5))
        ax.scatter(n_real, n_pred, s=12, color="#C44E52")
        hi = max(1, int(max(n_real.max(initial=0), n_pred.max(initial=0))))
        ax.plot([0, hi], [0, hi], color="grey", lw=0.8)
        ax.set_xlabel("significant DE genes, real (FDR < 0.05)")
        ax.set_ylabel("significant DE genes, predicted")
        ax.set_title("DE overlap inputs")
        written.append(_save(fig, out / "de_counts.png"))
        plt.close(fig)
        lines += ["![DE gene counts](de_counts.png)", ""]
        lines += ["| perturbation | sig. genes real | sig. genes pred | " + " | ".join(metrics) + " |"]
        lines += ["|---" * (3 + len(metrics)) + "|"]
        for i, p in enumerate(perts):
            vals = " | ".join(f"{res[m].iloc[i]:.4f}" for m in metrics)
            lines.append(f"| {p} | {n_real[i]} | {n_pred[i]} | {vals} |")
    path = out / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    written.append(path)
    return written


def _n_sig(table: Any, perts: np.ndarray) -> np.ndarray:
    from celltwin.eval._metrics import category_codes

    codes = category_codes(table["target"], perts)
    sig = (np.asarray(table["fdr"], dtype=np.float64).astype(np.float32) < 0.05) & (codes >= 0)
    return np.bincount(codes[sig], minlength=len(perts)).astype(np.int64)
