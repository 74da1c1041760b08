"""The VCC 2026 evaluation (cell-eval2 0.20.0 ``--preset vcc2026``), context by context.

Public API (imported lazily, so ``import celltwin.eval.v2026`` stays cheap):

* :func:`evaluate_2026` (``pred``, ``real``, ``context_col=``, ``bundle=``) -> :class:`V2026Evaluation`
  with per-context per-perturbation tables, ``u`` / ``b`` / ``r`` / ``s`` per context and metric,
  the context scores and the overall score, and ``.write(outdir)``;
  :func:`write_baseline`: the mean-perturbation baseline prediction as an ``.h5ad``.
* the scale of one context (:mod:`._scale`): :func:`build_baseline`, :func:`replicate_scores`,
  :func:`scale` / :func:`scale_one`, :func:`context_score`, :data:`METRICS`;
* the reference bundle (:mod:`._bundle`): :class:`ReferenceBundle`, :func:`build_context_scale`;
* the six metrics of one context (:mod:`._metrics`, :mod:`._de`, :mod:`._counts`):
  :func:`score_context`, :func:`prepare_real`, :func:`check_counts`, :class:`ContextCounts`,
  :class:`V2026Config`, :class:`V2026Result`.
"""

from __future__ import annotations

import importlib
from typing import Any

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
    "write_baseline": "celltwin.eval.v2026._run",
    "METRICS": "celltwin.eval.v2026._scale",
    "ScaleError": "celltwin.eval.v2026._scale",
    "build_baseline": "celltwin.eval.v2026._scale",
    "replicate_scores": "celltwin.eval.v2026._scale",
    "scale": "celltwin.eval.v2026._scale",
    "scale_one": "celltwin.eval.v2026._scale",
    "context_score": "celltwin.eval.v2026._scale",
    "ContextCounts": "celltwin.eval.v2026._metrics",
    "V2026Config": "celltwin.eval.v2026._metrics",
    "V2026Result": "celltwin.eval.v2026._metrics",
    "check_counts": "celltwin.eval.v2026._counts",
    "prepare_real": "celltwin.eval.v2026._metrics",
    "score_context": "celltwin.eval.v2026._metrics",
    "ContextScale": "celltwin.eval.v2026._bundle",
    "ReferenceBundle": "celltwin.eval.v2026._bundle",
    "build_context_scale": "celltwin.eval.v2026._bundle",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'celltwin.eval.v2026' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
