"""Baselines on hand-made data: every rule and fallback checked against numbers computed by hand."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp

from celltwin.baselines import BASELINES, BaselineConfig, fit_baseline, group_means, load_baseline
from celltwin.errors import ConfigError, InputError

CTRL = "non-targeting"
GENES = ["p1", "p2", "p3"]  # genes named like the targets, so the linear baseline can embed them

# context A controls mean [1,1,1]; context B controls mean [2,0,0]
# A/p1 effect [1,0,0] (2 cells), A/p2 [0,2,0] (1 cell), B/p1 [2,0,0] (1), B/p3 [0,0,3] (1)
ROWS = [
    ("A", CTRL, [1, 1, 1]), ("A", CTRL, [1, 1, 1]),
    ("A", "p1", [2, 1, 1]), ("A", "p1", [2, 1, 1]),
    ("A", "p2", [1, 3, 1]),
    ("B", CTRL, [2, 0, 0]), ("B", CTRL, [2, 0, 0]),
    ("B", "p1", [4, 0, 0]),
    ("B", "p3", [2, 0, 3]),
]


def _data(kind="dense", dtype=np.float64):
    X = np.array([r[2] for r in ROWS], dtype=dtype)
    X = sp.csr_matrix(X) if kind == "csr" else X
    perts = np.array([r[1] for r in ROWS])
    ctxs = np.array([r[0] for r in ROWS])
    return X, perts, ctxs


def _fit(name, kind="dense", dtype=np.float64, **kw):
    X, perts, ctxs = _data(kind, dtype)
    model, dropped = fit_baseline(BaselineConfig(name=name, **kw), X, perts, ctxs, GENES, CTRL)
    return model, dropped


EXPECTED = [
    # (model, pert, context, delta, source)
    ("control", "p1", "A", [0, 0, 0], "model"),
    ("cell-mean", "p9", "A", [2 / 3, 2 / 3, 0], "model"),
    ("cell-mean", "p9", "C", [4 / 5, 2 / 5, 3 / 5], "model"),  # unknown context: all 5 perturbed cells
    ("perturbation-mean", "p9", "A", [0.5, 1, 0], "model"),
    ("perturbation-mean", "p9", "C", [0.75, 0.5, 0.75], "model"),
    ("context-transfer", "p1", "A", [2, 0, 0], "model"),
    ("context-transfer", "p3", "A", [0, 0, 3], "model"),
    ("context-transfer", "p1", "C", [1.5, 0, 0], "model"),  # mean over A and B, each context once
    ("context-transfer", "p2", "A", [2 / 3, 2 / 3, 0], "fallback:cell-mean"),  # p2 only in A itself
    ("scaled-context-transfer", "p3", "A", [0, 0, 1.5], "model"),  # alpha_A = 2/4
    ("scaled-context-transfer", "p2", "B", [0, 2 * 2, 0], "model"),  # alpha_B = 2/1
    ("scaled-context-transfer", "p1", "C", [1.2, 0, 0], "model"),  # pooled alpha = 4/5
    ("scaled-context-transfer", "p9", "B", [1, 0, 1.5], "fallback:cell-mean"),
    ("additive", "p1+p2", "A", [1, 2, 0], "model"),
    ("additive", "p1", "B", [2, 0, 0], "model"),
    ("additive", "p1+p3", "A", [2 / 3, 2 / 3, 0], "fallback:cell-mean"),
    ("additive", "p1+p2", "C", [4 / 5, 2 / 5, 3 / 5], "fallback:cell-mean"),
    ("linear", "pX", "A", [2 / 3, 2 / 3, 0], "fallback:cell-mean"),  # target gene not measured
]


@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("name", "pert", "ctx", "delta", "source"), EXPECTED)
def test_shift_hand_computed(kind, dtype, name, pert, ctx, delta, source):
    model, _ = _fit(name, kind, dtype)
    got, src = model.shift(pert, ctx)
    np.testing.assert_allclose(got, delta, rtol=1e-6, atol=1e-7)
    assert src == source
    assert model.describe(pert, ctx) == source


def test_predict_adds_shift_and_clips_at_zero():
    model, _ = _fit("context-transfer")
    # shift for p3 in A is [0,0,3]; for p2 in B is [0,2,0]
    controls = np.array([[0.5, 0.0, 1.0], [0.0, 2.0, 0.0]], dtype=np.float32)
    out = model.predict(controls, "p3", "A", np.random.default_rng(0))
    assert out.dtype == np.float32
    np.testing.assert_allclose(out, [[0.5, 0.0, 4.0], [0.0, 2.0, 3.0]])
    # a negative shift clips at 0: cell-mean shift [-1, 0] here
    X = np.array([[1.0, 1.0], [1.0, 1.0], [0.0, 1.0]])
    m, _ = fit_baseline(BaselineConfig("cell-mean"), X, np.array([CTRL, CTRL, "g"]), np.array(["A"] * 3),
                        ["g", "h"], CTRL)
    np.testing.assert_allclose(m.predict(np.array([[0.25, 3.0]]), "g", "A", None), [[0.0, 3.0]])


def test_linear_solution_is_the_ridge_formula_and_embeds_unseen_genes():
    rng = np.random.default_rng(3)
    G, C = 12, 2
    genes = [f"g{i}" for i in range(G)]
    rows, perts, ctxs = [], [], []
    for c in range(C):
        base = rng.gamma(2.0, 1.0, size=G)
        for _ in range(3):
            rows.append(base)
            perts.append(CTRL)
            ctxs.append(f"c{c}")
        for p in range(6):
            rows.append(base + rng.normal(0, 1, size=G))
            perts.append(f"g{p}")
            ctxs.append(f"c{c}")
    X = np.array(rows)
    for lam in (0.0, 0.1):
        model, _ = fit_baseline(BaselineConfig("linear", linear_dim=3, linear_ridge=lam), X, np.array(perts),
                                np.array(ctxs), genes, CTRL)
        t = model.table
        E, W = model.params["embedding"], model.params["W"]
        assert E.shape == (G, 3) and W.shape == (3, 3)
        b = np.stack([t.pert_mean_shift(int(c))[0] for c in t.pair_context])
        Y = (t.pair_effect - b).T  # (G, P)
        P = E[[genes.index(p) for p in t.pair_pert]]
        # W is the paper's closed form; independently re-derived here with explicit inverses
        W_ref = np.linalg.inv(E.T @ E + lam * np.eye(3)) @ E.T @ Y @ P @ np.linalg.inv(P.T @ P + lam * np.eye(3))
        np.testing.assert_allclose(W, W_ref, rtol=1e-8, atol=1e-10)
        if lam == 0.0:  # least-squares optimum: the gradient vanishes
            np.testing.assert_allclose(E.T @ (Y - E @ W @ P.T) @ P, 0, atol=1e-8)
        # an unseen perturbation of a measured gene: b_c + E W E[g]
        got, src = model.shift("g9", "c1")
        np.testing.assert_allclose(got, t.pert_mean_shift(1)[0] + E @ W @ E[9], rtol=1e-10)
        assert src == "model"
        # a combination sums the embedding rows
        got, _ = model.shift("g9+g10", "c0")
        np.testing.assert_allclose(got, t.pert_mean_shift(0)[0] + E @ W @ (E[9] + E[10]), rtol=1e-10)
    # the gene embedding is the PCA scores of the genes (columns centred over genes)
    Rc = Y - Y.mean(0, keepdims=True)
    U, S, _ = np.linalg.svd(Rc, full_matrices=False)
    np.testing.assert_allclose(np.abs(E), np.abs(U[:, :3] * S[:3]), rtol=1e-8)


def test_min_cells_drops_small_pairs_and_records_them():
    model, dropped = _fit("cell-mean", min_cells=2)
    assert dropped == ["A/p2 (1 cells)", "B/p1 (1 cells)", "B/p3 (1 cells)"]
    assert model.table.pair_pert == ["p1"]
    np.testing.assert_allclose(model.shift("p9", "A")[0], [1, 0, 0])


def test_context_without_controls_is_a_clear_error():
    X = np.ones((3, 2))
    with pytest.raises(InputError, match="context 'B' has perturbed cells .* but no control cells"):
        fit_baseline(BaselineConfig("cell-mean"), X, np.array([CTRL, "p", "p"]), np.array(["A", "A", "B"]),
                     ["a", "b"], CTRL)


def test_config_validation():
    with pytest.raises(ConfigError, match="expected one of"):
        BaselineConfig("nope")
    with pytest.raises(ConfigError, match="min_cells"):
        BaselineConfig("cell-mean", min_cells=0)
    with pytest.raises(ConfigError, match="unknown option 'foo'"):
        BaselineConfig.from_options("linear", {"foo": "1"})
    with pytest.raises(ConfigError, match="linear_dim: expected int"):
        BaselineConfig.from_options("linear", {"linear_dim": "x"})
    assert BaselineConfig.from_options("linear", {"linear_dim": "4"}).linear_dim == 4


def test_group_means_matches_numpy():
    rng = np.random.default_rng(0)
    X = rng.poisson(1.0, size=(20, 5)).astype(np.float32)
    codes = rng.integers(-1, 4, size=20)
    codes[codes == 2] = 1  # group 2 empty
    for M in (X, sp.csr_matrix(X)):
        means, counts = group_means(M, codes, 4)
        for g in range(4):
            sel = codes == g
            assert counts[g] == sel.sum()
            if sel.any():
                np.testing.assert_allclose(means[g], X[sel].astype(np.float64).mean(0))
            else:
                assert np.isnan(means[g]).all()


@pytest.mark.parametrize("name", BASELINES)
def test_save_load_roundtrip(tmp_path, name):
    model, _ = _fit(name)
    model.save(tmp_path)
    back = load_baseline(tmp_path, GENES)
    for pert, ctx in [("p1", "A"), ("p3", "A"), ("p1+p2", "A"), ("p2", "B"), ("p9", "C")]:
        a, sa = model.shift(pert, ctx)
        b, sb = back.shift(pert, ctx)
        np.testing.assert_array_equal(a, b)
        assert sa == sb
    with pytest.raises(InputError, match="has 3 genes but genes.txt lists 2"):
        load_baseline(tmp_path, GENES[:2])
