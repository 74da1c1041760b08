"""Virtual Cell Challenge submission files (``.vcc``) and the cell-mean baseline.

Both reproduce cell-eval 0.8.2 (``cell-eval prep`` and ``cell-eval baseline``), the reference
implementation, with clearer errors:

* :func:`prep_vcc` writes the 2025 ``.vcc`` file: an uncompressed tar holding ``pred.h5ad.zst``
  (a zstd-compressed minimal h5ad: CSR X in float32 or float64, obs with the perturbation (and
  optionally the cell type) column and string cell ids ``"0".."n-1"``, var with the gene names
  only) and ``watermark.txt`` (the 8 bytes ``vcc-prep``).
* :func:`cell_mean_baseline` builds the cell-mean baseline: every requested perturbation's cells are
  the same vector, the mean over perturbation groups (the control group included, as in cell-eval)
  of each group's mean log-normalised expression, followed by the real control cells.
* :func:`cell_eval_normlog` is the count detection and ``normalize_total`` + ``log1p`` step both
  apply to integer-valued input (cell-eval's ``_convert_to_normlog`` with scanpy 1.11 arithmetic).
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from celltwin._constants import CONTROL_LABEL, PERT_COL
from celltwin._io import atomic_path
from celltwin.errors import ConfigError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

__all__ = [
    "EXPECTED_GENE_DIM",
    "MAX_CELL_DIM",
    "VALID_ENCODINGS",
    "WATERMARK",
    "DEFAULT_CELLTYPE_COL",
    "is_log_normalized",
    "cell_eval_normlog",
    "read_gene_list",
    "PrepResult",
    "prep_vcc",
    "read_pert_counts",
    "cell_mean_baseline",
    "write_cell_mean_baseline",
]

EXPECTED_GENE_DIM = 18080  # genes of the 2025 challenge (a mismatch only warns, as in cell-eval)
MAX_CELL_DIM = 200_000  # most cells a submission may hold
VALID_ENCODINGS = (64, 32)  # float bits of the submitted X
WATERMARK = b"vcc-prep"
DEFAULT_CELLTYPE_COL = "celltype"
_FRAC_EPS = 1e-3  # a value whose fractional part exceeds this marks the matrix as non-integer
_MAX_LOG1P = 15.0  # non-integer data must stay below this to count as log1p-normalised
_GROUP_BLOCK_ROWS = 16384  # rows per block when summing group means


def _where(source: str | None) -> str:
    return f"{source}: " if source else ""


# --------------------------------------------------------------------------- normalisation
def is_log_normalized(X, *, validate: bool = True, source: str | None = None) -> bool:
    """Whether ``X`` holds log-normalised values (True) or integer counts (False).

    NaN / infinite values are an :class:`InputError` (cell-eval would let them through as counts).
    Otherwise the same rule as cell-eval's ``guess_is_lognorm``: the matrix counts as counts when no
    stored value has a fractional part above 1e-3 (``np.modf``; for sparse matrices only stored entries are
    looked at). Non-integer data must be >= 0 (always checked) and, when ``validate``, < 15;
    otherwise :class:`InputError` (mixed or unnormalised scales).
    """
    import scipy.sparse as sp

    if X is None:
        msg = f"{_where(source)}X is missing (None); expected a cells x genes matrix"
        raise InputError(msg)
    values = X.data if sp.issparse(X) else np.asarray(X)
    if values.size == 0:
        return False
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        msg = f"{_where(source)}X has {bad} NaN or infinite values; expected finite values"
        raise InputError(msg)
    frac, _ = np.modf(values)
    if not bool(np.any(frac > _FRAC_EPS)):
        return False
    lo, hi = float(values.min()), float(values.max())
    if sp.issparse(X) and values.size < np.prod(X.shape):  # implicit zeros take part in min/max
        lo, hi = min(lo, 0.0), max(hi, 0.0)
    if lo < 0:
        msg = (
            f"{_where(source)}X has non-integer values with minimum {lo:.4g} < 0; expected raw counts "
            f"or log1p-normalised values (>= 0)"
        )
        raise InputError(msg)
    if validate and hi >= _MAX_LOG1P:
        msg = (
            f"{_where(source)}X has non-integer values with maximum {hi:.4g} >= {_MAX_LOG1P:g}; expected "
            f"raw integer counts or log1p-normalised values below {_MAX_LOG1P:g} (mixed or unnormalised "
            f"scales?); pass allow_discrete / --allow-discrete to skip this check"
        )
        raise InputError(msg)
    return True


def _row_sums_sequential(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per-row sums of CSR ``data`` accumulated left to right in float64 (scanpy's numba kernel order)."""
    n = indptr.size - 1
    out = np.zeros(n, dtype=np.float64)
    if data.size == 0:
        return out
    nonempty = indptr[1:] > indptr[:-1]
    starts = indptr[:-1][nonempty]
    # reduceat sums each segment sequentially; exact for integer-valued counts in any order anyway
    out[nonempty] = np.add.reduceat(data.astype(np.float64), starts)
    return out


