"""``celltwin prep`` of a file, streamed: bounded memory at any prediction size.

A file with a CSR or dense X is read lazily in row blocks (:data:`PREP_BLOCK_ROWS` rows, at most
:data:`PREP_BLOCK_VALUES` values) by :class:`~celltwin.data.source.H5adSource`, twice: a first pass
(:func:`stream_prep_plan`) checks the values and collects per-cell totals, the second
(:meth:`StreamedPrep.write`) reorders, casts, normalises and writes each block -- the same
operations, in the same order, as the in-memory prep of :mod:`celltwin.eval._prep`, so the values
are the same bits. When the minimal CSR matrix takes at most :data:`PREP_IN_MEMORY_MAX_BYTES` it is
assembled in memory and written by anndata's ``write_h5ad``, so the inner ``pred.h5ad`` is byte
for byte cell-eval's; a larger one is written block by block into the h5ad (the datasets anndata
would write: same X data, indices and indptr with their dtypes, chunked the same way; obs, var and
uns written by anndata's ``write_elem`` after ``strings_to_categoricals``, as ``write_h5ad`` does)
-- the same content, read back identically by anndata / cell-eval, though not the same bytes.
Peak memory then stays at a few row blocks plus per-cell vectors, whatever the file size.
(:class:`~celltwin.data.writer.CSRH5adWriter` is not used: it drops explicit zeros and sorts
column indices, which would change the content.)
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from celltwin.eval._prep import plan_layout
from celltwin.eval._prep_common import row_block_bounds

__all__ = ["PREP_BLOCK_ROWS", "PREP_BLOCK_VALUES", "PREP_IN_MEMORY_MAX_BYTES", "StreamedPrep", "stream_prep_plan"]

PREP_BLOCK_ROWS = 4096  # most rows per block of a streamed prep
PREP_BLOCK_VALUES = 1 << 24  # most stored values (CSR) or elements (dense) per streamed block
#: a minimal matrix (CSR data + indices + indptr) of at most this many bytes is built in memory and
#: written by anndata (the inner h5ad byte-identical to cell-eval's); a larger one is streamed
PREP_IN_MEMORY_MAX_BYTES = 512 * 2**20


def _block_bounds(src) -> list[tuple[int, int]]:
    """Row blocks ``[a, b)``: at most :data:`PREP_BLOCK_ROWS` rows and :data:`PREP_BLOCK_VALUES` values."""
    return row_block_bounds(src.row_nnz(), src.n_obs, src.n_vars, PREP_BLOCK_ROWS, PREP_BLOCK_VALUES)


def _prep_block(src, a: int, b: int, cols: np.ndarray | None, dtype):
    """Rows ``[a, b)`` as the in-memory prep makes them: columns reordered, cast to ``dtype``, CSR.

    The same operations as the in-memory prep on the whole matrix (``X[:, cols]``, then
    ``astype`` / dense -> CSR), which act row by row, so every row comes out identical.
    """
    import scipy.sparse as sp

    x = src.read_stored(np.arange(a, b, dtype=np.int64))
    if not sp.issparse(x):
        x = np.asarray(x)
    if cols is not None:
        x = x[:, cols]
    return sp.csr_matrix(x.astype(dtype, copy=False))  # same values as astype's copy; never written to


@dataclass
class StreamedPrep:
    """What the first pass over a file learnt; :meth:`write` makes the second pass."""

    src: object
    bounds: list[tuple[int, int]]
    cols: np.ndarray | None
    dtype: type
    row_nnz: np.ndarray
    factor: np.ndarray | None  # per-cell divisor when counts are log-normalised
    obs: object
    var: object

    @property
    def nnz(self) -> int:
        return int(self.row_nnz.sum())

    @property
    def idx_dtype(self):
        # scipy's choice for a CSR matrix of this shape and nnz (what the in-memory path holds)
        big = max(self.nnz, len(self.obs), len(self.var))
        return np.int32 if big <= np.iinfo(np.int32).max else np.int64

    def csr_bytes(self) -> int:
        idx = np.dtype(self.idx_dtype).itemsize
        return self.nnz * (np.dtype(self.dtype).itemsize + idx) + (len(self.obs) + 1) * idx

    def indptr(self) -> np.ndarray:
        out = np.zeros(len(self.obs) + 1, dtype=self.idx_dtype)
        np.cumsum(self.row_nnz, out=out[1:])
        return out

    def blocks(self):
        """``(start offset, data, indices)`` of each block, normalised when :attr:`factor` is set."""
        off = 0
        for a, b in self.bounds:
            blk = _prep_block(self.src, a, b, self.cols, self.dtype)
            data = blk.data
            if self.factor is not None:  # celltwin.eval._load.normalize_log1p's operations, row by row
                data = np.true_divide(data, np.repeat(self.factor[a:b], np.diff(blk.indptr)))
                data = np.log1p(data)
            yield off, data, blk.indices
            off += data.size

    def uns(self) -> dict:
        return {"log1p": {"base": None}} if self.factor is not None else {}

    def write(self, h5: Path) -> None:
        """The minimal h5ad: built in memory and written by anndata when small, else streamed."""
        if self.csr_bytes() <= PREP_IN_MEMORY_MAX_BYTES:
            self._write_in_memory(h5)
        else:
            self._write_streamed(h5)

    def _write_in_memory(self, h5: Path) -> None:
        import anndata as ad
        import scipy.sparse as sp

        data = np.empty(self.nnz, dtype=self.dtype)
        indices = np.empty(self.nnz, dtype=self.idx_dtype)
        for off, d, i in self.blocks():
            data[off : off + d.size] = d
            indices[off : off + i.size] = i
        X = sp.csr_matrix((data, indices, self.indptr()), shape=(len(self.obs), len(self.var)))
        minimal = ad.AnnData(X=X, obs=self.obs, var=self.var)
        minimal.uns.update(self.uns())
        minimal.write_h5ad(h5)

    def _write_streamed(self, h5: Path) -> None:
        """anndata's ``write_h5ad`` steps with X written block by block (same datasets, dtypes, chunking)."""
        import anndata as ad
        import h5py
        from anndata.io import write_elem

        skeleton = ad.AnnData(obs=self.obs, var=self.var)  # X written here; obs/var as write_h5ad sees them
        skeleton.uns.update(self.uns())
        skeleton.strings_to_categoricals()  # what write_h5ad does (convert_strings_to_categoricals=True)
        with h5py.File(h5, "w") as f:
            f.attrs.setdefault("encoding-type", "anndata")
            f.attrs.setdefault("encoding-version", "0.1.0")
            g = f.create_group("X")
            g.attrs["encoding-type"] = "csr_matrix"
            g.attrs["encoding-version"] = "0.1.0"
            g.attrs["shape"] = (len(self.obs), len(self.var))
            # write_sparse_compressed: resizable datasets (maxshape=(None,)), h5py's guessed chunks
            dset = g.create_dataset("data", shape=(self.nnz,), dtype=self.dtype, maxshape=(None,))
            iset = g.create_dataset("indices", shape=(self.nnz,), dtype=self.idx_dtype, maxshape=(None,))
            g.create_dataset("indptr", data=self.indptr(), maxshape=(None,))
            for off, d, i in self.blocks():
                if d.size:
                    dset[off : off + d.size] = d
                    iset[off : off + i.size] = i.astype(self.idx_dtype, copy=False)
            for key in ("obs", "var"):
                write_elem(f, key, getattr(skeleton, key))
            for key in ("obsm", "varm", "obsp", "varp", "layers"):
                write_elem(f, key, {})
            write_elem(f, "uns", dict(skeleton.uns))


