"""Per-group means, ``expm1`` pseudobulks and fold changes of the v2 DE table (pdex 0.3.0).

Exactness: means repeat numpy/scipy's accumulation, sequential row-order sums in the input dtype
(numpy ``mean(axis=0)`` of a C-contiguous block; scipy CSR ``mean(axis=0)``, which scales each
value by ``dtype(1/n)`` before summing). ``expm1`` / ``log2`` are evaluated inside numba exactly
as pdex evaluates them, because numba's float32 ``expm1`` differs from numpy's in the last ulp.
"""

from __future__ import annotations

import numba as nb
import numpy as np

from celltwin.eval._numba_cache import guard_numba_cache

__all__ = ["expm1_rows", "lfc_pc_rows", "means_block"]


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


_GUARDED = guard_numba_cache(globals())
