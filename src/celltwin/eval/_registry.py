"""The metric registry: every metric column of the evaluator defined once, and the profiles.

A :class:`Metric` is one *column* of ``results.csv``: its name, what it is computed from
(``kind``), whether it has one value per perturbation (or one value broadcast to every row), its
direction for :func:`celltwin.eval.score` and the function computing it from a
:class:`MetricContext`. cell-eval registers ``de_nsig_counts`` as one metric that yields two
columns (``de_nsig_counts_real`` / ``de_nsig_counts_pred``); here they are two entries sharing
``cell_eval_name="de_nsig_counts"``, so either spelling can be skipped.

Profiles are cell-eval 0.8.2's (``cell_eval._pipeline._runner``): ``full`` = every registered
metric, ``de`` = the DE metrics, ``minimal`` / ``vcc`` / ``pds`` = fixed name lists. Their
*column order* is cell-eval's: its pipeline computes the DE metrics of the list first and the
AnnData metrics second (each group in list order) and polars' ``pivot`` keeps the order of first
appearance, so e.g. ``vcc`` (listed ``mae, discrimination_score_l1, overlap_at_N``) writes
``overlap_at_N, mae, discrimination_score_l1``. :data:`METRICS` is kept in cell-eval's ``full``
order (its registration order: the AnnData metrics are registered first but the pipeline still
puts the DE metrics first).

This module imports only numpy and the standard library (it is read by ``score``); the kernels are
imported when a metric is computed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np

from celltwin.eval._de_columns import de_columns, log2_fold_changes

__all__ = [
    "BEST_ONE",
    "BEST_ZERO",
    "DE_METRICS",
    "METRICS",
    "PROFILES",
    "PROFILE_METRICS",
    "Metric",
    "MetricContext",
    "compute_metrics",
    "metric_names",
    "resolve_skip",
]

MetricKind = Literal["de", "pseudobulk", "cells"]
#: ``(values, null_mask or None)``: ``values`` is ``(P,)`` (or a scalar when not per-perturbation)
MetricValue = tuple[Any, "np.ndarray | None"]


@dataclass
class MetricContext:
    """What the metrics are computed from, with the shared intermediates computed once, lazily.

    ``real`` / ``pred``: the prepared sides (``.X``, ``.labels``, ``.genes``); ``perts``: the sorted
    non-control perturbations; ``bulk_real`` / ``bulk_pred``: their pseudobulks ``(P, G)``;
    ``delta_real`` / ``delta_pred``: pseudobulk minus the side's control pseudobulk; ``de_real`` /
    ``de_pred``: the DE tables (``None`` when no DE metric is requested); ``legacy``: cell-eval 0.6.6
    rules (see :class:`celltwin.eval.EvalConfig`).
    """

    real: Any
    pred: Any
    perts: np.ndarray
    bulk_real: np.ndarray
    bulk_pred: np.ndarray
    delta_real: np.ndarray
    delta_pred: np.ndarray
    de_real: Any
    de_pred: Any
    control: str
    legacy: bool = False
    embed: tuple[np.ndarray, np.ndarray] | None = None  # (real, pred) obsm deltas (EvalConfig.embed_key)

    @property
    def P(self) -> int:
        return int(self.perts.size)

    @cached_property
    def ranked(self) -> tuple[Any, Any]:
        """Significant genes of each perturbation ranked by ``|lfc|`` (real, pred)."""
        from celltwin.eval._metrics import rank_significant

        return (
            rank_significant(*de_columns(self.de_real), self.perts),
            rank_significant(*de_columns(self.de_pred), self.perts),
        )

    @cached_property
    def de_mats(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(lfc_real, fdr_real, lfc_pred, fdr_pred)``, ``(P, G)`` float32 each."""
        from celltwin.eval import _full

        genes = self.real.genes
        lfc_r, fdr_r = _full.de_matrices(self.de_real, self.perts, genes, log2_fold_changes(self.de_real))
        lfc_p, fdr_p = _full.de_matrices(self.de_pred, self.perts, genes, log2_fold_changes(self.de_pred))
        return lfc_r, fdr_r, lfc_p, fdr_p

    @cached_property
    def sig(self) -> tuple[np.ndarray, np.ndarray]:
        """``fdr < 0.05`` (real, pred)."""
        _, fdr_r, _, fdr_p = self.de_mats
        return fdr_r < 0.05, fdr_p < 0.05

    @cached_property
    def aucs(self) -> tuple[np.ndarray, np.ndarray]:
        from celltwin.eval import _full

        return _full.auc_metrics(self.sig[0], self.de_mats[3], legacy=self.legacy)


