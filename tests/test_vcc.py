"""Tests of .vcc submission files (celltwin prep) and the cell-mean baseline (celltwin baseline).

References: cell-eval 0.8.2 `prep` (strip_anndata) and `baseline` (build_base_mean_adata), called
on the same inputs.
"""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import zstandard

from celltwin import cli
from celltwin._constants import CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError
from celltwin.eval._baseline import cell_mean_baseline, read_pert_counts
from celltwin.eval._load import cell_eval_normlog, is_counts
from celltwin.eval._prep import WATERMARK, prep_vcc, read_gene_list
from celltwin.sim import SimConfig, simulate

pytestmark = [
    pytest.mark.filterwarnings("ignore:Some cells have zero counts"),
    pytest.mark.filterwarnings("ignore:Unexpected keyword arguments"),
]

needs_tools = pytest.mark.skipif(
    shutil.which("zstd") is None or shutil.which("tar") is None,
    reason="cell-eval prep needs the zstd and tar commands",
)


@pytest.fixture(scope="module")
def counts_adata() -> ad.AnnData:
    cfg = SimConfig(n_genes=40, n_contexts=2, n_perts=5, cells_per_pert=20, n_controls=30, seed=7)
    a = simulate(cfg)
    a.obs["celltype"] = a.obs["context"].astype(str)
    return a


def _unpack(path, dest) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        names = tar.getnames()
        members = {n: tar.extractfile(n).read() for n in names}
    assert names == ["pred.h5ad.zst", "watermark.txt"]
    out = {"watermark.txt": members["watermark.txt"]}
    out["pred.h5ad"] = zstandard.ZstdDecompressor().decompressobj().decompress(members["pred.h5ad.zst"])
    (dest / "pred.h5ad").write_bytes(out["pred.h5ad"])
    return out


# ----------------------------------------------------------------------------- normalisation
@pytest.mark.reference
@pytest.mark.parametrize("fmt", ["dense", "csr", "csc"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int64])
def test_normlog_bit_identical_to_cell_eval(counts_adata, fmt, dtype):
    from cell_eval._evaluator import _convert_to_normlog

    X = counts_adata.X.toarray().astype(dtype)
    X[3] = 0  # a cell with no counts keeps zeros
    X = {"dense": X, "csr": sp.csr_matrix(X), "csc": sp.csc_matrix(X)}[fmt]
    ref = ad.AnnData(X=X.copy())
    _convert_to_normlog(ref)
    mine = ad.AnnData(X=X.copy())
    assert cell_eval_normlog(mine) is True
    r = ref.X.toarray() if sp.issparse(ref.X) else ref.X
    m = mine.X.toarray() if sp.issparse(mine.X) else mine.X
    assert m.dtype == r.dtype
    assert np.array_equal(m, r)
    assert mine.uns["log1p"] == {"base": None}
    # already normalised: untouched
    again = ad.AnnData(X=mine.X.copy())
    assert cell_eval_normlog(again) is False


def test_is_counts_rules():
    # the input rule of celltwin eval (ValueScan), with eval's messages; prep and baseline share it
    assert is_counts(np.array([[0.0, 2.0], [3.0, 1.0005]])) is True  # frac <= 1e-3 counts as integer
    assert is_counts(np.array([[0.0, 2.5]])) is False
    with pytest.raises(InputError, match=r"X contains negative values .*min is -0.5"):
        is_counts(np.array([[-0.5, 2.5]]))
    with pytest.raises(InputError, match=r"X mixes counts and log values .*max is 15.5"):
        is_counts(sp.csr_matrix(np.array([[0.0, 15.5]])))
    assert is_counts(np.array([[0.0, 15.5]]), check_log_max=False) is False
    with pytest.raises(InputError, match=r"^pred.h5ad: X contains 1 non-finite value"):
        is_counts(sp.csr_matrix(np.array([[0.0, np.nan]])), "pred.h5ad")
    # changed with the shared rule: a negative integer matrix is refused (it used to count as counts)
    for X in (np.array([[1, -2], [0, 3]]), np.array([[1.0, -2.0], [0.0, 3.0]], dtype=np.float32)):
        with pytest.raises(InputError, match=r"X contains negative values .*min is -2"):
            is_counts(X)
        with pytest.raises(InputError, match=r"X contains negative values"):
            is_counts(sp.csr_matrix(X), check_log_max=False)  # allow_discrete keeps the check
    with pytest.raises(InputError, match="X is missing"):
        is_counts(None)


