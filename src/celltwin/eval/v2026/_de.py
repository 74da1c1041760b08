"""The differential-expression table of the VCC 2026 metrics (cell-eval2 0.20.0, CPU backend).

Under ``--preset vcc2026`` on a machine without CUDA, cell-eval2 builds each side's table in
``de_compute.compute_de`` with the ``pdex`` backend. This module reproduces that table from raw
counts, bit for bit on the quantities the metrics read:

Normalisation (``_to_linear``: ``normalize_total(target_sum=1e6)`` on a float64 copy)
    ``x / c`` with ``c = L / 1e6`` and ``L`` the cell total summed as scanpy sums it
    (:func:`celltwin.eval.v2026._counts.cell_totals`); a zero-total cell gets ``c = 1`` (scanpy's
    ``allow_divide_by_zero=False``), so its values stay 0.
Means and fold changes (``_grouped_means`` + ``_clipped_log2fc``, ``mean_calc: arithmetic``)
    Per group and gene the arithmetic mean of the normalised values, accumulated in the group's
    row order exactly as cell-eval2's reduction does: for a sparse matrix scipy's
    ``(X * (1/n)).sum(axis=0)`` (each value scaled by the float64 ``1/n`` then added in row
    order), for a dense one numpy's ``mean(axis=0)`` (added in row order, then divided by ``n``).
    Which one applies is the *matrix type cell-eval2 runs the side's DE on*: the reference side is
    sparse iff the reference is; the prediction side is the concatenation of the predicted cells
    and the reference's control cells (anndata ``concat``), sparse iff either is (``sparse_mode``).
    ``lfc = log2((m_pert + 1e-9) / (m_ctrl + 1e-9))`` in float64 numpy.
p-values (``pdex(..., mode="ref", is_log1p=True)`` -> numba_mwu 0.2.0)
    Two-sided Mann-Whitney U of each group's ``log1p`` values against the control's, asymptotic
    with tie and continuity correction, bit-identical to numba_mwu (:func:`mwu_merge_block`, a
    sort-and-walk form of :func:`celltwin.eval._mwu.mwu_block`). ``log1p`` is numpy's, applied
    to the same float64 values cell-eval2 applies it to, so the ties it creates or keeps are the
    same.
Gene filter (``_apply_cpm_filter``, ``filter_gene_min_cpm_cell: 5``, reference-only since #351)
    A gene is tested iff the control mean CPM (the fold change's control mean times
    ``1e6 / target_sum``) is ``> 5``: one gene set for every perturbation.
BH (``_bh_per_target``)
    scipy ``false_discovery_control`` within each perturbation over the kept genes only
    (:func:`celltwin.eval._bh.bh_rows`, one BH family per perturbation). Untested genes carry NaN.

The matrix is never densified and never copied whole: genes are processed in column blocks whose
values are gathered from the rows of the (up to two) source matrices
(:mod:`celltwin.eval._gather`, with a per-row scale).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numba as nb
import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval._bh import bh_rows
from celltwin.eval._gather import csr_pass, seg_layout
from celltwin.eval._means import means_block
from celltwin.eval._mwu import mwu_pvalue
from celltwin.eval._numba_cache import guard_numba_cache

__all__ = ["DETable", "Groups", "bh_rows", "de_side", "group_rows", "mwu_merge_block"]

_BLOCK_VALUES = 8 << 20  # target number of gathered values per gene block (64 MiB of float64)


@dataclass
class Groups:
    """Rows of a matrix grouped by label: group ``k`` is ``order[bounds[k]:bounds[k + 1]]``
    (ascending row indices, i.e. the input order cell-eval2 reduces in)."""

    labels: list[str]
    order: np.ndarray  # int64
    bounds: np.ndarray  # int64, len(labels) + 1

    @property
    def sizes(self) -> np.ndarray:
        return np.diff(self.bounds)

    def rows(self, k: int) -> np.ndarray:
        return self.order[self.bounds[k] : self.bounds[k + 1]]


def group_rows(labels: np.ndarray, use: Sequence[str]) -> Groups:
    """:class:`Groups` of the rows whose label is in ``use`` (in that order); other rows are left out."""
    pos = {g: k for k, g in enumerate(use)}
    codes = np.fromiter((pos.get(s, -1) for s in labels.tolist()), dtype=np.int64, count=labels.size)
    keep = np.flatnonzero(codes >= 0)
    order = keep[np.argsort(codes[keep], kind="stable")].astype(np.int64)
    sizes = np.bincount(codes[keep], minlength=len(use)).astype(np.int64)
    bounds = np.zeros(len(use) + 1, dtype=np.int64)
    np.cumsum(sizes, out=bounds[1:])
    return Groups(labels=list(use), order=order, bounds=bounds)


@dataclass
class DETable:
    """One side's DE table over the whole gene axis (cell-eval2's long table, as arrays).

    ``perts`` (K labels, the tested groups), ``kept`` ``(G,)`` genes that pass the control CPM
    filter, ``lfc`` / ``p_value`` ``(K, G)`` float64 for every gene, ``p_adj`` ``(K, G)``
    (BH within each row over the kept genes, NaN elsewhere), ``target_mean`` ``(K, G)`` and
    ``ref_mean`` ``(G,)`` the normalised means behind ``lfc``. cell-eval2's table holds exactly
    the rows ``(perts[k], genes[g])`` with ``kept[g]``.
    """

    perts: list[str]
    kept: np.ndarray
    lfc: np.ndarray
    p_value: np.ndarray
    p_adj: np.ndarray
    target_mean: np.ndarray
    ref_mean: np.ndarray
    extra: dict[str, Any] = field(default_factory=dict)

    def as_arrays(self, genes: Sequence[str]) -> dict[str, Any]:
        """``{"perts", "genes", "kept", "lfc", "p_adj", "p_value"}``; NaN where a gene is not tested."""
        nan = ~self.kept[None, :]
        return {
            "perts": list(self.perts),
            "genes": list(genes),
            "kept": self.kept.copy(),
            "lfc": np.where(nan, np.nan, self.lfc),
            "p_adj": self.p_adj.copy(),
            "p_value": np.where(nan, np.nan, self.p_value),
        }


# --------------------------------------------------------------------------------------------
# Mann-Whitney U of every group against the control, gene by gene
# --------------------------------------------------------------------------------------------


@nb.njit(cache=True, inline="always")
def _f3(t):
    x = float(t)
    return x * x * x - x


@nb.njit(cache=True)
def _insertion_sort(keys, grp, lo, hi):
    for i in range(lo + 1, hi):
        kk = keys[i]
        gg = grp[i]
        j = i - 1
        while j >= lo and keys[j] > kk:
            keys[j + 1] = keys[j]
            grp[j + 1] = grp[j]
            j -= 1
        keys[j + 1] = kk
        grp[j + 1] = gg


@nb.njit(cache=True, inline="always")
def _scatter(src_k, src_g, dst_k, dst_g, h, sh, lo, hi):
    """One stable counting-sort pass of ``src_k[lo:hi]`` on the 11-bit digit at ``sh`` into ``dst_k``
    (``h``: the digit's exclusive prefix counts, advanced), carrying ``src_g`` into ``dst_g``."""
    for i in range(lo, hi):
        k = src_k[i]
        b = (k >> sh) & np.uint64(2047)
        q = lo + h[b]
        h[b] += 1
        dst_k[q] = k
        dst_g[q] = src_g[i]


@nb.njit(cache=True)
def _lsd_sort(keys, grp, k2, g2, lo, hi):
    """LSD radix sort of ``keys[lo:hi]`` (11-bit digits, agreeing digits skipped), carrying ``grp``."""
    m = hi - lo
    hist = np.zeros((6, 2048), dtype=np.int64)
    for i in range(lo, hi):
        k = keys[i]
        for d in range(6):
            hist[d, (k >> np.uint64(11 * d)) & np.uint64(2047)] += 1
    flips = 0
    for d in range(6):
        h = hist[d]
        trivial = False
        for b in range(2048):
            if h[b] != 0:
                trivial = h[b] == m
                break
        if trivial:
            continue
        run = 0
        for b in range(2048):
            c = h[b]
            h[b] = run
            run += c
        sh = np.uint64(11 * d)
        if flips % 2 == 0:
            _scatter(keys, grp, k2, g2, h, sh, lo, hi)
        else:
            _scatter(k2, g2, keys, grp, h, sh, lo, hi)
        flips += 1
    if flips % 2 == 1:
        for i in range(lo, hi):
            keys[i] = k2[i]
            grp[i] = g2[i]


@nb.njit(cache=True)
def _sort_keys(keys, grp, k2, g2, m):
    """Sort ``keys[:m]`` (uint64) ascending, carrying ``grp``.

    One counting pass on the top (up to) 16 bits of ``key - min``, then insertion sort inside
    each bucket (an LSD radix sort for a bucket above 64 keys); insertion sort alone below 64
    keys. Hand-written on purpose: numba's own sort helpers are not used in this module (see the
    on-disk cache note in :func:`celltwin.eval._bh._argsort_nan_last`).
    """
    if m < 64:
        _insertion_sort(keys, grp, 0, m)
        return
    kmin = keys[0]
    kmax = keys[0]
    for i in range(1, m):
        k = keys[i]
        if k < kmin:
            kmin = k
        if k > kmax:
            kmax = k
    span = kmax - kmin
    if span == 0:
        return
    nbits = 0
    s = span
    while s > 0:
        nbits += 1
        s >>= np.uint64(1)
    digits = 16
    while digits > 4 and (1 << digits) > 2 * m:
        digits -= 1
    shift = np.uint64(max(0, nbits - digits))
    n_b = int(span >> shift) + 1
    cnt = np.zeros(n_b + 1, dtype=np.int64)
    for i in range(m):
        cnt[int((keys[i] - kmin) >> shift) + 1] += 1
    for b in range(n_b):
        cnt[b + 1] += cnt[b]
    pos = cnt[:n_b].copy()
    for i in range(m):
        b = int((keys[i] - kmin) >> shift)
        q = pos[b]
        pos[b] = q + 1
        k2[q] = keys[i]
        g2[q] = grp[i]
    for i in range(m):
        keys[i] = k2[i]
        grp[i] = g2[i]
    for b in range(n_b):
        lo = cnt[b]
        hi = cnt[b + 1]
        if hi - lo > 64:
            _lsd_sort(keys, grp, k2, g2, lo, hi)
        elif hi - lo > 1:
            _insertion_sort(keys, grp, lo, hi)


@nb.njit(cache=True, parallel=True)
def mwu_merge_block(seg_ptr, vals, sizes, n_tests, out_u, out_p, g0):
    """Mann-Whitney U of groups ``0..n_tests-1`` against group ``n_tests`` (the control) for each
    gene of a gathered block (layout of :mod:`celltwin.eval._gather`; values > 0 and
    finite, zeros implicit). Same statistic and p-value as :func:`celltwin.eval._mwu.mwu_block`
    (numba_mwu 0.2.0), bit for bit, computed differently: per gene every stored value of every
    group is sorted once (by the float64 bit patterns, which order like the positive values) and walked in order keeping ``L`` = control values so far (control zeros included).
    A value of group ``t`` adds ``L + E/2`` to ``t``'s rank sum (``E``: control values equal to it);
    a run of equal values with ``c`` control and ``h_t`` group-``t`` members adds
    ``f(c + h_t) - f(c)`` to ``t``'s tie term and ``f(c)`` to the control's, ``f(x) = x^3 - x``;
    zeros are one run per group. Rank sums are sums of halves and tie terms sums of integers, all
    exact in float64, so the order of accumulation does not matter; the p-value is
    :func:`celltwin.eval._mwu.mwu_pvalue`.
    """
    n_groups = n_tests + 1
    ctrl = n_tests
    nb_genes = (seg_ptr.shape[0] - 1) // n_groups
    n_c = sizes[ctrl]
    bits = vals.view(np.uint64)
    for j in nb.prange(nb_genes):
        lo = seg_ptr[j * n_groups]
        m = seg_ptr[(j + 1) * n_groups] - lo
        keys = np.empty(m, dtype=np.uint64)
        grp = np.empty(m, dtype=np.int32)
        k2 = np.empty(m, dtype=np.uint64)
        g2 = np.empty(m, dtype=np.int32)
        for gg in range(n_groups):
            s = j * n_groups + gg
            for q in range(seg_ptr[s], seg_ptr[s + 1]):
                keys[q - lo] = bits[q]
                grp[q - lo] = gg
        _sort_keys(keys, grp, k2, g2, m)
        m_c = seg_ptr[j * n_groups + ctrl + 1] - seg_ptr[j * n_groups + ctrl]
        nz_c = n_c - m_c
        r1 = np.zeros(n_tests, dtype=np.float64)
        tie = np.zeros(n_tests, dtype=np.float64)
        cnt = np.zeros(n_groups, dtype=np.int64)
        touched = np.empty(n_groups, dtype=np.int64)
        tie_c = _f3(nz_c)
        below = float(nz_c)
        i = 0
        while i < m:
            k = keys[i]
            e = i + 1
            while e < m and keys[e] == k:
                e += 1
            if e == i + 1:
                g = grp[i]
                if g == ctrl:
                    below += 1.0
                else:
                    r1[g] += below
            else:
                c = 0
                for q in range(i, e):
                    if grp[q] == ctrl:
                        c += 1
                mid = below + c / 2.0
                nt = 0
                for q in range(i, e):
                    g = grp[q]
                    if g != ctrl:
                        r1[g] += mid
                        if cnt[g] == 0:
                            touched[nt] = g
                            nt += 1
                        cnt[g] += 1
                for u in range(nt):
                    g = touched[u]
                    tie[g] += _f3(c + cnt[g]) - _f3(c)
                    cnt[g] = 0
                tie_c += _f3(c)
                below += c
            i = e
        for t in range(n_tests):
            st = j * n_groups + t
            n_t = sizes[t]
            nz_t = n_t - (seg_ptr[st + 1] - seg_ptr[st])
            rs = n_t * (n_t + 1.0) / 2.0 + r1[t]
            tt = tie_c + tie[t]
            if nz_t > 0:
                rs += nz_t * (nz_c / 2.0)
                tt += _f3(nz_c + nz_t) - _f3(nz_c)
            u1, p = mwu_pvalue(rs, n_t, n_c, tt)
            out_u[t, g0 + j] = u1
            out_p[t, g0 + j] = p


class _Source:
    """Rows of one CSR matrix taking part in a DE block gather."""

    def __init__(self, X: sp.csr_matrix, rows: np.ndarray, rgrp: np.ndarray, scale: np.ndarray, n_chunks: int):
        self.X = X
        self.rows = np.ascontiguousarray(rows, dtype=np.int64)
        self.rgrp = np.ascontiguousarray(rgrp, dtype=np.int64)
        self.scale = np.ascontiguousarray(scale, dtype=np.float64)
        self.indptr = X.indptr.astype(np.int64, copy=False)
        self.cursor = self.indptr[self.rows].copy()
        self.n_chunks = max(1, min(n_chunks, self.rows.shape[0]))

    def gather(self, g0: int, g1: int, n_groups: int, slots: np.ndarray, c_off: int,
               vals: np.ndarray | None = None) -> None:
        """Count (``vals=None``) or fill pass of :func:`celltwin.eval._gather.csr_pass` over these
        rows, their chunks using ``slots[c_off:]``; the fill writes ``x / scale``."""
        if self.rows.size:
            csr_pass(self.indptr, self.X.indices, self.X.data, self.rows, self.rgrp, self.cursor, g0, g1,
                     n_groups, slots, c_off, self.n_chunks, vals, None if vals is None else self.scale)


def de_side(
    tests_X: sp.csr_matrix,
    tests: Groups,
    tests_scale: np.ndarray,
    ctrl_X: sp.csr_matrix,
    ctrl_rows: np.ndarray,
    ctrl_scale: np.ndarray,
    *,
    sparse_mode: bool,
    epsilon: float,
    min_cpm: float | None,
    target_sum: float,
) -> DETable:
    """DE of every group of ``tests`` (rows of ``tests_X``) against the control cells ``ctrl_rows``
    of ``ctrl_X`` (the same or another matrix with the same genes).

    ``*_scale``: per matrix row, the normaliser ``c = L / target_sum`` (``1`` for an empty cell);
    the tested values are ``x / c``. ``sparse_mode``: which mean cell-eval2 takes (module
    docstring). ``min_cpm``: the control-CPM gene filter (``None``: no filter; negative: keep all,
    as cell-eval2). Both matrices must be canonical CSR (sorted indices).
    """
    n_genes = tests_X.shape[1]
    k = len(tests.labels)
    if k == 0:
        msg = "DE: no perturbation to test against the control"
        raise InputError(msg)
    n_ctrl = int(ctrl_rows.shape[0])
    if n_ctrl == 0:
        msg = "DE: the control group has no cells"
        raise InputError(msg)
    n_groups = k + 1
    sizes = np.concatenate([tests.sizes, [n_ctrl]]).astype(np.int64)
    inv_sizes = np.asarray([1.0 / float(n) if n else 0.0 for n in sizes], dtype=np.float64)
    n_threads = nb.get_num_threads()
    t_rows = tests.order
    t_grp = np.repeat(np.arange(k, dtype=np.int64), tests.sizes)
    src_t = _Source(tests_X, t_rows, t_grp, tests_scale[t_rows], n_threads)
    src_c = _Source(ctrl_X, ctrl_rows, np.full(n_ctrl, k, dtype=np.int64), ctrl_scale[ctrl_rows], n_threads)
    nnz_t = float(np.diff(src_t.indptr)[t_rows].sum()) if t_rows.size else 0.0
    nnz_c = float(np.diff(src_c.indptr)[src_c.rows].sum())
    per_gene = max(1.0, (nnz_t + nnz_c) / max(1, n_genes))
    bs = int(max(16, min(n_genes, _BLOCK_VALUES / per_gene, max(16, (1 << 22) // (n_groups * 4)))))

    means = np.zeros((n_groups, n_genes), dtype=np.float64)
    stat = np.empty((k, n_genes), dtype=np.float64)
    pval = np.empty((k, n_genes), dtype=np.float64)
    n_ch = src_t.n_chunks + src_c.n_chunks
    for g0 in range(0, n_genes, bs):
        g1 = min(n_genes, g0 + bs)
        n_seg = (g1 - g0) * n_groups
        counts = np.zeros((n_ch, n_seg), dtype=np.int64)
        for src, off in ((src_t, 0), (src_c, src_t.n_chunks)):
            src.gather(g0, g1, n_groups, counts, off)
        seg_ptr, starts = seg_layout(counts)
        vals = np.empty(int(seg_ptr[-1]), dtype=np.float64)
        for src, off in ((src_t, 0), (src_c, src_t.n_chunks)):
            src.gather(g0, g1, n_groups, starts, off, vals)
        means_block(seg_ptr, vals, sizes, inv_sizes, n_groups, bool(sparse_mode), means, g0)
        np.log1p(vals, out=vals)
        mwu_merge_block(seg_ptr, vals, sizes, k, stat, pval, g0)

    target_mean = means[:k]
    ref_mean = means[k].copy()
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log2((target_mean + epsilon) / (ref_mean + epsilon))
    if min_cpm is None or min_cpm < 0:
        kept = np.ones(n_genes, dtype=bool)
    else:
        kept = (ref_mean * (1e6 / float(target_sum))) > float(min_cpm)
    p_adj = np.full((k, n_genes), np.nan, dtype=np.float64)
    if kept.any():
        p_adj[:, kept] = bh_rows(pval[:, kept])
    return DETable(
        perts=list(tests.labels), kept=kept, lfc=lfc, p_value=pval, p_adj=p_adj,
        target_mean=target_mean, ref_mean=ref_mean,
    )


_GUARDED = guard_numba_cache(globals())
