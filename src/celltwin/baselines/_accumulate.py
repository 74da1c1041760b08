"""numba kernels: add rows of a block to per-group float64 sums, one row after another.

Sequential row order is the point: the sums are then bitwise those of an in-memory pass in the
same order, whatever the block boundaries. Compiled on first use without an on-disk cache (a
fraction of a second; no shared cache files between processes).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["add_csr_rows", "add_dense_rows"]


@njit(cache=False, nogil=True)
def add_csr_rows(sums: np.ndarray, codes: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
                 data: np.ndarray) -> None:  # pragma: no cover - compiled
    G = sums.shape[1]
    for i in range(codes.shape[0]):
        g = codes[i]
        if g < 0:
            continue
        for k in range(indptr[i], indptr[i + 1]):
            j = indices[k]
            if j < 0 or j >= G:
                raise IndexError("column index out of range")
            sums[g, j] += data[k]


@njit(cache=False, nogil=True)
def add_dense_rows(sums: np.ndarray, codes: np.ndarray, X: np.ndarray) -> None:  # pragma: no cover
    for i in range(codes.shape[0]):
        g = codes[i]
        if g < 0:
            continue
        for j in range(X.shape[1]):
            sums[g, j] += X[i, j]
