"""``celltwin prep``: Virtual Cell Challenge submission files (``.vcc``), cell-eval 0.8.2 ``prep``.

:func:`prep_vcc` writes the 2025 ``.vcc`` file: an uncompressed tar holding ``pred.h5ad.zst`` (a
zstd-compressed minimal h5ad: CSR X in float32 or float64, obs with the perturbation (and
optionally the cell type) column and string cell ids ``"0".."n-1"``, var with the gene names only)
and ``watermark.txt`` (the 8 bytes ``vcc-prep``). Same checks and values as cell-eval's ``prep``,
with clearer errors; counts are log-normalised by the evaluator's input rule
(:func:`celltwin.eval._load.cell_eval_normlog`). An AnnData is prepared here, in memory; a file
is streamed by :mod:`celltwin.eval._prep_stream`.
"""

from __future__ import annotations

import csv
import io
import os
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from celltwin._constants import CONTROL_LABEL, PERT_COL
from celltwin._io import atomic_path, read_text
from celltwin.errors import ConfigError, InputError
from celltwin.eval._prep_common import check_obs_columns, open_prediction, prep_tmpdir

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

__all__ = [
    "DEFAULT_CELLTYPE_COL",
    "EXPECTED_GENE_DIM",
    "MAX_CELL_DIM",
    "VALID_ENCODINGS",
    "WATERMARK",
    "PrepResult",
    "prep_vcc",
    "read_gene_list",
]

EXPECTED_GENE_DIM = 18080  # genes of the 2025 challenge (a mismatch only warns, as in cell-eval)
MAX_CELL_DIM = 200_000  # most cells a submission may hold
VALID_ENCODINGS = (64, 32)  # float bits of the submitted X
WATERMARK = b"vcc-prep"
DEFAULT_CELLTYPE_COL = "celltype"


def read_gene_list(path: str | os.PathLike[str]) -> list[str]:
    """Genes (in order) from a CSV file without header: the first field of each non-empty row.

    Same reading as cell-eval prep (a header line, if any, is taken as a gene name too).
    """
    p = Path(path)
    text = read_text(p, "gene list file")
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


@dataclass
class PrepLayout:
    """What prep's checks of everything but X decided: the output's shape, columns and dtype."""

    cols: np.ndarray | None  # input column of each listed gene, None when already in order
    reordered: bool
    warnings: list[str]
    dtype: type  # np.float32 or np.float64 (the encoding)
    obs: Any  # the minimal obs: the perturbation (and cell type) column, cell ids "0".."n-1"
    var: Any  # the gene names only


def plan_layout(
    obs,
    var_names,
    n_obs: int,
    genes: Sequence[str],
    *,
    pert_col: str,
    celltype_col: str | None,
    control_label: str,
    output_pert_col: str,
    output_celltype_col: str,
    encoding: int,
    expected_gene_dim: int | None,
    max_cell_dim: int | None,
    source: str,
) -> PrepLayout:
    """prep's checks of everything but X, in cell-eval's order, and the minimal obs / var."""
    import pandas as pd

    if encoding not in VALID_ENCODINGS:
        msg = f"encoding must be one of {list(VALID_ENCODINGS)} (float bits), got {encoding!r}"
        raise ConfigError(msg)
    var_names = [str(g) for g in var_names]
    check_obs_columns(obs, source, pert_col=pert_col, celltype_col=celltype_col)
    labels = pd.unique(obs[pert_col].astype(object).to_numpy())
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
    if max_cell_dim and n_obs > max_cell_dim:
        msg = f"{source}: {n_obs} cells exceed the maximum of {max_cell_dim} cells for a submission"
        raise InputError(msg)
    new_obs = pd.DataFrame({output_pert_col: obs[pert_col].values}, index=np.arange(n_obs).astype(str))
    if celltype_col:
        new_obs[output_celltype_col] = obs[celltype_col].values
    var = pd.DataFrame(index=np.asarray(list(genes), dtype=object))
    dtype = np.float32 if encoding == 32 else np.float64
    return PrepLayout(cols, reordered, warns, dtype, new_obs, var)


