"""numpy's pairwise summation replayed in numba (``numpy.add.reduce`` of a contiguous 1-D float
array, bit for bit), dense and for a vector that is zero except at a few positions. Used by the
legacy (pdex 0.1.27 / scipy ``mannwhitneyu``) engine and by the VCC 2026 cell totals.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from celltwin.eval._numba_cache import guard_numba_cache

__all__ = ["pairwise_sum", "pairwise_sum_sparse"]


@nb.njit(cache=True)
def _pw_leaf(a, lo, n, zero):
    if n < 8:
        res = zero
        for i in range(n):
            res += a[lo + i]
        return res
    r0 = a[lo]
    r1 = a[lo + 1]
    r2 = a[lo + 2]
    r3 = a[lo + 3]
    r4 = a[lo + 4]
    r5 = a[lo + 5]
    r6 = a[lo + 6]
    r7 = a[lo + 7]
    i = 8
    stop = n - (n % 8)
    while i < stop:
        r0 += a[lo + i]
        r1 += a[lo + i + 1]
        r2 += a[lo + i + 2]
        r3 += a[lo + i + 3]
        r4 += a[lo + i + 4]
        r5 += a[lo + i + 5]
        r6 += a[lo + i + 6]
        r7 += a[lo + i + 7]
        i += 8
    res = ((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 + r7))
    while i < n:
        res += a[lo + i]
        i += 1
    return res


@nb.njit(cache=True)
def _pw_leaf_sparse(pos, val, e_lo, e_hi, lo, n, zero):
    if e_lo >= e_hi:
        return zero
    if n < 8:
        res = zero
        for e in range(e_lo, e_hi):
            res += val[e]
        return res
    r = np.zeros(8, dtype=val.dtype)
    stop = lo + n - (n % 8)
    e = e_lo
    while e < e_hi and pos[e] < stop:
        r[(pos[e] - lo) % 8] += val[e]
        e += 1
    res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]))
    while e < e_hi:
        res += val[e]
        e += 1
    return res


@nb.njit(cache=True)
def _pw_tree(vals, pos, sparse, e_lo, e_hi, lo, n, zero):
    """Walk numpy's pairwise split tree of ``n`` values from index ``lo`` (``n > 128``) and return
    the root's sum, each node combined as ``left + right`` in the dtype of ``vals``.

    Dense (``sparse`` False): the leaves are :func:`_pw_leaf` of ``vals`` (``pos`` unused).
    Sparse: the vector is zero except ``vals[e]`` at ``pos[e]``; each node also carries its entry
    range ``[e_lo, e_hi)`` and a node without entries is a leaf (an exact zero) however long
    (see :func:`pairwise_sum_sparse`). Iterative (explicit stack), because numba's on-disk cache
    mishandles recursive functions.
    """
    st_lo = np.empty(128, dtype=np.int64)
    st_n = np.empty(128, dtype=np.int64)
    st_elo = np.empty(128, dtype=np.int64)
    st_ehi = np.empty(128, dtype=np.int64)
    st_state = np.empty(128, dtype=np.int64)
    vstack = np.empty(128, dtype=vals.dtype)
    top = 0
    nv = 0
    st_lo[0] = lo
    st_n[0] = n
    st_elo[0] = e_lo
    st_ehi[0] = e_hi
    st_state[0] = 0
    while top >= 0:
        cl = st_lo[top]
        cn = st_n[top]
        ca = st_elo[top]
        cb = st_ehi[top]
        if cn <= 128 or (sparse and ca >= cb):
            if sparse:
                vstack[nv] = _pw_leaf_sparse(pos, vals, ca, cb, cl, cn, zero)
            else:
                vstack[nv] = _pw_leaf(vals, cl, cn, zero)
            nv += 1
            top -= 1
            continue
        n2 = cn // 2
        n2 -= n2 % 8
        mid = cl + n2
        x = ca
        if sparse:  # first entry of the right half
            y = cb
            while x < y:
                m = (x + y) >> 1
                if pos[m] < mid:
                    x = m + 1
                else:
                    y = m
        state = st_state[top]
        if state == 0:
            st_state[top] = 1
            top += 1
            st_lo[top] = cl
            st_n[top] = n2
            st_elo[top] = ca
            st_ehi[top] = x
            st_state[top] = 0
        elif state == 1:
            st_state[top] = 2
            top += 1
            st_lo[top] = mid
            st_n[top] = cn - n2
            st_elo[top] = x
            st_ehi[top] = cb
            st_state[top] = 0
        else:
            right = vstack[nv - 1]
            left = vstack[nv - 2]
            nv -= 2
            vstack[nv] = left + right
            nv += 1
            top -= 1
    return vstack[0]


@nb.njit(cache=True)
def pairwise_sum_sparse(pos, val, e_lo, e_hi, lo, n, zero):
    """numpy's pairwise summation (see :func:`pairwise_sum`) of a length-``n`` vector starting
    at index ``lo`` that is zero except ``val[e]`` at ``pos[e]`` (``pos`` ascending,
    ``e_lo <= e < e_hi``, values non-negative).

    Adding an exact zero never changes a non-negative float sum, so sub-trees without
    entries cost nothing: O(entries * tree depth) instead of O(n).
    """
    if n <= 128:
        return _pw_leaf_sparse(pos, val, e_lo, e_hi, lo, n, zero)
    return _pw_tree(val, pos, True, e_lo, e_hi, lo, n, zero)


@nb.njit(cache=True)
def pairwise_sum(a, lo, n, zero):
    """numpy's pairwise summation of the contiguous ``a[lo:lo + n]`` in the dtype of ``zero``.

    Reproduces ``numpy.add.reduce`` of a contiguous 1-D float array bit for bit (starting
    from the identity 0): fewer than 8 values are added left to right; up to 128 values use
    8 interleaved partial sums combined as ``((r0 + r1) + (r2 + r3)) + ((r4 + r5) + (r6 +
    r7))`` followed by the ``n % 8`` leftovers; longer runs split at ``n2 = n // 2 - (n // 2)
    % 8`` and add the two halves' sums (left + right).
    """
    if n <= 128:
        return zero + _pw_leaf(a, lo, n, zero)
    return zero + _pw_tree(a, np.empty(0, dtype=np.int64), False, 0, 0, lo, n, zero)


_GUARDED = guard_numba_cache(globals())