@dataclass(frozen=True)
class Metric:
    """One metric column.

    ``kind``: ``"de"`` (from the two DE tables), ``"pseudobulk"`` (from the pseudobulks / deltas)
    or ``"cells"`` (from the cell-level matrices). ``per_perturbation``: ``False`` when one value
    is broadcast to every perturbation's row. ``higher_is_better``: the direction used by
    :func:`celltwin.eval.score` (``True``: best value 1, scored ``(u - b) / (1 - b)``; ``False``:
    best value 0, scored ``1 - u / b``; ``None``: not scored). ``compute(ctx)`` returns
    ``(values, null_mask or None)``.
    """

    name: str
    kind: MetricKind
    per_perturbation: bool
    higher_is_better: bool | None
    compute: Callable[[MetricContext], MetricValue] = field(repr=False)
    cell_eval_name: str = ""
    description: str = ""

    def __post_init__(self) -> None:
        if not self.cell_eval_name:
            object.__setattr__(self, "cell_eval_name", self.name)


# --- compute functions ---------------------------------------------------------------------------


def _overlap(kind: str, k: int | None) -> Callable[[MetricContext], MetricValue]:
    def f(ctx: MetricContext) -> MetricValue:
        from celltwin.eval._metrics import overlap_k

        ranked_r, ranked_p = ctx.ranked
        return overlap_k(ranked_r, ranked_p, ctx.perts, k, kind), None

    return f


def _de_spearman_sig(ctx: MetricContext) -> MetricValue:
    from celltwin.eval import _full

    return np.full(ctx.P, _full.de_spearman_sig(*ctx.sig)), None


def _de_direction_match(ctx: MetricContext) -> MetricValue:
    from celltwin.eval import _full

    lfc_r, _, lfc_p, _ = ctx.de_mats
    return _full.de_direction_match(ctx.sig[0], lfc_r, lfc_p)


def _de_spearman_lfc_sig(ctx: MetricContext) -> MetricValue:
    from celltwin.eval import _full

    sig_r = ctx.sig[0]
    if ctx.legacy:  # cell-eval 0.6.6 correlates the fold changes themselves
        genes = ctx.real.genes
        fc_r, _ = _full.de_matrices(
            ctx.de_real, ctx.perts, genes, np.asarray(ctx.de_real["fold_change"], np.float64)
        )
        fc_p, _ = _full.de_matrices(
            ctx.de_pred, ctx.perts, genes, np.asarray(ctx.de_pred["fold_change"], np.float64)
        )
        v, n = _full.de_spearman_lfc_sig(sig_r, fc_r, fc_p)
        return v.astype(np.float32).astype(np.float64), n  # polars corr of Float32 columns
    lfc_r, _, lfc_p, _ = ctx.de_mats
    return _full.de_spearman_lfc_sig(sig_r, lfc_r, lfc_p)


def _de_sig_genes_recall(ctx: MetricContext) -> MetricValue:
    from celltwin.eval import _full

    return _full.de_sig_genes_recall(*ctx.sig)


def _de_nsig_counts(side: int) -> Callable[[MetricContext], MetricValue]:
    def f(ctx: MetricContext) -> MetricValue:
        return ctx.sig[side].sum(1).astype(np.float64), None

    return f


def _auc(which: int) -> Callable[[MetricContext], MetricValue]:
    def f(ctx: MetricContext) -> MetricValue:
        return ctx.aucs[which], None

    return f


def _pearson_delta(ctx: MetricContext) -> MetricValue:
    from celltwin.eval import _full

    return _full.pearson_delta(ctx.delta_pred, ctx.delta_real), None


