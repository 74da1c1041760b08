"""Model-space preprocessing: normalize_total + log1p in float32, on a persisted gene list.

The rule (see docs/ARCHITECTURE.md): a counts file is mapped to
``log1p(x / total(x) * T)`` with ``T`` the median library size of the fitting cells (the rule
``scanpy.pp.normalize_total`` applies to a CSR counts matrix, and so the VCC evaluator's) or a fixed
target. Totals are taken over *all* genes of the file before any gene subsetting, in float64; the
scale factor ``T / total`` is float64 and the product is rounded once to float32, then log1p is
taken in float32. Cells with zero total stay all-zero. A file that is already log-normalised
(non-integer values) is passed through unchanged (``target_sum=None``).

:class:`Preprocessing` is what a run stores: ``preprocess.json`` plus ``genes.txt`` (the model's
gene order, one per line) next to every artefact.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin._io import atomic_path
from celltwin.data.source import Matrix, iter_row_chunks, open_source
from celltwin.errors import ConfigError, InputError

__all__ = [
    "Preprocessing",
    "fit_preprocessing",
    "library_sizes",
    "looks_like_counts",
    "median_library_size",
    "normalize_log1p",
    "read_genes_txt",
    "sample_counts",
    "write_genes_txt",
]


def _row_sums(block: Matrix) -> np.ndarray:
    if sp.issparse(block):
        return np.asarray(block.sum(axis=1, dtype=np.float64)).ravel()
    return np.asarray(block, dtype=np.float64).sum(axis=1)


def library_sizes(data, rows: np.ndarray | None = None, chunk_size: int = 4096) -> np.ndarray:
    """Total counts per cell (float64) over all genes, streamed in chunks of rows."""
    src = open_source(data)
    if hasattr(src, "library_sizes"):  # CellDataset: totals over all genes of each cell's own file
        return src.library_sizes(rows, chunk_size)
    parts = [_row_sums(b) for _, b in iter_row_chunks(src, rows, chunk_size)]
    return np.concatenate(parts) if parts else np.zeros(0)


def median_library_size(data, rows: np.ndarray | None = None, chunk_size: int = 4096) -> float:
    """Median of the per-cell totals over ``rows`` (all cells by default), zero-total cells included.

    This is ``scanpy.pp.normalize_total``'s default target for a CSR matrix (for a dense matrix
    scanpy takes the median over cells with non-zero total; the two agree when no cell is empty).
    """
    totals = library_sizes(data, rows, chunk_size)
    if totals.size == 0:
        raise InputError("median_library_size: no cells selected")
    return float(np.median(totals))


def looks_like_counts(data, n_rows: int = 2000, seed: int = 0) -> bool:
    """True if a random sample of up to ``n_rows`` cells holds only non-negative integers."""
    src = open_source(data)
    rng = np.random.default_rng(seed)
    if hasattr(src, "sources"):  # CellDataset: every file must hold counts
        return all(looks_like_counts(s, n_rows, seed) for s in src.sources)
    n = min(n_rows, src.n_obs)
    rows = np.sort(rng.choice(src.n_obs, size=n, replace=False)) if n < src.n_obs else np.arange(n)
    block = src.read_rows(rows)
    vals = block.data if sp.issparse(block) else np.asarray(block).ravel()
    return bool(vals.size == 0 or (vals.min() >= 0 and np.all(vals == np.round(vals))))


def normalize_log1p(
    block: Matrix, target_sum: float | None, log1p: bool = True, totals: np.ndarray | None = None
) -> Matrix:
    """``log1p(block / totals * target_sum)`` as float32 (CSR stays CSR, dense stays dense).

    ``totals`` defaults to the row sums of ``block``; pass the full-gene totals when ``block`` is
    already a gene subset. ``target_sum=None`` skips the scaling; ``log1p=False`` skips the log.
    """
    if target_sum is not None:
        tot = _row_sums(block) if totals is None else np.asarray(totals, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(tot > 0, target_sum / tot, 0.0)  # float64
        if sp.issparse(block):
            b = sp.csr_matrix(block, dtype=np.float64)
            b = sp.csr_matrix(sp.diags(scale) @ b, dtype=np.float32)
        else:
            b = (np.asarray(block, dtype=np.float64) * scale[:, None]).astype(np.float32)
    else:
        b = (
            sp.csr_matrix(block, dtype=np.float32)
            if sp.issparse(block)
            else np.asarray(block, dtype=np.float32)
        )
    if log1p:
        if sp.issparse(b):
            b = b.copy()
            np.log1p(b.data, out=b.data)
        else:
            b = np.log1p(b)
    return b


def write_genes_txt(path: str | os.PathLike[str], genes: list[str]) -> None:
    """Write one gene per line, atomically."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text("".join(f"{g}\n" for g in genes), encoding="utf-8")