def _normalize_total_log1p(X):
    """scanpy 1.11 ``normalize_total(target_sum=None)`` then ``log1p``, on a copy of ``X``.

    Integer dtypes become float32 first. CSR/CSC (CSC is converted to CSR): per-cell totals are
    accumulated in float64 and stored in the data dtype; the target is the median of all cells'
    totals (zeros included). Dense: totals are ``np.sum(X, axis=1)`` in the array dtype and the
    target is the median of the non-zero totals. Cells with a zero total are left at zero (their
    factor is replaced by 1). Every operation is the same numpy call on the same dtype as scanpy,
    so results agree bit for bit.
    """
    import scipy.sparse as sp

    if sp.issparse(X):
        x = sp.csr_matrix(X, copy=True)
        if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
            x = x.astype(np.float32)
        counts = _row_sums_sequential(x.data, x.indptr).astype(x.dtype)
        target = np.median(counts)
        factor = counts / target
        factor = factor + (factor == 0)
        data = np.true_divide(x.data, np.repeat(factor, np.diff(x.indptr)))
        if data.dtype not in (np.float32, np.float64):
            data = data.astype(np.float64)
        x = sp.csr_matrix((np.log1p(data), x.indices.copy(), x.indptr.copy()), shape=x.shape)
        return x
    x = np.array(X, copy=True)
    if not np.issubdtype(x.dtype, np.floating):
        x = x.astype(np.float32)
    counts = np.sum(x, axis=1)
    target = np.median(counts[counts > 0])
    factor = counts / target
    factor = factor + (factor == 0)
    np.true_divide(x, factor[:, None], out=x)
    np.log1p(x, out=x)
    return x


def cell_eval_normlog(adata: ad.AnnData, *, allow_discrete: bool = False, source: str | None = None) -> bool:
    """Log-normalise ``adata.X`` in place when it holds integer counts; return whether it did.

    Counts (see :func:`is_log_normalized`) become ``log1p(normalize_total(X))`` with the median
    total as target and ``uns["log1p"] = {"base": None}`` is set, as scanpy does. Already
    log-normalised data is left alone; with ``allow_discrete`` counts are left alone as well.
    """
    if is_log_normalized(adata.X, validate=not allow_discrete, source=source):
        return False
    if allow_discrete:
        return False
    adata.X = _normalize_total_log1p(adata.X)
    adata.uns["log1p"] = {"base": None}
    return True


# --------------------------------------------------------------------------- .vcc files
def read_gene_list(path: str | os.PathLike[str]) -> list[str]:
    """Genes (in order) from a CSV file without header: the first field of each non-empty row.

    Same reading as cell-eval prep (a header line, if any, is taken as a gene name too).
    """
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        msg = f"{p}: gene list file not found"
        raise InputError(msg) from None
    except (OSError, UnicodeDecodeError) as e:
        msg = f"{p}: cannot read the gene list ({e})"
        raise InputError(msg) from None
    genes = [row[0].strip() for row in csv.reader(io.StringIO(text)) if row and any(f.strip() for f in row)]
    if not genes:
        msg = f"{p}: the gene list is empty; expected one gene name per line"
        raise InputError(msg)
    return genes


@dataclass(frozen=True)
class PrepResult:
    """What :func:`prep_vcc` wrote."""

    path: Path
    n_cells: int
    n_genes: int
    reordered_genes: bool  # the input had the right genes in another order
    normalized: bool  # integer counts were log-normalised
    warnings: list[str] = field(default_factory=list)


