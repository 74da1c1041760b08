"""Hand-computed checks of the DE kernels (rank-sum test, BH, means, block gathering)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import scipy.sparse as sp
from scipy import stats

from celltwin.eval import _bh, _gather, _means, _mwu, _pairwise


def _blocks_from_columns(columns_by_group: list[list[np.ndarray]], dtype=np.float64):
    """Build (seg_ptr, vals, sizes) for genes x groups from full per-group columns."""
    n_groups = len(columns_by_group[0])
    seg = [0]
    vals: list[float] = []
    sizes = np.asarray([len(c) for c in columns_by_group[0]], dtype=np.int64)
    for gene_cols in columns_by_group:
        for col in gene_cols:
            nz = [v for v in col if v != 0]
            vals.extend(nz)
            seg.append(seg[-1] + len(nz))
    return np.asarray(seg, np.int64), np.asarray(vals, dtype), sizes, n_groups


def _run_mwu(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """U1 and p of x (group 0) vs y (control, group 1) through the blocked kernel."""
    seg, vals, sizes, ng = _blocks_from_columns([[x, y]])
    u = np.empty((1, 1))
    p = np.empty((1, 1))
    _mwu.mwu_block(seg, vals, sizes, 1, np.array([0], np.int64), ng, u, p, 0)
    return float(u[0, 0]), float(p[0, 0])


def test_mwu_hand_computed_ties_and_continuity():
    x = np.array([1.0, 2.0, 2.0])
    y = np.array([2.0, 3.0, 4.0, 4.0])
    # pooled ranks: 1 -> 1; 2,2,2 -> 3; 3 -> 5; 4,4 -> 6.5.  R1 = 1 + 3 + 3 = 7
    u1_hand = 7 - 3 * 4 / 2  # = 1
    tie = (3**3 - 3) + (2**3 - 2)  # 30
    n = 7
    sigma = math.sqrt(3 * 4 / 12 * ((n + 1) - tie / (n * (n - 1))))
    z = (max(u1_hand, 12 - u1_hand) - 6 - 0.5) / sigma
    p_hand = math.erfc(z / math.sqrt(2.0))
    u1, p = _run_mwu(x, y)
    assert u1 == 1.0
    assert p == pytest.approx(p_hand, rel=1e-14)
    assert p == pytest.approx(0.09548, abs=1e-5)
    ref = stats.mannwhitneyu(x, y, use_continuity=True, method="asymptotic")
    assert u1 == ref.statistic
    assert p == pytest.approx(ref.pvalue, rel=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mwu_matches_scipy_with_zeros_and_negatives(seed):
    rng = np.random.default_rng(seed)
    x = rng.choice([-1.0, 0.0, 0.0, 0.5, 1.0, 2.0], size=37)
    y = rng.choice([-1.0, 0.0, 0.0, 0.0, 0.5, 1.5, 2.0], size=53)
    u1, p = _run_mwu(x, y)
    ref = stats.mannwhitneyu(x, y, use_continuity=True, method="asymptotic")
    assert u1 == ref.statistic
    assert p == pytest.approx(ref.pvalue, rel=1e-12)


def test_mwu_constant_and_all_zero_give_p1():
    assert _run_mwu(np.zeros(4), np.zeros(6)) == (12.0, 1.0)  # U1 = n1 n2 / 2
    u1, p = _run_mwu(np.full(3, 2.5), np.full(5, 2.5))
    assert (u1, p) == (7.5, 1.0)


def test_mwu_pvalue_formula_direct():
    # R1 = 20 for n1 = 4, n2 = 5, no ties: U1 = 10, U = 10, mu = 10 -> z = -0.5/sigma
    u1, p = _mwu.mwu_pvalue(20.0, 4, 5, 0.0)
    sigma = math.sqrt(4 * 5 / 12 * 10)
    assert u1 == 10.0
    assert p == pytest.approx(min(1.0, math.erfc((-0.5 / sigma) / math.sqrt(2))), rel=1e-15)
    assert p == 1.0  # clipped


def test_distinct_inserts_zero_block_in_order():
    v = np.array([-2.0, -2.0, 1.0, 3.0, 3.0, 3.0])
    out_v = np.empty(7)
    out_c = np.empty(7, np.int64)
    nd = _mwu.distinct_runs(v, 4, out_v, out_c)
    assert nd == 4
    assert out_v[:nd].tolist() == [-2.0, 0.0, 1.0, 3.0]
    assert out_c[:nd].tolist() == [2, 4, 1, 3]
    assert _mwu.distinct_runs(np.empty(0), 5, out_v, out_c) == 1 and out_c[0] == 5
    assert _mwu.distinct_runs(np.array([1.0]), 0, out_v, out_c) == 1 and out_v[0] == 1.0


def test_bh_hand_computed():
    p = np.array([0.01, 0.04, 0.03, 0.5])
    # sorted 0.01 0.03 0.04 0.5 -> *m/k: 0.04 0.06 0.05333 0.5 -> running min from the end
    expected = np.array([0.04, 0.04 * 4 / 3, 0.04 * 4 / 3, 0.5])
    np.testing.assert_allclose(_bh.bh_flat(p), expected, rtol=1e-15)
    ties = np.array([0.02, 0.02, 0.02, 0.9, 0.001])
    np.testing.assert_array_equal(_bh.bh_flat(ties), stats.false_discovery_control(ties))
    big = np.array([0.9, 0.95, 1.0])
    assert _bh.bh_flat(big).max() == 1.0
    rows = np.vstack([p, p[::-1]])
    out = _bh.bh_rows(rows)
    np.testing.assert_array_equal(out[1], _bh.bh_flat(p[::-1]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_block_gather_and_means(dtype):
    rng = np.random.default_rng(3)
    X = (rng.random((30, 7)) * (rng.random((30, 7)) < 0.4)).astype(dtype)
    codes = rng.integers(0, 3, size=30)
    row_order = np.argsort(codes, kind="stable").astype(np.int64)
    row_group = codes[row_order].astype(np.int64)
    sizes = np.bincount(codes, minlength=3).astype(np.int64)
    seg_d, vals_d = _gather.dense_block(X, row_order, row_group, 2, 6, 3, 2)
    Xs = sp.csr_matrix(X)
    Xs.data[0] = 0  # explicit stored zero must be skipped
    Xd = Xs.toarray()
    seg_d2, vals_d2 = _gather.dense_block(Xd, row_order, row_group, 2, 6, 3, 1)
    cursor = Xs.indptr.astype(np.int64)[row_order].copy()
    seg_s, vals_s = _gather.csr_block(
        Xs.indptr.astype(np.int64), Xs.indices, Xs.data, row_order, row_group, cursor, 2, 6, 3, 2
    )
    np.testing.assert_array_equal(seg_s, seg_d2)
    np.testing.assert_array_equal(vals_s, vals_d2)
    for j, g in enumerate(range(2, 6)):
        for grp in range(3):
            s = j * 3 + grp
            rows = np.flatnonzero(codes == grp)
            col = X[rows, g]
            np.testing.assert_array_equal(vals_d[seg_d[s] : seg_d[s + 1]], col[col != 0])
    inv = np.asarray([dtype(1.0 / n) for n in sizes], dtype=dtype)
    out = np.zeros((3, 7), dtype=dtype)
    _means.means_block(seg_d, vals_d, sizes, inv, 3, False, out, 2)
    for grp in range(3):
        np.testing.assert_array_equal(out[grp, 2:6], X[codes == grp][:, 2:6].mean(axis=0))
    out_s = np.zeros((3, 7), dtype=dtype)
    _means.means_block(seg_s, vals_s, sizes, inv, 3, True, out_s, 2)
    for grp in range(3):
        ref = np.asarray(Xs[codes == grp].mean(axis=0)).ravel()
        np.testing.assert_array_equal(out_s[grp, 2:6], ref[2:6])


def test_lfc_pc_zero_rules():
    t = np.array([[0.0, 1.0, 0.0, 2.0]])
    r = np.array([0.0, 0.0, 1.0, 1.0])
    lfc, pc = _means.lfc_pc_rows(t, r)
    assert lfc[0].tolist() == [0.0, math.inf, -math.inf, 1.0]
    assert pc[0].tolist() == [0.0, math.inf, -1.0, 1.0]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 5, 8, 9, 100, 128, 129, 1000, 5003, 40001])
def test_pairwise_sum_equals_numpy(dtype, n):
    rng = np.random.default_rng(n)
    a = (rng.random(n) * 1000).astype(dtype)
    zero = dtype(0.0)
    assert _pairwise.pairwise_sum(a, 0, n, zero) == np.add.reduce(a)
    # an offset slice, as used for a group's rows inside a block
    if n > 10:
        assert _pairwise.pairwise_sum(a, 3, n - 7, zero) == np.add.reduce(a[3 : n - 4])
    # sparse form: zeros everywhere except a few positions
    v = np.zeros(n, dtype=dtype)
    pos = np.sort(rng.choice(n, size=max(1, n // 10), replace=False)).astype(np.int64)
    v[pos] = (rng.random(pos.size) * 1e6).astype(dtype)
    assert _pairwise.pairwise_sum_sparse(pos, v[pos], 0, pos.size, 0, n, zero) == np.add.reduce(v)
    if dtype is np.float32 and n >= 1000:
        # the emulation matters: a plain float64 sum rounded to float32 differs somewhere
        assert any(
            _pairwise.pairwise_sum(b, 0, b.size, zero) != dtype(np.sum(b.astype(np.float64)))
            for b in (a, (a * 7919).astype(dtype), (a**2).astype(dtype))
        )


@pytest.mark.parametrize("seed", range(6))
def test_mwu_test_only_ties_and_shared_runs(seed):
    """Ties inside the test group that no control shares (hash path), ties shared with
    controls (run path), zeros on one or both sides, several tests per gene."""
    rng = np.random.default_rng(100 + seed)
    y = rng.choice([-1.0, 0.0, 1.0, 2.0, 3.7], size=int(rng.integers(5, 60)))
    xs = [
        rng.choice([0.0, 0.5, 1.5, 2.5, 3.7, 9.0], size=int(rng.integers(1, 40))),
        rng.choice([0.5, 0.5000001, 2.0], size=int(rng.integers(1, 20))),  # no zeros at all
        rng.random(int(rng.integers(1, 30))),  # all distinct
    ]
    seg, vals, sizes, ng = _blocks_from_columns([[*xs, y]])
    u = np.empty((3, 1))
    p = np.empty((3, 1))
    _mwu.mwu_block(seg, vals, sizes, 3, np.arange(3, dtype=np.int64), ng, u, p, 0)
    for i, x in enumerate(xs):
        ref = stats.mannwhitneyu(x, y, use_continuity=True, method="asymptotic")
        assert u[i, 0] == ref.statistic
        if np.isnan(ref.pvalue):  # scipy: 0/0 when everything ties; numba_mwu/pdex: p = 1
            assert p[i, 0] == 1.0
        else:
            assert p[i, 0] == pytest.approx(ref.pvalue, rel=1e-12)


# --------------------------------------------------------------------------------------------
# Edge cases of the bucket index and the block kernels (also run under NUMBA_BOUNDSCHECK=1 by
# tests/eval/test_numba_cache.py::test_kernels_in_bounds_under_boundscheck)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("x", "y"),
    [
        # control spread 1.5e-323 (subnormal): (n_distinct) / spread overflows to inf; before the
        # fix int(0 * inf) = int(NaN) = INT64_MIN indexed one slot past the bucket table
        (np.array([1e-323, 3e-323]), np.array([5e-324, 1e-323, 2e-323])),
        (np.array([2e-310, 0.0, 7e-310]), np.array([1e-310, 5e-310, 5e-310, 9e-310, 0.0])),
        # spread overflows to inf the other way (scale 0): one bucket, still exact
        (np.array([-1e308, 0.0, 1e308]), np.array([-1.5e308, 3.0, 1.7e308, 1.7e308])),
        (np.array([1.0, 2.0]), np.array([4.0])),  # a single control cell
        (np.array([1.0, 0.0, 3.0]), np.zeros(5)),  # all-zero control: one run, nothing stored
        (np.zeros(3), np.array([0.0, 0.0, 2.0])),  # all-zero test group
    ],
)
def test_mwu_extreme_spreads_and_tiny_groups(x, y):
    u1, p = _run_mwu(x, y)
    ref = stats.mannwhitneyu(x, y, use_continuity=True, method="asymptotic")
    assert u1 == ref.statistic
    # scipy and numba_mwu/pdex evaluate z in a different order: equal to ~1 ulp
    assert p == pytest.approx(ref.pvalue, rel=1e-12)


def test_bucket_index_is_bounded_and_monotone():
    for cv in (np.array([5e-324, 1e-323, 2e-323]), np.array([0.0, 1e-300, 2e-300]), np.array([-1e308, 1e308])):
        nd = cv.size
        first, scale = _mwu._bucket_index(cv, nd)
        assert np.isfinite(scale)
        assert first.shape == (nd + 2,) and first.min() >= 0 and first.max() <= nd
        assert (np.diff(first) >= 0).all()
        for v in (*cv, *(0.5 * (cv[:-1] + cv[1:]))):
            a = _mwu._locate(v, cv, nd, first, scale)
            assert a == np.searchsorted(cv, v, side="left")
    assert _mwu._bucket(1.0, np.inf, 7) == 7
    assert _mwu._bucket(0.0, np.inf, 7) == 7  # NaN product -> top, never INT64_MIN
    assert _mwu._bucket(2.5, 1.0, 7) == 2
    assert _mwu._bucket(0.0, 3.0, 7) == 0


def test_csr_block_int64_indices_and_empty_rows():
    rng = np.random.default_rng(11)
    X = (rng.random((12, 9)) * (rng.random((12, 9)) < 0.3)).astype(np.float64)
    X[4] = 0.0  # an empty row
    Xs = sp.csr_matrix(X)
    codes = rng.integers(0, 3, size=12)
    row_order = np.argsort(codes, kind="stable").astype(np.int64)
    row_group = codes[row_order].astype(np.int64)
    for idx_dtype in (np.int32, np.int64):
        indices = Xs.indices.astype(idx_dtype)
        cursor = Xs.indptr.astype(np.int64)[row_order].copy()
        got = []
        for g0, g1 in ((0, 4), (4, 9)):
            seg, vals = _gather.csr_block(
                Xs.indptr.astype(np.int64), indices, Xs.data, row_order, row_group, cursor, g0, g1, 3, 2
            )
            ref_seg, ref_vals = _gather.dense_block(X, row_order, row_group, g0, g1, 3, 1)
            np.testing.assert_array_equal(seg, ref_seg)
            np.testing.assert_array_equal(vals, ref_vals)
            got.append(vals.size)
        assert sum(got) == np.count_nonzero(X)
