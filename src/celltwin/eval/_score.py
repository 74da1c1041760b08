"""``score``: normalise a model's aggregate metrics against a baseline's (cell-eval 0.8.2 ``score``).

Rules (cell-eval ``score_agg_metrics``):

* both tables are ``agg_results.csv`` tables with identical columns, the first being ``statistic``;
  the compared row is the first ``statistic == "mean"`` row of each;
* a metric whose best value is 0 (``mse``, ``mae``, ``mse_delta``, ``mae_delta``) scores
  ``1 - u / b``; a metric whose best value is 1 (every other cell-eval metric: PDS, overlaps,
  precisions, correlations, AUCs, ...) scores ``(u - b) / (1 - b)``; columns that are not cell-eval
  metrics (e.g. ``de_nsig_counts_real``) are skipped;
* NaN scores (e.g. ``0 / 0``) become 0, then every score is clipped below at 0 (not above);
* output rows: the best-0 metrics, then the best-1 metrics (each in column order), then
  ``avg_score`` = the plain mean of those scores. (cell-eval crashes when one of the two groups is
  empty; here the group is simply absent.)
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from celltwin.errors import InputError

__all__ = ["score", "BEST_ZERO", "BEST_ONE"]

BEST_ZERO = frozenset({"mse", "mae", "mse_delta", "mae_delta"})
BEST_ONE = frozenset(
    {
        "pearson_delta",
        "pearson_edistance",
        "clustering_agreement",
        "de_spearman_sig",
        "de_direction_match",
        "de_spearman_lfc_sig",
        "de_sig_genes_recall",
        "pr_auc",
        "roc_auc",
    }
    | {f"discrimination_score_{m}" for m in ("l1", "l2", "cosine")}
    | {f"{kind}_at_{n}" for kind in ("overlap", "precision") for n in ("N", "50", "100", "200", "500")}
)


def _read(obj: Any, which: str):
    import pandas as pd

    if isinstance(obj, (str, os.PathLike)):
        try:
            return pd.read_csv(obj)
        except Exception as e:
            msg = f"{obj}: not a readable CSV ({type(e).__name__}; expected an agg_results.csv)"
            raise InputError(msg) from None
    if hasattr(obj, "to_pandas"):
        return obj.to_pandas()
    return obj


def _numbers(df, row: int, metrics: list[str], name: Any, statistic: str) -> np.ndarray:
    """The ``statistic`` row's metric values as float64; InputError naming the first non-number."""
    out = np.empty(len(metrics), dtype=np.float64)
    for i, m in enumerate(metrics):
        v = df.loc[row, m]
        try:
            out[i] = np.nan if v is None or (isinstance(v, str) and not v.strip()) else float(v)
        except (TypeError, ValueError):
            msg = f"{name}: column {m!r} of the {statistic!r} row must be a number, got {v!r}"
            raise InputError(msg) from None
    return out


def score(agg: Any, baseline_agg: Any, *, statistic: str = "mean"):
    """Score ``agg`` against ``baseline_agg`` (paths or DataFrames) -> DataFrame ``metric, from_baseline``."""
    import pandas as pd

    u, b = _read(agg, "user"), _read(baseline_agg, "baseline")
    name_u = agg if isinstance(agg, (str, os.PathLike)) else "user agg table"
    name_b = baseline_agg if isinstance(baseline_agg, (str, os.PathLike)) else "baseline agg table"
    if list(u.columns) != list(b.columns):
        msg = f"{name_u}: columns differ from {name_b} (expected {list(b.columns)}, got {list(u.columns)})"
        raise InputError(msg)
    if "statistic" not in u.columns:
        msg = f"{name_u}: no 'statistic' column (expected an agg_results.csv; got columns {list(u.columns)[:5]})"
        raise InputError(msg)
    rows_u = np.flatnonzero(u["statistic"].astype(str).to_numpy() == statistic)
    rows_b = np.flatnonzero(b["statistic"].astype(str).to_numpy() == statistic)
    if rows_u.size == 0 or rows_b.size == 0:
        msg = f"{name_u if rows_u.size == 0 else name_b}: no {statistic!r} row in column 'statistic'"
        raise InputError(msg)
    metrics = [c for c in u.columns if c != "statistic"]
    uv = _numbers(u, rows_u[0], metrics, name_u, statistic)
    bv = _numbers(b, rows_b[0], metrics, name_b, statistic)
    zero = [i for i, m in enumerate(metrics) if m in BEST_ZERO]
    one = [i for i, m in enumerate(metrics) if m in BEST_ONE]
    with np.errstate(divide="ignore", invalid="ignore"):
        s_zero = 1.0 - uv[zero] / bv[zero]
        s_one = (uv[one] - bv[one]) / (1.0 - bv[one])
    scores = np.concatenate([s_zero, s_one])
    scores[np.isnan(scores)] = 0.0
    scores = np.clip(scores, 0.0, None)
    names = [metrics[i] for i in zero] + [metrics[i] for i in one]
    avg = float(scores.mean()) if scores.size else float("nan")
    return pd.DataFrame({"metric": names + ["avg_score"], "from_baseline": np.concatenate([scores, [avg]])})
