"""Numba kernels behind :func:`celltwin.eval._de.de_table`.

Everything here works on plain arrays. The layout shared by the kernels is a *gene block*:
for genes ``g0 <= g < g1`` and the ``NG`` cell groups (perturbations and the control, in the
caller's group order) the non-zero values of every ``(gene, group)`` pair are stored
contiguously in ``vals[seg_ptr[s]:seg_ptr[s + 1]]`` with ``s = (g - g0) * NG + group``,
in ascending row (cell) order. Zeros (implicit, explicitly stored, or ``-0.0``) are never
stored: a group's zero count is its size minus its stored values. Values keep the input
dtype (float32 or float64); ranks only need order and equality, which both preserve.

Exactness notes (why results equal pdex 0.3.0 / numba_mwu bit for bit):

* Rank sums are sums of multiples of 1/2 and tie terms sums of integers ``t**3 - t``; every
  partial sum stays far below 2**53 for any realistic cell count (n < 10**5), so they are
  exact in float64 whatever the summation order. The final U / z / p arithmetic repeats
  numba_mwu's expression sequence literally, so p-values agree to the last bit.
* Means repeat numpy/scipy's accumulation: sequential row-order sums in the input dtype
  (numpy ``mean(axis=0)`` of a C-contiguous block; scipy CSR ``mean(axis=0)`` which scales
  each value by ``dtype(1/n)`` before summing).
* ``expm1`` / ``log2`` are evaluated inside numba exactly as pdex evaluates them, because
  numba's float32 ``expm1`` differs from numpy's in the last ulp.
"""

from __future__ import annotations

import functools
import math
import pickle

import numba as nb
import numpy as np

__all__ = [
    "bh_flat",
    "bh_rows",
    "csr_block",
    "csr_dense_block",
    "dense_block",
    "expm1_rows",
    "legacy_block",
    "lfc_pc_rows",
    "means_block",
    "mwu_block",
    "mwu_pvalue",
    "pairwise_sum",
    "pairwise_sum_sparse",
]


# --------------------------------------------------------------------------------------------
# Block extraction
# --------------------------------------------------------------------------------------------


@nb.njit(cache=True, parallel=True)
def csr_block(indptr, indices, data, row_order, row_group, cursor, g0, g1, n_groups, n_chunks):
    """Gather the non-zero values of genes ``[g0, g1)`` from a CSR matrix, grouped.

    ``row_order`` lists the rows to use, sorted by group and ascending within a group;
    ``row_group[k]`` is the group of ``row_order[k]``. ``cursor[k]`` is the first CSR
    position of row ``row_order[k]`` not yet consumed (column indices must be sorted
    within each row); it is advanced past ``g1`` on return so consecutive blocks cost
    O(rows + nnz in block). Entries left of ``g0`` and stored zeros are skipped. The rows
    are split into ``n_chunks`` consecutive chunks processed in parallel (count, then fill);
    chunk ``c``'s values precede chunk ``c + 1``'s inside every segment, so segments stay in
    row order.

    Returns ``seg_ptr`` (int64, ``(g1 - g0) * n_groups + 1``) and ``vals`` (input dtype).
    """
    nb_genes = g1 - g0
    n_seg = nb_genes * n_groups
    n_rows = row_order.shape[0]
    counts = np.zeros((n_chunks, n_seg), dtype=np.int64)
    for c in nb.prange(n_chunks):
        k0 = c * n_rows // n_chunks
        k1 = (c + 1) * n_rows // n_chunks
        for k in range(k0, k1):
            r = row_order[k]
            grp = row_group[k]
            end = indptr[r + 1]
            p = cursor[k]
            while p < end and indices[p] < g1:
                if indices[p] >= g0 and data[p] != 0:
                    counts[c, (indices[p] - g0) * n_groups + grp] += 1
                p += 1
    seg_ptr = np.empty(n_seg + 1, dtype=np.int64)
    starts = np.empty((n_chunks, n_seg), dtype=np.int64)
    run = 0
    for sg in range(n_seg):
        seg_ptr[sg] = run
        for c in range(n_chunks):
            starts[c, sg] = run
            run += counts[c, sg]
    seg_ptr[n_seg] = run
    vals = np.empty(run, dtype=data.dtype)
    for c in nb.prange(n_chunks):
        k0 = c * n_rows // n_chunks
        k1 = (c + 1) * n_rows // n_chunks
        fill = starts[c]
        for k in range(k0, k1):
            r = row_order[k]
            grp = row_group[k]
            end = indptr[r + 1]
            p = cursor[k]
            while p < end and indices[p] < g1:
                v = data[p]
                if indices[p] >= g0 and v != 0:
                    sg = (indices[p] - g0) * n_groups + grp
                    vals[fill[sg]] = v
                    fill[sg] += 1
                p += 1
            cursor[k] = p
    return seg_ptr, vals


