"""The prediction writer, run directories and the train/predict flows on tiny hand-made data."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError
from celltwin.eval._baseline import read_pert_counts
from celltwin.predict import (
    MODELS,
    PredictRequest,
    load_predictor,
    predict_cells,
    read_run,
    summarize_sources,
    train_run,
)
from celltwin.predict_files import predict_from_files

GENES = ["a", "b", "c"]


def _log_adata(kind="dense"):
    """Already log-normalised values (non-integer): the preprocessing passes them through."""
    rows = [
        ("A", CONTROL_LABEL, [0.5, 1.5, 0.25]), ("A", CONTROL_LABEL, [1.5, 0.5, 0.25]),
        ("A", "a", [2.0, 1.0, 0.25]), ("A", "a", [2.0, 1.0, 0.25]),  # effect [+1, 0, 0]
        ("A", "b", [1.0, 0.5, 1.25]),  # effect [0, -0.5, +1]
        ("B", CONTROL_LABEL, [0.5, 0.5, 0.5]),
        ("B", "a", [1.5, 0.5, 0.5]),  # effect [+1, 0, 0]
        ("B", "c", [0.5, 0.5, 2.5]),  # effect [0, 0, +2]
    ]
    X = np.array([r[2] for r in rows], dtype=np.float32)
    obs = pd.DataFrame({PERT_COL: [r[1] for r in rows], CONTEXT_COL: [r[0] for r in rows]},
                       index=[f"c{i}" for i in range(len(rows))])
    return ad.AnnData(X=sp.csr_matrix(X) if kind == "csr" else X, obs=obs, var=pd.DataFrame(index=GENES))


def test_registry_lists_every_baseline():
    for name in ("control", "cell-mean", "perturbation-mean", "context-transfer", "scaled-context-transfer",
                 "linear", "additive"):
        assert name in MODELS


@pytest.mark.parametrize("kind", ["dense", "csr"])
def test_train_run_writes_a_complete_run(tmp_path, kind):
    meta = train_run("cell-mean", _log_adata(kind), tmp_path / "run", extra_meta={"note": "x"})
    names = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert names == ["baseline.npz", "genes.txt", "inputs.json", "preprocess.json", "run.json"]
    meta2, genes = read_run(tmp_path / "run")
    assert meta2["model"] == "cell-mean" and meta2["note"] == "x" and meta == meta2
    assert meta2["preprocess"]["target_sum"] is None  # log input passes through
    assert genes == GENES
    pred = load_predictor(tmp_path / "run")
    # cell-mean in A: (2*[1,0,0] + [0,-0.5,1]) / 3
    np.testing.assert_allclose(pred.shift("zzz", "A")[0], [2 / 3, -1 / 6, 1 / 3], rtol=1e-6)


def test_train_run_counts_use_the_median_library_size(tmp_path):
    X = np.array([[1, 3], [2, 2], [5, 5], [0, 8]], dtype=np.float32)  # totals 4, 4, 10, 8 -> median 6
    obs = pd.DataFrame({PERT_COL: [CONTROL_LABEL, CONTROL_LABEL, "p", "p"], CONTEXT_COL: ["A"] * 4},
                       index=list("wxyz"))
    meta = train_run("cell-mean", ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=["g", "h"])), tmp_path / "r")
    assert meta["preprocess"]["target_sum"] == 6.0
    model = load_predictor(tmp_path / "r")
    ctrl = np.log1p(np.array([[1.5, 4.5], [3.0, 3.0]])).mean(0)
    pert = np.log1p(np.array([[3.0, 3.0], [0.0, 6.0]])).mean(0)
    np.testing.assert_allclose(model.shift("q", "A")[0], pert - ctrl, rtol=1e-6)


class _Stub:
    """A predictor adding +1 to gene 0 for 'up' and -10 to every gene for 'down' (tests the writer only)."""

    genes = GENES

    def predict(self, controls, perturbation, context, rng):
        out = controls.copy()
        if perturbation == "up":
            out[:, 0] += 1
        else:
            out = np.maximum(out - 10, 0)
        return out

    def describe(self, perturbation, context):
        return "model" if perturbation == "up" else "fallback:cell-mean"


def test_predict_cells_layout_and_values():
    controls = np.array([[0.0, 1.0, 2.0], [3.0, 4.0, 5.0], [6.0, 7.0, 8.0]], dtype=np.float32)
    out = predict_cells(_Stub(), controls, PredictRequest("A", ["up", "down"], [2, 4]), seed=1)
    labels = out.obs[PERT_COL].astype(str).tolist()
    assert labels == ["up"] * 2 + ["down"] * 4 + [CONTROL_LABEL] * 3
    assert (out.obs[CONTEXT_COL].astype(str) == "A").all()
    assert list(out.var_names) == GENES
    X = out.X.toarray()
    assert X.dtype == np.float32
    # each 'up' cell is a distinct control (drawn without replacement since 2 <= 3) plus [1,0,0]
    ups = X[:2] - np.array([1, 0, 0])
    assert len({tuple(r) for r in ups}) == 2
    assert all(any(np.array_equal(r, c) for c in controls) for r in ups)
    np.testing.assert_array_equal(X[2:6], 0)
    np.testing.assert_array_equal(X[6:], controls)  # all the context's controls, last
    info = out.uns["celltwin_predict"]
    assert list(info["controls_drawn_with_replacement"]) == ["down"]  # 4 > 3 controls
    assert summarize_sources(out) == {"up": "model", "down": "fallback:cell-mean"}
    # the same seed gives the same draws
    again = predict_cells(_Stub(), controls, PredictRequest("A", ["up", "down"], [2, 4]), seed=1)
    np.testing.assert_array_equal(again.X.toarray(), X)


def test_repeat_mean_predicts_from_the_mean_control():
    controls = np.array([[0.0, 1.0, 2.0], [2.0, 3.0, 0.0]], dtype=np.float32)
    out = predict_cells(_Stub(), controls, PredictRequest("A", ["up"], [3]), repeat_mean=True)
    np.testing.assert_allclose(out.X.toarray()[:3], np.tile([2.0, 2.0, 1.0], (3, 1)))


def test_repeat_mean_cell_mean_reproduces_the_mean_perturbed_cell(tmp_path):
    a = _log_adata()
    train_run("cell-mean", a, tmp_path / "run")
    model = load_predictor(tmp_path / "run")
    ctrl = np.asarray(a.X)[:2]  # context A controls
    out = predict_cells(model, ctrl, PredictRequest("A", ["zzz"], [2]), repeat_mean=True)
    mean_pert = np.asarray(a.X)[2:5].mean(0)  # all perturbed training cells of A
    np.testing.assert_allclose(out.X.toarray()[0], mean_pert, rtol=1e-6)


def test_predict_cells_errors():
    with pytest.raises(InputError, match="no control cells"):
        predict_cells(_Stub(), np.zeros((0, 3)), PredictRequest("A", ["up"], [1]))
    with pytest.raises(InputError, match="controls: 2 genes, expected 3"):
        predict_cells(_Stub(), np.zeros((2, 2)), PredictRequest("A", ["up"], [1]))


def test_read_pert_counts_for_predict(tmp_path):
    # celltwin predict --counts reads the VCC table with the baseline's reader: at least 1 cell each
    p = tmp_path / "counts.csv"
    p.write_text(f"{PERT_COL},n_cells\na,5\n{CONTROL_LABEL},100\nb,2\n")
    assert read_pert_counts(p, min_cells=1) == {"a": 5, CONTROL_LABEL: 100, "b": 2}
    p.write_text("gene,n\na,5\n")
    with pytest.raises(InputError, match="column 'target_gene' not found"):
        read_pert_counts(p, min_cells=1)
    p.write_text(f"{PERT_COL},n_cells\na,0\n")
    with pytest.raises(InputError, match="line 2: column 'n_cells' must be an integer >= 1, got 0"):
        read_pert_counts(p, min_cells=1)


def _files(tmp_path, model="context-transfer"):
    a = _log_adata()
    data = tmp_path / "data.h5ad"
    a.write_h5ad(data)
    train_run(model, a, tmp_path / "run")
    return a, data


def test_predict_from_files_with_perturbations(tmp_path):
    _, data = _files(tmp_path)
    predict_from_files(tmp_path / "run", data, tmp_path / "pred.h5ad", perturbations=["a", "b"], context="A")
    back = ad.read_h5ad(tmp_path / "pred.h5ad")
    # as many cells as the real data has (a: 2, b: 1), then A's 2 controls
    assert back.obs[PERT_COL].astype(str).tolist() == ["a", "a", "b"] + [CONTROL_LABEL] * 2
    assert back.uns["celltwin_predict"]["model"] == "context-transfer"
    # 'b' was trained in no other context: context-transfer falls back and says so
    assert summarize_sources(back) == {"a": "model", "b": "fallback:cell-mean"}


def test_predict_counts_and_write_real(tmp_path):
    a, data = _files(tmp_path)
    counts = tmp_path / "counts.csv"
    counts.write_text(f"{PERT_COL},n_cells\na,3\nc,2\n")
    predict_from_files(tmp_path / "run", data, tmp_path / "pred.h5ad", counts=counts, context="A",
                       write_real=tmp_path / "real.h5ad")
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert pred.obs[PERT_COL].astype(str).tolist() == ["a"] * 3 + ["c"] * 2 + [CONTROL_LABEL] * 2
    X = pred.X.toarray()
    ctrl = np.asarray(a.X)[:2]
    # context-transfer: 'c' in A takes B's effect [0,0,2]; 'a' takes B's [1,0,0]
    for r in X[3:5]:
        assert any(np.allclose(r, c + [0, 0, 2]) for c in ctrl)
    for r in X[:3]:
        assert any(np.allclose(r, c + [1, 0, 0]) for c in ctrl)
    real = ad.read_h5ad(tmp_path / "real.h5ad")
    assert real.obs[PERT_COL].astype(str).tolist() == [CONTROL_LABEL, CONTROL_LABEL, "a", "a"]
    np.testing.assert_array_equal(real.X.toarray(), np.asarray(a.X)[:4])  # streamed: always CSR


def test_predict_errors(tmp_path):
    a, data = _files(tmp_path)
    with pytest.raises(InputError, match="no real cells of c in context 'A'.*give --counts"):
        predict_from_files(tmp_path / "run", data, tmp_path / "p.h5ad", perturbations=["a", "c"], context="A")
    with pytest.raises(ConfigError, match="give --context"):
        predict_from_files(tmp_path / "run", data, tmp_path / "p.h5ad", perturbations=["a"])
    with pytest.raises(InputError, match="context 'Z' not found"):
        predict_from_files(tmp_path / "run", data, tmp_path / "p.h5ad", perturbations=["a"], context="Z")
    with pytest.raises(ConfigError, match="nothing to predict"):
        predict_from_files(tmp_path / "run", data, tmp_path / "p.h5ad")
    # a data file missing run genes: the missing genes are named
    b = a[:, ["a", "c"]].copy()
    b.write_h5ad(tmp_path / "fewer.h5ad")
    with pytest.raises(InputError, match=r"1 of the run's 3 genes are not in var_names: b"):
        predict_from_files(tmp_path / "run", tmp_path / "fewer.h5ad", tmp_path / "p.h5ad", perturbations=["a"],
                           context="A")
    # a context without controls
    c = a[a.obs[PERT_COL] != CONTROL_LABEL].copy()
    c = ad.concat([c, a[[0]]])  # keep one control (of A) so the file itself is valid
    c.write_h5ad(tmp_path / "noctl.h5ad")
    with pytest.raises(InputError, match="context 'B' of .* has no control cells"):
        predict_from_files(tmp_path / "run", tmp_path / "noctl.h5ad", tmp_path / "p.h5ad", perturbations=["a"],
                           context="B")
    assert not (tmp_path / "p.h5ad").exists()  # nothing half-written


def test_predict_from_a_controls_file(tmp_path):
    _a, data = _files(tmp_path)
    ctl = ad.AnnData(X=np.array([[0.25, 0.25, 0.25]], dtype=np.float32), obs=pd.DataFrame(index=["k"]),
                     var=pd.DataFrame(index=GENES))
    ctl.write_h5ad(tmp_path / "ctl.h5ad")
    counts = tmp_path / "counts.csv"
    counts.write_text(f"{PERT_COL},n_cells\nc,2\n")
    predict_from_files(tmp_path / "run", data, tmp_path / "pred.h5ad", counts=counts, context="A",
                       controls=tmp_path / "ctl.h5ad")
    X = ad.read_h5ad(tmp_path / "pred.h5ad").X.toarray()
    np.testing.assert_allclose(X, [[0.25, 0.25, 2.25], [0.25, 0.25, 2.25], [0.25, 0.25, 0.25]])


def test_cli_train_predict_eval_ready(tmp_path):
    from celltwin import cli
    from celltwin.data.columns import ObsColumns
    from celltwin.data.split_draw import make_split
    from celltwin.sim import simulate

    a = simulate("tiny")
    a.write_h5ad(tmp_path / "d.h5ad")
    make_split(a.obs, ObsColumns().present(a.obs), "context_1", holdout=2, seed=0,
               data_path="d.h5ad").write(tmp_path / "s.toml")
    assert cli.main(["train", "--model", "linear", "--data", str(tmp_path / "d.h5ad"), "--split",
                     str(tmp_path / "s.toml"), "-o", str(tmp_path / "run")]) == 0
    assert cli.main(["predict", str(tmp_path / "run"), "--data", str(tmp_path / "d.h5ad"), "--split",
                     str(tmp_path / "s.toml"), "-o", str(tmp_path / "p.h5ad"), "--write-real",
                     str(tmp_path / "r.h5ad")]) == 0
    pred, real = ad.read_h5ad(tmp_path / "p.h5ad"), ad.read_h5ad(tmp_path / "r.h5ad")
    assert list(pred.var_names) == list(real.var_names) == list(a.var_names)
    pc = pred.obs[PERT_COL].astype(str).value_counts().to_dict()
    assert pc == real.obs[PERT_COL].astype(str).value_counts().to_dict()
    assert len(pc) == 3 and pc[CONTROL_LABEL] == 120  # 2 held out + the context's 120 controls
    from celltwin.eval import evaluate

    res = evaluate(pred, real)
    assert res.results.shape[0] == 2
    # a split naming an unknown context: one-line error, exit code 2
    (tmp_path / "bad.toml").write_text((tmp_path / "s.toml").read_text().replace("context_1", "nowhere"))
    assert cli.main(["train", "--model", "linear", "--data", str(tmp_path / "d.h5ad"), "--split",
                     str(tmp_path / "bad.toml"), "-o", str(tmp_path / "run2")]) == 2


@pytest.mark.parametrize("dist", ["poisson", "nb"])
def test_predict_sample_counts(tmp_path, dist):
    """--sample-counts: integer counts whose normalised mean matches the model-space prediction."""
    from celltwin import cli
    from celltwin.data.columns import ObsColumns
    from celltwin.data.preprocess import Preprocessing
    from celltwin.data.split_draw import make_split
    from celltwin.sim import simulate

    a = simulate("tiny")
    a.write_h5ad(tmp_path / "d.h5ad")
    make_split(a.obs, ObsColumns().present(a.obs), "context_1", holdout=2, seed=0,
               data_path="d.h5ad").write(tmp_path / "s.toml")
    assert cli.main(["train", "--model", "cell-mean", "--data", str(tmp_path / "d.h5ad"), "--split",
                     str(tmp_path / "s.toml"), "-o", str(tmp_path / "run")]) == 0
    base = ["predict", str(tmp_path / "run"), "--data", str(tmp_path / "d.h5ad"), "--split", str(tmp_path / "s.toml"),
            "--repeat-mean"]
    assert cli.main([*base, "-o", str(tmp_path / "p.h5ad")]) == 0
    assert cli.main([*base, "-o", str(tmp_path / "c.h5ad"), "--sample-counts", dist]) == 0
    p, c = ad.read_h5ad(tmp_path / "p.h5ad"), ad.read_h5ad(tmp_path / "c.h5ad")
    assert list(p.obs[PERT_COL]) == list(c.obs[PERT_COL]) and c.X.dtype == np.float32
    Xc = c.X.toarray()
    assert np.array_equal(Xc, np.round(Xc)) and (Xc >= 0).all()
    ctrl = (c.obs[PERT_COL] == CONTROL_LABEL).to_numpy()
    ctx = (a.obs["context"] == "context_1").to_numpy() & (a.obs[PERT_COL] == CONTROL_LABEL).to_numpy()
    np.testing.assert_array_equal(Xc[ctrl], a.X[np.flatnonzero(ctx)].toarray())  # real control counts
    # predicted cells: the mean of counts / L * T approaches expm1 of the (repeated-mean) prediction
    pre = Preprocessing.load(tmp_path / "run")
    pert = (~ctrl) & (c.obs[PERT_COL] == c.obs[PERT_COL][~ctrl].iloc[0]).to_numpy()
    lib_all = np.asarray(a.X[np.flatnonzero(ctx)].sum(1)).ravel()
    want = np.expm1(p.X.toarray()[pert][0]) * lib_all.mean() / pre.target_sum
    got = Xc[pert].mean(0)
    top = np.argsort(want)[-20:]  # well-expressed genes: relative error of a mean of ~60 draws
    assert np.abs(got[top] / want[top] - 1).mean() < 0.25
    info = c.uns["celltwin_predict"]["counts"]  # a native dict, not a JSON string
    assert info["dist"] == dist and info["target_sum"] == pytest.approx(pre.target_sum)
