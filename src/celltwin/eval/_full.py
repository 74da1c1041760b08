"""The metrics of cell-eval 0.8.2's ``full`` profile beyond the ``vcc`` three and their relatives
(array kernels; errors, PDS and DE overlaps are in :mod:`celltwin.eval._metrics`).

Conventions shared by every function here (cell-eval semantics):

* DE tables are reduced to ``(P, G)`` float32 matrices ``lfc`` and ``fdr`` (rows: perturbations in
  sorted order; columns: genes) -- cell-eval casts both columns to float32 before any use;
  ``sig = fdr < 0.05``.
* A *null* result (a metric without a value for a perturbation, e.g. a direction match when the
  real side has no significant gene) is kept apart from NaN: ``results.csv`` writes null as an
  empty field and NaN as ``NaN``, and ``describe`` counts them differently. Functions return
  ``(values, null_mask)``.
* Spearman correlations follow polars ``corr(method="spearman")``: average ranks (NaN ranked above
  +inf), then the Pearson correlation of the ranks; fewer than 2 points or a constant side gives NaN.
* Distances use the same arithmetic as scikit-learn's ``pairwise_distances`` for dense inputs:
  L2 via ``sqrt(max(|x|^2 - 2 x.y + |y|^2, 0))`` (float32 inputs upcast to float64 in sklearn's
  chunks, the result rounded to float32 before the square root), cosine via row-normalised dot
  products (norms below ``10 * eps`` replaced by 1), ``1 - s`` clipped to ``[0, 2]``.

Per-metric rules are in each docstring.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

__all__ = [
    "KS",
    "auc_metrics",
    "average_precision",
    "clustering_agreement",
    "cosine",
    "de_direction_match",
    "de_matrices",
    "de_sig_genes_recall",
    "de_spearman_lfc_sig",
    "de_spearman_sig",
    "edistance_pearson",
    "euclidean",
    "pearson_delta",
    "roc_auc",
    "spearman",
]

KS: tuple[int | None, ...] = (None, 50, 100, 200, 500)


def de_matrices(
    table, perts: Sequence[str], genes: Sequence[str], lfc: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(lfc32, fdr32)`` as ``(P, G)`` float32 matrices from a DE table (missing rows: NaN lfc, fdr 1).

    ``lfc`` is the table's fold-change column to place (log2 fold change, or the fold change itself).
    """
    from celltwin.eval._metrics import category_codes

    perts = np.asarray(perts, dtype=str)
    genes = np.asarray(genes, dtype=str)
    rows = category_codes(table["target"], perts)
    cols = category_codes(table["feature"], genes)
    ok = (rows >= 0) & (cols >= 0)
    fdr = np.ones((perts.size, genes.size), dtype=np.float32)
    vals = np.asarray(lfc, dtype=np.float64)
    lfc_m = np.full((perts.size, genes.size), np.nan, dtype=np.float32)
    lfc_m[rows[ok], cols[ok]] = vals[ok].astype(np.float32)
    fdr[rows[ok], cols[ok]] = np.asarray(table["fdr"], dtype=np.float64)[ok].astype(np.float32)
    return lfc_m, fdr


def _avg_rank(x: np.ndarray) -> np.ndarray:
    """Average ranks (1-based), NaN treated as the largest value and equal to each other."""
    x = np.asarray(x, dtype=np.float64)
    order = np.argsort(x, kind="stable")  # NaN last
    xs = x[order]
    same = (xs[1:] == xs[:-1]) | (np.isnan(xs[1:]) & np.isnan(xs[:-1]))
    starts = np.flatnonzero(np.r_[True, ~same])
    ends = np.r_[starts[1:], xs.size]
    ranks = np.empty(x.size, dtype=np.float64)
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    return ranks


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """polars-style Spearman correlation (see module docstring)."""
    if len(x) < 2:
        return float("nan")
    rx, ry = _avg_rank(x), _avg_rank(y)
    dx, dy = rx - rx.mean(), ry - ry.mean()
    den = math.sqrt(float(np.dot(dx, dx)) * float(np.dot(dy, dy)))
    return float(np.dot(dx, dy) / den) if den > 0 else float("nan")


