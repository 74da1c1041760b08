"""The streamed evaluator: group batches and scan blocks change nothing, files are never read whole.

The reference for the numbers is the evaluator itself with one batch (which the cell-eval
differential tests in test_evaluate.py pin to cell-eval 0.8.2) and the whole-matrix reading rules
of ``celltwin.eval._load``; every comparison here is bitwise.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

ad = pytest.importorskip("anndata")

from celltwin.eval import EvalConfig, _sides, evaluate
from celltwin.eval._load import normalize_log1p
from celltwin.eval._sides import open_side

CTRL = "non-targeting"
COL = "target_gene"


def _screen(seed: int, *, counts: bool, sparse: bool, dtype, n_genes: int = 30, shuffle: bool = True):
    """30 controls + 6 perturbations x 3-9 cells, rows in random order (groups interleaved)."""
    rng = np.random.default_rng(seed)
    perts = [CTRL, "P1", "P2", "P3", "P4", "P5", "P6"]
    base = rng.gamma(2.0, 1.0, n_genes)
    rows, labels = [], []
    for p in perts:
        k = 30 if p == CTRL else int(rng.integers(3, 10))
        mu = base.copy()
        if p != CTRL:
            hit = rng.choice(n_genes, 5, replace=False)
            mu[hit] *= rng.choice([0.1, 5.0], 5)
        rows.append(rng.poisson(mu, (k, n_genes)).astype(np.float64))
        labels += [p] * k
    X, lab = np.vstack(rows), np.array(labels)
    if shuffle:
        perm = rng.permutation(X.shape[0])
        X, lab = X[perm], lab[perm]
    if not counts:
        X = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 700.0)
    X = X.astype(dtype)
    a = ad.AnnData(sp.csr_matrix(X) if sparse else X)
    a.obs[COL] = pd.Categorical(lab)
    a.var_names = [f"G{i}" for i in range(n_genes)]
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    return a


def _same(a, b) -> None:
    pd.testing.assert_frame_equal(a.results, b.results, check_exact=True)
    pd.testing.assert_frame_equal(a.agg, b.agg, check_exact=True)
    for x, y in ((a.de_real, b.de_real), (a.de_pred, b.de_pred)):
        assert (x is None) == (y is None)
        if x is not None:
            pd.testing.assert_frame_equal(x, y, check_exact=True)


def _tiny_batches(monkeypatch) -> None:
    monkeypatch.setattr(_sides, "BATCH_BYTES", 1)  # every perturbation is its own batch
    monkeypatch.setattr(_sides, "SCAN_ROWS", 7)  # many validation blocks, not aligned with groups


CASES = [
    (sparse, dtype, counts)
    for sparse in (True, False)
    for dtype in (np.float32, np.float64)
    for counts in (True, False)
]


@pytest.mark.parametrize(("sparse", "dtype", "counts"), CASES)
def test_rows_equal_whole_matrix_normalisation(sparse, dtype, counts, monkeypatch):
    monkeypatch.setattr(_sides, "SCAN_ROWS", 5)
    a = _screen(0, counts=counts, sparse=sparse, dtype=dtype)
    before = a.X.copy()
    side = open_side(a, pert_col=COL, control=CTRL, which="real")
    assert side.was_counts == counts and side.dtype == np.dtype(dtype)
    got = side.rows(np.arange(a.n_obs))
    want = normalize_log1p(a.X.copy()) if counts else a.X
    got_d = got.toarray() if sp.issparse(got) else got
    want_d = want.toarray() if sp.issparse(want) else want
    assert got_d.dtype == want_d.dtype
    np.testing.assert_array_equal(got_d.view(np.uint8), np.asarray(want_d).view(np.uint8))
    sub = np.array([3, 4, 17, 40])  # a subset normalises the same rows the same way
    got_s = side.rows(sub)
    np.testing.assert_array_equal(got_s.toarray() if sp.issparse(got_s) else got_s, got_d[sub])
    b = before.toarray() if sp.issparse(before) else before
    assert np.array_equal(a.X.toarray() if sp.issparse(a.X) else a.X, b)  # the caller's X untouched


def test_integer_counts_become_float32(monkeypatch):
    a = _screen(1, counts=True, sparse=True, dtype=np.float64)
    a.X = a.X.astype(np.int32)
    side = open_side(a, pert_col=COL, control=CTRL, which="real")
    assert side.dtype == np.float32 and side.was_counts
    want = normalize_log1p(a.X.copy())
    np.testing.assert_array_equal(side.rows(np.arange(a.n_obs)).toarray(), want.toarray())


@pytest.mark.parametrize(("sparse", "dtype", "counts"), CASES)
def test_batches_and_blocks_change_nothing(sparse, dtype, counts, monkeypatch):
    real = _screen(2, counts=counts, sparse=sparse, dtype=dtype)
    pred = _screen(3, counts=not counts, sparse=not sparse, dtype=dtype)
    one = evaluate(pred, real)
    _tiny_batches(monkeypatch)
    many = evaluate(pred, real)
    _same(one, many)
    assert np.isfinite(one.results["mae"]).all() and (one.results["overlap_at_N"] >= 0).all()


@pytest.mark.parametrize("control_source", ["own", "real"])
def test_files_equal_anndata_and_batches(tmp_path, control_source, monkeypatch):
    real = _screen(4, counts=True, sparse=True, dtype=np.float32)
    pred = _screen(5, counts=False, sparse=False, dtype=np.float64)
    real.write_h5ad(tmp_path / "real.h5ad")
    pred.write_h5ad(tmp_path / "pred.h5ad")
    cfg = EvalConfig(control_source=control_source)
    mem = evaluate(pred, real, config=cfg)
    _tiny_batches(monkeypatch)
    disk = evaluate(tmp_path / "pred.h5ad", tmp_path / "real.h5ad", config=cfg)
    _same(mem, disk)


# slow: clustering_agreement's first call compiles umap's numba kernels (~9 s, not cached); the quick
# loop keeps the streamed vcc metrics above
@pytest.mark.slow
def test_full_profile_cell_level_metrics_stream(monkeypatch):
    real = _screen(6, counts=True, sparse=True, dtype=np.float32)
    pred = _screen(7, counts=True, sparse=True, dtype=np.float32)
    cfg = EvalConfig(profile="full")
    one = evaluate(pred, real, config=cfg)
    _tiny_batches(monkeypatch)
    many = evaluate(pred, real, config=cfg)
    _same(one, many)
    assert np.isfinite(one.results["pearson_edistance"]).all()


def test_reorder_genes_streamed(monkeypatch):
    real = _screen(8, counts=True, sparse=True, dtype=np.float32)
    pred = _screen(9, counts=True, sparse=True, dtype=np.float32)
    ref = evaluate(pred, real)
    perm = np.random.default_rng(0).permutation(pred.n_vars)
    _tiny_batches(monkeypatch)
    got = evaluate(pred[:, perm].copy(), real, config=EvalConfig(reorder_genes=True))
    _same(ref, got)


def test_a_file_is_never_read_whole(tmp_path, monkeypatch):
    """Reads come in scan blocks, the control cells and one group batch: never all rows at once."""
    from celltwin.data.source import H5adSource

    real = _screen(10, counts=True, sparse=True, dtype=np.float32)
    real.write_h5ad(tmp_path / "real.h5ad")
    sizes: list[int] = []
    for method in ("read_stored", "read_csr_into"):
        orig = getattr(H5adSource, method)

        def spy(self, uniq, *rest, _orig=orig):
            sizes.append(int(np.asarray(uniq).size))
            return _orig(self, uniq, *rest)

        monkeypatch.setattr(H5adSource, method, spy)
    _tiny_batches(monkeypatch)
    evaluate(tmp_path / "real.h5ad", tmp_path / "real.h5ad")
    n_ctrl = int((real.obs[COL] == CTRL).sum())
    biggest_group = int(real.obs[COL][real.obs[COL] != CTRL].value_counts().max())
    assert max(sizes) == max(n_ctrl, biggest_group, 7)
    assert max(sizes) < real.n_obs


def test_anndata_inputs_are_not_modified():
    real = _screen(11, counts=True, sparse=True, dtype=np.float32)
    pred = _screen(12, counts=True, sparse=False, dtype=np.float32)
    r0, p0 = real.X.copy(), pred.X.copy()
    evaluate(pred, real)
    assert (r0 != real.X).nnz == 0
    np.testing.assert_array_equal(pred.X, p0)
    assert "log1p" not in real.uns and "log1p" not in pred.uns
