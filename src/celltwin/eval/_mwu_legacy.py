"""Legacy-mode kernel (pdex 0.1.27 -> ``scipy.stats.mannwhitneyu``, numpy pairwise sums): per
(group, gene) column sums and per (test, gene) rank statistics of a dense gene block, with the
floating-point sums replayed in the input dtype exactly as numpy/scipy order them.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from celltwin.eval._mwu import distinct_runs
from celltwin.eval._numba_cache import guard_numba_cache
from celltwin.eval._pairwise import pairwise_sum, pairwise_sum_sparse

__all__ = ["legacy_block"]


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
        nd_c = distinct_runs(cs, 0, cv, cc)
        for t in range(n_tests):
            t0 = group_ptr[t]
            n_t = group_ptr[t + 1] - t0
            x = col[t0 : t0 + n_t].astype(np.float64)
            xs = np.sort(x)
            tv = np.empty(n_t, dtype=np.float64)
            tc = np.empty(n_t, dtype=np.int64)
            nd_t = distinct_runs(xs, 0, tv, tc)
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


_GUARDED = guard_numba_cache(globals())
