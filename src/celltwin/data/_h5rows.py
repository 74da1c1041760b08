"""Row reads of arrays stored in an HDF5 file: CSR row runs and :class:`DirectArray`.

The low level of :class:`celltwin.data.source.H5adSource`: rows of an on-disk CSR matrix are read
as runs of consecutive rows, one slice of ``data`` / ``indices`` per run (:func:`read_csr_rows`,
:func:`read_csr_rows_into`); an uncompressed dataset is sliced with ``os.pread``
(:class:`DirectArray`, :func:`mapped_or_dataset`) instead of through h5py's selection machinery.
"""

from __future__ import annotations

import itertools
import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

__all__ = ["DirectArray", "mapped_or_dataset", "read_csr_rows", "read_csr_rows_into"]


def _row_runs(rows: np.ndarray) -> list[tuple[int, int]]:
    """``[a, b)`` positions of each run of consecutive values in sorted unique ``rows`` (empty runs dropped)."""
    brk = np.flatnonzero(np.diff(rows) != 1) + 1
    bounds = np.concatenate([[0], brk, [rows.size]]).astype(np.int64)
    return [(int(a), int(b)) for a, b in itertools.pairwise(bounds) if a < b]


def read_csr_rows(data, indices, indptr: np.ndarray, n_cols: int, rows: np.ndarray) -> sp.csr_matrix:
    """Sorted unique ``rows`` of an on-disk CSR matrix; one slice read per run of consecutive rows."""
    starts, ends = indptr[rows], indptr[rows + 1]
    d_parts, i_parts = [], []
    for a, b in _row_runs(rows):
        s, e = int(starts[a]), int(ends[b - 1])
        d_parts.append(data[s:e])
        i_parts.append(indices[s:e])
    new_ptr = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
    dat = np.concatenate(d_parts) if d_parts else np.zeros(0, dtype=data.dtype)
    ind = np.concatenate(i_parts) if i_parts else np.zeros(0, dtype=np.int64)
    return sp.csr_matrix((dat, ind, new_ptr), shape=(rows.size, n_cols))


def _read_slice_into(arr: Any, a: int, b: int, out: np.ndarray) -> None:
    """``out[:] = arr[a:b]``, read in place when ``arr`` is a :class:`DirectArray` or an h5py
    dataset of ``out``'s dtype (else through a temporary, with a dtype cast)."""
    if b <= a:
        return
    if isinstance(arr, DirectArray) and arr.dtype == out.dtype and out.flags.c_contiguous:
        arr.read_into(a, b, out)
    elif hasattr(arr, "read_direct") and arr.dtype == out.dtype and out.flags.c_contiguous:
        arr.read_direct(out, np.s_[a:b], np.s_[0 : b - a])
    else:
        out[:] = arr[a:b]


def read_csr_rows_into(data, indices, indptr: np.ndarray, rows: np.ndarray, data_out: np.ndarray,
                        ind_out: np.ndarray) -> np.ndarray:
    """Sorted unique ``rows`` of an on-disk CSR matrix into ``data_out`` / ``ind_out`` (their
    leading entries); returns the rows' local ``indptr`` (int64). Raises ValueError when the
    outputs are too short."""
    starts, ends = indptr[rows], indptr[rows + 1]
    new_ptr = np.zeros(rows.size + 1, dtype=np.int64)
    np.cumsum(ends - starts, out=new_ptr[1:])
    if new_ptr[-1] > min(data_out.size, ind_out.size):
        msg = f"output holds {min(data_out.size, ind_out.size)} entries, the rows have {int(new_ptr[-1])}"
        raise ValueError(msg)
    for a, b in _row_runs(rows):
        s, e, pos = int(starts[a]), int(ends[b - 1]), int(new_ptr[a])
        _read_slice_into(data, s, e, data_out[pos : pos + e - s])
        _read_slice_into(indices, s, e, ind_out[pos : pos + e - s])
    return new_ptr


class _NotMappable(Exception):
    pass


