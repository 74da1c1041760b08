"""Tiny Perturb-seq-like AnnData generated in the tests (no files shipped)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp


def make_adata(seed: int = 0, n_per: int = 12, fmt: str = "csr", dtype=np.float32, knock: float = 0.1):
    """2 contexts x 2 batches; perturbations A, B, C, A+B and controls; genes A, B, C, g3..g19.

    Counts are Poisson; the target gene of a perturbed cell has its rate multiplied by ``knock``.
    Context c2 has no cells of C; batch b2 of context c2 has no controls.
    """
    import anndata as ad

    rng = np.random.default_rng(seed)
    genes = ["A", "B", "C"] + [f"g{i}" for i in range(3, 20)]
    G = len(genes)
    base = rng.gamma(2.0, 2.0, G) + 0.5
    recs = []
    for ctx in ("c1", "c2"):
        for bat in ("b1", "b2"):
            labels = ["non-targeting", "A", "B", "C", "A+B"]
            if ctx == "c2":
                labels.remove("C")
                if bat == "b2":
                    labels.remove("non-targeting")
            for lab in labels:
                recs += [(lab, ctx, bat)] * n_per
    obs = pd.DataFrame(recs, columns=["target_gene", "cell_type", "batch"])
    obs.index = [f"cell{i}" for i in range(len(obs))]
    rates = np.tile(base, (len(obs), 1)) * rng.uniform(0.5, 1.5, (len(obs), 1))
    for j, g in enumerate(genes[:3]):
        hit = obs["target_gene"].str.split("+").apply(lambda t, g=g: g in t).to_numpy()
        rates[hit, j] *= knock
    X = rng.poisson(rates).astype(dtype)
    if fmt == "csr":
        X = sp.csr_matrix(X)
    elif fmt == "csc":
        X = sp.csc_matrix(X)
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    a.obsm["X_state"] = rng.normal(size=(len(obs), 4)).astype(np.float32)
    return a


@pytest.fixture
def tiny():
    return make_adata()


@pytest.fixture(name="make_adata")
def _make_adata_fixture():
    return make_adata