def de_spearman_sig(sig_real: np.ndarray, sig_pred: np.ndarray) -> float:
    """Spearman of the number of significant genes, over perturbations with >= 1 real significant gene.

    1.0 when no perturbation has a real significant gene. One value broadcast to every row.
    """
    n_real, n_pred = sig_real.sum(1), sig_pred.sum(1)
    rows = n_real > 0
    if not rows.any():
        return 1.0
    return spearman(n_real[rows].astype(np.float64), n_pred[rows].astype(np.float64))


def de_direction_match(sig_real: np.ndarray, lfc_real: np.ndarray, lfc_pred: np.ndarray):
    """Fraction of real significant genes whose predicted lfc has the same sign (null: no real sig gene)."""
    P = sig_real.shape[0]
    vals = np.full(P, np.nan)
    null = ~sig_real.any(1)
    for i in np.flatnonzero(~null):
        a, b = np.sign(lfc_real[i, sig_real[i]]), np.sign(lfc_pred[i, sig_real[i]])
        vals[i] = float(np.mean((a == b) | (np.isnan(a) & np.isnan(b))))
    return vals, null


def de_spearman_lfc_sig(sig_real: np.ndarray, lfc_real: np.ndarray, lfc_pred: np.ndarray):
    """Spearman of real vs predicted lfc over the real significant genes (null: none; NaN: fewer than 2)."""
    P = sig_real.shape[0]
    vals = np.full(P, np.nan)
    null = ~sig_real.any(1)
    for i in np.flatnonzero(~null):
        m = sig_real[i]
        vals[i] = spearman(lfc_real[i, m].astype(np.float64), lfc_pred[i, m].astype(np.float64))
    return vals, null


def de_sig_genes_recall(sig_real: np.ndarray, sig_pred: np.ndarray):
    """``|real sig & pred sig| / |real sig|`` (null: no real significant gene)."""
    n_real = sig_real.sum(1)
    null = n_real == 0
    with np.errstate(invalid="ignore", divide="ignore"):
        vals = (sig_real & sig_pred).sum(1) / n_real
    return np.where(null, np.nan, vals), null


def _clf_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(-scores.astype(np.float64), kind="stable")
    s, y = scores[order], labels[order].astype(np.float64)
    idx = np.r_[np.flatnonzero(np.diff(s)), y.size - 1]
    tps = np.cumsum(y)[idx]
    fps = 1 + idx.astype(np.float64) - tps
    return fps, tps


def average_precision(labels: np.ndarray, scores: np.ndarray) -> float:
    """sklearn ``average_precision_score`` (step integral of the precision-recall curve)."""
    fps, tps = _clf_curve(labels, scores)
    ps = tps + fps
    precision = np.where(ps != 0, tps / np.where(ps != 0, ps, 1), 0.0)
    recall = tps / tps[-1]
    precision = np.r_[precision[::-1], 1.0]
    recall = np.r_[recall[::-1], 0.0]
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float:
    """sklearn ``auc(*roc_curve(...)[:2])`` with ``drop_intermediate=True``."""
    fps, tps = _clf_curve(labels, scores)
    if fps.size > 2:
        keep = np.flatnonzero(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])
        fps, tps = fps[keep], tps[keep]
    fps, tps = np.r_[0.0, fps], np.r_[0.0, tps]
    fpr, tpr = fps / fps[-1], tps / tps[-1]
    return float(np.trapezoid(tpr, fpr))


