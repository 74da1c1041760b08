"""Mann-Whitney U of perturbations against the control on gathered gene blocks (pdex 0.3.0 /
numba_mwu 0.2.0, bit for bit).

Input is a gene block of :mod:`celltwin.eval._gather` (non-zero values per (gene, group), zeros
implicit). Exactness: rank sums are sums of multiples of 1/2 and tie terms sums of integers
``t**3 - t``; every partial sum stays far below 2**53 for any realistic cell count (n < 10**5), so
they are exact in float64 whatever the summation order. The final U / z / p arithmetic
(:func:`mwu_pvalue`) repeats numba_mwu's expression sequence literally, so p-values agree to the
last bit.
"""

from __future__ import annotations

import math

import numba as nb
import numpy as np

from celltwin.eval._numba_cache import guard_numba_cache

__all__ = ["distinct_runs", "mwu_block", "mwu_pvalue"]


@nb.njit(cache=True)
def mwu_pvalue(r1, n1, n2, tie_term):
    """Two-sided asymptotic Mann-Whitney U with tie and continuity correction.

    ``r1`` is the rank sum of sample 1 (size ``n1``) in the pooled ranking (average ranks for
    ties), ``tie_term`` the pooled ``sum(t**3 - t)``. Returns ``(U1, p)`` with
    ``U1 = r1 - n1 (n1 + 1) / 2``, ``z = (max(U1, U2) - n1 n2 / 2 - 1/2) / sigma``,
    ``sigma**2 = n1 n2 / 12 * ((n + 1) - tie_term / (n (n - 1)))`` and ``p = 2 Phi(-z)``
    (``Phi(x) = erfc(-x / sqrt 2) / 2``) clipped to [0, 1]; ``p = 1`` when ``sigma**2 <= 0``
    (every pooled value equal). The operation sequence is numba_mwu 0.2.0's, so results are
    bit-identical.
    """
    n = n1 + n2
    u1 = r1 - n1 * (n1 + 1.0) / 2.0
    u2 = n1 * n2 - u1
    u = max(u1, u2)
    mu = n1 * n2 / 2.0
    denom = n * (n - 1.0)
    var_inner = (n + 1.0) - tie_term / denom
    s_sq = n1 * n2 / 12.0 * var_inner
    if s_sq <= 0.0:
        return u1, 1.0
    s = math.sqrt(s_sq)
    numerator = u - mu
    numerator -= 0.5
    z = numerator / s
    x = -z
    p = 0.5 * math.erfc(-x / math.sqrt(2.0))
    p = p * 2.0
    if p > 1.0:
        p = 1.0
    if p < 0.0:
        p = 0.0
    return u1, p


@nb.njit(cache=True)
def distinct_runs(sorted_vals, n_zeros, out_v, out_c):
    """Run-length encode the ascending ``sorted_vals``, inserting ``n_zeros`` zeros in order
    (with ``n_zeros > 0`` the values must be non-zero; with ``n_zeros == 0`` any values).

    Writes distinct values / counts into ``out_v`` / ``out_c``; returns how many.
    """
    m = sorted_vals.shape[0]
    nd = 0
    zero_done = n_zeros == 0
    i = 0
    while i < m or not zero_done:
        if not zero_done and (i >= m or sorted_vals[i] > 0):
            out_v[nd] = 0.0
            out_c[nd] = n_zeros
            nd += 1
            zero_done = True
            continue
        v = sorted_vals[i]
        j = i + 1
        while j < m and sorted_vals[j] == v:
            j += 1
        out_v[nd] = v
        out_c[nd] = j - i
        nd += 1
        i = j
    return nd


@nb.njit(cache=True)
def _bucket(dx, scale, top):
    """``min(floor(dx * scale), top)`` for ``dx >= 0``, never out of ``[0, top]``.

    Monotone in ``dx`` (IEEE multiplication and floor are), which is all the bucket index needs.
    A product that is not ``< top`` (including NaN and inf, whose ``int()`` is undefined in LLVM
    and INT64_MIN on x86) maps to ``top``.
    """
    y = dx * scale
    if not y < top:
        return top
    if y <= 0.0:
        return 0
    return int(y)


@nb.njit(cache=True)
def _bucket_index(cv, nd_c):
    """Bucket table over the sorted distinct control values for O(1) expected look-ups.

    Bucket of ``x`` is ``floor((x - cv[0]) * scale)`` (monotone in ``x`` even with rounding);
    ``first[b]`` is the first index whose bucket is ``>= b``, so every earlier value is
    strictly smaller than any ``x`` of bucket ``b``.
    """
    nbk = nd_c + 1
    first = np.full(nbk + 1, nd_c, dtype=np.int64)
    scale = 0.0
    if nd_c > 1 and cv[nd_c - 1] > cv[0]:
        scale = (nbk - 1) / (cv[nd_c - 1] - cv[0])
        if not scale < np.inf:
            # a subnormal spread overflows the scale; (x - cv[0]) * inf would be NaN for
            # x == cv[0] and int(NaN) is INT64_MIN, which indexed one slot past ``first``
            # (a heap overwrite). One bucket for all values is always correct, just slower.
            scale = 0.0
    for a in range(nd_c - 1, -1, -1):
        first[_bucket(cv[a] - cv[0], scale, nbk - 1)] = a
    for b in range(nbk - 1, -1, -1):
        if first[b + 1] < first[b]:
            first[b] = first[b + 1]
    return first, scale


