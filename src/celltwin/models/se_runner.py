"""Fit / transform glue for the State Embedding model (``celltwin embed fit|transform``).

* :func:`fit_state_embedding` reads an ``.h5ad`` lazily (:mod:`celltwin.data.source`), builds
  the gene vectors (a table aligned through HGNC, or learned vectors when no table is given),
  and trains :class:`~celltwin.models.state_embedding.StateEmbeddingModel` with the shared
  loop (:func:`celltwin.train.fit`: DDP, resume, checkpoints, metrics). The run directory
  gets the model files of ``save_pretrained`` plus ``run.json`` (with the provenance of
  :func:`celltwin._provenance.run_provenance`) and the loop's ``checkpoints/``, ``metrics.csv``
  and ``loss.png``. Re-running the same fit resumes from the checkpoint
  exactly (batches are a function of ``(seed, epoch, rank)``, the model's random masks come from
  the torch RNG the loop checkpoints); a checkpoint of a different fit (other data file, cells,
  preprocessing, gene vectors or options: :func:`_fit_fingerprint`) is refused.
* Embedding cells with a fitted model (``transform``, ``embed_cells``, ``embed_rows``) lives in
  :mod:`celltwin.models.se_embed`.
* :func:`fit_se`: a fit from :class:`~celltwin.models.se_options.SEOptions` (the command and
  ``SEModel.train`` build their configurations the same way).

Model space: the shared rule of :mod:`celltwin.data.preprocess` (counts ->
``log1p(normalize_total(x, T))`` with T the median library size of the training cells, totals
over all genes of the file; non-integer X passed through), optionally on the top
``n_top_genes`` highly variable genes. It is saved as ``preprocess.json`` in the model
directory and applied identically at transform time.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from celltwin import __version__
from celltwin._io import atomic_path
from celltwin.data.dataset import check_values
from celltwin.errors import ConfigError, InputError
from celltwin.models.state_embedding import StateEmbeddingConfig, StateEmbeddingModel

__all__ = ["MODEL_NAME", "SEFitResult", "fit_se", "fit_state_embedding"]

MODEL_NAME = "state_embedding"


@dataclass
class SEFitResult:
    """What :func:`fit_state_embedding` returns."""

    model: StateEmbeddingModel
    train: object  # celltwin.train.TrainResult
    coverage: object | None  # celltwin.genes.GeneCoverage, None without a gene table
    preprocess: object  # celltwin.data.preprocess.Preprocessing
    gene_source: str  # human-readable description of the gene vectors used


def _gene_vectors(
    genes: list[str],
    gene_table: str | Path | None,
    hgnc: str | Path | None,
    gene_list: str | Path | None,
    gene_dim: int,
):
    from celltwin.genes import HgncIndex, align_gene_table, load_gene_table

    if gene_table is None:
        msg = (
            f"no gene embedding table given: every gene gets a learned {gene_dim}-d vector "
            f"(random init, trained with the model; no protein-language-model information)"
        )
        return np.zeros((len(genes), gene_dim), np.float32), np.zeros(len(genes), bool), None, msg
    table = load_gene_table(gene_table, gene_list)
    index = HgncIndex.from_tsv(hgnc) if hgnc is not None else None
    vec, found, cov = align_gene_table(table, genes, index)
    if cov.found == 0:
        msg = (
            f"gene table {gene_table}: none of the {len(genes)} data genes has a vector (names do not match)"
        )
        raise InputError(msg)
    msg = (
        f"gene vectors from {gene_table} ({table.dim}-d); {cov.summary()}; missing genes get learned vectors"
    )
    return vec, found, cov, msg


def _dataset_labels(source, dataset_key: str | None, rows: np.ndarray) -> tuple[list[str], np.ndarray]:
    if dataset_key is None:
        return [Path(source.name).stem or "default"], np.zeros(source.n_obs, dtype=np.int64)
    if dataset_key not in source.obs.columns:
        msg = (
            f"{source.name}: obs has no column {dataset_key!r} (--dataset-key); "
            f"columns: {list(source.obs.columns)}"
        )
        raise InputError(msg)
    vals = source.obs[dataset_key].astype(str).to_numpy()
    names = sorted(set(vals[rows]))
    lut = {n: i for i, n in enumerate(names)}
    return names, np.array([lut.get(v, len(names)) for v in vals], dtype=np.int64)


class _CellBatches:
    """Shuffled mini-batches of training cells, a pure function of (seed, epoch, rank).

    Rows of each batch are read lazily from the source and converted to model space.
    In DDP each rank takes every ``world_size``-th batch (equal counts: the tail is dropped).
    """

    def __init__(
        self,
        source,
        rows: np.ndarray,
        ds: np.ndarray,
        prep,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.source, self.rows, self.ds, self.prep = source, rows, ds, prep
        self.gene_idx = prep.gene_index(source.var_names, source.name)
        self.batch_size, self.seed, self.rank, self.world = batch_size, seed, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return max(1, len(self.rows) // self.batch_size // self.world)

    def _perm(self, epoch: int) -> np.ndarray:
        cache = getattr(self, "_perm_cache", None)
        if cache is None or cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            cache = (epoch, self.rows[rng.permutation(len(self.rows))])
            self._perm_cache = cache
        return cache[1]

    def __iter__(self):
        for b in range(len(self)):
            yield self[(self.epoch, b)]

    def __getitem__(self, key: tuple[int, int]) -> dict:
        """Batch ``b`` of ``epoch`` (a pure function of seed, epoch, rank and b; DataLoader workers)."""
        epoch, b = key
        perm = self._perm(int(epoch))
        k = int(b) * self.world + self.rank
        idx = perm[k * self.batch_size : (k + 1) * self.batch_size]
        if idx.size == 0:
            idx = perm[: self.batch_size]
        if hasattr(self.source, "read_model"):  # CellDataset: totals over each file's own genes, checked
            x = self.source.read_model(idx, self.prep)  # (B, G) model space
        else:
            raw = self.source.read_rows(idx)
            check_values(raw, self.source.name, idx)  # NaN / inf / negative values are refused
            x = self.prep.transform(raw, self.gene_idx)  # (B, G) model space
        return {"x": torch.from_numpy(x), "ds": torch.from_numpy(self.ds[idx])}


class _EpochBatches(torch.utils.data.Sampler):
    """``(epoch, 0), (epoch, 1), ...`` for the batches' current epoch (DataLoader sampler)."""

    def __init__(self, batches: _CellBatches) -> None:
        self.batches = batches

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        e = self.batches.epoch
        return iter([(e, b) for b in range(len(self.batches))])