# ----------------------------------------------------------------------------- prep (.vcc)
@pytest.mark.reference
@needs_tools
@pytest.mark.parametrize(
    ("case", "kwargs"),
    [
        ("counts_csr", {}),
        ("reordered_dense_lognorm", {}),
        ("celltype_64", {"celltype_col": "celltype", "encoding": 64}),
        ("discrete", {"allow_discrete": True, "output_pert_col": "pert"}),
    ],
)
def test_prep_matches_cell_eval(counts_adata, tmp_path, case, kwargs):
    from cell_eval._cli._prep import strip_anndata

    a = counts_adata.copy()
    genes = list(a.var_names)
    if case == "reordered_dense_lognorm":
        cell_eval_normlog(a)
        a.X = a.X.toarray()
        a.obs[PERT_COL] = a.obs[PERT_COL].astype(str)
        genes = genes[::-1]
    before = a.X.copy()
    ours = prep_vcc(a, genes, tmp_path / "ours.vcc", expected_gene_dim=None, **kwargs)
    # strip_anndata's Python default encoding is 64; the CLI's (and ours) is 32
    ref_kwargs = {
        "encoding": 32,
        **{("ntc_name" if k == "control_label" else k): v for k, v in kwargs.items()},
    }
    strip_anndata(
        a.copy(), output_path=str(tmp_path / "ref.vcc"), genelist=genes, exp_gene_dim=None, **ref_kwargs
    )
    (tmp_path / "o").mkdir()
    (tmp_path / "r").mkdir()
    o = _unpack(tmp_path / "ours.vcc", tmp_path / "o")
    r = _unpack(tmp_path / "ref.vcc", tmp_path / "r")
    assert o["watermark.txt"] == r["watermark.txt"] == WATERMARK
    # anndata writes deterministically, so equal content means equal bytes of the inner h5ad
    assert o["pred.h5ad"] == r["pred.h5ad"]
    od, rd = ad.read_h5ad(tmp_path / "o" / "pred.h5ad"), ad.read_h5ad(tmp_path / "r" / "pred.h5ad")
    assert od.X.dtype == rd.X.dtype == (np.float64 if kwargs.get("encoding") == 64 else np.float32)
    assert (od.X != rd.X).nnz == 0 and od.obs.equals(rd.obs) and list(od.var_names) == genes
    assert ours.n_cells == a.n_obs and ours.reordered_genes == (case == "reordered_dense_lognorm")
    assert ours.normalized == (case in ("counts_csr", "celltype_64"))
    # the input is left untouched
    assert np.array_equal(
        before.toarray() if sp.issparse(before) else before, a.X.toarray() if sp.issparse(a.X) else a.X
    )


def _small_pred() -> ad.AnnData:
    X = np.array([[1, 0, 3], [0, 2, 2], [4, 1, 0], [1, 1, 1]], dtype=np.float32)
    obs = pd.DataFrame({PERT_COL: ["A", CONTROL_LABEL, "B", CONTROL_LABEL]}, index=list("abcd"))
    return ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["g1", "g2", "g3"]))


