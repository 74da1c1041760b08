"""The checks of :func:`celltwin.eval._prep2026.prep_vcc2026`: the prediction against vcc's rules.

Checks, in vcc's order (the first failure is reported, one line naming the file, the field, what
was expected and what was found; :class:`~celltwin.errors.InputError`, CLI exit code 2): a sparse
X's structure (pointers, lengths, column range; :meth:`PredictionInput.check_structure
<celltwin.eval._prep2026_input.PredictionInput.check_structure>`); the gene list (header row
``gene_name`` etc. skipped, no duplicates); unique var_names; at least one cell; the perturbation
(and cell type) column exists; no control cells (``reject_controls``; else controls must be
present); the context column exists and holds exactly the required contexts, each with cells;
per context exactly the perturbations of ``pert_counts.csv`` (``target_gene`` column; optional
``context`` and ``n_cells`` columns; its ``non-targeting`` row ignored) with exactly
``cells_per_pert`` cells each (an ``n_cells`` column wins); a gene list whose length differs from
``expected_gene_dim`` only warns; var_names are the gene list (the same genes in another order are
reordered; missing or extra genes fail); at most ``max_cell_dim`` cells; at most ``max_nnz``
stored entries; finite values; no cell total above ``max_counts_per_cell``; no perturbation whose
cells are all zero; no negative and no fractional value (``|x - trunc(x)| > 1e-6``) once cast to
the encoding.

The value checks need the whole of X: :func:`scan_block` learns them block by block into a
:class:`BlockScan` (one pass, no second read) and :func:`check_values` decides them afterwards,
in vcc's order.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from celltwin.errors import InputError
from celltwin.eval._prep2026_input import PredictionInput
from celltwin.eval._prep2026_refs import sample_names
from celltwin.eval._prep_common import check_obs_columns

__all__ = [
    "FRACTION_EPS",
    "BlockScan",
    "check_obs",
    "check_targets",
    "check_values",
    "check_var_unique",
    "gene_columns",
    "scan_block",
]

FRACTION_EPS = 1e-6  # a value is whole when |x - trunc(x)| <= this
_GUIDE_SUFFIX = re.compile(r"-\d$")


# ------------------------------------------------------------------------------------ the scan
@dataclass
class BlockScan:
    """What one pass over X learnt (every value check of vcc, decided after the pass in vcc's order)."""

    n_obs: int
    nnz_in: int = 0  # stored entries of the input (dense: nonzeros), canonical
    n_nan: int = 0
    n_inf: int = 0
    bad_rows: list[int] = field(default_factory=list)  # first rows holding non-finite values
    n_bad_rows: int = 0
    negative_row: int | None = None  # first row with a negative value, once cast
    fraction_row: int | None = None  # first row with a fractional value, once cast
    fraction_value: float = 0.0
    totals: np.ndarray = None  # type: ignore[assignment]
    row_nnz: np.ndarray = None  # type: ignore[assignment]  # stored entries per output row
    out_matrix: Any = None  # whole mode: the output matrix

    def __post_init__(self) -> None:
        self.totals = np.zeros(self.n_obs, dtype=np.float64)
        self.row_nnz = np.zeros(self.n_obs, dtype=np.int64)


def _row_of(indptr: np.ndarray, pos: int) -> int:
    return int(np.searchsorted(indptr, pos, side="right")) - 1


def scan_block(scan: BlockScan, a: int, blk, cols, dtype, fmt: str):
    """Check one block (vcc's operations on these rows) and return its output matrix."""
    import scipy.sparse as sp

    if sp.issparse(blk):
        if cols is not None:
            blk = blk[:, cols]  # vcc's adata[:, genes]: entries keep their stored order
        data = blk.data
        scan.nnz_in += int(blk.nnz)
        bad = ~np.isfinite(data) if data.dtype.kind in "fc" else None
        if bad is not None and bad.any():
            nan = np.isnan(data)
            scan.n_nan += int(nan.sum())
            scan.n_inf += int(bad.sum() - nan.sum())
            if fmt == "csc":
                rows = np.unique(blk.indices[bad])
            else:
                rows = np.unique(np.repeat(np.arange(blk.shape[0]), np.diff(blk.indptr))[bad])
            scan.n_bad_rows += rows.size
            if len(scan.bad_rows) < 10:
                scan.bad_rows.extend((rows[: 10 - len(scan.bad_rows)] + a).tolist())
        scan.totals[a:a + blk.shape[0]] = np.asarray(blk.sum(axis=1)).ravel()
        out = blk.astype(dtype)
    else:
        x = np.asarray(blk)
        if cols is not None:
            x = x[:, cols]
        scan.nnz_in += int(np.count_nonzero(x))
        if x.dtype.kind in "fc":
            bad = ~np.isfinite(x)
            if bad.any():
                nan = np.isnan(x)
                scan.n_nan += int(nan.sum())
                scan.n_inf += int(bad.sum() - nan.sum())
                rows = np.flatnonzero(bad.any(axis=1))
                scan.n_bad_rows += rows.size
                if len(scan.bad_rows) < 10:
                    scan.bad_rows.extend((rows[: 10 - len(scan.bad_rows)] + a).tolist())
        scan.totals[a:a + x.shape[0]] = x.sum(axis=1)
        out = sp.csr_matrix(x.astype(dtype))
    d = out.data
    if d.size:
        if scan.negative_row is None and d.min() < 0:
            pos = int(np.argmax(d < 0))
            scan.negative_row = a + (int(out.indices[pos]) if out.format == "csc" else _row_of(out.indptr, pos))
        if scan.fraction_row is None:
            with np.errstate(invalid="ignore"):  # inf - inf (refused as non-finite anyway)
                frac = np.abs(d - np.trunc(d)) > FRACTION_EPS
            if frac.any():
                pos = int(np.argmax(frac))
                scan.fraction_value = float(d[pos])
                scan.fraction_row = a + (int(out.indices[pos]) if out.format == "csc" else _row_of(out.indptr, pos))
    if out.format == "csr":
        scan.row_nnz[a:a + out.shape[0]] = np.diff(out.indptr)
    return out


# ------------------------------------------------------------------------------------ the checks
def check_obs(inp: PredictionInput, *, pert_col, celltype_col, control_label, reject_controls, context_col,
              contexts: tuple[str, ...]) -> dict[str, int]:
    """obs: cells, the perturbation (and cell type) column, controls, contexts: ``{context: cells}``."""
    obs, name = inp.obs, inp.name
    if inp.n_obs == 0:
        msg = f"{name}: 0 cells; expected the predicted cells of every perturbation"
        raise InputError(msg)
    check_obs_columns(obs, name, pert_col=pert_col, celltype_col=celltype_col)
    labels = obs[pert_col].astype(str)
    n_ctrl = int((labels == control_label).sum())
    if reject_controls and n_ctrl:
        msg = (f"{name}: obs[{pert_col!r}] has {n_ctrl} {control_label!r} control cells; expected none (the 2026 "
               "upload holds predicted perturbations only, scoring uses the held-out controls)")
        raise InputError(msg)
    if not reject_controls and not n_ctrl:
        msg = f"{name}: control label {control_label!r} not found in obs[{pert_col!r}] (controls allowed, so required)"
        raise InputError(msg)
    if not contexts:
        return {}
    if context_col not in obs:
        msg = (f"{name}: context column obs[{context_col!r}] is missing; expected each cell's context "
               f"({', '.join(contexts)}); obs has {list(map(str, obs.columns))}")
        raise InputError(msg)
    values = obs[context_col].astype(str)
    present = set(values.unique())
    unknown = sorted(present - set(contexts))
    if unknown:
        msg = f"{name}: obs[{context_col!r}] has unknown context(s) {sample_names(unknown)}; expected only {', '.join(contexts)}"
        raise InputError(msg)
    missing = [c for c in contexts if c not in present]
    if missing:
        msg = (f"{name}: obs[{context_col!r}] has no cells of context(s) {', '.join(missing)}; expected every one "
               f"of {', '.join(contexts)} (found {', '.join(sorted(present)) or 'none'})")
        raise InputError(msg)
    return {c: int((values == c).sum()) for c in contexts}


def check_targets(inp: PredictionInput, expected, perts_path, *, pert_col, context_col, control_label,
                  contexts: tuple[str, ...], check_cell_counts: bool) -> None:
    """Per context, exactly the perturbations of ``expected`` (:func:`read_pert_list
    <celltwin.eval._prep2026_refs.read_pert_list>`), each with its expected number of cells."""
    name = inp.name
    labels = inp.obs[pert_col].astype(str)

    def compare(where: str, observed: set[str], want: set[str]) -> None:
        miss, extra = want - observed, observed - want
        if not miss and not extra:
            return
        parts = []
        if miss:
            parts.append(f"{len(miss)} listed perturbation(s) missing ({sample_names(miss)})")
        if extra:
            parts.append(f"{len(extra)} not in the list ({sample_names(extra)})")
        hint = ("; labels like 'ADNP-1' are construct ids, give the gene symbol ('ADNP')"
                if any(_GUIDE_SUFFIX.search(u) for u in extra) else "")
        msg = (f"{name}: {where}obs[{pert_col!r}] does not match the perturbation list {perts_path} "
               f"({len(want)} perturbations): {'; '.join(parts)}{hint}")
        raise InputError(msg)

    if not contexts:
        pool = expected.get(None) or {k: v for m in expected.values() for k, v in m.items()}
        compare("", set(labels) - {control_label}, set(pool))
        return
    values = inp.obs[context_col].astype(str)
    for c in contexts:
        want = expected.get(c, expected.get(None))
        if want is None:
            msg = f"{perts_path}: the perturbation list has no rows for context {c!r} (column 'context')"
            raise InputError(msg)
        in_c = (values == c).to_numpy()
        compare(f"context {c}: ", set(labels[in_c]) - {control_label}, set(want))
        if check_cell_counts:
            actual = labels[in_c].value_counts()
            wrong = [(g, int(actual.get(g, 0)), e) for g, e in sorted(want.items())
                     if e is not None and e >= 1 and g != control_label and int(actual.get(g, 0)) != e]
            if wrong:
                shown = ", ".join(f"{g} has {n}" for g, n, _ in wrong[:5]) + (" ..." if len(wrong) > 5 else "")
                exp = "/".join(str(v) for v in sorted({e for *_, e in wrong}))
                msg = (f"{name}: context {c}: {len(wrong)} perturbation(s) of obs[{pert_col!r}] have the wrong "
                       f"number of cells ({shown}); expected exactly {exp} cells each")
                raise InputError(msg)


def check_var_unique(inp: PredictionInput) -> None:
    """var_names: each gene once."""
    var = inp.var_names
    if len(set(var)) != len(var):
        seen: set[str] = set()
        dups = {g for g in var if g in seen or seen.add(g)}
        msg = f"{inp.name}: var_names have duplicated gene names ({sample_names(dups)}); expected each gene once"
        raise InputError(msg)


def gene_columns(inp: PredictionInput, genes: list[str]) -> tuple[np.ndarray | None, bool]:
    """``(input column of each listed gene or None when already in order, reordered)``; other genes fail."""
    var = inp.var_names
    if var == genes:
        return None, False
    var_set, gene_set = set(var), set(genes)
    missing, extra = gene_set - var_set, var_set - gene_set
    if missing or extra:
        msg = (f"{inp.name}: var_names do not match the gene list ({len(genes)} genes): {len(missing)} missing "
               f"({sample_names(missing)}), {len(extra)} not in the list ({sample_names(extra)})")
        raise InputError(msg)
    pos = {g: i for i, g in enumerate(var)}
    return np.array([pos[g] for g in genes], dtype=np.int64), True


def check_values(scan: BlockScan, inp: PredictionInput, labels: np.ndarray, *, max_nnz, max_counts_per_cell,
                 dtype) -> None:
    """The value checks learnt by the pass (:func:`scan_block`), decided in vcc's order."""
    name = inp.name
    if max_nnz and scan.nnz_in > max_nnz:
        msg = (f"{name}: X stores {scan.nnz_in:,} entries ({scan.nnz_in / max(inp.n_obs, 1):,.0f} per cell); "
               f"expected at most {max_nnz:,} (the scorer's density limit; store X sparse, without explicit zeros, "
               "and predict fewer expressed genes per cell)")
        raise InputError(msg)
    if scan.n_nan or scan.n_inf:
        rows = ", ".join(map(str, scan.bad_rows)) + (" ..." if scan.n_bad_rows > len(scan.bad_rows) else "")
        msg = (f"{name}: X holds {scan.n_nan + scan.n_inf} non-finite value(s) ({scan.n_nan} NaN, {scan.n_inf} inf) "
               f"in {scan.n_bad_rows} cell(s) (rows {rows}); expected finite counts")
        raise InputError(msg)
    t = scan.totals
    if max_counts_per_cell and t.size and float(t.max()) > max_counts_per_cell:
        over = int((t > max_counts_per_cell).sum())
        worst = int(np.argmax(t))
        msg = (f"{name}: {over} cell(s) of X total more than {max_counts_per_cell:,} counts (worst: row {worst}, "
               f"{float(t[worst]):,.6g}); expected per-cell totals <= {max_counts_per_cell:,} (the scorer's cap)")
        raise InputError(msg)
    uniq, inv = np.unique(labels, return_inverse=True)
    nonzero = np.zeros(uniq.size, dtype=bool)
    np.logical_or.at(nonzero, inv, t != 0)
    empty = uniq[~nonzero]
    if empty.size:
        msg = (f"{name}: {empty.size} perturbation(s) have all-zero predictions in every cell ({sample_names(empty)}); "
               "expected some counts (the model did not run for them?)")
        raise InputError(msg)
    if scan.negative_row is not None:
        msg = f"{name}: X has negative values (first in row {scan.negative_row}); expected non-negative counts"
        raise InputError(msg)
    if scan.fraction_row is not None:
        msg = (f"{name}: X has fractional values once cast to {np.dtype(dtype).name} (e.g. {scan.fraction_value:g} "
               f"in row {scan.fraction_row}); expected raw integer counts (not log-normalised; round predictions)")
        raise InputError(msg)
