"""The simulator's output: a drawn screen as AnnData in memory, or streamed to an ``.h5ad`` file.

:func:`obs_var_uns` builds the obs / var tables and ``uns[SIM_UNS_KEY]`` (layout in :mod:`celltwin.sim`);
:func:`to_anndata` collects the count blocks of :func:`celltwin.sim_draw.iter_blocks` into one CSR
matrix; :func:`write_h5ad` appends them block by block to an on-disk CSR, so only one dense block is
ever held. Both give the same matrix.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from celltwin._constants import (
    BATCH_COL,
    CONTEXT_COL,
    CONTROL_LABEL,
    GUIDE_COL,
    PERT_COL,
    SIM_UNS_KEY,
)
from celltwin.sim_draw import CellTable, SimTruth, effect_normalized, iter_blocks

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    import pandas as pd

    from celltwin.sim import SimConfig

__all__ = ["SIM_VERSION", "csr_from_dense", "obs_var_uns", "to_anndata", "write_h5ad"]

SIM_VERSION = 1


def obs_var_uns(
    cfg: SimConfig, truth: SimTruth, cells: CellTable
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """obs (perturbation, guide, batch, context), var (``gene_id``) and uns (the ground truth) of a screen."""
    import pandas as pd

    perts = np.array([CONTROL_LABEL] + truth.perturbations, dtype=object)
    tg = perts[cells.pert + 1]
    guide = np.array([f"{t}_g{g + 1}" for t, g in zip(tg, cells.guide, strict=True)], dtype=object)
    guide_cats = [f"{t}_g{g + 1}" for t in perts for g in range(cfg.n_guides)]
    N = cells.pert.size
    width = max(6, len(str(N)))
    obs = pd.DataFrame(
        {
            PERT_COL: pd.Categorical(tg, categories=list(perts)),
            GUIDE_COL: pd.Categorical(guide, categories=guide_cats),
            BATCH_COL: pd.Categorical(
                np.array(truth.batches, dtype=object)[cells.batch], categories=truth.batches
            ),
            CONTEXT_COL: pd.Categorical(
                np.array(truth.contexts, dtype=object)[cells.context], categories=truth.contexts
            ),
        },
        index=pd.Index([f"cell_{i:0{width}d}" for i in range(N)]),
    )
    var = pd.DataFrame({"gene_id": truth.gene_ids}, index=pd.Index(truth.genes))
    # baseline composition per context, averaged over batches, without cell state
    lb = truth.log_base[:, None, :] + truth.batch_effect[None, :, :]  # (C, B, G)
    lb = lb - lb.max(axis=2, keepdims=True)
    q = np.exp(lb)
    q /= q.sum(axis=2, keepdims=True)
    base = np.log(q.mean(axis=1)).astype(np.float32)
    effect_norm = effect_normalized(cfg, truth)
    uns = {
        SIM_UNS_KEY: {
            "version": SIM_VERSION,
            "seed": int(cfg.seed),
            "config_json": cfg.to_json(),
            "contexts": np.array(truth.contexts, dtype=object),
            "perturbations": np.array(truth.perturbations, dtype=object),
            "effect": truth.effect,
            "effect_normalized": effect_norm,
            "effect_class": np.array(truth.effect_class, dtype=object),
            "target_index": truth.target_index,
            "base_log_mean": base,
        }
    }
    return obs, var, uns


def csr_from_dense(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data float32, indices int32, row nnz int64) of a dense count block, row-major order."""
    rows, cols = np.nonzero(x)
    return x[rows, cols].astype(np.float32), cols.astype(np.int32), np.bincount(rows, minlength=x.shape[0])


def to_anndata(
    cfg: SimConfig, truth: SimTruth, cells: CellTable, progress: Callable[[int, int], None] | None = None
) -> ad.AnnData:
    """The screen in memory: CSR float32 counts, obs, var and uns (``progress(done, total)`` after each block)."""
    import anndata as ad
    import scipy.sparse as sp

    datas, idxs, nnz = [], [], []
    N = cells.pert.size
    for _, stop, x in iter_blocks(cfg, truth, cells):
        d, i, r = csr_from_dense(x)
        datas.append(d)
        idxs.append(i)
        nnz.append(r)
        if progress is not None:
            progress(stop, N)
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(nnz))]).astype(np.int64)
    X = sp.csr_matrix((np.concatenate(datas), np.concatenate(idxs), indptr), shape=(N, cfg.n_genes))
    obs, var, uns = obs_var_uns(cfg, truth, cells)
    return ad.AnnData(X=X, obs=obs, var=var, uns=uns)


def write_h5ad(
    cfg: SimConfig,
    truth: SimTruth,
    cells: CellTable,
    path: str | os.PathLike[str],
    progress: Callable[[int, int], None] | None = None,
) -> None:
    """The screen streamed to ``path`` (atomic), one block at a time; same content as :func:`to_anndata`."""
    import h5py
    from anndata.io import write_elem

    from celltwin._io import atomic_path

    N, G = cells.pert.size, cfg.n_genes
    obs, var, uns = obs_var_uns(cfg, truth, cells)
    with atomic_path(path, suffix=".h5ad") as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([N, G], dtype=np.int64)
        chunk = 1 << 16
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(chunk,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(chunk,))
        indptr = np.zeros(N + 1, dtype=np.int64)
        total = 0
        for start, stop, x in iter_blocks(cfg, truth, cells):
            d, i, r = csr_from_dense(x)
            data.resize((total + d.size,))
            indices.resize((total + d.size,))
            data[total:] = d
            indices[total:] = i
            indptr[start + 1 : stop + 1] = total + np.cumsum(r)
            total += d.size
            if progress is not None:
                progress(stop, N)
        g.create_dataset("indptr", data=indptr)
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        write_elem(f, "uns", uns)
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})
