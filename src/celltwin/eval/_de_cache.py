"""On-disk cache of DE tables, keyed by a content hash of the inputs.

The real-side DE table of an evaluation never changes between submissions, so the
evaluator passes a ``cache_dir`` and pays for it once. The key is a BLAKE2b digest of
everything the table depends on: the matrix content (dense bytes, or CSR
``data``/``indices``/``indptr`` after canonicalisation is *not* applied, so two different
encodings of the same matrix may get two entries), its shape and dtype, the per-cell
labels, the control label, the gene names, the mode, the requested targets and
:data:`DE_CACHE_VERSION`. Entries are ``<key>.npz`` files written atomically.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin._io import atomic_path

__all__ = ["DE_CACHE_VERSION", "content_key", "load", "save"]

DE_CACHE_VERSION = "celltwin-de-2"  # bump whenever de_table's output changes for equal inputs

_CHUNK = 1 << 24  # bytes hashed per update (keeps the peak memory of hashing flat)


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


def load(cache_dir: str | os.PathLike[str], key: str) -> pd.DataFrame | None:
    """The cached frame for ``key``, or ``None`` when absent or unreadable."""
    path = Path(cache_dir) / f"{key}.npz"
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            columns = [str(c) for c in z["__columns__"]]
            data: dict[str, object] = {}
            for c in columns:
                if f"{c}__categories" in z.files:
                    cats = pd.Index(z[f"{c}__categories"].astype(object), dtype=object)
                    data[c] = pd.Categorical.from_codes(z[c], categories=cats)
                elif z[c].dtype.kind == "U":
                    data[c] = z[c].astype(object)
                else:
                    data[c] = z[c]
    except (OSError, ValueError, KeyError):
        return None
    return pd.DataFrame(data, columns=columns)


def save(cache_dir: str | os.PathLike[str], key: str, frame: pd.DataFrame) -> Path:
    """Write ``frame`` (categorical, string and numeric columns) under ``key``; returns the path.

    A categorical column is stored as its integer codes plus ``<column>__categories``, so an
    entry costs a few bytes per row and loads without re-creating a string per row.
    """
    path = Path(cache_dir) / f"{key}.npz"
    arrays: dict[str, np.ndarray] = {"__columns__": np.asarray(list(frame.columns), dtype=str)}
    for c in frame.columns:
        series = frame[c]
        if isinstance(series.dtype, pd.CategoricalDtype):
            arrays[c] = np.asarray(series.cat.codes)
            arrays[f"{c}__categories"] = np.asarray([str(v) for v in series.cat.categories], dtype=str)
            continue
        col = series.to_numpy()
        arrays[c] = col.astype(str) if col.dtype == object else col
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    return path
