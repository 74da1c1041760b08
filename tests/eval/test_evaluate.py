"""Differential tests: celltwin.eval.evaluate against cell-eval 0.8.2 (MetricsEvaluator) on the same inputs."""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

ad = pytest.importorskip("anndata")
# cell-eval is imported by the `reference` tests only (pytest.importorskip there): the quick loop
# (-m "not slow") never pays its import

from celltwin.errors import ConfigError
from celltwin.eval import EvalConfig, evaluate

CTRL = "non-targeting"
COL = "target_gene"
N_GENES = 40


def _screen(
    seed: int,
    *,
    counts: bool,
    sparse: bool,
    dtype,
    tie_perts: bool = False,
    null_pert: bool = False,
    tie_genes: bool = False,
    explicit_zeros: bool = False,
):
    """A tiny screen: 36 controls, 7 perturbations x 10 cells, one named like a gene ("G3")."""
    rng = np.random.default_rng(seed)
    perts = [CTRL, "A", "B", "C", "D", "E", "G3", "F"]
    base = rng.gamma(2.0, 1.0, N_GENES)
    rows, labels = [], []
    for p in perts:
        k = 36 if p == CTRL else 10
        mu = base.copy()
        if p != CTRL and not (null_pert and p == "F"):
            hit = rng.choice(N_GENES, 6, replace=False)
            mu[hit] *= rng.choice([0.1, 4.0], 6)
        rows.append(rng.poisson(mu, (k, N_GENES)).astype(np.float64))
        labels += [p] * k
    X = np.vstack(rows)
    lab = np.array(labels)
    if tie_perts:  # "B" gets exactly the cells of "A": identical deltas, tied PDS distances
        X[lab == "B"] = X[lab == "A"]
    if null_pert:  # "F" = copies of control cells: no significant gene
        X[lab == "F"] = X[lab == CTRL][:10]
    if tie_genes:  # genes 5 and 6 identical everywhere: tied |lfc| and p-values
        X[:, 6] = X[:, 5]
    if not counts:
        X = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * 500.0)
    X = X.astype(dtype)
    if sparse:
        M = sp.csr_matrix(X)
        if explicit_zeros:  # store a few zeros explicitly
            coo = M.tocoo()
            zr = rng.integers(0, X.shape[0], 15)
            zc = rng.integers(0, N_GENES, 15)
            mask = X[zr, zc] == 0
            M = sp.csr_matrix(
                (
                    np.concatenate([coo.data, np.zeros(mask.sum(), dtype=dtype)]),
                    (np.concatenate([coo.row, zr[mask]]), np.concatenate([coo.col, zc[mask]])),
                ),
                shape=X.shape,
            )
            M.sum_duplicates()
            M = sp.csr_matrix((M.data, M.indices, M.indptr), shape=X.shape)
        X = M
    a = ad.AnnData(X)
    a.obs[COL] = pd.Categorical(lab)
    a.var_names = [f"G{i}" for i in range(N_GENES)]
    a.obs_names = [f"c{i}" for i in range(a.n_obs)]
    return a


def _cell_eval(pred, real, tmp_path, profile="vcc", skip_metrics=None):
    MetricsEvaluator = pytest.importorskip("cell_eval").MetricsEvaluator

    logging.disable(logging.CRITICAL)
    try:
        ev = MetricsEvaluator(
            pred.copy(),
            real.copy(),
            control_pert=CTRL,
            pert_col=COL,
            num_threads=1,
            outdir=str(tmp_path / "ce"),
            skip_de=profile == "pds",
        )
        res, agg = ev.compute(profile=profile, skip_metrics=skip_metrics, write_csv=False, break_on_error=True)
    finally:
        logging.disable(logging.NOTSET)
    return res.to_pandas(), agg.to_pandas()


