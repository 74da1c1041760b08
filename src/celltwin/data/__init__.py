"""AnnData -> arrays for training: lazy reads, preprocessing, HVG, gene ids, control matching,
cell-set sampling, splits.

numpy / scipy / pandas only: the torch ``Dataset`` lives in :mod:`celltwin.data.torch_sets`.
See ``docs/data.md`` for a walk-through.

Typical use::

    from celltwin.data import (H5adSource, ObsColumns, CellLabels, fit_preprocessing,
                               SetSamplerConfig, CellSetSampler, Vocabularies, read_split, resolve_split)
    src = H5adSource("train.h5ad")                       # obs in memory, X read lazily
    cols = ObsColumns(context_col="cell_type").present(src.obs)
    split = resolve_split(read_split("split.toml"), src.obs, cols, where=src.name)
    pre = fit_preprocessing(src, rows=split.train, n_top_genes=2000)
    vocabs = Vocabularies.from_labels(CellLabels.from_obs(src.obs, cols), pre.genes)
    sampler = CellSetSampler(CellLabels.from_obs(src.obs, cols, split.train), SetSamplerConfig(set_size=64))
    from celltwin.data.torch_sets import CellSetDataset  # imports torch
    ds = CellSetDataset(src, sampler, vocabs, pre)
"""

from __future__ import annotations

from celltwin.data.columns import ObsColumns, column_values, parse_perturbation, require_columns
from celltwin.data.gene_ids import GeneMapping, HgncTable, map_genes
from celltwin.data.hvg import highly_variable_genes, select_hvg
from celltwin.data.knockdown import KnockdownResult, knockdown_filter
from celltwin.data.matching import MATCH_STRATEGIES, CellLabels, ControlMatcher, match_controls
from celltwin.data.preprocess import (
    Preprocessing,
    fit_preprocessing,
    library_sizes,
    looks_like_counts,
    median_library_size,
    normalize_log1p,
    read_genes_txt,
    write_genes_txt,
)
from celltwin.data.sampler import CellSet, CellSetSampler, SetSamplerConfig
from celltwin.data.source import H5adSource, MemorySource, Source, iter_row_chunks, open_source
from celltwin.data.split import Split, SplitIndices, read_split, resolve_split
from celltwin.data.split_draw import make_split
from celltwin.data.vocab import Vocab, Vocabularies

__all__ = [
    # matching and sampling
    "MATCH_STRATEGIES",
    "CellLabels",
    "CellSet",
    "CellSetSampler",
    "ControlMatcher",
    "GeneMapping",
    "H5adSource",
    "HgncTable",
    "KnockdownResult",
    "MemorySource",
    # columns and labels
    "ObsColumns",
    # preprocessing
    "Preprocessing",
    "SetSamplerConfig",
    # sources
    "Source",
    # splits
    "Split",
    "SplitIndices",
    "Vocab",
    "Vocabularies",
    "column_values",
    "fit_preprocessing",
    "highly_variable_genes",
    "iter_row_chunks",
    "knockdown_filter",
    "library_sizes",
    "looks_like_counts",
    "make_split",
    "map_genes",
    "match_controls",
    "median_library_size",
    "normalize_log1p",
    "open_source",
    "parse_perturbation",
    "read_genes_txt",
    "read_split",
    "require_columns",
    "resolve_split",
    "select_hvg",
    "write_genes_txt",
]
