"""The delete-one jackknife correction ``C`` of a group profile (cell-eval2
``moments.jackknife_correction``), the sampling correction of ``expr_mse_unbiased_capped_norm``
(:mod:`celltwin.eval.v2026._expr`); checked against cell-eval2 in ``tests/eval/test_v2026_metrics.py``.

The correction
    ``C`` is the delete-one jackknife of a group's profile (``moments.jackknife_correction``):
    ``(n-1)/n * sum_g sum_i (v_ig - vbar_g)^2`` with ``v_ig = log1p(5e4 (P_g - y_ig) / (S - l_i))``
    (a cell holding every count of its group contributes ``v = 0``), 0 for ``n < 2`` or an empty
    group, clamped at 0. It is computed here in O(stored values) rather than cell-eval2's
    O(cells x genes): a zero entry of cell ``i`` depends on the cell only through its share
    ``e_i = l_i / S`` of the group's counts, ``v - b = log(1 - e_i u_g) - log(1 - e_i)`` with
    ``u_g = S / (S + 5e4 P_g)``, so its sums over the cells are power sums of ``e_i - mean(e)``
    times per-gene Taylor coefficients about the mean share (truncated where the tail falls below
    1e-17 relative; the variance ignores the per-gene shift), and each stored value adds
    ``log1p(-5e4 y / (r_i + 5e4 P_g))`` on top. A group whose shares spread too widely for the
    series (``max|e_i - mean(e)| / (1 - mean(e)) > 0.25``) or too small for it to pay uses the
    direct formula. Both agree with cell-eval2 to ~1e-15 relative (its own rounding level), not
    bit for bit.
"""

from __future__ import annotations

import numba as nb
import numpy as np
import scipy.sparse as sp

from celltwin.eval._numba_cache import guard_numba_cache

__all__ = ["JACKKNIFE_SERIES_MAX_RATIO", "jackknife"]

#: The jackknife series (module docstring) converges like ``rho^k``, ``rho = max|e_i - ebar| / (1 - ebar)``;
#: a group with ``rho`` above this (or too few cells for the series to pay) uses the direct formula.
JACKKNIFE_SERIES_MAX_RATIO = 0.25
_SERIES_TOL = 1e-17
_SERIES_MAX_TERMS = 40

_JK_DIRECT_ROWS = 256  # rows per dense block of the direct formula
# Stored values per batch of the series form's per-value pass (a float64 buffer of 32 MB: a 400-cell
# group is one batch). Each batch costs two parallel launches; on a busy 2-core machine a launch
# waits for a descheduled worker, so small batches (64 Ki values, 3,600 launches per scoring) made
# the jackknife 10x slower under load than on an idle machine.
_JK_CHUNK = 1 << 22
# Row chunks with private accumulators in the per-value pass. A constant, not the thread count:
# the chunks fix the order of the float64 sums, so the score is the same bit for bit whatever
# NUMBA_NUM_THREADS is (a cached bundle built on 8 cores is reused on 2).
_JK_ACCUMULATORS = 8


def _jk_direct(X: sp.csr_matrix, rows: np.ndarray, Pg: np.ndarray, S: float, lib: np.ndarray, ts: float,
               s1: np.ndarray, s2: np.ndarray) -> None:
    """Direct ``v_ig - b_g`` over every (cell, gene) of one group (cell-eval2's ``_loo_bulk``:
    ``log1p(TS * (P - y) / r)``, ``v = 0`` where the rest ``r`` is empty), in dense row blocks."""
    b = np.log1p(ts * Pg / S)
    for k0 in range(0, rows.shape[0], _JK_DIRECT_ROWS):
        blk = rows[k0 : k0 + _JK_DIRECT_ROWS]
        Y = X[blk].toarray().astype(np.float64, copy=False)
        rem = S - lib[blk]
        ok = rem > 0
        V = np.log1p(ts * (Pg[None, :] - Y) / np.where(ok, rem, 1.0)[:, None])
        V[~ok] = 0.0
        V -= b[None, :]
        s1 += V.sum(axis=0)
        s2 += np.einsum("ij,ij->j", V, V)


