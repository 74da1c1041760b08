"""The six VCC 2026 metrics of one context (celltwin.eval.v2026._metrics and the modules it uses).

Hand-computed values on tiny matrices (pds_cosine, the expression metric's two legs, sig_jaccard,
direction fidelity and reach), the input rule (check_counts), the jackknife's series form against
its direct form, and the ``reference`` comparisons: cell-eval2 0.20.0 ``--preset vcc2026``
(``compute_metrics`` + ``aggregate_metrics``) on the same randomised contexts - ties everywhere
(Poisson counts), groups of 1, 2 and 3 cells, a perturbation predicted as the control (an all-tied
PDS row), two identical predictions, a label that is no gene, genes below the CPM filter, a
perturbation whose only significant gene is its own target, groups large enough for the
jackknife series - over CSR / dense and float32 / float64 input; every per-perturbation value and
every aggregate within 1e-9, the DE tables bit for bit. Also the replicate's ``control_source:
pred`` scoring, a fractional (baseline-like) prediction, a target-gene map, and the lfc_nmae
replicate estimator.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltwin.errors import ConfigError, InputError
from celltwin.eval.v2026 import _config as C
from celltwin.eval.v2026 import _counts, _de
from celltwin.eval.v2026 import _de_metrics as DM
from celltwin.eval.v2026 import _jackknife as JK
from celltwin.eval.v2026 import _metrics as M

CTRL = "non-targeting"
TOL = 1e-9
ref = pytest.mark.reference


# ---------------------------------------------------------------------------------------------- data
def _context(seed: int = 0, *, fmt: str = "csr", dtype=np.float32, n_genes: int = 150):
    """A randomised context (real, pred) with every edge case of the module docstring.

    Returns ``(real, pred, info)``: ContextCounts; ``info["solo"]`` is the perturbation whose only
    reference-significant gene is its own target, ``info["ctrl_pred"]`` the one predicted as the
    reference's control cells, ``info["twins"]`` the two identical predictions.
    """
    rng = np.random.default_rng(seed)
    genes = [f"G{i:03d}" for i in range(n_genes)]
    rates = rng.gamma(0.5, 3.0, n_genes)
    rates[140:] = 0.0  # silent in the control (below its CPM filter), expressed by some perturbations
    solo = "G010"
    rates[10] = 8.0
    perts = [*genes[:10], solo, "NOTAGENE"]
    sizes = {"G000": 1, "G001": 2, "G002": 3, "G005": 120}
    model = {}
    for k, p in enumerate(perts):
        mu = rates.copy()
        if p != solo:
            hit = rng.choice(120, 12, replace=False)
            mu[hit] *= rng.choice([0.15, 5.0], 12)
        if p in genes:
            mu[genes.index(p)] *= 0.05 if p != solo else 0.0
        if k % 2 and p != solo:
            mu[140:] = 0.4
        model[p] = mu

    def draw(mu, n):
        lib = rng.uniform(0.6, 1.4, n)
        return rng.poisson(mu[None, :] * lib[:, None]).astype(np.float64)

    blocks, labels = [draw(rates, 160)], [CTRL] * 160
    for p in perts:
        n = sizes.get(p, int(rng.integers(8, 40)))
        if p == solo:  # control cells with the own gene knocked out: nothing else moves
            x = blocks[0][rng.choice(160, n, replace=False)].copy()
            x[:, genes.index(solo)] = 0.0
        else:
            x = draw(model[p], n)
        blocks.append(x)
        labels += [p] * n
    Xr = np.vstack(blocks)
    lr = np.array(labels)
    ctrl_rows = Xr[lr == CTRL]

    pblocks, plabels = [], []
    for p in perts:
        if p == "G003":
            x = ctrl_rows.copy()  # the reference's control cells: a zero effect
        elif p == "G006":
            x = pblocks[plabels.index("G004")]  # identical to G004's prediction
        elif p == solo:
            x = Xr[lr == solo].copy()
        else:
            x = draw(model[p], int(rng.integers(1, 30)))
        pblocks.append(x)
        plabels.append(p)
    order = rng.permutation(len(perts))  # the prediction's groups in another order
    Xp = np.vstack([pblocks[i] for i in order] + [ctrl_rows[:7]])
    lp = np.concatenate([[plabels[i]] * pblocks[i].shape[0] for i in order] + [[CTRL] * 7])

    def store(X):
        X = X.astype(dtype)
        return sp.csr_matrix(X) if fmt == "csr" else X

    real = C.ContextCounts(X=store(Xr), perts=lr, genes=genes)
    pred = C.ContextCounts(X=store(Xp), perts=lp, genes=genes)
    return real, pred, {"solo": solo, "ctrl_pred": "G003", "twins": ("G004", "G006")}


def _anndata(cc: C.ContextCounts):
    ad = pytest.importorskip("anndata")
    obs = pd.DataFrame({"target": np.asarray(cc.perts).astype(str)}, index=[f"c{i}" for i in range(len(cc.perts))])
    return ad.AnnData(X=cc.X, obs=obs, var=pd.DataFrame(index=list(cc.genes)))


def _cell_eval2(real, pred, **overrides):
    """cell-eval2 0.20.0 ``--preset vcc2026`` on (real, pred): (per-perturbation frame, aggregates)."""
    ce = pytest.importorskip("cell_eval2")
    logging.getLogger("cell_eval2").setLevel(logging.ERROR)
    cfg = replace(ce.EvalConfig.from_preset("vcc2026"), **overrides)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tidy = ce.compute_metrics(pred if not isinstance(pred, C.ContextCounts) else _anndata(pred),
                                  real if not isinstance(real, C.ContextCounts) else _anndata(real), config=cfg)
        agg = ce.aggregate_metrics(tidy)
    per = tidy.to_pandas().pivot(index="perturbation", columns="metric", values="value")
    return per, dict(zip(agg["metric"].to_list(), agg["mean"].to_list(), strict=True))


def _assert_same(res: C.V2026Result, per: pd.DataFrame, agg: dict[str, float]) -> float:
    """Every per-perturbation value (NaN where cell-eval2 has none) and aggregate within TOL."""
    worst = 0.0
    assert sorted(per.index) == list(res.per_pert.index)
    for m in C.PER_PERT_COLUMNS:
        # cell-eval2 emits no row where a metric is undefined (lfc_nmae outside its gate): NaN
        col = per[m] if m in per else pd.Series(np.nan, index=per.index)
        theirs = col.reindex(res.per_pert.index).to_numpy(dtype=np.float64)
        ours = res.per_pert[m].to_numpy()
        np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs), err_msg=m)
        ok = ~np.isnan(ours)
        if ok.any():
            d = float(np.max(np.abs(ours[ok] - theirs[ok])))
            assert d <= TOL, (m, d)
            worst = max(worst, d)
    for m in C.AGG_METRICS:
        a, b = res.agg[m], agg.get(m, math.nan)
        assert (math.isnan(a) and math.isnan(b)) or abs(a - b) <= TOL, (m, a, b)
        if not math.isnan(a):
            worst = max(worst, abs(a - b))
    return worst


# ------------------------------------------------------------------------------------ hand-computed
def test_pds_and_expression_by_hand():
    """Three perturbations with orthogonal / opposite effects on 4 genes, equal cell totals.

    Control cells [10,10,10,10]; real A [20,0,10,10], B [10,10,20,0], C [0,20,10,10], so with
    TS = 5e4 the effects are A = (x, -y, 0, 0), B = (0, 0, x, -y), C = (-y, x, 0, 0),
    x = log(25001/12501), y = log1p(12500); every group has identical cells, so every jackknife
    correction is 0. Predicted: A = A's cells (PDS 1), B = the control's cells (zero effect: all
    distances 1, mid-rank 1 of 2, PDS 0.5), C = A's cells (its own effect is the farthest: PDS 0).
    """
    ctrl = [[10, 10, 10, 10]] * 4
    a, b, c = [[20, 0, 10, 10]] * 3, [[10, 10, 20, 0]] * 3, [[0, 20, 10, 10]] * 3
    genes = ["g0", "g1", "g2", "g3"]
    targets = {"A": None, "B": None, "C": None}
    real = C.ContextCounts(X=sp.csr_matrix(np.array(ctrl + a + b + c, float)),
                           perts=np.array([CTRL] * 4 + ["A"] * 3 + ["B"] * 3 + ["C"] * 3), genes=genes)
    pred = C.ContextCounts(X=np.array(a[:2] + ctrl[:3] + a, np.float32),
                           perts=np.array(["A"] * 2 + ["B"] * 3 + ["C"] * 3), genes=genes)
    res = M.score_context(real, pred, targets=targets)
    pp = res.per_pert
    assert pp.loc["A", C.PDS] == 1.0
    assert pp.loc["B", C.PDS] == 0.5
    assert pp.loc["C", C.PDS] == 0.0
    assert res.agg[C.PDS] == 0.5
    x, y = math.log(25001 / 12501), math.log1p(12500)
    np.testing.assert_allclose(pp[C.EXPR_D].to_numpy(), [(x * x + y * y) / 4] * 3, rtol=1e-13)
    np.testing.assert_allclose(pp[C.EXPR_N].to_numpy(), [0.0, (x * x + y * y) / 4, (x + y) ** 2 / 2],
                               rtol=1e-13, atol=1e-13)
    expect = ((x * x + y * y) / 4 + (x + y) ** 2 / 2) / (3 * (x * x + y * y) / 4)
    assert res.agg[C.EXPR] == pytest.approx(expect, rel=1e-13)


def test_sig_jaccard_fidelity_reach_by_hand():
    """Equal cell totals (80), 8 genes, 20 perturbed cells against 40 control cells: a gene whose
    values separate the groups completely is significant (p ~ 1e-14), one equal in every cell has
    p = 1. Real A moves g0 up, g1 and g2 down: R = {g0, g1, g2}. Predicted A moves g0 up, g2 and g3
    down: P = {g0, g2, g3}, so Jaccard = 2 / 4. Fidelity: g3's real lfc is exactly 0 (not
    adjudicable), so n_pred = 2 (g0, g2), both with the right sign: k = 2, n_conf = 3 -> 2/3.
    Reach: pool R ordered by predicted significance, then equal p-values, then |lfc| descending:
    g2 (lfc ~ -56.8), g0 (log2 3), then g1 (predicted lfc 0: a miss) -> purity 1, 1, 2/3: k* = 2,
    2/3. B: nothing moves on either side: Jaccard 1 (empty union), fidelity and reach undefined.
    """
    ctrl = [[10] * 8] * 40
    real_a = [[30, 0, 0, 10, 10, 10, 10, 10]] * 20
    pred_a = [[30, 10, 0, 0, 10, 10, 10, 10]] * 20
    genes = [f"g{i}" for i in range(8)]
    targets = {"A": None, "B": None}
    real = C.ContextCounts(X=np.array(ctrl + real_a + ctrl[:20], float),
                           perts=np.array([CTRL] * 40 + ["A"] * 20 + ["B"] * 20), genes=genes)
    pred = C.ContextCounts(X=sp.csr_matrix(np.array(pred_a + ctrl[:20], float)),
                           perts=np.array(["A"] * 20 + ["B"] * 20), genes=genes)
    res = M.score_context(real, pred, targets=targets)
    pp = res.per_pert
    assert pp.loc["A", C.JACCARD] == 0.5
    assert pp.loc["B", C.JACCARD] == 1.0
    assert pp.loc["A", C.FIDELITY] == pytest.approx(2 / 3, abs=0)
    assert math.isnan(pp.loc["B", C.FIDELITY])
    assert pp.loc["A", C.REACH] == pytest.approx(2 / 3, abs=0)
    assert math.isnan(pp.loc["B", C.REACH])
    assert pp[C.NMAE].isna().all()  # gates of 3 and 0 genes (< 10)
    assert res.agg[C.JACCARD] == 0.75
    table = res.extra["de_real"]
    np.testing.assert_array_equal(np.flatnonzero(table.p_adj[0] < 0.05), [0, 1, 2])
    assert table.lfc[0, 0] == pytest.approx(math.log2(3), rel=1e-12)


# ---------------------------------------------------------------------------------------- the rule
@pytest.mark.parametrize("fmt", ["csr", "dense"])
@pytest.mark.parametrize(
    ("value", "rule"),
    [(-1.0, "non-negative"), (0.5, "integral"), (np.nan, "finite"), (np.inf, "finite")],
)
def test_check_counts_refuses_values(fmt, value, rule):
    X = np.zeros((4, 5), dtype=np.float32)
    X[0, 0] = 3
    X[2, 3] = value
    M_ = sp.csr_matrix(X) if fmt == "csr" else X
    with pytest.raises(InputError, match=rf"pred\.h5ad: .*{rule}.*row 2, gene column 3"):
        _counts.check_counts(M_, "pred.h5ad")


@pytest.mark.parametrize("fmt", ["csr", "dense", "int"])
def test_check_counts_cell_total(fmt):
    X = np.zeros((3, 4), dtype=np.float64)
    X[1] = [250_000, 250_000, 250_000, 250_000]  # exactly 1e6: allowed
    X[2, 0] = 7
    conv = {"csr": sp.csr_matrix, "dense": np.asarray, "int": lambda a: sp.csr_matrix(a.astype(np.int64))}[fmt]
    _counts.check_counts(conv(X), "ok")
    X[1, 0] += 1
    with pytest.raises(InputError, match=r"no cell may total more than 1e\+06.*row 1 totals 1e\+06"):
        _counts.check_counts(conv(X), "big")
    with pytest.raises(InputError, match="non-negative"):
        _counts.check_counts(sp.csr_matrix(np.array([[1, -2]], dtype=np.int32)), "neg")
    _counts.check_counts(np.array([[0.5, 1.0]]), "fractional allowed", integral=False)


def test_config_and_input_errors():
    with pytest.raises(ConfigError, match="p_adj_threshold"):
        C.V2026Config(p_adj_threshold=0.0)
    with pytest.raises(ConfigError, match="min_gate_size"):
        C.V2026Config(min_gate_size=0)
    real, pred, _ = _context(1, n_genes=150)
    rs = M.prepare_real(real)
    with pytest.raises(InputError, match="another V2026Config"):
        M.score_context(real, pred, real_stats=rs, config=C.V2026Config(p_adj_threshold=0.01))
    bad = C.ContextCounts(X=pred.X, perts=np.where(pred.perts == "G007", "OTHER", pred.perts), genes=pred.genes)
    with pytest.raises(InputError, match="1 missing .*'G007'.*1 not in the reference .*'OTHER'"):
        M.score_context(real, bad, real_stats=rs)
    swapped = C.ContextCounts(X=pred.X, perts=pred.perts, genes=[*pred.genes[1:], pred.genes[0]])
    with pytest.raises(InputError, match="gene axis differs"):
        M.score_context(real, swapped, real_stats=rs)
    neg = C.ContextCounts(X=-sp.csr_matrix(pred.X), perts=pred.perts, genes=pred.genes)
    with pytest.raises(InputError, match="non-negative"):
        M.score_context(real, neg, real_stats=rs)
    nogene = C.ContextCounts(X=real.X, perts=np.where(real.perts == CTRL, CTRL, "X" + real.perts), genes=real.genes)
    with pytest.raises(InputError, match="no perturbation label names a measured gene"):
        M.prepare_real(nogene)
    M.prepare_real(nogene, targets={"*": None})  # declared: no target genes


def test_prepared_reference_and_control_rows_are_reused():
    real, pred, _ = _context(2)
    rs = M.prepare_real(real)
    a = M.score_context(real, pred)
    b = M.score_context(None, pred, real_stats=rs)
    keep = pred.perts != CTRL
    c = M.score_context(real, C.ContextCounts(X=pred.X[keep], perts=pred.perts[keep], genes=pred.genes), real_stats=rs)
    for r in (b, c):
        pd.testing.assert_frame_equal(a.per_pert, r.per_pert, check_exact=True)
        assert a.agg == r.agg


# ------------------------------------------------------------------------------------- jackknife
def test_jackknife_series_matches_direct():
    rng = np.random.default_rng(3)
    G, sizes = 300, [2, 3, 5, 9, 20, 40, 150, 400, 1500]
    X = sp.csr_matrix(np.vstack([
        rng.poisson(rng.gamma(0.3, 4.0, G)[None] * rng.uniform(0.5, 1.6, n)[:, None]) for n in sizes
    ]).astype(np.float32))
    labels = np.repeat([str(k) for k in range(len(sizes))], sizes)
    g = _de.group_rows(labels, [str(k) for k in range(len(sizes))])
    P = _counts.group_sums(X, g.order, g.bounds, "x")
    lib = _counts.cell_totals(X)
    fast = JK.jackknife(X, g.order, g.bounds, P, lib, 5e4)
    direct = JK.jackknife(X, g.order, g.bounds, P, lib, 5e4, direct=True)
    np.testing.assert_allclose(fast, direct, rtol=1e-12)
    assert (fast[1:] > 0).all()


def test_jackknife_bitwise_whatever_the_thread_count():
    # the accumulator chunks are fixed, not the thread count: a bundle built on 8 cores is reused
    # on 2 with the same bits (the 1-ulp drift this test guards against broke bundle reuse)
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread")
    rng = np.random.default_rng(5)
    G, sizes = 200, [7, 300, 1200]
    X = sp.csr_matrix(np.vstack([
        rng.poisson(rng.gamma(0.3, 4.0, G)[None] * rng.uniform(0.5, 1.6, n)[:, None]) for n in sizes
    ]).astype(np.float32))
    labels = np.repeat(["a", "b", "c"], sizes)
    g = _de.group_rows(labels, ["a", "b", "c"])
    P = _counts.group_sums(X, g.order, g.bounds, "x")
    lib = _counts.cell_totals(X)
    prev = numba.get_num_threads()
    got = []
    try:
        for n in (1, 2):
            numba.set_num_threads(n)
            got.append(JK.jackknife(X, g.order, g.bounds, P, lib, 5e4))
    finally:
        numba.set_num_threads(prev)
    assert got[0].tobytes() == got[1].tobytes()
    assert (got[0] > 0).all()


def test_mwu_merge_matches_mwu_block():
    """The sort-and-walk Mann-Whitney kernel gives mwu_block's (numba_mwu's) bits: heavy ties
    within and across groups, all-zero genes, groups of 1 cell, long runs (radix path)."""
    from celltwin.eval import _mwu

    rng = np.random.default_rng(12)
    sizes = np.array([1, 2, 7, 60, 300, 150], dtype=np.int64)  # last group: the control
    k, n_groups, n_genes = 5, 6, 40
    seg, vals = [0], []
    for j in range(n_genes):
        for grp in range(n_groups):
            m = 0 if j == 0 else int(rng.binomial(sizes[grp], rng.uniform(0.05, 1.0)))
            pool = rng.uniform(0.5, 9.0, 3 if j % 2 else 500)
            vals.append(np.log1p(rng.choice(pool, m)))
            seg.append(seg[-1] + m)
    seg_ptr, v = np.asarray(seg, dtype=np.int64), np.concatenate(vals)
    u1, p1, u2, p2 = (np.empty((k, n_genes)) for _ in range(4))
    _mwu.mwu_block(seg_ptr, v, sizes, k, np.arange(k, dtype=np.int64), n_groups, u1, p1, 0)
    _de.mwu_merge_block(seg_ptr, v, sizes, k, u2, p2, 0)
    np.testing.assert_array_equal(u1, u2)
    np.testing.assert_array_equal(p1, p2)
    assert (p1[:, 0] == 1.0).all() and (p1 < 1e-3).any()


def test_sort_keys_sorts():
    rng = np.random.default_rng(13)
    for m in (0, 1, 5, 63, 64, 200, 5000, 40000):
        for kind in ("spread", "clustered", "ties"):
            if kind == "spread":
                v = np.log1p(rng.integers(1, 50, m) / rng.uniform(0.005, 0.05, m))
            elif kind == "clustered":  # thousands of distinct values inside one top-16-bit bucket
                v = 3.0 + rng.uniform(0, 1e-9, m)
            else:
                v = rng.choice([1.5, 2.5, 7.0], m)
            keys = v.view(np.uint64).copy()
            grp = np.arange(m, dtype=np.int32)
            _de._sort_keys(keys, grp, np.empty_like(keys), np.empty_like(grp), m)
            np.testing.assert_array_equal(keys.view(np.float64), np.sort(v))
            np.testing.assert_array_equal(v[grp], keys.view(np.float64))


@ref
def test_jackknife_matches_cell_eval2():
    moments = pytest.importorskip("cell_eval2.moments")
    rng = np.random.default_rng(4)
    G, sizes = 200, [1, 2, 4, 25, 300]
    X = sp.csr_matrix(np.vstack([
        rng.poisson(rng.gamma(0.4, 3.0, G)[None] * rng.uniform(0.5, 1.6, n)[:, None]) for n in sizes
    ]).astype(np.float64))
    codes = np.repeat(np.arange(len(sizes)), sizes)
    theirs = moments.jackknife_correction(X, codes, len(sizes), 5e4)
    g = _de.group_rows(codes.astype(str), [str(k) for k in range(len(sizes))])
    ours = JK.jackknife(X, g.order, g.bounds, _counts.group_sums(X, g.order, g.bounds, "x"), _counts.cell_totals(X), 5e4)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-300)


# ----------------------------------------------------------------------------- against cell-eval2
@ref
@pytest.mark.parametrize("fmt", ["csr", "dense"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_matches_cell_eval2(fmt, dtype):
    real, pred, info = _context(5, fmt=fmt, dtype=dtype)
    res = M.score_context(real, pred)
    per, agg = _cell_eval2(real, pred)
    _assert_same(res, per, agg)
    pp = res.per_pert
    # the edge cases are realised
    assert pp.loc[info["ctrl_pred"], C.PDS] == 0.5  # zero effect: an all-tied row
    t0, t1 = info["twins"]
    assert pp.loc[t0, C.EXPR_N] != pp.loc[t1, C.EXPR_N]
    table = res.extra["de_real"]
    k = table.perts.index(info["solo"])
    assert [real.genes[j] for j in np.flatnonzero(table.p_adj[k] < 0.05)] == [info["solo"]]
    assert pp.loc[info["solo"], C.JACCARD] == 1.0  # its only significant gene is excluded
    assert not table.kept[140:].any() and table.kept[:140].any()
    assert pp[C.NMAE].isna().any() and pp[C.NMAE].notna().any()


@ref
@pytest.mark.parametrize("fmt", ["csr", "dense"])
def test_de_tables_bit_identical(fmt):
    de_compute = pytest.importorskip("cell_eval2.de_compute")
    real, _pred, _ = _context(6, fmt=fmt, dtype=np.float32 if fmt == "csr" else np.float64)
    theirs = de_compute.compute_de(
        _anndata(real), backend="pdex", groupby="target", reference=CTRL, mean_calc="arithmetic",
        epsilon=1e-9, input_type="counts", target_sum=1e6, filter_gene_min_cpm_cell=5.0,
        fdr_scope="per_pert", threads=1,
    ).to_pandas()
    ours = M.prepare_real(real).de
    k = theirs["target"].map({p: i for i, p in enumerate(ours.perts)}).to_numpy()
    j = theirs["feature"].map({g: i for i, g in enumerate(real.genes)}).to_numpy()
    assert len(theirs) == len(ours.perts) * int(ours.kept.sum())
    assert set(j.tolist()) == set(np.flatnonzero(ours.kept).tolist())
    for col, arr in (("log2_fold_change", ours.lfc), ("p_value", ours.p_value), ("p_adj", ours.p_adj)):
        np.testing.assert_array_equal(theirs[col].to_numpy(), arr[k, j], err_msg=col)


@ref
def test_mixed_formats_match_cell_eval2():
    """A dense prediction against a CSR reference: cell-eval2 concatenates them into a CSR matrix
    for the prediction's DE (its means then take scipy's sparse route)."""
    real, _, _ = _context(7, fmt="csr", dtype=np.float32)
    _, pred, _ = _context(7, fmt="dense", dtype=np.float64)
    res = M.score_context(real, pred)
    _assert_same(res, *_cell_eval2(real, pred))


@ref
def test_replicate_split_own_controls_match_cell_eval2():
    """cell-eval2's replicate scores half B against half A with ``control_source: pred``."""
    ceiling = pytest.importorskip("cell_eval2.ceiling")
    real, _, _ = _context(8)
    half_a, half_b = ceiling._disjoint_halves(_anndata(real), "target", CTRL, 2718)
    per, agg = _cell_eval2(half_a, half_b, control_source="pred")
    la, lb = (np.asarray(h.obs["target"]).astype(str) for h in (half_a, half_b))
    A = C.ContextCounts(X=half_a.X, perts=la, genes=real.genes)
    B = C.ContextCounts(X=half_b.X, perts=lb, genes=real.genes)
    res = M.score_context(A, B, pred_controls=half_b.X[lb == CTRL])
    _assert_same(res, per, agg)
    res2 = M.score_context(A, B, pred_controls=C.ContextCounts(X=half_b.X[lb == CTRL], perts=lb[lb == CTRL],
                                                                genes=real.genes))
    assert res2.agg == res.agg