def read_genes_txt(path: str | os.PathLike[str]) -> list[str]:
    """Read a ``genes.txt`` (one gene per line; blank lines ignored)."""
    p = Path(path)
    if not p.exists():
        msg = f"{p}: gene list not found"
        raise InputError(msg)
    return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]


@dataclass
class Preprocessing:
    """The preprocessing a run applies to every cell, with the gene list it was fitted on.

    Attributes
    ----------
    genes
        Model genes in model order (a subset of the data's var names, in the file's order).
    target_sum
        normalize_total target; ``None`` means the input is already in model space (passed through).
    log1p
        Apply log1p after scaling (always True for count input).
    source_n_vars
        Number of genes of the fitting file (informative).
    hvg
        How genes were chosen: ``{"flavor": "seurat_v3", "n_top_genes": N, "batch_key": B}`` or ``{}``.
    """

    genes: list[str]
    target_sum: float | None
    log1p: bool = True
    source_n_vars: int = 0
    hvg: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(set(self.genes)) != len(self.genes):
            raise ConfigError("Preprocessing.genes: gene names must be unique")
        if self.target_sum is not None and not self.target_sum > 0:
            msg = f"Preprocessing.target_sum: expected > 0 or None, got {self.target_sum}"
            raise ConfigError(msg)

    def gene_index(self, var_names, where: str = "data") -> np.ndarray:
        """Column indices of :attr:`genes` in ``var_names``; InputError listing missing genes."""
        pos = {str(g): i for i, g in enumerate(var_names)}
        missing = [g for g in self.genes if g not in pos]
        if missing:
            shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
            msg = (
                f"{where}: {len(missing)} of the run's {len(self.genes)} genes are not in var_names: {shown}"
            )
            raise InputError(msg)
        return np.array([pos[g] for g in self.genes], dtype=np.int64)

    def transform(self, block: Matrix, gene_idx: np.ndarray | None) -> np.ndarray:
        """Normalise a block of raw rows (all file genes) and return dense float32 (n, len(genes)).

        Totals are computed over all genes of ``block`` before selecting ``gene_idx``.
        """
        out = self.transform_sparse(block, gene_idx)
        return out.toarray() if sp.issparse(out) else np.ascontiguousarray(out)

    def transform_sparse(self, block: Matrix, gene_idx: np.ndarray | None) -> Matrix:
        """As :meth:`transform`, but a CSR block stays CSR (float32); dense stays dense."""
        out = normalize_log1p(block, self.target_sum, self.log1p)
        if gene_idx is not None and not (gene_idx.size == out.shape[1]
                                         and np.array_equal(gene_idx, np.arange(out.shape[1]))):
            out = out[:, gene_idx]
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "target_sum": self.target_sum,
            "log1p": self.log1p,
            "n_genes": len(self.genes),
            "source_n_vars": self.source_n_vars,
            "hvg": self.hvg,
        }

    def save(self, run_dir: str | os.PathLike[str]) -> None:
        """Write ``preprocess.json`` and ``genes.txt`` into ``run_dir`` (atomically)."""
        d = Path(run_dir)
        d.mkdir(parents=True, exist_ok=True)
        write_genes_txt(d / "genes.txt", self.genes)
        with atomic_path(d / "preprocess.json") as tmp:
            Path(tmp).write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, run_dir: str | os.PathLike[str]) -> Preprocessing:
        d = Path(run_dir)
        p = d / "preprocess.json"
        if not p.exists():
            msg = f"{p}: not found (a run directory needs preprocess.json and genes.txt)"
            raise InputError(msg)
        meta = json.loads(p.read_text(encoding="utf-8"))
        genes = read_genes_txt(d / "genes.txt")
        if meta.get("n_genes", len(genes)) != len(genes):
            msg = f"{d / 'genes.txt'}: has {len(genes)} genes, preprocess.json says {meta['n_genes']}"
            raise InputError(msg)
        return cls(
            genes=genes,
            target_sum=meta["target_sum"],
            log1p=bool(meta["log1p"]),
            source_n_vars=int(meta.get("source_n_vars", 0)),
            hvg=dict(meta.get("hvg", {})),
        )


