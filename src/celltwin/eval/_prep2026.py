"""``celltwin prep --format vcc2026``: the Virtual Cell Challenge 2026 upload file, as ``vcc prep`` writes it.

Reference: ``vcc prep`` of vcc-cli 0.3.0 (Arc Institute, MIT). Written here from its documented
behaviour and its observable output, not copied. :func:`prep_vcc2026` makes the same checks and
writes the same archive. It is made of:

* :mod:`celltwin.eval._prep2026_refs`: the controls bundle's files (``gene_names.csv``,
  ``pert_counts.csv``, ``manifest.json``: the contexts and ``panel_id``);
* :mod:`celltwin.eval._prep2026_input`: the prediction (obs, var names, X in row blocks);
* :mod:`celltwin.eval._prep2026_checks`: the checks, in vcc's order (the first failure is reported,
  one line naming the file, the field, what was expected and what was found;
  :class:`~celltwin.errors.InputError`, CLI exit code 2);
* :mod:`celltwin.eval._prep2026_archive`: the archive (tar of ``meta.json`` and
  ``pred.h5ad.zst``; its format is described there);
* this module: the order of the checks, the one pass over X and the output matrix.

Not mirrored: ``--no-require-counts`` / ``--allow-discrete`` (log-normalising the 2025 way: use
``--format vcc2025``), ``--force`` (celltwin replaces an existing output, atomically, as every
celltwin command does), ``--json``.

Memory: a file with a CSR or dense X is read in row blocks, once. Each block is checked and its
output rows are appended to two raw files (values, column indices) in a temporary folder; nothing
is written to the output unless every check passes. The h5ad is then written by anndata from those
files memory-mapped, so the matrix never sits in RAM (dense never at all) and the bytes are
anndata's own. A CSC X, or an AnnData given in memory with a CSC X, is handled whole, in memory.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from celltwin._constants import CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError
from celltwin.eval._prep2026_archive import (
    META_MEMBER,
    PRED_MEMBER,
    VCC_CLI_VERSION,
    archive_meta,
    celltwin_cli_version,
    write_archive,
)
from celltwin.eval._prep2026_checks import (
    BlockScan,
    check_obs,
    check_targets,
    check_values,
    check_var_unique,
    gene_columns,
    scan_block,
)
from celltwin.eval._prep2026_input import BLOCK_ROWS, BLOCK_VALUES, PredictionInput
from celltwin.eval._prep2026_refs import (
    CELLS_PER_PERT,
    CONTEXT_COL_DEFAULT,
    perts_fingerprint,
    read_gene_list,
    read_pert_list,
    resolve_contexts,
)
from celltwin.eval._prep_common import prep_tmpdir

__all__ = [
    "CELLS_PER_PERT",
    "EXPECTED_GENE_DIM",
    "MAX_CELL_DIM",
    "MAX_COUNTS_PER_CELL",
    "MAX_NNZ",
    "META_MEMBER",
    "PRED_MEMBER",
    "VCC_CLI_VERSION",
    "Prep2026Result",
    "celltwin_cli_version",
    "perts_fingerprint",
    "prep_vcc2026",
    "read_gene_list",
    "read_pert_list",
    "resolve_contexts",
]

CELLTYPE_COL_DEFAULT = "celltype"
EXPECTED_GENE_DIM = 18533  # genes of the 2026 gene_names.csv (a different list length only warns)
MAX_CELL_DIM = 400_000
MAX_NNZ = 4_750_000_000  # stored entries of X the scorer accepts
MAX_COUNTS_PER_CELL = 1_000_000  # largest per-cell total (sum over genes) the scorer accepts
_INT32_MAX = int(np.iinfo(np.int32).max)


@dataclass(frozen=True)
class Prep2026Result:
    """What :func:`prep_vcc2026` checked and wrote (``path`` is ``None`` for a dry run)."""

    path: Path | None
    n_cells: int
    n_genes: int
    nnz: int  # stored entries of the packaged X (meta.json's nnz); the input's count for a dry run
    contexts: tuple[str, ...]
    cells_per_context: dict[str, int]
    verified_targets: bool
    reordered_genes: bool
    meta: dict | None
    warnings: list[str] = field(default_factory=list)


def prep_vcc2026(
    prediction,
    genes: Sequence[str] | str | os.PathLike[str],
    output: str | os.PathLike[str] | None,
    *,
    perts: str | os.PathLike[str] | None = None,
    contexts: str | Sequence[str] | None = None,
    verify_targets: bool = True,
    check_cell_counts: bool = True,
    cells_per_pert: int | None = CELLS_PER_PERT,
    pert_col: str = PERT_COL,
    celltype_col: str | None = None,
    control_label: str = CONTROL_LABEL,
    output_pert_col: str = PERT_COL,
    output_celltype_col: str = CELLTYPE_COL_DEFAULT,
    context_col: str = CONTEXT_COL_DEFAULT,
    encoding: int = 32,
    reject_controls: bool = True,
    expected_gene_dim: int | None = EXPECTED_GENE_DIM,
    max_cell_dim: int | None = MAX_CELL_DIM,
    max_nnz: int | None = MAX_NNZ,
    max_counts_per_cell: int | None = MAX_COUNTS_PER_CELL,
    dry_run: bool = False,
    cli_version: str | None = None,
) -> Prep2026Result:
    """Check a prediction and write the 2026 ``.vcc`` upload file (see the module docstring).

    ``prediction``: an ``.h5ad`` path (read in row blocks) or an AnnData. ``genes``: the gene list
    (a path to ``gene_names.csv`` or the names). ``perts``: ``pert_counts.csv`` (needed unless
    ``verify_targets=False``). ``contexts``: "A,B,C" or a sequence (``""``/``()`` disables the context
    checks); ``None`` reads the controls bundle's ``manifest.json`` beside ``perts`` / ``genes``.
    ``cells_per_pert=None``: no expected count unless pert_counts.csv has an ``n_cells`` column.
    ``None`` for ``expected_gene_dim``, ``max_cell_dim``, ``max_nnz`` or ``max_counts_per_cell``
    disables that check. ``dry_run``: check only (``output`` may be ``None``). ``cli_version``:
    ``meta.json``'s writer field (default :func:`celltwin_cli_version`). The write is atomic.
    """
    import pandas as pd

    if encoding not in (32, 64):
        msg = f"encoding must be 32 or 64 (float bits of X), got {encoding!r}"
        raise ConfigError(msg)
    if cells_per_pert is not None and cells_per_pert < 1:
        msg = f"cells_per_pert must be >= 1 (or -1 / None: no built-in expectation), got {cells_per_pert}"
        raise ConfigError(msg)
    if max_counts_per_cell is not None and max_counts_per_cell < 1:
        msg = f"max_counts_per_cell must be >= 1 (or -1 / None: no cap), got {max_counts_per_cell}"
        raise ConfigError(msg)
    if output is None and not dry_run:
        raise ConfigError("prep: give an output path (or dry_run=True)")
    if verify_targets and perts is None:
        msg = ("--perts (pert_counts.csv of the controls bundle) is needed to check the perturbation list; "
               "give it, or --no-verify-targets")
        raise ConfigError(msg)
    ctx, panel_id = resolve_contexts(contexts, perts=perts,
                                     genes=genes if isinstance(genes, (str, os.PathLike)) else None)
    out_cols = [output_pert_col, *([output_celltype_col] if celltype_col else []), *([context_col] if ctx else [])]
    if len(set(out_cols)) != len(out_cols):
        msg = f"the output obs columns must have different names, got {out_cols}"
        raise ConfigError(msg)
    dtype = np.float32 if encoding == 32 else np.float64

    inp = PredictionInput(prediction)
    try:
        inp.check_structure()
        gene_list = (read_gene_list(genes) if isinstance(genes, (str, os.PathLike))
                     else [str(g) for g in genes])
        if not isinstance(genes, (str, os.PathLike)) and len(set(gene_list)) != len(gene_list):
            raise InputError("genes: the gene list has duplicated names; expected each gene once")
        check_var_unique(inp)
        per_context = check_obs(inp, pert_col=pert_col, celltype_col=celltype_col, control_label=control_label,
                                reject_controls=reject_controls, context_col=context_col, contexts=ctx)
        verified = False
        if verify_targets:
            expected = read_pert_list(perts, default_n_cells=cells_per_pert)
            check_targets(inp, expected, perts, pert_col=pert_col, context_col=context_col,
                          control_label=control_label, contexts=ctx, check_cell_counts=check_cell_counts)
            verified = True
        warns: list[str] = []
        if not verify_targets:
            warns.append("perturbation labels were not checked against pert_counts.csv (--no-verify-targets)")
        if expected_gene_dim and len(gene_list) != expected_gene_dim:
            warns.append(f"the gene list has {len(gene_list)} genes, not the expected {expected_gene_dim}; "
                         f"expecting {len(gene_list)} genes")
        cols, reordered = gene_columns(inp, gene_list)
        if reordered:
            warns.append("the input has the listed genes in another order; reordered to the gene list")
        if max_cell_dim and inp.n_obs > max_cell_dim:
            msg = f"{inp.name}: {inp.n_obs} cells; expected at most {max_cell_dim} (--max-cell-dim)"
            raise InputError(msg)

        labels = inp.obs[pert_col].astype(str).to_numpy()
        obs = pd.DataFrame({output_pert_col: inp.obs[pert_col].to_numpy()},
                           index=np.arange(inp.n_obs).astype(str))
        if celltype_col:
            obs[output_celltype_col] = inp.obs[celltype_col].to_numpy()
        if ctx:
            obs[context_col] = inp.obs[context_col].astype(str).to_numpy()
        var = pd.DataFrame(index=np.asarray(gene_list, dtype=object))

        scan = BlockScan(inp.n_obs)
        out = Path(output) if output is not None else None
        tmp_ctx = prep_tmpdir(out) if not dry_run else None
        try:
            tmp = Path(tmp_ctx.name) if tmp_ctx is not None else None
            _run_pass(inp, scan, cols, dtype, tmp)
            check_values(scan, inp, labels, max_nnz=max_nnz, max_counts_per_cell=max_counts_per_cell,
                         dtype=dtype)
            if tmp is None:
                return Prep2026Result(None, inp.n_obs, len(gene_list), scan.nnz_in, ctx, per_context, verified,
                                      reordered, None, warns)
            X, nnz = _assemble(scan, tmp, inp, len(gene_list), dtype)
            meta = archive_meta(nnz=nnz, n_obs=inp.n_obs, n_vars=len(gene_list), contexts=ctx, perts=perts,
                                panel_id=panel_id, cli_version=cli_version)
            write_archive(out, tmp, X, obs, var, meta)
        finally:
            if tmp_ctx is not None:
                tmp_ctx.cleanup()
    finally:
        inp.close()
    return Prep2026Result(out, inp.n_obs, len(gene_list), nnz, ctx, per_context, verified, reordered, meta, warns)


def _run_pass(inp: PredictionInput, scan: BlockScan, cols, dtype, tmp: Path | None) -> None:
    """The one pass over X: every block checked (into ``scan``) and, unless ``tmp`` is ``None`` (a dry
    run), its output rows appended to ``tmp/data.raw`` and ``tmp/indices.raw`` (int32), or kept whole."""
    import contextlib

    with contextlib.ExitStack() as stack:
        fd = fi = None
        if tmp is not None and not inp.whole:
            fd = stack.enter_context(open(tmp / "data.raw", "wb"))
            fi = stack.enter_context(open(tmp / "indices.raw", "wb"))
        for a, _b, blk in inp.blocks(BLOCK_ROWS, BLOCK_VALUES):  # read here, so they can be set per module
            o = scan_block(scan, a, blk, cols, dtype, inp.fmt)
            if inp.whole:
                scan.out_matrix = o if tmp is not None else None
            elif fd is not None:
                o.data.tofile(fd)
                o.indices.astype(np.int32, copy=False).tofile(fi)


def _assemble(scan: BlockScan, tmp: Path, inp: PredictionInput, n_genes: int, dtype):
    """``(X, nnz)``: the output matrix, CSR from the raw files memory-mapped (or the whole-mode matrix)."""
    import scipy.sparse as sp

    if inp.whole:
        X = scan.out_matrix
        return X, int(X.nnz)
    nnz = int(scan.row_nnz.sum())
    # scipy's index dtype for this matrix (what vcc's in-memory CSR has): int64 only past int32
    wide = max(nnz, inp.n_obs, n_genes) > _INT32_MAX
    idx_dtype = np.int64 if wide else np.int32
    indptr = np.zeros(inp.n_obs + 1, dtype=idx_dtype)
    np.cumsum(scan.row_nnz, out=indptr[1:])
    ind_path = tmp / "indices.raw"
    if wide:
        ind_path = _widen(ind_path, nnz)
    if nnz:
        data = np.memmap(tmp / "data.raw", dtype=dtype, mode="r", shape=(nnz,))
        indices = np.memmap(ind_path, dtype=idx_dtype, mode="r", shape=(nnz,))
    else:
        data, indices = np.zeros(0, dtype=dtype), np.zeros(0, dtype=idx_dtype)
    X = sp.csr_matrix((data, indices, indptr), shape=(inp.n_obs, n_genes))
    return X, nnz


def _widen(path: Path, n: int, block: int = 1 << 24) -> Path:
    """An int64 copy of an int32 raw file of ``n`` values (scipy indexes with int64 past 2**31 entries)."""
    wide = path.with_suffix(".i64")
    src = np.memmap(path, dtype=np.int32, mode="r", shape=(n,))
    with open(wide, "wb") as f:
        for s in range(0, n, block):
            src[s:s + block].astype(np.int64).tofile(f)
    del src
    path.unlink()
    return wide
