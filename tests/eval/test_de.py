"""de_table: differential tests against pdex 0.3.0 (as cell-eval 0.8.2 calls it) and golden
files of pdex 0.1.27 (legacy mode), plus hand-computed values and edge cases."""

from __future__ import annotations

import gzip
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval import _de_cache
from celltwin.eval._de import DE_COLUMNS, LEGACY_DE_COLUMNS, de_table

CONTROL = "non-targeting"
LEGACY_DIR = Path(__file__).resolve().parents[1] / "data" / "legacy"


def make_inputs(seed: int = 0, n_ctrl: int = 300, n_pert: int = 40, k: int = 5, g: int = 120):
    """Log1p-normalised Poisson data with many zeros/ties and planted edge cases.

    Genes: ``g0`` all zero, ``g1`` constant 1.5, ``g2`` zero in controls only (lfc +inf),
    ``g3`` zero in perturbations only (lfc -inf), ``P1`` named like a perturbation.
    ``P_null`` is drawn exactly like the controls (no significant gene expected).
    """
    rng = np.random.default_rng(seed)
    names = [f"P{i}" for i in range(k)]
    labels = [CONTROL] * n_ctrl
    for i, name in enumerate(names):
        labels += [name] * (n_pert + 3 * i)
    labels += ["P_null"] * 12
    labels = np.asarray(labels, dtype=object)
    perm = rng.permutation(labels.size)  # interleave groups: row order must not matter
    labels = labels[perm]
    n = labels.size
    rate = rng.gamma(0.6, 1.0, size=g)
    effect = np.ones((n, g))
    for name in names:
        rows = labels == name
        hit = rng.choice(g, size=10, replace=False)
        effect[np.ix_(rows, hit)] = rng.choice([0.1, 4.0], size=10)
    counts = rng.poisson(rate * effect).astype(np.float64)
    counts[:, 0] = 0
    ctrl_like = (labels == CONTROL) | (labels == "P_null")
    counts[ctrl_like, 2] = 0
    counts[~ctrl_like, 3] = 0
    lib = np.maximum(counts.sum(1, keepdims=True), 1)
    X = np.log1p(counts / lib * 1000.0)
    X[:, 1] = 1.5
    genes = [f"g{i}" for i in range(g)]
    genes[5] = "P1"
    return X, labels, genes


def run_pdex(X, labels, genes):
    import anndata as ad
    from pdex import pdex

    obs = pd.DataFrame({"target": pd.Categorical(labels)}, index=[str(i) for i in range(len(labels))])
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # exactly cell-eval 0.8.2's _build_pdex_kwargs + pdex(mode="ref") call
        frame = pdex(
            adata=adata,
            mode="ref",
            reference=CONTROL,
            groupby="target",
            threads=1,
            is_log1p=True,
            epsilon=0.0,
        )
    return frame.to_pandas()


def assert_frames_match(ref: pd.DataFrame, got: pd.DataFrame, rtol: float = 1e-12):
    assert list(got.columns) == list(ref.columns)
    names = [c for c in ("target", "reference", "feature") if c in ref.columns]
    # name columns are Categoricals of the same strings (pdex: object str); numbers keep pdex's dtypes
    for c in names:
        assert isinstance(got[c].dtype, pd.CategoricalDtype), c
        assert got[c].astype(str).tolist() == ref[c].astype(str).tolist(), c
    assert {c: t for c, t in got.dtypes.items() if c not in names} == {
        c: t for c, t in ref.dtypes.items() if c not in names
    }
    assert len(got) == len(ref)
    for c in ref.columns:
        if c in names:
            continue
        a = ref[c].to_numpy()
        b = got[c].to_numpy()
        if a.dtype.kind == "f":
            same_special = (np.isnan(a) == np.isnan(b)).all() and (np.isinf(a) == np.isinf(b)).all()
            assert same_special, c
            fin = np.isfinite(a)
            np.testing.assert_array_equal(a[~fin & ~np.isnan(a)], b[~fin & ~np.isnan(a)])
            np.testing.assert_allclose(b[fin], a[fin], rtol=rtol, atol=0, err_msg=c)
        else:
            np.testing.assert_array_equal(a, b, err_msg=c)