def fit_preprocessing(
    data,
    rows: np.ndarray | None = None,
    target_sum: float | str | None = "median",
    n_top_genes: int | None = None,
    hvg_batch_key: str | None = None,
    genes: list[str] | None = None,
    counts: bool | None = None,
) -> Preprocessing:
    """Fit the preprocessing on ``rows`` of ``data`` (the training cells).

    Parameters
    ----------
    target_sum
        ``"median"`` (median library size of ``rows``), a number, or ``None`` (no scaling).
    n_top_genes
        Keep the seurat_v3 highly variable genes (computed on the raw X of ``rows``); None keeps all.
    genes
        An explicit gene list (overrides ``n_top_genes``).
    counts
        Whether X holds counts; ``None`` detects it (:func:`looks_like_counts`). Non-count input is
        passed through (``target_sum=None, log1p=False``).
    """
    src = open_source(data)
    is_counts = looks_like_counts(src) if counts is None else counts
    hvg_meta: dict[str, Any] = {}
    if genes is not None:
        chosen = [str(g) for g in genes]
    elif n_top_genes is not None and n_top_genes < src.n_vars:
        from celltwin.data.hvg import highly_variable_genes, select_hvg

        table = highly_variable_genes(src, n_top_genes, batch_key=hvg_batch_key, rows=rows)
        chosen = select_hvg(table)
        hvg_meta = {"flavor": "seurat_v3", "n_top_genes": int(n_top_genes), "batch_key": hvg_batch_key}
    else:
        chosen = [str(g) for g in src.var_names]
    if not is_counts:
        ts, lg = None, False
    elif target_sum == "median":
        ts, lg = median_library_size(src, rows), True
        if ts <= 0:
            msg = f"{src.name}: median library size is {ts}; cannot normalise"
            raise InputError(msg)
    elif target_sum is None:
        ts, lg = None, True
    elif isinstance(target_sum, str):
        msg = f"target_sum: expected 'median', a number or None, got {target_sum!r}"
        raise ConfigError(msg)
    else:
        ts, lg = float(target_sum), True
    pre = Preprocessing(genes=chosen, target_sum=ts, log1p=lg, source_n_vars=src.n_vars, hvg=hvg_meta)
    pre.gene_index(src.var_names, src.name)  # validates the explicit list
    return pre


def sample_counts(
    log1p_mean: np.ndarray,  # (n, G) predicted cells in log1p(normalize_total) space
    library_size: np.ndarray | float,  # (n,) or scalar: total counts of the cells to draw
    target_sum: float,  # the T of the model space
    rng: np.random.Generator,
    dist: str = "poisson",
    theta: float | np.ndarray = 10.0,  # NB inverse dispersion, scalar or per gene (G,)
) -> np.ndarray:
    """Draw integer counts (n, G) whose mean is the predicted expression mapped back to counts.

    ``mu = expm1(log1p_mean) * library_size / target_sum``; Poisson(mu), or negative binomial
    with mean mu and variance ``mu + mu^2 / theta`` (drawn as Poisson(mu * Gamma(theta, 1/theta))).
    Computed in float64 (precision choice: float32 rates lose integers above 2^24).
    """
    if dist not in ("poisson", "nb"):
        raise ConfigError(f"sample_counts: dist must be 'poisson' or 'nb', got {dist!r}")
    mu = np.clip(np.expm1(np.asarray(log1p_mean, dtype=np.float64)), 0, None)
    lib = np.asarray(library_size, dtype=np.float64)
    mu = mu * (lib[:, None] if lib.ndim == 1 else lib) / float(target_sum)
    if dist == "nb":
        th = np.broadcast_to(np.asarray(theta, dtype=np.float64), mu.shape)
        mu = mu * rng.gamma(th, 1.0 / th)
    return rng.poisson(mu).astype(np.int64)
