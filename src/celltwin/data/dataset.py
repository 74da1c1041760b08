"""One or more ``.h5ad`` files as one lazily read training set: aligned genes, global labels.

:class:`CellDataset` is what ``celltwin train`` / ``predict`` read. It never holds a cells x
genes matrix: obs (small) is read eagerly, X rows are read on demand from each file
(:class:`~celltwin.data.source.H5adSource`), a block at a time.

* **Files.** A dataset location (a split's ``[datasets]`` value, or ``--data``) is one ``.h5ad``
  file, a folder (every ``*.h5ad`` directly inside it, sorted by name) or a glob pattern
  (``"screens/*.h5ad"``, sorted). Several datasets can be combined; every file keeps its own rows,
  numbered globally in the order datasets, then files, then rows.
* **Genes.** Files are aligned by gene name (``var_names``). Without a gene list the dataset's
  genes are the genes present in *every* file, in the first file's order; with ``genes=`` they
  are exactly that list, and a file lacking any of them is an :class:`InputError` naming the
  file and the missing genes. Gene names must be unique within a file.
* **Labels.** Every file's obs is mapped to the canonical columns (``PERT_COL`` with controls
  relabelled ``CONTROL_LABEL``, ``CONTEXT_COL``, ``BATCH_COL``; see :class:`ObsColumns`), plus
  ``DATASET_COL`` (the dataset name) and ``FILE_COL`` (file index). Perturbation, context and batch
  vocabularies are therefore global across files. A context name keeps its plain value (a
  ``k562`` context of two files is one context); batches are prefixed with the file index when
  several files are read (batch ``1`` of two different files are not the same batch).
* **Model space.** :meth:`read_model` normalises each block with the run's
  :class:`~celltwin.data.preprocess.Preprocessing`: totals over *all* genes of the cell's own file
  (not only the shared ones), then the run's genes selected. Values are checked as they are read:
  NaN, infinite or negative values are refused with an InputError naming the file and row (the
  rule of ``celltwin eval``).
"""

from __future__ import annotations

import glob
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin._constants import BATCH_COL, CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.data.columns import ObsColumns, resolve_columns
from celltwin.data.source import H5adSource, Matrix, MemorySource
from celltwin.errors import InputError

__all__ = ["DATASET_COL", "FILE_COL", "CellDataset", "DatasetFiles", "check_values", "expand_location"]

DATASET_COL = "dataset"
FILE_COL = "_file"


def expand_location(location: str | os.PathLike[str], where: str = "dataset") -> list[Path]:
    """The ``.h5ad`` files of a location: a file, a folder (its ``*.h5ad``) or a glob, sorted."""
    p = Path(location)
    if p.is_dir():
        files = sorted(q for q in p.iterdir() if q.suffix == ".h5ad" and q.is_file())
        if not files:
            msg = f"{where}: folder {p} holds no .h5ad file"
            raise InputError(msg)
        return files
    if p.is_file():
        return [p]
    if glob.has_magic(str(p)):
        files = sorted(Path(q) for q in glob.glob(str(p)) if Path(q).is_file())
        if not files:
            msg = f"{where}: pattern {p} matches no file"
            raise InputError(msg)
        return files
    msg = f"{where}: {p} not found (expected an .h5ad file, a folder of .h5ad files or a glob pattern)"
    raise InputError(msg)


@dataclass(frozen=True)
class DatasetFiles:
    """A named dataset and its files (one entry of a split's ``[datasets]``)."""

    name: str
    files: tuple[Path, ...]


def check_values(block: Matrix, where: str, rows: np.ndarray) -> None:
    """InputError on NaN, infinite or negative values (first offending row named)."""
    vals = block.data if sp.issparse(block) else np.asarray(block)
    if vals.size == 0:
        return
    finite = np.isfinite(vals)
    if finite.all() and vals.min() >= 0:
        return
    bad = ~finite | (np.nan_to_num(vals, nan=-1.0) < 0)
    if sp.issparse(block):
        k = int(np.flatnonzero(bad)[0])
        r = int(np.searchsorted(block.indptr, k, side="right") - 1)
        v = float(block.data[k])
    else:
        flat = int(np.flatnonzero(bad.ravel())[0])
        r, v = flat // block.shape[1], float(vals.ravel()[flat])
    msg = (f"{where}: X row {int(rows[r])} holds {v!r}; expected finite non-negative values "
           "(counts or log-normalised expression)")
    raise InputError(msg)