def _mean_error(kind: str, on: str = "bulk") -> Callable[[MetricContext], MetricValue]:
    """``kind`` (mae / mse) of the pseudobulks (``on="bulk"``) or of the deltas to control (``"delta"``)."""

    def f(ctx: MetricContext) -> MetricValue:
        from celltwin.eval._metrics import mean_error

        pred, real = (ctx.bulk_pred, ctx.bulk_real) if on == "bulk" else (ctx.delta_pred, ctx.delta_real)
        return mean_error(pred, real, kind), None

    return f


def _discrimination(metric: str) -> Callable[[MetricContext], MetricValue]:
    def f(ctx: MetricContext) -> MetricValue:
        from celltwin.eval._metrics import discrimination

        if metric != "l1" and ctx.embed is not None:  # embedding dimensions: nothing to exclude (cell-eval's embed_key)
            e_r, e_p = ctx.embed
            return discrimination(e_r, e_p, ctx.perts, np.full(e_r.shape[1], ""), metric), None
        return discrimination(ctx.delta_real, ctx.delta_pred, ctx.perts, ctx.real.genes, metric), None

    return f


def _pearson_edistance(ctx: MetricContext) -> MetricValue:
    from celltwin.eval import _full

    return np.full(ctx.P, _full.edistance_pearson(ctx.real, ctx.pred, ctx.perts, ctx.control)), None


def _clustering_agreement(ctx: MetricContext) -> MetricValue:
    from celltwin.eval import _full

    return np.full(ctx.P, _full.clustering_agreement(ctx.real, ctx.pred, ctx.control)), None


# --- the registry (cell-eval's ``full`` column order) ----------------------------------------------

_K_NAMES = ("N", "50", "100", "200", "500")
_KS: tuple[int | None, ...] = (None, 50, 100, 200, 500)  # == _full.KS (not imported: stays light)

METRICS: dict[str, Metric] = {
    m.name: m
    for m in (
        *(
            Metric(
                f"{kind}_at_{label}",
                "de",
                True,
                True,
                _overlap(kind, k),
                description=f"{kind} of the top {label} significant DE genes (real vs predicted)",
            )
            for kind in ("overlap", "precision")
            for label, k in zip(_K_NAMES, _KS, strict=True)
        ),
        Metric(
            "de_spearman_sig",
            "de",
            False,
            True,
            _de_spearman_sig,
            description="Spearman correlation of the numbers of significant DE genes",
        ),
        Metric(
            "de_direction_match",
            "de",
            True,
            True,
            _de_direction_match,
            description="agreement in direction of the real significant DE genes",
        ),
        Metric(
            "de_spearman_lfc_sig",
            "de",
            True,
            True,
            _de_spearman_lfc_sig,
            description="Spearman correlation of the log fold changes of the real significant genes",
        ),
        Metric(
            "de_sig_genes_recall",
            "de",
            True,
            True,
            _de_sig_genes_recall,
            description="recall of the real significant DE genes",
        ),
        Metric(
            "de_nsig_counts_real",
            "de",
            True,
            None,
            _de_nsig_counts(0),
            "de_nsig_counts",
            description="number of significant DE genes, real",
        ),
        Metric(
            "de_nsig_counts_pred",
            "de",
            True,
            None,
            _de_nsig_counts(1),
            "de_nsig_counts",
            description="number of significant DE genes, predicted",
        ),
        Metric(
            "pr_auc",
            "de",
            True,
            True,
            _auc(0),
            description="precision-recall AUC of the real significant genes scored by -log10(pred fdr)",
        ),
        Metric(
            "roc_auc",
            "de",
            True,
            True,
            _auc(1),
            description="ROC AUC of the real significant genes scored by -log10(pred fdr)",
        ),
        Metric(
            "pearson_delta",
            "pseudobulk",
            True,
            True,
            _pearson_delta,
            description="Pearson correlation of the predicted and real deltas to control",
        ),
        Metric(
            "mse",
            "pseudobulk",
            True,
            False,
            _mean_error("mse"),
            description="mean squared error of the perturbation pseudobulks",
        ),
        Metric(
            "mae",
            "pseudobulk",
            True,
            False,
            _mean_error("mae"),
            description="mean absolute error of the perturbation pseudobulks",
        ),
        Metric(
            "mse_delta",
            "pseudobulk",
            True,
            False,
            _mean_error("mse", "delta"),
            description="mean squared error of the deltas to control",
        ),
        Metric(
            "mae_delta",
            "pseudobulk",
            True,
            False,
            _mean_error("mae", "delta"),
            description="mean absolute error of the deltas to control",
        ),
        *(
            Metric(
                f"discrimination_score_{m}",
                "pseudobulk",
                True,
                True,
                _discrimination(m),
                description=f"1 - normalised rank of the true perturbation by {m} distance of the deltas",
            )
            for m in ("l1", "l2", "cosine")
        ),
        Metric(
            "pearson_edistance",
            "cells",
            False,
            True,
            _pearson_edistance,
            description="Pearson correlation of the real and predicted energy distances to control",
        ),
        Metric(
            "clustering_agreement",
            "cells",
            False,
            True,
            _clustering_agreement,
            description="agreement of the Leiden clusterings of the perturbation centroids (needs the cluster extra)",
        ),
    )
}

