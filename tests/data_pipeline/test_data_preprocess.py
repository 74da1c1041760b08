"""normalize_total + log1p, Preprocessing persistence, and seurat_v3 HVG against scanpy."""

from __future__ import annotations

import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltwin.data import (
    H5adSource,
    Preprocessing,
    fit_preprocessing,
    highly_variable_genes,
    library_sizes,
    looks_like_counts,
    median_library_size,
    normalize_log1p,
    select_hvg,
)
from celltwin.errors import ConfigError, InputError


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normalize_log1p_hand_computed(sparse, dtype):
    X = np.array([[1, 3, 0], [0, 0, 0], [2, 2, 4]], dtype=dtype)  # totals 4, 0, 8
    block = sp.csr_matrix(X) if sparse else X
    out = normalize_log1p(block, target_sum=8.0)
    out = out.toarray() if sparse else out
    assert out.dtype == np.float32
    expect = np.log1p(np.array([[2, 6, 0], [0, 0, 0], [2, 2, 4]], dtype=np.float32))
    np.testing.assert_allclose(out, expect, rtol=1e-7)
    # explicit totals (e.g. the full-gene totals of a gene subset) are honoured
    sub = normalize_log1p(block[:, :1], target_sum=8.0, totals=np.array([4.0, 0.0, 8.0]))
    sub = sub.toarray() if sparse else sub
    np.testing.assert_allclose(sub[:, 0], expect[:, 0], rtol=1e-7)
    # no scaling, no log
    raw = normalize_log1p(block, None, log1p=False)
    np.testing.assert_array_equal(raw.toarray() if sparse else raw, X.astype(np.float32))


@pytest.mark.reference
def test_median_and_scanpy_normalize_total():
    import scanpy as sc

    rng = np.random.default_rng(1)
    X = sp.csr_matrix(rng.poisson(2.0, (51, 30)).astype(np.float32))
    a = ad.AnnData(X.copy())
    assert median_library_size(a) == float(np.median(np.asarray(X.sum(1)).ravel()))
    np.testing.assert_array_equal(
        library_sizes(a, rows=np.array([3, 1])), np.asarray(X[[3, 1]].sum(1)).ravel()
    )
    ref = a.copy()
    sc.pp.normalize_total(ref)
    sc.pp.log1p(ref)
    ours = normalize_log1p(X, median_library_size(a))
    np.testing.assert_allclose(ours.toarray(), ref.X.toarray(), rtol=2e-6, atol=1e-7)


def test_looks_like_counts():
    assert looks_like_counts(ad.AnnData(np.array([[0, 2.0], [1, 5]])))
    assert not looks_like_counts(ad.AnnData(np.array([[0, 2.5], [1, 5]])))
    assert not looks_like_counts(ad.AnnData(np.array([[0, -1.0], [1, 5]])))


def test_preprocessing_roundtrip_and_transform(tmp_path, make_adata):
    a = make_adata()
    pre = fit_preprocessing(a, n_top_genes=8)
    assert len(pre.genes) == 8 and pre.log1p
    # genes keep the file order
    order = [list(a.var_names).index(g) for g in pre.genes]
    assert order == sorted(order)
    assert pre.target_sum == median_library_size(a)
    pre.save(tmp_path / "run")
    assert (tmp_path / "run" / "genes.txt").read_text().split() == pre.genes
    back = Preprocessing.load(tmp_path / "run")
    assert back == pre
    idx = back.gene_index(a.var_names)
    got = back.transform(a.X[:5], idx)
    full = normalize_log1p(a.X[:5], pre.target_sum).toarray()
    np.testing.assert_array_equal(got, full[:, idx])  # totals over all genes, then subset
    with pytest.raises(InputError, match="2 of the run's 8 genes are not in var_names"):
        back.gene_index([g for g in a.var_names if g not in pre.genes[:2]], "x.h5ad")
    with pytest.raises(ConfigError):
        Preprocessing(genes=["a", "a"], target_sum=1.0)


