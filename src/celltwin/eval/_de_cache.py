"""On-disk cache of DE tables, keyed by a content hash of the inputs.

The real-side DE table of an evaluation never changes between submissions, so the
evaluator passes a ``cache_dir`` and pays for it once. The key is a BLAKE2b digest of
everything the table depends on: the matrix content (dense bytes, or CSR
``data``/``indices``/``indptr`` after canonicalisation is *not* applied, so two different
encodings of the same matrix may get two entries), its shape and dtype, the per-cell
labels, the control label, the gene names, the mode, the requested targets and
:data:`DE_CACHE_VERSION`. Entries are ``<key>.npz`` files written atomically.

Integrity. An entry is an uncompressed ``.npz`` of plain arrays (numbers, fixed-width unicode
strings; read with ``allow_pickle=False``, so loading never runs code) plus ``__meta__``, a
UTF-8 JSON document (stored as a uint8 array) with the format version, the key, the column
order and the SHA-256 of the payload: for every other array, in sorted name order, its name,
``dtype.str``, shape and raw C-order bytes (see :func:`_payload_digest`). :func:`load` returns
``None`` with a :class:`DECacheWarning` for an entry that is truncated, not a zip/npz, lacks or
has malformed metadata, was written for another key or format, or whose digest does not match
(an edited array); the caller then recomputes the table and :func:`save` atomically replaces
the entry. The digest detects accidental corruption and edits by tools that do not know the
format; it is not a signature (whoever can write the cache directory can write a consistent
entry).
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin._io import atomic_path

__all__ = ["DE_CACHE_VERSION", "DECacheWarning", "content_key", "load", "save"]

DE_CACHE_VERSION = "celltwin-de-3"  # bump whenever de_table's output changes for equal inputs

_CHUNK = 1 << 24  # bytes hashed per update (keeps the peak memory of hashing flat)
_META = "__meta__"


class DECacheWarning(RuntimeWarning):
    """A DE-cache entry was ignored (corrupt, edited or foreign); the table is recomputed."""


def _update_array(h: hashlib._Hash, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    view = memoryview(arr.reshape(-1).view(np.uint8))
    for start in range(0, view.nbytes, _CHUNK):
        h.update(view[start : start + _CHUNK])


def _update_strings(h: hashlib._Hash, values: Sequence[object]) -> None:
    for v in values:
        b = str(v).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)


def content_key(
    X: np.ndarray | sp.spmatrix | sp.sparray,
    labels: Sequence[object],
    control: str,
    genes: Sequence[object],
    mode: str,
    targets: Sequence[str] | None,
) -> str:
    """Hex digest identifying a DE table's inputs (see the module docstring)."""
    h = hashlib.blake2b(digest_size=20)
    h.update(DE_CACHE_VERSION.encode())
    h.update(mode.encode())
    if sp.issparse(X):
        h.update(b"csr")
        h.update(str(X.shape).encode())
        _update_array(h, X.data)
        _update_array(h, X.indices)
        _update_array(h, X.indptr)
    else:
        h.update(b"dense")
        _update_array(h, np.asarray(X))
    h.update(b"labels")
    _update_strings(h, ["<NA>" if pd.isna(v) else v for v in labels])
    h.update(b"control")
    _update_strings(h, [control])
    h.update(b"genes")
    _update_strings(h, genes)
    h.update(b"targets")
    if targets is not None:
        _update_strings(h, targets)
    return h.hexdigest()