@nb.njit(cache=True, parallel=True)
def dense_block(X, row_order, row_group, g0, g1, n_groups, n_chunks):
    """Dense counterpart of :func:`csr_block` (``X`` is a C-contiguous 2-D array).

    Rows are read as contiguous ``X[r, g0:g1]`` slices, split into ``n_chunks`` consecutive
    chunks processed in parallel (count, then fill), so segments stay in row order.
    """
    nb_genes = g1 - g0
    n_seg = nb_genes * n_groups
    n_rows = row_order.shape[0]
    counts = np.zeros((n_chunks, n_seg), dtype=np.int64)
    for c in nb.prange(n_chunks):
        k0 = c * n_rows // n_chunks
        k1 = (c + 1) * n_rows // n_chunks
        for k in range(k0, k1):
            r = row_order[k]
            grp = row_group[k]
            for j in range(nb_genes):
                if X[r, g0 + j] != 0:
                    counts[c, j * n_groups + grp] += 1
    seg_ptr = np.empty(n_seg + 1, dtype=np.int64)
    starts = np.empty((n_chunks, n_seg), dtype=np.int64)
    run = 0
    for sg in range(n_seg):
        seg_ptr[sg] = run
        for c in range(n_chunks):
            starts[c, sg] = run
            run += counts[c, sg]
    seg_ptr[n_seg] = run
    vals = np.empty(run, dtype=X.dtype)
    for c in nb.prange(n_chunks):
        k0 = c * n_rows // n_chunks
        k1 = (c + 1) * n_rows // n_chunks
        fill = starts[c]
        for k in range(k0, k1):
            r = row_order[k]
            grp = row_group[k]
            for j in range(nb_genes):
                v = X[r, g0 + j]
                if v != 0:
                    sg = j * n_groups + grp
                    vals[fill[sg]] = v
                    fill[sg] += 1
    return seg_ptr, vals