DE_METRICS = frozenset(n for n, m in METRICS.items() if m.kind == "de")
BEST_ZERO = frozenset(n for n, m in METRICS.items() if m.higher_is_better is False)
BEST_ONE = frozenset(n for n, m in METRICS.items() if m.higher_is_better is True)


def _columns(cell_eval_names: Iterable[str]) -> list[str]:
    """The columns of cell-eval metric names (``de_nsig_counts`` -> its two columns), in order."""
    out: list[str] = []
    for ce in cell_eval_names:
        cols = [n for n, m in METRICS.items() if m.cell_eval_name == ce]
        if not cols:  # a programming error in a profile list below
            raise KeyError(ce)
        out += cols
    return out


def _cell_eval_order(cell_eval_names: Sequence[str]) -> tuple[str, ...]:
    """The columns cell-eval's pipeline writes for this metric list: DE metrics first, then the rest."""
    cols = _columns(cell_eval_names)
    return tuple([c for c in cols if c in DE_METRICS] + [c for c in cols if c not in DE_METRICS])


# cell-eval 0.8.2 cell_eval/_pipeline/_runner.py: MINIMAL_METRICS, VCC_METRICS and the "pds" case
_MINIMAL = (
    "pearson_delta",
    "mse",
    "mae",
    "discrimination_score_l1",
    "overlap_at_N",
    "precision_at_N",
    "de_nsig_counts",
)
_VCC = ("mae", "discrimination_score_l1", "overlap_at_N")

#: Metric columns of each profile, in cell-eval's column order.
PROFILE_METRICS: dict[str, tuple[str, ...]] = {
    "vcc": _cell_eval_order(_VCC),
    "pds": _cell_eval_order(("discrimination_score_l1",)),
    "minimal": _cell_eval_order(_MINIMAL),
    "de": tuple(n for n in METRICS if n in DE_METRICS),
    "full": tuple(METRICS),
}
PROFILES = tuple(PROFILE_METRICS)


def valid_skip_names() -> list[str]:
    """Names accepted by ``skip_metrics``: every column and every cell-eval metric name."""
    return sorted(set(METRICS) | {m.cell_eval_name for m in METRICS.values()})


def resolve_skip(names: Iterable[str]) -> frozenset[str]:
    """The columns named by ``names`` (columns or cell-eval metric names); ``KeyError`` lists unknown ones."""
    valid = set(valid_skip_names())
    names = list(names)
    unknown = [n for n in names if n not in valid]
    if unknown:
        raise KeyError(unknown)
    return frozenset(c for c, m in METRICS.items() if c in names or m.cell_eval_name in names)


def metric_names(profile: str, skip: Iterable[str] = ()) -> tuple[str, ...]:
    """The columns of ``profile`` (cell-eval's order) less those named in ``skip``."""
    drop = resolve_skip(skip)
    return tuple(n for n in PROFILE_METRICS[profile] if n not in drop)


def compute_metrics(
    names: Sequence[str], ctx: MetricContext
) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """Values and null masks of the requested columns (each computed by its registry entry)."""
    vals: dict[str, np.ndarray] = {}
    nulls: dict[str, np.ndarray] = {}
    for name in names:
        v, null = METRICS[name].compute(ctx)
        vals[name] = v
        if null is not None:
            nulls[name] = null
    return vals, nulls