@nb.njit(cache=True)
def _jk_plan(order, bounds, P, lib, max_ratio, tol, max_terms, force_direct, plan_S, plan_ebar, plan_terms):
    """Per group: ``S``, the mean share ``ebar`` and the series length (0: direct formula, -1:
    nothing to correct: fewer than 2 cells or no counts)."""
    n_groups = bounds.shape[0] - 1
    for grp in range(n_groups):
        b0 = bounds[grp]
        n = bounds[grp + 1] - b0
        plan_terms[grp] = -1
        if n < 2:
            continue
        S = 0.0
        for g in range(P.shape[1]):
            S += P[grp, g]
        if not S > 0:
            continue
        plan_S[grp] = S
        ebar = 0.0
        rmin = np.inf
        for k in range(n):
            li = lib[order[b0 + k]]
            ebar += li / S
            rmin = min(rmin, S - li)
        ebar /= n
        plan_ebar[grp] = ebar
        plan_terms[grp] = 0
        if force_direct or not rmin > 0 or not ebar < 1.0:
            continue
        tmax = 0.0
        for k in range(n):
            tmax = max(tmax, abs(lib[order[b0 + k]] / S - ebar))
        ratio = tmax / (1.0 - ebar)
        if ratio > max_ratio:
            continue
        lim = tol * (1.0 - ratio)
        pw = ratio
        n_terms = 1
        while pw > lim and n_terms < max_terms:
            pw *= ratio
            n_terms += 1
        # the series costs ~n_terms^2 per gene, the direct formula ~n log1p per gene
        if pw <= lim and n_terms * n_terms <= 16 * n:
            plan_terms[grp] = n_terms


@nb.njit(cache=True, parallel=True)
def _jk_coef(rows, Pg, S, lib, ts, ebar, n_terms, coef, s1, s2):
    """Series coefficients ``coef[g, k]`` and the zero-entry sums over all cells (see
    :func:`jackknife`): ``s1_g = sum_k c_gk T_(k+1)``, ``s2_g = sum_(k,m) c_gk c_gm T_(k+m+2)``."""
    K = n_terms
    T = np.zeros(2 * K + 1, dtype=np.float64)
    for k in range(rows.shape[0]):
        t = lib[rows[k]] / S - ebar
        pw = t
        for j in range(1, 2 * K + 1):
            T[j] += pw
            pw *= t
    A = 1.0 / (1.0 - ebar)
    apow = np.empty(K, dtype=np.float64)
    pw = 1.0
    for k in range(K):
        apow[k] = pw
        pw *= A
    for g in nb.prange(Pg.shape[0]):
        if Pg[g] == 0:
            s1[g] = 0.0
            s2[g] = 0.0
            continue
        a = ts * Pg[g]
        den = S + a
        u = S / den
        one_bu = 1.0 - ebar * u
        B = u / one_bu
        amb = (a / den) / ((1.0 - ebar) * one_bu)  # A - B, formed without cancellation
        geo = 0.0
        for k in range(K):
            geo = apow[k] + B * geo  # sum_(m<=k) A^m B^(k-m)
            coef[g, k] = amb * geo / (k + 1)
        t1 = 0.0
        t2 = 0.0
        for k in range(K):
            t1 += coef[g, k] * T[k + 1]
            inner = 0.0
            for m in range(K):
                inner += coef[g, m] * T[k + m + 2]
            t2 += coef[g, k] * inner
        s1[g] = t1
        s2[g] = t2


@nb.njit(cache=True, parallel=True)
def _jk_args(indptr, indices, data, rows, offs, tsP, S, lib, ts, arg):
    """For each stored value of the rows: ``arg = -TS y / (r_i + TS P_g)``; ``log1p(arg)`` is the
    value's own term ``z`` (0 for a stored zero)."""
    for k in nb.prange(rows.shape[0]):
        r_i = rows[k]
        rem = S - lib[r_i]
        o = offs[k] - indptr[r_i]
        for p in range(indptr[r_i], indptr[r_i + 1]):
            arg[o + p] = -ts * np.float64(data[p]) / (rem + tsP[indices[p]])


