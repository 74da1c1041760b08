"""The SE bridge of ST on State Embedding cells: run-space cells -> SE cell embeddings (:class:`SEBridge`).

Normalisation bridge (:class:`SEBridge`): the run's cells are ``log1p(x / total * T_run)`` and
an SE model fitted on counts expects ``log1p(x / total * T_se)``; both totals are over all the
file's genes, so ``log1p(expm1(v) * T_se / T_run)`` converts exactly. When either side was
fitted on already log-normalised data the values are used as they are (recorded in run.json).
SE genes that are not among the run's genes are fed as zero expression, as ``celltwin embed
transform`` does for genes missing from a file; the share found is recorded, and no overlap at
all is an error. Design choice: the predictor embeds the control cells it is given (instead of
reading a precomputed ``obsm["X_state"]``), so ``celltwin predict`` takes the same inputs for
every model and ``--controls`` works unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celltwin.errors import InputError

__all__ = ["SEBridge"]


@dataclass
class SEBridge:
    """Run-space cells -> SE cell embeddings (see the module docstring, "Normalisation bridge").

    ``cols[j]``: column of SE gene j in the run's genes (-1 = absent, fed as 0); ``scale``:
    ``T_se / T_run`` applied as ``log1p(expm1(v) * scale)``, ``None`` = values used as they are.
    """

    model: Any  # celltwin.models.state_embedding.StateEmbeddingModel
    cols: np.ndarray  # (G_se,) int64
    scale: float | None
    note: str = ""
    batch_size: int = 512

    @classmethod
    def build(cls, model: Any, se_dir: Path, run_genes: list[str], run_pre: Any) -> SEBridge:
        from celltwin.data.preprocess import Preprocessing

        pos = {g: i for i, g in enumerate(run_genes)}
        cols = np.array([pos.get(g, -1) for g in model.genes], dtype=np.int64)
        found = int((cols >= 0).sum())
        if found == 0:
            raise InputError(f"SE model {se_dir}: none of its {len(model.genes)} genes is among the run's "
                             f"{len(run_genes)} genes (first run genes: {', '.join(run_genes[:5])})")
        se_pre = Preprocessing.load(se_dir) if (se_dir / "preprocess.json").exists() else None
        t_run = getattr(run_pre, "target_sum", None)
        t_se = getattr(se_pre, "target_sum", None)
        log_ok = getattr(run_pre, "log1p", True) and getattr(se_pre, "log1p", True)
        if t_run is not None and t_se is not None and log_ok:
            scale = None if t_se == t_run else float(t_se) / float(t_run)
            note = f"log1p(expm1(v) * {t_se:.6g} / {t_run:.6g})" if scale is not None else "same normalisation"
        else:
            scale = None
            note = ("values used as they are (the SE model or the run was fitted on log-normalised input, "
                    "e.g. an SE fitted on this run's own cells)")
        note = f"{found}/{len(model.genes)} SE genes found among the run's genes; {note}"
        return cls(model=model, cols=cols, scale=scale, note=note)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_out)

    def __post_init__(self) -> None:
        # row hash -> embedding: prediction draws the same control cells again for every
        # perturbation (and repeat_mean repeats one row), so each distinct cell is embedded once
        self._cache: dict[bytes, np.ndarray] = {}

    @torch.no_grad()
    def embed(self, x: np.ndarray, cache: bool = False) -> np.ndarray:
        """(n, G_run) float32 run space -> (n, E) float32 SE embeddings (batched, eval mode).

        ``cache``: reuse the embedding of rows seen before (keyed by a 128-bit BLAKE2 hash of the
        row's bytes; the SE embedding is deterministic at inference); at most ~1,000,000 kept.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not cache:
            return self._embed_rows(x)
        import hashlib

        if len(self._cache) > 1_000_000:
            self._cache.clear()
        keys = [hashlib.blake2b(x[i].tobytes(), digest_size=16).digest() for i in range(x.shape[0])]
        first: dict[bytes, int] = {}
        todo = [i for i, k in enumerate(keys) if k not in self._cache and first.setdefault(k, i) == i]
        if todo:
            for i, e in zip(todo, self._embed_rows(x[todo]), strict=True):
                self._cache[keys[i]] = e
        return np.stack([self._cache[k] for k in keys]) if keys else np.empty((0, self.dim), np.float32)

    def _embed_rows(self, x: np.ndarray) -> np.ndarray:
        from celltwin.models.se_embed import embed_rows

        m = self.model
        was_training = m.training
        m.eval()
        device = next(m.parameters()).device
        present = self.cols >= 0
        out = np.empty((x.shape[0], self.dim), dtype=np.float32)
        for start in range(0, x.shape[0], self.batch_size):
            blk = x[start:start + self.batch_size]
            v = np.zeros((blk.shape[0], self.cols.size), dtype=np.float32)  # (b, G_se)
            v[:, present] = blk[:, self.cols[present]]
            if self.scale is not None:
                v = np.log1p(np.expm1(v.astype(np.float64)) * self.scale).astype(np.float32)
            out[start:start + blk.shape[0]] = embed_rows(m, v, None, device)
        if was_training:
            m.train()
        return out
