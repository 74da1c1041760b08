"""The VCC 2026 evaluation (cell-eval2 0.20.0 ``--preset vcc2026``), context by context.

Public API (imported lazily, so ``import celltwin.eval.v2026`` stays cheap):

* :func:`evaluate_2026` (``pred``, ``real``, ``context_col=``, ``bundle=``) -> :class:`V2026Evaluation`
  with per-context per-perturbation tables, ``u`` / ``b`` / ``r`` / ``s`` per context and metric,
  the context scores and the overall score, and ``.write(outdir)`` (:mod:`._run`, reading and
  checks in :mod:`._read`); :func:`write_baseline`: the mean-perturbation baseline prediction as
  an ``.h5ad`` (:mod:`._baseline_file`).
* the scale of one context: :func:`build_baseline` (:mod:`._baseline`), :func:`replicate_scores`
  (:mod:`._replicate`), :func:`scale` / :func:`scale_one`, :func:`context_score`, :data:`METRICS`
  (:mod:`._scale`), :func:`build_context_scale` (:mod:`._context_scale`);
* the reference bundle (:mod:`._bundle`): :class:`ReferenceBundle`, :class:`ContextScale`;
* the six metrics of one context (:mod:`._metrics`; the metrics themselves in :mod:`._pds`,
  :mod:`._expr`, :mod:`._jackknife`, :mod:`._de_metrics`, :mod:`._de`; inputs in :mod:`._config`,
  :mod:`._counts`): :func:`score_context`, :func:`prepare_real`, :func:`check_counts`,
  :class:`ContextCounts`, :class:`V2026Config`, :class:`V2026Result`.
"""

from __future__ import annotations

from celltwin._lazy import lazy_exports

__all__ = [
    "METRICS",
    "ContextCounts",
    "ContextScale",
    "ReferenceBundle",
    "ScaleError",
    "V2026Config",
    "V2026Evaluation",
    "V2026Result",
    "build_baseline",
    "build_context_scale",
    "check_counts",
    "context_score",
    "evaluate_2026",
    "prepare_real",
    "replicate_scores",
    "scale",
    "scale_one",
    "score_context",
    "write_baseline",
]

_LAZY = {
    "evaluate_2026": "celltwin.eval.v2026._run",
    "V2026Evaluation": "celltwin.eval.v2026._run",
    "write_baseline": "celltwin.eval.v2026._baseline_file",
    "METRICS": "celltwin.eval.v2026._scale",
    "ScaleError": "celltwin.eval.v2026._scale",
    "build_baseline": "celltwin.eval.v2026._baseline",
    "replicate_scores": "celltwin.eval.v2026._replicate",
    "scale": "celltwin.eval.v2026._scale",
    "scale_one": "celltwin.eval.v2026._scale",
    "context_score": "celltwin.eval.v2026._scale",
    "ContextCounts": "celltwin.eval.v2026._config",
    "V2026Config": "celltwin.eval.v2026._config",
    "V2026Result": "celltwin.eval.v2026._config",
    "check_counts": "celltwin.eval.v2026._counts",
    "prepare_real": "celltwin.eval.v2026._metrics",
    "score_context": "celltwin.eval.v2026._metrics",
    "ContextScale": "celltwin.eval.v2026._bundle",
    "ReferenceBundle": "celltwin.eval.v2026._bundle",
    "build_context_scale": "celltwin.eval.v2026._context_scale",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
