"""``celltwin baseline``: cell-eval 0.8.2's cell-mean baseline, and the VCC baseline built from it.

* :func:`cell_mean_baseline` builds the cell-mean baseline (``cell-eval baseline``,
  ``build_base_mean_adata``): every requested perturbation's cells are the same vector, the mean
  over perturbation groups (the control group included, as in cell-eval) of each group's mean
  log-normalised expression, followed by the real control cells.
* :func:`vcc_baseline` is the baseline the VCC score is normalised against, built for one real
  file: :func:`cell_mean_baseline` of the training cells with the real file's cells per
  perturbation (what ``cell-eval baseline -a TRAIN -c COUNTS`` writes, COUNTS = the real counts),
  restricted to the real file's genes. ``celltwin score --train/--split`` uses it.
* :func:`read_pert_counts` reads a VCC cells-per-perturbation CSV (``target_gene,n_cells``):
  ``celltwin baseline -c`` and ``celltwin predict --counts`` both read it here.

The cell-mean baseline is not celltwin's ``cell-mean`` model: that one adds the *cell-weighted*
mean shift of the training perturbed cells to each control cell (variation kept); this one gives
every predicted cell the same vector, the *unweighted* mean of the group means with the control
group counted as a group. They score differently (e.g. DES, MAE), so VCC-normalised scores must
use this one. Counts are log-normalised by the evaluator's input rule
(:func:`celltwin.eval._load.cell_eval_normlog`).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from celltwin._constants import CONTROL_LABEL, PERT_COL
from celltwin._io import atomic_path
from celltwin.errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

__all__ = [
    "VCC_BASELINE_NAME",
    "cell_mean_baseline",
    "read_pert_counts",
    "real_pert_counts",
    "vcc_baseline",
    "write_cell_mean_baseline",
]

#: how the VCC baseline is named in celltwin's output (never confused with the ``cell-mean`` model)
VCC_BASELINE_NAME = "vcc-baseline (cell-eval cell-mean)"

#: stored rows per block when the training cells are streamed from an ``.h5ad`` file
BLOCK_ROWS = 8192


def read_pert_counts(
    path: str | os.PathLike[str], *, pert_col: str = PERT_COL, counts_col: str = "n_cells", min_cells: int = 0
) -> dict[str, int]:
    """``{perturbation: number of cells}`` from a CSV with a header (other columns are ignored).

    celltwin's one reader of a cells-per-perturbation table (the VCC's ``pert_counts_*.csv``).
    Row order is kept (it is the order of the baseline's cells); control rows are kept too (the
    caller drops them). Perturbation names are read as strings; every count must be an integer
    ``>= min_cells`` (``celltwin predict --counts`` asks for 1). A repeated perturbation is an
    error (cell-eval would emit its cells twice).
    """
    p = Path(path)
    try:
        with open(p, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
            header = rows[0].keys() if rows else []
    except FileNotFoundError:
        msg = f"{p}: counts file not found"
        raise InputError(msg) from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        msg = f"{p}: cannot read the counts CSV ({type(e).__name__}: {e}); expected UTF-8 text with a header"
        raise InputError(msg) from None
    for col in (pert_col, counts_col):
        if col not in header:
            msg = f"{p}: column {col!r} not found; the header has {list(header)}"
            raise InputError(msg)
    want = "a non-negative integer" if min_cells <= 0 else f"an integer >= {min_cells}"
    out: dict[str, int] = {}
    for i, row in enumerate(rows, start=2):
        name, raw = row[pert_col], (row[counts_col] or "").strip()
        try:
            n = int(raw)
        except ValueError:
            msg = f"{p}: line {i}: column {counts_col!r} must be {want}, got {raw!r}"
            raise InputError(msg) from None
        if n < max(min_cells, 0):
            msg = f"{p}: line {i}: column {counts_col!r} must be {want}, got {n}"
            raise InputError(msg)
        if name in out:
            msg = f"{p}: line {i}: perturbation {name!r} is listed twice"
            raise InputError(msg)
        out[name] = n
    return out


def real_pert_counts(labels, control_pert: str = CONTROL_LABEL) -> dict[str, int]:
    """``{perturbation: cells}`` of the non-control labels, in order of first appearance."""
    import pandas as pd

    values = pd.Series(np.asarray(labels, dtype=object)).astype(str)
    sizes = values.value_counts(sort=False)
    return {str(g): int(sizes[g]) for g in pd.unique(values) if g != control_pert}



def cell_mean_baseline(
    adata: ad.AnnData | str | os.PathLike[str],
    counts: Mapping[str, int] | str | os.PathLike[str] | None = None,
    *,
    rows: np.ndarray | None = None,
    pert_col: str = PERT_COL,
    control_pert: str = CONTROL_LABEL,
    counts_col: str = "n_cells",
    as_delta: bool = False,
    allow_discrete: bool = False,
    source: str = "input",
) -> ad.AnnData:
    """The cell-mean baseline of ``cell-eval baseline`` (``build_base_mean_adata``).

    ``adata`` is log-normalised when it holds counts (:func:`~celltwin.eval._load.cell_eval_normlog`, on a copy: the
    input is not modified). The baseline vector is the unweighted mean over all groups of
    ``obs[pert_col]`` (the control group included) of each group's mean expression; with
    ``as_delta`` it is the mean over non-control groups of (group mean - control mean) instead.
    Output: ``n`` rows of that vector for each perturbation, where ``n`` comes from ``counts``
    (a mapping or a CSV path with ``pert_col`` / ``counts_col`` columns; control rows are dropped;
    perturbations need not be present in ``adata``) or, by default, is the number of cells of each
    non-control perturbation in ``adata``; then the control cells of ``adata``. Obs names are
    ``p.0, p.1, ...`` then the controls' names; obs holds ``pert_col`` only; var keeps the names only;
    X is CSR when ``adata.X`` is sparse.

    Tie-breaks / precision: perturbations without a counts file come in order of first appearance
    in ``adata`` (cell-eval's polars ``group_by`` order is unspecified); group means are accumulated
    in float64 and rounded to X's dtype (:func:`~celltwin.eval._metrics.pseudobulk`, the evaluator's), and the mean over groups is ``np.mean`` in that dtype
    over groups in order of first appearance, so float32 results match cell-eval up to float32
    rounding of the summation order (float64 input: to ~1e-15).

    ``adata`` may also be an ``.h5ad`` path (or an open :class:`~celltwin.data.source.H5adSource`):
    X is then never read whole but streamed in blocks of :data:`BLOCK_ROWS` stored rows (two
    passes: the input rule and the cell totals, then the normalised group sums and the control
    rows), with bitwise the in-memory result. ``rows`` (sorted, unique) restricts the training cells
    to those rows (e.g. one context), as ``adata[rows]`` would.
    """
    import anndata as ad
    import pandas as pd

    from celltwin.eval._load import cell_eval_normlog
    from celltwin.eval._metrics import pseudobulk

    src = None
    if isinstance(adata, (str, os.PathLike)) or type(adata).__name__ == "H5adSource":
        from celltwin.data.source import H5adSource

        opened = not isinstance(adata, H5adSource)
        src = H5adSource(adata) if opened else adata
        if source == "input":
            source = src.name
        # obs / var only (X stays on disk): subset and labelled exactly as the in-memory AnnData
        adata = ad.AnnData(obs=src.obs, var=pd.DataFrame(index=src.var_names))
    if rows is not None:
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or (rows.size and (rows[0] < 0 or rows[-1] >= adata.n_obs or np.any(np.diff(rows) <= 0))):
            msg = f"{source}: rows must be sorted unique cell indices in [0, {adata.n_obs})"
            raise InputError(msg)
        adata = adata[rows].copy()
    if pert_col not in adata.obs.columns:
        msg = f"{source}: perturbation column obs[{pert_col!r}] is missing; obs has {list(adata.obs.columns)}"
        raise InputError(msg)
    labels = adata.obs[pert_col]
    values = labels.astype(object).to_numpy()
    groups = list(pd.unique(values))  # first-appearance order
    if control_pert not in set(groups):
        shown = ", ".join(map(repr, groups[:10])) + (" ..." if len(groups) > 10 else "")
        msg = f"{source}: control {control_pert!r} not found in obs[{pert_col!r}] (labels: {shown})"
        raise InputError(msg)
    if src is None:
        work = ad.AnnData(
            X=adata.X, obs=adata.obs[[pert_col]].copy(), var=pd.DataFrame(index=adata.var_names.copy())
        )
        work.X = work.X.copy()
        cell_eval_normlog(work, allow_discrete=allow_discrete, source=source)  # in place, on the copy
    else:
        work = ad.AnnData(obs=adata.obs[[pert_col]].copy(), var=pd.DataFrame(index=adata.var_names.copy()))

    if counts is None:
        sizes = pd.Series(values).value_counts(sort=False)
        pert_counts = {g: int(sizes[g]) for g in groups if g != control_pert}
        categorical = isinstance(labels.dtype, pd.CategoricalDtype)
    else:
        if isinstance(counts, (str, os.PathLike)):
            pert_counts = read_pert_counts(counts, pert_col=pert_col, counts_col=counts_col)
        else:
            pert_counts = {str(k): int(v) for k, v in counts.items()}
            bad = {k: v for k, v in pert_counts.items() if v < 0}
            if bad:
                msg = f"counts: cell numbers must be >= 0, got {bad}"
                raise InputError(msg)
        pert_counts = {k: v for k, v in pert_counts.items() if k != control_pert}
        categorical = False

    pos = {g: i for i, g in enumerate(groups)}
    codes = np.array([pos[v] for v in values], dtype=np.int64)
    ctrl_idx = np.flatnonzero(values == control_pert)
    if src is None:
        means = pseudobulk(work.X, codes, len(groups))  # (n_groups, G), groups in first-appearance order
    else:
        file_rows = np.arange(src.n_obs, dtype=np.int64) if rows is None else rows
        try:
            means, ctrl_X = _streamed_means(src, file_rows, codes, len(groups), ctrl_idx,
                                            allow_discrete=allow_discrete, source=source)
        finally:
            if opened:
                src.close()
    is_ctrl = np.array([g == control_pert for g in groups])
    # polars hands cell-eval a column-major matrix, so numpy reduces each gene's contiguous column
    # (pairwise summation); a Fortran-ordered copy reproduces that summation order
    if as_delta:
        baseline = np.asfortranarray(means[~is_ctrl] - means[is_ctrl]).mean(axis=0)
    else:
        baseline = np.asfortranarray(means).mean(axis=0)

    names = np.repeat(np.array(list(pert_counts), dtype=object), list(pert_counts.values()))
    # cell-eval's categories (polars' string-cache order, control included) differ from the controls',
    # so anndata.concat unions them in sorted order; categories absent from both parts are dropped
    col = pd.Categorical(names) if categorical else names
    obs = pd.DataFrame({pert_col: col})
    obs.index = pd.Index([f"p.{i}" for i in range(names.size)])
    base = ad.AnnData(X=np.full((names.size, baseline.size), baseline), obs=obs, var=work.var)
    if src is None:
        ctrl = work[ctrl_idx]
    else:
        ctrl = work[ctrl_idx].copy()
        ctrl.X = ctrl_X
    return ad.concat([base, ctrl])


def _streamed_means(src, file_rows: np.ndarray, codes: np.ndarray, n_groups: int, ctrl_idx: np.ndarray, *,
                    allow_discrete: bool, source: str):
    """``(group means, normalised control rows)`` of the cells ``file_rows`` of ``src``, streamed.

    The streamed twin of :func:`~celltwin.eval._load.cell_eval_normlog` + :func:`~celltwin.eval._metrics.pseudobulk`
    + the control rows of the normalised X, bitwise: pass 1 applies the input rule
    (:class:`~celltwin.eval._load.ValueScan`) and keeps the per-cell totals (row-local, in the
    normalised dtype); the factors then come from all totals at once (scanpy's median); pass 2
    normalises each block exactly as :func:`~celltwin.eval._load.normalize_log1p` does the whole
    matrix (every step is row-local) and adds its rows to the group sums in row order (CSR:
    :class:`~celltwin.baselines._effects.GroupSums`, as ``group_sums_csr``; dense: the same chunks of
    ``_DENSE_CHUNK`` rows per group as ``pseudobulk``). Memory: two ``(n_groups, G)`` float64
    tables, the per-cell totals, one block and the control rows (which are part of the output).
    """
    import scipy.sparse as sp

    from celltwin.baselines._accumulate import add_dense_rows
    from celltwin.baselines._effects import GroupSums
    from celltwin.eval._load import ValueScan, _divide_rows, csr_factors, row_totals
    from celltwin.eval._metrics import _DENSE_CHUNK

    step = max(int(BLOCK_ROWS), 1)
    spans = [(s, min(s + step, file_rows.size)) for s in range(0, file_rows.size, step)]

    def block(s: int, e: int):
        X = src.read_stored(file_rows[s:e])
        return sp.csr_matrix(X) if sp.issparse(X) and X.format != "csr" else X

    # pass 1: the input rule and the cell totals (computed in the dtype normalisation would use)
    scan, totals = None, []
    for s, e in spans:
        X = block(s, e)
        vals = X.data if sp.issparse(X) else X
        if scan is None:
            scan = ValueScan(vals.dtype, source)
        scan.update(vals)
        if sp.issparse(X):
            data = X.data.astype(np.float32) if X.dtype.kind in "iu" else X.data
            totals.append(row_totals(data, X.indptr).astype(data.dtype))
        else:
            Xf = X.astype(np.float32) if X.dtype.kind in "iu" else np.ascontiguousarray(X)
            totals.append(np.sum(Xf, axis=1))
    normalise = scan.finish(check_log_max=not allow_discrete) and not allow_discrete
    dense = src.x_format == "dense"
    factor = None
    if normalise:
        tot = np.concatenate(totals)
        if dense:
            target = np.median(tot[tot > 0])  # dense rule: median over non-zero totals only
            factor = tot / target
            factor = factor + (factor == 0)
        else:
            factor = csr_factors(tot)
    del totals

    # pass 2: normalise each block, add its rows to the group sums, keep its control rows
    is_ctrl = np.zeros(file_rows.size, dtype=bool)
    is_ctrl[ctrl_idx] = True
    n_genes = src.n_vars
    sums = GroupSums(n_groups, n_genes) if not dense else None
    dsums = np.zeros((n_groups, n_genes), dtype=np.float64) if dense else None
    part = np.zeros((n_groups, n_genes), dtype=np.float64) if dense else None
    in_part = np.zeros(n_groups, dtype=np.int64)
    ctrl_parts, out_dtype = [], None
    for s, e in spans:
        X = block(s, e)
        c = np.ascontiguousarray(codes[s:e], dtype=np.int64)
        if sp.issparse(X):
            if normalise:
                if X.dtype.kind in "iu":
                    X = X.astype(np.float32)
                _divide_rows(X.indptr, X.data, factor[s:e])
                np.log1p(X.data, out=X.data)
            sums.add(X, c)
        else:
            if normalise:
                X = X.astype(np.float32) if X.dtype.kind in "iu" else np.array(X, order="C", copy=True)
                np.true_divide(X, factor[s:e, None], out=X)
                np.log1p(X, out=X)
            _add_dense_chunked(dsums, part, in_part, c, X, _DENSE_CHUNK, add_dense_rows)
        out_dtype = X.dtype
        keep = is_ctrl[s:e]
        if keep.any():
            ctrl_parts.append(X[np.flatnonzero(keep)])
    if dense:
        dsums += part  # the last (partial) chunk of each group
        total = dsums
    else:
        total = sums.sums
    sizes = np.bincount(codes[codes >= 0], minlength=n_groups).astype(np.float64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = total / sizes[:, None]
    means = means.astype(out_dtype if out_dtype.kind == "f" else np.float64)
    ctrl_X = sp.vstack(ctrl_parts, format="csr") if not dense else np.concatenate(ctrl_parts, axis=0)
    return means, ctrl_X


def _add_dense_chunked(sums, part, in_part, codes, X, chunk: int, add_rows) -> None:
    """Add the rows of dense ``X`` to ``part`` (the open chunk of each group) in row order; a group's
    chunk is added to ``sums`` once it holds ``chunk`` rows (``pseudobulk``'s dense summation)."""
    Xf = np.ascontiguousarray(X, dtype=np.float64)
    # running position of each row within its group's open chunk
    order = np.argsort(codes, kind="stable")
    sc = codes[order]
    first = np.searchsorted(sc, sc, side="left")
    rank = np.empty(codes.size, dtype=np.int64)
    rank[order] = np.arange(codes.size) - first
    valid = codes >= 0
    pos = np.where(valid, in_part[np.where(valid, codes, 0)] + rank, -1)
    ends = np.flatnonzero(valid & ((pos + 1) % chunk == 0))  # rows that close a chunk
    start = 0
    for i in sorted({*ends.tolist(), codes.size - 1}):
        if i + 1 > start:
            add_rows(part, codes[start : i + 1], Xf[start : i + 1])
        start = i + 1
        if valid[i] and (pos[i] + 1) % chunk == 0:
            g = codes[i]
            sums[g] += part[g]
            part[g] = 0.0
    np.add.at(in_part, codes[valid], 1)
    in_part %= chunk


def write_cell_mean_baseline(
    adata: ad.AnnData | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    de_output: str | os.PathLike[str] | None = None,
    n_threads: int | None = None,
    **kwargs,
) -> ad.AnnData:
    """:func:`cell_mean_baseline` of ``adata`` (AnnData or ``.h5ad`` path) written atomically to ``output``.

    ``kwargs`` are those of :func:`cell_mean_baseline`. With ``de_output``, the baseline's
    differential expression table against its control cells is written there as CSV too, as
    ``cell-eval baseline`` does (pdex 0.3.0 ``mode="ref"``, log1p input, epsilon 0: the
    ``mode="v2"`` table of :func:`celltwin.eval._de.de_table`, same columns and rows).
    """
    source = str(adata) if isinstance(adata, (str, os.PathLike)) else "input"
    kwargs.setdefault("source", source)  # a path is streamed by cell_mean_baseline, never read whole
    out = cell_mean_baseline(adata, **kwargs)
    frame = None
    if de_output is not None:
        from celltwin.eval._de import de_table

        pert_col = kwargs.get("pert_col", PERT_COL)
        frame = de_table(
            out.X,
            out.obs[pert_col],
            kwargs.get("control_pert", CONTROL_LABEL),
            out.var_names,
            mode="v2",
            n_threads=n_threads,
        )
    with atomic_path(output, suffix=".h5ad") as tmp:
        out.write_h5ad(tmp)
    if frame is not None:
        with atomic_path(de_output, suffix=".csv") as tmp:
            frame.to_csv(tmp, index=False)
    return out


def vcc_baseline(
    train: ad.AnnData | str | os.PathLike[str],
    real: ad.AnnData | str | os.PathLike[str],
    *,
    pert_col: str = PERT_COL,
    control_pert: str = CONTROL_LABEL,
    allow_discrete: bool = False,
    rows: np.ndarray | None = None,
) -> tuple[ad.AnnData, dict[str, int]]:
    """The VCC baseline for ``real``: ``(baseline AnnData, cells per perturbation)``.

    :func:`cell_mean_baseline` of ``train`` (the training cells, controls included; counts are
    log-normalised over all of their genes, as ``cell-eval baseline`` does) with the number of
    cells of each non-control perturbation of ``real`` (order of first appearance), then the
    training controls; the result keeps ``real``'s genes in its order (every one must be in
    ``train``). Same values as ``cell-eval baseline -a TRAIN -c COUNTS`` with COUNTS those real
    counts (``celltwin baseline -a TRAIN -c COUNTS``), so ``celltwin eval`` of it against ``real``
    gives the baseline row of the VCC score. ``train`` may be an ``.h5ad`` path (streamed, never
    read whole); ``rows`` (sorted, unique) restricts the training cells to those rows.
    """
    import pandas as pd

    real_name = str(real) if isinstance(real, (str, os.PathLike)) else "real"
    if isinstance(real, (str, os.PathLike)):
        from celltwin.data.source import H5adSource

        src = H5adSource(real)
        real_obs, real_genes = src.obs, pd.Index(src.var_names.astype(str))
    else:
        real_obs, real_genes = real.obs, pd.Index(real.var_names.astype(str))
    if pert_col not in real_obs.columns:
        msg = f"{real_name}: perturbation column obs[{pert_col!r}] is missing; obs has {list(real_obs.columns)}"
        raise InputError(msg)
    counts = real_pert_counts(real_obs[pert_col].to_numpy(), control_pert)
    if not counts:
        msg = f"{real_name}: no perturbed cells (every obs[{pert_col!r}] is the control {control_pert!r})"
        raise InputError(msg)
    train_name = str(train) if isinstance(train, (str, os.PathLike)) else "training cells"
    # a path is streamed by cell_mean_baseline (never read whole)
    base = cell_mean_baseline(train, counts, rows=rows, pert_col=pert_col, control_pert=control_pert,
                              allow_discrete=allow_discrete, source=train_name)
    have = pd.Index(base.var_names.astype(str))
    if not have.equals(real_genes):
        missing = [g for g in real_genes if g not in set(have)]
        if missing:
            msg = (f"{train_name}: {len(missing)} gene(s) of {real_name} are not in the training cells "
                   f"(e.g. {', '.join(missing[:5])}); the baseline needs every real gene")
            raise InputError(msg)
        base = base[:, have.get_indexer(real_genes)].copy()
    return base, counts