@pytest.fixture(scope="module")
def inputs():
    return make_inputs()


@pytest.mark.reference
@pytest.mark.parametrize("fmt", ["dense", "csr"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_v2_matches_pdex(inputs, fmt, dtype):
    X, labels, genes = inputs
    Xi = X.astype(dtype)
    if fmt == "csr":
        Xi = sp.csr_matrix(Xi)
    ref = run_pdex(Xi, labels, genes)
    got = de_table(Xi, labels, CONTROL, genes)
    assert_frames_match(ref, got)
    # the stronger claim of the docstring: bit-identical
    for c in ("p_value", "fdr", "statistic", "target_mean", "ref_mean", "log2_fold_change"):
        np.testing.assert_array_equal(got[c].to_numpy(), ref[c].to_numpy(), err_msg=c)
    # the planted cases really are exercised
    rows = got[got.target == "P0"].set_index("feature")
    assert rows.loc["g0", "p_value"] == 1.0 and rows.loc["g0", "log2_fold_change"] == 0.0
    assert rows.loc["g1", "p_value"] == 1.0
    assert rows.loc["g2", "log2_fold_change"] == math.inf
    assert rows.loc["g3", "log2_fold_change"] == -math.inf
    null_fdr = got.loc[got.target == "P_null", "fdr"]
    assert null_fdr.min() >= 0.05
    assert (got.loc[got.target != "P_null", "fdr"] < 0.05).any()
    assert "P1" in set(got.feature) and "P1" in set(got.target)


@pytest.mark.reference
def test_explicit_zeros_equal_eliminated(inputs):
    X, labels, genes = inputs
    Xs = sp.csr_matrix(X.astype(np.float32))
    dirty = Xs.copy()
    dirty.data[::7] = 0.0  # stored zeros (pdex 0.3.0 refuses these)
    clean = dirty.copy()
    clean.eliminate_zeros()
    got = de_table(dirty, labels, CONTROL, genes)
    assert_frames_match(run_pdex(clean, labels, genes), got)
    dense = de_table(clean.toarray(), labels, CONTROL, genes)
    for c in ("p_value", "statistic", "fdr"):  # means differ: dense/sparse accumulate differently
        np.testing.assert_array_equal(dense[c].to_numpy(), got[c].to_numpy())


def test_unsorted_indices_and_csr_array(inputs):
    X, labels, genes = inputs
    Xs = sp.csr_matrix(X)
    # reverse column order inside each row
    shuffled = Xs.copy()
    for r in range(shuffled.shape[0]):
        a, b = shuffled.indptr[r], shuffled.indptr[r + 1]
        shuffled.indices[a:b] = shuffled.indices[a:b][::-1].copy()
        shuffled.data[a:b] = shuffled.data[a:b][::-1].copy()
    shuffled.has_sorted_indices = False
    ref = de_table(Xs, labels, CONTROL, genes)
    pd.testing.assert_frame_equal(de_table(shuffled, labels, CONTROL, genes), ref)
    pd.testing.assert_frame_equal(de_table(sp.csr_array(Xs), labels, CONTROL, genes), ref)


def test_hand_computed_tiny():
    # gene a: control [0, ln2, ln2], target [ln3, ln3]; gene b: all zero
    ln2, ln3 = math.log(2.0), math.log(3.0)
    X = np.array([[0.0, 0], [ln2, 0], [ln2, 0], [ln3, 0], [ln3, 0]])
    labels = [CONTROL, CONTROL, CONTROL, "T", "T"]
    got = de_table(X, labels, CONTROL, ["a", "b"]).set_index("feature")
    ref_mean = math.expm1(2 * ln2 / 3)
    assert got.loc["a", "ref_mean"] == pytest.approx(ref_mean, rel=1e-15)
    assert got.loc["a", "target_mean"] == pytest.approx(2.0, rel=1e-15)
    assert got.loc["a", "log2_fold_change"] == pytest.approx(math.log2(2.0 / ref_mean), rel=1e-14)
    assert got.loc["a", "percent_change"] == pytest.approx((2.0 - ref_mean) / ref_mean, rel=1e-14)
    # ranks: 0 -> 1, ln2 x2 -> 2.5, ln3 x2 -> 4.5; R1 = 9, U1 = 9 - 3 = 6 (= n1 n2)
    assert got.loc["a", "statistic"] == 6.0
    sigma = math.sqrt(2 * 3 / 12 * (6 - (6 + 6) / 20))
    p = math.erfc(((6 - 3 - 0.5) / sigma) / math.sqrt(2))
    assert got.loc["a", "p_value"] == pytest.approx(p, rel=1e-14)
    assert got.loc["b", "p_value"] == 1.0 and got.loc["b", "statistic"] == 3.0
    # BH over the 2 genes of T: sorted p_a < 1 -> q_a = min(2 p_a, 1)
    assert got.loc["a", "fdr"] == pytest.approx(min(1.0, 2 * p), rel=1e-14)
    assert got.loc["a", "target_membership"] == 2 and got.loc["a", "ref_membership"] == 3


@pytest.mark.reference
def test_group_order_targets_and_ignored_labels(inputs):
    X, labels, genes = inputs
    lab = labels.copy()
    lab[:5] = ""  # ignored, as pdex drops "" / NaN labels
    order = ["P3", CONTROL, "P0", "P1", "P2", "P4", "P_null"]
    # a categorical keeps its category order ("" is not a category -> NaN -> ignored) ...
    cat = pd.Categorical(lab, categories=order)
    got = de_table(X, cat, CONTROL, genes)
    assert list(dict.fromkeys(got.target)) == ["P3", "P0", "P1", "P2", "P4", "P_null"]
    assert_frames_match(run_pdex(X, cat, genes), got)
    # ... but removing a "" category re-sorts the categories (pandas), which pdex inherits
    cat2 = pd.Categorical(lab, categories=[*order, ""])
    got2 = de_table(X, cat2, CONTROL, genes)
    assert list(dict.fromkeys(got2.target)) == ["P0", "P1", "P2", "P3", "P4", "P_null"]
    assert_frames_match(run_pdex(X, cat2, genes), got2)
    plain = de_table(X, lab, CONTROL, genes)
    assert list(dict.fromkeys(plain.target)) == ["P0", "P1", "P2", "P3", "P4", "P_null"]
    pd.testing.assert_frame_equal(plain, got2)
    # an unused category makes pdex 0.3.0 fail; de_table skips it
    unused = de_table(X, pd.Categorical(lab, categories=[*order, "unused"]), CONTROL, genes)
    pd.testing.assert_frame_equal(unused, got)
    sub = de_table(X, lab, CONTROL, genes, targets=["P4", "P0"])
    assert list(dict.fromkeys(sub.target)) == ["P4", "P0"]
    # each target's rows (BH included) depend only on that target and the controls
    full = plain.astype({"target": str, "feature": str}).set_index(["target", "feature"])
    part = sub.astype({"target": str, "feature": str}).set_index(["target", "feature"])
    pd.testing.assert_frame_equal(part, full.loc[part.index])


def test_repeated_gene_names_stay_strings(inputs):
    """Categorical name columns need unique names; repeated gene names fall back to object str."""
    X, labels, genes = inputs
    dup = list(genes)
    dup[1] = dup[0]
    got = de_table(X, labels, CONTROL, dup)
    ref = de_table(X, labels, CONTROL, genes)
    assert got["feature"].dtype == object
    assert got["feature"].tolist() == [dup[j] for j in range(len(genes))] * (len(got) // len(genes))
    np.testing.assert_array_equal(got["p_value"].to_numpy(), ref["p_value"].to_numpy())
    assert isinstance(got["target"].dtype, pd.CategoricalDtype)


def test_errors(inputs):
    X, labels, genes = inputs
    with pytest.raises(InputError, match="control"):
        de_table(X, labels, "absent", genes)
    bad = X.copy()
    bad[0, 0] = np.nan
    with pytest.raises(InputError, match="NaN"):
        de_table(bad, labels, CONTROL, genes)
    with pytest.raises(InputError, match="genes"):
        de_table(X, labels, CONTROL, genes[:-1])
    with pytest.raises(InputError, match="targets"):
        de_table(X, labels, CONTROL, genes, targets=["nope"])
    with pytest.raises(InputError, match="dtype"):
        de_table(X.astype(np.int64), labels, CONTROL, genes)


def test_cache_roundtrip(inputs, tmp_path):
    X, labels, genes = inputs
    Xs = sp.csr_matrix(X.astype(np.float32))
    first = de_table(Xs, labels, CONTROL, genes, cache_dir=tmp_path)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1
    again = de_table(Xs, labels, CONTROL, genes, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(again, first)
    changed = Xs.copy()
    changed.data[0] += 1.0
    de_table(changed, labels, CONTROL, genes, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 2
    # an edited entry no longer verifies: it is recomputed (see tests/eval/test_de_cache.py)
    z = dict(np.load(files[0]))
    z["p_value"] = np.zeros_like(z["p_value"])
    with open(files[0], "wb") as fh:
        np.savez(fh, **z)
    with pytest.warns(_de_cache.DECacheWarning, match="SHA-256"):
        recomputed = de_table(Xs, labels, CONTROL, genes, cache_dir=tmp_path)
    pd.testing.assert_frame_equal(recomputed, first)


def test_columns_constant():
    assert DE_COLUMNS[0] == "target" and DE_COLUMNS[-1] == "fdr"
    assert LEGACY_DE_COLUMNS[1] == "reference"


# --------------------------------------------------------------------------------------------
# legacy mode vs pdex 0.1.27 goldens (scripts/make_legacy_golden.py, tests/data/legacy/README.md)
# --------------------------------------------------------------------------------------------

LEGACY_CASES = ["small_f32", "mid_f64", "big_f32"]


def load_legacy(case: str, side: str):
    z = np.load(LEGACY_DIR / f"{case}_inputs.npz")
    with gzip.open(LEGACY_DIR / f"{case}_de_{side}.csv.gz", "rt") as fh:
        golden = pd.read_csv(fh, float_precision="round_trip", keep_default_na=True)
    return z[f"X_{side}"], z["labels"], z["genes"], str(z["control"]), golden


def assert_legacy_equal(golden: pd.DataFrame, got: pd.DataFrame):
    assert list(got.columns) == list(LEGACY_DE_COLUMNS) == list(golden.columns)
    assert len(got) == len(golden)
    for c in golden.columns:
        b = got[c].to_numpy()
        if b.dtype.kind == "f":
            # the CSV holds the shortest round-trip repr of the reference's own dtype
            a = golden[c].to_numpy().astype(b.dtype)
            np.testing.assert_array_equal(a, b, err_msg=c)  # exact, NaN == NaN
        else:
            np.testing.assert_array_equal(golden[c].astype(str).to_numpy(), b.astype(str), err_msg=c)


@pytest.mark.parametrize("case", LEGACY_CASES)
@pytest.mark.parametrize("side", ["real", "pred"])
@pytest.mark.parametrize("fmt", ["dense", "csr"])
def test_legacy_matches_pdex_0_1_27(case, side, fmt):
    X, labels, genes, control, golden = load_legacy(case, side)
    Xi = sp.csr_matrix(X) if fmt == "csr" else X
    got = de_table(Xi, labels, control, genes, mode="legacy")
    assert_legacy_equal(golden, got)
    # first-appearance target order, not sorted
    first = list(dict.fromkeys(lab for lab in labels if lab != control))
    assert list(dict.fromkeys(got.target)) == first
    if case != "big_f32":  # (two targets that happen to appear in sorted order)
        assert first != sorted(first)


def test_legacy_rules_are_exercised():
    X, labels, genes, control, _golden = load_legacy("small_f32", "real")
    got = de_table(X, labels, control, genes, mode="legacy")
    # fold change 20 / 1 / 1/20 rules and NaN percent change for a zero reference
    both0 = (got.target_mean == 0) & (got.reference_mean == 0)
    ref0 = (got.target_mean > 0) & (got.reference_mean == 0)
    assert both0.any() and (got.fold_change[both0] == 1.0).all()
    assert ref0.any() and (got.fold_change[ref0] == 20.0).all()
    assert got.percent_change[got.reference_mean == 0].isna().all()
    # BH runs over the whole table, not per target: differs from per-target BH
    from scipy.stats import false_discovery_control

    per_target = np.concatenate(
        [false_discovery_control(g.p_value.to_numpy()) for _, g in got.groupby("target", sort=False)]
    )
    assert not np.array_equal(per_target.astype(np.float32), got.fdr.to_numpy())
    # scipy's exact small-sample branch is hit (6-cell target, tie-free gene G004)
    row = got[(got.target == "TY") & (got.feature == "G004")].iloc[0]
    from scipy import stats

    x = X[labels == "TY", 4]
    y = X[labels == control, 4]
    assert len(np.unique(np.concatenate([x, y]))) == x.size + y.size
    assert row.p_value == np.float32(stats.mannwhitneyu(x, y, method="exact").pvalue)


def test_legacy_float32_emulation_matters():
    X, labels, genes, control, golden = load_legacy("big_f32", "real")
    got64 = de_table(X.astype(np.float64), labels, control, genes, mode="legacy")
    p32 = golden.p_value.to_numpy().astype(np.float32)
    # computing in float64 gives different p-values than scipy's float32 path ...
    assert not np.array_equal(got64.p_value.to_numpy().astype(np.float32), p32)
    # ... while the float32 emulation is exact (checked in test_legacy_matches_pdex_0_1_27)
    np.testing.assert_allclose(got64.p_value.to_numpy(), p32, rtol=1e-3, atol=1e-30)


# --------------------------------------------------------------------------------------------
# real data (../shared/data, skipped when absent)
# --------------------------------------------------------------------------------------------

SHARED = Path(__file__).resolve().parents[2] / ".." / "shared" / "data"


@pytest.mark.reference
@pytest.mark.shared
@pytest.mark.parametrize(
    ("name", "col", "control"),
    [("vcc2025_h1_subset.h5ad", "target_gene", "non-targeting"),
     ("papalexi2021_thp1_ko.h5ad", "target_gene", "non-targeting")],
)
def test_v2_matches_pdex_on_real_data(name, col, control):
    path = SHARED / name
    if not path.is_file():
        pytest.skip(f"{path} not available")
    import anndata as ad
    import scanpy as sc

    adata = ad.read_h5ad(path)
    # cell-eval 0.8.2's _convert_to_normlog for integer counts
    sc.pp.normalize_total(adata)
    sc.pp.log1p(adata)
    X = sp.csr_matrix(adata.X, dtype=np.float32)
    X.eliminate_zeros()
    labels = adata.obs[col]
    genes = list(adata.var_names)
    obs = pd.DataFrame({"target": labels.to_numpy()}, index=adata.obs_names)
    ref_ad = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))
    from pdex import pdex

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = pdex(ref_ad, groupby="target", mode="ref", reference=control, threads=1,
                   is_log1p=True, epsilon=0.0).to_pandas()
    got = de_table(X, labels.to_numpy(), control, genes)
    assert_frames_match(ref, got)
    assert (got.fdr < 0.05).sum() > 0
