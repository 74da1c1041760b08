"""The columns the metrics read from a DE table (pdex 0.3.0 columns, or the 2025 legacy ones).

A legacy table (cell-eval 0.6.6 + pdex 0.1.27, ``EvalConfig(mode="legacy")``) has no
``log2_fold_change`` column: it is derived from ``fold_change`` as cell-eval 0.6.6 does
(:func:`legacy_log2_fold_change`). Imports only numpy.
"""

from __future__ import annotations

import numpy as np

__all__ = ["de_columns", "legacy_log2_fold_change", "log2_fold_changes"]


def legacy_log2_fold_change(fc: np.ndarray) -> np.ndarray:
    """cell-eval 0.6.6's ``log2(fold_change)`` with NaN -> 0, in the fold change's float dtype."""
    fc = np.asarray(fc)
    if fc.dtype.kind != "f":
        fc = fc.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log(fc.astype(np.float64)).astype(fc.dtype) / fc.dtype.type(np.log(2.0))
    lfc[np.isnan(lfc)] = 0.0
    return lfc


def log2_fold_changes(table) -> np.ndarray:
    """A DE table's ``log2_fold_change`` as float64; legacy tables (no such column): derived from ``fold_change``."""
    if "log2_fold_change" in table.columns:
        return np.asarray(table["log2_fold_change"], dtype=np.float64)
    return legacy_log2_fold_change(np.asarray(table["fold_change"])).astype(np.float64)


def de_columns(table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """target, feature, log2 fold change (derived from ``fold_change`` in legacy tables), fdr."""
    return (
        table["target"],  # categoricals stay categoricals (category_codes maps their codes)
        table["feature"],
        log2_fold_changes(table),
        np.asarray(table["fdr"], dtype=np.float64),
    )