def _assert_same(ours, ref_res, ref_agg, equal_nan=False):
    """Same columns (order included), rows and values; with ``equal_nan`` NaN placements must agree."""
    assert list(ours.results.columns) == list(ref_res.columns)
    assert ours.results["perturbation"].tolist() == ref_res["perturbation"].tolist()
    for c in ref_res.columns[1:]:
        np.testing.assert_allclose(
            ours.results[c].to_numpy(float), ref_res[c].to_numpy(float), rtol=0, atol=1e-12,
            equal_nan=equal_nan, err_msg=c,
        )
    assert list(ours.agg.columns) == list(ref_agg.columns)
    assert ours.agg["statistic"].tolist() == ref_agg["statistic"].tolist()
    for c in ref_agg.columns[1:]:
        np.testing.assert_allclose(
            ours.agg[c].to_numpy(float), ref_agg[c].to_numpy(float), rtol=1e-12, atol=1e-12,
            equal_nan=equal_nan, err_msg=c,
        )


CASES = {
    "csr32-counts_vs_dense32-log": (
        dict(counts=True, sparse=True, dtype=np.float32),
        dict(counts=False, sparse=False, dtype=np.float32),
    ),
    "dense64-counts_vs_csr64-log": (
        dict(counts=True, sparse=False, dtype=np.float64),
        dict(counts=False, sparse=True, dtype=np.float64),
    ),
    "int-counts_vs_csr32-counts": (
        dict(counts=True, sparse=True, dtype=np.int64),
        dict(counts=True, sparse=True, dtype=np.float32),
    ),
    "ties_and_null_pert": (
        dict(counts=True, sparse=True, dtype=np.float32, tie_perts=True, null_pert=True, tie_genes=True),
        dict(counts=False, sparse=True, dtype=np.float32, tie_perts=True, tie_genes=True),
    ),
    "identical_pred_real": (
        dict(counts=True, sparse=True, dtype=np.float32, tie_genes=True),
        dict(counts=True, sparse=True, dtype=np.float32, tie_genes=True),
    ),
}


@pytest.mark.reference
@pytest.mark.parametrize("case", list(CASES))
def test_vcc_matches_cell_eval(case, tmp_path):
    kr, kp = CASES[case]
    real = _screen(0, **kr)
    pred = _screen(0 if case == "identical_pred_real" else 1, **kp)
    ref_res, ref_agg = _cell_eval(pred, real, tmp_path)
    ours = evaluate(pred.copy(), real.copy(), config=EvalConfig())
    _assert_same(ours, ref_res, ref_agg)
    if case == "identical_pred_real":  # a perfect prediction: DES 1, MAE 0
        assert np.all(ours.results["overlap_at_N"] == 1.0)
        assert np.all(ours.results["mae"] == 0.0)
    if case == "ties_and_null_pert":
        row = ours.results.set_index("perturbation")
        assert row.loc["F", "overlap_at_N"] == 0.0  # no significant real gene


@pytest.mark.reference
def test_explicit_zeros_equal_eliminated(tmp_path):
    real = _screen(0, counts=True, sparse=True, dtype=np.float32, explicit_zeros=True)
    pred = _screen(1, counts=False, sparse=True, dtype=np.float32, explicit_zeros=True)
    assert (real.X.data == 0).any() and (pred.X.data == 0).any()
    ours = evaluate(pred.copy(), real.copy(), config=EvalConfig())
    r2, p2 = real.copy(), pred.copy()
    r2.X.eliminate_zeros()
    p2.X.eliminate_zeros()
    ref_res, ref_agg = _cell_eval(p2, r2, tmp_path)
    _assert_same(ours, ref_res, ref_agg)


@pytest.mark.reference
def test_pds_profile_matches(tmp_path):
    real = _screen(2, counts=True, sparse=False, dtype=np.float32, tie_perts=True)
    pred = _screen(3, counts=False, sparse=True, dtype=np.float32, tie_perts=True)
    ref_res, ref_agg = _cell_eval(pred, real, tmp_path, profile="pds")
    ours = evaluate(pred.copy(), real.copy(), config=EvalConfig(profile="pds"))
    assert ours.de_real is None
    _assert_same(ours, ref_res, ref_agg)