@pytest.mark.parametrize(
    ("mutate", "kwargs", "err", "match"),
    [
        (
            lambda a: a.obs.drop(columns=[PERT_COL], inplace=True),
            {},
            InputError,
            r"obs\['target_gene'\] is missing",
        ),
        (lambda a: None, {"celltype_col": "ct"}, InputError, r"cell type column obs\['ct'\]"),
        (
            lambda a: a.obs.__setitem__(PERT_COL, ["A", "B", "A", "B"]),
            {},
            InputError,
            "control label 'non-targeting'",
        ),
        (
            lambda a: None,
            {"genes": ["g1", "g2", "g4"]},
            InputError,
            r"1 missing \(e.g. \['g4'\]\), 1 not in the list",
        ),
        (
            lambda a: None,
            {"genes": ["g1", "g2"]},
            InputError,
            r"0 missing .* 1 not in the list \(e.g. \['g3'\]\)",
        ),
        (lambda a: None, {"genes": ["g1", "g2", "g2"]}, InputError, "duplicated"),
        (lambda a: None, {"max_cell_dim": 3}, InputError, "4 cells exceed the maximum of 3"),
        (lambda a: None, {"encoding": 16}, ConfigError, "encoding must be one of"),
        (lambda a: setattr(a, "X", a.X * 10.5), {}, InputError, r"X mixes counts and log values .*max is 42"),
        (lambda a: setattr(a, "X", a.X - 0.5), {}, InputError, r"X contains negative values .*min is -0.5"),
        # a negative integer matrix is refused too (the input rule of celltwin eval; cell-eval takes it)
        (lambda a: setattr(a, "X", a.X - 2), {}, InputError, r"X contains negative values .*min is -2"),
        (
            lambda a: setattr(a, "X", a.X - 2),
            {"allow_discrete": True},
            InputError,
            r"X contains negative values .*min is -2",
        ),
        (lambda a: a.X.__setitem__((0, 0), np.nan), {}, InputError, r"X contains 1 non-finite value"),
    ],
)
def test_prep_bad_inputs(tmp_path, mutate, kwargs, err, match):
    a = _small_pred()
    mutate(a)
    genes = kwargs.pop("genes", ["g1", "g2", "g3"])
    out = tmp_path / "x.vcc"
    with pytest.raises(err, match=match):
        prep_vcc(a, genes, out, expected_gene_dim=None, **kwargs)
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_gene_list_file_and_prep_cli(tmp_path, capsys):
    a = _small_pred()
    a.write_h5ad(tmp_path / "pred.h5ad")
    (tmp_path / "genes.csv").write_text('g3\n"g1"\n\ng2,extra\n')
    assert read_gene_list(tmp_path / "genes.csv") == ["g3", "g1", "g2"]
    with pytest.raises(InputError, match="gene list file not found"):
        read_gene_list(tmp_path / "nope.csv")
    (tmp_path / "empty.csv").write_text("\n")
    with pytest.raises(InputError, match="empty"):
        read_gene_list(tmp_path / "empty.csv")
    rc = cli.main(["prep", "-i", str(tmp_path / "pred.h5ad"), "-g", str(tmp_path / "genes.csv")])
    assert rc == 0
    cap = capsys.readouterr()
    assert "not the expected 18080" in cap.err and "reordered" in cap.err
    assert "wrote" in cap.out
    _unpack(tmp_path / "pred.prep.vcc", tmp_path)
    got = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert list(got.var_names) == ["g3", "g1", "g2"] and list(got.obs_names) == ["0", "1", "2", "3"]
    # hand-computed: totals 4, 4, 5, 3 -> median 4; cell c: log1p([0, 4, 1] * 4 / 5)
    np.testing.assert_allclose(got.X.toarray()[2], np.log1p(np.array([0, 4, 1]) * 0.8), rtol=1e-6)
    rc = cli.main(["prep", "-i", str(tmp_path / "missing.h5ad"), "-g", str(tmp_path / "genes.csv")])
    assert rc == 2 and "file not found" in capsys.readouterr().err


# ----------------------------------------------------------------------------- cell-mean baseline
def test_cell_mean_baseline_hand_computed():
    X = np.array([[1.0, 0.0], [3.0, 2.0], [0.0, 4.0], [2.0, 2.0], [0.5, 0.5]])  # log-space (fractional)
    obs = pd.DataFrame({PERT_COL: ["A", "A", "B", CONTROL_LABEL, CONTROL_LABEL]}, index=list("vwxyz"))
    a = ad.AnnData(X=X, obs=obs)
    out = cell_mean_baseline(a)
    # group means: A (2, 1), B (0, 4), control (1.25, 1.25); baseline = mean of the three
    expect = np.array([(2 + 0 + 1.25) / 3, (1 + 4 + 1.25) / 3])
    assert list(out.obs_names) == ["p.0", "p.1", "p.2", "y", "z"]
    assert list(out.obs[PERT_COL]) == ["A", "A", "B", CONTROL_LABEL, CONTROL_LABEL]
    np.testing.assert_allclose(out.X[:3], np.tile(expect, (3, 1)), rtol=0, atol=1e-15)
    np.testing.assert_array_equal(out.X[3:], X[3:])
    delta = cell_mean_baseline(a, as_delta=True)
    np.testing.assert_allclose(
        delta.X[0], [((2 - 1.25) + (0 - 1.25)) / 2, ((1 - 1.25) + (4 - 1.25)) / 2], atol=1e-15
    )
    # counts mapping: order kept, unknown perturbations allowed, the control row dropped
    c = cell_mean_baseline(a, {"Z": 1, CONTROL_LABEL: 5, "A": 2})
    assert list(c.obs[PERT_COL]) == ["Z", "A", "A", CONTROL_LABEL, CONTROL_LABEL]
    assert a.obs.shape == (5, 1) and np.array_equal(a.X, X)  # input untouched


