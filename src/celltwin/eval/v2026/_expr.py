"""The VCC 2026 metric ``expr_mse_unbiased_capped_norm`` (cell-eval2 ``metrics/delta.py``): its
two per-perturbation legs and their ratio of sums, checked against cell-eval2 in
``tests/eval/test_v2026_metrics.py``. The sampling corrections ``C`` are the groups' delete-one
jackknife (:mod:`celltwin.eval.v2026._jackknife`).

expr_mse_unbiased_capped_norm (``mse_unbiased_capped`` / ``distance_unbiased``, ratio of sums)
    ``N_p = (|b_pred - b_real|^2 - rho min(C_pred, C_real) - C_real) / G_p`` and
    ``D_p = (|b_real - b_ctrl|^2 - C_real - C_ctrl) / G_p``, both over the genes except the
    perturbation's own (``G_p = G - 1`` when it resolves; the corrections stay whole);
    ``rho = min(1, B / sum_q w_q min(C_pred,q, C_real,q))`` (only applied when the claim is > 0)
    with ``w = 1 / G_p`` and ``B`` the ``w``-weighted across-perturbation centred sum of squares of
    the predicted profiles, each row's own gene left out (``_across_pert_budget``). The metric is
    ``sum N / sum D`` over perturbations finite on both (``InputError`` when ``sum D <= 0``:
    cell-eval2 refuses such a reference too). ``N_p`` and ``D_p`` are reported per perturbation.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from celltwin.errors import InputError
from celltwin.eval.v2026._config import EXPR, V2026Config

if TYPE_CHECKING:
    from celltwin.eval.v2026._metrics import RealStats


def _drop_own(summed: np.ndarray, a: np.ndarray, b: np.ndarray, cols: np.ndarray, n_genes: int) -> np.ndarray:
    """cell-eval2 ``_drop_on_target`` + ``_per_gene``: remove each row's own-gene term from the
    summed squared distance (scalar ``** 2``, as cell-eval2 does) and divide by the genes kept."""
    out = np.array(summed, dtype=np.float64, copy=True)
    n_row = np.full(out.shape[0], float(n_genes))
    for i in np.flatnonzero(cols >= 0):
        c = int(cols[i])
        out[i] -= (a[i, c] - b[i, c]) ** 2
        n_row[i] = n_genes - 1
    return np.divide(out, n_row, out=np.full(out.shape, np.nan), where=n_row > 0)


def _distance(
    profiles: np.ndarray, ctrl_profile: np.ndarray, jk: np.ndarray, jk_ctrl: float, cols: np.ndarray, n_genes: int
) -> np.ndarray:
    """``D_p`` (expr_distance_unbiased) per perturbation: ``(|b_real - b_ctrl|^2 - C_real - C_ctrl) / G_p``."""
    ctrl_b = np.broadcast_to(ctrl_profile, profiles.shape)
    d = profiles - ctrl_b
    summed = np.einsum("ij,ij->i", d, d) - jk - np.full(profiles.shape[0], jk_ctrl)
    return _drop_own(summed, profiles, ctrl_b, cols, n_genes)


def _budget(pred_sel: np.ndarray, cols: np.ndarray, w: np.ndarray) -> float:
    """cell-eval2 ``_across_pert_budget``: ``sum_g sum_{p in R_g} w_p (b_pg - wmean_g)^2``."""
    n_rows, n_genes = pred_sel.shape
    dev = pred_sel - pred_sel.mean(axis=0)
    s1 = np.einsum("ij,i->j", dev, w)
    s2 = np.einsum("ij,ij,i->j", dev, dev, w)
    wsum = np.full(n_genes, float(w.sum()))
    cnt = np.full(n_genes, float(n_rows))
    for k in np.flatnonzero(cols >= 0):
        c = int(cols[k])
        v = dev[k, c]
        s1[c] -= w[k] * v
        s2[c] -= w[k] * v * v
        wsum[c] -= w[k]
        cnt[c] -= 1.0
    ok = (cnt >= 2.0) & (wsum > 0.0)
    if not ok.any():
        return 0.0
    ss = s2[ok] - s1[ok] ** 2 / wsum[ok]
    return float(np.maximum(ss, 0.0).sum())


def _numerator(rs: RealStats, pred_prof: np.ndarray, pred_jk: np.ndarray, cfg: V2026Config) -> tuple[np.ndarray, float]:
    """``N_p`` (expr_mse_unbiased_capped) per perturbation and the applied ``rho``."""
    n_genes = len(rs.genes)
    cols = rs.own_cols
    term = np.minimum(pred_jk, cfg.pred_cap_k * rs.jk)
    n_row = np.where(cols >= 0, n_genes - 1.0, float(n_genes))
    w = np.divide(1.0, n_row, out=np.zeros_like(n_row), where=n_row > 0)
    claim = float((term * w).sum())
    rho = 1.0
    if claim > 0.0:
        ratio = _budget(pred_prof, cols, w) / claim
        if ratio < 1.0:
            term = term * ratio
            rho = ratio
    d = pred_prof - rs.profiles
    summed = np.einsum("ij,ij->i", d, d) - term - rs.jk
    return _drop_own(summed, pred_prof, rs.profiles, cols, n_genes), rho


def _ratio_of_sums(N: np.ndarray, D: np.ndarray) -> float:
    ok = np.isfinite(N) & np.isfinite(D)
    if not ok.any():
        msg = f"{EXPR}: no perturbation has a finite numerator and denominator"
        raise InputError(msg)
    n_sum, d_sum = float(N[ok].sum()), float(D[ok].sum())
    if not d_sum > 0.0:
        msg = (
            f"{EXPR}: the reference's corrected effect sizes sum to {d_sum!r} (expected > 0) over "
            f"{int(ok.sum())} perturbation(s): at this depth the reference carries no measurable "
            "effect, so the ratio is undefined (cell-eval2 refuses it too)"
        )
        raise InputError(msg)
    return n_sum / d_sum
