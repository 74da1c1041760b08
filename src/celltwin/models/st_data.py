"""What the ST model reads for a set of cells, straight from disk (no in-memory copy of the data).

:class:`SetReader` maps global row ids to the model's input ``x`` (n, D) and, when the run decodes
to genes (output space ``all``), the target genes (n, G):

===============================  =======================================  ==========================
input                            ``x``                                    ``genes`` (output ``all``)
===============================  =======================================  ==========================
every gene (output ``gene``)     model-space genes                        -
``--hvg N``                      the HVG columns of the model-space genes  model-space genes
``--embed-key K``                ``obsm[K]`` rows                         model-space genes
SE embeddings (``state-se``)     rows of the run's SE embedding cache     model-space genes
===============================  =======================================  ==========================

One disk read per call serves both (the genes are read once; HVG columns are a view of them).
Readers are picklable: DataLoader workers and DDP ranks reopen the files (and the SE cache, a
``.npy`` opened as a read-only memmap) in their own process.

:func:`build_se_cache` embeds the training cells with the run's SE model block by block into
``RUN/state/se_embeddings.npy`` (float32, one row per training cell, in training-row order), so
an SE forward pass is paid once per cell rather than once per draw.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

from celltwin.errors import InputError

__all__ = ["SE_CACHE", "SetReader", "build_se_cache"]

SE_CACHE = "se_embeddings.npy"


class SetReader:
    """``reader(rows) -> {"x": (n, D) float32, "genes": (n, G) float32 | None}`` (see module docstring)."""

    def __init__(self, data: Any, pre: Any, *, input_idx: np.ndarray | None = None, embed_key: str | None = None,
                 se_cache: str | None = None, se_rows: np.ndarray | None = None, decode_genes: bool = False,
                 read_log: str | None = None) -> None:
        self.data, self.pre = data, pre
        self.input_idx = input_idx  # HVG columns of the model genes
        self.embed_key = embed_key
        self.se_cache = se_cache  # path of the SE embedding cache (.npy)
        self.se_rows = se_rows  # sorted global rows of the cache's rows
        self.decode_genes = decode_genes
        self.read_log = read_log or os.environ.get("CELLTWIN_READ_LOG") or None
        self._mm = None
        self._pid = -1

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_mm"], state["_pid"] = None, -1
        return state

    def _cache(self) -> np.ndarray:
        if self._mm is None or self._pid != os.getpid():
            self._mm = np.load(self.se_cache, mmap_mode="r")
            self._pid = os.getpid()
        return self._mm

    def _log(self, rows: np.ndarray) -> None:
        """Debug aid (tests): append the rows read to ``$CELLTWIN_READ_LOG/rank{R}-pid{P}.txt``."""
        d = Path(self.read_log)
        d.mkdir(parents=True, exist_ok=True)
        rank = os.environ.get("RANK", "0")
        with open(d / f"rank{rank}-pid{os.getpid()}.txt", "a") as fh:
            fh.write(" ".join(map(str, rows.tolist())) + "\n")

    def __call__(self, rows: np.ndarray) -> dict[str, np.ndarray | None]:
        rows = np.asarray(rows, dtype=np.int64)
        if self.read_log:
            self._log(rows)
        need_genes = self.decode_genes or (self.embed_key is None and self.se_cache is None)
        genes = self.data.read_model(rows, self.pre) if need_genes else None  # (n, G)
        if self.se_cache is not None:
            pos = np.searchsorted(self.se_rows, rows)
            if np.any(pos >= self.se_rows.size) or np.any(self.se_rows[np.minimum(pos, self.se_rows.size - 1)] != rows):
                raise InputError("SE embedding cache: a requested cell is not a training cell of the run")
            order = np.argsort(pos, kind="stable")
            x = np.empty((rows.size, self._cache().shape[1]), np.float32)
            x[order] = self._cache()[pos[order]]
        elif self.embed_key is not None:
            b = self.data.read_rows(rows, obsm_key=self.embed_key)
            x = b.toarray() if hasattr(b, "toarray") else np.asarray(b, dtype=np.float32)
            if not np.isfinite(x).all():
                msg = f"{self.data.name}: obsm[{self.embed_key!r}] holds non-finite values in the rows read"
                raise InputError(msg)
        elif self.input_idx is not None:
            x = genes[:, self.input_idx]
        else:
            x = genes
        return {"x": x, "genes": genes if self.decode_genes else None}


def build_se_cache(bridge: Any, data: Any, pre: Any, rows: np.ndarray, path: Path, chunk: int = 2048,
                   log=None) -> Path:
    """Embed ``rows`` (sorted) of ``data`` with ``bridge`` (run space -> SE) into ``path`` (.npy, atomic).

    Reuses an existing cache whose shape matches (same rows; the run's resume check guards the rest).
    """
    from numpy.lib.format import open_memmap

    from celltwin._io import atomic_path

    path = Path(path)
    if path.exists():
        try:
            mm = np.load(path, mmap_mode="r")
            if mm.shape == (rows.size, bridge.dim):
                return path
        except (OSError, ValueError):
            pass
    with atomic_path(path, suffix=".npy") as tmp:
        out = open_memmap(tmp, mode="w+", dtype=np.float32, shape=(rows.size, bridge.dim))
        for start in range(0, rows.size, chunk):
            r = rows[start:start + chunk]
            out[start:start + r.size] = bridge.embed(data.read_model(r, pre))
            if log is not None:
                log(start + r.size, rows.size)
        out.flush()
        del out
    return path
