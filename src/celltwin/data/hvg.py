"""Highly variable genes, seurat_v3 flavour, computed in two streaming passes over a source.

Same selection as ``scanpy.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=N,
batch_key=B)`` (scanpy 1.11) on the same matrix, without loading it into memory:

1. Per batch, gene means and unbiased variances (ddof=1) from float64 sums of x and x**2
   (``var = (E[x^2] - E[x]^2) * n / (n - 1)``, scanpy's dense formula). For counts the sums are
   exact integers, so the result does not depend on the chunk size; this matters because the
   LOESS fit below is sensitive to the last bit of tied means.
2. Per batch, a degree-2 LOESS (``skmisc.loess``, span 0.3) of log10(variance) on log10(mean)
   over the genes with variance > 0; the fitted value gives the expected standard deviation
   ``reg_std = sqrt(10**fit)`` (genes with zero variance get ``fit = 0``, ``reg_std = 1``).
3. Second pass: values are clipped at ``mean + reg_std * sqrt(n_cells_in_batch)``; with the sums
   of the clipped values and of their squares, the standardised variance is
   ``(n mean^2 + sum(clip^2) - 2 mean sum(clip)) / ((n - 1) reg_std^2)``.
4. Per batch, genes are ranked by decreasing standardised variance (rank 0 = most variable;
   ties are broken exactly as ``np.argsort`` (quicksort) breaks them, as scanpy does). A gene's
   ``highly_variable_rank`` is the median of its ranks over the batches where it ranks in the top
   ``n_top_genes`` (NaN when none); ``highly_variable_nbatches`` counts those batches.
5. Genes are sorted by rank (ascending, NaN last), then by nbatches (descending), with pandas'
   stable multi-key sort; the first ``n_top_genes`` are selected.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin.data.columns import column_values
from celltwin.data.source import H5adSource, MemorySource, iter_row_chunks, open_source
from celltwin.errors import ConfigError, InputError

__all__ = ["highly_variable_genes", "select_hvg"]


def _col_sums(block) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene sum and sum of squares of one block, accumulated in float64."""
    if sp.issparse(block):
        b = sp.csr_matrix(block, dtype=np.float64)
        return np.asarray(b.sum(axis=0)).ravel(), np.asarray(b.multiply(b).sum(axis=0)).ravel()
    b = np.asarray(block, dtype=np.float64)
    return b.sum(axis=0), (b * b).sum(axis=0)


