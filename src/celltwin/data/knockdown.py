"""Optional on-target knockdown filter for CRISPRi / knockout screens.

Rule. Expression is compared on the normalised linear scale ``e = x / total(x) * T`` (T: median
library size of the assessed cells; for non-count input X is taken to be log1p-normalised and
``e = expm1(x)``). For each context, the reference of gene g is the mean of ``e_g`` over the
context's control cells. A perturbed cell is **kept** when, for every one of its target genes
that is measured (in var_names) and has a positive reference,

    e_target(cell) <= max_residual * reference(context, target)

i.e. the cell retains at most ``max_residual`` (default 0.5: at least a 50% reduction) of the
controls' mean expression. Cells whose targets are all unmeasured or have a zero reference are
kept and counted as *unassessed*; control cells are always kept. Do not use this filter on
activation (CRISPRa) screens, where targets go up.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin.data.columns import ObsColumns, parse_perturbation, require_columns
from celltwin.data.preprocess import library_sizes, looks_like_counts
from celltwin.data.source import iter_row_chunks, open_source
from celltwin.errors import ConfigError

__all__ = ["KnockdownResult", "knockdown_filter"]


@dataclass
class KnockdownResult:
    """``keep`` (bool, aligned with ``rows``) and the counts behind it."""

    rows: np.ndarray
    keep: np.ndarray
    n_dropped: int
    n_unassessed: int
    per_perturbation: pd.DataFrame  # index perturbation; columns cells, dropped, unassessed

    @property
    def kept_rows(self) -> np.ndarray:
        return self.rows[self.keep]


def knockdown_filter(
    data,
    columns: ObsColumns,
    rows: np.ndarray | None = None,
    max_residual: float = 0.5,
    counts: bool | None = None,
    chunk_size: int = 4096,
) -> KnockdownResult:
    """Apply the on-target knockdown rule (module docstring) to ``rows`` (default: all cells)."""
    if not 0 <= max_residual < 1:
        msg = f"knockdown_filter: max_residual must be in [0, 1), got {max_residual}"
        raise ConfigError(msg)
    src = open_source(data)
    require_columns(src.obs, [columns.pert_col, columns.context_col], src.name)
    rows = np.arange(src.n_obs, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
    pert = columns.perturbations(src.obs)[rows]
    ctx = columns.contexts(src.obs)[rows]
    is_ctrl = pert == columns.control_label
    gpos = {str(g): i for i, g in enumerate(src.var_names)}
    targets = {
        p: [t for t in parse_perturbation(p, columns.control_label) if t in gpos]
        for p in np.unique(pert[~is_ctrl])
    }
    genes = sorted({t for ts in targets.values() for t in ts})
    gcol = {g: k for k, g in enumerate(genes)}
    cols = np.array([gpos[g] for g in genes], dtype=np.int64)

    is_counts = looks_like_counts(src) if counts is None else counts
    if is_counts:
        totals = library_sizes(src, rows, chunk_size)
        T = float(np.median(totals)) if totals.size else 1.0
    E = np.zeros((rows.size, len(genes)))  # normalised linear expression of the target genes
    if genes:
        pos = 0
        for r, block in iter_row_chunks(src, rows, chunk_size):
            sub = block[:, cols]
            sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
            sub = sub.astype(np.float64)
            if is_counts:
                t = totals[pos : pos + r.size]
                with np.errstate(divide="ignore", invalid="ignore"):
                    sub = np.where(t[:, None] > 0, sub / t[:, None] * T, 0.0)
            else:
                sub = np.expm1(sub)
            E[pos : pos + r.size] = sub
            pos += r.size

    keep = np.ones(rows.size, bool)
    assessed = np.zeros(rows.size, bool)
    for c in np.unique(ctx):
        mc = ctx == c
        ref = E[mc & is_ctrl].mean(axis=0) if (mc & is_ctrl).any() else np.zeros(len(genes))
        for p in np.unique(pert[mc & ~is_ctrl]):
            m = mc & (pert == p)
            for t in targets[p]:
                k = gcol[t]
                if ref[k] <= 0:
                    continue
                assessed[m] = True
                keep[m] &= E[m, k] <= max_residual * ref[k]
    unassessed = ~is_ctrl & ~assessed
    df = pd.DataFrame({"p": pert[~is_ctrl], "drop": ~keep[~is_ctrl], "un": unassessed[~is_ctrl]})
    per = df.groupby("p", sort=True).agg(
        cells=("drop", "size"), dropped=("drop", "sum"), unassessed=("un", "sum")
    )
    per.index.name = "perturbation"
    return KnockdownResult(rows, keep, int((~keep).sum()), int(unassessed.sum()), per.astype(int))
