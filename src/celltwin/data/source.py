"""Lazy, row-wise access to the cells of an ``.h5ad`` file (or an in-memory AnnData).

A *source* exposes ``obs`` (read eagerly, it is small), ``var_names`` and ``read_rows(idx)``,
which reads only the requested rows of X from disk. Training on a file larger than memory works
because nothing ever materialises the whole matrix.

Supported X encodings: dense (an HDF5 dataset), CSR and CSC (``anndata.io.sparse_dataset``),
with float or integer dtype. Every read returns float32 (integers are converted exactly up to
2**24, which covers any UMI count). CSR and dense reads touch only the requested rows; a CSC read
has to scan the column pointers of the whole matrix, so convert CSC files to CSR for training.

Sources are picklable: an :class:`H5adSource` pickles its path, and each process (DataLoader
worker, DDP rank) opens its own read-only handle on first use.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin.data._h5rows import mapped_or_dataset, read_csr_rows, read_csr_rows_into
from celltwin.errors import InputError

__all__ = ["H5adSource", "MemorySource", "Source", "iter_row_chunks", "open_source"]

Matrix = np.ndarray | sp.csr_matrix


@runtime_checkable
class Source(Protocol):
    """What every data source provides (``H5adSource`` and ``MemorySource``)."""

    name: str
    obs: pd.DataFrame
    var_names: pd.Index

    @property
    def n_obs(self) -> int: ...

    @property
    def n_vars(self) -> int: ...

    @property
    def is_sparse(self) -> bool: ...

    def read_rows(self, idx: np.ndarray, obsm_key: str | None = None) -> Matrix: ...

    def obsm_keys(self) -> list[str]: ...


def _as_index(idx: Any, n: int, where: str) -> np.ndarray:
    idx = np.asarray(idx)
    if idx.dtype == bool:
        if idx.shape != (n,):
            msg = f"{where}: boolean row mask has shape {idx.shape}, expected ({n},)"
            raise InputError(msg)
        return np.flatnonzero(idx)
    idx = idx.astype(np.int64, copy=False).reshape(-1)
    if idx.size and (idx.min() < -n or idx.max() >= n):
        msg = f"{where}: row index out of range [0, {n}): min {idx.min()}, max {idx.max()}"
        raise InputError(msg)
    return np.where(idx < 0, idx + n, idx)


def _one_line(e: BaseException, limit: int = 200) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_float32(block: Any) -> Matrix:
    """Dense -> float32 ndarray; sparse -> float32 CSR with sorted indices."""
    if sp.issparse(block):
        out = sp.csr_matrix(block, dtype=np.float32)
        out.sort_indices()
        return out
    return np.asarray(block, dtype=np.float32)


class H5adSource:
    """Lazy reader of an ``.h5ad`` file: obs, var names and row subsets of X (or of an obsm entry).

    ``read_rows(idx)`` sorts and de-duplicates ``idx`` (HDF5 needs increasing indices), reads those
    rows once and restores the caller's order (duplicates included), so
    ``read_rows(idx)[k] == X[idx[k]]`` for every k.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        import anndata as ad
        import h5py

        self.path = Path(path)
        self.name = str(self.path)
        if not self.path.exists():
            msg = f"{self.path}: file not found"
            raise InputError(msg)
        try:
            with h5py.File(self.path, "r") as f:
                if "X" not in f or "obs" not in f or "var" not in f:
                    found = sorted(f.keys())
                    msg = f"{self.path}: not an AnnData .h5ad file (needs X, obs and var; found {found})"
                    raise InputError(msg)
                self.obs: pd.DataFrame = ad.io.read_elem(f["obs"])
                self.var_names: pd.Index = ad.io.read_elem(f["var"]).index.astype(str)
                x = f["X"]
                if isinstance(x, h5py.Dataset):
                    self._format = "dense"
                    self._shape = tuple(int(s) for s in x.shape)
                else:
                    enc = x.attrs.get("encoding-type", "")
                    enc = enc.decode() if isinstance(enc, bytes) else str(enc)
                    if enc not in ("csr_matrix", "csc_matrix"):
                        msg = (
                            f"{self.path}: X has encoding {enc!r}; "
                            "expected a dense array, csr_matrix or csc_matrix"
                        )
                        raise InputError(msg)
                    self._format = enc[:3]
                    self._shape = tuple(int(s) for s in x.attrs["shape"])
                self._obsm_keys = sorted(f["obsm"].keys()) if "obsm" in f else []
        except InputError:
            raise
        except Exception as e:  # noqa: BLE001 - h5py / anndata raise many types on corrupted files
            msg = f"{self.path}: cannot read as HDF5/.h5ad ({type(e).__name__}: {_one_line(e)})"
            raise InputError(msg) from None
        self._file = None
        self._pid = -1
        self._readers: dict = {}
        self._readers_pid = -1

    # -- pickling: only the path travels; each process reopens the file lazily --------------------
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None
        state["_pid"] = -1
        state["_readers"] = {}
        state["_readers_pid"] = -1
        return state

    def _h5(self):
        import h5py

        if self._file is None or self._pid != os.getpid():
            self._file = h5py.File(self.path, "r")
            self._pid = os.getpid()
        return self._file

    def close(self) -> None:
        """Close the HDF5 handle of this process (it is reopened on the next read)."""
        if self._file is not None and self._pid == os.getpid():
            self._file.close()
        self._file = None
        self._readers = {}

    @property
    def n_obs(self) -> int:
        return self._shape[0]

    @property
    def n_vars(self) -> int:
        return self._shape[1]

    @property
    def is_sparse(self) -> bool:
        return self._format != "dense"

    @property
    def x_format(self) -> str:
        """``"dense"``, ``"csr"`` or ``"csc"``."""
        return self._format

    def obsm_keys(self) -> list[str]:
        return list(self._obsm_keys)

    def _elem(self, obsm_key: str | None):
        f = self._h5()
        if obsm_key is None:
            return f["X"]
        if obsm_key not in self._obsm_keys:
            avail = ", ".join(self._obsm_keys) or "(none)"
            msg = f"{self.path}: obsm key {obsm_key!r} not found; available: {avail}"
            raise InputError(msg)
        return f["obsm"][obsm_key]

    def _reader(self, obsm_key: str | None):
        """Per-process cached handles.

        ``("dense", dataset)``, ``("csr", data, indices, indptr, n_cols)`` or ``("other", sparse_dataset)``.
        """
        import h5py
        from anndata.io import sparse_dataset

        f = self._h5()
        if self._readers_pid != self._pid:
            self._readers, self._readers_pid = {}, self._pid
        r = self._readers.get(obsm_key)
        if r is None:
            elem = self._elem(obsm_key)
            if isinstance(elem, h5py.Dataset):
                r = ("dense", elem)
            else:
                enc = elem.attrs.get("encoding-type", "")
                enc = enc.decode() if isinstance(enc, bytes) else str(enc)
                if enc == "csr_matrix":
                    # indptr is kept in memory (8 bytes per cell); data / indices stay on disk, read
                    # through a memory map when stored uncompressed (else through h5py)
                    r = (
                        "csr",
                        mapped_or_dataset(self.path, elem["data"]),
                        mapped_or_dataset(self.path, elem["indices"]),
                        elem["indptr"][:].astype(np.int64),
                        int(elem.attrs["shape"][1]),
                    )
                else:
                    r = ("other", sparse_dataset(elem))
            self._readers[obsm_key] = r
        del f
        return r

    @contextlib.contextmanager
    def _read_errors(self, what: str = "X") -> Iterator[None]:
        """A failed read of rows of ``what`` (h5py / OS errors) becomes one :class:`InputError` line."""
        try:
            yield
        except InputError:
            raise
        except (OSError, KeyError, RuntimeError, ValueError, TypeError) as e:
            msg = f"{self.path}: cannot read rows of {what} ({type(e).__name__}: {_one_line(e)}); the file may be corrupted"
            raise InputError(msg) from None

    def read_rows(self, idx: np.ndarray, obsm_key: str | None = None) -> Matrix:
        """Rows ``idx`` of X (or of ``obsm[obsm_key]``) as float32: CSR for sparse storage, else ndarray.

        ``idx`` may be unsorted, contain duplicates, or be a boolean mask over all cells. CSR rows
        are read as runs of consecutive rows (one HDF5 slice per run).
        """
        idx = _as_index(idx, self.n_obs, self.name)
        uniq, inverse = np.unique(idx, return_inverse=True)
        with self._read_errors("X" if obsm_key is None else f"obsm[{obsm_key!r}]"):
            block = self._read_unique(uniq, obsm_key)
        if idx.size == uniq.size and np.array_equal(idx, uniq):  # already sorted and unique
            return block
        return block[inverse]

    def read_csr_parts(self, uniq: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
        """``(data, indices, indptr)`` of sorted unique rows of a CSR X as stored (no conversion).

        ``None`` when X is not CSR. The fast model-space read (:mod:`celltwin.data._fused`) uses it.
        """
        if self._format != "csr":
            return None
        m = self.read_stored(uniq)
        return m.data, m.indices, m.indptr

    def read_stored(self, uniq: np.ndarray) -> Matrix:
        """Sorted unique rows of X in the stored dtype: CSR (stored entry order kept) or ndarray.

        No conversion at all (the evaluator normalises in the file's own dtype); a CSC X is read
        through anndata's sparse dataset and returned as CSR.
        """
        uniq = np.asarray(uniq, dtype=np.int64)
        with self._read_errors():
            r = self._reader(None)
            if r[0] == "csr":
                return read_csr_rows(*r[1:], uniq)
            if r[0] == "dense":
                elem = r[1]
                if uniq.size and uniq.size == uniq[-1] - uniq[0] + 1:
                    return np.asarray(elem[int(uniq[0]) : int(uniq[-1]) + 1])
                return np.asarray(elem[uniq]) if uniq.size else np.empty((0, *elem.shape[1:]), elem.dtype)
            return sp.csr_matrix(r[1][uniq])

    def read_csr_into(self, uniq: np.ndarray, data_out: np.ndarray, ind_out: np.ndarray) -> np.ndarray | None:
        """Sorted unique rows of a CSR X read straight into ``data_out`` / ``ind_out`` (values cast to
        their dtypes when they differ from the stored ones); returns the local indptr, or ``None``
        when X is not CSR."""
        if self._format != "csr":
            return None
        with self._read_errors():
            _, data, indices, indptr, _ = self._reader(None)  # a CSR X has a CSR reader
            return read_csr_rows_into(data, indices, indptr, np.asarray(uniq, dtype=np.int64), data_out, ind_out)

    def read_obsm_stored(self, uniq: np.ndarray, key: str) -> np.ndarray:
        """Sorted unique rows of ``obsm[key]`` as a dense array in the stored dtype."""
        r = self._reader(key)  # InputError naming the available keys when missing
        uniq = np.asarray(uniq, dtype=np.int64)
        with self._read_errors(f"obsm[{key!r}]"):
            if r[0] == "dense":
                return np.asarray(r[1][uniq]) if uniq.size else np.empty((0, *r[1].shape[1:]), r[1].dtype)
            if r[0] == "csr":
                return read_csr_rows(*r[1:], uniq).toarray()
            return np.asarray(sp.csr_matrix(r[1][uniq]).toarray())

    def row_nnz(self) -> np.ndarray | None:
        """Stored entries per row of a CSR X (from indptr, no data read); ``None`` otherwise."""
        if self._format != "csr":
            return None
        return np.diff(self._reader(None)[3])

    def stored_dtype(self) -> np.dtype:
        """dtype of X's values as stored in the file."""
        elem = self._elem(None)
        import h5py

        return elem.dtype if isinstance(elem, h5py.Dataset) else elem["data"].dtype

    def _read_unique(self, uniq: np.ndarray, obsm_key: str | None) -> Matrix:
        r = self._reader(obsm_key)
        if r[0] == "dense":
            elem = r[1]
            if uniq.size == 0:
                block = np.empty((0, *elem.shape[1:]), dtype=np.float32)
            elif uniq.size == uniq[-1] - uniq[0] + 1:  # contiguous: one slice read
                block = elem[int(uniq[0]) : int(uniq[-1]) + 1]
            else:
                block = elem[uniq]
        elif r[0] == "csr":
            block = read_csr_rows(*r[1:], uniq)
        else:
            block = r[1][uniq]
        return _to_float32(block)

    def __repr__(self) -> str:
        return f"H5adSource({str(self.path)!r}, n_obs={self.n_obs}, n_vars={self.n_vars}, X={self._format})"


class MemorySource:
    """The :class:`H5adSource` interface over an in-memory :class:`anndata.AnnData`."""

    def __init__(self, adata: Any, name: str = "<in-memory AnnData>") -> None:
        self.adata = adata
        self.name = name
        self.obs: pd.DataFrame = adata.obs
        self.var_names: pd.Index = pd.Index(adata.var_names.astype(str))

    @property
    def n_obs(self) -> int:
        return int(self.adata.n_obs)

    @property
    def n_vars(self) -> int:
        return int(self.adata.n_vars)

    @property
    def is_sparse(self) -> bool:
        return sp.issparse(self.adata.X)

    @property
    def x_format(self) -> str:
        x = self.adata.X
        return x.format if sp.issparse(x) else "dense"

    def obsm_keys(self) -> list[str]:
        return list(self.adata.obsm.keys())

    def read_rows(self, idx: np.ndarray, obsm_key: str | None = None) -> Matrix:
        """Rows ``idx`` of X (or ``obsm[obsm_key]``) as float32 CSR / ndarray, in the order given."""
        idx = _as_index(idx, self.n_obs, self.name)
        if obsm_key is None:
            src = self.adata.X
        else:
            if obsm_key not in self.adata.obsm:
                avail = ", ".join(self.obsm_keys()) or "(none)"
                msg = f"{self.name}: obsm key {obsm_key!r} not found; available: {avail}"
                raise InputError(msg)
            src = self.adata.obsm[obsm_key]
        if sp.issparse(src):
            return _to_float32(sp.csr_matrix(src)[idx] if src.format != "csr" else src[idx])
        return np.asarray(np.asarray(src)[idx], dtype=np.float32)

    def _stored(self):
        x = self.adata.X
        if sp.issparse(x) and x.format != "csr":
            if getattr(self, "_csr", None) is None:
                self._csr = sp.csr_matrix(x)  # once: row reads of CSC/COO need a CSR copy
            return self._csr
        return x

    def read_stored(self, uniq: np.ndarray) -> Matrix:
        """Rows ``uniq`` of X in its own dtype (a copy: CSR for sparse X, else ndarray)."""
        x = self._stored()
        uniq = np.asarray(uniq, dtype=np.int64)
        if sp.issparse(x):
            return sp.csr_matrix(x[uniq])
        return np.array(np.asarray(x)[uniq])

    def read_csr_into(self, uniq: np.ndarray, data_out: np.ndarray, ind_out: np.ndarray) -> np.ndarray | None:
        x = self._stored()
        if not sp.issparse(x):
            return None
        return read_csr_rows_into(x.data, x.indices, x.indptr.astype(np.int64, copy=False),
                                   np.asarray(uniq, dtype=np.int64), data_out, ind_out)

    def read_obsm_stored(self, uniq: np.ndarray, key: str) -> np.ndarray:
        if key not in self.adata.obsm:
            avail = ", ".join(self.obsm_keys()) or "(none)"
            msg = f"{self.name}: obsm key {key!r} not found; available: {avail}"
            raise InputError(msg)
        m = self.adata.obsm[key]
        m = m.to_numpy() if hasattr(m, "to_numpy") else m
        uniq = np.asarray(uniq, dtype=np.int64)
        return sp.csr_matrix(m[uniq]).toarray() if sp.issparse(m) else np.array(np.asarray(m)[uniq])

    def row_nnz(self) -> np.ndarray | None:
        x = self._stored()
        return np.diff(x.indptr) if sp.issparse(x) else None

    def stored_dtype(self) -> np.dtype:
        x = self.adata.X
        return x.dtype if sp.issparse(x) else np.asarray(x[:0]).dtype

    def close(self) -> None:
        return None

    def __repr__(self) -> str:
        return f"MemorySource({self.name!r}, n_obs={self.n_obs}, n_vars={self.n_vars})"


def open_source(data: Any) -> H5adSource | MemorySource:
    """A source for ``data``: a path to an ``.h5ad`` (read lazily), an AnnData, or an existing source."""
    if isinstance(data, H5adSource | MemorySource) or hasattr(data, "read_model"):  # or a CellDataset
        return data
    if isinstance(data, str | os.PathLike):
        return H5adSource(data)
    import anndata as ad

    if isinstance(data, ad.AnnData):
        return MemorySource(data)
    msg = f"expected a path to an .h5ad file or an AnnData, got {type(data).__name__}"
    raise InputError(msg)


def iter_row_chunks(
    source: H5adSource | MemorySource, rows: np.ndarray | None = None, chunk_size: int = 4096
) -> Iterator[tuple[np.ndarray, Matrix]]:
    """Yield ``(row_indices, block)`` over ``rows`` (default: all cells), ``chunk_size`` rows at a time."""
    rows = np.arange(source.n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
    for start in range(0, rows.size, chunk_size):
        r = rows[start : start + chunk_size]
        yield r, source.read_rows(r)