def _clipped_sums(block, clip: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-gene sum and sum of squares of min(x, clip) (implicit zeros contribute 0)."""
    G = clip.size
    if sp.issparse(block):
        b = block.tocsr()
        data = np.minimum(b.data.astype(np.float64), clip[b.indices])
        return (
            np.bincount(b.indices, weights=data, minlength=G),
            np.bincount(b.indices, weights=data * data, minlength=G),
        )
    c = np.minimum(np.asarray(block, dtype=np.float64), clip)
    return c.sum(axis=0), (c * c).sum(axis=0)


def _batch_sums(src, rows, codes: np.ndarray, shape: tuple[int, int], chunk_size: int, sums):
    """Per-batch ``(B, G)`` totals of ``sums(block of batch b, b) -> (a1, a2)`` over the rows, block by block."""
    t1, t2 = np.zeros(shape), np.zeros(shape)
    pos = 0
    for r, block in iter_row_chunks(src, rows, chunk_size):
        c = codes[pos : pos + r.size]
        pos += r.size
        for b in np.unique(c):
            a1, a2 = sums(block[c == b], b)
            t1[b] += a1
            t2[b] += a2
    return t1, t2


def highly_variable_genes(
    data,
    n_top_genes: int,
    batch_key: str | None = None,
    span: float = 0.3,
    rows: np.ndarray | None = None,
    chunk_size: int = 4096,
) -> pd.DataFrame:
    """seurat_v3 highly variable genes of ``data`` (path, AnnData or source), streamed in row chunks.

    Parameters
    ----------
    data
        ``.h5ad`` path (read lazily), AnnData or :class:`~celltwin.data.source.H5adSource`. X should
        hold raw counts (seurat_v3 models count variance); other values are used as they are.
    n_top_genes
        Number of genes to select.
    batch_key
        obs column; ranks are computed per batch and combined as in Seurat v3 / scanpy.
    rows
        Restrict to these cells (e.g. the training split). Default: all cells.

    Returns
    -------
    DataFrame indexed by gene name with the columns scanpy writes to ``var``: ``means``,
    ``variances`` (over all used cells), ``variances_norm`` (mean over batches),
    ``highly_variable_rank`` (float, NaN outside the top genes), ``highly_variable_nbatches``
    and ``highly_variable`` (bool).
    """
    from skmisc.loess import loess

    src: H5adSource | MemorySource = open_source(data)
    G = src.n_vars
    if not int(n_top_genes) > 0:
        msg = f"n_top_genes: expected a positive integer, got {n_top_genes}"
        raise ConfigError(msg)
    rows = np.arange(src.n_obs) if rows is None else np.asarray(rows, dtype=np.int64)
    if batch_key is not None and batch_key not in src.obs.columns:
        from celltwin.data.columns import require_columns

        require_columns(src.obs, [batch_key], src.name)
    labels = column_values(src.obs, batch_key, src.n_obs)[rows]
    batches, codes = np.unique(labels, return_inverse=True)
    B = batches.size

    # pass 1: per-batch sums of x and x**2 in float64. For count data every partial sum is an
    # integer below 2**53, so the sums (hence means and variances) are exact and do not depend on
    # the chunking; the variance is E[x^2] - E[x]^2 times n / (n - 1), scanpy's dense formula.
    n_b = np.bincount(codes, minlength=B).astype(np.int64)
    s1, s2 = _batch_sums(src, rows, codes, (B, G), chunk_size, lambda x, b: _col_sums(x))
    n_all = int(n_b.sum())
    if n_all < 2:
        msg = f"{src.name}: highly variable genes need at least 2 cells, got {n_all}"
        raise InputError(msg)

    def mean_var(n, t1, t2):
        mean = t1 / n
        var = t2 / n - mean**2
        return mean, var * (n / (n - 1)) if n > 1 else np.zeros_like(var)

    mean_all, var_all = mean_var(n_all, s1.sum(axis=0), s2.sum(axis=0))
    mean_b = np.zeros((B, G))
    var_b = np.zeros((B, G))
    for b in range(B):
        mean_b[b], var_b[b] = mean_var(n_b[b], s1[b], s2[b])

    # LOESS per batch
    reg_std = np.ones((B, G))
    clip = np.zeros((B, G))
    for b in range(B):
        n = n_b[b]
        var = var_b[b]
        ok = var > 0
        if ok.sum() < 3:
            msg = (
                f"{src.name}: batch {batches[b]!r} has fewer than 3 genes with non-zero variance; "
                "cannot fit LOESS"
            )
            raise InputError(msg)
        fit = np.zeros(G)
        model = loess(np.log10(mean_b[b][ok]), np.log10(var[ok]), span=span, degree=2)
        model.fit()
        fit[ok] = model.outputs.fitted_values
        reg_std[b] = np.sqrt(10**fit)
        clip[b] = reg_std[b] * np.sqrt(n) + mean_b[b]

    # pass 2: sums of clipped values and of their squares, then
    # sum((clip(x) - mean)^2) = n mean^2 + sum(clip^2) - 2 mean sum(clip)   (scanpy's expression)
    c1, c2 = _batch_sums(src, rows, codes, (B, G), chunk_size, lambda x, b: _clipped_sums(x, clip[b]))
    nn = n_b[:, None].astype(np.float64)
    norm_var = (1 / ((nn - 1) * np.square(reg_std))) * (
        nn * np.square(mean_b) + c2 - 2 * c1 * mean_b
    )  # (B, G)

    ranks = np.argsort(np.argsort(-norm_var, axis=1), axis=1).astype(np.float32)
    nbatches = (ranks < n_top_genes).sum(axis=0)
    ranks[ranks >= n_top_genes] = np.nan
    median_rank = np.ma.median(np.ma.masked_invalid(ranks), axis=0).filled(np.nan)

    df = pd.DataFrame(index=pd.Index(src.var_names, name=None))
    df["means"] = mean_all
    df["variances"] = var_all
    df["variances_norm"] = norm_var.mean(axis=0)
    df["highly_variable_rank"] = median_rank
    df["highly_variable_nbatches"] = nbatches
    order = (
        df[["highly_variable_rank", "highly_variable_nbatches"]]
        .sort_values(
            ["highly_variable_rank", "highly_variable_nbatches"], ascending=[True, False], na_position="last"
        )
        .index
    )
    df["highly_variable"] = False
    df.loc[order[: int(n_top_genes)], "highly_variable"] = True
    return df


def select_hvg(hvg: pd.DataFrame) -> list[str]:
    """Names of the selected genes, in the file's (var) order, which is the order models use."""
    return [str(g) for g in hvg.index[hvg["highly_variable"].to_numpy()]]
