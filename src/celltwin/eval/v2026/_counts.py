"""The VCC 2026 input rule on a count matrix, and the per-cell / per-group sums every metric reads.

The rule (cell-eval2 0.20.0 ``--preset vcc2026``: ``input_type: counts``,
``allow_fractional_counts: false``, ``max_counts_per_cell: 1e6``; spec section 0 / 7): every value
non-negative, finite and integral, and no cell total above ``1e6`` (a total of exactly ``1e6`` is
allowed; cell-eval2 rejects ``total > max``). :func:`check_counts` refuses anything else with one
line naming the matrix, the rule broken and the first offending cell; it never normalises.

The totals are exact for counts: every value is an integer and every partial sum stays below
``2**53`` under the ``1e6`` cap, so any summation order gives the same float64. The order still
matters for fractional inputs (the mean-response baseline emits fractional values and is scored
without the integrality check), so :func:`group_sums` and :func:`cell_totals` accumulate exactly
where cell-eval2 does:

* group sums (cell-eval2 ``prep._grouped_sums``: ``X[rows].sum(axis=0)`` after widening to
  float64; scipy's ``ones @ X`` and numpy's axis-0 reduction both add the rows one after another
  in row order) - sequential float64 sums over the group's rows in input order;
* cell totals for the DE normalisation (scanpy 1.11 ``normalize_total``): a CSR row is summed
  entry by entry in stored order (its numba ``_normalize_csr`` loop); a dense row is summed by
  numpy's pairwise ``add.reduce`` over the float64 row (``np.sum(X, axis=1)``), reproduced by
  :func:`celltwin.eval._pairwise.pairwise_sum`.
"""

from __future__ import annotations

from typing import Any

import numba as nb
import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval._numba_cache import guard_numba_cache
from celltwin.eval._pairwise import pairwise_sum

__all__ = [
    "MAX_COUNTS_PER_CELL",
    "as_matrix",
    "cell_totals",
    "check_counts",
    "group_sums",
]

#: cell-eval2 ``max_counts_per_cell`` under ``vcc2026``: a cell total above this is refused.
MAX_COUNTS_PER_CELL = 1e6

# status codes of the scan kernels (first offence in row-major order wins)
_OK, _NEGATIVE, _NONFINITE, _FRACTIONAL, _TOTAL = 0, 1, 2, 3, 4


def as_matrix(X: Any, where: str) -> np.ndarray | sp.csr_matrix:
    """``X`` as a canonical CSR matrix (sorted, de-duplicated indices) or a C-contiguous 2-D array.

    A CSR matrix with duplicate or unsorted column indices is copied and canonicalised
    (``sum_duplicates``: duplicates are added first; cell-eval2 adds them inside its reductions,
    which agrees exactly for counts). Other sparse formats become CSR. Bool / integer / float16
    values stay as they are (every kernel reads them as float64).
    """
    if sp.issparse(X):
        if X.ndim != 2:
            msg = f"{where}: expected a 2-D (cells, genes) matrix, got shape {X.shape}"
            raise InputError(msg)
        X = X.tocsr() if X.format != "csr" else X
        if not isinstance(X, sp.csr_matrix):
            X = sp.csr_matrix(X)
        if X.dtype == np.float16:  # numba reads no float16; widening is exact
            X = X.astype(np.float32)
        if not X.has_canonical_format:
            X = X.copy()
            X.sum_duplicates()
        return X
    A = np.asarray(X)
    if A.ndim != 2:
        msg = f"{where}: expected a 2-D (cells, genes) matrix, got shape {A.shape}"
        raise InputError(msg)
    if A.dtype.kind not in "biuf":
        msg = f"{where}: expected a numeric count matrix, got dtype {A.dtype}"
        raise InputError(msg)
    if A.dtype == np.float16:
        A = A.astype(np.float32)
    return np.ascontiguousarray(A)


# --------------------------------------------------------------------------------------------
# the input rule
# --------------------------------------------------------------------------------------------


@nb.njit(cache=True)
def _classify(v, integral):
    if not np.isfinite(v):
        return _NONFINITE
    if v < 0:
        return _NEGATIVE
    if integral and v != np.floor(v):
        return _FRACTIONAL
    return _OK


@nb.njit(cache=True)
def _scan_csr(indptr, indices, data, integral, max_total):
    """First offence of a CSR matrix: ``(code, row, col, value)``; ``code`` 0 when clean."""
    n = indptr.shape[0] - 1
    for i in range(n):
        tot = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            v = np.float64(data[p])
            c = _classify(v, integral)
            if c != _OK:
                return c, i, indices[p], v
            tot += v
        if tot > max_total:
            return _TOTAL, i, -1, tot
    return _OK, -1, -1, 0.0


@nb.njit(cache=True)
def _scan_dense(X, integral, max_total):
    n, g = X.shape
    for i in range(n):
        tot = 0.0
        for j in range(g):
            v = np.float64(X[i, j])
            c = _classify(v, integral)
            if c != _OK:
                return c, i, j, v
            tot += v
        if tot > max_total:
            return _TOTAL, i, -1, tot
    return _OK, -1, -1, 0.0


