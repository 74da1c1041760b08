"""The four VCC 2026 DE metrics (cell-eval2 ``metrics/de.py``, ``metrics/direction.py``), a
context's DE table alone (:func:`de_arrays`) and the lfc_nmae replicate estimator
(:func:`lfc_nmae_with_gate`, cell-eval2 ``lfc_nmae_ref.py``), checked against cell-eval2 in
``tests/eval/test_v2026_metrics.py``.

DE metrics (tables: :mod:`celltwin.eval.v2026._de`)
    A gene is *significant* when ``p_adj < 0.05``, *adjudicable* when the reference lfc is non-zero
    (and not NaN); the perturbation's own gene is left out of everything. With ``R`` / ``P`` the
    reference / predicted significant sets and ``pool`` the genes tested on both sides:

    * ``de_wilcoxon_direction_fidelity_yield_raw``: ``k / max(n_pred, n_conf)``, ``n_conf = |R|``,
      ``n_pred`` the adjudicable pool genes in ``P``, ``k`` those whose predicted lfc is non-zero
      with the reference's sign; NaN when both counts are 0.
    * ``de_wilcoxon_direction_reach_raw``: the pool genes in ``R`` ordered by (predicted
      significant first, predicted ``p_adj`` ascending, predicted ``p_value`` ascending, ``|lfc|``
      descending, gene name ascending by code point - polars' string order); walking down, only
      adjudicable genes advance the depth ``k``; ``k* = max{k : matches(k) / k >= 0.9}`` (0 if
      none), value ``k* / n_conf``, NaN when ``n_conf = 0``.
    * ``de_wilcoxon_sig_jaccard``: ``|R & P| / |R | P|``, 1 when both are empty.
    * ``de_wilcoxon_lfc_nmae``: over the gate ``R`` with finite reference lfc,
      ``mean|lfc_pred - lfc_real| / mean|lfc_real|``, a gate gene the prediction did not test
      reads as lfc 0; NaN (left out of the mean) when the gate has fewer than 10 genes or the
      denominator is 0 / not finite.

The replicate (cell-eval2 ``anchor.py``, ``lfc_nmae_ref.py``)
    Each split scores half B (the prediction) against half A with ``control_source: pred``:
    ``score_context(half_a, half_b, pred_controls=<half B's control cells>)``
    (:mod:`celltwin.eval.v2026._metrics`). Its ``extra["de_pred"]`` is then half B's own DE table
    (what :func:`de_arrays` of half B returns) and ``de_arrays(half_a, real_stats=prepare_real(half_a))``
    half A's, so a split needs no further DE pass. ``de_wilcoxon_lfc_nmae``'s replicate is
    :func:`lfc_nmae_with_gate`: gate and denominator from the whole reference's table, only the fold
    changes from the halves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numba as nb
import numpy as np

from celltwin.errors import InputError
from celltwin.eval._numba_cache import guard_numba_cache
from celltwin.eval.v2026 import _counts, _de
from celltwin.eval.v2026._config import FIDELITY, JACCARD, NMAE, REACH, ContextCounts, V2026Config
from celltwin.eval.v2026._sides import _check_genes, _de_scale, _side
from celltwin.eval.v2026._targets import _de_own_columns, _split_targets

if TYPE_CHECKING:
    from celltwin.eval.v2026._metrics import RealStats

__all__ = ["de_arrays", "lfc_nmae_with_gate"]


@nb.njit(cache=True, parallel=True)
def _de_counts(kept_r, padj_r, lfc_r, kept_p, padj_p, lfc_p, cols, alpha, min_gate, out):
    """Per perturbation: ``out[k] = (n_conf, n_pred, k_match, |R|, |P|, |R&P|, n_gate, num, den)``."""
    K, G = padj_r.shape
    for i in nb.prange(K):
        own = cols[i]
        n_conf = 0
        n_pred = 0
        k_match = 0
        nr = 0
        np_ = 0
        both = 0
        n_gate = 0
        num = 0.0
        den = 0.0
        for g in range(G):
            if g == own:
                continue
            sr = kept_r[g] and padj_r[i, g] < alpha
            sp_ = kept_p[g] and padj_p[i, g] < alpha
            if sr:
                nr += 1
            if sp_:
                np_ += 1
            if sr and sp_:
                both += 1
            lr = lfc_r[i, g]
            lp = lfc_p[i, g]
            if kept_r[g] and kept_p[g]:
                adj = (not np.isnan(lr)) and lr != 0
                if sp_ and adj:
                    n_pred += 1
                    if (not np.isnan(lp)) and lp != 0 and np.sign(lp) == np.sign(lr):
                        k_match += 1
            if sr and np.isfinite(lr):
                n_gate += 1
                v = lp if (kept_p[g] and np.isfinite(lp)) else 0.0
                num += abs(v - lr)
                den += abs(lr)
        n_conf = nr
        out[i, 0] = n_conf
        out[i, 1] = n_pred
        out[i, 2] = k_match
        out[i, 3] = nr
        out[i, 4] = np_
        out[i, 5] = both
        out[i, 6] = n_gate
        out[i, 7] = num
        out[i, 8] = den


def _reach(rs: RealStats, pred: _de.DETable, cfg: V2026Config, n_conf: np.ndarray) -> np.ndarray:
    """de_wilcoxon_direction_reach_raw per perturbation (module docstring)."""
    real = rs.de
    alpha = cfg.p_adj_threshold
    both = real.kept & pred.kept
    out = np.full(len(rs.perts), np.nan)
    for i in range(len(rs.perts)):
        if n_conf[i] == 0:
            continue
        pool = both & (real.p_adj[i] < alpha)
        if rs.de_cols[i] >= 0:
            pool[rs.de_cols[i]] = False
        idx = np.flatnonzero(pool)
        if idx.size == 0:
            out[i] = 0.0
            continue
        pa = pred.p_adj[i, idx]
        pv = pred.p_value[i, idx]
        lp = pred.lfc[i, idx]
        lr = real.lfc[i, idx]
        sig = pa < alpha
        rank_pa = np.where(np.isnan(pa), np.inf, pa)
        rank_pv = np.where(np.isnan(pv), np.inf, pv)
        mag = np.where(np.isnan(lp), -np.inf, np.abs(lp))
        order = np.lexsort((rs.name_rank[idx], -mag, rank_pv, rank_pa, ~sig))
        adj = (~np.isnan(lr)) & (lr != 0)
        match = adj & (~np.isnan(lp)) & (lp != 0) & (np.sign(lp) == np.sign(lr))
        n_den = np.cumsum(adj[order].astype(np.int64))
        n_match = np.cumsum(match[order].astype(np.int64))
        with np.errstate(divide="ignore", invalid="ignore"):
            purity = n_match.astype(np.float64) / n_den.astype(np.float64)
        hit = (n_den > 0) & (purity >= cfg.reach_purity)
        k_star = int(n_den[hit].max()) if hit.any() else 0
        out[i] = k_star / n_conf[i]
    return out


def _de_metrics(rs: RealStats, pred: _de.DETable, cfg: V2026Config) -> dict[str, np.ndarray]:
    real = rs.de
    K = len(rs.perts)
    cnt = np.zeros((K, 9), dtype=np.float64)
    _de_counts(real.kept, real.p_adj, real.lfc, pred.kept, pred.p_adj, pred.lfc, rs.de_cols,
               float(cfg.p_adj_threshold), int(cfg.min_gate_size), cnt)
    n_conf, n_pred, k_match = cnt[:, 0], cnt[:, 1], cnt[:, 2]
    nr, np_, both, n_gate, num, den = cnt[:, 3], cnt[:, 4], cnt[:, 5], cnt[:, 6], cnt[:, 7], cnt[:, 8]
    mx = np.maximum(n_pred, n_conf)
    fidelity = np.divide(k_match, mx, out=np.full(K, np.nan), where=mx > 0)
    union = nr + np_ - both
    jaccard = np.divide(both, union, out=np.ones(K), where=union > 0)
    ok = n_gate >= cfg.min_gate_size
    with np.errstate(divide="ignore", invalid="ignore"):
        mnum = num / n_gate
        mden = den / n_gate
        nmae = np.where(ok & np.isfinite(mden) & (mden != 0), mnum / mden, np.nan)
    reach = _reach(rs, pred, cfg, n_conf.astype(np.int64))
    return {FIDELITY: fidelity, REACH: reach, JACCARD: jaccard, NMAE: nmae}


def de_arrays(
    cc: ContextCounts,
    *,
    control: str = "non-targeting",
    config: V2026Config | None = None,
    real_stats: RealStats | None = None,
) -> dict[str, Any]:
    """The DE table of ``cc``'s perturbations against ``cc``'s own control cells, as arrays:
    ``{"perts", "genes", "kept", "lfc", "p_adj", "p_value"}`` (``(P, G)``, NaN where the gene is not
    tested). With ``real_stats`` (prepared from ``cc``) its table is returned without recomputing."""
    cfg = config if config is not None else V2026Config()
    if real_stats is not None:
        return real_stats.de.as_arrays(real_stats.genes)
    genes = _check_genes(cc.genes, "DE input")
    side = _side(cc, "DE input", genes)
    _counts.check_counts(side.X, "DE input", integral=False, max_counts_per_cell=math.inf)
    uniq = sorted(set(side.labels.tolist()))
    if control not in uniq:
        msg = f"DE input: the control label {control!r} labels no cell"
        raise InputError(msg)
    perts = [p for p in uniq if p != control]
    groups = _de.group_rows(side.labels, [*perts, control])
    tests = _de.Groups(labels=perts, order=groups.order[: groups.bounds[len(perts)]], bounds=groups.bounds[: len(perts) + 1])
    scale = _de_scale(side, not side.dense_input, cfg.target_sum)
    table = _de.de_side(
        side.X, tests, scale, side.X, groups.rows(len(perts)), scale, sparse_mode=not side.dense_input,
        epsilon=cfg.epsilon, min_cpm=cfg.min_control_cpm, target_sum=cfg.target_sum,
    )
    return table.as_arrays(genes)


def lfc_nmae_with_gate(
    full: Mapping[str, Any] | _de.DETable,
    half_a: Mapping[str, Any] | _de.DETable,
    half_b: Mapping[str, Any] | _de.DETable,
    *,
    genes: Sequence[str],
    targets: Any = None,
    config: V2026Config | None = None,
) -> tuple[float, int, dict[str, float]]:
    """The lfc_nmae replicate of one split (cell-eval2 ``lfc_nmae_ref._nmae_ref_from_tables``).

    The gate and the denominator come from ``full`` (the whole reference's DE table): genes with
    ``p_adj < alpha`` and a finite lfc, the perturbation's own gene removed (resolved against the
    genes ``full`` tests, as the metric does); only the two fold-change vectors come from the
    halves' tables (each half tested against its own control cells), a gene a half did not test
    reading as 0. Per perturbation ``mean|lfc_a - lfc_b| / mean|lfc_full|`` when the gate holds at
    least ``min_gate_size`` genes and the denominator is finite and non-zero.

    Tables: :func:`de_arrays` dicts (or ``DETable``). Returns ``(mean, n, {pert: value})``; the
    mean is NaN when no perturbation qualifies. Raises when a gated perturbation has no tested
    gene in a half (cell-eval2 refuses that split).
    """
    cfg = config if config is not None else V2026Config()
    genes = [str(g) for g in genes]

    def _arr(t: Any) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray]:
        if isinstance(t, _de.DETable):
            return list(t.perts), t.kept, np.where(t.kept[None, :], t.lfc, np.nan), t.p_adj
        lfc = np.asarray(t["lfc"], dtype=np.float64)
        kept = np.asarray(t["kept"], dtype=bool) if "kept" in t else ~np.all(np.isnan(lfc), axis=0)
        return [str(p) for p in t["perts"]], kept, lfc, np.asarray(t["p_adj"], dtype=np.float64)

    perts, kept_f, lfc_f, padj_f = _arr(full)
    mapping, _panel = _split_targets(targets)
    cols = _de_own_columns(perts, {g: j for j, g in enumerate(genes)}, mapping, kept_f)
    gate = kept_f[None, :] & (padj_f < cfg.p_adj_threshold) & np.isfinite(lfc_f)
    for i in np.flatnonzero(cols >= 0):
        gate[i, cols[i]] = False
    halves = []
    for name, t in (("A", half_a), ("B", half_b)):
        hp, hk, hl, _ = _arr(t)
        pos = {p: k for k, p in enumerate(hp)}
        gated = [p for i, p in enumerate(perts) if gate[i].any()]
        absent = [p for p in gated if p not in pos or not hk.any()]
        if absent:
            msg = (
                f"lfc_nmae replicate: {len(absent)} gated perturbation(s) have no tested gene in split "
                f"half {name} (e.g. {absent[0]!r})"
            )
            raise InputError(msg)
        v = np.zeros_like(lfc_f)
        for i, p in enumerate(perts):
            k = pos.get(p)
            if k is not None:
                row = np.where(hk, hl[k], np.nan)
                v[i] = np.where(np.isfinite(row), row, 0.0)
        halves.append(v)
    a, b = halves
    values: dict[str, float] = {}
    for i, p in enumerate(perts):
        m = gate[i]
        n = int(m.sum())
        if n < cfg.min_gate_size:
            continue
        den = float(np.abs(lfc_f[i, m]).mean())
        if not math.isfinite(den) or den == 0.0:
            continue
        values[p] = float(np.abs(a[i, m] - b[i, m]).mean()) / den
    if not values:
        return math.nan, 0, values
    return float(np.mean([values[p] for p in sorted(values)])), len(values), values


_GUARDED = guard_numba_cache(globals())
