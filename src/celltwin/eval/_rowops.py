"""Small numba kernels over CSR rows used by the evaluator (no temporaries of size ``nnz``)."""

from __future__ import annotations

import numba
import numpy as np

from celltwin.eval._numba_cache import guard_numba_cache

__all__ = ["divide_rows", "group_sums_csr", "has_fraction", "scan_finite"]


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


@numba.njit(cache=True, nogil=True)
def scan_finite(vals):  # pragma: no cover - compiled
    """One pass over a 1-D float array: ``(n_nonfinite, first_nonfinite_index, min_of_finite)``.

    ``first_nonfinite_index`` is ``-1`` when every value is finite; the minimum is taken over the
    finite values in the array's dtype (``+inf`` when there is none). No temporaries.
    """
    n_bad = 0
    first = -1
    vmin = np.inf
    for i in range(vals.size):
        v = vals[i]
        if not np.isfinite(v):
            n_bad += 1
            if first < 0:
                first = i
        elif v < vmin:
            vmin = v
    return n_bad, first, vmin


@numba.njit(cache=True, nogil=True)
def has_fraction(vals, eps):  # pragma: no cover - compiled
    """Whether some value's fractional part ``v - trunc(v)`` exceeds ``eps`` (stops at the first).

    ``eps`` must carry the array's dtype so the comparison happens in that dtype, as numpy's
    ``np.modf(vals)[0] > eps`` does for a Python-float ``eps`` (NEP 50 weak scalar).
    """
    for i in range(vals.size):
        v = vals[i]
        if v - np.trunc(v) > eps:
            return True
    return False


# Same concurrency guard as the DE kernels (see celltwin/eval/_numba_cache.py):
# lock around numba's cache index/data update, and verify each loaded entry's header.
_GUARDED = guard_numba_cache(globals())