def _batch_loader(batches: _CellBatches, num_workers: int):
    """The batches in-process (``num_workers=0``) or read by DataLoader worker processes.

    Either way the batch sequence is the same (each batch is a pure function of its index), so
    the weights do not depend on ``num_workers`` and resume stays exact.
    """
    if num_workers <= 0:
        return batches
    from torch.utils.data import DataLoader

    # the loop calls set_epoch on the dataset (the batches) before each epoch
    return DataLoader(batches, batch_size=None, sampler=_EpochBatches(batches), num_workers=num_workers,
                      prefetch_factor=4, worker_init_fn=_one_thread)


def _one_thread(_worker_id: int) -> None:
    torch.set_num_threads(1)  # a reading worker never competes with the training threads


def _digest(*parts: bytes) -> str:
    h = hashlib.blake2b(digest_size=16)
    for part in parts:
        h.update(len(part).to_bytes(8, "little"))
        h.update(part)
    return h.hexdigest()


def _fit_fingerprint(
    data,
    source,
    rows: np.ndarray,
    prep,
    config: StateEmbeddingConfig,
    files: dict[str, str | Path | None],
    options: dict,
) -> dict:
    """What makes an SE fit this fit: resume refuses a checkpoint whose fingerprint differs.

    * ``data``: :func:`celltwin.train.file_fingerprint` of the ``.h5ad`` (size, mtime, hash of its
      ends); for an in-memory AnnData, its shape and a hash of its gene names (its values are not
      hashed: a resumed in-memory fit trusts the caller).
    * ``rows``: how many training cells and a hash of their indices (e.g. a split's training cells).
    * ``preprocess``: the model-space rule (target sum, log1p, genes, HVG selection), hashed.
    * ``model``: the SE config; ``files``: fingerprints of the gene table, gene list and HGNC table;
      ``options``: gene_dim, dataset_key, n_top_genes, batch_size (all change the result).
    The optimiser settings (lr, betas, weight decay, clipping, seed) are checked by the loop itself.
    """
    from celltwin.train import file_fingerprint

    if isinstance(data, str | os.PathLike):
        data_fp: dict = file_fingerprint(data)
    elif hasattr(source, "files") and all(Path(f).exists() for f in source.files):  # a CellDataset of files
        data_fp = {"files": [file_fingerprint(f) for f in source.files]}
    else:
        names = "\n".join(map(str, source.var_names)).encode()
        data_fp = {"in_memory": [int(source.n_obs), int(source.n_vars)], "var_names": _digest(names)}
    rows64 = np.ascontiguousarray(rows, dtype=np.int64)
    prep_desc = json.dumps(prep.to_dict(), sort_keys=True, default=str).encode()
    genes = "\n".join(map(str, prep.genes)).encode()
    return {
        "data": data_fp,
        "rows": {"n": int(rows64.size), "blake2b": _digest(rows64.tobytes())},
        "preprocess": {"n_genes": len(prep.genes), "blake2b": _digest(prep_desc, genes)},
        "model": json.loads(json.dumps(asdict(config), default=str)),
        "files": {k: (None if v is None else file_fingerprint(v)) for k, v in sorted(files.items())},
        "options": options,
    }


