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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from celltwin.errors import InputError
from celltwin.eval._registry import BEST_ONE, BEST_ZERO  # the directions, defined once

__all__ = ["BEST_ONE", "BEST_ZERO", "VccScore", "score", "score_vs_vcc_baseline"]


def _read(obj: Any, which: str):
    import pandas as pd

    if isinstance(obj, (str, os.PathLike)):
        try:
            return pd.read_csv(obj)
        except Exception as e:  # noqa: BLE001 - pandas raises many types for a foreign file
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


# --------------------------------------------------------------------------- against the VCC baseline
@dataclass
class VccScore:
    """What :func:`score_vs_vcc_baseline` computed.

    ``table``: pandas DataFrame with columns ``metric``, ``model``, :data:`~celltwin.eval._baseline.VCC_BASELINE_NAME`
    (the metric means of both) and ``from_baseline`` (:func:`score`'s rows, ``avg_score`` last).
    ``model_agg`` / ``baseline_agg``: the two ``agg_results`` tables; ``baseline``: the baseline
    AnnData (:func:`celltwin.eval._baseline.vcc_baseline`); ``counts``: its cells per perturbation (the real ones).
    """

    table: Any
    model_agg: Any
    baseline_agg: Any
    baseline: Any
    counts: dict[str, int] = field(default_factory=dict)


def score_vs_vcc_baseline(real: Any, train: Any, *, pred: Any = None, agg: Any = None, config: Any = None,
                          allow_discrete: bool = False, train_rows: Any = None) -> VccScore:
    """The VCC-normalised score of a model in one call: cell-eval's baseline is built here.

    Builds the VCC baseline (cell-eval's cell-mean baseline, :func:`celltwin.eval._baseline.vcc_baseline`) from
    ``train`` (AnnData or ``.h5ad``, streamed; ``train_rows``: only those sorted rows of it; the
    training cells, controls included) with the cells per
    perturbation of ``real``, evaluates it against ``real`` with ``config`` (an
    :class:`~celltwin.eval.EvalConfig`; its ``pert_col`` / ``control`` name the columns of all three),
    evaluates ``pred`` against ``real`` the same way (reusing the real DE table) unless the model's
    ``agg`` table is given instead, and scores the model against the baseline (:func:`score`). The
    result equals ``celltwin baseline -a TRAIN -c COUNTS``, ``celltwin eval`` of both files and
    ``celltwin score -i MODEL_AGG -I BASELINE_AGG``.
    """
    import pandas as pd

    from celltwin.eval._baseline import VCC_BASELINE_NAME, vcc_baseline
    from celltwin.eval._evaluate import EvalConfig, evaluate

    if (pred is None) == (agg is None):
        raise InputError("score: give the model's prediction (pred) or its agg_results table (agg), not both")
    cfg = config if config is not None else EvalConfig(cache_dir=None)
    base, counts = vcc_baseline(train, real, pert_col=cfg.pert_col, control_pert=cfg.control,
                                allow_discrete=allow_discrete, rows=train_rows)
    base_res = evaluate(base, real, config=cfg)
    if pred is not None:
        model_agg = evaluate(pred, real, config=cfg, de_real=base_res.de_real).agg
    else:
        model_agg = _read(agg, "user")
    b_agg = base_res.agg
    table = score(model_agg, b_agg)
    mean_u = _read(model_agg, "user").set_index("statistic").loc["mean"]
    mean_b = b_agg.set_index("statistic").loc["mean"]
    if isinstance(mean_u, pd.DataFrame):  # several 'mean' rows: score() uses the first
        mean_u = mean_u.iloc[0]
    names = table["metric"].tolist()
    model_vals = [float(mean_u[m]) if m in mean_u.index else np.nan for m in names]
    base_vals = [float(mean_b[m]) if m in mean_b.index else np.nan for m in names]
    out = pd.DataFrame({"metric": names, "model": model_vals, VCC_BASELINE_NAME: base_vals,
                        "from_baseline": table["from_baseline"].to_numpy()})
    return VccScore(table=out, model_agg=model_agg, baseline_agg=b_agg, baseline=base, counts=counts)