@nb.njit(cache=True, parallel=True)
def _jk_add(indptr, indices, rows, offs, z, lib, S, ebar, n_chunks, acc):
    """Per row chunk ``c`` (private accumulators ``acc[c]``, summed by the caller):
    ``acc[c, g, 0] += z``, ``acc[c, g, 1] += z^2`` and ``acc[c, g, 2 + k] += t_i^(k+1) z`` for
    each stored value (``t_i = l_i / S - ebar``); ``sum_k c_gk acc[., g, 2 + k]`` is then the cross
    term ``sum_i h_i z_i``."""
    K = acc.shape[2] - 2
    n_rows = rows.shape[0]
    for c in nb.prange(n_chunks):
        a = acc[c]
        tp = np.empty(K, dtype=np.float64)
        for k in range(c * n_rows // n_chunks, (c + 1) * n_rows // n_chunks):
            r_i = rows[k]
            t = lib[r_i] / S - ebar
            pw = t
            for m in range(K):
                tp[m] = pw
                pw *= t
            o = offs[k] - indptr[r_i]
            for p in range(indptr[r_i], indptr[r_i + 1]):
                zz = z[o + p]
                g = indices[p]
                a[g, 0] += zz
                a[g, 1] += zz * zz
                for m in range(K):
                    a[g, 2 + m] += tp[m] * zz


def jackknife(
    X: sp.csr_matrix, order: np.ndarray, bounds: np.ndarray, P: np.ndarray, lib: np.ndarray,
    bulk_target_sum: float, *, direct: bool = False,
) -> np.ndarray:
    """Delete-one jackknife ``C`` of each group's profile (cell-eval2 ``jackknife_correction``).

    ``X``: canonical CSR; group ``k`` is rows ``order[bounds[k]:bounds[k+1]]``; ``P``: the groups'
    float64 count sums; ``lib``: every row's total. ``direct=True`` forces cell-eval2's
    O(cells x genes) formula; by default a group uses the series form (module docstring) where it
    converges fast: with ``e_i = l_i / S``, ``ebar`` their mean and ``t_i = e_i - ebar``, a zero
    entry's ``v - b = h_g(e_i) = log(1 - e_i u_g) - log(1 - e_i)`` and
    ``h_g(ebar + t) - h_g(ebar) = sum_k c_gk t^k`` with ``c_gk = (A^k - B_g^k) / k``,
    ``A = 1 / (1 - ebar)``, ``B_g = u_g / (1 - ebar u_g)`` (``A^k - B^k`` formed as
    ``(A - B) sum_m A^m B^(k-1-m)``, all terms positive). Summed over cells these are power sums of
    ``t_i``; each stored value adds ``z = log1p(-TS y / (r_i + TS P_g))`` (numpy's ``log1p``) to
    the gene's sum and ``2 h z + z^2`` to its sum of squares, the cross terms summed per gene as
    ``sum_k c_gk sum_i t_i^k z_i``. The per-gene shift ``h_g(ebar)`` is dropped: the variance
    ignores it.
    """
    n_groups = bounds.shape[0] - 1
    order = np.ascontiguousarray(order, dtype=np.int64)
    bounds = np.ascontiguousarray(bounds, dtype=np.int64)
    P = np.ascontiguousarray(P, dtype=np.float64)
    lib = np.ascontiguousarray(lib, dtype=np.float64)
    ts = float(bulk_target_sum)
    plan_S = np.zeros(n_groups)
    plan_ebar = np.zeros(n_groups)
    plan_terms = np.zeros(n_groups, dtype=np.int64)
    _jk_plan(order, bounds, P, lib, JACKKNIFE_SERIES_MAX_RATIO, _SERIES_TOL, _SERIES_MAX_TERMS, bool(direct),
             plan_S, plan_ebar, plan_terms)
    indptr = X.indptr.astype(np.int64, copy=False)
    out = np.zeros(n_groups, dtype=np.float64)
    for grp in range(n_groups):
        n_terms = int(plan_terms[grp])
        if n_terms < 0:
            continue
        rows = order[bounds[grp] : bounds[grp + 1]]
        n = rows.shape[0]
        S = float(plan_S[grp])
        Pg = P[grp]
        s1 = np.zeros(P.shape[1])
        s2 = np.zeros(P.shape[1])
        if n_terms == 0:
            _jk_direct(X, rows, Pg, S, lib, ts, s1, s2)
        else:
            coef = np.zeros((P.shape[1], n_terms))
            _jk_coef(rows, Pg, S, lib, ts, float(plan_ebar[grp]), n_terms, coef, s1, s2)
            cnt = indptr[rows + 1] - indptr[rows]
            ends = np.cumsum(cnt)
            tsP = ts * Pg
            n_chunks = max(1, min(_JK_ACCUMULATORS, n))
            acc = np.zeros((n_chunks, P.shape[1], n_terms + 2))
            ebar = float(plan_ebar[grp])
            k0 = 0
            while k0 < n:  # row chunks of ~_JK_CHUNK values: the buffer stays in cache
                k1 = int(np.searchsorted(ends, (ends[k0 - 1] if k0 else 0) + _JK_CHUNK, side="right"))
                k1 = min(n, max(k1, k0 + 1))
                sub = rows[k0:k1]
                offs = np.zeros(k1 - k0, dtype=np.int64)
                np.cumsum(cnt[k0 : k1 - 1], out=offs[1:])
                arg = np.empty(int(cnt[k0:k1].sum()))
                _jk_args(indptr, X.indices, X.data, sub, offs, tsP, S, lib, ts, arg)
                np.log1p(arg, out=arg)
                _jk_add(indptr, X.indices, sub, offs, arg, lib, S, ebar, n_chunks, acc)
                k0 = k1
            tot = acc.sum(axis=0)
            s1 += tot[:, 0]
            s2 += tot[:, 1] + 2.0 * np.einsum("gk,gk->g", coef, tot[:, 2:])
        v = (n - 1) / n * float((s2 - s1 * s1 / n).sum())
        out[grp] = v if v > 0 else 0.0
    return out


_GUARDED = guard_numba_cache(globals())
