"""Cell and gene layout shared by the two DE engines of :func:`celltwin.eval._de.de_table`: the used
rows ordered by group, the gene blocks gathered from them, and the name columns of the table."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin.eval._gather import csr_block, dense_block

__all__ = ["BLOCK_BYTES", "iter_blocks", "name_column", "row_layout"]

BLOCK_BYTES = 64 << 20  # target size of one gene block's gathered values


def name_column(names: Sequence[object], idx: np.ndarray) -> pd.Categorical | np.ndarray:
    """``names[idx]`` as a pandas Categorical (categories in ``names`` order), or as an object
    array when ``names`` repeat. A table holds each perturbation and gene name a few hundred
    thousand times; a Categorical stores them once plus integer codes, which is what makes
    building, caching and writing a 904,000-row table cheap. Values compare, print and
    export (CSV, parquet) exactly as the strings do."""
    arr = np.asarray([str(v) for v in names], dtype=object)
    if pd.Index(arr).is_unique:
        return pd.Categorical.from_codes(idx.astype(np.int32, copy=False), categories=pd.Index(arr, dtype=object))
    return arr[idx]


def row_layout(codes: np.ndarray, use: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the groups in ``use`` ordered by position in ``use`` then by row.

    Returns ``row_order`` (int64), ``row_group`` (local group per row), ``group_ptr``
    and ``group_sizes`` (int64, one per local group).
    """
    local = np.full(int(codes.max(initial=-1)) + 2, -1, dtype=np.int64)
    local[np.asarray(use, dtype=np.int64)] = np.arange(len(use))
    lc = local[codes]  # codes == -1 -> local[-1] == -1 (the sentinel slot)
    rows = np.flatnonzero(lc >= 0)
    order = np.argsort(lc[rows], kind="stable")
    row_order = rows[order].astype(np.int64)
    row_group = lc[row_order]
    sizes = np.bincount(row_group, minlength=len(use)).astype(np.int64)
    group_ptr = np.zeros(len(use) + 1, dtype=np.int64)
    np.cumsum(sizes, out=group_ptr[1:])
    return row_order, row_group, group_ptr, sizes


def _block_size(X: np.ndarray | sp.csr_matrix, n_rows_used: int) -> int:
    n_genes = X.shape[1]
    if sp.issparse(X):
        per_gene = max(1.0, X.nnz / max(1, n_genes) * (n_rows_used / max(1, X.shape[0])))
    else:
        per_gene = float(max(1, n_rows_used))
    b = int(BLOCK_BYTES / (per_gene * X.dtype.itemsize))
    return max(8, min(n_genes, b, 4096))


def iter_blocks(X: np.ndarray | sp.csr_matrix, row_order: np.ndarray, row_group: np.ndarray,
                group_ptr: np.ndarray):
    """Yield ``(g0, g1, seg_ptr, vals)`` gene blocks (see :mod:`celltwin.eval._gather`)."""
    n_genes = X.shape[1]
    n_groups = group_ptr.shape[0] - 1
    bs = _block_size(X, row_order.shape[0])
    import numba

    n_chunks = max(1, min(numba.get_num_threads(), row_order.shape[0]))
    if sp.issparse(X):
        indptr = X.indptr.astype(np.int64, copy=False)
        cursor = indptr[row_order].copy()
        for g0 in range(0, n_genes, bs):
            g1 = min(n_genes, g0 + bs)
            seg_ptr, vals = csr_block(
                indptr, X.indices, X.data, row_order, row_group, cursor, g0, g1, n_groups, n_chunks
            )
            yield g0, g1, seg_ptr, vals
    else:
        for g0 in range(0, n_genes, bs):
            g1 = min(n_genes, g0 + bs)
            seg_ptr, vals = dense_block(X, row_order, row_group, g0, g1, n_groups, n_chunks)
            yield g0, g1, seg_ptr, vals
