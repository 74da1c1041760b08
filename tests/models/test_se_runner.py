"""SE fit / transform glue and the `celltwin embed` CLI on a tiny generated counts file."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ad = pytest.importorskip("anndata")
import scipy.sparse as sp

from celltwin._constants import EMBED_KEY
from celltwin.cli import main
from celltwin.errors import InputError

N_CELLS, N_GENES = 96, 70


def _counts_file(path, seed: int = 0):
    rng = np.random.default_rng(seed)
    groups = np.repeat([0, 1], N_CELLS // 2)
    mean = rng.gamma(0.6, 2.0, size=(2, N_GENES))
    mean[1, :10] *= 8.0  # group 1 expresses the first 10 genes much more
    x = rng.poisson(mean[groups] * rng.uniform(0.5, 1.5, size=(N_CELLS, 1))).astype(np.float32)
    a = ad.AnnData(sp.csr_matrix(x))
    a.var_names = [f"G{i}" for i in range(N_GENES)]
    a.obs["grp"] = np.where(groups == 0, "a", "b")
    a.obsm["X_pca"] = rng.normal(size=(N_CELLS, 3)).astype(np.float32)
    a.write_h5ad(path)
    return a


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from celltwin.models.se_runner import fit_state_embedding
    from celltwin.models.state_embedding import StateEmbeddingConfig
    from celltwin.train import TrainConfig

    d = tmp_path_factory.mktemp("se")
    data = d / "data.h5ad"
    adata = _counts_file(data)
    # a gene table covering all but 3 genes, with one gene named by an old symbol through HGNC
    hgnc = d / "hgnc.tsv"
    hgnc.write_text("Approved symbol\tEnsembl gene ID\tAlias symbol\tPrevious symbol\nG5\t\t\tOLD5\n")
    rng = np.random.default_rng(1)
    names = [("OLD5" if i == 5 else f"G{i}") for i in range(3, N_GENES)]
    table = d / "genes.csv"
    table.write_text(
        "".join(f"{g}," + ",".join(f"{v:.5f}" for v in rng.normal(size=6)) + "\n" for g in names)
    )
    notes: list[str] = []
    res = fit_state_embedding(
        data,
        d / "model",
        config=StateEmbeddingConfig.preset("tiny"),
        train_config=TrainConfig(max_steps=12, lr=1e-3, progress=False, tensorboard=False, log_every=4),
        gene_table=table,
        hgnc=hgnc,
        dataset_key="grp",
        batch_size=16,
        log=notes.append,
    )
    return d, data, adata, res, notes


def test_fit_writes_model_dir_and_reports_coverage(trained):
    d, _, _, res, notes = trained
    m = d / "model"
    for name in (
        "config.json",
        "genes.txt",
        "gene_embeddings.safetensors",
        "model.safetensors",
        "run.json",
        "preprocess.json",
        "metrics.csv",
    ):
        assert (m / name).is_file(), name
    assert (m / "checkpoints" / "last.pt").is_file()
    run = json.loads((m / "run.json").read_text())
    assert run["model"] == "state_embedding" and run["steps"] == 12
    cov = res.coverage
    assert cov.exact == N_GENES - 4 and cov.mapped == {"G5": "OLD5"} and cov.missing == ["G0", "G1", "G2"]
    assert res.model.gene_found.tolist() == [False] * 3 + [True] * (N_GENES - 3)
    assert any("67/70" in n for n in notes)
    assert res.model.datasets == ["a", "b"]
    assert res.train.items_per_s is not None and res.train.items_per_s > 0


def test_transform_copies_input_and_adds_embeddings(trained, tmp_path):
    from celltwin.data.preprocess import Preprocessing
    from celltwin.models.se_embed import embed_rows, transform
    from celltwin.models.state_embedding import StateEmbeddingModel

    d, data, adata, _, _ = trained
    out = tmp_path / "out.h5ad"
    emb = transform(
        d / "model", data, out, batch_size=40, device="cpu", dataset_key="grp", log=lambda s: None
    )
    got = ad.read_h5ad(out)
    assert got.obsm[EMBED_KEY].shape == (N_CELLS, 32) and np.array_equal(got.obsm[EMBED_KEY], emb)
    assert np.array_equal(got.X.toarray(), adata.X.toarray())  # X copied by default
    assert (
        np.array_equal(got.obsm["X_pca"], adata.obsm["X_pca"])
        and got.obs["grp"].tolist() == adata.obs["grp"].tolist()
    )
    # equals the model applied to the preprocessed rows in one batch
    model = StateEmbeddingModel.from_pretrained(d / "model")
    pre = Preprocessing.load(d / "model")
    x = pre.transform(adata.X, pre.gene_index(adata.var_names))
    ds = np.array([model.datasets.index(g) for g in adata.obs["grp"]])
    np.testing.assert_allclose(emb, embed_rows(model, x, ds), atol=1e-5)

    # shuffled / missing columns: genes are matched by name, absent ones fed as 0
    perm = np.random.default_rng(0).permutation(N_GENES)
    shuffled = adata[:, perm].copy()
    shuffled.write_h5ad(tmp_path / "shuffled.h5ad")
    emb2 = transform(
        d / "model",
        tmp_path / "shuffled.h5ad",
        tmp_path / "o2.h5ad",
        copy_x=False,
        dataset_key="grp",
        log=lambda s: None,
    )
    np.testing.assert_allclose(emb2, emb, atol=1e-5)
    slim = ad.read_h5ad(tmp_path / "o2.h5ad")
    assert slim.X is None and list(slim.var_names) == list(shuffled.var_names)

    # re-transforming a file that already has X_state replaces it
    emb3 = transform(d / "model", out, tmp_path / "o3.h5ad", dataset_key="grp", log=lambda s: None)
    np.testing.assert_allclose(emb3, emb, atol=1e-6)

    with pytest.raises(Exception, match="input file"):
        transform(d / "model", data, data, log=lambda s: None)
    empty = ad.AnnData(sp.csr_matrix(np.ones((2, 2), np.float32)))
    empty.var_names = ["X1", "X2"]
    empty.write_h5ad(tmp_path / "other.h5ad")
    with pytest.raises(InputError, match="none of the model"):
        transform(d / "model", tmp_path / "other.h5ad", tmp_path / "o4.h5ad", log=lambda s: None)


def test_cli_embed_fit_and_transform(tmp_path, capsys):
    data = tmp_path / "d.h5ad"
    _counts_file(data, seed=2)
    model = tmp_path / "m"
    fit = ["embed", "fit", "--data", str(data), "-o", str(model), "--preset", "tiny", "--steps", "4",
           "--batch-size", "8", "--no-progress"]
    rc = main([*fit, "--loss", "mse+energy"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "learned 64-d vector" in out and "trained SE (tiny) for 4 steps" in out
    cfg = json.loads((model / "config.json").read_text())
    assert cfg["config"]["loss"] == "mse+energy" and cfg["n_missing_genes"] == N_GENES
    # running again (same options) resumes from the final checkpoint: no further steps
    assert main([*fit, "--loss", "mse+energy"]) == 0
    assert "for 4 steps" in capsys.readouterr().out
    rc = main(["embed", "transform", str(model), str(data), "-o", str(tmp_path / "o.h5ad"), "--no-progress"])
    assert rc == 0
    assert "96 cells x 32 dims" in capsys.readouterr().out
    assert ad.read_h5ad(tmp_path / "o.h5ad").obsm[EMBED_KEY].shape == (N_CELLS, 32)
    assert (
        main(["embed", "transform", str(tmp_path / "nope"), str(data), "-o", str(tmp_path / "x.h5ad")]) == 2
    )


def test_cli_embed_fit_on_split_training_cells(tmp_path, capsys):
    data = tmp_path / "d.h5ad"
    a = _counts_file(data, seed=3)
    a.obs["context"] = a.obs["grp"].astype(str)
    a.obs["target_gene"] = np.tile(["non-targeting", "P1", "P2"], N_CELLS // 3)
    a.write_h5ad(data)
    split = tmp_path / "split.toml"
    assert (
        main(
            [
                "split",
                str(data),
                "--context-col",
                "context",
                "--target",
                "b",
                "--kind",
                "zeroshot",
                "-o",
                str(split),
            ]
        )
        == 0
    )
    capsys.readouterr()
    rc = main(
        [
            "embed",
            "fit",
            "--data",
            str(data),
            "--split",
            str(split),
            "-o",
            str(tmp_path / "m"),
            "--preset",
            "tiny",
            "--steps",
            "2",
            "--batch-size",
            "8",
            "--no-progress",
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert f"training on the {N_CELLS // 2} training cells" in out  # context b (half the cells) held out
    assert f"{N_CELLS // 2} cells, batch 8" in out


def test_fit_resumes_after_a_crash_to_the_same_weights(tmp_path, monkeypatch):
    from celltwin.models.se_runner import fit_state_embedding
    from celltwin.models.state_embedding import StateEmbeddingConfig, StateEmbeddingModel
    from celltwin.train import TrainConfig

    data = tmp_path / "d.h5ad"
    _counts_file(data, seed=4)

    def run(out):
        tcfg = TrainConfig(max_steps=4, ckpt_every=2, lr=1e-3, progress=False, tensorboard=False, log_every=1)
        return fit_state_embedding(
            data,
            out,
            config=StateEmbeddingConfig.preset("tiny"),
            train_config=tcfg,
            batch_size=8,
            log=lambda s: None,
        )

    ref = run(tmp_path / "ref").model.state_dict()

    calls = {"n": 0}
    real_loss = StateEmbeddingModel.loss

    def crashing_loss(self, x, ds=None):
        calls["n"] += 1
        if calls["n"] == 3:  # dies during step 3, after the step-2 checkpoint
            raise RuntimeError("simulated crash")
        return real_loss(self, x, ds)

    monkeypatch.setattr(StateEmbeddingModel, "loss", crashing_loss)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(tmp_path / "crash")
    monkeypatch.setattr(StateEmbeddingModel, "loss", real_loss)
    res = run(tmp_path / "crash")
    assert res.train.resumed_from == 2 and res.train.step == 4
    got = res.model.state_dict()
    for k, v in ref.items():
        assert torch.equal(got[k], v), k
