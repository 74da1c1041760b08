"""The scale of one VCC 2026 context, computed from the reference alone: ``b`` (the baseline scored
as a submission, :mod:`._baseline`) and ``r`` (the split-half replicate, :mod:`._replicate`), each
checked to give every metric a usable scale (:mod:`._scale`); the result is the
:class:`~celltwin.eval.v2026._bundle.ContextScale` the reference bundle stores.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from celltwin.eval.v2026._baseline import build_baseline
from celltwin.eval.v2026._bundle import ContextScale, context_digest
from celltwin.eval.v2026._config import default_config
from celltwin.eval.v2026._metrics import prepare_real, score_context
from celltwin.eval.v2026._replicate import BASE_SEED, N_SPLITS, replicate_scores
from celltwin.eval.v2026._scale import METRICS, ScaleError, scale_one

__all__ = ["build_context_scale"]


def build_context_scale(
    real: Any,
    *,
    context: str | None = None,
    control: str = "non-targeting",
    targets: Any = None,
    config: Any = None,
    base_seed: int = BASE_SEED,
    n_splits: int = N_SPLITS,
    order: list[str] | None = None,
    real_stats: Any = None,
    digest: str | None = None,
) -> ContextScale:
    """Compute ``b`` and ``r`` of one context (a ContextCounts of the reference).

    ``b``: the baseline (:func:`~celltwin.eval.v2026._baseline.build_baseline`) scored as a
    submission; ``r``: :func:`~celltwin.eval.v2026._replicate.replicate_scores`. Both must give every
    metric a usable scale (``r`` strictly better than ``b``), else
    :class:`~celltwin.eval.v2026._scale.ScaleError`.
    """
    if config is None:
        config = default_config()
    if real_stats is None:
        real_stats = prepare_real(real, control=control, targets=targets, config=config)
    baseline = build_baseline(real, control=control, targets=targets)
    bres = score_context(
        real, baseline, control=control, targets=targets, config=config, real_stats=real_stats
    )
    b = {m: float(bres.agg[m]) for m in METRICS}
    del baseline  # a whole-context matrix: freed before the replicate's halves are cut
    rep = replicate_scores(
        real, control=control, targets=targets, config=config, seeds=n_splits, base_seed=base_seed,
        order=order, real_stats=real_stats,
    )
    where = "" if context is None else f"context {context!r}: "
    for m in METRICS:
        try:
            scale_one(m, b[m], b[m], rep.r[m])
        except ScaleError as e:
            raise ScaleError(f"{where}{e}") from None
    labels = np.asarray(real.perts).astype(str)
    return ContextScale(
        context=context,
        digest=digest or context_digest(real, context),
        b=b,
        r=rep.r,
        seeds=rep.seeds,
        splits=rep.splits,
        estimator=rep.estimator,
        n_cells=int(labels.size),
        perturbations=sorted(set(labels.tolist()) - {control}),
        baseline_per_pert=getattr(bres, "per_pert", None),
        real_stats=real_stats,
    )