# --------------------------------------------------------------------------------------------
# Mann-Whitney U
# --------------------------------------------------------------------------------------------


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
def _distinct(sorted_vals, n_zeros, out_v, out_c):
    """Run-length encode ascending non-zero values, inserting ``n_zeros`` zeros in order.

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
        nd_c = _distinct(cvals, nz_c, cv, cc)
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


# --------------------------------------------------------------------------------------------
# Means, fold changes, BH
# --------------------------------------------------------------------------------------------


@nb.njit(cache=True, parallel=True)
def means_block(seg_ptr, vals, group_sizes, inv_sizes, n_groups, scaled, out, g0):
    """Per-group arithmetic means of the block's genes, in the input dtype.

    ``out`` must be zero-initialised with the input dtype; ``inv_sizes[grp]`` is
    ``dtype(1.0 / n_grp)``. ``scaled=False`` (dense input): the sum is accumulated in row
    order in the input dtype, then ``dtype(float64(sum) / n)`` (numpy ``mean(axis=0)`` of a
    C-contiguous array). ``scaled=True`` (CSR input): ``sum(v * dtype(1 / n))`` accumulated
    in row order in the input dtype (scipy sparse ``mean(axis=0)``). Writes ``out[grp, g0 + j]``.
    """
    nb_genes = (seg_ptr.shape[0] - 1) // n_groups
    for j in nb.prange(nb_genes):
        for grp in range(n_groups):
            s = j * n_groups + grp
            acc = out[grp, g0 + j]
            if scaled:
                inv = inv_sizes[grp]
                for k in range(seg_ptr[s], seg_ptr[s + 1]):
                    acc += vals[k] * inv
                out[grp, g0 + j] = acc
            else:
                for k in range(seg_ptr[s], seg_ptr[s + 1]):
                    acc += vals[k]
                out[grp, g0 + j] = float(acc) / group_sizes[grp]


@nb.njit(cache=True)
def _expm1_2d(x):
    out = np.empty_like(x)
    for i in range(x.shape[0]):
        for j in range(x.shape[1]):
            out[i, j] = np.expm1(x[i, j])
    return out


def expm1_rows(pre: np.ndarray) -> np.ndarray:
    """``expm1`` of every entry of the 2-D ``pre`` in its dtype, evaluated by numba as pdex
    evaluates it (numba's float32 ``expm1`` can differ from numpy's in the last ulp)."""
    return _expm1_2d(np.ascontiguousarray(pre))


@nb.njit(cache=True, error_model="numpy")  # x / 0 -> inf / nan as in numpy, never raises
def _lfc_pc_2d(t, r, eps, lfc, pc):
    for i in range(t.shape[0]):
        for j in range(t.shape[1]):
            x = t[i, j] + eps
            y = r[j] + eps
            v = np.log2(x / y)
            lfc[i, j] = 0.0 if np.isnan(v) else v
            w = (t[i, j] - r[j]) / (r[j] + eps)
            pc[i, j] = 0.0 if np.isnan(w) else w


def lfc_pc_rows(target: np.ndarray, ref: np.ndarray, epsilon: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """``log2((t + eps) / (r + eps))`` and ``(t - r) / (r + eps)`` per row, float64, NaN -> 0.

    As in pdex, ``t + eps`` promotes float32 means to float64 before dividing. ``0 / 0``
    becomes 0; ``x / 0`` stays ``+inf`` (``log2(0 / x)`` stays ``-inf``).
    """
    lfc = np.empty(target.shape, dtype=np.float64)
    pc = np.empty(target.shape, dtype=np.float64)
    _lfc_pc_2d(np.ascontiguousarray(target), np.ascontiguousarray(ref), float(epsilon), lfc, pc)
    return lfc, pc


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


# --------------------------------------------------------------------------------------------
# Legacy mode (pdex 0.1.27 -> scipy.stats.mannwhitneyu, numpy pairwise sums)
# --------------------------------------------------------------------------------------------


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
def pairwise_sum_sparse(pos, val, e_lo, e_hi, lo, n, zero):
    """numpy's pairwise summation (see :func:`pairwise_sum`) of a length-``n`` vector starting
    at index ``lo`` that is zero except ``val[e]`` at ``pos[e]`` (``pos`` ascending,
    ``e_lo <= e < e_hi``, values non-negative).

    Adding an exact zero never changes a non-negative float sum, so sub-trees without
    entries cost nothing: O(entries * tree depth) instead of O(n). Iterative (explicit
    stack), because numba's on-disk cache mishandles recursive functions.
    """
    if n <= 128:
        return _pw_leaf_sparse(pos, val, e_lo, e_hi, lo, n, zero)
    st_lo = np.empty(128, dtype=np.int64)
    st_n = np.empty(128, dtype=np.int64)
    st_elo = np.empty(128, dtype=np.int64)
    st_ehi = np.empty(128, dtype=np.int64)
    st_state = np.empty(128, dtype=np.int64)
    vstack = np.empty(128, dtype=val.dtype)
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
        if cn <= 128 or ca >= cb:
            vstack[nv] = _pw_leaf_sparse(pos, val, ca, cb, cl, cn, zero)
            nv += 1
            top -= 1
            continue
        n2 = cn // 2
        n2 -= n2 % 8
        mid = cl + n2
        x = ca
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
    st_lo = np.empty(128, dtype=np.int64)
    st_n = np.empty(128, dtype=np.int64)
    st_state = np.empty(128, dtype=np.int64)
    vstack = np.empty(128, dtype=a.dtype)
    top = 0
    nv = 0
    st_lo[0] = lo
    st_n[0] = n
    st_state[0] = 0
    while top >= 0:
        cl = st_lo[top]
        cn = st_n[top]
        if cn <= 128:
            vstack[nv] = _pw_leaf(a, cl, cn, zero)
            nv += 1
            top -= 1
            continue
        n2 = cn // 2
        n2 -= n2 % 8
        state = st_state[top]
        if state == 0:
            st_state[top] = 1
            top += 1
            st_lo[top] = cl
            st_n[top] = n2
            st_state[top] = 0
        elif state == 1:
            st_state[top] = 2
            top += 1
            st_lo[top] = cl + n2
            st_n[top] = cn - n2
            st_state[top] = 0
        else:
            right = vstack[nv - 1]
            left = vstack[nv - 2]
            nv -= 2
            vstack[nv] = left + right
            nv += 1
            top -= 1
    return zero + vstack[0]


@nb.njit(cache=True)
def csr_dense_block(indptr, indices, data, row_order, cursor, g0, g1):
    """Rows ``row_order`` x genes ``[g0, g1)`` of a CSR matrix as a dense array (cursor as in
    :func:`csr_block`)."""
    n_rows = row_order.shape[0]
    out = np.zeros((n_rows, g1 - g0), dtype=data.dtype)
    for k in range(n_rows):
        r = row_order[k]
        end = indptr[r + 1]
        p = cursor[k]
        while p < end and indices[p] < g1:
            if indices[p] >= g0:
                out[k, indices[p] - g0] += data[p]
            p += 1
        cursor[k] = p
    return out


@nb.njit(cache=True, parallel=True)
def legacy_block(D, group_ptr, ctrl, n_tests, tie_table, out_sum, out_r1, out_tie, out_ties, g0):
    """Legacy per-(group, gene) sums and per-(test, gene) rank statistics of a dense block.

    ``D`` holds the used rows (grouped, ascending within a group) x block genes, in the input
    dtype. For every group: ``out_sum[grp, g0 + j]`` = numpy pairwise sum of the column (what
    ``np.mean`` divides). For every test group ``i < n_tests`` against ``ctrl``, emulating
    ``scipy.stats.mannwhitneyu`` on inputs of this dtype: ``out_r1`` = pairwise sum (in the
    dtype) of the test cells' average ranks in cell order, ``out_tie`` = pairwise sum of
    ``tie_table[t]`` (``t**3 - t`` as numpy computes it in the dtype) placed at each pooled
    tie group's first sorted position, ``out_ties`` = whether any pooled tie exists.
    """
    zero = tie_table[0]
    nb_genes = D.shape[1]
    n_groups = group_ptr.shape[0] - 1
    c0 = group_ptr[ctrl]
    n_c = group_ptr[ctrl + 1] - c0
    for j in nb.prange(nb_genes):
        col = np.empty(D.shape[0], dtype=D.dtype)
        for k in range(D.shape[0]):
            col[k] = D[k, j]
        for grp in range(n_groups):
            out_sum[grp, g0 + j] = pairwise_sum(col, group_ptr[grp], group_ptr[grp + 1] - group_ptr[grp], zero)
        cs = np.sort(col[c0 : c0 + n_c].astype(np.float64))
        cv = np.empty(n_c, dtype=np.float64)
        cc = np.empty(n_c, dtype=np.int64)
        nd_c = 0
        i = 0
        while i < n_c:
            k = i + 1
            while k < n_c and cs[k] == cs[i]:
                k += 1
            cv[nd_c] = cs[i]
            cc[nd_c] = k - i
            nd_c += 1
            i = k
        for t in range(n_tests):
            t0 = group_ptr[t]
            n_t = group_ptr[t + 1] - t0
            x = col[t0 : t0 + n_t].astype(np.float64)
            xs = np.sort(x)
            tv = np.empty(n_t, dtype=np.float64)
            tc = np.empty(n_t, dtype=np.int64)
            nd_t = 0
            i = 0
            while i < n_t:
                k = i + 1
                while k < n_t and xs[k] == xs[i]:
                    k += 1
                tv[nd_t] = xs[i]
                tc[nd_t] = k - i
                nd_t += 1
                i = k
            # merge the two run-length tables: pooled runs in sorted order
            pos = np.empty(nd_c + nd_t, dtype=np.int64)
            val = np.empty(nd_c + nd_t, dtype=tie_table.dtype)
            rank_t = np.empty(nd_t, dtype=np.float64)
            ne = 0
            a = 0
            b = 0
            start = 0
            any_tie = False
            while a < nd_c or b < nd_t:
                if b >= nd_t or (a < nd_c and cv[a] < tv[b]):
                    cnt = cc[a]
                    a += 1
                elif a >= nd_c or tv[b] < cv[a]:
                    cnt = tc[b]
                    rank_t[b] = start + (cnt + 1) / 2.0
                    b += 1
                else:
                    cnt = cc[a] + tc[b]
                    rank_t[b] = start + (cnt + 1) / 2.0
                    a += 1
                    b += 1
                pos[ne] = start
                val[ne] = tie_table[cnt]
                if cnt > 1:
                    any_tie = True
                ne += 1
                start += cnt
            out_tie[t, g0 + j] = pairwise_sum_sparse(pos, val, 0, ne, 0, n_t + n_c, zero)
            out_ties[t, g0 + j] = any_tie
            rk = np.empty(n_t, dtype=D.dtype)
            for q in range(n_t):
                lo_ = 0
                hi_ = nd_t
                while lo_ < hi_:
                    m = (lo_ + hi_) >> 1
                    if tv[m] < x[q]:
                        lo_ = m + 1
                    else:
                        hi_ = m
                rk[q] = rank_t[lo_]
            out_r1[t, g0 + j] = pairwise_sum(rk, 0, n_t, zero)


# --------------------------------------------------------------------------------------------
# On-disk compilation cache: safe under concurrent processes, verified on load
# --------------------------------------------------------------------------------------------
#
# Why (the segfault of issue 10). numba 0.68.1 keeps one index per function
# (``<func>-<line>.pyXY.nbi``: key -> data-file name) and one data file per compiled signature
# (``<func>-<line>.pyXY.<n>.nbc``, pickled machine code). ``IndexDataCacheFile.save`` is an
# unlocked read-modify-write: load the index, pick the first unused number, write the index,
# write the data. Each single file is replaced atomically, but the *pair* is not: two processes
# that save different signatures (float32 / float64, C / A layout, or two versions of this
# file while it is being edited) at the same moment both pick ``.1.nbc``; the index can end up
# naming process A's key while the data file holds process B's machine code. Nothing checks
# the loaded data against the key, and the dispatcher calls whatever entry point it got, with
# the caller's arrays. The boxing layer compares only the item size of each array, so a
# float64<->int64, float32<->int32 or 'C'<->'A' (e.g. a reversed view) mix-up, or code from
# another version of the file, runs on the wrong memory: out-of-bounds reads and writes, a
# segfault in every later process that loads that cache (deterministic until the cache is
# deleted). For a float32<->float64 mix-up the same corruption surfaces as "TypeError: can't
# unbox array". ``tests/eval/test_numba_cache.py`` forces that interleaving through numba's own
# ``save`` and shows the corrupted index, then checks the guard below repairs it.
#
# The guard (decided instead of a per-version cache directory, which would still be shared by
# concurrent processes of one version): every kernel's cache-file object is switched to
# :class:`_GuardedCacheFile`, which
#
# * takes an exclusive ``fcntl.flock`` on ``<cache dir>/celltwin-numba.lock`` around the whole
#   index-and-data update of ``save`` and a shared one around ``load`` (so readers never see a
#   half-updated pair); compilation itself is not serialised (concurrent cold processes may
#   compile the same kernel twice; the second save overwrites identical code);
# * stores each data file as ``(tag, numba, llvmlite, boundscheck, source stamp, key, payload)``
#   and, on load, ignores (and recompiles over) any entry whose header does not match this
#   process exactly: a foreign or pre-guard file, another signature, another source version,
#   another numba/llvmlite, or code compiled with a different ``NUMBA_BOUNDSCHECK`` (numba's own
#   key does not include that flag);
# * treats an unreadable (truncated) index as empty instead of raising.
#
# The cache location stays numba's choice (``NUMBA_CACHE_DIR`` if set, else ``__pycache__``
# next to this file, else a user-wide directory). Without ``fcntl`` (Windows) there is no lock
# and the header check alone keeps foreign code from running. If numba's cache classes ever
# change shape, the kernels fall back to no on-disk cache (compiled per process) rather than
# run unverified code.

_CACHE_TAG = "celltwin-numba-cache-1"
# what unpickling a damaged (truncated, garbled or foreign) file can raise
_UNPICKLE_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    ValueError,
    TypeError,
    AttributeError,
    ImportError,
    IndexError,
    KeyError,
)
_LOCK_NAME = "celltwin-numba.lock"


def _cache_header(stamp: object) -> tuple[object, ...]:
    import llvmlite

    return (_CACHE_TAG, nb.__version__, llvmlite.__version__, nb.config.BOUNDSCHECK, stamp)


def _flock(directory: str, exclusive: bool):
    """Context manager holding ``flock`` on ``directory/celltwin-numba.lock`` (no-op if impossible)."""
    import contextlib
    import os

    @contextlib.contextmanager
    def held():
        try:
            import fcntl
        except ImportError:  # pragma: no cover - Windows: header verification only
            yield
            return
        try:
            fd = os.open(os.path.join(directory, _LOCK_NAME), os.O_RDWR | os.O_CREAT, 0o666)
        except OSError:  # read-only or missing cache dir: header verification only
            yield
            return
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    return held()


@functools.cache
def _make_guarded_class():
    from numba.core import caching

    base = caching.IndexDataCacheFile
    needed = ("save", "load", "_load_index", "_save_data", "_load_data", "_cache_path", "_source_stamp")

    class _GuardedCacheFile(base):
        """numba's index/data cache file with a cross-process lock and a verified header.

        ``save``/``load`` know the key, ``_save_data``/``_load_data`` only the file name, so the
        key is parked on the object for the duration of the call (numba holds its global
        compiler lock around both, so no other thread of this process interleaves).
        """

        _pending_key = None

        def save(self, key, data):
            with _flock(self._cache_path, exclusive=True):
                self._pending_key = key
                try:
                    super().save(key, data)
                finally:
                    self._pending_key = None

        def load(self, key):
            import os

            if not os.path.isdir(self._cache_path):
                return None
            with _flock(self._cache_path, exclusive=False):
                self._pending_key = key
                try:
                    return super().load(key)
                finally:
                    self._pending_key = None

        def _save_data(self, name, data):
            super()._save_data(name, (*_cache_header(self._source_stamp), self._pending_key, data))

        def _load_data(self, name):
            try:
                tup = super()._load_data(name)
            except OSError:
                raise  # numba's load() treats a vanished file as a miss
            except _UNPICKLE_ERRORS:  # truncated / garbled pickle: recompile, save overwrites it
                return None
            expected = _cache_header(self._source_stamp)
            n = len(expected)
            if not (isinstance(tup, tuple) and len(tup) == n + 2 and tup[:n] == expected):
                return None  # foreign / stale / pre-guard entry: recompile, save overwrites it
            if tup[n] != self._pending_key:
                return None  # the index names a file holding another key's code
            return tup[n + 1]

        def _load_index(self):
            try:
                return super()._load_index()
            except _UNPICKLE_ERRORS:  # truncated or garbled index: start afresh
                return {}

    return base, needed, _GuardedCacheFile


def guard_numba_cache(namespace: dict) -> list[str]:
    """Switch every ``cache=True`` dispatcher in ``namespace`` to the guarded cache file.

    Returns the names guarded. A dispatcher whose cache object does not look like numba
    0.60-0.68's gets no on-disk cache at all (``NullCache``) instead of an unverified one.
    """
    from numba.core import caching
    from numba.core.registry import CPUDispatcher

    base, needed, guarded = _make_guarded_class()
    names = []
    for name, obj in namespace.items():
        if not isinstance(obj, CPUDispatcher):
            continue
        cache = getattr(obj, "_cache", None)
        cf = getattr(cache, "_cache_file", None)
        if cf is None:
            continue
        if type(cf) is guarded:
            names.append(name)
        elif type(cf) is base and all(hasattr(cf, a) for a in needed):
            cf.__class__ = guarded
            names.append(name)
        else:  # pragma: no cover - a numba whose cache internals differ
            obj._cache = caching.NullCache()
    return names


_GUARDED = guard_numba_cache(globals())
