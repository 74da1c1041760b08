"""numba kernels of the fast model-space read: raw CSR rows -> dense normalised float32 rows.

:func:`csr_to_model_dense` is bitwise the slower scipy path of
:meth:`celltwin.data.preprocess.Preprocessing.transform` (tested):

* totals: float64 sums of each row's stored values in storage order (scipy's ``sum(axis=1)``
  of a CSR matrix adds them in the same order);
* scaling: ``float32(float64(x) * (T / total))`` (0 for a zero-total row), rounded once;
* log1p: numpy's own float32 ``log1p`` over the scaled values (not numba's, whose libm call can
  differ from numpy's SIMD kernels by an ulp);
* the gene subset and the requested row order (duplicates allowed) in one scatter pass into a
  zeroed output, so there is no intermediate CSR, no column fancy-indexing and no ``toarray``.

Compiled on first use without an on-disk cache (no cache files shared between processes).
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["csr_to_model_dense"]


@njit(cache=False, nogil=True)
def _row_totals(indptr, data):  # pragma: no cover - compiled
    n = indptr.shape[0] - 1
    out = np.zeros(n, dtype=np.float64)
    for i in range(n):
        s = 0.0
        for k in range(indptr[i], indptr[i + 1]):
            s += np.float64(data[k])
        out[i] = s
    return out


@njit(cache=False, nogil=True)
def _scaled(indptr, data, scale):  # pragma: no cover - compiled
    out = np.empty(data.shape[0], dtype=np.float32)
    for i in range(indptr.shape[0] - 1):
        f = scale[i]
        for k in range(indptr[i], indptr[i + 1]):
            out[k] = np.float32(np.float64(data[k]) * f)
    return out


@njit(cache=False, nogil=True)
def _scatter(out, inverse, indptr, indices, vals, colmap):  # pragma: no cover - compiled
    ncol = colmap.shape[0]
    for p in range(inverse.shape[0]):
        u = inverse[p]
        for k in range(indptr[u], indptr[u + 1]):
            j = indices[k]
            if j < 0 or j >= ncol:
                raise IndexError("CSR column index out of range")
            c = colmap[j]
            if c >= 0:
                out[p, c] = vals[k]


def csr_to_model_dense(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, inverse: np.ndarray,
                       colmap: np.ndarray, n_out: int, target_sum: float | None, log1p: bool) -> np.ndarray:
    """Dense float32 ``(inverse.size, n_out)``: row ``p`` is stored row ``inverse[p]`` in model space.

    ``data/indices/indptr``: the raw stored rows (all genes of the file); ``colmap[j]``: output
    column of file column ``j`` (-1 = not a model gene).
    """
    indptr = np.asarray(indptr, dtype=np.int64)
    if target_sum is not None:
        tot = _row_totals(indptr, data)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(tot > 0, float(target_sum) / tot, 0.0)
        vals = _scaled(indptr, data, scale)
    else:
        vals = np.asarray(data, dtype=np.float32)
        if log1p:
            vals = vals.copy()
    if log1p:
        np.log1p(vals, out=vals)
    out = np.zeros((inverse.size, n_out), dtype=np.float32)
    _scatter(out, np.asarray(inverse, dtype=np.int64), indptr, indices, vals, np.asarray(colmap, dtype=np.int64))
    return out