@pytest.mark.reference
def test_control_source_real_equals_substituted_controls(tmp_path):
    real = _screen(0, counts=False, sparse=True, dtype=np.float32)
    pred = _screen(4, counts=False, sparse=True, dtype=np.float32)
    ours = evaluate(pred.copy(), real.copy(), config=EvalConfig(control_source="real"))
    # reference: cell-eval on a prediction whose control cells are the real ones
    keep = (pred.obs[COL] != CTRL).to_numpy()
    sub = ad.concat([pred[keep], real[(real.obs[COL] == CTRL).to_numpy()]])
    sub.obs_names_make_unique()
    ref_res, ref_agg = _cell_eval(sub, real, tmp_path)
    _assert_same(ours, ref_res, ref_agg)
    # and the default really uses the predicted controls (the scores differ)
    own = evaluate(pred.copy(), real.copy(), config=EvalConfig())
    assert not np.allclose(own.results["mae"], ours.results["mae"]) or not np.allclose(
        own.results["discrimination_score_l1"], ours.results["discrimination_score_l1"]
    )


def test_reorder_genes(tmp_path):
    real = _screen(0, counts=True, sparse=True, dtype=np.float32)
    pred = _screen(1, counts=False, sparse=True, dtype=np.float32)
    ref = evaluate(pred.copy(), real.copy(), config=EvalConfig())
    perm = np.random.default_rng(0).permutation(N_GENES)
    shuffled = pred[:, perm].copy()
    got = evaluate(shuffled, real.copy(), config=EvalConfig(reorder_genes=True))
    pd.testing.assert_frame_equal(got.results, ref.results)


def test_write_outputs(tmp_path):
    real = _screen(0, counts=True, sparse=True, dtype=np.float32)
    pred = _screen(1, counts=False, sparse=True, dtype=np.float32)
    res = evaluate(pred, real, config=EvalConfig())
    paths = {p.name for p in res.write(tmp_path / "out")}
    assert {
        "results.csv",
        "agg_results.csv",
        "real_de.parquet",
        "pred_de.parquet",
        "report.md",
        "scores.png",
        "effects.png",
        "de_counts.png",
    } <= paths
    assert not (tmp_path / "out" / "real_de.csv").exists()
    back = pd.read_csv(tmp_path / "out" / "results.csv")
    np.testing.assert_array_equal(back["mae"].to_numpy(), res.results["mae"].to_numpy())
    assert not list((tmp_path / "out").glob(".*tmp*"))  # no temporary file left behind


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_de_tables_round_trip(tmp_path, fmt):
    """Both files hold the in-memory tables exactly: same columns, names, dtypes (parquet) and
    every float to the last bit (CSV floats are written in shortest round-trip form)."""
    real = _screen(0, counts=True, sparse=True, dtype=np.float32, tie_genes=True)
    pred = _screen(1, counts=False, sparse=False, dtype=np.float64)
    res = evaluate(pred, real, config=EvalConfig())
    paths = {p.name for p in res.write(tmp_path, report=False, de_format=fmt)}
    assert paths == {"results.csv", "agg_results.csv", f"real_de.{fmt}", f"pred_de.{fmt}"}
    for side, table in (("real", res.de_real), ("pred", res.de_pred)):
        path = tmp_path / f"{side}_de.{fmt}"
        back = pd.read_parquet(path) if fmt == "parquet" else pd.read_csv(path, float_precision="round_trip")
        assert list(back.columns) == list(table.columns)
        assert len(back) == 7 * N_GENES
        for c in ("target", "feature"):
            assert back[c].astype(str).tolist() == table[c].astype(str).tolist()
        for c in table.columns[2:]:
            want = table[c].to_numpy()
            got = back[c].to_numpy()
            if fmt == "parquet":
                assert got.dtype == want.dtype, c
            np.testing.assert_array_equal(got.astype(want.dtype), want, err_msg=c)
    # the real means are float32 (float32 input), every other float column float64
    assert res.de_real["target_mean"].dtype == np.float32
    assert res.de_pred["target_mean"].dtype == np.float64


