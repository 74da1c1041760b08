"""arc-state checkpoints: the restricted unpickler, `celltwin import-state`, prediction and `--init-from`.

The golden files (tests/data/state_golden, README there) were written by arc-state 0.11.1 run as a
black box; arc-state is never imported here. The model-level equality with arc-state's forward
is in tests/models/test_arc_transition.py / test_arc_embedding.py; here the whole path is checked:
import -> run directory -> celltwin's predictor -> the values `state tx infer` computed.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from celltwin import cli
from celltwin.errors import InputError
from celltwin.state_import import UnsafePickleError, find_source, import_state, load_pickle, load_torch
from celltwin.state_import._unpickle import plain

GOLD = Path(__file__).parent / "data" / "state_golden"
VARIANTS = ["st_llama_hvg", "st_llama_all", "st_gpt2_hvg", "st_llama_emb", "st_llama_extras"]


# ---------------------------------------------------------------------------- restricted unpickler
class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_every_golden_pickle_loads_as_plain_data():
    for f in sorted(GOLD.glob("st_*/*.p*")) + sorted(GOLD.glob("st_*/*.torch")) + [GOLD / "se" / "final.pt"]:
        obj = load_pickle(f) if f.suffix == ".pkl" else load_torch(f)
        assert isinstance(obj, dict), f
    m = plain(load_torch(GOLD / "st_llama_hvg" / "pert_onehot_map.pt"))
    assert list(m) == ["GENE003", "GENE010", "GENE017", "GENE024", "GENE031", "non-targeting"]
    assert all(type(k) is str for k in m)
    se = load_torch(GOLD / "se" / "final.pt")
    assert se["hyper_parameters"]["collater"].cls_name == "state.emb.data.loader.VCIDatasetSentenceCollator"
    assert se["hyper_parameters"]["collater"].state["pad_length"] == 32


def test_a_pickle_that_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    f = tmp_path / "var_dims.pkl"
    f.write_bytes(pickle.dumps({"gene_names": ["A"], "x": _Evil(marker)}))
    with pytest.raises(UnsafePickleError, match=r"var_dims\.pkl: refusing to load: the pickle references posix\.system"):
        load_pickle(f)
    t = tmp_path / "final.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"x": _Evil(marker)}}, t)
    with pytest.raises(UnsafePickleError, match="posix.system"):
        load_torch(t)
    assert not marker.exists()
    # calls that need no class of their own: builtins outside the allow-list
    for name in ("eval", "exec", "getattr", "__import__", "open"):
        raw = f"cbuiltins\n{name}\n(S'1'\ntR.".encode()
        (tmp_path / "g.pkl").write_bytes(raw)
        with pytest.raises(UnsafePickleError, match=f"builtins.{name}"):
            load_pickle(tmp_path / "g.pkl")


@pytest.mark.parametrize("target", ["var_dims.pkl", "pert_onehot_map.pt", "checkpoints/final.ckpt"])
def test_import_state_refuses_a_hostile_run_with_one_line(tmp_path, capsys, target):
    run = tmp_path / "run"
    shutil.copytree(GOLD / "st_llama_hvg", run)
    marker = tmp_path / "pwned"
    if target.endswith(".pkl"):
        (run / target).write_bytes(pickle.dumps({"gene_names": ["A"], "evil": _Evil(marker)}))
    else:
        torch.save({"state_dict": {}, "hyper_parameters": {}, "evil": _Evil(marker)}, run / target)
    rc = cli.main(["import-state", str(run), "-o", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and "refusing to load" in err and target.split("/")[-1] in err
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_import_state_refuses_a_hostile_se_checkpoint(tmp_path, capsys):
    marker = tmp_path / "pwned"
    torch.save({"state_dict": {}, "cfg_yaml": "a: 1", "collater": _Evil(marker)}, tmp_path / "se.ckpt")
    assert cli.main(["import-state", str(tmp_path / "se.ckpt"), "-o", str(tmp_path / "out")]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------- where sources are found
def test_sources_runs_checkpoints_and_the_hf_cache(tmp_path, monkeypatch):
    s = find_source(GOLD / "st_llama_hvg")
    assert (s.kind, s.checkpoint.name) == ("st", "final.ckpt")
    assert find_source(GOLD / "se" / "final.pt").kind == "se"
    assert find_source(GOLD / "se").checkpoint.name == "final.pt"  # protein_embeddings.pt is not a checkpoint
    with pytest.raises(InputError, match="holds 5 arc-state ST runs"):
        find_source(GOLD)
    # a Hugging Face cache: models--org--name/snapshots/<rev>/..., refs/main names the revision
    repo = tmp_path / "hub" / "models--arcinstitute--ST-Toy"
    shutil.copytree(GOLD / "st_llama_hvg", repo / "snapshots" / "abc123" / "fewshot" / "toy")
    (repo / "snapshots" / "old").mkdir()
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc123")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    by_id = find_source("arcinstitute/ST-Toy")
    assert by_id.kind == "st" and by_id.path == repo / "snapshots" / "abc123" / "fewshot" / "toy"
    assert find_source(repo).path == by_id.path
    with pytest.raises(InputError, match="does not download"):
        find_source("arcinstitute/SE-600M")


# ---------------------------------------------------------------------------- import + predict
@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    out = {}
    base = tmp_path_factory.mktemp("imported")
    for v in VARIANTS:
        import_state(GOLD / v, base / v)
        out[v] = base / v
    return out


@pytest.fixture(scope="module")
def infer_input():
    return ad.read_h5ad(GOLD / "data" / "infer_input.h5ad")


@pytest.mark.parametrize("variant", VARIANTS)
def test_imported_run_predicts_what_tx_infer_computed(imported, infer_input, variant):
    """Every `tx infer` forward call, replayed through `celltwin predict`'s predictor: equal within 1e-5.

    For arc-state models the predictor keeps the cells' order and cuts sets as `tx infer` does (the
    GPT-2 backbone attends causally), clips at [0, 14] in gene space as `tx infer` does, and decodes
    genes for the embedding model (`tx infer` writes clip(gene_decoder(out), 0, 14) to X).
    """
    from celltwin.runs import load_predictor

    run = imported[variant]
    meta = json.loads((run / "run.json").read_text())
    assert meta["arch"] == "arc-state" and meta["model"] == "state"
    pred = load_predictor(run)
    calls = np.load(GOLD / variant / "infer_forward_calls.npz")
    X = np.asarray(infer_input.X.toarray(), dtype=np.float32)
    checked = 0
    for i in range(int(calls["n_calls"])):
        names = calls[f"call{i}.args.0.pert_name"]
        p = str(names[0])
        assert (names == p).all()
        rows = calls[f"call{i}.input_rows"]
        ctrl = calls[f"call{i}.args.0.ctrl_cell_emb"]
        if p == "GENE050":  # unseen: arc feeds the control one-hot; celltwin returns the controls (documented)
            assert pred.describe(p, "ctA") == "fallback:control"
            continue
        kw = {}
        if variant == "st_llama_emb":
            np.testing.assert_array_equal(ctrl, infer_input.obsm["X_state"][rows])
            kw["inputs"] = ctrl
            controls = X[rows]
            expected = np.clip(calls[f"outside{i}.out"], 0, 14)
            np.testing.assert_array_equal(calls[f"outside{i}.args.0"], calls[f"call{i}.out"])
        else:
            controls = ctrl
            ref = infer_input.obsm["X_hvg"][rows] if "hvg" in variant or "extras" in variant else X[rows]
            np.testing.assert_allclose(ctrl, ref, atol=0)
            out = calls[f"call{i}.out.0"] if variant == "st_llama_extras" else calls[f"call{i}.out"]
            expected = np.clip(out, 0, 14)
        if variant == "st_llama_extras":
            batches = json.loads((run / "state" / "vocab.json").read_text())["batches"]
            kw["batches"] = np.array([batches[b] for b in calls[f"call{i}.args.0.batch"]])
        label = "non-targeting" if p == "non-targeting" else p
        got = pred.predict(controls, label, "ctA", np.random.default_rng(i), **kw)
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
        checked += 1
    assert checked >= 8


def test_cli_import_then_predict_with_the_runs_own_columns(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["import-state", str(GOLD / "st_llama_extras"), "-o", str(run)]) == 0
    assert "imported arc-state ST run" in capsys.readouterr().out
    meta = json.loads((run / "run.json").read_text())
    assert meta["columns"] == {"pert_col": "target_gene", "control_label": "non-targeting",
                               "context_col": "cell_type", "batch_col": "gem_group"}
    assert len(meta["imported_from"]["sha256"]) >= 6
    out = tmp_path / "pred.h5ad"
    rc = cli.main(["predict", str(run), "--data", str(GOLD / "data" / "infer_input.h5ad"),
                   "--perturbations", "GENE003,GENE024", "--context", "ctB", "-o", str(out)])
    assert rc == 0, capsys.readouterr().err
    p = ad.read_h5ad(out)
    hvg = plain(load_pickle(GOLD / "st_llama_extras" / "var_dims.pkl"))["gene_names"]
    assert list(p.var_names) == hvg
    assert p.obs["target_gene"].value_counts().to_dict() == {"non-targeting": 12, "GENE003": 5, "GENE024": 5}
    x = p.X.toarray()
    assert np.isfinite(x).all() and x.min() >= 0 and x.max() <= 14
    # the predicted cells differ from their controls (the model ran), the controls are copied through
    assert not np.allclose(x[:5], x[10:15])


def test_predict_refuses_counts_for_a_log_input_model_and_target_sum_fixes_it(tmp_path, capsys):
    run = tmp_path / "run"
    import_state(GOLD / "st_llama_all", run)
    rc = cli.main(["predict", str(run), "--data", str(GOLD / "data" / "toy_raw.h5ad"), "--perturbations",
                   "GENE003", "--context", "ctA", "-o", str(tmp_path / "p.h5ad")])
    assert rc == 2 and "--target-sum" in capsys.readouterr().err
    run2 = tmp_path / "run2"
    assert cli.main(["import-state", str(GOLD / "st_llama_all"), "-o", str(run2), "--target-sum", "1e4"]) == 0
    rc = cli.main(["predict", str(run2), "--data", str(GOLD / "data" / "toy_raw.h5ad"), "--perturbations",
                   "GENE003", "--context", "ctA", "-o", str(tmp_path / "p.h5ad")])
    assert rc == 0, capsys.readouterr().err


def test_stmodel_load_accepts_an_imported_run_and_an_arc_run_directory(imported, infer_input):
    import celltwin

    for src in (imported["st_llama_hvg"], GOLD / "st_llama_hvg"):
        m = celltwin.STModel.load(src)
        assert m.module.arch == "arc-state"
        pred = m.predict(infer_input, {"GENE024": 4}, context="ctA")
        assert pred.n_obs == 4 + int(((infer_input.obs["cell_type"] == "ctA")
                                      & (infer_input.obs["target_gene"] == "non-targeting")).sum())


def test_state_transition_from_pretrained_accepts_arc_sources(imported):
    import celltwin

    fwd = np.load(GOLD / "st_gpt2_hvg" / "forward_padded.npz")
    for src in (GOLD / "st_gpt2_hvg", imported["st_gpt2_hvg"], imported["st_gpt2_hvg"] / "state"):
        m = celltwin.StateTransition.from_pretrained(src)
        assert m.arch == "arc-state" and m.config.backbone == "gpt2"
        with torch.no_grad():
            out = m.forward_arc(torch.from_numpy(fwd["fwd.ctrl_cell_emb"]), torch.from_numpy(fwd["fwd.pert_emb"]),
                                padded=True)
        np.testing.assert_allclose(out.numpy(), fwd["fwd.out_padded"], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- --init-from
def test_init_from_keeps_what_fits_by_name(imported):
    from celltwin._constants import CONTROL_LABEL
    from celltwin.models.arc_transition import ArcStateTransition
    from celltwin.models.st_init import arch_config, init_model, read_init_source

    src = read_init_source(imported["st_llama_all"])
    old_perts = src.vocab["perturbations"]
    new_perts = [CONTROL_LABEL, "GENE003", "GENE099", "GENE031"]  # GENE099 is new
    cfg = arch_config(src, pert_dim=len(new_perts))
    torch.manual_seed(0)
    model = ArcStateTransition(cfg, vocab={"genes": src.vocab["genes"], "perturbations": new_perts})
    fresh = model.state_dict()["pert_encoder.0.weight"].clone()
    rep = init_model(model, src)
    w_old = src.tensors["pert_encoder.0.weight"]
    w_new = model.state_dict()["pert_encoder.0.weight"]
    for j, name in enumerate(new_perts):
        if name in old_perts:
            torch.testing.assert_close(w_new[:, j], w_old[:, old_perts.index(name)], rtol=0, atol=0)
        else:
            torch.testing.assert_close(w_new[:, j], fresh[:, j], rtol=0, atol=0)
    assert rep["partially_copied"] == {"pert_encoder.0.weight": {"kept": 3, "of": 4, "by": "perturbations"}}
    assert rep["reinitialised"] == []
    torch.testing.assert_close(model.state_dict()["project_out.0.weight"], src.tensors["project_out.0.weight"])


@pytest.mark.slow
def test_train_init_from_an_imported_run_then_predict(tmp_path, capsys):
    """`celltwin train --init-from` on the toy data (a new perturbation and a held-out one), 2 steps."""
    run = tmp_path / "arc"
    import_state(GOLD / "st_llama_all", run)
    a = ad.read_h5ad(GOLD / "data" / "toy.h5ad")
    a.obs["target_gene"] = a.obs["target_gene"].astype(str).replace({"GENE017": "GENE099"})
    data = tmp_path / "toy.h5ad"
    a.write_h5ad(data)
    split = tmp_path / "split.toml"
    split.write_text(f'[datasets]\ntoy = "{data}"\n[training]\ntoy = "train"\n'
                     '[fewshot."toy.ctA"]\nval = []\ntest = ["GENE031"]\n')
    out = tmp_path / "ft"
    rc = cli.main(["train", "--model", "state", "--data", str(data), "--split", str(split), "-o", str(out),
                   "--init-from", str(run), "--context-col", "cell_type", "--batch-col", "gem_group",
                   "--set", "steps=2", "--set", "progress=false", "--set", "tensorboard=false",
                   "--set", "batch_sets=2"])
    assert rc == 0, capsys.readouterr().err
    meta = json.loads((out / "run.json").read_text())
    rep = meta["state"]["init_from"]
    assert meta["state"]["arch"] == "arc-state"
    assert rep["partially_copied"]["pert_encoder.0.weight"] == {"kept": 5, "of": 6, "by": "perturbations"}
    assert rep["copied"] > 10
    rc = cli.main(["predict", str(out), "--split", str(split), "-o", str(tmp_path / "p.h5ad")])
    assert rc == 0, capsys.readouterr().err
    assert set(ad.read_h5ad(tmp_path / "p.h5ad").obs["target_gene"].astype(str)) == {"GENE031", "non-targeting"}


# ---------------------------------------------------------------------------- SE
def test_import_se_then_embed_transform_equals_state_emb_transform(tmp_path, capsys):
    se = tmp_path / "se"
    assert cli.main(["import-state", str(GOLD / "se" / "final.pt"), "-o", str(se)]) == 0
    assert "imported arc-state SE checkpoint" in capsys.readouterr().out
    meta = json.loads((se / "import.json").read_text())
    assert meta["arch"] == "arc-state" and meta["n_genes"] == 64 and len(meta["sha256"]) == 64
    out = tmp_path / "out.h5ad"
    assert cli.main(["embed", "transform", str(se), str(GOLD / "se" / "transform_input_tiefree.h5ad"),
                     "-o", str(out)]) == 0, capsys.readouterr().err
    got = ad.read_h5ad(out).obsm["X_state"]
    want = np.load(GOLD / "se" / "transform_tiefree_X_state.npy")
    assert got.shape == (40, 26)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


def test_primer_call_from_pretrained_then_model_input_ids_mask(tmp_path, monkeypatch):
    """`StateEmbeddingModel.from_pretrained(path_or_id)` then `model(input_ids, mask)`, as the primer shows."""
    import celltwin

    calls = np.load(GOLD / "se" / "transform_counts_calls.npz")
    repo = tmp_path / "hub" / "models--arcinstitute--SE-Toy" / "snapshots" / "r1"
    repo.mkdir(parents=True)
    shutil.copyfile(GOLD / "se" / "final.pt", repo / "se_toy_epoch1.ckpt")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    for src in (GOLD / "se" / "final.pt", "arcinstitute/SE-Toy"):
        model = celltwin.StateEmbeddingModel.from_pretrained(src)
        assert model.arch == "arc-state"
        for i in range(0, int(calls["n_calls"]), 2):
            x = torch.from_numpy(calls[f"call{i}.forward.args.0"])
            mask = torch.from_numpy(calls[f"call{i}.forward.kwargs.mask"])
            counts = torch.from_numpy(calls[f"call{i}.forward.kwargs.counts"])
            with torch.no_grad():
                tokens, emb, ds = model(x, mask, counts=counts)
            np.testing.assert_allclose(ds.numpy(), calls[f"call{i}.forward.out.2"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(emb.numpy(), calls[f"call{i}.forward.out.1"], atol=1e-5, rtol=0)
            np.testing.assert_allclose(tokens.numpy(), calls[f"call{i}.forward.out.0"], atol=1e-5, rtol=0)
            with torch.no_grad():
                _, emb2, _ = model(x, mask[..., None].expand_as(x))  # the primer's call, mask (B, L, D)
            np.testing.assert_allclose(emb2.norm(dim=1).numpy(), 1.0, atol=1e-6)
    a = ad.read_h5ad(GOLD / "se" / "transform_input_tiefree.h5ad")
    emb = model.embed(a, key="X_se")
    np.testing.assert_allclose(a.obsm["X_se"], np.load(GOLD / "se" / "transform_tiefree_X_state.npy"), atol=1e-5)
    assert emb is a.obsm["X_se"] or np.array_equal(emb, a.obsm["X_se"])


def test_semodel_load_of_an_imported_se_fills_obsm(tmp_path):
    import celltwin

    import_state(GOLD / "se" / "final.pt", tmp_path / "se")
    se = celltwin.SEModel.load(tmp_path / "se")
    a = ad.read_h5ad(GOLD / "se" / "transform_input_tiefree.h5ad")
    se.get_latent_representation(a)
    np.testing.assert_allclose(a.obsm["X_state"], np.load(GOLD / "se" / "transform_tiefree_X_state.npy"), atol=1e-5)


@pytest.mark.slow
def test_train_arc_architecture_from_scratch_and_resume_predict(tmp_path, capsys):
    """`--set arch=arc-state`: arc-state's ST trained by celltwin's loop (2 steps), saved, reloaded, predicting."""
    split = tmp_path / "split.toml"
    split.write_text(f'[datasets]\ntoy = "{GOLD / "data" / "toy.h5ad"}"\n[training]\ntoy = "train"\n'
                     '[fewshot."toy.ctB"]\nval = []\ntest = ["GENE010"]\n')
    out = tmp_path / "run"
    rc = cli.main(["train", "--model", "state", "--split", str(split), "-o", str(out), "--context-col", "cell_type",
                   "--set", "arch=arc-state", "--set", "preset=tiny", "--set", "steps=2", "--set", "batch_sets=2",
                   "--set", "progress=false", "--set", "tensorboard=false"])
    assert rc == 0, capsys.readouterr().err
    cfg = json.loads((out / "state" / "config.json").read_text())
    assert cfg["arch"] == "arc-state" and cfg["hidden"] == 32 and cfg["relu_output"] is True
    assert cfg["pert_dim"] == 6  # control + the 5 genes (GENE010 still trains in ctA)
    rc = cli.main(["predict", str(out), "--split", str(split), "-o", str(tmp_path / "p.h5ad")])
    assert rc == 0, capsys.readouterr().err
    x = ad.read_h5ad(tmp_path / "p.h5ad").X.toarray()
    assert x.shape[1] == 64 and x.min() >= 0 and np.isfinite(x).all()