class DirectArray:
    """A read-only 1-D view of an *uncompressed* HDF5 dataset, sliced with ``os.pread``.

    Why: a cell set is ~1,000 random rows, i.e. ~2,000 small slices of ``data`` / ``indices``;
    each h5py slice costs ~50-100 us of selection overhead (0.2 s per ST step at 18,080 genes),
    a ``pread`` of the same bytes a few microseconds. HDF5 stores an uncompressed dataset either
    contiguously (one byte offset) or in equal chunks whose byte offsets it reports
    (``chunk_iter``); the bytes are the array's own (its dtype, byte order included), so a slice
    is read directly. No memory map: mapped file pages would count in the process's resident
    memory as a long run touches the file. Datasets with filters (compression, shuffle,
    checksums), unallocated chunks or compact layout are not read this way:
    :func:`mapped_or_dataset` keeps the h5py dataset. Only ``arr[a:b]`` slices are supported
    (what the CSR row reader uses). The file descriptor is opened per process.
    """

    def __init__(self, path: Path, dset) -> None:
        import h5py

        self._fd, self._pid = -1, -1
        if dset.ndim != 1:
            raise _NotMappable
        plist = dset.id.get_create_plist()
        if plist.get_nfilters() > 0:
            raise _NotMappable
        self.path = str(path)
        self.dtype = dset.dtype
        self.n = int(dset.shape[0])
        self.itemsize = self.dtype.itemsize
        layout = plist.get_layout()
        self.chunk, self.base = 0, 0
        if self.n == 0:
            return
        if layout == h5py.h5d.CONTIGUOUS:
            off = dset.id.get_offset()
            if off is None:
                raise _NotMappable
            self.base = int(off)
        elif layout == h5py.h5d.CHUNKED:
            L = int(dset.chunks[0])
            offsets = np.full(-(-self.n // L), -1, dtype=np.int64)
            full = L * self.itemsize

            def visit(info) -> None:
                if info.filter_mask != 0 or info.size != full:
                    raise _NotMappable
                offsets[int(info.chunk_offset[0]) // L] = int(info.byte_offset)

            if not hasattr(dset.id, "chunk_iter"):
                raise _NotMappable
            dset.id.chunk_iter(visit)
            if (offsets < 0).any():
                raise _NotMappable
            self.chunk, self.offsets = L, offsets
        else:
            raise _NotMappable

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": -1, "_pid": -1}

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0 and self._pid == os.getpid():
            try:
                os.close(self._fd)
            except OSError:
                pass

    def _read(self, offset: int, count: int) -> np.ndarray:
        if self._fd < 0 or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        nbytes = count * self.itemsize
        buf = os.pread(self._fd, nbytes, offset)
        if len(buf) != nbytes:
            raise OSError(f"short read ({len(buf)} of {nbytes} bytes at offset {offset})")
        return np.frombuffer(buf, dtype=self.dtype)

    def read_into(self, a: int, b: int, out: np.ndarray) -> None:
        """``self[a:b]`` straight into ``out`` (1-D, C-contiguous, this dtype), no temporaries."""
        if self._fd < 0 or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        view = memoryview(out).cast("B")
        isz, pos = self.itemsize, 0
        while a < b:
            if self.chunk:
                c = a // self.chunk
                n = min(b, (c + 1) * self.chunk) - a
                offset = int(self.offsets[c]) + (a - c * self.chunk) * isz
            else:
                n, offset = b - a, self.base + a * isz
            want = n * isz
            got = os.preadv(self._fd, [view[pos : pos + want]], offset)
            if got != want:
                raise OSError(f"short read ({got} of {want} bytes at offset {offset})")
            pos += want
            a += n

    @property
    def shape(self) -> tuple[int]:
        return (self.n,)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, sl: slice) -> np.ndarray:
        a, b, _ = sl.indices(self.n)
        if b <= a:
            return np.zeros(0, dtype=self.dtype)
        if not self.chunk:
            return self._read(self.base + a * self.itemsize, b - a)
        L, pieces = self.chunk, []
        while a < b:
            c = a // L
            lo, hi = a - c * L, min(b - c * L, L)
            pieces.append(self._read(int(self.offsets[c]) + lo * self.itemsize, hi - lo))
            a = c * L + hi
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


def mapped_or_dataset(path: Path, dset):
    """A :class:`DirectArray` of ``dset`` when it is stored uncompressed, else ``dset`` itself."""
    try:
        return DirectArray(path, dset)
    except (_NotMappable, OSError, ValueError, TypeError, AttributeError, RuntimeError):
        return dset