@pytest.mark.reference
def test_de_csv_is_cell_evals_file(tmp_path):
    """--de-format csv writes byte for byte the real_de.csv / pred_de.csv that cell-eval writes."""
    real = _screen(0, counts=True, sparse=True, dtype=np.float32, tie_genes=True)
    pred = _screen(1, counts=False, sparse=True, dtype=np.float32)
    _cell_eval(pred, real, tmp_path)  # cell-eval writes its DE CSVs into tmp_path / "ce"
    res = evaluate(pred, real, config=EvalConfig())
    res.write(tmp_path / "ours", report=False, de_format="csv")
    for name in ("real_de.csv", "pred_de.csv"):
        assert (tmp_path / "ours" / name).read_bytes() == (tmp_path / "ce" / name).read_bytes(), name


def test_de_format_none_and_bad_format(tmp_path):
    real = _screen(0, counts=True, sparse=True, dtype=np.float32)
    pred = _screen(1, counts=False, sparse=True, dtype=np.float32)
    res = evaluate(pred, real, config=EvalConfig())
    paths = {p.name for p in res.write(tmp_path / "a", report=False, de_format="none")}
    assert paths == {"results.csv", "agg_results.csv"}
    with pytest.raises(ConfigError, match="de_format must be one of parquet, csv, none, got 'xlsx'"):
        res.write(tmp_path / "b", report=False, de_format="xlsx")
    assert not (tmp_path / "b" / "results.csv").exists()  # refused before anything is written


FULL_CASES = {
    "csr32-counts_vs_dense32-log_null": (
        dict(counts=True, sparse=True, dtype=np.float32, null_pert=True, tie_genes=True),
        dict(counts=False, sparse=False, dtype=np.float32, tie_genes=True),
    ),
    "dense64-log_vs_csr64-counts_ties": (
        dict(counts=False, sparse=False, dtype=np.float64, tie_perts=True),
        dict(counts=True, sparse=True, dtype=np.float64, tie_perts=True),
    ),
}


@pytest.mark.reference
@pytest.mark.parametrize("case", list(FULL_CASES))
def test_full_profile_matches_cell_eval(case, tmp_path):
    """Every full-profile column (clustering_agreement included), values and null/NaN placement in results.csv."""
    MetricsEvaluator = pytest.importorskip("cell_eval").MetricsEvaluator

    kr, kp = FULL_CASES[case]
    real, pred = _screen(0, **kr), _screen(1, **kp)
    logging.disable(logging.CRITICAL)
    try:
        ev = MetricsEvaluator(
            pred.copy(),
            real.copy(),
            control_pert=CTRL,
            pert_col=COL,
            num_threads=1,
            outdir=str(tmp_path / "ce"),
        )
        ref_res, ref_agg = ev.compute(profile="full", break_on_error=True)
    finally:
        logging.disable(logging.NOTSET)
    ours = evaluate(pred.copy(), real.copy(), config=EvalConfig(profile="full"))
    ref_res, ref_agg = ref_res.to_pandas(), ref_agg.to_pandas()
    assert list(ours.results.columns) == list(ref_res.columns)
    for c in ref_res.columns[1:]:
        np.testing.assert_allclose(
            ours.results[c].to_numpy(float),
            ref_res[c].to_numpy(float),
            rtol=0,
            atol=1e-12,
            equal_nan=True,
            err_msg=c,
        )
    for c in ref_agg.columns[1:]:
        np.testing.assert_allclose(
            ours.agg[c].to_numpy(float),
            ref_agg[c].to_numpy(float),
            rtol=1e-12,
            atol=1e-12,
            equal_nan=True,
            err_msg=c,
        )
    ours.write(tmp_path / "ours", report=False)
    a = pd.read_csv(tmp_path / "ce" / "results.csv", keep_default_na=False, dtype=str)
    b = pd.read_csv(tmp_path / "ours" / "results.csv", keep_default_na=False, dtype=str)
    assert list(a.columns) == list(b.columns)
    assert ((a == "") == (b == "")).all().all()  # nulls in the same cells
    assert ((a == "NaN") == (b == "NaN")).all().all()  # NaNs in the same cells
    if "null" in case:
        assert (b == "").to_numpy().any()  # the null perturbation really produced nulls