def _minimal_prep_adata(
    adata: ad.AnnData,
    genes: Sequence[str],
    *,
    pert_col: str,
    celltype_col: str | None,
    control_label: str,
    output_pert_col: str,
    output_celltype_col: str,
    encoding: int,
    allow_discrete: bool,
    expected_gene_dim: int | None,
    max_cell_dim: int | None,
    source: str,
) -> tuple[ad.AnnData, bool, bool, list[str]]:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    if encoding not in VALID_ENCODINGS:
        msg = f"encoding must be one of {list(VALID_ENCODINGS)} (float bits), got {encoding!r}"
        raise ConfigError(msg)
    var_names = [str(g) for g in adata.var_names]
    if pert_col not in adata.obs:
        msg = f"{source}: perturbation column obs[{pert_col!r}] is missing; obs has {list(adata.obs.columns)}"
        raise InputError(msg)
    if celltype_col and celltype_col not in adata.obs:
        msg = (
            f"{source}: cell type column obs[{celltype_col!r}] is missing; obs has {list(adata.obs.columns)}"
        )
        raise InputError(msg)
    labels = pd.unique(adata.obs[pert_col].astype(object).to_numpy())
    if control_label not in set(labels):
        shown = ", ".join(map(repr, labels[:10])) + (" ..." if len(labels) > 10 else "")
        msg = (
            f"{source}: control label {control_label!r} not found in obs[{pert_col!r}] "
            f"({len(labels)} labels: {shown}); a submission must contain control cells"
        )
        raise InputError(msg)
    warns: list[str] = []
    if expected_gene_dim and len(genes) != expected_gene_dim:
        warns.append(
            f"the gene list has {len(genes)} genes, not the expected {expected_gene_dim}; "
            f"expecting {len(genes)} genes"
        )
    gene_set, var_set = set(genes), set(var_names)
    if len(gene_set) != len(genes):
        dup = sorted(pd.Series(list(genes))[pd.Series(list(genes)).duplicated()].unique())[:5]
        msg = f"the gene list has duplicated names, e.g. {dup}"
        raise InputError(msg)
    reordered = False
    if var_names != list(genes):
        missing = [g for g in genes if g not in var_set]
        extra = [g for g in var_names if g not in gene_set]
        if missing or extra or len(var_set) != len(var_names):
            msg = (
                f"{source}: var_names do not match the gene list ({len(genes)} genes): "
                f"{len(missing)} missing (e.g. {missing[:5]}), "
                f"{len(extra)} not in the list (e.g. {extra[:5]})"
            )
            if not missing and not extra:
                msg = f"{source}: var_names contain duplicated gene names"
            raise InputError(msg)
        reordered = True
        warns.append("the input has all expected genes but in another order; reordered to the gene list")
        pos = {g: i for i, g in enumerate(var_names)}
        cols = np.array([pos[g] for g in genes])
    else:
        cols = None
    if max_cell_dim and adata.n_obs > max_cell_dim:
        msg = f"{source}: {adata.n_obs} cells exceed the maximum of {max_cell_dim} cells for a submission"
        raise InputError(msg)
    dtype = np.float32 if encoding == 32 else np.float64
    X = adata.X
    if X is None:
        msg = f"{source}: X is missing (None); expected a cells x genes matrix"
        raise InputError(msg)
    if cols is not None:
        X = X[:, cols]
    X = X.astype(dtype) if sp.issparse(X) else _dense_to_csr(X, dtype)
    obs = pd.DataFrame(
        {output_pert_col: adata.obs[pert_col].values}, index=np.arange(adata.n_obs).astype(str)
    )
    if celltype_col:
        obs[output_celltype_col] = adata.obs[celltype_col].values
    var = pd.DataFrame(index=np.asarray(list(genes), dtype=object))
    minimal = ad.AnnData(X=X, obs=obs, var=var)
    normalized = cell_eval_normlog(minimal, allow_discrete=allow_discrete, source=source)
    return minimal, reordered, normalized, warns


