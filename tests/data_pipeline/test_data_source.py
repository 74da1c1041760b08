"""Lazy row reads: H5adSource (backed) and MemorySource give X[idx] exactly, in the caller's order."""

from __future__ import annotations

import pickle

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltwin.data import H5adSource, MemorySource, iter_row_chunks, open_source
from celltwin.errors import InputError


def _adata(fmt, dtype, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.poisson(1.0, (37, 9)).astype(dtype)
    if np.issubdtype(dtype, np.floating):
        X = X * np.asarray(1.5, dtype)
    Xs = {"dense": X, "csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X)}[fmt]
    a = ad.AnnData(
        Xs,
        obs=pd.DataFrame({"target_gene": ["x"] * 37}, index=[f"c{i}" for i in range(37)]),
        var=pd.DataFrame(index=[f"g{i}" for i in range(9)]),
    )
    a.obsm["X_state"] = rng.normal(size=(37, 3))
    return a, X


def _dense(m):
    return m.toarray() if sp.issparse(m) else m


@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32, np.int64])
def test_read_rows_matches_x_in_given_order(tmp_path, fmt, dtype):
    a, X = _adata(fmt, dtype)
    path = tmp_path / "a.h5ad"
    a.write_h5ad(path)
    idx = np.array([30, 2, 2, 17, 0, 36, 5])  # unsorted, with a duplicate
    for src in (H5adSource(path), MemorySource(a)):
        got = src.read_rows(idx)
        assert got.dtype == np.float32
        assert sp.issparse(got) == (fmt != "dense")
        if sp.issparse(got):
            assert got.format == "csr"
        np.testing.assert_array_equal(_dense(got), X[idx].astype(np.float32))
        # contiguous, empty, boolean mask and negative indices
        np.testing.assert_array_equal(_dense(src.read_rows(np.arange(4, 9))), X[4:9].astype(np.float32))
        assert _dense(src.read_rows(np.array([], dtype=int))).shape == (0, 9)
        mask = np.zeros(37, bool)
        mask[[1, 3]] = True
        np.testing.assert_array_equal(_dense(src.read_rows(mask)), X[[1, 3]].astype(np.float32))
        np.testing.assert_array_equal(_dense(src.read_rows([-1])), X[[36]].astype(np.float32))
        emb = src.read_rows(idx, obsm_key="X_state")
        np.testing.assert_allclose(emb, a.obsm["X_state"][idx].astype(np.float32))
        assert src.n_obs == 37 and src.n_vars == 9 and list(src.var_names) == [f"g{i}" for i in range(9)]
        assert list(src.obs["target_gene"]) == ["x"] * 37


def test_h5ad_source_is_lazy_and_picklable(tmp_path):
    a, X = _adata("csr", np.float32)
    path = tmp_path / "a.h5ad"
    a.write_h5ad(path)
    src = H5adSource(path)
    assert src._file is None  # nothing opened until the first read
    src.read_rows([0])
    clone = pickle.loads(pickle.dumps(src))
    assert clone._file is None
    np.testing.assert_array_equal(clone.read_rows([3, 1]).toarray(), X[[3, 1]])
    src.close()
    chunks = list(iter_row_chunks(src, chunk_size=10))
    assert [len(r) for r, _ in chunks] == [10, 10, 10, 7]
    np.testing.assert_array_equal(sp.vstack([b for _, b in chunks]).toarray(), X)


def test_source_errors(tmp_path):
    with pytest.raises(InputError, match="file not found"):
        H5adSource(tmp_path / "nope.h5ad")
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(InputError, match="cannot read"):
        H5adSource(bad)
    a, _ = _adata("csr", np.float32)
    src = open_source(a)
    with pytest.raises(InputError, match="out of range"):
        src.read_rows([37])
    with pytest.raises(InputError, match=r"obsm key 'X_pca' not found; available: X_state"):
        src.read_rows([0], obsm_key="X_pca")
    with pytest.raises(InputError, match="expected a path"):
        open_source(3)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_row_reads_do_not_load_the_matrix(tmp_path, fmt):
    import tracemalloc

    rng = np.random.default_rng(0)
    X = sp.random(4000, 500, density=0.2, format="csr", dtype=np.float32, random_state=rng)  # ~400k nnz
    a = ad.AnnData(X if fmt == "csr" else X.toarray())  # dense: 8 MB, CSR: ~3.2 MB of data + indices
    path = tmp_path / "big.h5ad"
    a.write_h5ad(path)
    del a
    src = H5adSource(path)
    src.read_rows([0])  # open handles, cache the row pointers
    tracemalloc.start()
    got = src.read_rows([3999, 5, 2000])
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 200_000  # three rows, not megabytes
    np.testing.assert_array_equal(_dense(got), X[[3999, 5, 2000]].toarray())