def _assert_same_rows_per_pert(mine: ad.AnnData, ref: ad.AnnData, atol: float) -> None:
    """cell-eval orders perturbations by polars group_by (unspecified): compare per perturbation."""
    assert mine.shape == ref.shape
    assert mine.obs.dtypes.equals(ref.obs.dtypes)
    if isinstance(ref.obs[PERT_COL].dtype, pd.CategoricalDtype):
        assert list(mine.obs[PERT_COL].cat.categories) == list(ref.obs[PERT_COL].cat.categories)
    m_lab, r_lab = mine.obs[PERT_COL].astype(str).to_numpy(), ref.obs[PERT_COL].astype(str).to_numpy()
    assert pd.Series(m_lab).value_counts().sort_index().equals(pd.Series(r_lab).value_counts().sort_index())
    M = mine.X.toarray() if sp.issparse(mine.X) else mine.X
    R = ref.X.toarray() if sp.issparse(ref.X) else ref.X
    assert M.dtype == R.dtype and sp.issparse(mine.X) == sp.issparse(ref.X)
    for lab in np.unique(r_lab):
        np.testing.assert_allclose(M[m_lab == lab], R[r_lab == lab], rtol=0, atol=atol)
    ctrl = r_lab == CONTROL_LABEL
    assert list(mine.obs_names[m_lab == CONTROL_LABEL]) == list(ref.obs_names[ctrl])
    assert sorted(mine.obs_names) == sorted(ref.obs_names)
    assert list(mine.var_names) == list(ref.var_names) and mine.var.equals(ref.var)


@pytest.mark.reference
@pytest.mark.parametrize("categorical", [True, False])
@pytest.mark.parametrize("as_delta", [False, True])
def test_baseline_matches_cell_eval_counts_input(counts_adata, categorical, as_delta):
    from cell_eval import build_base_mean_adata

    a = counts_adata.copy()
    if not categorical:
        a.obs[PERT_COL] = a.obs[PERT_COL].astype(str)
    ref = build_base_mean_adata(a.copy(), as_delta=as_delta)
    mine = cell_mean_baseline(a, as_delta=as_delta)
    # float32 after normalisation: cell-eval averages the group means in a random (polars) order,
    # so the baseline row can differ in the last float32 bits; control rows are bit-identical
    _assert_same_rows_per_pert(mine, ref, atol=4e-6)
    ctrl = (ref.obs[PERT_COL] == CONTROL_LABEL).to_numpy()
    assert (mine.X[ctrl] != ref.X[ctrl]).nnz == 0


@pytest.mark.reference
def test_baseline_matches_cell_eval_float64_and_counts_csv(counts_adata, tmp_path):
    from cell_eval import build_base_mean_adata

    a = counts_adata.copy()
    cell_eval_normlog(a)
    a.X = a.X.astype(np.float64)
    csv = tmp_path / "counts.csv"
    names = list(a.uns["celltwin_sim"]["perturbations"])
    csv.write_text(
        f"{PERT_COL},n_cells,median_umi\n{names[2]},3,100\nNEWGENE,2,5\n{CONTROL_LABEL},7,1\n{names[0]},4,9\n"
    )
    assert read_pert_counts(csv) == {names[2]: 3, "NEWGENE": 2, CONTROL_LABEL: 7, names[0]: 4}
    ref = build_base_mean_adata(a.copy(), counts_df=str(csv))
    mine = cell_mean_baseline(a, counts=csv)
    # with a counts file the order is the file's: everything is compared row for row
    assert mine.obs.equals(ref.obs)
    assert list(mine.obs[PERT_COL])[:9] == [names[2]] * 3 + ["NEWGENE"] * 2 + [names[0]] * 4
    np.testing.assert_allclose(mine.X.toarray(), ref.X.toarray(), rtol=0, atol=1e-12)
    assert mine.X.dtype == ref.X.dtype == np.float64
    # default counts, float64: equal to 1e-12 as well
    _assert_same_rows_per_pert(cell_mean_baseline(a), build_base_mean_adata(a.copy()), atol=1e-12)


