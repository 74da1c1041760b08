"""The VCC evaluator and the rest of the cell-eval 0.8.2 clone (numpy/scipy/numba; never imports torch).

Public API (imported lazily, so ``import celltwin.eval`` stays cheap):

* :func:`evaluate` (``pred``, ``real``, ``config=EvalConfig(...)``) -> :class:`EvalResult` with
  ``results``, ``agg``, ``de_real``, ``de_pred`` and ``.write(outdir)``: cell-eval 0.8.2 ``run``.
* :func:`score` (``agg``, ``baseline_agg``) -> DataFrame: cell-eval 0.8.2 ``score``.
* :func:`prep_vcc` (``pred``, ``genes``, ``output``) -> :class:`PrepResult`: cell-eval ``prep``
  (the ``.vcc`` submission file).
* :func:`cell_mean_baseline` / :func:`write_cell_mean_baseline`: cell-eval ``baseline``;
  :func:`vcc_baseline` (``train``, ``real``): the baseline the VCC score is normalised against.
* VCC 2026: :func:`evaluate_2026` (cell-eval2 0.20.0 ``--preset vcc2026``, :mod:`celltwin.eval.v2026`)
  and :func:`prep_vcc2026` (the ``vcc prep`` 0.3.0 submission archive).
"""

from __future__ import annotations

from celltwin._lazy import lazy_exports

__all__ = [
    "PROFILES",
    "VCC_BASELINE_NAME",
    "EvalConfig",
    "EvalResult",
    "PrepResult",
    "cell_mean_baseline",
    "evaluate",
    "evaluate_2026",
    "evaluate_by_celltype",
    "prep_vcc",
    "prep_vcc2026",
    "read_gene_list",
    "read_pert_counts",
    "score",
    "vcc_baseline",
    "write_cell_mean_baseline",
]

_LAZY = {
    "EvalConfig": "celltwin.eval._config",
    "EvalResult": "celltwin.eval._results",
    "evaluate": "celltwin.eval._evaluate",
    "evaluate_by_celltype": "celltwin.eval._evaluate",
    "PROFILES": "celltwin.eval._registry",
    "score": "celltwin.eval._score",
    "PrepResult": "celltwin.eval._prep",
    "prep_vcc": "celltwin.eval._prep",
    "read_gene_list": "celltwin.eval._prep",
    "VCC_BASELINE_NAME": "celltwin.eval._baseline",
    "cell_mean_baseline": "celltwin.eval._baseline",
    "write_cell_mean_baseline": "celltwin.eval._baseline",
    "vcc_baseline": "celltwin.eval._baseline",
    "read_pert_counts": "celltwin.eval._baseline",
    "evaluate_2026": "celltwin.eval.v2026._run",
    "prep_vcc2026": "celltwin.eval._prep2026",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
