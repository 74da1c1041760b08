"""The VCC 2026 competition scale of one context: baseline ``b``, replicate ``r``, scaled ``s``.

Each of the six ``vcc2026`` metrics (:data:`METRICS`) is reported on the scale

    s = (u - b) / (r - b)

where ``u`` is the submission's aggregate, ``b`` the aggregate of the mean-perturbation baseline
scored as an ordinary submission (:func:`build_baseline`) and ``r`` the reference scored against
itself by split halves (:func:`replicate_scores`). A context's score is the equal-weight mean of
the six ``s`` (:func:`context_score`); contexts are averaged by the caller (``_run``).

This is celltwin's own implementation of the conventions of cell-eval2 0.20.0 ``--preset
vcc2026`` (``baseline.build_generic_baseline``, ``ceiling._disjoint_halves``,
``anchor.compute_replicate_anchor``, ``lfc_nmae_ref``, ``scoring.score_one``), written from its
documented behaviour and checked value for value against it in ``tests/eval/test_v2026_scale.py``.
The conventions, one by one:

Baseline ``b`` (cell-eval2 ``build_generic_baseline(emit="dispersed", seed=0,
exclude_target_gene=True)``):

* profile: the mean count vector of every non-control perturbation (mean over its cells, in the
  reference's own counts, float64), averaged with equal weight over the perturbations; gene ``g``
  leaves out the perturbation whose label is ``g`` (its own knockdown). No cell-count or
  knockdown-efficiency filter is applied here: in the competition the panel is already filtered
  (300 constructs per context passing both filters, see the spec's section 0), and cell-eval2
  0.20.0 averages over every non-control perturbation of the reference it is given. Pass
  ``perturbations=`` to restrict the average to a filtered subset of a larger file.
* emission as cells ("dispersed"): every perturbation keeps its real number of cells; each of them
  is a control cell drawn with replacement (``numpy.random.default_rng(seed).integers(0, n_ctrl,
  size=n_p)``, one call per perturbation in sorted label order, seed 0), its genes multiplied by
  ``profile[g] / control_mean[g]`` (0 where the control mean is 0), rounded to float32, explicit
  zeros dropped. The control rows are the reference's own control cells (float32). So each
  group's expected mean count is exactly the profile, and the cells keep a realistic spread for
  the DE test and the sampling correction of the expression error.
* the prediction is scored like a submission (control cells of the reference on both sides).

Replicate ``r`` (cell-eval2 ``compute_replicate_anchor(base_seed=0, n_splits=5)``):

* seeds: ``numpy.random.SeedSequence(0).generate_state(5)`` (five uint32 seeds).
* split, per seed: ``rng = numpy.random.default_rng(seed)``; the groups (every perturbation and
  the control) in pandas ``groupby`` order (sorted labels; the category order of a categorical
  column, :func:`group_order`), each permuted with ``rng.permutation`` over its cell positions;
  half A takes the first ``floor(n/2)`` cells, half B the next ``floor(n/2)``; the odd cell left
  over is dropped, a group of one cell is dropped from both halves.
* each half keeps its own control cells: half B is scored as the prediction against half A with
  half B's controls as the prediction's control (cell-eval2 forces ``control_source="pred"`` for
  the anchor), so the two halves share no control noise.
* ``de_wilcoxon_lfc_nmae`` uses the full-reference gate (estimator ``full_gate_raw``, the spec's
  section 6): the gate (reference-significant genes with a finite reference log2 fold change,
  own target gene removed, at least 10 genes) and the denominator come from the FULL reference's
  DE table, only the two fold-change vectors come from the halves (each half's DE against its own
  control; a gene a half does not report, or reports non-finite, is 0). Per perturbation
  ``mean|lfc_A - lfc_B| / mean|lfc_full|`` over the gate, averaged over the perturbations kept.
  Refused when a perturbation has fewer than 2 cells (it would not reach both halves).
* ``r`` is the mean over the five seeds of the per-seed aggregates.

Scaled value ``s`` (cell-eval2 ``score.score_metrics(real_bundle=...)`` / ``scoring.score_one``):

* higher-is-better members (``pds_cosine`` and the three DE members in [0, 1]): ``(u - b)/(r - b)``
  unclamped; a missing or non-finite ``u`` scores as the metric's worst value 0.
* ``expr_mse_unbiased_capped_norm`` (lower is better): ``1 - (u - r)/(b - r)`` clamped to
  ``[0, 1]``; a missing ``u`` scores 0.
* ``de_wilcoxon_lfc_nmae`` (lower is better): ``1 - (u - r)/(b - r)``, floored at -6; a missing
  ``u`` scores -6.
* a metric whose ``r`` is not strictly on the better side of ``b`` has no scale: refused
  (:class:`ScaleError`).
* the context score is the mean of the six in the order lower-is-better members (sorted by name)
  then higher-is-better members (sorted by name), the order cell-eval2 averages them in.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval.v2026 import _metrics as M
from celltwin.eval.v2026._counts import check_counts
from celltwin.eval.v2026._metrics import (
    ContextCounts,
    V2026Config,
    V2026Result,
    de_arrays,
    lfc_nmae_with_gate,
    prepare_real,
    score_context,
)

__all__ = [
    "BASE_SEED",
    "METRICS",
    "N_SPLITS",
    "POLICIES",
    "BaselineProfile",
    "ContextCounts",
    "Policy",
    "ReplicateResult",
    "ScaleError",
    "V2026Config",
    "V2026Result",
    "baseline_profile",
    "build_baseline",
    "check_counts",
    "context_score",
    "default_config",
    "derive_seeds",
    "group_order",
    "prepare_real",
    "replicate_scores",
    "scale",
    "scale_one",
    "score_context",
    "split_halves",
]

logger = logging.getLogger(__name__)

#: The six scored members of the ``vcc2026`` profile.
METRICS: tuple[str, ...] = (
    "pds_cosine",
    "expr_mse_unbiased_capped_norm",
    "de_wilcoxon_direction_fidelity_yield_raw",
    "de_wilcoxon_direction_reach_raw",
    "de_wilcoxon_sig_jaccard",
    "de_wilcoxon_lfc_nmae",
)
#: The pinned base seed of the replicate's splits and the number of splits (cell-eval2
#: ``competition.BASE_SEED`` / ``N_SPLITS``).
BASE_SEED = 0
N_SPLITS = 5
#: Seed of the baseline's cell emission (cell-eval2 ``build_generic_baseline(seed=0)``).
BASELINE_SEED = 0
LFC_NMAE = "de_wilcoxon_lfc_nmae"


class ScaleError(InputError):
    """A metric of a context has no usable scale (``r`` not strictly better than ``b``)."""


@dataclass(frozen=True)
class Policy:
    """How ``u`` is placed on the scale: direction, clamps, the value of a missing ``u``."""

    direction: str  # "higher" or "lower"
    clamp_low: float = -math.inf
    clamp_high: float = math.inf
    #: the metric's structural worst value, scored in place of a missing / non-finite ``u`` when
    #: the scale has no finite floor (the four unclamped members in [0, 1])
    worst: float | None = None


POLICIES: dict[str, Policy] = {
    "pds_cosine": Policy("higher", worst=0.0),
    "de_wilcoxon_direction_fidelity_yield_raw": Policy("higher", worst=0.0),
    "de_wilcoxon_direction_reach_raw": Policy("higher", worst=0.0),
    "de_wilcoxon_sig_jaccard": Policy("higher", worst=0.0),
    "expr_mse_unbiased_capped_norm": Policy("lower", clamp_low=0.0, clamp_high=1.0),
    "de_wilcoxon_lfc_nmae": Policy("lower", clamp_low=-6.0),
}
#: Order in which the six scaled values are averaged (lower-is-better, then higher, each sorted).
SCORE_ORDER: tuple[str, ...] = tuple(
    sorted(m for m in METRICS if POLICIES[m].direction == "lower")
    + sorted(m for m in METRICS if POLICIES[m].direction == "higher")
)


def default_config() -> V2026Config:
    """The competition's metric parameters (``configs/vcc2026.yaml``)."""
    return V2026Config()