def _minimal_prep_adata(
    adata: ad.AnnData, genes: Sequence[str], *, allow_discrete: bool, **layout_kw
) -> tuple[ad.AnnData, bool, bool, list[str]]:
    """The in-memory prep of an AnnData: ``(minimal AnnData, reordered, normalized, warnings)``."""
    import anndata as ad
    import scipy.sparse as sp

    from celltwin.eval._load import cell_eval_normlog

    source = layout_kw["source"]
    lay = plan_layout(adata.obs, adata.var_names, adata.n_obs, genes, **layout_kw)
    X = adata.X
    if X is None:
        msg = f"{source}: X is missing (None); expected a cells x genes matrix"
        raise InputError(msg)
    if lay.cols is not None:
        X = X[:, lay.cols]
    # a copy either way (astype copies; the dense path builds new blocks): the input is never modified
    X = X.astype(lay.dtype) if sp.issparse(X) else _dense_to_csr(X, lay.dtype)
    minimal = ad.AnnData(X=X, obs=lay.obs, var=lay.var)
    normalized = cell_eval_normlog(minimal, allow_discrete=allow_discrete, source=source)
    return minimal, lay.reordered, normalized, lay.warnings


def _dense_to_csr(X, dtype, block_rows: int = 8192):
    """CSR copy of a dense matrix in ``dtype``, converted in row blocks (never a full dense copy)."""
    import scipy.sparse as sp

    X = np.asarray(X)
    if X.shape[0] <= block_rows:
        return sp.csr_matrix(X.astype(dtype))
    blocks = [sp.csr_matrix(X[i : i + block_rows].astype(dtype)) for i in range(0, X.shape[0], block_rows)]
    return sp.vstack(blocks, format="csr")


def _write_archive(out: Path, write_h5ad, zstd_level: int) -> None:
    """The 2025 ``.vcc`` file at ``out`` (atomically): ``write_h5ad(path)`` writes the minimal h5ad,
    compressed into ``pred.h5ad.zst``, packed with ``watermark.txt`` into an uncompressed GNU tar."""
    import zstandard

    with prep_tmpdir(out) as tmp:
        h5 = Path(tmp) / "pred.h5ad"
        write_h5ad(h5)
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
    (cell-eval fails later on them). X becomes CSR in the encoding's float type; the input rule of
    ``celltwin eval`` (:func:`celltwin.eval._load.is_counts`) is applied to those encoded values:
    NaN/inf and negative values are refused (a negative integer matrix too, which cell-eval took
    as counts), counts are log-normalised as cell-eval does
    (:func:`celltwin.eval._load.cell_eval_normlog`), fractional values must be log1p values below
    15. With ``allow_discrete`` counts are kept as they are and the "below 15" bound is not
    checked. The h5ad is compressed at zstd level 3 (the ``zstd`` command's default) and packed
    with ``watermark.txt`` into an uncompressed GNU tar; the write is atomic. Does not modify
    ``adata``.

    Memory: an AnnData is prepared in memory (it is there already). A file with a CSR or dense X
    is streamed (:mod:`celltwin.eval._prep_stream`: two passes over row blocks, the same values
    bit for bit, the inner ``pred.h5ad`` byte for byte cell-eval's up to a size, the same content
    beyond). Files whose X the lazy reader does not take (CSC, other encodings) are read in memory.
    """
    import anndata as ad

    from celltwin.eval._prep_stream import stream_prep_plan

    source = str(adata) if isinstance(adata, (str, os.PathLike)) else "prediction"
    src = open_prediction(adata) if isinstance(adata, (str, os.PathLike)) else adata
    kwargs = {
        "pert_col": pert_col,
        "celltype_col": celltype_col,
        "control_label": control_label,
        "output_pert_col": output_pert_col,
        "output_celltype_col": output_celltype_col,
        "encoding": encoding,
        "allow_discrete": allow_discrete,
        "expected_gene_dim": expected_gene_dim,
        "max_cell_dim": max_cell_dim,
        "source": source,
    }
    try:
        gene_list = (
            read_gene_list(genes) if isinstance(genes, (str, os.PathLike)) else [str(g) for g in genes]
        )
        if isinstance(src, ad.AnnData):
            minimal, reordered, normalized, warns = _minimal_prep_adata(src, gene_list, **kwargs)
            write, n_cells, n_genes = minimal.write_h5ad, minimal.n_obs, minimal.n_vars
        else:
            plan, reordered, warns = stream_prep_plan(src, gene_list, **kwargs)
            normalized = plan.factor is not None
            write, n_cells, n_genes = plan.write, len(plan.obs), len(plan.var)
        out = Path(output)
        _write_archive(out, write, zstd_level)
    finally:
        if not isinstance(src, ad.AnnData):
            src.close()
    return PrepResult(path=out, n_cells=n_cells, n_genes=n_genes, reordered_genes=reordered,
                      normalized=normalized, warnings=warns)
