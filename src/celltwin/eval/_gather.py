"""Gene-block gather: the non-zero values of a block of genes, grouped by cell group.

The layout every DE kernel reads is a *gene block*: for genes ``g0 <= g < g1`` and the ``NG``
cell groups (perturbations and the control, in the caller's group order) the non-zero values of
every ``(gene, group)`` pair are stored contiguously in ``vals[seg_ptr[s]:seg_ptr[s + 1]]`` with
``s = (g - g0) * NG + group``, in ascending row (cell) order. Zeros (implicit, explicitly stored,
or ``-0.0``) are never stored: a group's zero count is its size minus its stored values. Without
a scale the values keep the input dtype (float32 or float64; ranks only need order and equality,
which both preserve); with a per-row scale they are ``float64(x) / scale[row]``.

CSR sources are read through a *cursor* per used row (``cursor[k]``: the first CSR position of
``rows[k]`` not yet consumed; column indices sorted within each row), advanced past ``g1`` by
the fill pass, so consecutive blocks cost O(rows + nnz in block) and every stored value is read
once per pass. The rows are split into ``n_chunks`` consecutive chunks processed in parallel
(count, then fill); chunk ``c``'s values precede chunk ``c + 1``'s inside every segment, so
segments stay in row order. The 2025 evaluator (:func:`csr_block`, one source, values as
stored) and the VCC 2026 DE table (two sources sharing one block, values normalised) use the
same kernels: a count pass of :func:`csr_pass`, :func:`seg_layout`, a fill pass of :func:`csr_pass`.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from celltwin.eval._numba_cache import guard_numba_cache

__all__ = ["csr_block", "csr_dense_block", "csr_pass", "dense_block", "seg_layout"]


@nb.njit(cache=True, inline="always")
def _chunk(c, n_rows, n_chunks):
    """Row range ``[k0, k1)`` of chunk ``c`` when ``n_rows`` rows are cut into ``n_chunks``."""
    return c * n_rows // n_chunks, (c + 1) * n_rows // n_chunks


@nb.njit(cache=True, parallel=True)
def csr_pass(indptr, indices, data, rows, rgrp, cursor, g0, g1, n_groups, slots, c_off, n_chunks, vals, scale):
    """One pass over the stored non-zeros of genes ``[g0, g1)`` in the rows ``rows`` (``rgrp[k]``:
    group of ``rows[k]``), chunk ``c`` of the rows using the counters ``slots[c_off + c]`` (one per
    segment ``(g - g0) * n_groups + grp``). Entries left of ``g0`` are skipped.

    Count pass (``vals=None``): each non-zero adds 1 to its segment's counter; ``cursor`` is only
    read. Fill pass (``slots`` = the starts of :func:`seg_layout`): each non-zero is written to
    ``vals`` at its segment's counter, which then advances, and ``cursor`` moves past ``g1``. The
    value written is the stored one (``scale=None``, ``vals`` in the input dtype) or
    ``float64(x) / scale[k]`` for ``rows[k]`` (``vals`` float64). Whether ``vals`` / ``scale`` are
    None is known when a signature compiles, so each pass runs only its own branch.
    """
    n_rows = rows.shape[0]
    for c in nb.prange(n_chunks):
        k0, k1 = _chunk(c, n_rows, n_chunks)
        slot = slots[c_off + c]
        for k in range(k0, k1):
            r = rows[k]
            grp = rgrp[k]
            sc = 1.0
            if scale is not None:
                sc = scale[k]
            end = indptr[r + 1]
            p = cursor[k]
            while p < end:
                col = indices[p]
                if col >= g1:
                    break
                v = data[p]
                if col >= g0 and v != 0:
                    s = (col - g0) * n_groups + grp
                    if vals is None:
                        pass
                    elif scale is None:
                        vals[slot[s]] = v
                    else:
                        vals[slot[s]] = np.float64(v) / sc
                    slot[s] += 1
                p += 1
            if vals is not None:
                cursor[k] = p


@nb.njit(cache=True)
def seg_layout(counts):
    """Segment pointers and per-chunk start positions from ``counts`` (chunks x segments): chunk
    ``c`` of segment ``s`` starts at ``starts[c, s]``, after every earlier chunk of ``s``."""
    n_chunks, n_seg = counts.shape
    seg_ptr = np.empty(n_seg + 1, dtype=np.int64)
    starts = np.empty((n_chunks, n_seg), dtype=np.int64)
    run = 0
    for s in range(n_seg):
        seg_ptr[s] = run
        for c in range(n_chunks):
            starts[c, s] = run
            run += counts[c, s]
    seg_ptr[n_seg] = run
    return seg_ptr, starts


def csr_block(indptr, indices, data, row_order, row_group, cursor, g0, g1, n_groups, n_chunks):
    """Gather the non-zero values of genes ``[g0, g1)`` from one CSR matrix, grouped, as stored.

    ``row_order`` lists the rows to use, sorted by group and ascending within a group;
    ``row_group[k]`` is the group of ``row_order[k]``; ``cursor`` as in the module docstring
    (advanced past ``g1`` on return). Returns ``seg_ptr`` (int64, ``(g1 - g0) * n_groups + 1``)
    and ``vals`` (input dtype).
    """
    counts = np.zeros((n_chunks, (g1 - g0) * n_groups), dtype=np.int64)
    csr_pass(indptr, indices, data, row_order, row_group, cursor, g0, g1, n_groups, counts, 0, n_chunks, None, None)
    seg_ptr, starts = seg_layout(counts)
    vals = np.empty(int(seg_ptr[-1]), dtype=data.dtype)
    csr_pass(indptr, indices, data, row_order, row_group, cursor, g0, g1, n_groups, starts, 0, n_chunks, vals, None)
    return seg_ptr, vals


@nb.njit(cache=True, parallel=True)
def dense_block(X, row_order, row_group, g0, g1, n_groups, n_chunks):
    """Dense counterpart of :func:`csr_block` (``X`` is a C-contiguous 2-D array).

    Rows are read as contiguous ``X[r, g0:g1]`` slices, split into ``n_chunks`` consecutive
    chunks processed in parallel (count, then fill), so segments stay in row order.
    """
    nb_genes = g1 - g0
    n_rows = row_order.shape[0]
    counts = np.zeros((n_chunks, nb_genes * n_groups), dtype=np.int64)
    for c in nb.prange(n_chunks):
        k0, k1 = _chunk(c, n_rows, n_chunks)
        for k in range(k0, k1):
            r = row_order[k]
            grp = row_group[k]
            for j in range(nb_genes):
                if X[r, g0 + j] != 0:
                    counts[c, j * n_groups + grp] += 1
    seg_ptr, starts = seg_layout(counts)
    vals = np.empty(seg_ptr[-1], dtype=X.dtype)
    for c in nb.prange(n_chunks):
        k0, k1 = _chunk(c, n_rows, n_chunks)
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


@nb.njit(cache=True)
def csr_dense_block(indptr, indices, data, row_order, cursor, g0, g1):
    """Rows ``row_order`` x genes ``[g0, g1)`` of a CSR matrix as a dense array in the input dtype
    (the legacy engine's gather; ``cursor`` as in the module docstring, advanced past ``g1``)."""
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


_GUARDED = guard_numba_cache(globals())