def fit_state_embedding(
    data: str | Path,
    out_dir: str | Path,
    *,
    config: StateEmbeddingConfig,
    train_config,
    gene_table: str | Path | None = None,
    hgnc: str | Path | None = None,
    gene_list: str | Path | None = None,
    gene_dim: int = 64,
    dataset_key: str | None = None,
    n_top_genes: int | None = None,
    cells: np.ndarray | None = None,
    batch_size: int = 32,
    log: Callable[[str], None] = print,
    num_workers: int = 0,
) -> SEFitResult:
    """Train an SE model on ``data`` (an ``.h5ad`` path or AnnData) and save it to ``out_dir``.

    ``cells``: row indices to train on (default all; e.g. a training split). ``train_config``:
    a :class:`celltwin.train.TrainConfig` (its ``out_dir`` is set to ``out_dir``).
    ``gene_dim`` is only used without a gene table; ``n_top_genes`` restricts the vocabulary to
    the highly variable genes of the training cells. ``log`` receives human-readable notes.
    """
    from celltwin._provenance import utc_now
    from celltwin.data.preprocess import fit_preprocessing
    from celltwin.data.source import open_source
    from celltwin.train import fit, init_distributed, seed_everything

    started_at = utc_now()

    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    info = init_distributed(train_config.device)
    if not info.is_main:  # one voice under torchrun: only rank 0 reports

        def log(_msg: str) -> None:
            return None

    source = open_source(data)
    rows = np.arange(source.n_obs) if cells is None else np.asarray(cells, dtype=np.int64)
    if rows.size < 1:
        raise InputError(f"{source.name}: no cells to train on")
    if len(set(map(str, source.var_names))) != source.n_vars:
        raise InputError(f"{source.name}: var_names are not unique")
    prep = fit_preprocessing(source, rows, n_top_genes=n_top_genes)
    genes = list(prep.genes)
    space = (
        f"log1p(normalize_total(X, T={prep.target_sum:.6g}))"
        if prep.target_sum is not None
        else "X as is (already log-normalised)"
    )
    log(f"model space: {space} on {len(genes)} genes")
    vec, found, coverage, note = _gene_vectors(genes, gene_table, hgnc, gene_list, gene_dim)
    log(note)
    datasets, ds = _dataset_labels(source, dataset_key, rows)

    train_config.out_dir = str(out_dir)
    train_config.fingerprint = {**train_config.fingerprint, **_fit_fingerprint(
        data,
        source,
        rows,
        prep,
        config,
        {"gene_table": gene_table, "gene_list": gene_list, "hgnc": hgnc},
        {"gene_dim": gene_dim, "dataset_key": dataset_key, "n_top_genes": n_top_genes, "batch_size": batch_size},
    )}
    seed_everything(train_config.seed)  # identical initial weights on every rank
    model = StateEmbeddingModel(config, genes, vec, found, datasets)
    loader = _batch_loader(_CellBatches(
        source, rows, ds, prep, min(batch_size, rows.size), train_config.seed, info.rank, info.world_size
    ), num_workers)

    def step(m, batch):
        return m(batch["x"], batch["ds"], return_loss=True)

    n_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
    log(
        f"SE model: {n_params:,} trainable parameters, {len(genes)} genes, sentence {model.L} "
        f"(mask {model.n_mask}, +{model.n_query_neg} unexpressed queries), {rows.size} cells, "
        f"batch {batch_size}"
    )
    res = fit(
        model,
        step,
        loader,
        train_config,
        count_fn=lambda b: int(b["x"].shape[0]),
        dist_info=info,
        extra_state={"se_config": asdict(config)},
    )
    model.cpu().eval()
    if info.is_main:
        prep.save(out_dir)
        extra = {
            "preprocess": prep.to_dict(),
            "gene_source": note,
            "data": str(source.name),
            "coverage": coverage.to_dict() if coverage is not None else None,
        }
        model.save_pretrained(out_dir, extra=extra)
        run = {
            "model": MODEL_NAME,
            "celltwin_version": __version__,
            "steps": res.step,
            "cells_per_s": res.items_per_s,
            "precision": res.precision,
            "last_losses": res.last_losses,
        }
        from celltwin._provenance import run_provenance

        files = ([("data", os.fspath(data))] if isinstance(data, str | os.PathLike)
                 else [("data", str(f)) for f in getattr(data, "files", [])])
        files += [(f"option {k}", os.fspath(v)) for k, v in
                  (("gene_table", gene_table), ("hgnc", hgnc), ("gene_list", gene_list)) if v]
        run.update(run_provenance(started_at=started_at, device=res.device, precision=res.precision, files=files))
        with atomic_path(Path(out_dir) / "run.json") as tmp:
            tmp.write_text(json.dumps(run, indent=2) + "\n")
    return SEFitResult(model, res, coverage, prep, note)


def fit_se(data, out_dir: str | Path, options, *, seed: int = 0, cells: np.ndarray | None = None,
           dataset_key: str | None = None, log: Callable[[str], None] = print) -> SEFitResult:
    """Fit an SE model with :class:`~celltwin.models.se_options.SEOptions` (``celltwin embed fit``, ``SEModel.train``).

    ``data``: an ``.h5ad`` path, an AnnData or a source; ``num_workers=-1`` reads in the training
    process for in-memory data and with one worker for a file.
    """
    cfg, tcfg = options.configs(seed)
    in_memory = not isinstance(data, str | os.PathLike)
    workers = options.num_workers if options.num_workers >= 0 else (0 if in_memory else 1)
    return fit_state_embedding(
        data, out_dir, config=cfg, train_config=tcfg, gene_table=options.genes or None, hgnc=options.hgnc or None,
        gene_list=options.gene_list or None, gene_dim=options.gene_dim, dataset_key=dataset_key,
        n_top_genes=options.n_top_genes or None, cells=cells, batch_size=options.batch_size, log=log,
        num_workers=workers)
