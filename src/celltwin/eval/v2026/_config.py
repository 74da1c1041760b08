"""What the VCC 2026 metrics read and return: the metric names, the parameters
(:class:`V2026Config`, cell-eval2's ``configs/vcc2026.yaml``, validated on construction), one
context's counts (:class:`ContextCounts`) and one context's scores (:class:`V2026Result`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import ConfigError

__all__ = [
    "AGG_METRICS",
    "PER_PERT_COLUMNS",
    "ContextCounts",
    "V2026Config",
    "V2026Result",
    "default_config",
]

PDS = "pds_cosine"
EXPR = "expr_mse_unbiased_capped_norm"
FIDELITY = "de_wilcoxon_direction_fidelity_yield_raw"
REACH = "de_wilcoxon_direction_reach_raw"
JACCARD = "de_wilcoxon_sig_jaccard"
NMAE = "de_wilcoxon_lfc_nmae"
EXPR_N = "expr_mse_unbiased_capped"
EXPR_D = "expr_distance_unbiased"

#: The six scored aggregates, in cell-eval2's catalog order.
AGG_METRICS = (PDS, EXPR, NMAE, FIDELITY, REACH, JACCARD)
#: Columns of :attr:`V2026Result.per_pert`.
PER_PERT_COLUMNS = (PDS, FIDELITY, REACH, JACCARD, NMAE, EXPR_N, EXPR_D)


@dataclass(frozen=True)
class V2026Config:
    """The metric parameters of cell-eval2's ``configs/vcc2026.yaml`` (defaults = the competition).

    ``bulk_target_sum``: profile target sum TS (``bulk_target_sum: 5e4``); ``target_sum``: the DE
    per-cell normalisation (``target_sum: 1e6``, CPM); ``min_control_cpm``: the control-mean CPM a
    gene must exceed to be tested (``filter.filter_gene_min_cpm_cell: 5``; ``None`` = no filter);
    ``p_adj_threshold`` (``de.p_adj_threshold: 0.05``); ``epsilon``: lfc pseudocount
    (``de.epsilon: 1e-9``); ``reach_purity``: P0 of direction reach (``REACH_PURITY_FLOOR 0.9``);
    ``min_gate_size``: lfc_nmae gate (10); ``pred_cap_k``: the per-row cap factor on the
    prediction's jackknife (``PRED_TRACE_CAP_K 1.0``); ``max_counts_per_cell`` (``1e6``).
    """

    bulk_target_sum: float = 5e4
    target_sum: float = 1e6
    min_control_cpm: float | None = 5.0
    p_adj_threshold: float = 0.05
    epsilon: float = 1e-9
    reach_purity: float = 0.9
    min_gate_size: int = 10
    pred_cap_k: float = 1.0
    max_counts_per_cell: float = 1e6

    def __post_init__(self) -> None:
        for name in ("bulk_target_sum", "target_sum", "max_counts_per_cell"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and math.isfinite(v) and v > 0):
                msg = f"V2026Config.{name}: expected a positive finite number, got {v!r}"
                raise ConfigError(msg)
        for name in ("p_adj_threshold", "reach_purity"):
            v = getattr(self, name)
            if not (isinstance(v, int | float) and 0 < v <= 1):
                msg = f"V2026Config.{name}: expected a number in (0, 1], got {v!r}"
                raise ConfigError(msg)
        if not (isinstance(self.epsilon, int | float) and math.isfinite(self.epsilon) and self.epsilon >= 0):
            msg = f"V2026Config.epsilon: expected a finite number >= 0, got {self.epsilon!r}"
            raise ConfigError(msg)
        if self.min_control_cpm is not None and not (
            isinstance(self.min_control_cpm, int | float) and math.isfinite(self.min_control_cpm)
        ):
            msg = f"V2026Config.min_control_cpm: expected a finite number or None, got {self.min_control_cpm!r}"
            raise ConfigError(msg)
        if isinstance(self.min_gate_size, bool) or not isinstance(self.min_gate_size, int) or self.min_gate_size < 1:
            msg = f"V2026Config.min_gate_size: expected an integer >= 1, got {self.min_gate_size!r}"
            raise ConfigError(msg)
        if not (isinstance(self.pred_cap_k, int | float) and math.isfinite(self.pred_cap_k) and self.pred_cap_k >= 0):
            msg = f"V2026Config.pred_cap_k: expected a finite number >= 0, got {self.pred_cap_k!r}"
            raise ConfigError(msg)


@dataclass
class ContextCounts:
    """One context, one side: raw counts ``X`` ``(cells, genes)`` (CSR or dense; float32, float64
    or integer), per-cell perturbation labels ``perts`` and the gene names ``genes``."""

    X: Any
    perts: np.ndarray
    genes: list[str]


@dataclass
class V2026Result:
    """``per_pert``: one row per perturbation (index ``perturbation``, sorted), columns
    :data:`PER_PERT_COLUMNS` (NaN where a metric is not defined for it). ``agg``: the six metric
    aggregates (:data:`AGG_METRICS`) as cell-eval2 aggregates them. ``extra``: diagnostics
    (``rho``: the prediction's correction scale, ``n_tested_genes``, the DE tables)."""

    per_pert: Any
    agg: dict[str, float]
    extra: dict[str, Any] = field(default_factory=dict)


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

