"""The six VCC 2026 metrics of one context (cell-eval2 0.20.0 ``--preset vcc2026``), from raw counts.

Every rule below is cell-eval2's, read from its source (``metrics/discrimination.py``,
``metrics/delta.py``, ``moments.py``, ``prep.py``, ``metrics/de.py``, ``metrics/direction.py``,
``run.py``, ``lfc_nmae_ref.py``) and checked against it in ``tests/eval/test_v2026_metrics.py``;
the metric definitions are ``/work/shared/reference/vcc2026-metrics-spec.md``. Parameters are
:class:`V2026Config` (``configs/vcc2026.yaml``).

Sides and controls
    ``real`` is the reference of the context, ``pred`` the submission. Under the competition rule
    (``control_source: real``) the *reference's* control cells are the origin on both sides: the
    predicted PDS effect is ``b_pred - b_ctrl(real)`` and the prediction's DE tests its cells
    against the reference's control cells. Control rows in ``pred`` are therefore never read
    (cell-eval2 requires the label to be present and then ignores the cells; celltwin accepts a
    prediction without control rows). ``score_context(..., pred_controls=...)`` is cell-eval2's
    ``control_source: pred`` instead, which its replicate anchor runs: each split half uses its
    own control cells (the PDS origin, the DE reference group and that side's CPM gene filter).
    Perturbations are the reference's non-control labels, sorted (``np.unique``); the prediction
    must carry exactly those (``InputError`` otherwise).

Which gene is a perturbation's own (cell-eval2 ``target_gene_map``; ``targets`` here)
    By default a label is its own gene symbol. ``targets`` may be a mapping ``label -> gene``
    (``None`` declares "no target gene"; a ``"*": None`` entry declares it for every unmapped
    label), exactly cell-eval2's ``target_gene_map``; or a sequence of gene symbols, which
    replaces the *panel* set PDS removes (default: the genes of all reference labels) while each
    label stays its own gene. Expression and PDS resolve a label against the whole gene axis;
    the DE metrics resolve an unmapped label only against the genes the reference's DE table
    keeps (the CPM filter), and a mapped one authoritatively. When no label resolves (and none is
    declared) cell-eval2 refuses to score, and so does this module (``InputError``).

pds_cosine (``discrimination_score``, cosine, panel exclusion, mid-rank, ``n - 1``)
    Profiles ``b = log1p(P * (5e4 / sum_g P))`` per group from float64 group sums (a group with no
    counts is all zeros); effects ``b_p - b_ctrl``; every panel target gene column removed from
    both effect matrices (``eff[:, keep]``); ``d = clip(1 - <a, b> / (|a| |b|), 0, 2)`` from one
    BLAS product ``pred @ real.T`` and ``einsum`` norms, ``d = 1`` when either norm is 0.
    ``PDS_p = 1 - k_p / (n - 1)`` with ``k_p = #{d < d_pp} + (#{d == d_pp} - 1) / 2`` (NaN
    distances count as farther); ``n - 1 <= 0`` gives 1. The numpy operations (shapes, layouts,
    order) are cell-eval2's, so the distances are bit-identical and ties fall the same way.

expr_mse_unbiased_capped_norm (``mse_unbiased_capped`` / ``distance_unbiased``, ratio of sums)
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
    ``N_p = (|b_pred - b_real|^2 - rho min(C_pred, C_real) - C_real) / G_p`` and
    ``D_p = (|b_real - b_ctrl|^2 - C_real - C_ctrl) / G_p``, both over the genes except the
    perturbation's own (``G_p = G - 1`` when it resolves; the corrections stay whole);
    ``rho = min(1, B / sum_q w_q min(C_pred,q, C_real,q))`` (only applied when the claim is > 0)
    with ``w = 1 / G_p`` and ``B`` the ``w``-weighted across-perturbation centred sum of squares of
    the predicted profiles, each row's own gene left out (``_across_pert_budget``). The metric is
    ``sum N / sum D`` over perturbations finite on both (``InputError`` when ``sum D <= 0``:
    cell-eval2 refuses such a reference too). ``N_p`` and ``D_p`` are reported per perturbation.

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

Aggregates (``run.aggregate_metrics``)
    The mean of the finite per-perturbation values (NaN when there are none; cell-eval2 then
    emits no row for the metric); the expression metric is the ratio of sums above.

Precision and order
    All arithmetic is float64 whatever the input dtype (float32, float64 or integer counts are
    read exactly). Sums run over a group's cells in input row order, as cell-eval2's do, which is
    exact for counts; for fractional input (the baseline) a different row order could move the
    last bit. PDS distances and the DE quantities (lfc, p-value, BH ``p_adj``, the tested gene
    set) are bit-identical to cell-eval2's; the expression legs and the fold-change means agree
    to ~1e-15.

The replicate (cell-eval2 ``anchor.py``, ``lfc_nmae_ref.py``)
    Each split scores half B (the prediction) against half A with ``control_source: pred``:
    ``score_context(half_a, half_b, pred_controls=<half B's control cells>)``. Its
    ``extra["de_pred"]`` is then half B's own DE table (what :func:`de_arrays` of half B returns)
    and ``de_arrays(half_a, real_stats=prepare_real(half_a))`` half A's, so a split needs no
    further DE pass. ``de_wilcoxon_lfc_nmae``'s replicate is :func:`lfc_nmae_with_gate`: gate and
    denominator from the whole reference's table, only the fold changes from the halves.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numba as nb
import numpy as np
import scipy.sparse as sp

from celltwin.errors import ConfigError, InputError
from celltwin.eval import _kernels
from celltwin.eval.v2026 import _counts, _de

__all__ = [
    "AGG_METRICS",
    "PER_PERT_COLUMNS",
    "ContextCounts",
    "RealStats",
    "V2026Config",
    "V2026Result",
    "de_arrays",
    "jackknife",
    "lfc_nmae_with_gate",
    "prepare_real",
    "score_context",
]

PDS = "pds_cosine"
EXPR = "expr_mse_unbiased_capped_norm"
FIDELITY = "de_wilcoxon_direction_fidelity_yield_raw"
REACH = "de_wilcoxon_direction_reach_raw"
JACCARD = "de_wilcoxon_sig_jaccard"
NMAE = "de_wilcoxon_lfc_nmae"
EXPR_N = "expr_mse_unbiased_capped"
EXPR_D = "expr_distance_unbiased"

#: The six scored aggregates, in cell-eval2's catalog order.
AGG_METRICS = (PDS, EXPR, NMAE, FIDELITY, REACH, JACCARD)
#: Columns of :attr:`V2026Result.per_pert`.
PER_PERT_COLUMNS = (PDS, FIDELITY, REACH, JACCARD, NMAE, EXPR_N, EXPR_D)

#: The jackknife series (module docstring) converges like ``rho^k``, ``rho = max|e_i - ebar| / (1 - ebar)``;
#: a group with ``rho`` above this (or too few cells for the series to pay) uses the direct formula.
JACKKNIFE_SERIES_MAX_RATIO = 0.25
_SERIES_TOL = 1e-17
_SERIES_MAX_TERMS = 40


# --------------------------------------------------------------------------------------------
# inputs, configuration, results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class V2026Config:
    """The metric parameters of cell-eval2's ``configs/vcc2026.yaml`` (defaults = the competition).

    ``bulk_target_sum``: profile target sum TS (``bulk_target_sum: 5e4``); ``target_sum``: the DE
    per-cell normalisation (``target_sum: 1e6``, CPM); ``min_control_cpm``: the control-mean CPM a
    gene must exceed to be tested (``filter.filter_gene_min_cpm_cell: 5``; ``None`` = no filter);
    ``p_adj_threshold`` (``de.p_adj_threshold: 0.05``); ``epsilon``: lfc pseudocount
    (``de.epsilon: 1e-9``); ``reach_purity``: P0 of direction reach (``REACH_PURITY_FLOOR 0.9``);
    ``min_gate_size``: lfc_nmae gate (10); ``pred_cap_k``: the per-row cap factor on the
    prediction's jackknife (``PRED_TRACE_CAP_K 1.0``); ``max_counts_per_cell`` (``1e6``).
    """

    bulk_target_sum: float = 5e4
    target_sum: float = 1e6
    min_control_cpm: float | None = 5.0
    p_adj_threshold: float = 0.05
    epsilon: float = 1e-9
    reach_purity: float = 0.9
    min_gate_size: int = 10
    pred_cap_k: float = 1.0
    max_counts_per_cell: float = 1e6

    def __post_init__(self) -> None:
        for name in ("bulk_target_sum", "target_sum", "max_counts_per_cell"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                msg = f"V2026Config.{name}: expected a positive finite number, got {v!r}"
                raise ConfigError(msg)
        for name in ("p_adj_threshold", "reach_purity"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v <= 1):
                msg = f"V2026Config.{name}: expected a number in (0, 1], got {v!r}"
                raise ConfigError(msg)
        if not (isinstance(self.epsilon, int | float) and math.isfinite(self.epsilon) and self.epsilon >= 0):
            msg = f"V2026Config.epsilon: expected a finite number >= 0, got {self.epsilon!r}"
            raise ConfigError(msg)
        if self.min_control_cpm is not None and not (
            isinstance(self.min_control_cpm, int | float) and math.isfinite(self.min_control_cpm)
        ):
            msg = f"V2026Config.min_control_cpm: expected a finite number or None, got {self.min_control_cpm!r}"
            raise ConfigError(msg)
        if isinstance(self.min_gate_size, bool) or not isinstance(self.min_gate_size, int) or self.min_gate_size < 1:
            msg = f"V2026Config.min_gate_size: expected an integer >= 1, got {self.min_gate_size!r}"
            raise ConfigError(msg)
        if not (isinstance(self.pred_cap_k, int | float) and math.isfinite(self.pred_cap_k) and self.pred_cap_k >= 0):
            msg = f"V2026Config.pred_cap_k: expected a finite number >= 0, got {self.pred_cap_k!r}"
            raise ConfigError(msg)


@dataclass
class ContextCounts:
    """One context, one side: raw counts ``X`` ``(cells, genes)`` (CSR or dense; float32, float64
    or integer), per-cell perturbation labels ``perts`` and the gene names ``genes``."""

    X: Any
    perts: np.ndarray
    genes: list[str]


@dataclass
class V2026Result:
    """``per_pert``: one row per perturbation (index ``perturbation``, sorted), columns
    :data:`PER_PERT_COLUMNS` (NaN where a metric is not defined for it). ``agg``: the six metric
    aggregates (:data:`AGG_METRICS`) as cell-eval2 aggregates them. ``extra``: diagnostics
    (``rho``: the prediction's correction scale, ``n_tested_genes``, the DE tables)."""

    per_pert: Any
    agg: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# target genes
# --------------------------------------------------------------------------------------------

_UNMAPPED = object()


def _split_targets(targets: Any) -> tuple[dict[str, str | None] | None, list[str] | None]:
    """``(target_gene_map, panel_genes)`` from the ``targets`` argument."""
    if targets is None:
        return None, None
    if isinstance(targets, Mapping):
        return {str(k): (None if v is None else str(v)) for k, v in targets.items()}, None
    if isinstance(targets, str | bytes):
        msg = f"targets: expected a mapping label -> gene or a sequence of gene symbols, got the string {targets!r}"
        raise InputError(msg)
    return None, [str(t) for t in targets]


def _entry(mapping: dict[str, str | None] | None, label: str) -> Any:
    """cell-eval2 ``target_gene_entry``: a gene name, ``None`` (declared: no target gene) or
    ``_UNMAPPED`` (the label itself is matched)."""
    if not mapping:
        return _UNMAPPED
    if label in mapping:
        return mapping[label]
    if "*" in mapping and mapping["*"] is None:
        return None
    return _UNMAPPED


def _own_columns(labels: Sequence[str], gene_pos: dict[str, int], mapping: Any, who: str) -> np.ndarray:
    """Each label's own gene column over the whole gene axis (-1: none), cell-eval2
    ``resolve_exclusion_columns``; raises when no label resolves and none is declared."""
    cols = np.full(len(labels), -1, dtype=np.int64)
    n_ok = 0
    for i, lab in enumerate(labels):
        e = _entry(mapping, lab)
        if e is None:
            n_ok += 1
            continue
        c = gene_pos.get(lab if e is _UNMAPPED else e)
        if c is not None:
            cols[i] = c
            n_ok += 1
    if labels and n_ok == 0:
        msg = (
            f"{who}: no perturbation label names a measured gene (0 of {len(labels)}, e.g. "
            f"{list(labels)[:3]}), so no perturbation's own gene can be excluded; pass targets="
            "{label: gene} (or {label: None} for perturbations without a target gene)"
        )
        raise InputError(msg)
    return cols


def _de_own_columns(labels: Sequence[str], gene_pos: dict[str, int], mapping: Any, kept: np.ndarray) -> np.ndarray:
    """Own-gene column for the DE metrics (cell-eval2 ``resolve_target_genes`` against the
    reference DE table's features): a mapped label authoritatively, an unmapped one only when its
    gene is tested (kept) by the reference. Raises when nothing resolves and nothing is declared."""
    cols = np.full(len(labels), -1, dtype=np.int64)
    n_ok = 0
    for i, lab in enumerate(labels):
        e = _entry(mapping, lab)
        if e is None:
            n_ok += 1
            continue
        if e is _UNMAPPED:
            c = gene_pos.get(lab)
            if c is not None and kept[c]:
                cols[i] = c
                n_ok += 1
        else:
            n_ok += 1
            c = gene_pos.get(e)
            if c is not None:
                cols[i] = c
    if labels and n_ok == 0:
        msg = (
            f"DE metrics: no perturbation label names a gene tested in the reference DE table "
            f"(0 of {len(labels)}, e.g. {list(labels)[:3]}); pass targets={{label: gene}}"
        )
        raise InputError(msg)
    return cols


# --------------------------------------------------------------------------------------------
# the delete-one jackknife of a group profile
# --------------------------------------------------------------------------------------------


_JK_DIRECT_ROWS = 256  # rows per dense block of the direct formula
_JK_CHUNK = 1 << 16  # stored values per batch of the series form's per-value pass


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
            n_chunks = max(1, min(nb.get_num_threads(), n))
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


# --------------------------------------------------------------------------------------------
# one side's group statistics
# --------------------------------------------------------------------------------------------


def _profiles(sums: np.ndarray, ts: float) -> np.ndarray:
    """cell-eval2 ``bulk_lognorm_means``: ``log1p(P * (TS / sum_g P))``, an empty group all zeros."""
    totals = sums.sum(axis=1)
    scale = np.zeros_like(totals)
    ok = totals > 0
    scale[ok] = ts / totals[ok]
    return np.log1p(sums * scale[:, None])


@dataclass
class _Side:
    """A matrix with per-row totals, as every metric reads it."""

    X: sp.csr_matrix  # canonical CSR (a dense input is converted once)
    dense_input: bool
    labels: np.ndarray
    lib_seq: np.ndarray  # row totals summed entry by entry (CSR order)
    lib_pair: np.ndarray | None  # dense input: numpy's pairwise row totals


def _side(cc: Any, where: str, genes: list[str] | None = None) -> _Side:
    """``cc`` (a :class:`ContextCounts`, or a bare matrix: no labels) read once: canonical CSR, the
    input's format and both kinds of row totals."""
    bare = isinstance(cc, np.ndarray | sp.spmatrix | sp.sparray)
    A = _counts.as_matrix(cc if bare else cc.X, where)
    labels = None if bare else np.asarray(cc.perts, dtype=object).astype(str)
    if labels is not None and labels.shape[0] != A.shape[0]:
        msg = f"{where}: {A.shape[0]} cells but {labels.shape[0]} perturbation labels"
        raise InputError(msg)
    if genes is not None and A.shape[1] != len(genes):
        msg = f"{where}: {A.shape[1]} gene columns, expected {len(genes)} (the reference's genes)"
        raise InputError(msg)
    if sp.issparse(A):
        X = A
        lib_pair = None
    else:
        lib_pair = _counts.cell_totals(A)
        X = sp.csr_matrix(A)
        X.sum_duplicates()
    lib_seq = _counts.cell_totals(X)
    return _Side(X=X, dense_input=not sp.issparse(A), labels=labels, lib_seq=lib_seq, lib_pair=lib_pair)


def _de_scale(side: _Side, sparse_mode: bool, target_sum: float) -> np.ndarray:
    """scanpy ``normalize_total`` divisors ``c = L / target_sum`` (``1`` for an empty cell)."""
    lib = side.lib_pair if (not sparse_mode and side.lib_pair is not None) else side.lib_seq
    c = lib / float(target_sum)
    return c + (c == 0)


def _group_stats(side: _Side, groups: _de.Groups, cfg: V2026Config, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sums, profiles, jackknife)`` of ``groups`` (rows of ``side``)."""
    sums = _counts.group_sums(side.X, groups.order, groups.bounds, where)
    prof = _profiles(sums, cfg.bulk_target_sum)
    jk = jackknife(side.X, groups.order, groups.bounds, sums, side.lib_seq, cfg.bulk_target_sum)
    return sums, prof, jk


# --------------------------------------------------------------------------------------------
# the reference side
# --------------------------------------------------------------------------------------------


@dataclass
class RealStats:
    """Everything about the reference a scoring reads (:func:`prepare_real`); reusable across
    predictions scored against the same reference, control label, targets and config."""

    genes: list[str]
    perts: list[str]  # sorted non-control labels
    control: str
    config: V2026Config
    targets_key: Any
    side: _Side
    ctrl_rows: np.ndarray
    profiles: np.ndarray  # (n_perts, G), rows = perts
    ctrl_profile: np.ndarray  # (G,)
    jk: np.ndarray  # (n_perts,)
    jk_ctrl: float
    own_cols: np.ndarray  # expression / PDS own-gene column per pert (-1: none)
    panel_cols: np.ndarray  # PDS panel columns
    de: _de.DETable
    de_cols: np.ndarray  # DE own-gene column per pert (-1: none)
    D: np.ndarray  # expr_distance_unbiased per pert
    name_rank: np.ndarray  # rank of each gene name in code-point order


def _targets_key(targets: Any) -> Any:
    mapping, panel = _split_targets(targets)
    if mapping is not None:
        return ("map", tuple(sorted(mapping.items(), key=lambda kv: kv[0])))
    if panel is not None:
        return ("panel", tuple(panel))
    return None


def _check_genes(genes: Sequence[str], where: str) -> list[str]:
    genes = [str(g) for g in genes]
    if len(set(genes)) != len(genes):
        seen: set[str] = set()
        dup = next(g for g in genes if g in seen or seen.add(g))
        msg = f"{where}: gene names must be unique; {dup!r} appears more than once"
        raise InputError(msg)
    return genes


def prepare_real(
    real: ContextCounts,
    *,
    control: str = "non-targeting",
    targets: Any = None,
    config: V2026Config | None = None,
) -> RealStats:
    """The reference-side statistics of a context: profiles, jackknife corrections, ``D_p``, the
    DE table of every perturbation against the control, target-gene columns. Pass the result to
    :func:`score_context` (``real_stats=``) to score many predictions against one reference."""
    cfg = config if config is not None else V2026Config()
    genes = _check_genes(real.genes, "reference")
    side = _side(real, "reference", genes)
    labels = side.labels
    if labels is None:
        msg = "reference: perturbation labels are required"
        raise InputError(msg)
    uniq = sorted(set(labels.tolist()))
    if control not in uniq:
        msg = f"reference: the control label {control!r} labels no cell (labels: {uniq[:5]})"
        raise InputError(msg)
    perts = [p for p in uniq if p != control]
    if not perts:
        msg = f"reference: no perturbation besides the control {control!r}"
        raise InputError(msg)
    mapping, panel = _split_targets(targets)
    gene_pos = {g: j for j, g in enumerate(genes)}

    groups = _de.group_rows(labels, [*perts, control])
    _sums, prof, jk = _group_stats(side, groups, cfg, "reference")
    ctrl_rows = groups.rows(len(perts))
    profiles, ctrl_profile = prof[: len(perts)], prof[len(perts)]

    own = _own_columns(perts, gene_pos, mapping, "reference")
    if panel is None:
        panel_cols = np.unique(own[own >= 0])
    else:
        panel_cols = np.unique(np.asarray([gene_pos[g] for g in panel if g in gene_pos], dtype=np.int64))

    # expr_distance_unbiased (real side only)
    ctrl_b = np.broadcast_to(ctrl_profile, profiles.shape)
    d = profiles - ctrl_b
    summed = np.einsum("ij,ij->i", d, d) - jk[: len(perts)] - np.full(len(perts), jk[len(perts)])
    D = _drop_own(summed, profiles, ctrl_b, own, len(genes))

    tests = _de.Groups(labels=perts, order=groups.order[: groups.bounds[len(perts)]], bounds=groups.bounds[: len(perts) + 1])
    scale = _de_scale(side, not side.dense_input, cfg.target_sum)
    table = _de.de_side(
        side.X, tests, scale, side.X, ctrl_rows, scale, sparse_mode=not side.dense_input,
        epsilon=cfg.epsilon, min_cpm=cfg.min_control_cpm, target_sum=cfg.target_sum,
    )
    de_cols = _de_own_columns(perts, gene_pos, mapping, table.kept)
    name_rank = np.empty(len(genes), dtype=np.int64)
    name_rank[sorted(range(len(genes)), key=genes.__getitem__)] = np.arange(len(genes))
    return RealStats(
        genes=genes, perts=perts, control=control, config=cfg, targets_key=_targets_key(targets), side=side,
        ctrl_rows=ctrl_rows, profiles=profiles, ctrl_profile=ctrl_profile, jk=jk[: len(perts)],
        jk_ctrl=float(jk[len(perts)]), own_cols=own, panel_cols=panel_cols, de=table, de_cols=de_cols, D=D,
        name_rank=name_rank,
    )


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


# --------------------------------------------------------------------------------------------
# the metrics
# --------------------------------------------------------------------------------------------


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


def _mean_finite(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


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


# --------------------------------------------------------------------------------------------
# scoring
# --------------------------------------------------------------------------------------------


def _check_stats(rs: RealStats, real: ContextCounts, control: str, targets: Any, cfg: V2026Config) -> None:
    if rs.control != control:
        msg = f"real_stats: prepared for control {rs.control!r}, scoring with control {control!r}"
        raise InputError(msg)
    if rs.config != cfg:
        msg = "real_stats: prepared with another V2026Config than the one scoring uses"
        raise InputError(msg)
    if rs.targets_key != _targets_key(targets):
        msg = "real_stats: prepared with other targets than the ones scoring uses"
        raise InputError(msg)
    if real is not None and [str(g) for g in real.genes] != rs.genes:
        msg = "real_stats: prepared for another gene axis than the reference passed"
        raise InputError(msg)


def score_context(
    real: ContextCounts | None,
    pred: ContextCounts,
    *,
    control: str = "non-targeting",
    targets: Any = None,
    config: V2026Config | None = None,
    real_stats: RealStats | None = None,
    pred_controls: Any = None,
) -> V2026Result:
    """The six VCC 2026 metrics of one context (cell-eval2 0.20.0 ``--preset vcc2026``).

    ``real`` / ``pred``: :class:`ContextCounts` with the same genes in the same order.
    ``targets``: the perturbations' target genes (module docstring; default: each label is its own
    gene, the panel is every reference label). ``real_stats``: :func:`prepare_real` of ``real``
    with the same ``control`` / ``targets`` / ``config`` (then ``real`` may be ``None``).
    ``pred_controls``: control cells of the prediction side (a :class:`ContextCounts` - its
    labels are ignored - or a ``(cells, genes)`` matrix): the prediction's effects, DE and CPM
    filter then use them instead of the reference's controls (cell-eval2 ``control_source: pred``,
    what its replicate anchor scores each split half with). Default: the reference's controls,
    and the prediction's own control rows, if any, are ignored.

    Values are not checked for integrality here (:func:`celltwin.eval.v2026.check_counts` is the
    input rule; the mean-response baseline is fractional); negative or non-finite values raise.
    """
    cfg = config if config is not None else V2026Config()
    if real_stats is None:
        if real is None:
            msg = "score_context: pass the reference (real) or its prepare_real statistics"
            raise InputError(msg)
        real_stats = prepare_real(real, control=control, targets=targets, config=cfg)
    else:
        _check_stats(real_stats, real, control, targets, cfg)
    rs = real_stats
    genes = rs.genes
    pg = [str(g) for g in pred.genes]
    if pg != genes:
        msg = (
            f"prediction: the gene axis differs from the reference's ({len(pg)} vs {len(genes)} genes"
            + (")" if len(pg) != len(genes) else f"; first difference at column {next(i for i, (a, b) in enumerate(zip(pg, genes, strict=True)) if a != b)})")
        )
        raise InputError(msg)
    ps = _side(pred, "prediction", genes)
    labels = ps.labels
    present = set(labels.tolist()) - {control}
    missing = sorted(set(rs.perts) - present)
    extra = sorted(present - set(rs.perts))
    if missing or extra:
        msg = (
            f"prediction: perturbations differ from the reference's: {len(missing)} missing "
            f"(e.g. {missing[:5]}), {len(extra)} not in the reference (e.g. {extra[:5]})"
        )
        raise InputError(msg)
    K = len(rs.perts)
    groups = _de.group_rows(labels, rs.perts)
    _sums, prof, jk = _group_stats(ps, groups, cfg, "prediction")

    own_ctrl = pred_controls is not None
    if own_ctrl:
        cs = _side(pred_controls, "prediction controls", genes)
        if cs.X.shape[0] == 0:
            msg = "prediction controls: no cells"
            raise InputError(msg)
        c_groups = _de.Groups(labels=[control], order=np.arange(cs.X.shape[0], dtype=np.int64),
                              bounds=np.asarray([0, cs.X.shape[0]], dtype=np.int64))
        c_sums = _counts.group_sums(cs.X, c_groups.order, c_groups.bounds, "prediction controls")
        origin = _profiles(c_sums, cfg.bulk_target_sum)[0]
    else:
        origin = rs.ctrl_profile

    # PDS (effects against the origin; the reference's effects against its own control)
    pds = _pds(prof - origin, rs.profiles - rs.ctrl_profile, rs.panel_cols)

    # expression
    N, rho = _numerator(rs, prof, jk, cfg)
    D = rs.D

    # DE
    if own_ctrl:
        sparse_mode = not (ps.dense_input and cs.dense_input)
        ctrl_side, ctrl_rows = cs, np.arange(cs.X.shape[0], dtype=np.int64)
    else:
        sparse_mode = not (ps.dense_input and rs.side.dense_input)
        ctrl_side, ctrl_rows = rs.side, rs.ctrl_rows
    table = _de.de_side(
        ps.X, _de.Groups(labels=rs.perts, order=groups.order, bounds=groups.bounds),
        _de_scale(ps, sparse_mode, cfg.target_sum), ctrl_side.X, ctrl_rows,
        _de_scale(ctrl_side, sparse_mode, cfg.target_sum), sparse_mode=sparse_mode,
        epsilon=cfg.epsilon, min_cpm=cfg.min_control_cpm, target_sum=cfg.target_sum,
    )
    dem = _de_metrics(rs, table, cfg)

    import pandas as pd

    per = pd.DataFrame(
        {PDS: pds, FIDELITY: dem[FIDELITY], REACH: dem[REACH], JACCARD: dem[JACCARD], NMAE: dem[NMAE],
         EXPR_N: N, EXPR_D: D},
        index=pd.Index(rs.perts, name="perturbation"),
        columns=list(PER_PERT_COLUMNS),
    )
    agg = {
        PDS: _mean_finite(pds),
        EXPR: _ratio_of_sums(N, D),
        NMAE: _mean_finite(dem[NMAE]),
        FIDELITY: _mean_finite(dem[FIDELITY]),
        REACH: _mean_finite(dem[REACH]),
        JACCARD: _mean_finite(dem[JACCARD]),
    }
    extra = {"rho": rho, "n_tested_genes": int(table.kept.sum()), "de_pred": table, "de_real": rs.de,
             "n_perturbations": K}
    return V2026Result(per_pert=per, agg=agg, extra=extra)


# --------------------------------------------------------------------------------------------
# DE tables alone, and the lfc_nmae replicate estimator
# --------------------------------------------------------------------------------------------


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


_GUARDED = _kernels.guard_numba_cache(globals())
