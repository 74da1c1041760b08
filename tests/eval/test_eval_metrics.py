"""Hand-computed tests of the metric kernels (PDS, MAE, DES ranking/overlap, describe, pseudobulk, scaling)."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from celltwin.eval._load import is_counts, normalize_log1p
from celltwin.eval._metrics import (
    describe,
    discrimination,
    mean_error,
    overlap_k,
    pseudobulk,
    rank_significant,
)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pseudobulk_hand(fmt, dtype):
    X = np.array([[1, 0, 2], [3, 0, 0], [0, 5, 1], [2, 2, 2]], dtype=dtype)
    codes = np.array([1, 0, 1, 0])
    M = sp.csr_matrix(X) if fmt == "csr" else X
    got = pseudobulk(M, codes, 2)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, np.array([[2.5, 1.0, 1.0], [0.5, 2.5, 1.5]], dtype=dtype))


def test_mae_hand():
    a = np.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]], dtype=np.float32)
    b = np.array([[1.0, 0.0, 6.0], [1.0, 1.0, 1.0]], dtype=np.float32)
    np.testing.assert_allclose(mean_error(a, b), [5.0 / 3.0, 1.0], rtol=1e-7)
    np.testing.assert_allclose(mean_error(a, b, "mse"), [13.0 / 3.0, 1.0], rtol=1e-7)


def test_pds_hand_and_target_exclusion():
    genes = ["g0", "B", "g2"]
    real = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # pred of "A" is closest to real "A"; pred of "B" equals real "C" except on gene "B"
    pred = np.array([[0.9, 0.0, 0.0], [0.0, 9.0, 1.0], [0.0, 0.0, 1.0]])
    got = discrimination(real, pred, ["A", "B", "C"], genes)
    # A: distances (0.1, 1.9, 1.9) -> rank 0 -> 1.0
    # B: gene "B" excluded -> distances to A (g0,g2)=(1,1)=2, to B=(0,1)=1, to C=(0,0)=0 -> rank 1 -> 1 - 1/3
    # C: distances (2, 2, 0) -> rank 0 -> 1.0
    np.testing.assert_allclose(got, [1.0, 2.0 / 3.0, 1.0])


def test_pds_tie_uses_argsort_position():
    real = np.zeros((3, 2))
    pred = np.zeros((3, 2))
    got = discrimination(real, pred, ["A", "B", "C"], ["x", "y"])
    ranks = [int(np.flatnonzero(np.argsort(np.zeros(3)) == i)[0]) for i in range(3)]
    np.testing.assert_allclose(got, [1 - r / 3 for r in ranks])


def test_rank_significant_order_and_threshold():
    t = np.array(["P"] * 7 + ["Q"])
    f = np.array(["a", "b", "c", "d", "e", "f", "g", "a"])
    lfc = np.array([1.0, -np.inf, np.nan, 2.0, -2.0, 0.5, 9.0, 1.0])
    fdr = np.array([0.01, 0.01, 0.01, 0.01, 0.01, 0.049999, 0.05, 0.2])
    r = rank_significant(t, f, lfc, fdr, ["P", "Q"])
    # NaN first, then inf, then |2| twice in row order (d before e), then 1, then 0.5; g (fdr 0.05) dropped
    assert r["P"].tolist() == ["c", "b", "d", "e", "a", "f"]
    assert r["Q"].size == 0


def test_overlap_hand():
    real = {"P": np.array(["a", "b", "c", "d"]), "Q": np.array([], dtype=str), "R": np.array(["x"])}
    pred = {"P": np.array(["b", "z", "a", "d", "c"]), "Q": np.array(["a"]), "R": np.array([], dtype=str)}
    # P: top4 real {a,b,c,d} vs top4 pred {b,z,a,d} -> 3/4; Q: no real genes -> 0; R: pred empty -> 0
    np.testing.assert_allclose(overlap_k(real, pred, ["P", "Q", "R"], None, "overlap"), [0.75, 0.0, 0.0])
    none = {"P": np.array([], dtype=str), "Q": np.array([], dtype=str), "R": np.array([], dtype=str)}
    np.testing.assert_allclose(overlap_k(real, none, ["P", "Q", "R"], None, "overlap"), [0.0, 0.0, 0.0])


def test_describe_matches_polars():
    pl = pytest.importorskip("polars")
    cols = {
        "a": [0.1, 0.5, 0.3, 0.9, 0.2],
        "b": [1.0, float("nan"), 0.0, 2.0, 3.0],
        "c": [0.25, 0.25, 0.75, 0.5, 1.0],
        "d": [0.4, 0.1, 0.7, 0.9, 0.3],
    }
    ref = pl.DataFrame(cols).describe().to_pandas()
    for name, vals in cols.items():
        np.testing.assert_allclose(
            describe(np.array(vals)), ref[name].to_numpy(float), rtol=1e-15, equal_nan=True
        )
    # 4 values: the "nearest" 25% quantile rounds (n-1)*q = 0.75 up, 50% rounds 1.5 away from zero
    v = np.array([0.1, 0.2, 0.5, 0.7])
    assert describe(v)[5:8] == [0.2, 0.5, 0.5]
    ref4 = pl.DataFrame({"v": v}).describe().to_pandas()["v"].to_numpy(float)
    np.testing.assert_allclose(describe(v), ref4, rtol=1e-15)


@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_normalize_median_rule(fmt):
    # totals 0, 2, 4, 10: CSR median over all cells = 3, dense median over non-zero = 4
    X = np.array([[0, 0], [1, 1], [3, 1], [5, 5]], dtype=np.int64)
    M = sp.csr_matrix(X) if fmt == "csr" else X
    out = normalize_log1p(M)
    dense = out.toarray() if sp.issparse(out) else out
    assert dense.dtype == np.float32
    target = 3.0 if fmt == "csr" else 4.0
    expect = np.log1p((X / np.maximum(X.sum(1, keepdims=True), 1) * target).astype(np.float32))
    np.testing.assert_allclose(dense, expect, rtol=1e-6)
    assert np.all(dense[0] == 0)


@pytest.mark.reference
def test_normalize_matches_scanpy():
    sc = pytest.importorskip("scanpy")
    ad = pytest.importorskip("anndata")
    rng = np.random.default_rng(0)
    X = rng.poisson(2.0, (50, 30)).astype(np.float32)
    X[3] = 0
    for M in (sp.csr_matrix(X), X.copy()):
        a = ad.AnnData(M.copy())
        sc.pp.normalize_total(a)
        sc.pp.log1p(a)
        ours = normalize_log1p(M.copy())
        ref = a.X.toarray() if sp.issparse(a.X) else a.X
        got = ours.toarray() if sp.issparse(ours) else ours
        np.testing.assert_array_equal(got, ref)


def test_is_counts_detection():
    assert is_counts(np.array([[1.0, 2.0], [0.0, 3.0005]]))  # fractional part <= 1e-3 counts as integer
    assert not is_counts(np.array([[1.0, 2.5]]))


@pytest.mark.parametrize("fmt", ["dense", "csr"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_is_counts_threshold_in_the_arrays_dtype(fmt, dtype):
    """The fraction test is ``np.modf(v)[0] > 1e-3`` with 1e-3 taken in the array's dtype."""
    eps = dtype(1e-3)
    on = np.array([[0.0, 7.0, 2.0 + 0.0], [1.0, eps, 5.0]], dtype=dtype)  # frac == eps exactly: integer
    assert np.modf(on)[0].max() == eps
    M = sp.csr_matrix(on) if fmt == "csr" else on
    assert is_counts(M) == (not bool(np.any(np.modf(on)[0] > 1e-3)))
    assert is_counts(M)
    above = on.copy()
    above[1, 1] = np.nextafter(eps, dtype(1))  # one ulp above: fractional
    M = sp.csr_matrix(above) if fmt == "csr" else above
    assert not is_counts(M)
    big = above.copy()
    big[0, 1] = 20.0  # fractional values with a max >= 15: a mix of counts and log values
    with pytest.raises(Exception, match="mixes counts and log values"):
        is_counts(sp.csr_matrix(big) if fmt == "csr" else big)
