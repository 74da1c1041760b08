"""The six VCC 2026 metrics of one context (cell-eval2 0.20.0 ``--preset vcc2026``), from raw counts:
the reference side prepared once (:func:`prepare_real`) and a prediction scored against it
(:func:`score_context`).

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

The metrics
    Each metric's rules stand with its code: ``pds_cosine`` in :mod:`._pds`;
    ``expr_mse_unbiased_capped_norm`` in :mod:`._expr` (its sampling correction, the groups'
    delete-one jackknife, in :mod:`._jackknife`); the four ``de_wilcoxon_*`` metrics, the DE table
    alone and the lfc_nmae replicate estimator in :mod:`._de_metrics` (the DE tables themselves:
    :mod:`._de`); which gene is a perturbation's own (``targets``) in :mod:`._targets`; the
    parameters, names and result types in :mod:`._config`.

Aggregates (``run.aggregate_metrics``)
    The mean of the finite per-perturbation values (NaN when there are none; cell-eval2 then
    emits no row for the metric); the expression metric is its ratio of sums (:mod:`._expr`).

Precision and order
    All arithmetic is float64 whatever the input dtype (float32, float64 or integer counts are
    read exactly). Sums run over a group's cells in input row order, as cell-eval2's do, which is
    exact for counts; for fractional input (the baseline) a different row order could move the
    last bit. PDS distances and the DE quantities (lfc, p-value, BH ``p_adj``, the tested gene
    set) are bit-identical to cell-eval2's; the expression legs and the fold-change means agree
    to ~1e-15.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from celltwin.errors import InputError
from celltwin.eval.v2026 import _counts, _de
from celltwin.eval.v2026._config import (
    EXPR,
    EXPR_D,
    EXPR_N,
    FIDELITY,
    JACCARD,
    NMAE,
    PDS,
    PER_PERT_COLUMNS,
    REACH,
    ContextCounts,
    V2026Config,
    V2026Result,
)
from celltwin.eval.v2026._de_metrics import _de_metrics
from celltwin.eval.v2026._expr import _distance, _numerator, _ratio_of_sums
from celltwin.eval.v2026._pds import _pds
from celltwin.eval.v2026._sides import _check_genes, _de_scale, _group_stats, _profiles, _Side, _side
from celltwin.eval.v2026._targets import _de_own_columns, _own_columns, _split_targets, _targets_key

__all__ = ["RealStats", "prepare_real", "score_context"]


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
    D = _distance(profiles, ctrl_profile, jk[: len(perts)], jk[len(perts)], own, len(genes))

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


def _mean_finite(x: np.ndarray) -> float:
    x = np.asarray(x, dtype=np.float64)
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


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