# ---------------------------------------------------------------------------------------------
# small helpers over a context


def _labels(cc: Any) -> np.ndarray:
    return np.asarray(cc.perts).astype(str)


def _csr(cc: Any) -> sp.csr_matrix:
    x = cc.X
    return x if sp.isspmatrix_csr(x) or isinstance(x, sp.csr_array) else sp.csr_matrix(x)


def _make(cc: Any, X: Any, perts: np.ndarray) -> ContextCounts:
    """A ContextCounts with ``cc``'s genes and other cells."""
    return ContextCounts(X=sp.csr_matrix(X), perts=np.asarray(perts).astype(str), genes=list(cc.genes))


def _target_columns(labels: Sequence[str], genes: Sequence[str], targets: Any) -> dict[int, int]:
    """``{index into labels -> gene column}`` of each perturbation whose own gene is measured, by
    the metrics' own resolver (cell-eval2 ``resolve_exclusion_columns``: a label is its gene symbol
    unless ``targets`` maps it; refused when no label resolves)."""
    mapping, _panel = M._split_targets(targets)
    cols = M._own_columns(list(labels), {g: j for j, g in enumerate(genes)}, mapping, "baseline")
    return {i: int(c) for i, c in enumerate(cols) if c >= 0}


def group_order(values: Any) -> list[str]:
    """Labels of ``values`` (an obs column) in the order pandas ``groupby(observed=True)`` visits
    them: the category order for a categorical column (unused categories skipped), else sorted.

    The replicate's split draws its permutations group by group in this order, so it decides which
    cells land in which half.
    """
    import pandas as pd

    s = pd.Series(values)
    if isinstance(s.dtype, pd.CategoricalDtype):
        used = set(s.astype(str).unique())
        return [str(c) for c in s.cat.categories if str(c) in used]
    return sorted(set(s.astype(str)))


