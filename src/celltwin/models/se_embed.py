"""Embedding cells with a State Embedding model (``celltwin embed transform``, ``SEModel``).

* :func:`transform` embeds every cell of an ``.h5ad`` in batches (rows read lazily) and writes
  ``obsm[EMBED_KEY]`` to a new file, atomically.
* :func:`embed_cells` is its loop over cells of any source (also used by
  ``SEModel.get_latent_representation`` on an in-memory AnnData); :func:`embed_rows` embeds
  model-space rows already in memory.

The cells go through the model directory's own preprocessing (``preprocess.json``), so a
transform sees exactly what the fit saw (:mod:`celltwin.models.se_runner`).
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from celltwin._constants import EMBED_KEY
from celltwin._io import atomic_path
from celltwin.errors import ConfigError, InputError
from celltwin.models.state_embedding import StateEmbeddingModel

__all__ = ["embed_cells", "embed_rows", "transform"]


def _pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def embed_rows(
    model: StateEmbeddingModel,
    x: np.ndarray,
    ds: np.ndarray | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Embeddings (n, E) float32 of model-space rows ``x`` (n, G) in the model's gene order."""
    dev = torch.device(device)
    with torch.no_grad():
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).to(dev)
        dt = None if ds is None else torch.from_numpy(np.asarray(ds, dtype=np.int64)).to(dev)
        return model.embed(xt, dt).float().cpu().numpy()


def embed_cells(
    model: StateEmbeddingModel,
    prep,
    source,
    *,
    batch_size: int = 256,
    device: str | torch.device = "auto",
    dataset_key: str | None = None,
    hgnc: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
    where: str | None = None,
) -> np.ndarray:
    """SE embeddings (n, E) float32 of every cell of ``source`` (an ``H5adSource`` or ``MemorySource``).

    The rule of :func:`transform` (which writes them to a file): raw rows read in batches of
    ``batch_size``, normalised with the model's ``prep`` (totals over all the source's genes), the
    model's genes picked by name (through HGNC with ``hgnc``; missing ones fed as 0).
    """
    where = where or source.name
    dev = _pick_device(device) if isinstance(device, str) else device
    model.to(dev)
    col = {g: i for i, g in enumerate(map(str, source.var_names))}
    if hgnc is not None:
        from celltwin.genes import HgncIndex

        index = HgncIndex.from_tsv(hgnc)
        by_sym = {}
        for g, i in col.items():
            sym, _ = index.resolve(g)
            if sym is not None:
                by_sym.setdefault(sym, i)
        lookup = [col.get(g, by_sym.get(index.resolve(g)[0] or "", -1)) for g in model.genes]
    else:
        lookup = [col.get(g, -1) for g in model.genes]
    cols = np.asarray(lookup, dtype=np.int64)
    present = cols >= 0
    if not present.any():
        raise InputError(f"{where}: none of the model's {len(model.genes)} genes is in var_names")
    log(
        f"{int(present.sum())}/{len(model.genes)} model genes found in {where}"
        + ("" if present.all() else "; missing ones are fed as 0 expression")
    )

    ds = np.full(source.n_obs, model.unknown_dataset, dtype=np.int64)
    if dataset_key is not None:
        if dataset_key not in source.obs.columns:
            raise InputError(f"{where}: obs has no column {dataset_key!r} (--dataset-key)")
        lut = {n: i for i, n in enumerate(model.datasets)}
        ds = np.array(
            [lut.get(v, model.unknown_dataset) for v in source.obs[dataset_key].astype(str)], np.int64
        )

    n = source.n_obs
    emb = np.empty((n, model.config.d_out), dtype=np.float32)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        block = prep.transform(source.read_rows(idx), None)  # (b, genes in file), model space
        x = np.zeros((idx.size, len(model.genes)), dtype=np.float32)
        x[:, present] = block[:, cols[present]]
        emb[idx] = embed_rows(model, x, ds[idx], dev)
        if progress is not None:
            progress(int(idx[-1]) + 1, n)
    return emb


def transform(
    model_dir: str | Path,
    data: str | Path,
    out: str | Path,
    *,
    batch_size: int = 256,
    device: str = "auto",
    copy_x: bool = True,
    dataset_key: str | None = None,
    hgnc: str | Path | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = print,
) -> np.ndarray:
    """Write ``out`` = ``data`` + ``obsm[EMBED_KEY]`` (SE embeddings); returns the embeddings (n, E).

    Genes are matched to the model's vocabulary by exact name (then through HGNC when
    ``hgnc`` is given); model genes absent from the data are fed as 0 (reported). With
    ``copy_x`` (default) the output is a byte copy of the input file with the embedding added
    (X, obs, var, layers, other obsm and uns kept, nothing loaded into memory); without it,
    the output has obs, var and ``obsm[EMBED_KEY]`` only (no X). An existing
    ``obsm[EMBED_KEY]`` is replaced. ``dataset_key``: obs column whose values name the
    model's ``[DS]`` tokens (unknown values and no column use the "unknown" token).
    """
    import anndata as ad
    import h5py

    from celltwin.data.preprocess import Preprocessing
    from celltwin.data.source import H5adSource

    model = StateEmbeddingModel.from_pretrained(model_dir)
    data, out = Path(data), Path(out)
    if data.resolve() == out.resolve():
        raise ConfigError(f"output {out} is the input file; write to a new path")
    source = H5adSource(data)
    try:
        if getattr(model, "arch", "celltwin") == "arc-state":  # an imported arc-state SE: its own transform rule
            from celltwin.models.arc_se_embed import embed_source

            if dataset_key is not None:
                raise ConfigError("--dataset-key: an arc-state SE model has one dataset token; leave it out")
            emb = embed_source(model, source, batch_size=batch_size, device=device, hgnc=hgnc, progress=progress,
                               log=log, where=str(data))
        else:
            emb = embed_cells(model, Preprocessing.load(model_dir), source, batch_size=batch_size, device=device,
                              dataset_key=dataset_key, hgnc=hgnc, progress=progress, log=log, where=str(data))
    finally:
        source.close()

    with atomic_path(out) as tmp:
        if copy_x:
            shutil.copyfile(data, tmp)
            with h5py.File(tmp, "r+") as f:
                if "obsm" not in f:
                    ad.io.write_elem(f, "obsm", {})
                if EMBED_KEY in f["obsm"]:
                    del f["obsm"][EMBED_KEY]
                ad.io.write_elem(f["obsm"], EMBED_KEY, emb)
        else:
            with h5py.File(data, "r") as f:
                obs = ad.io.read_elem(f["obs"])
                var = ad.io.read_elem(f["var"])
            ad.AnnData(obs=obs, var=var, obsm={EMBED_KEY: emb}).write_h5ad(tmp)
    return emb
