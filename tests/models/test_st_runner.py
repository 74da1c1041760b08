"""ST through the model registry: options, train_run -> load_predictor -> predict, resume, CLI predict."""

from __future__ import annotations

import numpy as np
import pytest

from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError

torch = pytest.importorskip("torch")

from celltwin.models.st_options import DEMO_OPTIONS, StateOptions, parse_loss

FAST = {"preset": "tiny", "steps": "60", "batch_sets": "4", "lr": "3e-3", "progress": "false",
        "tensorboard": "false", "threads": "1", "warmup": "5"}


def test_options_parse_and_validate():
    o = StateOptions.from_strings({"steps": "12", "lr": "1e-3", "resume": "false", "loss": "energy:1,mse:0.5"})
    assert (o.steps, o.lr, o.resume) == (12, 1e-3, False)
    assert parse_loss(o.loss) == {"energy": 1.0, "mse": 0.5}
    cfg = StateOptions.from_strings({"preset": "state"}).model_config(100, 5, 2)
    assert (cfg.hidden, cfg.n_layers, cfg.set_size) == (696, 8, 512)
    with pytest.raises(ConfigError, match="unknown option"):
        StateOptions.from_strings({"stepz": "3"})
    with pytest.raises(ConfigError, match="steps: expected int"):
        StateOptions.from_strings({"steps": "many"})
    with pytest.raises(ConfigError, match="loss"):
        StateOptions.from_strings({"loss": "l1"})
    with pytest.raises(ConfigError, match="resume"):
        StateOptions.from_strings({"resume": "maybe"})
    StateOptions.from_strings(DEMO_OPTIONS)  # the demo preset parses


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    from celltwin.predict import train_run
    from celltwin.sim import simulate

    torch.set_num_threads(1)
    adata = simulate("tiny")
    out = tmp_path_factory.mktemp("st") / "run"
    meta = train_run("state", adata, out, seed=0, options=FAST)
    return adata, out, meta


def test_train_writes_run_and_learns(tiny_run):
    from celltwin.data.preprocess import Preprocessing
    from celltwin.predict import load_predictor

    adata, out, meta = tiny_run
    assert meta["model"] == "state" and meta["state"]["steps"] == 60
    assert {p.name for p in (out / "state").iterdir()} >= {"model.safetensors", "config.json", "vocab.json",
                                                          "vocabularies.json"}
    assert (out / "train" / "metrics.csv").exists() and (out / "train" / "checkpoints" / "last.pt").exists()
    pred = load_predictor(out)
    pre = Preprocessing.load(out)
    X = pre.transform(adata.X, pre.gene_index(adata.var_names, "tiny"))
    X = X.toarray() if hasattr(X, "toarray") else np.asarray(X)
    ctx = adata.obs[CONTEXT_COL].astype(str).to_numpy()
    pert = adata.obs[PERT_COL].astype(str).to_numpy()
    c0 = sorted(set(ctx))[0]
    C = X[(ctx == c0) & (pert == CONTROL_LABEL)]
    strong = [p for p, k in zip(adata.uns["celltwin_sim"]["perturbations"], adata.uns["celltwin_sim"]["effect_class"],
                                strict=True) if k == "strong"]
    rng = np.random.default_rng(0)
    corr = []
    for p in strong:
        y = pred.predict(C, p, c0, rng)
        assert y.shape == C.shape and y.dtype == np.float32 and (y >= 0).all()
        d_pred = y.mean(0) - C.mean(0)
        d_obs = X[(ctx == c0) & (pert == p)].mean(0) - C.mean(0)
        corr.append(np.corrcoef(d_pred, d_obs)[0, 1])
    assert min(corr) > 0.5, corr  # the predicted pseudobulk change follows the observed one
    # unseen perturbation: controls back unchanged, reported as a fallback
    assert np.array_equal(pred.predict(C, "NOT_A_GENE", c0, rng), C)
    assert pred.describe("NOT_A_GENE", c0) == "fallback:control"
    assert pred.describe(strong[0], c0) == "model"
    assert pred.describe(strong[0], "new-cell-type") == "model:unknown-context"
    # the output keeps the cell order: predicting a permuted input permutes the output (sets reshuffled by rng)
    y1 = pred.predict(C[:10], strong[0], c0, np.random.default_rng(1))
    assert y1.shape == (10, C.shape[1])


def test_resume_and_config_guard(tiny_run):
    from celltwin.predict import train_run

    adata, out, _ = tiny_run
    meta = train_run("state", adata, out, seed=0, options=FAST)  # finished checkpoint: nothing to do
    assert meta["state"]["resumed_from"] == 60 and meta["state"]["steps"] == 60
    with pytest.raises(ConfigError, match="belongs to a different run .*lr: 0.003 in the checkpoint, 0.01 now"):
        train_run("state", adata, out, seed=0, options={**FAST, "lr": "1e-2"})


def test_cli_predict_with_perturbations(tiny_run, tmp_path):
    import anndata as ad

    from celltwin import cli

    adata, out, _ = tiny_run
    data = tmp_path / "data.h5ad"
    adata.write_h5ad(data)
    c0 = sorted(set(adata.obs[CONTEXT_COL].astype(str)))[0]
    p0 = str(adata.uns["celltwin_sim"]["perturbations"][0])
    rc = cli.main(["predict", str(out), "--data", str(data), "--perturbations", p0, "--context", c0,
                   "-o", str(tmp_path / "pred.h5ad")])
    assert rc == 0
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    labels = pred.obs[PERT_COL].astype(str)
    assert set(labels) == {p0, CONTROL_LABEL}
    from celltwin.predict import summarize_sources

    assert summarize_sources(pred)[p0] == "model"


def test_validation_reports_vcc_metrics(tmp_path):
    from celltwin.predict import train_run
    from celltwin.sim import simulate

    torch.set_num_threads(1)
    adata = simulate("tiny")
    opts = {**FAST, "steps": "8", "val_pairs": "2", "val_every": "4", "log_every": "4"}
    meta = train_run("state", adata, tmp_path / "run", seed=0, options=opts)
    val = meta["state"]["val"]
    assert set(val) == {"overlap_at_N", "discrimination_score_l1", "mae"}
    assert all(np.isfinite(v) for v in val.values()) and 0 <= val["overlap_at_N"] <= 1
    held = [tuple(g) for g in meta["state"]["val_pairs"]]
    assert len(held) == 2
    import csv

    rows = list(csv.DictReader((tmp_path / "run" / "train" / "metrics.csv").open()))
    assert sorted({int(r["step"]) for r in rows if r["split"] == "val"}) == [4, 8]


def test_unseen_combination_of_seen_genes_is_predicted(tiny_run):
    from celltwin.predict import load_predictor

    adata, out, _ = tiny_run
    pred = load_predictor(out)
    p0, p1 = (str(p) for p in adata.uns["celltwin_sim"]["perturbations"][:2])
    c0 = sorted(set(adata.obs[CONTEXT_COL].astype(str)))[0]
    assert pred.describe(f"{p0}+{p1}", c0) == "model"
    assert pred.describe(f"{p0}+NOT_A_GENE", c0) == "fallback:control"
    C = np.abs(np.random.default_rng(0).normal(size=(20, len(pred.genes)))).astype(np.float32)
    y = pred.predict(C, f"{p0}+{p1}", c0, np.random.default_rng(0))
    assert y.shape == C.shape and not np.allclose(y, pred.predict(C, p0, c0, np.random.default_rng(0)))
