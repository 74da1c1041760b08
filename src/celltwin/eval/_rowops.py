"""Small numba kernels over CSR rows used by the evaluator (no temporaries of size ``nnz``)."""

from __future__ import annotations

import numba
import numpy as np

__all__ = ["divide_rows", "group_sums_csr"]


@numba.njit(cache=True, nogil=True)
def divide_rows(indptr, data, factor):  # pragma: no cover - compiled
    """Divide the stored values of row ``i`` by ``factor[i]`` in place (same dtype, IEEE division)."""
    for i in range(indptr.size - 1):
        f = factor[i]
        for j in range(indptr[i], indptr[i + 1]):
            data[j] = data[j] / f


@numba.njit(cache=True, nogil=True)
def group_sums_csr(indptr, indices, data, codes, n_groups, n_genes):  # pragma: no cover - compiled
    """Per-group column sums of a CSR matrix, accumulated in float64 in row order.

    ``codes[i]`` is the group of row ``i`` (``-1`` skips the row). Returns ``(n_groups, n_genes)`` float64.
    """
    out = np.zeros((n_groups, n_genes), dtype=np.float64)
    for i in range(indptr.size - 1):
        g = codes[i]
        if g < 0:
            continue
        for j in range(indptr[i], indptr[i + 1]):
            out[g, indices[j]] += data[j]
    return out