# ---------------------------------------------------------------------------------------------
# the baseline


@dataclass(frozen=True)
class BaselineProfile:
    """The mean perturbation response of a context (float64, one value per gene)."""

    values: np.ndarray
    perturbations: tuple[str, ...]
    n_excluded: int  # (perturbation, gene) terms left out for being the perturbation's own gene


def _group_means(X: sp.csr_matrix, labels: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Mean count vector of each group (float64), as ``X[rows].mean(axis=0)`` over its cells."""
    out = np.zeros((len(groups), X.shape[1]), dtype=np.float64)
    for k, g in enumerate(groups):
        rows = np.flatnonzero(labels == g)
        sub = X[rows]
        sub = sp.csr_matrix((sub.data.astype(np.float64), sub.indices, sub.indptr), shape=sub.shape)
        out[k] = np.asarray(sub.mean(axis=0)).ravel()
    return out


def baseline_profile(
    real: Any,
    *,
    control: str = "non-targeting",
    targets: Mapping[str, Any] | None = None,
    perturbations: Sequence[str] | None = None,
) -> BaselineProfile:
    """The context's mean perturbation response: equal-weight mean over the non-control
    perturbations of their mean count vectors; gene ``g`` leaves out the perturbation targeting
    ``g``. ``perturbations`` restricts the average (e.g. to the constructs passing a cell-count /
    knockdown filter); default: every non-control perturbation of ``real``."""
    labels = _labels(real)
    genes = list(real.genes)
    perts = sorted(set(labels.tolist()) - {control})
    if perturbations is not None:
        unknown = sorted(set(map(str, perturbations)) - set(perts))
        if unknown:
            msg = f"baseline: perturbation(s) {unknown[:5]} are not in the reference"
            raise InputError(msg)
        perts = sorted(set(map(str, perturbations)))
    if not perts:
        msg = f"baseline: the reference has no perturbation besides the control {control!r}"
        raise InputError(msg)
    bulk = _group_means(_csr(real), labels, perts)
    total = bulk.sum(axis=0)
    count = np.full(len(genes), float(len(perts)))
    cols = _target_columns(perts, genes, targets)
    for i, j in cols.items():
        total[j] -= bulk[i, j]
        count[j] -= 1.0
    empty = np.flatnonzero(count <= 0)
    if empty.size:
        names = [genes[j] for j in empty[:5]]
        msg = f"baseline: every perturbation targets gene(s) {names}; their mean response is undefined"
        raise InputError(msg)
    return BaselineProfile(values=total / count, perturbations=tuple(perts), n_excluded=len(cols))


def build_baseline(
    real: Any,
    *,
    control: str = "non-targeting",
    targets: Mapping[str, Any] | None = None,
    perturbations: Sequence[str] | None = None,
    seed: int = BASELINE_SEED,
    profile: BaselineProfile | None = None,
) -> Any:
    """The mean-perturbation baseline of a context as a prediction (a ContextCounts, float32 CSR).

    Same cells as ``real`` in the same order: every perturbation keeps its number of cells, each
    cell a control cell drawn with replacement and scaled gene-wise to the profile (see the module
    docstring); the control rows are ``real``'s control cells. The values are fractional (a mean
    is), so the prediction is scored without the integral-counts check.
    """
    labels = _labels(real)
    X = _csr(real)
    ctrl = np.flatnonzero(labels == control)
    if ctrl.size == 0:
        msg = f"baseline: control {control!r} has no cells in the reference"
        raise InputError(msg)
    if profile is None:
        profile = baseline_profile(real, control=control, targets=targets, perturbations=perturbations)
    ctrl_X = X[ctrl]
    ctrl_mean = np.asarray(
        sp.csr_matrix(
            (ctrl_X.data.astype(np.float64), ctrl_X.indices, ctrl_X.indptr), shape=ctrl_X.shape
        ).mean(axis=0)
    ).ravel()
    zero = ctrl_mean <= 0
    factor = np.where(zero, 0.0, profile.values / np.where(zero, 1.0, ctrl_mean))

    rng = np.random.default_rng(seed)
    groups = sorted(set(labels.tolist()) - {control})
    positions = [np.flatnonzero(labels == g) for g in groups]
    draws = [rng.integers(0, ctrl.size, size=int(p.size)) for p in positions]
    source = np.concatenate(draws).astype(np.intp) if draws else np.empty(0, np.intp)
    emitted = ctrl_X[source].tocsr().copy()
    emitted.data = (emitted.data * factor[emitted.indices]).astype(np.float32)
    emitted.eliminate_zeros()

    ctrl_rows = ctrl_X.astype(np.float32)
    stacked = sp.vstack([emitted, ctrl_rows], format="csr")
    where = np.concatenate([*positions, ctrl]) if positions else ctrl
    order = np.empty(labels.size, dtype=np.intp)
    order[where] = np.arange(labels.size, dtype=np.intp)
    out = stacked[order].tocsr()
    return _make(real, out, labels)


# ---------------------------------------------------------------------------------------------
# the replicate


def derive_seeds(base_seed: int = BASE_SEED, n_splits: int = N_SPLITS) -> list[int]:
    """The split seeds: ``numpy.random.SeedSequence(base_seed).generate_state(n_splits)``."""
    if n_splits < 1:
        msg = f"replicate: the number of splits must be >= 1, got {n_splits}"
        raise InputError(msg)
    return [int(s) for s in np.random.SeedSequence(int(base_seed)).generate_state(int(n_splits))]


def split_halves(real: Any, *, seed: int, order: Sequence[str] | None = None) -> tuple[Any, Any]:
    """Two disjoint halves of ``real`` (ContextCounts A, B): per group ``floor(n/2)`` cells each.

    ``order``: the groups in the order their permutations are drawn (:func:`group_order`;
    default sorted labels). A group of one cell is dropped from both halves; the odd cell out of
    an odd group is dropped.
    """
    labels = _labels(real)
    groups = list(order) if order is not None else sorted(set(labels.tolist()))
    missing = set(labels.tolist()) - set(groups)
    if missing:
        msg = f"replicate: group order misses label(s) {sorted(missing)[:5]}"
        raise InputError(msg)
    rng = np.random.default_rng(int(seed))
    a_rows: list[np.ndarray] = []
    b_rows: list[np.ndarray] = []
    for g in groups:
        idx = np.flatnonzero(labels == g)
        if idx.size == 0:
            continue
        perm = rng.permutation(idx)
        h = perm.size // 2
        if h < 1:
            continue
        a_rows.append(perm[:h])
        b_rows.append(perm[h : 2 * h])
    if not a_rows:
        msg = "replicate: no group has 2 or more cells to split"
        raise InputError(msg)
    X = _csr(real)
    ra, rb = np.concatenate(a_rows), np.concatenate(b_rows)
    return _make(real, X[ra], labels[ra]), _make(real, X[rb], labels[rb])


@dataclass
class ReplicateResult:
    """The replicate of one context: ``r`` per metric and the per-split values behind it."""

    r: dict[str, float]
    seeds: list[int]
    #: one row per (split, metric): split_index, seed, metric, value, n_perturbations
    splits: list[dict[str, Any]] = field(default_factory=list)
    estimator: dict[str, str] = field(default_factory=dict)


def replicate_scores(
    real: Any,
    *,
    control: str = "non-targeting",
    targets: Any = None,
    config: Any = None,
    seeds: int | Sequence[int] = N_SPLITS,
    base_seed: int = BASE_SEED,
    order: Sequence[str] | None = None,
    real_stats: Any = None,
    progress: Any = None,
) -> ReplicateResult:
    """The replicate ``r`` of each metric: the reference scored against itself by split halves.

    ``seeds``: the number of splits (seeds derived from ``base_seed``, :func:`derive_seeds`) or
    explicit seeds. ``order``: the group order of the split (:func:`group_order`; default sorted
    labels). Each split scores half B as the prediction against half A, half B's own control cells
    as the prediction's control (``score_context(..., pred_controls=...)``);
    ``de_wilcoxon_lfc_nmae`` is replaced by the full-reference-gate estimator
    (``_metrics.lfc_nmae_with_gate``: gate and denominator from ``real``'s DE table, the fold
    changes from each half's DE against its own control). ``r`` is the mean of the per-split
    aggregates. ``real_stats``: :func:`prepare_real` of ``real`` (its DE table is the gate).
    """
    cfg = config if config is not None else default_config()
    labels = _labels(real)
    uniq, counts = np.unique(labels, return_counts=True)
    thin = [str(g) for g, n in zip(uniq, counts, strict=True) if n < 2]
    if thin:
        msg = (
            f"replicate: {len(thin)} group(s) of the reference have fewer than 2 cells (e.g. {thin[0]!r}); "
            "every perturbation needs 2 or more cells to reach both split halves"
        )
        raise InputError(msg)
    if control not in set(uniq.tolist()):
        msg = f"replicate: control {control!r} has no cells in the reference"
        raise InputError(msg)
    seed_list = derive_seeds(base_seed, seeds) if isinstance(seeds, int) else [int(s) for s in seeds]
    if real_stats is None:
        real_stats = prepare_real(real, control=control, targets=targets, config=cfg)
    de_full = real_stats.de
    genes = list(real.genes)
    splits: list[dict[str, Any]] = []
    per_metric: dict[str, list[float]] = {m: [] for m in METRICS}
    for i, seed in enumerate(seed_list):
        half_a, half_b = split_halves(real, seed=seed, order=order)
        stats_a = prepare_real(half_a, control=control, targets=targets, config=cfg)
        b_ctrl = sp.csr_matrix(half_b.X)[np.flatnonzero(_labels(half_b) == control)]
        res = score_context(
            half_a,
            half_b,
            control=control,
            targets=targets,
            config=cfg,
            real_stats=stats_a,
            pred_controls=b_ctrl,
        )
        vals = {m: float(res.agg.get(m, math.nan)) for m in METRICS}
        ns = _cohort_sizes(res)
        # half B's table against its own controls is the prediction side's table of this split
        de_b = res.extra.get("de_pred") if isinstance(getattr(res, "extra", None), dict) else None
        if de_b is None:
            de_b = de_arrays(half_b, control=control, config=cfg)
        v, n, _ = lfc_nmae_with_gate(de_full, stats_a.de, de_b, genes=genes, targets=targets, config=cfg)
        if not math.isfinite(v):
            msg = (
                f"replicate: no perturbation has {cfg.min_gate_size} or more reference-significant genes, so "
                f"de_wilcoxon_lfc_nmae has no replicate (split seed {seed})"
            )
            raise ScaleError(msg)
        vals[LFC_NMAE], ns[LFC_NMAE] = v, n
        bad = [m for m in METRICS if not math.isfinite(vals[m])]
        if bad:
            msg = f"replicate: split {i} (seed {seed}) gave no value for {bad}; the reference has no replicate for them"
            raise ScaleError(msg)
        for m in METRICS:
            per_metric[m].append(vals[m])
            splits.append(
                {
                    "split_index": i,
                    "seed": int(seed),
                    "metric": m,
                    "value": vals[m],
                    "n_perturbations": ns.get(m),
                }
            )
        if progress is not None:
            progress(i + 1, len(seed_list))
    r = {m: float(np.mean(per_metric[m])) for m in METRICS}
    est = {m: ("full_gate_raw" if m == LFC_NMAE else "split_half_raw") for m in METRICS}
    return ReplicateResult(r=r, seeds=seed_list, splits=splits, estimator=est)


def _cohort_sizes(res: Any) -> dict[str, int | None]:
    """Perturbations with a finite value per metric (``None`` for the panel-level expr_mse)."""
    table = getattr(res, "per_pert", None)
    out: dict[str, int | None] = {}
    for m in METRICS:
        if table is not None and m in getattr(table, "columns", ()):
            col = np.asarray(table[m], dtype=np.float64)
            out[m] = int(np.isfinite(col).sum())
        else:
            out[m] = None
    return out


# ---------------------------------------------------------------------------------------------
# the scale


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def scale_one(metric: str, u: float | None, b: float, r: float) -> float:
    """``u`` of ``metric`` on the 0 = baseline / 1 = replicate scale, with its clamps."""
    pol = POLICIES[metric]
    if not (_finite(b) and _finite(r)):
        msg = f"{metric}: baseline {b!r} / replicate {r!r} is not finite; no scale"
        raise ScaleError(msg)
    b, r = float(b), float(r)
    span = (r - b) if pol.direction == "higher" else (b - r)
    if not (math.isfinite(span) and span > 0.0):
        msg = (
            f"{metric}: the replicate ({r:.6g}) is not better than the baseline ({b:.6g}); "
            "the reference gives this metric no scale"
        )
        raise ScaleError(msg)

    def _raw(x: float) -> float:
        if pol.direction == "higher":
            return (x - b) / (r - b)
        return 1.0 - (x - r) / (b - r)

    def _unusable() -> float:
        if math.isfinite(pol.clamp_low) or pol.worst is None:
            return pol.clamp_low
        return _clip(_raw(pol.worst), pol)

    if not _finite(u):
        return _unusable()
    s = _raw(float(u))
    if not math.isfinite(s):
        return _unusable()
    return _clip(s, pol)


def _clip(x: float, pol: Policy) -> float:
    if x <= pol.clamp_low:
        return pol.clamp_low
    return pol.clamp_high if x >= pol.clamp_high else x


def scale(u: Mapping[str, float], b: Mapping[str, float], r: Mapping[str, float]) -> dict[str, float]:
    """:func:`scale_one` for each of the six metrics."""
    return {m: scale_one(m, u.get(m), b[m], r[m]) for m in METRICS}


def context_score(s: Mapping[str, float]) -> float:
    """The context's score: the equal-weight mean of the six scaled values."""
    return float(np.mean([float(s[m]) for m in SCORE_ORDER]))
