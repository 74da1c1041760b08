"""A validated evaluation side's rows, read from its source and normalised on read.

:class:`EvalSide` (made by :func:`celltwin.eval._sides.open_side`) returns any set of rows in
log1p space, bit for bit the rows that :func:`celltwin.eval._load.normalize_log1p` produces on the
whole matrix: every step of that normalisation is per row (a cell's total, its factor
``total / median``, the division and ``log1p`` of its stored values), and the only whole-file
quantity, the median of the totals, is known after the validation scan. :class:`MixedSide` is the
predicted side with the real file's control cells (``control_source="real"``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["EvalSide", "MixedSide"]

_INDEX_BYTES = 4  # int32 column index per stored CSR value


class _RowView:
    """``side.X``: ``view[rows]`` reads and normalises those rows (what cell-level metrics index)."""

    def __init__(self, side: Any) -> None:
        self._side = side

    @property
    def shape(self) -> tuple[int, int]:
        return (self._side.n_obs, int(self._side.genes.size))

    def __getitem__(self, rows: Any):
        rows = np.asarray(rows, dtype=np.int64).reshape(-1)
        uniq, inverse = np.unique(rows, return_inverse=True)
        block = self._side.rows(uniq)
        if uniq.size == rows.size and np.array_equal(uniq, rows):
            return block
        return block[inverse]


class EvalSide:
    """One evaluation file (or in-memory AnnData), validated, normalised on read.

    Attributes: ``name``, ``labels`` (``(n_obs,)`` str), ``genes`` (``(n_genes,)`` str, in the
    order :meth:`rows` returns them), ``was_counts``, ``dtype`` (of the log1p values: float32 for
    integer files, else the file's float dtype), ``sparse`` (CSR rows, else ndarray rows) and
    ``digest`` (content hash of the stored values, only when asked for; keys the DE cache).
    """

    def __init__(self, source: Any, name: str, labels: np.ndarray, genes: np.ndarray, *, sparse: bool,
                 dtype: np.dtype, was_counts: bool, factor: np.ndarray | None, digest: str | None) -> None:
        self.source, self.name, self.labels, self.genes = source, name, labels, genes
        self.sparse, self.dtype, self.was_counts = sparse, np.dtype(dtype), was_counts
        self._factor, self.digest = factor, digest
        self._cols: np.ndarray | None = None

    @property
    def n_obs(self) -> int:
        return int(self.labels.size)

    @property
    def X(self) -> _RowView:
        return _RowView(self)

    def reorder(self, genes: np.ndarray) -> None:
        """Return rows with their genes in ``genes``' order (a permutation of :attr:`genes`)."""
        pos = {g: i for i, g in enumerate(self.genes.tolist())}
        cols = np.array([pos[g] for g in genes.tolist()], dtype=np.int64)
        self._cols = cols if self._cols is None else self._cols[cols]
        self.genes = np.asarray(genes).copy()

    def row_bytes(self, rows: np.ndarray) -> np.ndarray:
        """Bytes each of ``rows`` takes once read (values + column indices for CSR)."""
        nnz = self.source.row_nnz()
        if not self.sparse or nnz is None:
            return np.full(rows.size, self.genes.size * self.dtype.itemsize, dtype=np.int64)
        return nnz[rows].astype(np.int64) * (self.dtype.itemsize + _INDEX_BYTES)

    def obsm_rows(self, rows: np.ndarray, key: str) -> np.ndarray:
        """Sorted unique ``rows`` of ``obsm[key]``, dense, in the stored dtype."""
        return self.source.read_obsm_stored(np.asarray(rows, dtype=np.int64), key)

    def row_nnz(self, rows: np.ndarray) -> np.ndarray | None:
        """Stored entries of each of ``rows`` (CSR sides), ``None`` for dense sides."""
        nnz = self.source.row_nnz() if self.sparse else None
        return None if nnz is None else nnz[rows].astype(np.int64)

    def rows_into(self, idx: np.ndarray, data_out: np.ndarray, ind_out: np.ndarray) -> np.ndarray:
        """CSR sides: :meth:`rows` written into ``data_out`` / ``ind_out`` (their leading entries,
        normalised in place); returns the local indptr. Files whose stored values already have
        :attr:`dtype` are read straight into the outputs (no intermediate copies)."""
        from celltwin.eval._rowops import divide_rows

        idx = np.asarray(idx, dtype=np.int64)
        ptr = None
        if self._cols is None and np.dtype(self.source.stored_dtype()) == self.dtype:
            ptr = self.source.read_csr_into(idx, data_out, ind_out)
        if ptr is None:  # integer files, reordered genes, CSC storage: through rows()
            return _copy_rows_into(self, idx, data_out, ind_out)
        if self._factor is not None:
            n = int(ptr[-1])
            divide_rows(ptr, data_out[:n], self._factor[idx].astype(self.dtype, copy=False))
            np.log1p(data_out[:n], out=data_out[:n])
        return ptr

    def rows(self, idx: np.ndarray):
        """Sorted unique rows ``idx`` in log1p space: CSR (sorted column indices not guaranteed,
        as stored) or a C-contiguous ndarray, in :attr:`dtype`. A fresh copy: nothing of the
        caller's AnnData is modified."""
        from celltwin.eval._rowops import divide_rows

        idx = np.asarray(idx, dtype=np.int64)
        blk = self.source.read_stored(idx)
        if self.sparse:
            blk = blk if isinstance(blk, sp.csr_matrix) else sp.csr_matrix(blk)
            if blk.dtype != self.dtype:
                blk = blk.astype(self.dtype)
            if self._factor is not None:
                divide_rows(blk.indptr, blk.data, self._factor[idx].astype(self.dtype, copy=False))
                np.log1p(blk.data, out=blk.data)
            if self._cols is not None:
                blk = sp.csr_matrix(blk[:, self._cols])
                if not blk.has_sorted_indices:
                    blk.sort_indices()
        else:
            blk = np.array(blk, dtype=self.dtype, order="C")  # a writeable copy
            if self._factor is not None:
                np.true_divide(blk, self._factor[idx][:, None], out=blk)
                np.log1p(blk, out=blk)
            if self._cols is not None:
                blk = np.ascontiguousarray(blk[:, self._cols])
        return blk


def _copy_rows_into(side: Any, idx: np.ndarray, data_out: np.ndarray, ind_out: np.ndarray) -> np.ndarray:
    blk = sp.csr_matrix(side.rows(idx))
    n = blk.nnz
    if n > min(data_out.size, ind_out.size):
        msg = f"{side.name}: internal error: row buffer too small ({min(data_out.size, ind_out.size)} < {n})"
        raise RuntimeError(msg)
    data_out[:n] = blk.data
    ind_out[:n] = blk.indices
    return blk.indptr.astype(np.int64)


class MixedSide:
    """The predicted side with the real file's control cells in place of its own
    (``control_source="real"``): the prediction's non-control rows, then the real control rows,
    as :func:`celltwin.eval._evaluate._with_real_controls` lays them out in memory."""

    def __init__(self, pred: EvalSide, real: EvalSide, control: str) -> None:
        self._keep = np.flatnonzero(pred.labels != control)
        self._ctrl = np.flatnonzero(real.labels == control)
        self._pred, self._real = pred, real
        self.name, self.genes, self.was_counts, self.digest = pred.name, pred.genes, pred.was_counts, None
        self.labels = np.concatenate([pred.labels[self._keep], real.labels[self._ctrl]])
        self.sparse = pred.sparse or real.sparse
        self.dtype = np.result_type(pred.dtype, real.dtype)

    n_obs = EvalSide.n_obs
    X = EvalSide.X

    def row_bytes(self, rows: np.ndarray) -> np.ndarray:
        k = self._keep.size
        lo, hi = rows[rows < k], rows[rows >= k] - k
        return np.concatenate([self._pred.row_bytes(self._keep[lo]), self._real.row_bytes(self._ctrl[hi])])

    def row_nnz(self, rows: np.ndarray) -> np.ndarray | None:
        if not self.sparse:
            return None
        k = self._keep.size
        parts = [self._pred.row_nnz(self._keep[rows[rows < k]]), self._real.row_nnz(self._ctrl[rows[rows >= k] - k])]
        return None if any(p is None for p in parts) else np.concatenate(parts)

    def rows_into(self, idx: np.ndarray, data_out: np.ndarray, ind_out: np.ndarray) -> np.ndarray:
        return _copy_rows_into(self, idx, data_out, ind_out)

    def obsm_rows(self, rows: np.ndarray, key: str) -> np.ndarray:
        k = self._keep.size
        a = self._pred.obsm_rows(self._keep[rows[rows < k]], key)
        b = self._real.obsm_rows(self._ctrl[rows[rows >= k] - k], key)
        return np.vstack([a, b.astype(np.result_type(a, b), copy=False)])

    def rows(self, idx: np.ndarray):
        idx = np.asarray(idx, dtype=np.int64)
        k = self._keep.size
        parts = [self._pred.rows(self._keep[idx[idx < k]]), self._real.rows(self._ctrl[idx[idx >= k] - k])]
        if self.sparse:
            return sp.vstack([sp.csr_matrix(p) for p in parts], format="csr").astype(self.dtype, copy=False)
        return np.ascontiguousarray(np.vstack(parts))
