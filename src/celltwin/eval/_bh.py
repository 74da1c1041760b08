"""Benjamini-Hochberg adjusted p-values (scipy ``false_discovery_control``), per row or flat."""

from __future__ import annotations

import numba as nb
import numpy as np

from celltwin.eval._numba_cache import guard_numba_cache

__all__ = ["bh_flat", "bh_rows"]


@nb.njit(cache=True)
def _argsort_nan_last(x):
    """Stable ascending argsort of a 1-D float array, NaN last (bottom-up merge sort).

    Why not ``np.argsort``: numba names the helpers of its sort implementations after the
    factory that builds them plus a per-process counter, so the argsort helper compiled in
    one process and the sort helper (``mwu_block``'s ``cvals.sort()``) compiled in another
    can carry the *same* symbol name; a process that loads both from the on-disk cache links
    one in place of the other (wrong p-values, or a segfault). Seen here with caches written
    by concurrent processes. A sort of our own has a name no other function shares.
    """
    n = x.shape[0]
    idx = np.arange(n)
    tmp = np.empty(n, dtype=np.int64)
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            mid = min(lo + width, n)
            hi = min(lo + 2 * width, n)
            i, j, k = lo, mid, lo
            while i < mid and j < hi:
                a, b = x[idx[i]], x[idx[j]]
                # take from the right only when strictly smaller (stable); NaN sorts last
                if (not np.isnan(b)) and (np.isnan(a) or b < a):
                    tmp[k] = idx[j]
                    j += 1
                else:
                    tmp[k] = idx[i]
                    i += 1
                k += 1
            while i < mid:
                tmp[k] = idx[i]
                i += 1
                k += 1
            while j < hi:
                tmp[k] = idx[j]
                j += 1
                k += 1
        idx, tmp = tmp, idx
        width *= 2
    return idx


@nb.njit(cache=True)
def bh_flat(p):
    """Benjamini-Hochberg adjusted p-values of a 1-D array (scipy ``false_discovery_control``).

    With ascending ``p_(1) <= ... <= p_(m)``: ``q_(k) = min_{j >= k} p_(j) * (m / j)``, clipped
    to [0, 1], returned in input order. Tied p-values get the same q whatever their order,
    so the result does not depend on the sort's tie order.
    """
    m = p.shape[0]
    out = np.empty(m, dtype=np.float64)
    if m == 0:
        return out
    order = _argsort_nan_last(p)
    run = np.inf
    for k in range(m - 1, -1, -1):
        q = p[order[k]] * (m / (k + 1.0))
        if q < run:
            run = q
        v = run
        if v > 1.0:
            v = 1.0
        if v < 0.0:
            v = 0.0
        out[order[k]] = v
    return out


@nb.njit(cache=True, parallel=True)
def bh_rows(p):
    """:func:`bh_flat` applied to each row of a 2-D array (one BH family per row)."""
    out = np.empty_like(p)
    for i in nb.prange(p.shape[0]):
        out[i] = bh_flat(p[i])
    return out


_GUARDED = guard_numba_cache(globals())