def stream_prep_plan(
    src, genes: Sequence[str], *, allow_discrete: bool, **layout_kw
) -> tuple[StreamedPrep, bool, list[str]]:
    """Checks and the first pass over the rows of ``src``: ``(plan, reordered, warnings)``.

    ``layout_kw``: the arguments of :func:`celltwin.eval._prep.plan_layout`. The pass makes every
    block as the second pass will (:func:`_prep_block`), runs the input rule
    (:class:`~celltwin.eval._load.ValueScan` on the encoded values, as the in-memory path and
    cell-eval apply it to the encoded matrix) and keeps per-cell stored-entry counts and totals
    (:func:`~celltwin.eval._load.row_totals` stored in the encoding dtype). Counts get the per-cell
    factor of the CSR rule (:func:`~celltwin.eval._load.csr_factors`).
    """
    from celltwin.eval._load import ValueScan, csr_factors, row_totals

    lay = plan_layout(src.obs, src.var_names, src.n_obs, genes, **layout_kw)
    dtype = lay.dtype
    bounds = _block_bounds(src)
    scan = ValueScan(np.dtype(dtype), layout_kw["source"])
    totals = np.zeros(src.n_obs, dtype=dtype)
    row_nnz = np.zeros(src.n_obs, dtype=np.int64)
    for a, b in bounds:
        blk = _prep_block(src, a, b, lay.cols, dtype)
        scan.update(blk.data)
        # totals only matter for counts: none once a fractional value was seen (log values, or an error)
        if not allow_discrete and not scan.fraction:
            totals[a:b] = row_totals(blk.data, blk.indptr).astype(dtype)
        row_nnz[a:b] = np.diff(blk.indptr)
        del blk
    counts = scan.finish(check_log_max=not allow_discrete)
    factor = csr_factors(totals) if counts and not allow_discrete else None
    plan = StreamedPrep(src=src, bounds=bounds, cols=lay.cols, dtype=dtype, row_nnz=row_nnz, factor=factor,
                        obs=lay.obs, var=lay.var)
    return plan, lay.reordered, lay.warnings