def _dense_to_csr(X, dtype, block_rows: int = 8192):
    """CSR copy of a dense matrix in ``dtype``, converted in row blocks (never a full dense copy)."""
    import scipy.sparse as sp

    X = np.asarray(X)
    if X.shape[0] <= block_rows:
        return sp.csr_matrix(X.astype(dtype))
    blocks = [sp.csr_matrix(X[i : i + block_rows].astype(dtype)) for i in range(0, X.shape[0], block_rows)]
    return sp.vstack(blocks, format="csr")


def prep_vcc(
    adata: ad.AnnData | str | os.PathLike[str],
    genes: Sequence[str] | str | os.PathLike[str],
    output: str | os.PathLike[str],
    *,
    pert_col: str = PERT_COL,
    celltype_col: str | None = None,
    control_label: str = CONTROL_LABEL,
    output_pert_col: str = PERT_COL,
    output_celltype_col: str = DEFAULT_CELLTYPE_COL,
    encoding: int = 32,
    allow_discrete: bool = False,
    expected_gene_dim: int | None = EXPECTED_GENE_DIM,
    max_cell_dim: int | None = MAX_CELL_DIM,
    zstd_level: int = 3,
) -> PrepResult:
    """Write a ``.vcc`` submission file from a prediction (AnnData or ``.h5ad`` path).

    Checks, in cell-eval's order: the perturbation column (and cell type column, if given) exists,
    the control label is present, var_names equal the gene list (same set in another order is
    reordered with a warning; missing or extra genes are an error), at most ``max_cell_dim`` cells
    (``None`` disables), ``encoding`` in (32, 64). A gene list whose length differs from
    ``expected_gene_dim`` only warns (as in cell-eval). Duplicated gene names are an error here
    (cell-eval fails later on them). X becomes CSR in the encoding's float type; integer counts are
    log-normalised (:func:`cell_eval_normlog`). The h5ad is compressed at zstd level 3 (the
    ``zstd`` command's default) and packed with ``watermark.txt`` into an uncompressed GNU tar;
    the write is atomic. Does not modify ``adata``.
    """
    import zstandard

    source = str(adata) if isinstance(adata, (str, os.PathLike)) else "prediction"
    if isinstance(adata, (str, os.PathLike)):
        adata = _read_h5ad(adata)
    gene_list = read_gene_list(genes) if isinstance(genes, (str, os.PathLike)) else [str(g) for g in genes]
    minimal, reordered, normalized, warns = _minimal_prep_adata(
        adata,
        gene_list,
        pert_col=pert_col,
        celltype_col=celltype_col,
        control_label=control_label,
        output_pert_col=output_pert_col,
        output_celltype_col=output_celltype_col,
        encoding=encoding,
        allow_discrete=allow_discrete,
        expected_gene_dim=expected_gene_dim,
        max_cell_dim=max_cell_dim,
        source=source,
    )
    out = Path(output)
    # named like atomic_path's temporaries, so a killed run's leftover is removed by a later run
    with tempfile.TemporaryDirectory(
        prefix=f".{out.name}.{os.getpid()}-",
        suffix=".tmpdir",
        dir=out.parent if out.parent.exists() else None,
    ) as tmp:
        h5 = Path(tmp) / "pred.h5ad"
        minimal.write_h5ad(h5)
        zst = Path(tmp) / "pred.h5ad.zst"
        # the zstd command's frame: level 3, content size and checksum written
        cctx = zstandard.ZstdCompressor(level=zstd_level, write_content_size=True, write_checksum=True)
        with open(h5, "rb") as fin, open(zst, "wb") as fout:
            cctx.copy_stream(fin, fout, size=h5.stat().st_size)
        h5.unlink()
        (Path(tmp) / "watermark.txt").write_bytes(WATERMARK)
        with (
            atomic_path(out, suffix=".vcc") as tmp_out,
            tarfile.open(tmp_out, "w", format=tarfile.GNU_FORMAT) as tar,
        ):
            for name in ("pred.h5ad.zst", "watermark.txt"):
                tar.add(Path(tmp) / name, arcname=name, recursive=False)
    return PrepResult(
        path=out,
        n_cells=minimal.n_obs,
        n_genes=minimal.n_vars,
        reordered_genes=reordered,
        normalized=normalized,
        warnings=warns,
    )