@ref
def test_fractional_prediction_matches_cell_eval2():
    """The mean-response baseline is fractional and scored without the integrality rule."""
    real, _, _ = _context(9)
    rng = np.random.default_rng(9)
    Xp = sp.csr_matrix(real.X, dtype=np.float64).multiply(rng.uniform(0.3, 2.0, len(real.genes))[None, :])
    pred = C.ContextCounts(X=sp.csr_matrix(Xp, dtype=np.float32), perts=real.perts, genes=real.genes)
    res = M.score_context(real, pred)
    _assert_same(res, *_cell_eval2(real, pred, allow_fractional_counts=True))


@ref
def test_target_gene_map_matches_cell_eval2():
    real, pred, _ = _context(10)
    targets = {"NOTAGENE": "G020", "G001": None, "G002": "G030"}
    res = M.score_context(real, pred, targets=targets)
    _assert_same(res, *_cell_eval2(real, pred, target_gene_map=targets))


@ref
def test_lfc_nmae_replicate_matches_cell_eval2():
    ce = pytest.importorskip("cell_eval2")
    ceiling = pytest.importorskip("cell_eval2.ceiling")
    from cell_eval2.lfc_nmae_ref import compute_lfc_nmae_reference

    real, _, _ = _context(11)
    real = C.ContextCounts(X=real.X, perts=np.where(np.isin(real.perts, ["G000"]), CTRL, real.perts), genes=real.genes)
    ad_real = _anndata(real)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results, agg = compute_lfc_nmae_reference(ad_real, config=ce.EvalConfig.from_preset("vcc2026"), seed=31)
    half_a, half_b = ceiling._disjoint_halves(ad_real, "target", CTRL, 31)
    rs = M.prepare_real(real)
    tables = [DM.de_arrays(C.ContextCounts(X=h.X, perts=np.asarray(h.obs["target"]).astype(str), genes=real.genes))
              for h in (half_a, half_b)]
    mean, n, values = DM.lfc_nmae_with_gate(DM.de_arrays(real, real_stats=rs), *tables, genes=real.genes)
    theirs = results.to_pandas().set_index("perturbation")["nmae_ref_raw"]
    assert n == int(agg["n_perturbations"][0]) == len(theirs) > 0
    assert sorted(values) == sorted(theirs.index)
    for p, v in values.items():
        assert abs(v - theirs[p]) <= TOL
    assert abs(mean - float(agg["nmae_ref_raw"][0])) <= TOL