def auc_metrics(
    sig_real: np.ndarray, fdr_pred: np.ndarray, legacy: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """``pr_auc`` and ``roc_auc`` per perturbation: labels = real significance of every gene, scores =
    ``-log10(clip(fdr_pred32, 1e-10, 1))`` in float32 (``legacy``: only ``fdr == 0`` becomes ``1e-10``).
    NaN when the labels are all 0 or all 1."""
    P = sig_real.shape[0]
    pr, roc = np.full(P, np.nan), np.full(P, np.nan)
    lo, hi = np.float32(1e-10), np.float32(1.0)
    for i in range(P):
        labels = sig_real[i]
        if not (0 < labels.sum() < labels.size):
            continue
        q = fdr_pred[i].astype(np.float32)
        q = np.where(q == 0, lo, q) if legacy else np.clip(q, lo, hi)
        scores = -np.log10(q)
        pr[i] = average_precision(labels, scores)
        roc[i] = roc_auc(labels, scores)
    return pr, roc


def pearson_delta(delta_pred: np.ndarray, delta_real: np.ndarray) -> np.ndarray:
    """Per-row ``scipy.stats.pearsonr(pred, real)`` of the deltas (NaN for a constant row)."""
    import warnings

    from scipy.stats import pearsonr

    out = np.empty(delta_pred.shape[0])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i in range(out.size):
            out[i] = float(pearsonr(delta_pred[i], delta_real[i])[0])
    return out


def _row_norms_sq(X: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", X, X)


def euclidean(X: np.ndarray, Y: np.ndarray | None = None) -> np.ndarray:
    """sklearn ``euclidean_distances(X, Y)`` for dense inputs (``Y=None``: ``X`` with itself, zero diagonal)."""
    same = Y is None
    Y = X if same else Y
    if X.dtype == np.float32 or Y.dtype == np.float32:
        n_x, n_y, n_f = X.shape[0], Y.shape[0], X.shape[1]
        maxmem = max(((n_x + n_y) * n_f + n_x * n_y) / 10, 10 * 2**17)
        tmp = 2 * n_f
        batch = max(int((-tmp + math.sqrt(tmp**2 + 4 * maxmem)) / 2), 1)
        D = np.empty((n_x, n_y), dtype=np.float32)
        xs = _batches(n_x, batch)
        for i, xsl in enumerate(xs):
            Xc = X[xsl].astype(np.float64)
            XXc = _row_norms_sq(Xc)[:, None]
            for j, ysl in enumerate(_batches(n_y, batch)):
                if same and j < i:
                    d = D[ysl, xsl].T
                else:
                    Yc = Y[ysl].astype(np.float64)
                    YYc = _row_norms_sq(Yc)[None, :]
                    d = -2 * (Xc @ Yc.T)
                    d += XXc
                    d += YYc
                D[xsl, ysl] = d.astype(np.float32, copy=False)
    else:
        XX = _row_norms_sq(X)[:, None]
        YY = XX.T if same else _row_norms_sq(Y)[None, :]
        D = -2 * (X @ Y.T)
        D += XX
        D += YY
    np.maximum(D, 0, out=D)
    if same:
        np.fill_diagonal(D, 0)
    np.sqrt(D, out=D)
    return D


def _batches(n: int, size: int) -> list[slice]:
    out, start = [], 0
    for _ in range(n // size):
        out.append(slice(start, start + size))
        start += size
    if start < n:
        out.append(slice(start, n))
    return out


def cosine(X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """sklearn ``cosine_distances(X, Y)`` for dense inputs (see the module docstring)."""
    def _norm(A):
        A = A.copy()
        n = np.sqrt(_row_norms_sq(A))
        n[n < 10 * np.finfo(n.dtype).eps] = 1.0
        A /= n[:, None]
        return A

    S = _norm(X) @ _norm(Y).T
    S *= -1
    S += 1
    return np.clip(S, 0.0, 2.0)


def _dense(M) -> np.ndarray:
    return np.ascontiguousarray(M.toarray() if hasattr(M, "toarray") else M)


def edistance_pearson(real, pred, perts: Sequence[str], control: str) -> float:
    """``pearson_edistance``: Pearson r between the real and predicted energy distances to control.

    For each side and perturbation: ``2 mean(d(x, c)) - mean(d(x, x')) - mean(d(c, c'))`` with the
    Euclidean distances above over single cells (``x``: the perturbation's cells, ``c``: the
    file's control cells), each mean taken over the float32/float64 distance matrix. Quadratic in
    the number of control cells: meant for small and medium files.
    """
    from scipy.stats import pearsonr

    out = []
    for side in (real, pred):
        ctrl = _dense(side.X[np.flatnonzero(side.labels == control)])
        sig_c = euclidean(ctrl).mean()
        d = np.zeros(len(perts))
        for i, p in enumerate(perts):
            x = _dense(side.X[np.flatnonzero(side.labels == p)])
            sx = euclidean(x).mean()
            dl = euclidean(x, ctrl).mean()
            d[i] = 2 * dl - sx - sig_c
        out.append(d)
    return float(pearsonr(out[0], out[1]).correlation)


#: Leiden resolutions of cell-eval's ``ClusteringAgreement`` defaults (real side: 1.0; predicted: swept).
CLUSTER_REAL_RESOLUTION = 1.0
CLUSTER_PRED_RESOLUTIONS = (0.2, 0.4, 0.6, 0.8, 1.0, 1.5, 2.0)
CLUSTER_NEIGHBORS = 15


def _centroids(side, control: str) -> tuple[np.ndarray, np.ndarray]:
    """``(labels, centroids)`` of every non-control label: labels in ``np.unique`` (sorted) order,
    each centroid the float64 mean of the label's cells (rows densified per label, never the whole
    matrix; the same reduction as numpy on the densified rows)."""
    names = np.unique(side.labels)
    names = names[names != control]
    C = np.zeros((names.size, side.X.shape[1]), dtype=np.float64)
    for i, name in enumerate(names):
        rows = _dense(side.X[np.flatnonzero(side.labels == name)])
        C[i] = rows.astype(np.float64).mean(axis=0)
    return names, C


def _leiden_labels(C: np.ndarray, resolutions: Sequence[float], n_neighbors: int) -> list[np.ndarray]:
    """scanpy ``pp.neighbors(use_rep="X", n_neighbors=min(k, n - 1))`` once, then ``tl.leiden``
    (``flavor="igraph"``, ``n_iterations=2``, scanpy's default ``random_state=0``) per resolution."""
    import anndata as ad
    import scanpy as sc

    a = ad.AnnData(X=C)
    sc.pp.neighbors(a, n_neighbors=min(n_neighbors, a.n_obs - 1), use_rep="X")
    out = []
    for res in resolutions:
        sc.tl.leiden(a, resolution=res, key_added="_leiden", flavor="igraph", n_iterations=2)
        out.append(a.obs["_leiden"].to_numpy().copy())
    return out


def clustering_agreement(real, pred, control: str) -> float:
    """``clustering_agreement``: do the predicted perturbation centroids cluster like the real ones?

    cell-eval 0.8.2 semantics (``ClusteringAgreement`` defaults): per side, the float64 centroid of
    each non-control perturbation (in the file's normalised space); the real centroids are
    clustered once with Leiden at resolution 1.0, the predicted ones at each of
    :data:`CLUSTER_PRED_RESOLUTIONS`, on scanpy's kNN graph of the centroids (15 neighbours, or
    ``n - 1``); the score is the best adjusted mutual information (scikit-learn, perturbations
    aligned by name) over the predicted resolutions, floored at 0. One value for the whole file
    (repeated on every perturbation row, as cell-eval does). The clustering is delegated to scanpy
    + python-igraph (the optional ``cluster`` extra), so the numbers are those of the same
    scanpy / igraph versions (without them :func:`celltwin.eval.evaluate` leaves the column out
    with a warning; calling this function directly raises a ConfigError naming the extra).
    """
    try:
        import igraph  # noqa: F401
        import scanpy  # noqa: F401
        from sklearn.metrics import adjusted_mutual_info_score
    except ImportError as e:
        from celltwin.errors import ConfigError

        msg = (f"metric clustering_agreement needs scanpy and python-igraph ({e.name} is missing): "
               "pip install 'celltwin[cluster]', or use a profile without it")
        raise ConfigError(msg) from None
    import pandas as pd

    names_r, C_r = _centroids(real, control)
    names_p, C_p = _centroids(pred, control)
    order = sorted(names_r.tolist())
    (lab_r,) = _leiden_labels(C_r, (CLUSTER_REAL_RESOLUTION,), CLUSTER_NEIGHBORS)
    lab_r = pd.Categorical(pd.Series(lab_r, index=names_r).loc[order])
    best = 0.0
    for lab_p in _leiden_labels(C_p, CLUSTER_PRED_RESOLUTIONS, CLUSTER_NEIGHBORS):
        lab = pd.Categorical(pd.Series(lab_p, index=names_p).loc[order])
        best = max(best, adjusted_mutual_info_score(lab_r, lab))
    return float(best)
