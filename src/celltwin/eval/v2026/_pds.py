"""The VCC 2026 metric ``pds_cosine`` (cell-eval2 ``metrics/discrimination.py``), checked against
cell-eval2 in ``tests/eval/test_v2026_metrics.py``.

pds_cosine (``discrimination_score``, cosine, panel exclusion, mid-rank, ``n - 1``)
    Profiles ``b = log1p(P * (5e4 / sum_g P))`` per group from float64 group sums (a group with no
    counts is all zeros); effects ``b_p - b_ctrl``; every panel target gene column removed from
    both effect matrices (``eff[:, keep]``); ``d = clip(1 - <a, b> / (|a| |b|), 0, 2)`` from one
    BLAS product ``pred @ real.T`` and ``einsum`` norms, ``d = 1`` when either norm is 0.
    ``PDS_p = 1 - k_p / (n - 1)`` with ``k_p = #{d < d_pp} + (#{d == d_pp} - 1) / 2`` (NaN
    distances count as farther); ``n - 1 <= 0`` gives 1. The numpy operations (shapes, layouts,
    order) are cell-eval2's, so the distances are bit-identical and ties fall the same way.
"""

from __future__ import annotations

import numpy as np

from celltwin.errors import InputError


def _pds(pred_eff: np.ndarray, real_eff: np.ndarray, panel_cols: np.ndarray) -> np.ndarray:
    """pds_cosine per perturbation (rows of ``pred_eff`` match rows of ``real_eff``)."""
    keep = np.ones(real_eff.shape[1], dtype=bool)
    keep[panel_cols] = False
    if not keep.any():
        msg = (
            "pds_cosine: the panel's target genes are every measured gene, so no feature is left "
            "to compare effects on"
        )
        raise InputError(msg)
    if keep.all():
        a, b = pred_eff.copy(order="K"), real_eff.copy(order="K")
    else:
        a, b = pred_eff[:, keep], real_eff[:, keep]
    sim = a @ b.T
    na = np.einsum("ig,ig->i", a, a)
    nb_ = np.einsum("jg,jg->j", b, b)
    denom = np.sqrt(na)[:, None] * np.sqrt(nb_)[None, :]
    cos = np.zeros_like(sim)
    nz = denom != 0
    cos[nz] = sim[nz] / denom[nz]
    dist = np.clip(1.0 - cos, 0.0, 2.0)
    n = real_eff.shape[0]
    out = np.empty(a.shape[0], dtype=np.float64)
    for i in range(a.shape[0]):
        row = dist[i]
        m = row[i]
        if np.isnan(m):
            less = int(np.count_nonzero(~np.isnan(row)))
            equal = int(row.size - less)
        else:
            less = int(np.count_nonzero(row < m))
            equal = int(np.count_nonzero(row == m))
        rank = less + (equal - 1) / 2.0
        out[i] = 1.0 if n - 1 <= 0 else 1.0 - rank / (n - 1)
    return out