def test_baseline_bad_inputs_and_cli(counts_adata, tmp_path, capsys):
    a = counts_adata.copy()
    with pytest.raises(InputError, match=r"control 'ctrl' not found in obs\['target_gene'\]"):
        cell_mean_baseline(a, control_pert="ctrl")
    with pytest.raises(InputError, match=r"obs\['gene'\] is missing"):
        cell_mean_baseline(a, pert_col="gene")
    bad = tmp_path / "bad.csv"
    bad.write_text("target_gene,cells\nA,3\n")
    with pytest.raises(InputError, match="column 'n_cells' not found"):
        read_pert_counts(bad)
    bad.write_text("target_gene,n_cells\nA,-3\n")
    with pytest.raises(InputError, match="line 2: column 'n_cells' must be a non-negative integer, got -3"):
        read_pert_counts(bad)
    bad.write_text("target_gene,n_cells\nA,3\nA,2\n")
    with pytest.raises(InputError, match="listed twice"):
        read_pert_counts(bad)

    a.write_h5ad(tmp_path / "in.h5ad")
    out = tmp_path / "base.h5ad"
    rc = cli.main(["baseline", "-a", str(tmp_path / "in.h5ad"), "-o", str(out), "--skip-de"])
    assert rc == 0 and "baseline cells" in capsys.readouterr().out
    got = ad.read_h5ad(out)
    mem = cell_mean_baseline(a)
    assert got.obs.equals(mem.obs) and (got.X != mem.X).nnz == 0
    rc = cli.main(
        [
            "baseline",
            "-a",
            str(tmp_path / "in.h5ad"),
            "-c",
            str(bad),
            "-o",
            str(tmp_path / "b2.h5ad"),
            "-O",
            str(tmp_path / "de.csv"),
        ]
    )
    assert rc == 2 and "listed twice" in capsys.readouterr().err
    assert not (tmp_path / "b2.h5ad").exists() and not (tmp_path / "de.csv").exists()


@pytest.mark.reference
def test_baseline_de_table_matches_cell_eval(counts_adata, tmp_path, capsys):
    from cell_eval import build_base_mean_adata

    a = counts_adata.copy()
    cell_eval_normlog(a)
    a.X = a.X.astype(np.float64)  # float64: cell-eval's baseline vector is order-independent to 1e-15
    a.write_h5ad(tmp_path / "in.h5ad")
    build_base_mean_adata(
        str(tmp_path / "in.h5ad"),
        output_de_path=str(tmp_path / "ref_de.csv"),
        pdex_kwargs={"clip_value": 2**20, "is_log1p": True},
    )
    rc = cli.main(
        [
            "baseline",
            "-a",
            str(tmp_path / "in.h5ad"),
            "-o",
            str(tmp_path / "b.h5ad"),
            "-O",
            str(tmp_path / "de.csv"),
        ]
    )
    assert rc == 0 and "differential expression" in capsys.readouterr().out
    ref = pd.read_csv(tmp_path / "ref_de.csv")
    mine = pd.read_csv(tmp_path / "de.csv")
    assert list(mine.columns) == list(ref.columns) and mine.shape == ref.shape == (5 * 40, 11)
    assert mine[["target", "feature"]].equals(ref[["target", "feature"]])
    for col in mine.columns[2:]:
        np.testing.assert_allclose(mine[col].to_numpy(float), ref[col].to_numpy(float), rtol=1e-9, atol=1e-12)


SHARED = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


@pytest.mark.reference
@pytest.mark.shared
@needs_tools
def test_prep_and_baseline_on_real_vcc_subset(tmp_path):
    """Real VCC 2025 H1 counts (600 cells x 1,000 genes): same .vcc content and baseline as cell-eval."""
    from cell_eval import build_base_mean_adata
    from cell_eval._cli._prep import strip_anndata

    path = SHARED / "vcc2025_h1_subset.h5ad"
    if not path.exists():
        pytest.skip("../shared/data is absent")
    real = ad.read_h5ad(path)
    genes = list(real.var_names)
    prep_vcc(path, genes, tmp_path / "ours.vcc", expected_gene_dim=None)
    strip_anndata(
        real.copy(), output_path=str(tmp_path / "ref.vcc"), genelist=genes, exp_gene_dim=None, encoding=32
    )
    (tmp_path / "o").mkdir()
    (tmp_path / "r").mkdir()
    assert _unpack(tmp_path / "ours.vcc", tmp_path / "o") == _unpack(tmp_path / "ref.vcc", tmp_path / "r")

    mine = cell_mean_baseline(real)
    ref = build_base_mean_adata(real.copy())
    _assert_same_rows_per_pert(mine, ref, atol=4e-6)
