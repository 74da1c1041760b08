"""``evaluate_2026``: score a submission against a VCC 2026 reference, context by context.

Reading and checks. Both sides are read lazily, one context at a time, and checked before any
metric is computed (:mod:`._read`: columns, gene axis, contexts, perturbations, the 2026 counts
rule).

Scoring. Each context is scored on its own: its scale (``b``, ``r``) comes from the bundle or is
built (:func:`~celltwin.eval.v2026._context_scale.build_context_scale`), the submission's metrics ``u``
from ``score_context`` with the context's prepared reference statistics, then ``s`` and the context
score (:mod:`celltwin.eval.v2026._scale`). The overall score is the equal-weight mean of the
context scores (the competition averages its contexts).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from celltwin.eval.v2026 import _bundle as B
from celltwin.eval.v2026._baseline import build_baseline
from celltwin.eval.v2026._baseline_file import _BaselineWriter
from celltwin.eval.v2026._config import default_config
from celltwin.eval.v2026._context_scale import build_context_scale
from celltwin.eval.v2026._metrics import prepare_real, score_context
from celltwin.eval.v2026._read import (
    _check_counts_blocks,
    _check_counts_rows,
    _check_genes,
    _check_labels,
    _column,
    _source,
    _split_contexts,
    load_context,
)
from celltwin.eval.v2026._replicate import BASE_SEED, N_SPLITS, group_order
from celltwin.eval.v2026._scale import METRICS, ScaleError, context_score, scale

__all__ = ["OUTPUT_NAMES", "V2026Evaluation", "evaluate_2026"]

logger = logging.getLogger(__name__)

#: Files :meth:`V2026Evaluation.write` writes (an earlier run's copy it does not write is dropped).
OUTPUT_NAMES = frozenset({"results.csv", "agg_results.csv", "score.json", "replicate_splits.csv"})


@dataclass
class V2026Evaluation:
    """Outcome of :func:`evaluate_2026`.

    ``per_pert``: context -> the submission's per-perturbation table (``score_context``'s);
    ``metrics``: one row per (context, metric) with ``u`` (submission), ``b`` (baseline), ``r``
    (replicate) and ``s`` (scaled); ``context_scores``: context -> mean of its six ``s``;
    ``score``: the mean of the context scores. Without a context column the single context is
    ``None``.
    """

    per_pert: dict[str | None, Any]
    metrics: Any
    context_scores: dict[str | None, float]
    score: float
    scales: dict[str | None, B.ContextScale] = field(default_factory=dict, repr=False)
    context_col: str | None = None
    bundle: Path | None = None
    bundle_reused: bool = False

    def results(self) -> Any:
        """All per-perturbation tables in one DataFrame (with a ``context`` column when there are contexts)."""
        import pandas as pd

        frames = []
        for ctx, t in self.per_pert.items():
            t = t.reset_index() if "perturbation" not in t.columns else t.copy()
            if self.context_col is not None:
                t.insert(0, "context", ctx)
            frames.append(t)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()

    def splits(self) -> Any:
        import pandas as pd

        rows = []
        for ctx, sc in self.scales.items():
            for row in sc.splits:
                rows.append({"context": ctx, **row} if self.context_col is not None else dict(row))
        return pd.DataFrame(rows)

    def summary(self) -> dict[str, Any]:
        ctx = {str(k): v for k, v in self.context_scores.items()} if self.context_col is not None else None
        return {
            "profile": "vcc2026",
            "score": self.score,
            "context_scores": ctx,
            "context_col": self.context_col,
            "metrics": list(METRICS),
            "bundle": None if self.bundle is None else str(self.bundle),
            "bundle_reused": self.bundle_reused,
        }

    def write(self, outdir: str | os.PathLike[str]) -> list[Path]:
        """Write ``results.csv`` (per perturbation), ``agg_results.csv`` (u, b, r, s per context and
        metric), ``replicate_splits.csv`` (the replicate's per-split values) and ``score.json``,
        all at once (:func:`celltwin._io.atomic_dir`). Returns the paths."""
        from celltwin._io import atomic_dir

        final = Path(outdir)
        names = ["results.csv", "agg_results.csv", "replicate_splits.csv", "score.json"]
        with atomic_dir(final, owned=OUTPUT_NAMES) as stage:
            st = Path(stage)
            self.results().to_csv(st / "results.csv", index=False)
            agg = self.metrics.copy()
            if self.context_col is None:
                agg = agg.drop(columns=["context"])
            agg.to_csv(st / "agg_results.csv", index=False)
            self.splits().to_csv(st / "replicate_splits.csv", index=False)
            (st / "score.json").write_text(json.dumps(_finite_json(self.summary()), indent=1) + "\n")
        return [final / n for n in names]


def _finite_json(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _finite_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_finite_json(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def evaluate_2026(
    pred: Any,
    real: Any,
    *,
    pert_col: str = "target_gene",
    control_pert: str = "non-targeting",
    context_col: str | None = None,
    bundle: str | os.PathLike[str] | None = None,
    config: Any = None,
    targets: Mapping[str, Any] | None = None,
    n_splits: int = N_SPLITS,
    base_seed: int = BASE_SEED,
    validate: bool = True,
    write_baseline_to: str | os.PathLike[str] | None = None,
) -> V2026Evaluation:
    """Score ``pred`` against ``real`` (AnnData or ``.h5ad`` paths) with the VCC 2026 metrics.

    ``context_col``: obs column of the cellular context; every context is scored on its own scale
    and the score is the mean of the context scores (``None``: one context). ``bundle``: a
    directory caching each context's scale (:mod:`celltwin.eval.v2026._bundle`): built when
    absent, reused when it matches this reference and configuration, refused otherwise.
    ``config``: the metric parameters (``V2026Config``; default the competition's). ``targets``:
    passed to the metrics (label -> target gene, when labels are not gene symbols).
    ``validate=False`` skips the integral-counts rule on the prediction (used to score the
    fractional baseline itself). ``write_baseline_to``: also write the baseline prediction of every
    context to this ``.h5ad``.
    """
    if config is None:
        config = default_config()
    real_src = _source(real, "reference")
    pred_src = _source(pred, "prediction")
    real_labels = _column(real_src, pert_col, "reference")
    pred_labels = _column(pred_src, pert_col, "prediction")
    contexts, real_rows, pred_rows = _split_contexts(real_src, pred_src, context_col)
    _check_genes(real_src, pred_src)
    _check_labels(real_src, pred_src, real_labels, pred_labels, real_rows, pred_rows, control_pert)
    if validate:
        for c in contexts:
            where = f"prediction {pred_src.name}" + ("" if c is None else f" context {c!r}")
            _check_counts_blocks(pred_src, pred_rows[c], where)

    # what besides the data and the metric parameters decides a context's scale: the bundle's
    # identity and every scale built here read the same values
    scale_args = {"control": control_pert, "targets": targets, "base_seed": base_seed, "n_splits": n_splits}
    identity = B.config_identity(config, **scale_args)
    store = B.ReferenceBundle.open(bundle) if bundle is not None else None
    if store is not None:
        store.check_identity(identity, contexts)
    per_pert: dict[str | None, Any] = {}
    rows: list[dict[str, Any]] = []
    ctx_scores: dict[str | None, float] = {}
    scales: dict[str | None, B.ContextScale] = {}
    writer: B.BundleWriter | None = None
    baseline_writer: _BaselineWriter | None = None
    try:
        if bundle is not None and store is None:
            writer = B.BundleWriter(
                bundle, identity, extra={"pert_col": pert_col, "context_col": context_col}
            )
        if write_baseline_to is not None:
            baseline_writer = _BaselineWriter(write_baseline_to, real_src, pert_col, context_col)
        for c in contexts:
            where = "" if c is None else f"context {c!r}: "
            real_cc = load_context(real_src, real_rows[c], real_labels)
            _check_counts_rows(
                real_cc.X,
                real_src,
                real_rows[c],
                f"reference {real_src.name}" + ("" if c is None else f" context {c!r}"),
            )
            digest = B.context_digest(real_cc, c)
            order = group_order(real_src.obs[pert_col].iloc[real_rows[c]])
            if store is not None:
                store.check_context(c, digest)
                sc = store.load(c, real=real_cc)
            else:
                logger.info("%sbuilding the reference scale (baseline and %d split halves)", where, n_splits)
                sc = build_context_scale(
                    real_cc, context=c, config=config, order=order, digest=digest, **scale_args
                )
                if writer is not None:
                    writer.add(sc)
            if sc.real_stats is None:
                sc.real_stats = prepare_real(real_cc, control=control_pert, targets=targets, config=config)
            if baseline_writer is not None:
                baseline_writer.add(
                    c, build_baseline(real_cc, control=control_pert, targets=targets), real_rows[c]
                )
            pred_cc = load_context(pred_src, pred_rows[c], pred_labels)
            res = score_context(
                real_cc,
                pred_cc,
                control=control_pert,
                targets=targets,
                config=config,
                real_stats=sc.real_stats,
            )
            u = {m: float(res.agg.get(m, math.nan)) for m in METRICS}
            try:
                s = scale(u, sc.b, sc.r)
            except ScaleError as e:
                raise ScaleError(f"{where}{e}") from None
            ctx_scores[c] = context_score(s)
            per_pert[c] = res.per_pert
            for m in METRICS:
                rows.append({"context": c, "metric": m, "u": u[m], "b": sc.b[m], "r": sc.r[m], "s": s[m]})
            sc.real_stats = None  # drop the big prepared statistics once the context is scored
            scales[c] = sc
            del real_cc, pred_cc
        if writer is not None:
            writer.commit()
        if baseline_writer is not None:
            baseline_writer.commit()
    except BaseException:
        if writer is not None:
            writer.abort()
        if baseline_writer is not None:
            baseline_writer.abort()
        raise
    finally:
        for src in (real_src, pred_src):
            if src is not real and src is not pred:
                src.close()

    import pandas as pd

    metrics = pd.DataFrame(rows, columns=["context", "metric", "u", "b", "r", "s"])
    score = float(np.mean([ctx_scores[c] for c in contexts]))
    return V2026Evaluation(
        per_pert=per_pert,
        metrics=metrics,
        context_scores=ctx_scores,
        score=score,
        scales=scales,
        context_col=context_col,
        bundle=None if bundle is None else Path(bundle),
        bundle_reused=store is not None,
    )