# slow: clustering_agreement's first call compiles umap's numba kernels (~10 s, not cached); the quick
# loop keeps the full profile without it (tests/test_bad_inputs.py::test_eval_profile_full_with_two_perturbations)
@pytest.mark.slow
def test_clustering_agreement_identity_and_missing_extra(monkeypatch):
    """A prediction equal to the real file clusters identically (AMI 1); without the extra the column is left out."""
    from celltwin.eval import _evaluate

    real = _screen(3, counts=True, sparse=True, dtype=np.float32)
    same = evaluate(real.copy(), real.copy(), config=EvalConfig(profile="full"))
    assert same.results["clustering_agreement"].to_numpy() == pytest.approx(np.ones(7), abs=1e-12)
    monkeypatch.setattr(_evaluate, "_has_cluster_extra", lambda: False)
    with pytest.warns(UserWarning, match=r"clustering_agreement skipped.*celltwin\[cluster\]"):
        res = evaluate(real.copy(), real.copy(), config=EvalConfig(profile="full"))
    assert "clustering_agreement" not in res.results.columns and "pearson_edistance" in res.results.columns


@pytest.mark.reference
@pytest.mark.parametrize("profile", ["minimal", "de"])
def test_minimal_and_de_profiles_match_cell_eval(profile, tmp_path):
    """cell-eval's ``minimal`` and ``de`` profiles: same columns in the same order, same values."""
    kr, kp = FULL_CASES["csr32-counts_vs_dense32-log_null"]
    real, pred = _screen(0, **kr), _screen(1, **kp)
    ref_res, ref_agg = _cell_eval(pred, real, tmp_path, profile)
    ours = evaluate(pred.copy(), real.copy(), config=EvalConfig(profile=profile))
    _assert_same(ours, ref_res, ref_agg, equal_nan=True)
    if profile == "minimal":
        assert list(ours.results.columns[1:]) == [
            "overlap_at_N",
            "precision_at_N",
            "de_nsig_counts_real",
            "de_nsig_counts_pred",
            "pearson_delta",
            "mse",
            "mae",
            "discrimination_score_l1",
        ]
    else:
        assert all(
            c.startswith(("overlap", "precision", "de_", "pr_", "roc_")) for c in ours.results.columns[1:]
        )


@pytest.mark.reference
def test_skip_metrics_matches_cell_eval(tmp_path):
    """skip_metrics takes cell-eval's names (de_nsig_counts covers its two columns) and column names."""
    real = _screen(0, counts=True, sparse=True, dtype=np.float32)
    pred = _screen(1, counts=False, sparse=True, dtype=np.float32)
    skip = ["de_nsig_counts", "mse", "pearson_edistance"]  # the last is not in the profile: ignored
    ref_res, ref_agg = _cell_eval(pred, real, tmp_path, "minimal", skip_metrics=skip)
    ours = evaluate(pred.copy(), real.copy(), config=EvalConfig(profile="minimal", skip_metrics=tuple(skip)))
    _assert_same(ours, ref_res, ref_agg, equal_nan=True)
    assert "mse" not in ours.results.columns and "de_nsig_counts_real" not in ours.results.columns
    one = evaluate(
        pred.copy(), real.copy(), config=EvalConfig(profile="minimal", skip_metrics=("de_nsig_counts_pred",))
    )
    assert "de_nsig_counts_real" in one.results.columns and "de_nsig_counts_pred" not in one.results.columns


def test_num_threads_same_values():
    real = _screen(0, counts=True, sparse=True, dtype=np.float32)
    pred = _screen(1, counts=False, sparse=True, dtype=np.float32)
    a = evaluate(pred.copy(), real.copy(), config=EvalConfig(num_threads=1))
    b = evaluate(pred.copy(), real.copy(), config=EvalConfig(num_threads=2))
    pd.testing.assert_frame_equal(a.results, b.results, check_exact=True)
    pd.testing.assert_frame_equal(a.de_real, b.de_real, check_exact=True)