@nb.njit(cache=True)
def _locate(v, cv, nd_c, first, scale):
    """First index ``a`` with ``cv[a] >= v`` (``nd_c`` if none), via the bucket index."""
    if v <= cv[0]:
        return 0
    if v > cv[nd_c - 1]:
        return nd_c
    a = first[_bucket(v - cv[0], scale, nd_c)]
    while cv[a] < v:  # terminates: v <= cv[nd_c - 1]
        a += 1
    return a


@nb.njit(cache=True, parallel=True)
def mwu_block(seg_ptr, vals, group_sizes, ctrl, tests, n_groups, out_u, out_p, g0):
    """Test every group in ``tests`` against group ``ctrl`` for each gene of the block.

    Per gene the control values are sorted once (O(n_c log n_c)), run-length encoded with
    the cumulative count ``L_c`` of smaller control values, and given a bucket index. A test
    group then needs no sort: since a sample's average ranks among itself always sum to
    ``n_t (n_t + 1) / 2``, its pooled rank sum is

        R1 = n_t (n_t + 1) / 2 + sum over its values x of (L_c(x) + E_c(x) / 2)

    with ``E_c(x)`` the number of controls equal to ``x`` (each value located in O(1)
    expected through the bucket index; the test's zeros are one look-up). The pooled tie
    term is the control's ``sum(t**3 - t)`` corrected for every pooled run the test touches:
    test values equal to a control value are counted per control run ``a`` (``h_a``) and
    contribute ``f(cc_a + h_a) - f(cc_a)`` with ``f(t) = t**3 - t``; test-only values are
    grouped by exact value in a small hash table keyed by their insertion point and
    contribute ``f(count)``. Everything is a sum of halves or integers, hence exact.

    Writes ``out_u[i, g0 + j]`` / ``out_p[i, g0 + j]`` for test ``i`` and local gene ``j``.
    """
    nb_genes = (seg_ptr.shape[0] - 1) // n_groups
    n_c = group_sizes[ctrl]
    for j in nb.prange(nb_genes):
        s = j * n_groups + ctrl
        m_c = seg_ptr[s + 1] - seg_ptr[s]
        cvals = np.empty(m_c, dtype=np.float64)
        for q in range(m_c):
            cvals[q] = vals[seg_ptr[s] + q]
        cvals.sort()
        nz_c = n_c - m_c
        cv = np.empty(m_c + 1, dtype=np.float64)
        cc = np.empty(m_c + 1, dtype=np.int64)
        nd_c = distinct_runs(cvals, nz_c, cv, cc)
        cless = np.empty(nd_c + 1, dtype=np.int64)
        tie_c = 0.0
        acc = 0
        for d in range(nd_c):
            cless[d] = acc
            acc += cc[d]
            t = float(cc[d])
            tie_c += t * t * t - t
        cless[nd_c] = acc
        first, scale = _bucket_index(cv, nd_c)
        a0 = _locate(0.0, cv, nd_c, first, scale)
        zero_eq = 0
        if a0 < nd_c and cv[a0] == 0.0:
            zero_eq = cc[a0]
        m_max = 1
        for i in range(tests.shape[0]):
            st = j * n_groups + tests[i]
            m_max = max(m_max, seg_ptr[st + 1] - seg_ptr[st] + 1)
        cap = 16
        while cap < 2 * m_max:
            cap <<= 1
        mask = cap - 1
        hval = np.empty(cap, dtype=np.float64)
        hcnt = np.zeros(cap, dtype=np.int64)
        hused = np.empty(m_max, dtype=np.int64)
        hits = np.zeros(nd_c, dtype=np.int64)
        touched = np.empty(m_max, dtype=np.int64)
        for i in range(tests.shape[0]):
            grp = tests[i]
            n_t = group_sizes[grp]
            st = j * n_groups + grp
            m_t = seg_ptr[st + 1] - seg_ptr[st]
            nz_t = n_t - m_t
            r1 = n_t * (n_t + 1.0) / 2.0
            n_used = 0
            n_touch = 0
            for q in range(m_t + 1):
                if q < m_t:
                    v = np.float64(vals[seg_ptr[st] + q])
                    cnt = 1
                    a = _locate(v, cv, nd_c, first, scale)
                    eq = 0
                    if a < nd_c and cv[a] == v:
                        eq = cc[a]
                else:
                    if nz_t == 0:
                        break
                    v = 0.0
                    cnt = nz_t
                    a = a0
                    eq = zero_eq
                r1 += cnt * (cless[a] + eq / 2.0)
                if eq > 0:
                    if hits[a] == 0:
                        touched[n_touch] = a
                        n_touch += 1
                    hits[a] += cnt
                else:
                    slot = a & mask
                    while True:
                        if hcnt[slot] == 0:
                            hval[slot] = v
                            hcnt[slot] = cnt
                            hused[n_used] = slot
                            n_used += 1
                            break
                        if hval[slot] == v:
                            hcnt[slot] += cnt
                            break
                        slot = (slot + 1) & mask
            tie = tie_c
            for u in range(n_touch):
                a = touched[u]
                tot = float(cc[a] + hits[a])
                ce = float(cc[a])
                tie += (tot * tot * tot - tot) - (ce * ce * ce - ce)
                hits[a] = 0
            for u in range(n_used):
                slot = hused[u]
                t = float(hcnt[slot])
                tie += t * t * t - t
                hcnt[slot] = 0
            u1, p = mwu_pvalue(r1, n_t, n_c, tie)
            out_u[i, g0 + j] = u1
            out_p[i, g0 + j] = p


_GUARDED = guard_numba_cache(globals())
