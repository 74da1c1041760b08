"""Array kernels of the VCC metrics (pure numpy/scipy; no AnnData).

Each function documents the exact rule of cell-eval 0.8.2 it reproduces. The kernels of the three
VCC metrics also compute their ``full``-profile relatives (``mse``, the ``_delta`` errors, PDS
``l2`` / ``cosine``, ``overlap_at_k`` / ``precision_at_k``); the rest of ``full`` is in
:mod:`celltwin.eval._full`.

Pseudobulks (cell-eval ``PerturbationAnndataPair._bulk_anndata``)
    The mean of every gene over the cells of each label, *including* the control label. The sum is
    accumulated in float64 and the mean is cast back to the matrix dtype (float32 stays float32,
    which is what a polars ``group_by().mean()`` on float32 columns returns). Labels are sorted
    (``np.unique`` order).

Deltas
    ``pseudobulk[pert] - pseudobulk[control]`` of the *same* file, in the matrix dtype; the real and
    the predicted deltas each use their own file's control cells (unless the caller substitutes the
    real controls, see ``control_source``).

MAE (``mae``, :func:`mean_error`)
    ``mean(|pseudobulk_pred[pert] - pseudobulk_real[pert]|)`` over all genes, on the pseudobulks
    themselves (not the deltas), in numpy's promotion of the two dtypes (float32 if both are).

PDS (``discrimination_score_l1``, :func:`discrimination`)
    For perturbation ``p``: the L1 (``scipy.spatial.distance.cdist(..., "cityblock")``, float64)
    distances between the predicted delta of ``p`` and the real delta of every perturbation, over the
    genes whose *name* differs from ``p`` (a perturbation that is not a gene name excludes nothing);
    ``rank`` = position of ``p`` in ``np.argsort(distances)`` (numpy's default sort, so ties keep
    numpy's order); score = ``1 - rank / P``, ``P`` = number of non-control perturbations.

DES (``overlap_at_N``; cell-eval ``DEComparison.compute_overlap`` with ``k=None``; :func:`overlap_k`)
    On each DE table, ``fdr`` and ``log2_fold_change`` are cast to float32 and genes with
    ``fdr < 0.05`` are kept; they are ranked by ``|lfc|`` descending with NaN first, then +inf, then
    finite values, ties broken by the table's row order (gene order). With ``n`` = the number of
    significant real genes, the score is ``|top_n(real) & top_n(pred)| / n`` (the predicted list is
    truncated to ``n`` and may be shorter). A perturbation with no significant real gene scores 0;
    if *no* perturbation has a significant gene on either side, every score is 0.

Aggregation (polars ``DataFrame.describe`` as used by ``agg_results.csv``)
    Rows ``count, null_count, mean, std, min, 25%, 50%, 75%, max`` per metric column; ``count``
    counts non-null values (NaN included), ``mean``/``std`` (ddof=1) propagate NaN, ``min``/``max``
    ignore NaN, the quantiles use the "nearest" rule on the non-null values sorted with NaN last,
    index ``round_half_away((n - 1) * q)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = [
    "DESCRIBE_ROWS",
    "FDR_THRESHOLD",
    "category_codes",
    "describe",
    "discrimination",
    "mean_error",
    "overlap_k",
    "pseudobulk",
    "rank_significant",
    "take_strings",
]

FDR_THRESHOLD = 0.05
DESCRIBE_ROWS = ("count", "null_count", "mean", "std", "min", "25%", "50%", "75%", "max")

_DENSE_CHUNK = 4096  # rows per float64 block when summing a dense matrix


def pseudobulk(X: Any, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """Mean of each group's rows, ``(n_groups, n_genes)`` in ``X``'s float dtype (float64 accumulation).

    ``X`` is ``(n_cells, n_genes)`` CSR or dense; ``codes`` is ``(n_cells,)`` int with values in
    ``[0, n_groups)`` (``-1`` = ignore the row). Never densifies a sparse ``X``. Float32 input gives
    float32 means (polars' ``group_by().mean()``, which cell-eval uses, accumulates in float64 and
    returns the column dtype); integer input gives float64.
    """
    n_genes = X.shape[1]
    codes = np.asarray(codes, dtype=np.int64)
    sizes = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.float64)
    if sp.issparse(X):
        from celltwin.eval._rowops import group_sums_csr

        X = X.tocsr()
        sums = group_sums_csr(X.indptr, X.indices, X.data, codes, n_groups, n_genes)
    else:
        X = np.asarray(X)
        sums = np.zeros((n_groups, n_genes), dtype=np.float64)
        order = np.argsort(codes, kind="stable")
        bounds = np.searchsorted(codes[order], np.arange(n_groups + 1))
        for g in range(n_groups):
            rows = order[bounds[g] : bounds[g + 1]]
            for s in range(0, rows.size, _DENSE_CHUNK):
                sums[g] += X[rows[s : s + _DENSE_CHUNK]].sum(axis=0, dtype=np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / sizes[:, None]
    return means.astype(X.dtype if X.dtype.kind == "f" else np.float64)


def mean_error(pred: np.ndarray, real: np.ndarray, kind: str = "mae") -> np.ndarray:
    """Per-row ``mean(|real - pred|)`` (``kind="mae"``) or ``mean((real - pred)**2)`` (``"mse"``) of two
    ``(P, G)`` matrices -> ``(P,)`` float64.

    Each row is reduced exactly as sklearn's ``mean_absolute_error`` / ``mean_squared_error`` do on
    1-D inputs (``np.mean`` in the promoted dtype). ``mae`` / ``mse`` on the pseudobulks, their
    ``_delta`` variants on the deltas.
    """
    out = np.empty(pred.shape[0], dtype=np.float64)
    for i in range(out.size):
        d = real[i] - pred[i]
        out[i] = float(np.mean(np.abs(d) if kind == "mae" else d**2))
    return out


def discrimination(
    delta_real: np.ndarray, delta_pred: np.ndarray, perts: Sequence[str], genes: Sequence[str], metric: str = "l1"
) -> np.ndarray:
    """PDS (``discrimination_score_{metric}``), target gene excluded by name -> ``(P,)`` float64 in ``[1/P, 1]``.

    ``delta_real`` and ``delta_pred`` are ``(P, G)``, row ``i`` belonging to ``perts[i]``. ``metric``:
    ``"l1"`` (scipy ``cdist(..., "cityblock")`` in float64, see the module docstring), ``"l2"`` or
    ``"cosine"`` (sklearn's dense arithmetic, :func:`celltwin.eval._full.euclidean`); the same rank
    rule for all three. Pass gene names that match no perturbation (e.g. ``""``) to exclude nothing.
    """
    from scipy.spatial.distance import cdist

    perts = np.asarray(perts, dtype=str)
    genes = np.asarray(genes, dtype=str)
    n = perts.size
    out = np.empty(n, dtype=np.float64)
    for i, p in enumerate(perts):
        keep = np.flatnonzero(genes != p)
        R = np.ascontiguousarray(delta_real[:, keep])
        q = np.ascontiguousarray(delta_pred[i, keep].reshape(1, -1))
        if R.dtype != q.dtype:
            R, q = R.astype(np.float64), q.astype(np.float64)
        if metric == "l1":
            dist = cdist(R, q, "cityblock").ravel()
        else:
            from celltwin.eval._full import cosine, euclidean

            dist = (euclidean(R, q) if metric == "l2" else cosine(R, q)).ravel()
        rank = int(np.flatnonzero(np.argsort(dist) == i)[0])
        out[i] = 1 - rank / n
    return out


def rank_significant(
    targets: np.ndarray, features: np.ndarray, lfc: np.ndarray, fdr: np.ndarray, perts: Sequence[str]
) -> dict[str, np.ndarray]:
    """Significant genes of each perturbation, ordered as the DES metric ranks them.

    Inputs are the DE table's columns in row order. ``fdr`` and ``lfc`` are cast to float32 first;
    a gene is significant when ``fdr32 < 0.05``; the order is ``|lfc32|`` descending with NaN first,
    then +inf, then finite values, ties by row order (a stable sort). Returns ``{pert: features}``,
    an empty array for a perturbation without significant genes.
    """
    codes = category_codes(targets, perts)
    fdr32 = np.asarray(fdr, dtype=np.float64).astype(np.float32)
    sig = (fdr32 < FDR_THRESHOLD) & (codes >= 0)
    rows_sig = np.flatnonzero(sig)
    c_sig = codes[rows_sig]
    a_sig = np.abs(np.asarray(lfc, dtype=np.float64)[rows_sig].astype(np.float32))
    f_sig = take_strings(features, rows_sig)
    order_t = np.argsort(c_sig, kind="stable")  # group by perturbation, row order kept
    bounds = np.searchsorted(c_sig[order_t], np.arange(len(perts) + 1))
    out: dict[str, np.ndarray] = {}
    for i, p in enumerate(perts):
        rows = order_t[bounds[i] : bounds[i + 1]]
        a = a_sig[rows]
        nan = np.isnan(a)
        key = np.where(nan, 0.0, -a.astype(np.float64))
        order = np.lexsort((key, ~nan))  # NaN first, then -|lfc| ascending (+inf first), stable
        out[str(p)] = f_sig[rows[order]]
    return out


def category_codes(values, categories: Sequence[str]) -> np.ndarray:
    """Index of each value in ``categories`` (``-1`` when absent), compared as strings (vectorised)."""
    import pandas as pd

    cat = _as_categorical(values)
    if cat is not None:  # map the categories once, then index by code (no per-row string work)
        where = pd.Index([str(c) for c in categories]).get_indexer([str(c) for c in cat.categories])
        return np.append(where, -1).astype(np.int64)[cat.codes]  # code -1 (missing) -> -1
    vals = np.asarray(values)
    if vals.dtype.kind not in "OU":
        vals = vals.astype(str)
    return pd.Categorical(vals, categories=[str(c) for c in categories]).codes.astype(np.int64)


def _as_categorical(values):
    """The pandas Categorical behind ``values`` (a Categorical or a categorical Series), else None."""
    import pandas as pd

    arr = values.array if isinstance(values, pd.Series) else values
    return arr if isinstance(arr, pd.Categorical) else None


def take_strings(values, rows: np.ndarray) -> np.ndarray:
    """``values[rows]`` as a numpy str array; categoricals are gathered through their codes."""
    cat = _as_categorical(values)
    if cat is not None:
        names = np.asarray([str(c) for c in cat.categories], dtype=str)
        return names[np.asarray(cat.codes)[rows]]
    return np.asarray(values)[rows].astype(str)


def overlap_k(
    real_ranked: dict, pred_ranked: dict, perts: Sequence[str], k: int | None, metric: str
) -> np.ndarray:
    """``overlap_at_k`` / ``precision_at_k`` (cell-eval ``compute_overlap``).

    ``overlap``: ``n = min(k or |real|, |real|)``; ``precision``: ``n = min(k or |pred|, |pred|)``;
    score ``|real[:n] & pred[:n]| / n`` on the ranked significant lists (0 when ``n == 0``, and 0
    everywhere when one side has no significant gene at all).
    """
    out = np.zeros(len(perts), dtype=np.float64)
    if not (any(v.size for v in real_ranked.values()) and any(v.size for v in pred_ranked.values())):
        return out
    for i, p in enumerate(perts):
        real, pred = real_ranked[str(p)], pred_ranked[str(p)]
        base = real.size if metric == "overlap" else pred.size
        n = min(k if k else base, base)
        if n:
            out[i] = np.intersect1d(real[:n], pred[:n]).size / n
    return out


def _nearest_quantile(sorted_vals: np.ndarray, q: float) -> float:
    n = sorted_vals.size
    if n == 0:
        return float("nan")
    idx = int(np.floor((n - 1) * q + 0.5))
    return float(sorted_vals[min(idx, n - 1)])


def describe(values: np.ndarray, null: np.ndarray | None = None) -> list[float]:
    """polars ``describe`` statistics of one metric column (see module docstring), as 9 floats.

    ``values`` is ``(P,)`` float64; ``null`` marks missing entries (``None`` = none missing).
    """
    values = np.asarray(values, dtype=np.float64)
    null = np.zeros(values.shape, dtype=bool) if null is None else np.asarray(null, dtype=bool)
    v = values[~null]
    n = v.size
    notnan = v[~np.isnan(v)]
    mean = float(np.mean(v)) if n else float("nan")
    std = float(np.std(v, ddof=1)) if n > 1 else float("nan")
    vmin = float(np.min(notnan)) if notnan.size else float("nan")
    vmax = float(np.max(notnan)) if notnan.size else float("nan")
    sorted_vals = np.sort(v)  # NaN sorts last in numpy, as in polars
    return [
        float(n),
        float(null.sum()),
        mean,
        std,
        vmin,
        _nearest_quantile(sorted_vals, 0.25),
        _nearest_quantile(sorted_vals, 0.5),
        _nearest_quantile(sorted_vals, 0.75),
        vmax,
    ]