def _payload_digest(arrays: Mapping[str, np.ndarray]) -> str:
    """SHA-256 over every array except ``__meta__``: sorted names, then per array its name,
    ``dtype.str``, shape and raw C-order bytes (each field length-prefixed)."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        if name == _META:
            continue
        arr = np.ascontiguousarray(arrays[name])
        for field in (name.encode(), arr.dtype.str.encode(), repr(tuple(arr.shape)).encode()):
            h.update(len(field).to_bytes(8, "little"))
            h.update(field)
        view = memoryview(arr.reshape(-1).view(np.uint8))
        h.update(view.nbytes.to_bytes(8, "little"))
        for start in range(0, view.nbytes, _CHUNK):
            h.update(view[start : start + _CHUNK])
    return h.hexdigest()


def _reject(path: Path, why: str) -> None:
    msg = f"DE cache entry {path} ignored ({why}); recomputing the table and rewriting the entry"
    warnings.warn(msg, DECacheWarning, stacklevel=3)


def load(cache_dir: str | os.PathLike[str], key: str) -> pd.DataFrame | None:
    """The cached frame for ``key``; ``None`` when absent, or (with a :class:`DECacheWarning`)
    when the entry does not verify (see the module docstring)."""
    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:
        _reject(path, f"unreadable npz: {type(exc).__name__}: {exc}")
        return None
    raw = arrays.get(_META)
    if raw is None or raw.dtype != np.uint8 or raw.ndim != 1:
        _reject(
            path, f"field {_META!r}: expected a uint8 JSON array, got {None if raw is None else raw.dtype}"
        )
        return None
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
        fmt, meta_key, columns, digest = meta["format"], meta["key"], meta["columns"], meta["sha256"]
    except (UnicodeDecodeError, ValueError, KeyError, TypeError) as exc:
        _reject(path, f"field {_META!r}: malformed metadata ({type(exc).__name__}: {exc})")
        return None
    if fmt != DE_CACHE_VERSION or meta_key != key:
        _reject(
            path, f"written for format {fmt!r} / key {meta_key!r}, expected {DE_CACHE_VERSION!r} / {key!r}"
        )
        return None
    actual = _payload_digest(arrays)
    if actual != digest:
        _reject(path, f"payload SHA-256 {actual} does not match the stored {digest}")
        return None
    try:
        data: dict[str, object] = {}
        for c in columns:
            cats = arrays.get(f"{c}__categories")
            if cats is not None:
                data[c] = pd.Categorical.from_codes(
                    arrays[c], categories=pd.Index(cats.astype(object), dtype=object)
                )
            elif arrays[c].dtype.kind == "U":
                data[c] = arrays[c].astype(object)
            else:
                data[c] = arrays[c]
        frame = pd.DataFrame(data, columns=list(columns))
    except (KeyError, ValueError, TypeError) as exc:  # verified but inconsistent: written by a bug
        _reject(path, f"inconsistent columns ({type(exc).__name__}: {exc})")
        return None
    return frame


def save(cache_dir: str | os.PathLike[str], key: str, frame: pd.DataFrame) -> Path | None:
    """Write ``frame`` (categorical, string and numeric columns) under ``key``; returns the path.

    A categorical column is stored as its integer codes plus ``<column>__categories``, so an
    entry costs a few bytes per row and loads without re-creating a string per row. The entry
    is written to a temporary file and renamed into place (readers see the old or the new
    entry, never a partial one). A cache directory that cannot be written only costs the
    cache: a :class:`DECacheWarning` and ``None``.
    """
    path = Path(cache_dir) / f"{key}.npz"
    columns = [str(c) for c in frame.columns]
    arrays: dict[str, np.ndarray] = {}
    for c in frame.columns:
        series = frame[c]
        if isinstance(series.dtype, pd.CategoricalDtype):
            arrays[str(c)] = np.asarray(series.cat.codes)
            arrays[f"{c}__categories"] = np.asarray([str(v) for v in series.cat.categories], dtype=str)
            continue
        col = series.to_numpy()
        arrays[str(c)] = col.astype(str) if col.dtype == object else col
    meta = {"format": DE_CACHE_VERSION, "key": key, "columns": columns, "sha256": _payload_digest(arrays)}
    arrays[_META] = np.frombuffer(json.dumps(meta).encode("utf-8"), dtype=np.uint8)
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    except OSError as exc:
        msg = f"DE cache entry {path} not written ({type(exc).__name__}: {exc}); the table is still returned"
        warnings.warn(msg, DECacheWarning, stacklevel=2)
        return None
    return path