class CellDataset:
    """Cells of one or more ``.h5ad`` files (or an in-memory AnnData), read lazily.

    Attributes
    ----------
    obs
        Canonical labels of every cell (``PERT_COL``, ``CONTEXT_COL``, ``BATCH_COL``,
        ``DATASET_COL``, ``FILE_COL``), global row order.
    var_names
        The aligned genes.
    columns
        The :class:`ObsColumns` the files were read with (their own column names).
    """

    def __init__(self, sources: Sequence[H5adSource | MemorySource], dataset_names: Sequence[str],
                 columns: ObsColumns | None = None, genes: Sequence[str] | None = None) -> None:
        if not sources:
            raise InputError("dataset: no file to read")
        self.sources = list(sources)
        self.dataset_names = [str(n) for n in dataset_names]
        cols_in = columns or ObsColumns()
        for s in self.sources:
            if len(set(s.var_names)) != len(s.var_names):
                dup = s.var_names[s.var_names.duplicated()].tolist()[:5]
                msg = f"{s.name}: var_names are not unique (e.g. {', '.join(map(str, dup))}); cannot align genes"
                raise InputError(msg)
        if genes is None:
            common = set(self.sources[0].var_names)
            for s in self.sources[1:]:
                common &= set(s.var_names)
            aligned = [str(g) for g in self.sources[0].var_names if g in common]
            if not aligned:
                msg = (f"dataset: the {len(self.sources)} files share no gene name "
                       f"({self.sources[0].name} vs {self.sources[-1].name})")
                raise InputError(msg)
        else:
            aligned = [str(g) for g in genes]
        self.var_names = pd.Index(aligned)
        self._col_idx = []  # per source: column of each aligned gene in the file
        for s in self.sources:
            pos = {str(g): i for i, g in enumerate(s.var_names)}
            missing = [g for g in aligned if g not in pos]
            if missing:
                msg = (f"{s.name}: {len(missing)} of the {len(aligned)} genes are not in var_names "
                       f"({', '.join(missing[:10])}{' ...' if len(missing) > 10 else ''})")
                raise InputError(msg)
            self._col_idx.append(np.array([pos[g] for g in aligned], dtype=np.int64))
        self._identity = [bool(ci.size == s.n_vars and np.array_equal(ci, np.arange(s.n_vars)))
                          for ci, s in zip(self._col_idx, self.sources, strict=True)]
        frames, col_used = [], None
        for k, (s, ds) in enumerate(zip(self.sources, self.dataset_names, strict=True)):
            c = resolve_columns(s.obs, cols_in, s.name, require_controls=False)  # controls: checked over all files
            pert = c.perturbations(s.obs)
            pert = np.where(pert == c.control_label, CONTROL_LABEL, pert)
            batch = c.batches(s.obs)
            if len(self.sources) > 1 and c.batch_col is not None:
                batch = np.array([f"{k}:{b}" for b in batch], dtype=object)
            frames.append(pd.DataFrame({
                PERT_COL: pert.astype(str), CONTEXT_COL: c.contexts(s.obs).astype(str),
                BATCH_COL: batch.astype(str), DATASET_COL: ds, FILE_COL: np.int32(k),
            }, index=pd.Index(s.obs.index.astype(str))))
            col_used = c if col_used is None else col_used
        self.obs = pd.concat(frames, axis=0) if len(frames) > 1 else frames[0]
        if not (self.obs[PERT_COL].to_numpy() == CONTROL_LABEL).any():
            labels = pd.unique(self.obs[PERT_COL])[:10]
            msg = (f"{self.sources[0].name}: no control cells labelled {cols_in.control_label!r} in "
                   f"obs[{cols_in.pert_col!r}]; first labels: {', '.join(map(str, labels))}")
            raise InputError(msg)
        self.columns = col_used
        self.offsets = np.cumsum([0] + [s.n_obs for s in self.sources]).astype(np.int64)
        self.name = self.sources[0].name if len(self.sources) == 1 else f"{len(self.sources)} files"

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_files(cls, datasets: Sequence[DatasetFiles], columns: ObsColumns | None = None,
                   genes: Sequence[str] | None = None) -> CellDataset:
        srcs, names = [], []
        for d in datasets:
            for f in d.files:
                srcs.append(H5adSource(f))
                names.append(d.name)
        return cls(srcs, names, columns, genes)

    @classmethod
    def from_path(cls, path: str | os.PathLike[str], columns: ObsColumns | None = None,
                  name: str | None = None) -> CellDataset:
        """A dataset of one location (file, folder or glob)."""
        files = expand_location(path, str(path))
        nm = name or Path(files[0]).name.removesuffix(".h5ad").replace(".", "_")
        return cls.from_files([DatasetFiles(nm, tuple(files))], columns)

    @classmethod
    def from_anndata(cls, adata, columns: ObsColumns | None = None, name: str = "memory") -> CellDataset:
        """An in-memory AnnData (library use and tests)."""
        return cls([MemorySource(adata, f"<AnnData {name}>")], [name], columns)

    # ------------------------------------------------------------------ shape
    @property
    def n_obs(self) -> int:
        return int(self.offsets[-1])

    @property
    def n_vars(self) -> int:
        return len(self.var_names)

    @property
    def files(self) -> list[str]:
        return [s.name for s in self.sources]

    def obsm_keys(self) -> list[str]:
        keys = set(self.sources[0].obsm_keys())
        for s in self.sources[1:]:
            keys &= set(s.obsm_keys())
        return sorted(keys)

    def _split_rows(self, rows: np.ndarray) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """``(source index, positions in rows, local rows)`` for each file touched by ``rows``."""
        rows = np.asarray(rows, dtype=np.int64)
        if rows.size and (rows.min() < 0 or rows.max() >= self.n_obs):
            msg = f"dataset: row index out of range [0, {self.n_obs}): {rows.min()}..{rows.max()}"
            raise InputError(msg)
        if len(self.sources) == 1:
            yield 0, np.arange(rows.size), rows
            return
        k = np.searchsorted(self.offsets, rows, side="right") - 1
        for s in np.unique(k):
            pos = np.flatnonzero(k == s)
            yield int(s), pos, rows[pos] - self.offsets[s]

    # ------------------------------------------------------------------ reads
    def read_rows(self, rows: np.ndarray, obsm_key: str | None = None, check: bool = True) -> Matrix:
        """Raw rows (the aligned genes, or ``obsm[obsm_key]``) as float32 CSR / ndarray, in order.

        ``check``: refuse NaN / infinite / negative values in X (obsm entries are not checked).
        """
        rows = np.asarray(rows, dtype=np.int64)
        parts: list[tuple[np.ndarray, Matrix]] = []
        for s, pos, local in self._split_rows(rows):
            src = self.sources[s]
            block = src.read_rows(local, obsm_key=obsm_key)
            if obsm_key is None:
                if check:
                    check_values(block, src.name, local)
                if not self._identity[s]:
                    block = block[:, self._col_idx[s]]
            parts.append((pos, block))
        return _reassemble(parts, rows.size)

    def read_model(self, rows: np.ndarray, pre, genes_idx: np.ndarray | None = None,
                   dense: bool = True) -> Matrix:
        """Rows in model space: ``pre`` applied with totals over all genes of each cell's file.

        ``pre`` (:class:`~celltwin.data.preprocess.Preprocessing`) selects its genes by name;
        ``genes_idx`` then optionally picks columns of those. Dense float32 (n, len(pre.genes)) by
        default, CSR float32 with ``dense=False``.
        """
        rows = np.asarray(rows, dtype=np.int64)
        parts: list[tuple[np.ndarray, Matrix]] = []
        for s, pos, local in self._split_rows(rows):
            src = self.sources[s]
            if isinstance(src, MemorySource):
                # the data is in memory already: normalise it once (CSR, the size of X) and slice
                full = self._memory_model(pre, s)
                out = full[local] if genes_idx is None else full[local][:, genes_idx]
                parts.append((pos, out))
                continue
            gi = self._pre_index(pre, s)
            cols = gi if genes_idx is None else gi[genes_idx]
            if dense and isinstance(src, H5adSource) and src.x_format == "csr":
                parts.append((pos, self._fused_read(src, local, pre, cols)))
                continue
            block = src.read_rows(local)
            check_values(block, src.name, local)
            out = pre.transform_sparse(block, cols)
            parts.append((pos, out))
        X = _reassemble(parts, rows.size)
        if dense:
            return X.toarray() if sp.issparse(X) else np.ascontiguousarray(X, dtype=np.float32)
        return sp.csr_matrix(X) if not sp.issparse(X) else X

    @staticmethod
    def _fused_read(src: H5adSource, local: np.ndarray, pre, cols: np.ndarray) -> np.ndarray:
        """Dense model-space rows straight from the stored CSR pieces (:mod:`celltwin.data._fused`).

        Bitwise the result of ``pre.transform(src.read_rows(local), cols)`` for files whose column
        indices are sorted within each row (anndata writes them so); about 2-3x faster, which is
        what keeps ST's disk reads off the critical path.
        """
        from celltwin.data._fused import csr_to_model_dense

        uniq, inverse = np.unique(local, return_inverse=True)
        data, indices, indptr = src.read_csr_parts(uniq)
        if data.dtype != np.float32:
            data = data.astype(np.float32)  # as read_rows: every read is float32
        if data.size and not (np.isfinite(data).all() and data.min() >= 0):
            block = sp.csr_matrix((data, indices, indptr), shape=(uniq.size, src.n_vars))
            check_values(block, src.name, uniq)
        colmap = np.full(src.n_vars, -1, dtype=np.int64)
        colmap[cols] = np.arange(cols.size)
        return csr_to_model_dense(data, indices, indptr, inverse, colmap, cols.size, pre.target_sum, pre.log1p)

    def _memory_model(self, pre, s: int) -> sp.csr_matrix:
        cache = self.__dict__.setdefault("_mem_cache", {})
        key = (id(pre), s)
        if key not in cache:
            src = self.sources[s]
            block = src.read_rows(np.arange(src.n_obs))
            check_values(block, src.name, np.arange(src.n_obs))
            cache.clear()
            cache[key] = sp.csr_matrix(pre.transform_sparse(block, self._pre_index(pre, s)), dtype=np.float32)
        return cache[key]

    def _pre_index(self, pre, s: int) -> np.ndarray:
        cache = self.__dict__.setdefault("_pre_cache", {})
        key = (id(pre), s)
        if key not in cache:
            cache[key] = pre.gene_index(self.sources[s].var_names, self.sources[s].name)
        return cache[key]

    def library_sizes(self, rows: np.ndarray | None = None, chunk_size: int = 4096) -> np.ndarray:
        """Total counts per cell (float64) over *all* genes of its own file, streamed."""
        rows = np.arange(self.n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
        out = np.empty(rows.size, dtype=np.float64)
        for start in range(0, rows.size, chunk_size):
            r = rows[start:start + chunk_size]
            for s, pos, local in self._split_rows(r):
                block = self.sources[s].read_rows(local)
                check_values(block, self.sources[s].name, local)
                out[start + pos] = (np.asarray(block.sum(axis=1, dtype=np.float64)).ravel() if sp.issparse(block)
                                    else np.asarray(block, np.float64).sum(1))
        return out

    def labels(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(perturbation, context, batch)`` string arrays of every cell."""
        o = self.obs
        return (o[PERT_COL].to_numpy(dtype=object), o[CONTEXT_COL].to_numpy(dtype=object),
                o[BATCH_COL].to_numpy(dtype=object))

    def close(self) -> None:
        for s in self.sources:
            s.close()

    def __repr__(self) -> str:
        return f"CellDataset({self.name!r}, n_obs={self.n_obs}, n_vars={self.n_vars})"


def _reassemble(parts: list[tuple[np.ndarray, Matrix]], n: int) -> Matrix:
    if len(parts) == 1 and np.array_equal(parts[0][0], np.arange(n)):
        return parts[0][1]
    order = np.empty(n, dtype=np.int64)
    if not parts:
        return sp.csr_matrix((0, 0), dtype=np.float32)
    blocks = [b for _, b in parts]
    order[np.concatenate([p for p, _ in parts])] = np.arange(n)
    if any(sp.issparse(b) for b in blocks):
        X = sp.vstack([sp.csr_matrix(b) for b in blocks], format="csr")
    else:
        X = np.vstack(blocks)
    return X[order]
