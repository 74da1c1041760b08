"""The ``mode="v2"`` DE engine (cell-eval 0.8.2 -> pdex 0.3.0): statistics as arrays, and the
pdex-shaped table. The test, means, fold changes and FDR are described in
:func:`celltwin.eval._de.de_table`."""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin.eval._bh import bh_rows
from celltwin.eval._de_layout import iter_blocks, name_column, row_layout
from celltwin.eval._means import expm1_rows, lfc_pc_rows, means_block
from celltwin.eval._mwu import mwu_block

__all__ = ["DE_COLUMNS", "concat_v2_arrays", "de_v2_arrays", "de_v2_frame"]

#: Columns of a ``mode="v2"`` table, in order (pdex 0.3.0 ``mode="ref"`` output).
DE_COLUMNS = (
    "target",
    "feature",
    "target_mean",
    "ref_mean",
    "target_membership",
    "ref_membership",
    "log2_fold_change",
    "percent_change",
    "p_value",
    "statistic",
    "fdr",
)


def de_v2_arrays(
    X: np.ndarray | sp.csr_matrix, codes: np.ndarray, ctrl_code: int, test_codes: list[int]
) -> dict[str, np.ndarray]:
    """The v2 statistics of ``test_codes`` against ``ctrl_code`` as ``(K, G)`` / ``(G,)`` arrays.

    Every value of a test row depends only on that group's cells and the control cells, so the
    arrays of several calls over disjoint sets of tests (each with the same control cells)
    concatenate to the arrays of one call over all of them (the streamed evaluator relies on it).
    """
    n_genes = X.shape[1]
    use = [*test_codes, ctrl_code]  # local group ids: tests 0..K-1, control K
    k = len(test_codes)
    row_order, row_group, group_ptr, sizes = row_layout(codes, use)
    dtype = X.dtype
    inv_sizes = np.asarray([dtype.type(1.0 / n) for n in sizes], dtype=dtype)
    pre = np.zeros((k + 1, n_genes), dtype=dtype)
    stat = np.empty((k, n_genes), dtype=np.float64)
    pval = np.empty((k, n_genes), dtype=np.float64)
    tests = np.arange(k, dtype=np.int64)
    scaled = bool(sp.issparse(X))
    for g0, _g1, seg_ptr, vals in iter_blocks(X, row_order, row_group, group_ptr):
        means_block(seg_ptr, vals, sizes, inv_sizes, k + 1, scaled, pre, g0)
        if k:
            mwu_block(seg_ptr, vals, sizes, k, tests, k + 1, stat, pval, g0)
    means = expm1_rows(pre)
    target_mean = means[:k]
    ref_mean = means[k]
    lfc, pc = lfc_pc_rows(target_mean, ref_mean, 0.0)
    fdr = bh_rows(pval) if k else np.empty((0, n_genes))
    return {
        "target_mean": target_mean,
        "ref_mean": ref_mean,
        "sizes": sizes,
        "log2_fold_change": lfc,
        "percent_change": pc,
        "p_value": pval,
        "statistic": stat,
        "fdr": fdr,
    }


def concat_v2_arrays(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join :func:`de_v2_arrays` results of disjoint test sets (same controls) in the given order."""
    if len(parts) == 1:
        return parts[0]
    out = {name: np.concatenate([p[name] for p in parts]) for name in parts[0] if name not in ("ref_mean", "sizes")}
    out["ref_mean"] = parts[0]["ref_mean"]
    out["sizes"] = np.concatenate([p["sizes"][:-1] for p in parts] + [parts[0]["sizes"][-1:]])
    return out


def de_v2_frame(arrays: dict[str, np.ndarray], target_names: list[str], genes: np.ndarray) -> pd.DataFrame:
    """The pdex-shaped table (:data:`DE_COLUMNS`) of :func:`de_v2_arrays` output."""
    n_genes = genes.shape[0]
    k = len(target_names)
    sizes = arrays["sizes"]
    n = k * n_genes
    return pd.DataFrame(
        {
            "target": name_column(target_names, np.repeat(np.arange(k), n_genes)),
            "feature": name_column(genes, np.tile(np.arange(n_genes), k)),
            "target_mean": arrays["target_mean"].reshape(n),
            "ref_mean": np.tile(arrays["ref_mean"], k),
            "target_membership": np.repeat(sizes[:k], n_genes).astype(np.int64),
            "ref_membership": np.full(n, sizes[k], dtype=np.int64),
            "log2_fold_change": arrays["log2_fold_change"].reshape(n),
            "percent_change": arrays["percent_change"].reshape(n),
            "p_value": arrays["p_value"].reshape(n),
            "statistic": arrays["statistic"].reshape(n),
            "fdr": arrays["fdr"].reshape(n),
        },
        columns=list(DE_COLUMNS),
        copy=False,  # fresh arrays: no 2-D consolidation copy of ~7 x 904k floats
    )
