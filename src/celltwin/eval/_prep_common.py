"""What the 2025 (:mod:`celltwin.eval._prep`) and 2026 (:mod:`celltwin.eval._prep2026`) preps share.

Opening a prediction file (lazily when its X can be read in row blocks), the row blocks
themselves, the check that obs has the perturbation (and cell type) column, and the scratch folder
an archive is written in.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from celltwin.errors import InputError

__all__ = ["check_obs_columns", "open_prediction", "prep_tmpdir", "row_block_bounds"]


def open_prediction(path: str | os.PathLike[str]):
    """An :class:`~celltwin.data.source.H5adSource` of a CSR or dense X, else the AnnData read in memory.

    A file that the lazy reader refuses (missing, unreadable, no X, another encoding) goes to
    :func:`celltwin.eval._load.read_h5ad`, which reads it or names the failure; a CSC X is read in
    memory too (row blocks of a CSC matrix would scan the whole matrix each time).
    """
    from celltwin.data.source import H5adSource
    from celltwin.eval._load import read_h5ad

    try:
        src = H5adSource(path)
    except InputError:
        return read_h5ad(path)
    if src.x_format not in ("csr", "dense"):
        src.close()
        return read_h5ad(path)
    return src


def row_block_bounds(
    row_nnz: np.ndarray | None, n_rows: int, n_cols: int, max_rows: int, max_values: int
) -> list[tuple[int, int]]:
    """Row blocks ``[a, b)`` covering ``n_rows`` rows: at most ``max_rows`` rows and ``max_values`` values.

    ``row_nnz``: the stored entries of each row of a sparse matrix (a row over the value budget is a
    block on its own); ``None`` for a dense matrix of ``n_cols`` columns (a fixed number of rows).
    """
    if row_nnz is None:  # dense: a fixed number of rows
        rows = max(1, min(max_rows, max_values // max(n_cols, 1)))
        return [(a, min(a + rows, n_rows)) for a in range(0, n_rows, rows)]
    cum = np.concatenate([[0], np.cumsum(row_nnz, dtype=np.int64)])
    bounds, a = [], 0
    while a < n_rows:
        b = int(np.searchsorted(cum, cum[a] + max_values, side="right")) - 1
        b = min(max(b, a + 1), a + max_rows, n_rows)
        bounds.append((a, b))
        a = b
    return bounds


def check_obs_columns(obs, source: str, *, pert_col: str, celltype_col: str | None) -> None:
    """obs has the perturbation column ``pert_col`` (and ``celltype_col`` when given)."""
    if pert_col not in obs:
        msg = f"{source}: perturbation column obs[{pert_col!r}] is missing; obs has {list(map(str, obs.columns))}"
        raise InputError(msg)
    if celltype_col and celltype_col not in obs:
        msg = f"{source}: cell type column obs[{celltype_col!r}] is missing; obs has {list(map(str, obs.columns))}"
        raise InputError(msg)


def prep_tmpdir(out: Path) -> tempfile.TemporaryDirectory:
    """A scratch folder beside ``out`` for writing a prep archive (removed on exit).

    Named like :func:`~celltwin._io.atomic_path`'s temporaries (``.NAME.<pid>-<rand>.tmpdir``), so a
    killed run's leftover is removed by a later run.
    """
    return tempfile.TemporaryDirectory(
        prefix=f".{out.name}.{os.getpid()}-",
        suffix=".tmpdir",
        dir=out.parent if out.parent.exists() else None,
    )
