"""torch ``Dataset`` of cell sets (imports torch; everything else in celltwin.data is numpy-only).

Each item is a dict (default ``collate_fn`` stacks them into a batch of B sets)::

    ctrl         (S, G) float32   matched control cells, model space (or (S, E) from an obsm key)
    pert         (S, G) float32   observed perturbed cells, model space
    pert_idx     ()     int64     id in vocabs.perturbations (full label, e.g. "A+B")
    context_idx  ()     int64     id in vocabs.contexts
    batch_idx    (S,)   int64     id in vocabs.batches of each perturbed cell
    ctrl_batch_idx (S,) int64     id in vocabs.batches of each control cell
    pert_rows, ctrl_rows (S,) int64  global row ids (debugging)
    perturbation, context  str    names (debugging; collate makes lists)

With a ``reader`` (``rows -> {"x": (n, D), "genes": (n, G) or None}``, e.g. the ST runner's
:class:`celltwin.models.st_data.SetReader`) an item is ``ctrl``/``pert`` from ``x`` (input space:
genes, HVGs, an obsm matrix or SE embeddings) plus ``ctrl_genes``/``pert_genes`` (S, G) when the
run decodes to genes; both sides of a set are read in one call.

Workers: the dataset pickles the source's path (not an open HDF5 handle); each worker opens its
own. The plan depends only on (seed, epoch, rank, world_size), so any number of workers yields the
same sets. Call :meth:`CellSetDataset.set_epoch` before iterating a DataLoader for that epoch.
With ``persistent_workers=False`` (the default) workers receive the updated dataset each epoch;
with persistent workers pass ``sampler=ds.epoch_indices()`` so that each index carries its epoch.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch
from torch.utils.data import Dataset, Sampler

from celltwin.data.preprocess import Preprocessing
from celltwin.data.sampler import CellSet, CellSetSampler
from celltwin.data.source import H5adSource, MemorySource
from celltwin.data.vocab import Vocabularies

__all__ = ["CellSetDataset", "EpochIndexSampler"]


class CellSetDataset(Dataset):
    """Map-style dataset over this rank's cell sets of the current epoch.

    Parameters
    ----------
    source
        :class:`~celltwin.data.source.H5adSource` or :class:`~celltwin.data.source.MemorySource`.
    sampler
        :class:`~celltwin.data.sampler.CellSetSampler` (carries seed, rank and world size).
    vocabs
        Vocabularies of the run (perturbation/context/batch ids).
    preprocessing
        Maps raw rows to model space (gene subset + normalize/log1p); ``None`` uses X as stored.
    ctrl_obsm_key
        Read the control side from ``obsm[key]`` (e.g. SE embeddings ``X_state``) instead of X.
    pert_obsm_key
        Also return ``pert_emb`` (S, E) from ``obsm[key]`` for the perturbed cells.
    """

    def __init__(
        self,
        source: H5adSource | MemorySource,
        sampler: CellSetSampler,
        vocabs: Vocabularies,
        preprocessing: Preprocessing | None = None,
        ctrl_obsm_key: str | None = None,
        pert_obsm_key: str | None = None,
        reader=None,
    ) -> None:
        self.reader = reader
        self.source = source
        self.sampler = sampler
        self.vocabs = vocabs
        self.preprocessing = preprocessing
        self.gene_idx = (
            None if (preprocessing is None or reader is not None)
            else preprocessing.gene_index(source.var_names, source.name)
        )
        self.ctrl_obsm_key = ctrl_obsm_key
        self.pert_obsm_key = pert_obsm_key
        lab = sampler.labels
        self._pos = {int(r): i for i, r in enumerate(lab.rows)}
        self._batch_ids = vocabs.batches.encode(lab.batch)

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler)

    def _genes(self, rows: np.ndarray) -> np.ndarray:
        block = self.source.read_rows(rows)
        if self.preprocessing is not None:
            return self.preprocessing.transform(block, self.gene_idx)
        return block.toarray() if sp.issparse(block) else np.asarray(block, dtype=np.float32)

    def _obsm(self, rows: np.ndarray, key: str) -> np.ndarray:
        block = self.source.read_rows(rows, obsm_key=key)
        return block.toarray() if sp.issparse(block) else np.asarray(block, dtype=np.float32)

    def item(self, s: CellSet) -> dict:
        """The tensors of one :class:`CellSet`."""
        if self.reader is not None:
            return self._reader_item(s)
        ctrl = self._obsm(s.ctrl_rows, self.ctrl_obsm_key) if self.ctrl_obsm_key else self._genes(s.ctrl_rows)
        out = {
            "ctrl": torch.from_numpy(np.ascontiguousarray(ctrl, dtype=np.float32)),  # (S, G|E)
            "pert": torch.from_numpy(
                np.ascontiguousarray(self._genes(s.pert_rows), dtype=np.float32)
            ),  # (S, G)
            "pert_idx": torch.tensor(self.vocabs.perturbations[s.perturbation], dtype=torch.long),
            "context_idx": torch.tensor(self.vocabs.contexts[s.context], dtype=torch.long),
            "batch_idx": torch.from_numpy(self._batch_ids[[self._pos[int(r)] for r in s.pert_rows]]),  # (S,)
            "ctrl_batch_idx": torch.from_numpy(self._batch_ids[[self._pos[int(r)] for r in s.ctrl_rows]]),
            "pert_rows": torch.from_numpy(s.pert_rows.astype(np.int64)),
            "ctrl_rows": torch.from_numpy(s.ctrl_rows.astype(np.int64)),
            "perturbation": s.perturbation,
            "context": s.context,
        }
        if self.pert_obsm_key:
            out["pert_emb"] = torch.from_numpy(self._obsm(s.pert_rows, self.pert_obsm_key))
        return out

    def _reader_item(self, s: CellSet) -> dict:
        """Item from ``reader(rows) -> {"x": (n, D), "genes": (n, G) | None}``: one read for both sides."""
        rows = np.concatenate([s.ctrl_rows, s.pert_rows])
        got = self.reader(rows)
        S = s.ctrl_rows.size
        x = torch.from_numpy(np.ascontiguousarray(got["x"], dtype=np.float32))  # (2S, D)
        out = {
            "ctrl": x[:S], "pert": x[S:],
            "pert_idx": torch.tensor(self.vocabs.perturbations[s.perturbation], dtype=torch.long),
            "context_idx": torch.tensor(self.vocabs.contexts[s.context], dtype=torch.long),
            "batch_idx": torch.from_numpy(self._batch_ids[[self._pos[int(r)] for r in s.pert_rows]]),
            "ctrl_batch_idx": torch.from_numpy(self._batch_ids[[self._pos[int(r)] for r in s.ctrl_rows]]),
        }
        if got.get("genes") is not None:
            g = torch.from_numpy(np.ascontiguousarray(got["genes"], dtype=np.float32))  # (2S, G)
            out["ctrl_genes"], out["pert_genes"] = g[:S], g[S:]
        return out

    def __getitem__(self, i: int | tuple[int, int]) -> dict:
        """Set ``i`` of the current epoch, or ``(epoch, i)``: set ``i`` of that epoch."""
        if isinstance(i, tuple):
            epoch, j = i
            return self.item(self.sampler.rank_sets(int(epoch))[int(j)])
        return self.item(self.sampler.rank_sets()[int(i)])

    def epoch_indices(self) -> EpochIndexSampler:
        """A DataLoader ``sampler`` yielding ``(epoch, i)``: works with ``persistent_workers=True``.

        Pass it as ``DataLoader(ds, sampler=ds.epoch_indices(), ...)``; it reads the epoch set by
        :meth:`set_epoch` in the main process each time iteration starts, so long-lived workers
        (which keep their own copy of the dataset) still build the right epoch's sets.
        """
        return EpochIndexSampler(self)


class EpochIndexSampler(Sampler):
    """Yields ``(epoch, 0), (epoch, 1), ...`` for the dataset's current epoch (see ``epoch_indices``)."""

    def __init__(self, dataset: CellSetDataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __iter__(self):
        epoch = self.dataset.sampler.epoch
        return iter([(epoch, i) for i in range(len(self.dataset))])