def _read_h5ad(path: str | os.PathLike[str], backed: bool = False) -> ad.AnnData:
    import anndata as ad

    p = Path(path)
    if not p.exists():
        msg = f"{p}: file not found"
        raise InputError(msg)
    try:
        return ad.read_h5ad(p)
    except Exception as e:  # h5py / anndata raise many types for a bad file
        msg = f"{p}: cannot read as .h5ad ({type(e).__name__}: {e})"
        raise InputError(msg) from None


# --------------------------------------------------------------------------- cell-mean baseline
def read_pert_counts(
    path: str | os.PathLike[str], *, pert_col: str = PERT_COL, counts_col: str = "n_cells"
) -> dict[str, int]:
    """``{perturbation: number of cells}`` from a CSV with a header (other columns are ignored).

    Row order is kept (it is the order of the baseline's cells). Perturbation names are read as
    strings. A repeated perturbation is an error (cell-eval would emit its cells twice).
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
    out: dict[str, int] = {}
    for i, row in enumerate(rows, start=2):
        name, raw = row[pert_col], (row[counts_col] or "").strip()
        try:
            n = int(raw)
        except ValueError:
            msg = f"{p}: line {i}: column {counts_col!r} must be a non-negative integer, got {raw!r}"
            raise InputError(msg) from None
        if n < 0:
            msg = f"{p}: line {i}: column {counts_col!r} must be a non-negative integer, got {n}"
            raise InputError(msg)
        if name in out:
            msg = f"{p}: line {i}: perturbation {name!r} is listed twice"
            raise InputError(msg)
        out[name] = n
    return out


def _group_means(X, codes: np.ndarray, n_groups: int) -> np.ndarray:
    """(n_groups, G) mean of the rows of each group, accumulated in float64, in X's float dtype.

    Float32 input gives float32 means (polars' ``group_by().mean()``, which cell-eval uses,
    accumulates in float64 and returns the column dtype); integer/bool input gives float64.
    """
    import scipy.sparse as sp

    G = X.shape[1]
    sums = np.zeros((n_groups, G), dtype=np.float64)
    X = sp.csr_matrix(X) if sp.issparse(X) else np.asarray(X)
    for start in range(0, X.shape[0], _GROUP_BLOCK_ROWS):  # bounded float64 temporaries
        stop = min(start + _GROUP_BLOCK_ROWS, X.shape[0])
        c = codes[start:stop]
        ind = sp.csr_matrix((np.ones(c.size), (c, np.arange(c.size))), shape=(n_groups, c.size))
        block = X[start:stop].astype(np.float64)
        sums += np.asarray((ind @ block).todense()) if sp.issparse(block) else ind @ block
    means = sums / np.bincount(codes, minlength=n_groups)[:, None]
    dtype = X.dtype if np.issubdtype(X.dtype, np.floating) else np.float64
    return means.astype(dtype)


def cell_mean_baseline(
    adata: ad.AnnData,
    counts: Mapping[str, int] | str | os.PathLike[str] | None = None,
    *,
    pert_col: str = PERT_COL,
    control_pert: str = CONTROL_LABEL,
    counts_col: str = "n_cells",
    as_delta: bool = False,
    allow_discrete: bool = False,
    source: str = "input",
) -> ad.AnnData:
    """The cell-mean baseline of ``cell-eval baseline`` (``build_base_mean_adata``).

    ``adata`` is log-normalised when it holds counts (:func:`cell_eval_normlog`, on a copy: the
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
    in float64 and rounded to X's dtype, and the mean over groups is ``np.mean`` in that dtype
    over groups in order of first appearance, so float32 results match cell-eval up to float32
    rounding of the summation order (float64 input: to ~1e-15).
    """
    import anndata as ad
    import pandas as pd

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
    work = ad.AnnData(
        X=adata.X, obs=adata.obs[[pert_col]].copy(), var=pd.DataFrame(index=adata.var_names.copy())
    )
    work.X = work.X.copy()
    cell_eval_normlog(work, allow_discrete=allow_discrete, source=source)

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
    means = _group_means(work.X, codes, len(groups))  # (n_groups, G), groups in first-appearance order
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
    ctrl = work[np.flatnonzero(values == control_pert)]
    return ad.concat([base, ctrl])


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
    if isinstance(adata, (str, os.PathLike)):
        adata = _read_h5ad(adata)
    kwargs.setdefault("source", source)
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
