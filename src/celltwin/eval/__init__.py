"""The VCC evaluator (numpy/scipy/numba; never imports torch).

Public API (imported lazily, so ``import celltwin.eval`` stays cheap):

* :func:`evaluate` (``pred``, ``real``, ``config=EvalConfig(...)``) -> :class:`EvalResult` with
  ``results``, ``agg``, ``de_real``, ``de_pred`` and ``.write(outdir)``: cell-eval 0.8.2 ``run``.
* :func:`score` (``agg``, ``baseline_agg``) -> DataFrame: cell-eval 0.8.2 ``score``.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["EvalConfig", "EvalResult", "evaluate", "score", "PROFILES"]

_LAZY = {
    "EvalConfig": "celltwin.eval._evaluate",
    "EvalResult": "celltwin.eval._evaluate",
    "evaluate": "celltwin.eval._evaluate",
    "PROFILES": "celltwin.eval._evaluate",
    "score": "celltwin.eval._score",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'celltwin.eval' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
