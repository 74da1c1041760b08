"""The prediction as :func:`celltwin.eval._prep2026.prep_vcc2026` reads it: obs, var names and X.

A file with a CSR or dense X is read lazily in row blocks (:data:`BLOCK_ROWS` rows, at most
:data:`BLOCK_VALUES` stored values), each made canonical as vcc's ``canonicalize_matrix`` does;
a CSC X, or an AnnData given in memory with a CSC X, is handled whole, in memory. A sparse X's
index bookkeeping is checked first (vcc's ``validate_matrix_structure``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from celltwin.errors import InputError
from celltwin.eval._prep2026_refs import one_line
from celltwin.eval._prep_common import open_prediction, row_block_bounds

__all__ = ["BLOCK_ROWS", "BLOCK_VALUES", "PredictionInput"]

BLOCK_ROWS = 4096  # most rows per block
BLOCK_VALUES = 1 << 24  # most stored values (CSR) or elements (dense) per block


class PredictionInput:
    """The prediction: obs, var names and X by row blocks (or whole, for a CSC matrix)."""

    def __init__(self, prediction) -> None:
        import anndata as ad
        import scipy.sparse as sp

        self.src = None
        self.matrix = None  # an in-memory X (AnnData given, CSC file)
        if isinstance(prediction, (str, os.PathLike)):
            self.name = str(prediction)
            # a CSR or dense X: read lazily; CSC or another encoding: in memory (names the failure)
            opened = open_prediction(prediction)
            if not isinstance(opened, ad.AnnData):
                src = opened
                self.src, self.fmt = src, src.x_format
                self.obs, self.var_names = src.obs, [str(g) for g in src.var_names]
                self.n_obs, self.n_vars = src.n_obs, src.n_vars
                return
            adata = opened
        elif isinstance(prediction, ad.AnnData):
            self.name, adata = "prediction", prediction
        else:
            msg = f"prediction: expected a path to an .h5ad file or an AnnData, got {type(prediction).__name__}"
            raise InputError(msg)
        X = adata.X
        if X is None:
            msg = f"{self.name}: X is missing (None); expected the predicted counts, cells x genes"
            raise InputError(msg)
        if sp.issparse(X):
            if X.format not in ("csr", "csc"):
                msg = f"{self.name}: X is a {X.format} matrix; expected CSR, CSC or a dense array"
                raise InputError(msg)
            self.fmt = X.format
        else:
            X = np.asarray(X)
            if X.ndim != 2:
                msg = f"{self.name}: X has {X.ndim} dimensions; expected a cells x genes matrix"
                raise InputError(msg)
            self.fmt = "dense"
        self.matrix = X
        self.obs, self.var_names = adata.obs, [str(g) for g in adata.var_names]
        self.n_obs, self.n_vars = int(adata.n_obs), int(adata.n_vars)

    @property
    def whole(self) -> bool:
        """True when X is handled as one matrix (CSC): no row blocks."""
        return self.fmt == "csc"

    def close(self) -> None:
        if self.src is not None:
            self.src.close()

    def check_structure(self) -> None:
        """A sparse X's index bookkeeping (vcc's ``validate_matrix_structure``): pointers start at 0,
        never decrease, end within the stored values; as many indices as values. Column ranges are
        checked block by block (:meth:`blocks`). A CSC matrix is then made canonical."""
        if self.fmt == "dense":
            return
        if self.src is not None:
            import h5py

            try:
                with h5py.File(self.src.path, "r") as f:
                    g = f["X"]
                    indptr = g["indptr"][:].astype(np.int64)
                    n_data, n_ind = int(g["data"].shape[0]), int(g["indices"].shape[0])
            except Exception as e:  # noqa: BLE001
                msg = f"{self.name}: cannot read X's CSR arrays ({type(e).__name__}: {one_line(e)})"
                raise InputError(msg) from None
            n_major, n_minor, axis = self.n_obs, self.n_vars, "row"
        else:
            X = self.matrix
            indptr = np.asarray(X.indptr).astype(np.int64)
            n_data, n_ind = int(X.data.shape[0]), int(np.asarray(X.indices).shape[0])
            n_major, n_minor, axis = (X.shape[0], X.shape[1], "row") if self.fmt == "csr" else \
                (X.shape[1], X.shape[0], "column")
        where = f"{self.name}: X ({self.fmt.upper()}) is corrupted"
        if indptr.shape[0] != n_major + 1:
            msg = f"{where}: indptr has {indptr.shape[0]} entries, expected {n_major + 1} ({n_major} {axis}s + 1)"
            raise InputError(msg)
        if indptr[0] != 0:
            msg = f"{where}: indptr starts at {int(indptr[0])}, expected 0"
            raise InputError(msg)
        steps = np.diff(indptr)
        if np.any(steps < 0):
            first = int(np.argmax(steps < 0))
            msg = f"{where}: indptr decreases at {axis} {first} (length {int(steps[first])}); expected non-decreasing"
            raise InputError(msg)
        if n_ind != n_data:
            msg = f"{where}: {n_data} stored values but {n_ind} indices; expected as many"
            raise InputError(msg)
        if int(indptr[-1]) > n_data:
            msg = f"{where}: indptr ends at {int(indptr[-1])}, beyond the {n_data} stored values"
            raise InputError(msg)
        if self.matrix is not None:
            live = np.asarray(self.matrix.indices)[: int(indptr[-1])]
            if live.size and (int(live.min()) < 0 or int(live.max()) >= n_minor):
                msg = (f"{where}: an index is out of range (found {int(live.min())}..{int(live.max())}, "
                       f"expected 0..{n_minor - 1})")
                raise InputError(msg)
            X = self.matrix.copy()  # the caller's AnnData is never modified
            X.sum_duplicates()  # sorted, duplicates summed (explicit zeros kept)
            X.prune()  # slack beyond indptr[-1] dropped
            self.matrix = X

    def blocks(
        self, max_rows: int = BLOCK_ROWS, max_values: int = BLOCK_VALUES
    ) -> Iterator[tuple[int, int, Any]]:
        """``(a, b, rows a..b of X)`` in the stored dtype: canonical CSR (vcc's ``canonicalize_matrix``
        acts row by row, so per block is the same) or a dense ndarray; a CSC X comes whole. A block
        holds at most ``max_rows`` rows and ``max_values`` stored values (dense: elements)."""
        if self.whole:
            yield 0, self.n_obs, self.matrix
            return
        import scipy.sparse as sp

        if self.fmt == "dense":
            row_nnz = None
        else:
            row_nnz = self.src.row_nnz() if self.src is not None else np.diff(self.matrix.indptr)
        for a, b in row_block_bounds(row_nnz, self.n_obs, self.n_vars, max_rows, max_values):
            if self.src is not None:
                blk = self.src.read_stored(np.arange(a, b, dtype=np.int64))
            else:
                blk = self.matrix[a:b]
            if self.fmt == "dense":
                yield a, b, np.asarray(blk)
                continue
            blk = sp.csr_matrix(blk)
            if blk.indices.size and (int(blk.indices.min()) < 0 or int(blk.indices.max()) >= self.n_vars):
                msg = (f"{self.name}: X (CSR) is corrupted: a column index of rows {a}..{b - 1} is out of range "
                       f"(found {int(blk.indices.min())}..{int(blk.indices.max())}, expected 0..{self.n_vars - 1})")
                raise InputError(msg)
            blk.sum_duplicates()
            yield a, b, blk