def test_fit_passes_log_normalised_input_through(make_adata):
    a = make_adata()
    a.X = normalize_log1p(a.X, 1e4)
    pre = fit_preprocessing(a)
    assert pre.target_sum is None and pre.log1p is False
    np.testing.assert_array_equal(pre.transform(a.X[:3], None), a.X[:3].toarray())
    pre2 = fit_preprocessing(make_adata(), target_sum=1e4, genes=["g5", "A"])
    assert pre2.target_sum == 1e4 and pre2.genes == ["g5", "A"]
    with pytest.raises(InputError, match="not in var_names"):
        fit_preprocessing(make_adata(), genes=["nope"])


def _counts(seed, n=400, G=250, batches=3):
    rng = np.random.default_rng(seed)
    mu = rng.lognormal(0, 1.5, G)
    X = rng.poisson(mu * rng.gamma(2, 0.5, (n, G))).astype(np.float32)
    X[:, 7] = 0  # an all-zero gene
    X[:, 8] = 3  # a constant gene
    a = ad.AnnData(X, var=pd.DataFrame(index=[f"g{i}" for i in range(G)]))
    a.obs["batch"] = rng.choice([f"b{i}" for i in range(batches)], n)
    return a


@pytest.mark.reference
@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("batch_key", [None, "batch"])
@pytest.mark.parametrize("seed", [0, 1])
def test_hvg_matches_scanpy_seurat_v3(sparse, batch_key, seed):
    import scanpy as sc

    a = _counts(seed)
    if sparse:
        a.X = sp.csr_matrix(a.X)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sc.pp.highly_variable_genes(
            a, flavor="seurat_v3", n_top_genes=40, batch_key=batch_key, inplace=False
        )
    for chunk in (4096, 33):  # result must not depend on the streaming chunk size
        ours = highly_variable_genes(a, 40, batch_key=batch_key, chunk_size=chunk)
        assert list(ours.index) == list(ref.index)
        np.testing.assert_array_equal(ours["highly_variable"].to_numpy(), ref["highly_variable"].to_numpy())
        np.testing.assert_array_equal(
            ours["highly_variable_rank"].to_numpy(), ref["highly_variable_rank"].to_numpy()
        )
        if batch_key is not None:  # scanpy drops the column without batches
            np.testing.assert_array_equal(
                ours["highly_variable_nbatches"].to_numpy(), ref["highly_variable_nbatches"].to_numpy()
            )
        np.testing.assert_allclose(
            ours["variances_norm"].to_numpy(), ref["variances_norm"].to_numpy(), rtol=1e-9
        )
        np.testing.assert_allclose(ours["means"].to_numpy(), ref["means"].to_numpy(), rtol=1e-12)
        np.testing.assert_allclose(ours["variances"].to_numpy(), ref["variances"].to_numpy(), rtol=1e-9)
    assert len(select_hvg(ours)) == 40


@pytest.mark.reference
def test_hvg_backed_file_and_row_subset(tmp_path):
    import scanpy as sc

    a = _counts(3)
    a.X = sp.csr_matrix(a.X)
    path = tmp_path / "c.h5ad"
    a.write_h5ad(path)
    rows = np.flatnonzero(a.obs["batch"].to_numpy() != "b0")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = sc.pp.highly_variable_genes(
            a[rows].copy(), flavor="seurat_v3", n_top_genes=25, batch_key="batch", inplace=False
        )
    ours = highly_variable_genes(H5adSource(path), 25, batch_key="batch", rows=rows, chunk_size=50)
    np.testing.assert_array_equal(ours["highly_variable"].to_numpy(), ref["highly_variable"].to_numpy())
    np.testing.assert_array_equal(
        ours["highly_variable_rank"].to_numpy(), ref["highly_variable_rank"].to_numpy()
    )
    with pytest.raises(InputError, match="'donor' not found"):
        highly_variable_genes(a, 10, batch_key="donor")
