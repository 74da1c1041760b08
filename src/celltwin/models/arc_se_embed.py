"""arc-state SE models in celltwin's pipelines: loading any SE source, and ``state emb transform`` on files.

* :func:`load_arc_se` loads an arc-state SE model from a directory written by ``celltwin
  import-state`` (``config.json`` with ``"arch": "arc-state"``), an arc-state checkpoint file, a
  folder holding one, a Hugging Face cache folder or a model id in the local cache (through the
  restricted unpickler; nothing is downloaded). ``StateEmbeddingModel.from_pretrained`` calls it
  for anything that is not a celltwin SE directory.
* :func:`embed_source` embeds every cell of a lazily read source (``H5adSource`` /
  ``MemorySource``) the way ``state emb transform`` does: raw rows in batches, genes matched to
  the gene table by name (var_names; through HGNC with ``hgnc``), no normalisation by celltwin (the
  model's own per-cell log rule applies, :mod:`celltwin.models.arc_embedding`).

The cells' order is kept; sentences are built with a seeded generator (only cells expressing
fewer genes than the sentence length draw anything), so repeated calls give the same numbers.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celltwin.errors import ConfigError, InputError

__all__ = ["embed_source", "is_arc_se_dir", "load_arc_se"]


def is_arc_se_dir(path: str | Path) -> bool:
    """A directory written by ``ArcStateEmbedding.save_pretrained`` / ``celltwin import-state``."""
    import json

    cfg = Path(path) / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("arch") == "arc-state"
    except ValueError:
        return False


def load_arc_se(src: str | Path, map_location: str | torch.device = "cpu", *, checkpoint: str | None = None):
    """An :class:`~celltwin.models.arc_embedding.ArcStateEmbedding` from any arc-state SE source (module docstring)."""
    from celltwin.models.arc_embedding import ArcStateEmbedding
    from celltwin.state_import import find_source
    from celltwin.state_import.se import load_se_checkpoint

    p = Path(src)
    if p.is_dir() and is_arc_se_dir(p):
        return ArcStateEmbedding.from_pretrained(p, map_location).eval()
    source = find_source(src, checkpoint)
    if source.kind != "se":
        raise ConfigError(f"{src}: an arc-state ST run, not an SE model; use celltwin.STModel.load or "
                          "`celltwin import-state`")
    model, _ = load_se_checkpoint(source.checkpoint)
    return model.to(map_location).eval()


def _gene_index(model: Any, var_names: list[str], hgnc: str | Path | None) -> np.ndarray:
    idx = model.gene_index(var_names)
    if hgnc is not None:
        from celltwin.genes import HgncIndex

        index = HgncIndex.from_tsv(hgnc)
        pos = {g: i for i, g in enumerate(model.genes)}
        for j in np.flatnonzero(idx < 0):
            sym, _ = index.resolve(var_names[j])
            if sym is not None and sym in pos:
                idx[j] = pos[sym]
    return idx


def embed_source(model: Any, source: Any, *, batch_size: int = 64, device: str | torch.device = "auto",
                 hgnc: str | Path | None = None, progress: Callable[[int, int], None] | None = None,
                 log: Callable[[str], None] = print, where: str | None = None, seed: int = 0) -> np.ndarray:
    """X_state (n, E + 10) float32 of every cell of ``source`` (rows read ``batch_size`` at a time)."""
    where = where or source.name
    dev = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
    model.to(dev)
    names = [str(g) for g in source.var_names]
    gidx = _gene_index(model, names, hgnc)
    found = int((gidx >= 0).sum())
    if found == 0:
        raise InputError(f"{where}: none of the {len(names)} genes (var_names) is in the model's gene table "
                         f"({len(model.genes)} genes, e.g. {', '.join(model.genes[:3])})")
    log(f"{found}/{len(names)} genes of {where} are in the model's gene table of {len(model.genes)}; "
        "the others are not used (as state emb transform)")
    n = source.n_obs
    rng = np.random.default_rng(seed)
    width = model.config.output_dim + model.config.ds_emb_dim
    out = np.empty((n, width), dtype=np.float32)
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        out[idx] = model.embed_rows(source.read_rows(idx), gidx, batch_size=batch_size, rng=rng)
        if progress is not None:
            progress(int(idx[-1]) + 1, n)
    return out