def check_counts(
    X: Any,
    where: str,
    *,
    max_counts_per_cell: float = MAX_COUNTS_PER_CELL,
    integral: bool = True,
) -> None:
    """Refuse ``X`` unless it holds raw counts: non-negative, finite, integral values and no cell
    total above ``max_counts_per_cell`` (default ``1e6``; a total equal to it passes).

    ``X``: ``(cells, genes)`` CSR (any scipy sparse format) or dense, any numeric dtype.
    ``where`` names the matrix in the message (file, context). ``integral=False`` skips only the
    integrality rule (what cell-eval2's ``allow_fractional_counts`` does; the mean-response
    baseline is scored that way). Raises :class:`~celltwin.errors.InputError` with one line: the
    rule broken and the first offending cell (row-major order), e.g.
    ``"pred.h5ad: values must be integral counts; row 3, gene column 17 holds 0.5"``.
    Never modifies or normalises ``X``. Cost: one pass over the stored values.
    """
    A = as_matrix(X, where)
    if A.shape[0] == 0 or A.shape[1] == 0:
        return
    mx = float(max_counts_per_cell)
    if sp.issparse(A):
        if A.dtype.kind in "biu":
            if A.dtype.kind == "i" and A.nnz and A.data.min() < 0:
                p = int(np.flatnonzero(A.data < 0)[0])
                row = int(np.searchsorted(A.indptr, p, side="right") - 1)
                code, i, j, v = _NEGATIVE, row, int(A.indices[p]), float(A.data[p])
            else:
                tot = np.asarray(A.sum(axis=1, dtype=np.float64)).ravel()
                bad = np.flatnonzero(tot > mx)
                code, i, j, v = (_TOTAL, int(bad[0]), -1, float(tot[bad[0]])) if bad.size else (_OK, -1, -1, 0.0)
        else:
            code, i, j, v = _scan_csr(A.indptr, A.indices, A.data, bool(integral), mx)
    else:
        code, i, j, v = _scan_dense(A, bool(integral), mx)
    if code == _OK:
        return
    cell = f"row {i}, gene column {j}"
    if code == _NEGATIVE:
        msg = f"{where}: counts must be non-negative; {cell} holds {v!r}"
    elif code == _NONFINITE:
        msg = f"{where}: counts must be finite; {cell} holds {v!r}"
    elif code == _FRACTIONAL:
        msg = (
            f"{where}: values must be integral raw counts (not normalised or log-transformed); "
            f"{cell} holds {v!r}"
        )
    else:
        msg = (
            f"{where}: no cell may total more than {mx:g} counts (raw counts, not normalised); "
            f"row {i} totals {v:.6g}"
        )
    raise InputError(msg)


# --------------------------------------------------------------------------------------------
# sums
# --------------------------------------------------------------------------------------------


@nb.njit(cache=True, parallel=True)
def _group_sums_csr(indptr, indices, data, order, bounds, n_genes, out, status):
    """``out[grp, g]`` += every value of the group's rows, rows in ``order`` (ascending within a
    group), one thread per group so each sum runs in row order. ``status[grp]`` flags a negative
    (1) or non-finite (2) value."""
    n_groups = bounds.shape[0] - 1
    for grp in nb.prange(n_groups):
        for k in range(bounds[grp], bounds[grp + 1]):
            r = order[k]
            for p in range(indptr[r], indptr[r + 1]):
                v = np.float64(data[p])
                if not np.isfinite(v):
                    status[grp] = 2
                elif v < 0:
                    status[grp] = max(status[grp], 1)
                out[grp, indices[p]] += v


@nb.njit(cache=True, parallel=True)
def _group_sums_dense(X, order, bounds, out, status):
    n_groups = bounds.shape[0] - 1
    g = X.shape[1]
    for grp in nb.prange(n_groups):
        for k in range(bounds[grp], bounds[grp + 1]):
            r = order[k]
            for j in range(g):
                v = np.float64(X[r, j])
                if not np.isfinite(v):
                    status[grp] = 2
                elif v < 0:
                    status[grp] = max(status[grp], 1)
                out[grp, j] += v


def group_sums(X: np.ndarray | sp.csr_matrix, order: np.ndarray, bounds: np.ndarray, where: str) -> np.ndarray:
    """``(n_groups, genes)`` float64 sums of each group's rows (``order[bounds[k]:bounds[k+1]]``,
    ascending), accumulated in row order (cell-eval2 ``_grouped_sums``). Refuses negative or
    non-finite values (:class:`InputError`); integrality is :func:`check_counts`' business."""
    n_groups = bounds.shape[0] - 1
    out = np.zeros((n_groups, X.shape[1]), dtype=np.float64)
    status = np.zeros(n_groups, dtype=np.int64)
    order = np.ascontiguousarray(order, dtype=np.int64)
    bounds = np.ascontiguousarray(bounds, dtype=np.int64)
    if sp.issparse(X):
        _group_sums_csr(X.indptr, X.indices, X.data, order, bounds, X.shape[1], out, status)
    else:
        _group_sums_dense(X, order, bounds, out, status)
    if status.any():
        kind = "finite" if (status == 2).any() else "non-negative"
        msg = f"{where}: counts must be {kind}; found a value that is not"
        raise InputError(msg)
    return out


@nb.njit(cache=True, parallel=True)
def _totals_csr(indptr, data, out):
    for i in nb.prange(indptr.shape[0] - 1):
        s = 0.0
        for p in range(indptr[i], indptr[i + 1]):
            s += np.float64(data[p])
        out[i] = s


@nb.njit(cache=True, parallel=True)
def _totals_dense(X, out):
    g = X.shape[1]
    for i in nb.prange(X.shape[0]):
        row = np.empty(g, dtype=np.float64)
        for j in range(g):
            row[j] = np.float64(X[i, j])
        out[i] = pairwise_sum(row, 0, g, 0.0)


def cell_totals(X: np.ndarray | sp.csr_matrix) -> np.ndarray:
    """float64 total of every cell, summed as scanpy's ``normalize_total`` sums it (CSR: entry by
    entry in stored order; dense: numpy's pairwise sum of the float64 row)."""
    out = np.empty(X.shape[0], dtype=np.float64)
    if sp.issparse(X):
        _totals_csr(X.indptr, X.data, out)
    else:
        _totals_dense(X, out)
    return out


_GUARDED = guard_numba_cache(globals())
