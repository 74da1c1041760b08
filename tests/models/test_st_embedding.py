"""ST on State Embedding cells (``input_space=embedding``): bridge numbers, train -> predict -> eval, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest

from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError

torch = pytest.importorskip("torch")

from celltwin.models.st_options import StateOptions
from celltwin.models.st_se_bridge import SEBridge

FAST = {"preset": "tiny", "steps": "80", "batch_sets": "4", "lr": "3e-3", "progress": "false",
        "tensorboard": "false", "threads": "1", "warmup": "5", "input_space": "embedding",
        "se_preset": "tiny", "se_steps": "30", "se_batch": "32"}


class _FakeSE(torch.nn.Module):
    """Stands in for an SE model in the bridge test: the 'embedding' is the SE-space row itself."""

    def __init__(self, genes):
        super().__init__()
        self.genes = list(genes)
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.config = type("C", (), {"d_out": len(genes)})()

    def embed(self, x, ds=None):
        return x


class _Pre:
    def __init__(self, t, log1p=True):
        self.target_sum, self.log1p = t, log1p


def test_bridge_maps_genes_and_rescales_exactly(tmp_path):
    run_genes = ["A", "B", "C"]
    se = _FakeSE(["C", "Z", "A"])  # Z absent from the run: fed as 0
    # the SE model was fitted on counts with T_se = 2000, the run with T_run = 500
    from celltwin.data.preprocess import Preprocessing

    Preprocessing(genes=se.genes, target_sum=2000.0).save(tmp_path)
    b = SEBridge.build(se, tmp_path, run_genes, _Pre(500.0))
    assert b.cols.tolist() == [2, -1, 0] and b.scale == pytest.approx(4.0)
    assert "2/3 SE genes found" in b.note
    counts = np.array([[3.0, 0.0, 1.0], [0.0, 5.0, 5.0]])  # raw counts of the run's genes (totals 4, 10)
    tot = np.array([[4.0], [10.0]])
    x_run = np.log1p(counts / tot * 500).astype(np.float32)
    got = b.embed(x_run)
    want = np.log1p(counts / tot * 2000)[:, [2, 0]]  # SE genes C, A; Z = 0
    np.testing.assert_allclose(got[:, [0, 2]], want, rtol=1e-6)
    assert (got[:, 1] == 0).all()
    # the prediction cache: duplicated and repeated rows give the same embeddings as a fresh call
    rows = x_run[[0, 1, 0, 0, 1]]
    np.testing.assert_array_equal(b.embed(rows, cache=True), b.embed(rows))
    assert len(b._cache) == 2
    np.testing.assert_array_equal(b.embed(x_run[[1]], cache=True), got[[1]])
    assert len(b._cache) == 2
    # same normalisation -> no rescaling; log-normalised SE -> values as they are
    assert SEBridge.build(se, tmp_path, run_genes, _Pre(2000.0)).scale is None
    assert SEBridge.build(se, tmp_path / "none", run_genes, _Pre(500.0)).scale is None
    with pytest.raises(InputError, match="none of its 3 genes"):
        SEBridge.build(se, tmp_path, ["X", "Y"], _Pre(500.0))


def test_options_validate_embedding(tmp_path):
    o = StateOptions.from_strings({"input_space": "embedding"})
    cfg = o.model_config(32, 5, 2, n_genes=100)
    assert (cfg.input_space, cfg.n_genes, cfg.input_dim) == ("embedding", 100, 32)
    assert cfg.decoder_residual and cfg.gene_loss_weight == 50.0
    off = StateOptions.from_strings({"input_space": "embedding", "decoder_residual": "false"})
    assert off.model_config(32, 5, 2, n_genes=100).decoder_residual is False
    with pytest.raises(ConfigError, match="input_space"):
        StateOptions.from_strings({"input_space": "pca"})
    with pytest.raises(ConfigError, match="not an SE model directory"):
        StateOptions.from_strings({"input_space": "embedding", "se_model": str(tmp_path)})
    with pytest.raises(ConfigError, match="se_preset"):
        StateOptions.from_strings({"input_space": "embedding", "se_preset": "huge"})


@pytest.fixture(scope="module")
def se_run(tmp_path_factory):
    from celltwin.predict import train_run
    from celltwin.sim import simulate

    torch.set_num_threads(1)
    adata = simulate("tiny")
    out = tmp_path_factory.mktemp("stse") / "run"
    meta = train_run("state", adata, out, seed=0, options=FAST)
    return adata, out, meta


def test_train_on_embeddings_writes_se_and_predicts_genes(se_run):
    from celltwin.data.preprocess import Preprocessing
    from celltwin.models.state_transition import StateTransition
    from celltwin.predict import load_predictor

    adata, out, meta = se_run
    st = meta["state"]
    assert st["input_space"] == "embedding" and st["se"]["dim"] == 32 and "fitted" in st["se"]["model"]
    assert (out / "state" / "se" / "config.json").exists()
    model = StateTransition.from_pretrained(out / "state")
    assert model.config.input_space == "embedding" and model.config.input_dim == 32
    assert model.config.n_genes == adata.n_vars and model.gene_decoder is not None
    assert any(k.startswith("genes_") for k in st["final_losses"])  # the decoded-genes loss was trained
    pred = load_predictor(out)
    pre = Preprocessing.load(out)
    X = np.asarray(pre.transform(adata.X, pre.gene_index(adata.var_names, "tiny")))
    ctx = adata.obs[CONTEXT_COL].astype(str).to_numpy()
    pert = adata.obs[PERT_COL].astype(str).to_numpy()
    c0 = sorted(set(ctx))[0]
    C = X[(ctx == c0) & (pert == CONTROL_LABEL)][:40]
    p = adata.uns["celltwin_sim"]["perturbations"][0]
    y = pred.predict(C, p, c0, np.random.default_rng(0))
    assert y.shape == C.shape and y.dtype == np.float32 and np.isfinite(y).all() and (y >= 0).all()
    # the decoder produces expression on the data's scale: mean predicted cell correlates with the controls' mean
    assert np.corrcoef(y.mean(0), C.mean(0))[0, 1] > 0.8
    # deterministic given the rng
    np.testing.assert_array_equal(y, pred.predict(C, p, c0, np.random.default_rng(0)))
    assert np.array_equal(pred.predict(C, "NOT_A_GENE", c0, np.random.default_rng(0)), C)


def test_cli_train_embedding_with_given_se_model_then_predict_and_eval(se_run, tmp_path):
    import anndata as ad

    from celltwin.cli import main
    from celltwin.data.columns import ObsColumns
    from celltwin.data.split_draw import make_split

    adata, out, _ = se_run
    data = tmp_path / "sim.h5ad"
    adata.write_h5ad(data)
    cols = ObsColumns(PERT_COL, CONTROL_LABEL, CONTEXT_COL, None)
    target = sorted(set(adata.obs[CONTEXT_COL].astype(str)))[0]
    make_split(adata.obs, cols, target, holdout=0.5, seed=0, kind="fewshot", data_path=str(data)).write(
        tmp_path / "split.toml")
    run = tmp_path / "run"
    # the command line's wiring is under test, not learning: 10 steps (the API test above trains 80)
    fast = {**FAST, "steps": "10"}
    sets = [f"--set={k}={v}" for k, v in fast.items() if not k.startswith("se_") and k != "input_space"]
    # --se-model without --input-space embedding is refused
    assert main(["train", "--model", "state", "--se-model", str(out / "state" / "se"), "--data", str(data),
                 "--split", str(tmp_path / "split.toml"), "-o", str(run), *sets]) == 2
    assert main(["train", "--model", "state", "--input-space", "embedding", "--se-model", str(out / "state" / "se"),
                 "--data", str(data), "--split", str(tmp_path / "split.toml"), "-o", str(run), *sets]) == 0
    meta = json.loads((run / "run.json").read_text())
    assert "copied" in meta["state"]["se"]["model"] and (run / "state" / "se" / "model.safetensors").exists()
    assert main(["predict", str(run), "--data", str(data), "--split", str(tmp_path / "split.toml"),
                 "-o", str(tmp_path / "pred.h5ad"), "--write-real", str(tmp_path / "real.h5ad")]) == 0
    pred = ad.read_h5ad(tmp_path / "pred.h5ad")
    assert pred.n_vars == adata.n_vars and (pred.obs[PERT_COL] == CONTROL_LABEL).any()
    assert main(["eval", "--pred", str(tmp_path / "pred.h5ad"), "--real", str(tmp_path / "real.h5ad"),
                 "-o", str(tmp_path / "ev"), "--no-report"]) == 0  # the report's plots: tests/test_report.py
    assert (tmp_path / "ev" / "agg_results.csv").exists()


def test_gene_embedding_perturbations_reach_unseen_genes(tmp_path):
    """Perturbations as gene vectors: an unseen gene whose vector equals a trained gene's is predicted identically."""
    from celltwin.genes import GeneTable, save_gene_table
    from celltwin.predict import load_predictor, train_run
    from celltwin.sim import simulate

    torch.set_num_threads(1)
    adata = simulate("tiny")
    perts = [str(p) for p in adata.uns["celltwin_sim"]["perturbations"]]
    held = perts[-1]
    train = adata[adata.obs[PERT_COL].astype(str) != held].copy()
    rng = np.random.default_rng(0)
    genes = [str(g) for g in adata.var_names]
    vec = rng.normal(size=(len(genes), 8)).astype(np.float32)
    twin = perts[0]
    vec[genes.index(held)] = vec[genes.index(twin)]  # the held-out gene "looks like" a trained one
    table = tmp_path / "genes.safetensors"
    save_gene_table(GeneTable(genes, vec), table)
    opts = {k: v for k, v in FAST.items() if not k.startswith("se_") and k != "input_space"}
    run = tmp_path / "run"
    meta = train_run("state", train, run, seed=0, options={**opts, "steps": "20", "pert_embeddings": str(table)})
    assert meta["state"]["options"]["pert_embeddings"] == str(table.resolve())
    pred = load_predictor(run)
    assert pred.model.config.pert_emb_dim == 8
    X = np.log1p(np.asarray(adata.X[:30].todense() if hasattr(adata.X, "todense") else adata.X[:30], np.float32))
    y_twin = pred.predict(X, twin, None, np.random.default_rng(1))
    y_held = pred.predict(X, held, None, np.random.default_rng(1))
    assert pred.describe(held, None) == "model:gene-embedding" and pred.describe(twin, None) == "model"
    np.testing.assert_array_equal(y_held, y_twin)
    assert not np.array_equal(y_held, X)  # really predicted, not the controls fallback
    assert pred.describe("NOT_A_GENE", None) == "fallback:control"
    # a table that misses a trained gene is refused with the gene named
    missing = [g for g in genes if g in perts[:-1]][:1]
    keep = [i for i, g in enumerate(genes) if g not in missing]
    save_gene_table(GeneTable([genes[i] for i in keep], vec[keep]), tmp_path / "short2.safetensors")
    with pytest.raises(InputError, match=missing[0]):
        train_run("state", train, tmp_path / "run3", options={**opts, "pert_embeddings": str(tmp_path / "short2.safetensors")})
