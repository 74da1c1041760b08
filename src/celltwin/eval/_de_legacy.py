"""The ``mode="legacy"`` DE engine (cell-eval 0.6.6 -> pdex 0.1.27, the 2025 leaderboard scorer);
the statistics and their precision are described in :func:`celltwin.eval._de.de_table`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin.eval._de_layout import BLOCK_BYTES, name_column, row_layout
from celltwin.eval._gather import csr_dense_block
from celltwin.eval._mwu_legacy import legacy_block

__all__ = ["LEGACY_DE_COLUMNS", "de_legacy"]

#: Columns of a ``mode="legacy"`` table, in order (pdex 0.1.27 output).
LEGACY_DE_COLUMNS = (
    "target",
    "reference",
    "feature",
    "target_mean",
    "reference_mean",
    "percent_change",
    "fold_change",
    "p_value",
    "statistic",
    "fdr",
)


def _legacy_exact_pvalue(X, rows_t: np.ndarray, rows_c: np.ndarray, gene: int) -> tuple[float, float]:
    """scipy's own ``mannwhitneyu`` for the rare pairs its ``method="auto"`` makes exact."""
    from scipy import stats

    if sp.issparse(X):
        x = X[rows_t, gene].toarray().ravel()
        y = X[rows_c, gene].toarray().ravel()
    else:
        x = X[rows_t, gene]
        y = X[rows_c, gene]
    res = stats.mannwhitneyu(x, y, use_continuity=True)
    return res.statistic, res.pvalue


def de_legacy(
    X: np.ndarray | sp.csr_matrix,
    codes: np.ndarray,
    ctrl_code: int,
    test_codes: list[int],
    target_names: list[str],
    control: str,
    genes: np.ndarray,
) -> pd.DataFrame:
    from scipy import special, stats

    n_genes = X.shape[1]
    dtype = X.dtype
    use = [*test_codes, ctrl_code]
    k = len(test_codes)
    row_order, _row_group, group_ptr, sizes = row_layout(codes, use)
    n1s = [int(n) for n in sizes[:k]]
    n2 = int(sizes[k])
    ta = np.arange(max(n1s, default=0) + n2 + 1, dtype=dtype)
    tie_table = ta**3 - ta  # what scipy evaluates for its float tie counts, in X's dtype

    sums = np.zeros((k + 1, n_genes), dtype=dtype)
    r1 = np.zeros((k, n_genes), dtype=dtype)
    tie = np.zeros((k, n_genes), dtype=dtype)
    has_ties = np.zeros((k, n_genes), dtype=np.bool_)
    bs = max(8, min(n_genes, BLOCK_BYTES // max(1, row_order.size * dtype.itemsize)))
    if sp.issparse(X):
        indptr = X.indptr.astype(np.int64, copy=False)
        cursor = indptr[row_order].copy()
    for g0 in range(0, n_genes, bs):
        g1 = min(n_genes, g0 + bs)
        if sp.issparse(X):
            D = csr_dense_block(indptr, X.indices, X.data, row_order, cursor, g0, g1)
        else:
            D = np.ascontiguousarray(X[row_order, g0:g1])
        legacy_block(D, group_ptr, k, k, tie_table, sums, r1, tie, has_ties, g0)

    # np.mean of a float32/64 column: pairwise sum, then dtype(float64(sum) / n)
    pre = (sums.astype(np.float64) / sizes[:, None]).astype(dtype)
    means = np.expm1(pre)
    tm, rm = means[:k], means[k]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = tm / rm
        pc = ((tm - rm) / rm).astype(np.float64)
    fc = ratio.astype(np.float64)
    fc[np.broadcast_to(rm == 0, fc.shape)] = 20.0
    fc[tm == 0] = 1 / 20.0
    fc[(tm == 0) & (rm == 0)[None, :]] = 1.0
    pc[np.broadcast_to(rm == 0, pc.shape)] = np.nan

    stat = np.empty((k, n_genes), dtype=dtype)
    pval = np.empty((k, n_genes), dtype=dtype)
    for i, n1 in enumerate(n1s):
        # scipy.stats.mannwhitneyu's asymptotic branch, operation by operation, in X's dtype
        u1 = r1[i] - n1 * (n1 + 1) / 2
        u2 = n1 * n2 - u1
        u = np.maximum(u1, u2)
        mu = n1 * n2 / 2
        n = n1 + n2
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie[i] / (n * (n - 1))))
            numerator = u - mu
            numerator -= 0.5
            z = numerator / s
        p = special.ndtr(-z)
        p *= 2
        p = np.clip(p, 0.0, 1.0)
        stat[i] = u1
        pval[i] = p
        if not (n1 > 8 and n2 > 8):  # scipy's method="auto": exact when small and tie-free
            rows_t = row_order[group_ptr[i] : group_ptr[i + 1]]
            rows_c = row_order[group_ptr[k] : group_ptr[k + 1]]
            for g in np.flatnonzero(~has_ties[i]):
                stat[i, g], pval[i, g] = _legacy_exact_pvalue(X, rows_t, rows_c, int(g))
    pval[np.isnan(pval)] = 1.0
    flat_p = pval.reshape(-1)
    fdr = stats.false_discovery_control(flat_p, method="bh") if flat_p.size else flat_p.copy()

    n_rows = k * n_genes
    return pd.DataFrame(
        {
            "target": name_column(target_names, np.repeat(np.arange(k), n_genes)),
            "reference": name_column([control], np.zeros(n_rows, dtype=np.int64)),
            "feature": name_column(genes, np.tile(np.arange(n_genes), k)),
            "target_mean": tm.reshape(n_rows),
            "reference_mean": np.tile(rm, k),
            "percent_change": pc.reshape(n_rows),
            "fold_change": fc.reshape(n_rows),
            "p_value": flat_p,
            "statistic": stat.reshape(n_rows),
            "fdr": np.asarray(fdr).reshape(n_rows),
        },
        columns=list(LEGACY_DE_COLUMNS),
        copy=False,
    )
