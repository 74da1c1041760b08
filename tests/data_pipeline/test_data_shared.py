"""The pipeline on the real files in ../shared/data (skipped when absent)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from celltwin.data import (
    CellLabels,
    CellSetSampler,
    H5adSource,
    ObsColumns,
    SetSamplerConfig,
    highly_variable_genes,
    knockdown_filter,
    make_split,
    resolve_split,
)

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"
pytestmark = pytest.mark.shared


def _path(name):
    p = SHARED / name
    if not p.exists():
        pytest.skip(f"{p} absent")
    return p


@pytest.mark.reference
def test_hvg_matches_scanpy_on_vcc_subset():
    import anndata as ad
    import scanpy as sc

    path = _path("vcc2025_h1_subset.h5ad")
    a = ad.read_h5ad(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sc.pp.highly_variable_genes(
            a, flavor="seurat_v3", n_top_genes=200, batch_key="batch", inplace=False
        )
    ours = highly_variable_genes(H5adSource(path), 200, batch_key="batch", chunk_size=97)
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(), ref["highly_variable"].to_numpy())
    np.testing.assert_array_equal(
        ours["highly_variable_rank"].to_numpy(), ref["highly_variable_rank"].to_numpy()
    )


def test_vcc_knockdown_keeps_strong_knockdown():
    src = H5adSource(_path("vcc2025_h1_subset.h5ad"))
    res = knockdown_filter(src, ObsColumns(context_col=None))
    # TMSB4X is the only measured target among the 1,000 genes kept; its CRISPRi knockdown is strong
    assert res.per_perturbation.loc["TMSB4X", "unassessed"] == 0
    assert res.per_perturbation.loc["TMSB4X", "dropped"] < 10
    assert res.n_unassessed == 400


def test_norman_fewshot_split_and_sets():
    src = H5adSource(_path("norman2019_mcfaline2023_perturbench.h5ad"))
    cols = ObsColumns(
        pert_col="perturbation", control_label="control", context_col="cell_type", batch_col=None
    )
    split = make_split(src.obs, cols, target="A172", holdout=3, val=1, seed=0, dataset="norman")
    idx = resolve_split(split, src.obs, cols, where=src.name)
    held = split.fewshot["norman.A172"]["test"]
    pert, ctx = cols.perturbations(src.obs), cols.contexts(src.obs)
    np.testing.assert_array_equal(idx.test, np.flatnonzero((ctx == "A172") & np.isin(pert, held)))
    np.testing.assert_array_equal(idx.test_controls, np.flatnonzero((ctx == "A172") & (pert == "control")))
    s = CellSetSampler(
        CellLabels.from_obs(src.obs, cols, idx.train, where=src.name), SetSamplerConfig(set_size=32)
    )
    plan = s.epoch_plan(0)
    assert {cs.perturbation for cs in plan if cs.context == "A172"}.isdisjoint(held)
    assert any("+" in cs.perturbation for cs in plan)  # the Norman double perturbations are sets too
    cs = plan[0]
    block = src.read_rows(cs.pert_rows)
    assert block.shape == (32, 500) and block.dtype == np.float32