def _with_celltypes(a, seed):
    """Two cell types with every label in each (counts renormalised per cell type by both tools)."""
    rng = np.random.default_rng(seed)
    ct = np.where(rng.random(a.n_obs) < 0.5, "K562", "HepG2/C3A")
    for lab in np.unique(a.obs[COL].astype(str)):  # each label present in both cell types
        rows = np.flatnonzero(a.obs[COL].astype(str).to_numpy() == lab)
        ct[rows[0]], ct[rows[1]], ct[rows[2]] = "K562", "HepG2/C3A", "HepG2/C3A"
    a.obs["celltype"] = pd.Categorical(ct)
    return a


@pytest.mark.reference
def test_celltype_col_matches_cell_eval_per_celltype(tmp_path):
    """``evaluate_by_celltype`` = cell-eval on each cell type's subsets (its --celltype-col)."""
    from celltwin.eval import evaluate_by_celltype

    real = _with_celltypes(_screen(20, counts=True, sparse=True, dtype=np.float32), 1)
    pred = _with_celltypes(_screen(21, counts=True, sparse=False, dtype=np.float32), 2)
    ours = evaluate_by_celltype(pred, real, "celltype")
    assert list(ours) == [str(c) for c in pd.unique(real.obs["celltype"].astype(str))]
    for ct, res in ours.items():
        r = real[(real.obs["celltype"] == ct).to_numpy()].copy()
        p = pred[(pred.obs["celltype"] == ct).to_numpy()].copy()
        ref_res, ref_agg = _cell_eval(p, r, tmp_path)
        _assert_same(res, ref_res, ref_agg)
    # files prefixed as cell-eval names them ("/" becomes "-")
    for ct, res in ours.items():
        res.write(tmp_path / "out", report=False, de_format="csv", prefix=ct)
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert "HepG2-C3A_results.csv" in names and "K562_agg_results.csv" in names
    assert "K562_real_de.csv" in names and "results.csv" not in names


@pytest.mark.reference
def test_embed_key_matches_cell_eval(tmp_path):
    MetricsEvaluator = pytest.importorskip("cell_eval").MetricsEvaluator

    real = _screen(22, counts=False, sparse=True, dtype=np.float32)
    pred = _screen(23, counts=False, sparse=True, dtype=np.float32)
    rng = np.random.default_rng(0)
    for a in (real, pred):
        a.obsm["X_emb"] = rng.normal(size=(a.n_obs, 6)).astype(np.float32)
        a.obsm["X_emb"][:, 0] += (a.obs[COL] == "A").to_numpy() * 2.0
    cfg = EvalConfig(profile="full", embed_key="X_emb", skip_metrics=("clustering_agreement",))
    ours = evaluate(pred, real, config=cfg)
    logging.disable(logging.CRITICAL)
    try:
        ev = MetricsEvaluator(pred.copy(), real.copy(), control_pert=CTRL, pert_col=COL, num_threads=1,
                              outdir=str(tmp_path / "ce"))
        kw = {"embed_key": "X_emb"}
        res, _ = ev.compute(profile="full", skip_metrics=["clustering_agreement"], write_csv=False,
                            break_on_error=True,
                            metric_configs={"discrimination_score_l2": kw, "discrimination_score_cosine": kw})
    finally:
        logging.disable(logging.NOTSET)
    ref = res.to_pandas()
    for c in ("discrimination_score_l2", "discrimination_score_cosine", "discrimination_score_l1", "mae"):
        np.testing.assert_allclose(ours.results[c].to_numpy(float), ref[c].to_numpy(float), rtol=0, atol=1e-12)
    plain = evaluate(pred, real, config=EvalConfig(profile="full", skip_metrics=("clustering_agreement",)))
    assert not np.array_equal(plain.results["discrimination_score_l2"], ours.results["discrimination_score_l2"])
    with pytest.raises(Exception, match="obsm key 'nope' not found"):
        evaluate(pred, real, config=EvalConfig(profile="full", embed_key="nope",
                                               skip_metrics=("clustering_agreement",)))
