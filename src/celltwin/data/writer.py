"""Write an ``.h5ad`` whose X is appended as CSR row blocks (never a whole matrix in memory).

:class:`CSRH5adWriter` writes into a temporary file next to the target and renames it onto the
target on :meth:`~CSRH5adWriter.close` (nothing half-written is ever visible under the target
name; an exception inside the ``with`` block removes the temporary file). obs is known up front
(the caller knows which cells it will write), so the number of rows appended is checked against it.

The file layout is anndata's on-disk format (encoding ``anndata`` 0.1.0; X a ``csr_matrix``
group with ``data`` float32, ``indices`` int32 when the genes fit, ``indptr`` int64); obs, var and
uns are written by ``anndata.io.write_elem``, so ``anndata.read_h5ad`` reads the file as usual.
"""

from __future__ import annotations

import contextlib
import gc
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin.errors import InputError

__all__ = ["CSRH5adWriter"]


class CSRH5adWriter:
    """Append CSR row blocks to a new ``.h5ad`` (see the module docstring).

    Usage::

        with CSRH5adWriter(path, obs, var) as w:
            for block in blocks:        # (n_i, G) CSR or dense
                w.append(block)
            w.uns["key"] = {...}        # written at close
    """

    def __init__(self, path: str | os.PathLike[str], obs: pd.DataFrame, var: pd.DataFrame,
                 uns: dict[str, Any] | None = None, dtype=np.float32, chunk: int = 1 << 16) -> None:
        import h5py

        from celltwin._io import atomic_path

        self.path = Path(path)
        self.obs, self.var = obs, var
        self.uns: dict[str, Any] = dict(uns or {})
        self.n_rows, self.n_cols = len(obs), len(var)
        self.dtype = np.dtype(dtype)
        self._atomic = atomic_path(self.path, suffix=".h5ad")
        self._tmp = self._atomic.__enter__()
        try:
            self._fh = _GuardedFile(self._tmp)
            self._f = h5py.File(self._fh, "w")
            f = self._f
            f.attrs["encoding-type"] = "anndata"
            f.attrs["encoding-version"] = "0.1.0"
            g = f.create_group("X")
            g.attrs["encoding-type"] = "csr_matrix"
            g.attrs["encoding-version"] = "0.1.0"
            g.attrs["shape"] = np.array([self.n_rows, self.n_cols], dtype=np.int64)
            self._idx_dtype = np.int32 if self.n_cols < 2**31 else np.int64
            self._data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=self.dtype, chunks=(chunk,))
            self._indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=self._idx_dtype,
                                              chunks=(chunk,))
        except BaseException:
            self._atomic.__exit__(*_exc_info())
            raise
        self._indptr = np.zeros(self.n_rows + 1, dtype=np.int64)
        self._row = 0
        self._nnz = 0
        self._closed = False

    def append(self, block) -> None:
        """Append rows (CSR or dense, ``n_cols`` columns); explicit zeros are dropped."""
        try:
            self._append(block)
        except Exception as e:  # noqa: BLE001 - h5py/OS errors of any type become one InputError line
            self._raise_io(e)

    def _raise_io(self, e: Exception):
        """Re-raise a failed disk write as one clean OSError naming the target file."""
        err = self._fh.failed
        if err is None:
            raise e
        msg = f"{err.strerror or err} (while writing {self.path})"
        raise OSError(err.errno, msg, str(self.path)) from None

    def _append(self, block) -> None:
        b = sp.csr_matrix(block, dtype=self.dtype)
        if b.shape[1] != self.n_cols:
            msg = f"{self.path}: block has {b.shape[1]} columns, expected {self.n_cols}"
            raise InputError(msg)
        if self._row + b.shape[0] > self.n_rows:
            msg = f"{self.path}: {self._row + b.shape[0]} rows appended, obs has {self.n_rows}"
            raise InputError(msg)
        b.eliminate_zeros()
        b.sort_indices()
        n = b.nnz
        if n:
            self._data.resize((self._nnz + n,))
            self._indices.resize((self._nnz + n,))
            self._data[self._nnz:] = b.data
            self._indices[self._nnz:] = b.indices.astype(self._idx_dtype, copy=False)
        self._indptr[self._row + 1:self._row + b.shape[0] + 1] = self._nnz + b.indptr[1:].astype(np.int64)
        self._row += b.shape[0]
        self._nnz += n

    def close(self) -> None:
        """Write indptr, obs, var, uns; rename the file onto its target."""
        if self._closed:
            return
        from anndata.io import write_elem

        if self._row != self.n_rows:
            msg = f"{self.path}: {self._row} rows appended, obs has {self.n_rows}"
            raise InputError(msg)
        f = self._f
        try:
            f["X"].create_dataset("indptr", data=self._indptr)
            write_elem(f, "obs", self.obs)
            write_elem(f, "var", self.var)
            write_elem(f, "uns", self.uns)
            for key in ("obsm", "varm", "obsp", "varp", "layers"):
                write_elem(f, key, {})
            f.close()
            self._fh.close()
        except Exception as e:  # noqa: BLE001 - as in append()
            self._raise_io(e)
        self._closed = True
        self._atomic.__exit__(None, None, None)

    def abort(self) -> None:
        """Drop the temporary file (the target is left as it was)."""
        if self._closed:
            return
        self._closed = True
        self._fh.discard = True  # HDF5's closing flushes go nowhere: no error cascade on a full disk
        try:
            with contextlib.suppress(Exception):
                self._data = self._indices = None  # drop every HDF5 id before the file closes
                self._f.close()
            self._f = None
            gc.collect()  # HDF5 ids held by frames of the failed write are released now, not at exit
            self._fh.close()
        finally:
            try:
                self._atomic.__exit__(RuntimeError, RuntimeError("aborted"), None)
            except RuntimeError:
                pass

    def __enter__(self) -> CSRH5adWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            try:
                self.close()
            except BaseException:
                self.abort()
                raise
        else:
            self.abort()


class _GuardedFile:
    """The file object HDF5 writes through (h5py's ``fileobj`` driver), unbuffered.

    A failed operation (disk full, file-size limit) is recorded in :attr:`failed` and raised;
    after :attr:`discard` is set, writes, truncations and flushes are dropped, so closing the
    HDF5 file on the way out cannot fail again (h5py otherwise prints chained errors from its
    finalisers, and such a process has been seen to segfault at exit).
    """

    def __init__(self, path) -> None:
        self._f = open(path, "w+b", buffering=0)  # noqa: SIM115 - closed by close(); unbuffered: seek never writes
        self.failed: OSError | None = None
        self.discard = False

    def _guard(self, fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            self.failed = self.failed or e
            raise

    def write(self, b) -> int:
        if self.discard:
            return len(b)
        return self._guard(self._f.write, b)

    def flush(self) -> None:
        if not self.discard:
            self._guard(self._f.flush)

    def read(self, n: int = -1) -> bytes:
        return self._guard(self._f.read, n)

    def readinto(self, b) -> int:
        return self._guard(self._f.readinto, b)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self._guard(self._f.seek, pos, whence)

    def tell(self) -> int:
        return self._guard(self._f.tell)

    def truncate(self, size: int | None = None) -> int:
        if self.discard:
            return 0 if size is None else size
        return self._guard(self._f.truncate, size)

    def close(self) -> None:
        if self._f.closed:
            return
        if self.discard:
            with contextlib.suppress(OSError):
                self._f.close()
            return
        self._guard(self._f.close)


def _exc_info():
    import sys

    return sys.exc_info()
