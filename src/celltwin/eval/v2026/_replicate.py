"""The replicate ``r`` of the VCC 2026 scale: the reference scored against itself by split halves.
celltwin's own implementation of cell-eval2 0.20.0 ``ceiling._disjoint_halves``,
``anchor.compute_replicate_anchor`` and ``lfc_nmae_ref``, checked value for value against it in
``tests/eval/test_v2026_scale.py``.

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
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval.v2026._config import _csr, _labels, _make, default_config
from celltwin.eval.v2026._de_metrics import de_arrays, lfc_nmae_with_gate
from celltwin.eval.v2026._metrics import prepare_real, score_context
from celltwin.eval.v2026._scale import METRICS, ScaleError

__all__ = [
    "BASE_SEED",
    "N_SPLITS",
    "ReplicateResult",
    "derive_seeds",
    "group_order",
    "replicate_scores",
    "split_halves",
]

#: The pinned base seed of the replicate's splits and the number of splits (cell-eval2
#: ``competition.BASE_SEED`` / ``N_SPLITS``).
BASE_SEED = 0
N_SPLITS = 5
LFC_NMAE = "de_wilcoxon_lfc_nmae"


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
    (``_de_metrics.lfc_nmae_with_gate``: gate and denominator from ``real``'s DE table, the fold
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

