"""The notebook API (celltwin.api): model classes vs the command line, save/load, typed options, --set."""

from __future__ import annotations

import json
import subprocess
import sys

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import celltwin
from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, EMBED_KEY, PERT_COL
from celltwin.errors import ConfigError, InputError
from celltwin.registry import MODELS

BASELINE_CLASSES = {
    "control": "ControlModel", "cell-mean": "CellMeanModel", "perturbation-mean": "PerturbationMeanModel",
    "context-transfer": "ContextTransferModel", "scaled-context-transfer": "ScaledContextTransferModel",
    "linear": "LinearModel", "additive": "AdditiveModel",
}
# tiny ST / SE fits: seconds on a shared 2-core CPU
ST_FAST = {"preset": "tiny", "steps": 4, "batch_sets": 2, "warmup": 1, "threads": 1, "num_workers": 0,
           "progress": False, "tensorboard": False}
SE_FAST = {"preset": "tiny", "steps": 2, "batch_size": 16, "num_workers": 0, "progress": False}


@pytest.fixture(scope="module")
def screen(tmp_path_factory):
    """The simulator's tiny screen on disk, a few-shot split and the split's training cells in memory."""
    from celltwin.data.columns import ObsColumns
    from celltwin.data.split_draw import make_split
    from celltwin.pipeline import open_training_data, resolve_dataset_split
    from celltwin.sim import simulate

    d = tmp_path_factory.mktemp("api")
    adata = simulate("tiny")
    data = d / "screen.h5ad"
    adata.write_h5ad(data)
    target = "context_1"
    make_split(adata.obs, ObsColumns(PERT_COL, CONTROL_LABEL, CONTEXT_COL, None), target, holdout=0.5, seed=0,
               kind="fewshot", data_path=str(data)).write(d / "split.toml")
    ds, split = open_training_data(d / "split.toml")
    rs = resolve_dataset_split(ds, split)
    train = adata[rs.train_rows].copy()
    counts = {p: int(((adata.obs[CONTEXT_COL] == c) & (adata.obs[PERT_COL] == p)).sum()) for c, p in rs.test_pairs}
    return {"dir": d, "adata": adata, "data": data, "split": d / "split.toml", "train": train, "target": target,
            "counts": counts, "rows": rs.train_rows}


def _cli(*argv: str) -> None:
    from celltwin import cli

    assert cli.main([*map(str, argv)]) == 0


def _same_prediction(a: ad.AnnData, b: ad.AnnData) -> None:
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    assert list(a.var_names) == list(b.var_names)
    assert a.obs[PERT_COL].astype(str).tolist() == b.obs[PERT_COL].astype(str).tolist()
    assert a.obs[CONTEXT_COL].astype(str).tolist() == b.obs[CONTEXT_COL].astype(str).tolist()
    from celltwin.predict import summarize_sources

    assert summarize_sources(a) == summarize_sources(b) and summarize_sources(a)


def _snapshot(a: ad.AnnData) -> dict:
    return {"X": a.X.copy(), "obs": a.obs.copy(), "var": a.var.copy(), "obsm": sorted(a.obsm.keys()),
            "layers": sorted(a.layers.keys()), "uns": sorted(a.uns.keys())}


def _unchanged(a: ad.AnnData, snap: dict) -> None:
    x = a.X.toarray() if sp.issparse(a.X) else a.X
    y = snap["X"].toarray() if sp.issparse(snap["X"]) else snap["X"]
    np.testing.assert_array_equal(x, y)
    pd.testing.assert_frame_equal(a.obs, snap["obs"])
    pd.testing.assert_frame_equal(a.var, snap["var"])
    assert (sorted(a.obsm.keys()), sorted(a.layers.keys()), sorted(a.uns.keys())) == (
        snap["obsm"], snap["layers"], snap["uns"])


# ---------------------------------------------------------------------------- registry and exports
def test_every_registered_model_has_a_class_and_options():
    for name, spec in MODELS.items():
        cls = spec.api_class()
        assert cls.model_name == name and getattr(celltwin, cls.__name__) is cls
        assert spec.options_class() is cls.options_class()
    for name, cls_name in BASELINE_CLASSES.items():
        assert MODELS[name].api_class().__name__ == cls_name
    assert celltwin.StateOptions is MODELS["state"].options_class()
    assert set(celltwin.__all__) == {"__version__", *celltwin._LAZY}
    with pytest.raises(AttributeError):
        celltwin.NoSuchModel  # noqa: B018


def test_model_classes_load_without_torch():
    code = ("import sys, celltwin\nfrom celltwin.commands import train\n"
            "celltwin.STModel, celltwin.SEModel, celltwin.LinearModel, celltwin.StateOptions, celltwin.SEOptions\n"
            "from celltwin.registry import options_help\noptions_help()\nprint('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


# ---------------------------------------------------------------------------- baselines
def test_baseline_classes_equal_the_cli_and_round_trip(screen, tmp_path):
    from celltwin.pipeline import train_from_files
    from celltwin.predict_files import predict_from_files

    a, train, target, counts = screen["adata"], screen["train"], screen["target"], screen["counts"]
    snap_a, snap_t = _snapshot(a), _snapshot(train)
    cli_preds, models = {}, {}
    for name, cls_name in BASELINE_CLASSES.items():
        run_cli = tmp_path / f"cli-{name}"
        train_from_files(name, screen["data"], screen["split"], run_cli, options={"linear_dim": "3"})
        predict_from_files(run_cli, screen["data"], tmp_path / f"cli-{name}.h5ad", split=screen["split"])
        cli_preds[name] = ad.read_h5ad(tmp_path / f"cli-{name}.h5ad")
        m = models[name] = getattr(celltwin, cls_name)(train).train(linear_dim=3)
        pred = m.predict(a, counts, context=target)
        _same_prediction(pred, cli_preds[name])
        assert pred.uns["celltwin_predict"]["model"] == name and pred.X.dtype == np.float32
    _unchanged(a, snap_a)
    _unchanged(train, snap_t)
    # the class saves a run directory `celltwin predict` reads, and loads the CLI's runs
    for name in ("cell-mean", "linear"):
        cls, m = type(models[name]), models[name]
        saved = m.save(tmp_path / f"saved-{name}")
        predict_from_files(saved, screen["data"], tmp_path / f"saved-{name}.h5ad", split=screen["split"])
        _same_prediction(ad.read_h5ad(tmp_path / f"saved-{name}.h5ad"), cli_preds[name])
        for loaded in (cls.load(saved), cls.load(tmp_path / f"cli-{name}"), celltwin.load_model(saved)):
            assert type(loaded) is cls and loaded.adata is None
            _same_prediction(loaded.predict(a, counts, context=target), cli_preds[name])
    with pytest.raises(ConfigError, match="holds a 'cell-mean' run"):
        celltwin.LinearModel.load(tmp_path / "saved-cell-mean")
    with pytest.raises(InputError, match="not empty"):
        models["linear"].save(tmp_path / "saved-cell-mean")
    models["linear"].save(tmp_path / "saved-cell-mean", overwrite=True)
    assert json.loads((tmp_path / "saved-cell-mean" / "run.json").read_text())["model"] == "linear"
    assert not (tmp_path / "saved-cell-mean" / "baseline.npz").samefile(models["linear"].run_dir / "baseline.npz")


def test_predict_options_layer_and_own_column_names(screen):
    a, target = screen["adata"], screen["target"]
    p0, p1 = sorted(screen["counts"])[:2]
    base = celltwin.CellMeanModel(a).train()
    ref = base.predict(a, [p0, p1], n_cells=7, context=target, seed=3)
    assert ref.n_obs == 14 + int(((a.obs[CONTEXT_COL] == target) & (a.obs[PERT_COL] == CONTROL_LABEL)).sum())
    # the same cells under other column names, counts in a layer and junk in X
    b = ad.AnnData(X=sp.csr_matrix(np.ones(a.shape, np.float32)), var=a.var.copy(),
                   obs=pd.DataFrame({"gene": a.obs[PERT_COL].astype(str).replace(CONTROL_LABEL, "ctrl"),
                                     "line": a.obs[CONTEXT_COL].astype(str)}, index=a.obs_names),
                   layers={"counts": a.X.copy()})
    snap = _snapshot(b)
    m = celltwin.CellMeanModel(b, pert_col="gene", control_pert="ctrl", context_col="line", layer="counts").train()
    got = m.predict(b, [p0, p1], n_cells=7, context=target, seed=3)
    np.testing.assert_array_equal(got.X.toarray(), ref.X.toarray())
    assert list(got.obs.columns) == ["gene", "line"] and got.obs["gene"].astype(str).iloc[-1] == "ctrl"
    _unchanged(b, snap)
    # controls of one context only: the context is found; a default of one control per cell
    only = a[(a.obs[CONTEXT_COL] == target).to_numpy()].copy()
    one = base.predict(only, p0, seed=3)
    n_ctrl = int((only.obs[PERT_COL] == CONTROL_LABEL).sum())
    assert one.n_obs == 2 * n_ctrl and one.uns["celltwin_predict"]["context"] == target
    # repeat_mean: every predicted cell of a perturbation is the same row
    rep = base.predict(a, {p0: 3}, context=target, repeat_mean=True).X.toarray()
    assert (rep[:3] == rep[0]).all()
    with pytest.raises(ConfigError, match="give context="):
        base.predict(a, [p0])
    # no context column: one context ("all"), found by predict
    flat = a[(a.obs[CONTEXT_COL] == target).to_numpy()]
    flat = ad.AnnData(X=flat.X, obs=flat.obs[[PERT_COL]].copy(), var=flat.var.copy())
    got = celltwin.CellMeanModel(flat).train().predict(flat, [p0], n_cells=3)
    assert got.uns["celltwin_predict"]["context"] == "all" and got.obs[CONTEXT_COL].astype(str).iloc[0] == "all"
    with pytest.raises(ConfigError, match="n_cells"):
        base.predict(a, {p0: 0}, context=target)
    with pytest.raises(InputError, match="layer 'nope'"):
        celltwin.CellMeanModel(a, layer="nope")
    with pytest.raises(InputError, match="'cell_line' not found"):
        celltwin.CellMeanModel(a, context_col="cell_line")
    with pytest.raises(ConfigError, match="embed_key"):
        celltwin.LinearModel(a, embed_key="X_pca")
    with pytest.raises(ConfigError, match="not trained"):
        celltwin.LinearModel(a).predict(a, [p0], context=target)


# ---------------------------------------------------------------------------- typed options and --set
def test_typed_options_reject_bad_values(screen):
    from celltwin import BaselineOptions, SEOptions, StateOptions

    m = celltwin.LinearModel(screen["train"])
    for bad, match in (({"linear_dim": "3"}, "linear_dim: expected int, got '3'"),
                       ({"linear_dim": 2.5}, "linear_dim: expected int"),
                       ({"min_cells": True}, "min_cells: expected int"),
                       ({"min_cells": 0}, "min_cells: expected >= 1"),
                       ({"linear_ridge": -1.0}, "linear_ridge: expected >= 0"),
                       ({"stepz": 3}, "unknown option 'stepz'; valid options: min_cells, linear_dim, linear_ridge")):
        with pytest.raises(ConfigError, match=match):
            m.train(**bad)
    with pytest.raises(ConfigError, match="not both"):
        m.train(BaselineOptions(), min_cells=2)
    assert BaselineOptions(linear_ridge=1).linear_ridge == 1.0 and isinstance(BaselineOptions(linear_ridge=1).linear_ridge,
                                                                              float)
    o = StateOptions.create(steps=5, resume=False, lr=1)
    assert (o.steps, o.resume, o.lr) == (5, False, 1.0)
    assert o.changes() == {"steps": 5, "resume": False, "lr": 1.0}
    for bad in ({"steps": "5"}, {"resume": 1}, {"preset": "huge"}, {"steps": 0}, {"precision": "fp8"},
                {"loss": "l1"}, {"context_dropout": 1.0}):
        with pytest.raises(ConfigError):
            StateOptions.create(bad)
    with pytest.raises(ConfigError, match="SE option preset"):
        SEOptions(preset="huge")


def test_set_parses_into_the_dataclasses(capsys):
    from celltwin import BaselineOptions, StateOptions, cli
    from celltwin.commands._common import parse_sets

    o = parse_sets(["steps=12", "lr=1e-3", "resume=no", "loss=energy:1,mse:0.5", "steps=13"], "state")
    assert isinstance(o, StateOptions) and (o.steps, o.lr, o.resume, o.loss) == (13, 1e-3, False, "energy:1,mse:0.5")
    assert parse_sets(None, "state-se").input_space == "embedding"  # the model's own default
    b = parse_sets(["min_cells=3", "linear_ridge=2"], "linear")
    assert isinstance(b, BaselineOptions) and (b.min_cells, b.linear_ridge) == (3, 2.0)
    assert parse_sets(["a=b"]) == {"a": "b"}
    with pytest.raises(ConfigError, match=r"--set \(model state\): .*unknown option 'stepz'; valid options: preset, "):
        parse_sets(["stepz=3"], "state")
    for items, match in ((["steps=many"], "steps: expected int, got 'many'"),
                         (["resume=maybe"], "resume: expected bool"), (["steps"], "KEY=VALUE")):
        with pytest.raises(ConfigError, match=match):
            parse_sets(items, "state")
    # the command: one line, exit 2, before any data is read
    assert cli.main(["train", "--model", "linear", "--split", "nowhere.toml", "-o", "/tmp/x", "--set",
                     "linear_dimm=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "unknown option 'linear_dimm'" in err and "linear_dim" in err
    # --help lists every option of every model with its default, from the dataclasses
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["train", "--help"])
    text = capsys.readouterr().out
    for cls in (BaselineOptions, StateOptions):
        for f in cls.__dataclass_fields__.values():
            default = (str(f.default).lower() if isinstance(f.default, bool)
                       else f.default if f.default != "" else '""')
            assert f"  {f.name}={default} " in text or f"  {f.name}={default}\n" in text, f.name
    assert "(state-se: input_space=embedding)" in text


# ---------------------------------------------------------------------------- State Embedding
def test_se_latent_representation_equals_embed_transform(screen, tmp_path):
    torch = pytest.importorskip("torch")
    from celltwin.losses import LOSSES
    from celltwin.models.presets import SET_LOSSES

    assert SET_LOSSES == LOSSES  # the options check loss names without importing torch
    torch.set_num_threads(1)
    a = screen["adata"]
    se = celltwin.SEModel(a).train(seed=1, log=None, **SE_FAST)
    se.save(tmp_path / "se_api")
    _cli("embed", "transform", tmp_path / "se_api", screen["data"], "-o", tmp_path / "emb.h5ad", "--no-progress")
    want = ad.read_h5ad(tmp_path / "emb.h5ad").obsm[EMBED_KEY]
    b = a.copy()
    got = se.get_latent_representation(b)
    np.testing.assert_array_equal(got, want)
    assert b.obsm[EMBED_KEY] is got and EMBED_KEY not in a.obsm
    np.testing.assert_array_equal(celltwin.SEModel.load(tmp_path / "se_api").get_latent_representation(b, key=None),
                                  want)
    with pytest.raises(ConfigError, match="SE option steps"):
        celltwin.SEModel(a).train(steps=0)


@pytest.mark.slow
def test_se_model_train_equals_embed_fit(screen, tmp_path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    celltwin.SEModel(screen["adata"]).train(seed=1, log=None, **SE_FAST).save(tmp_path / "se_api")
    _cli("embed", "fit", "--data", screen["data"], "-o", tmp_path / "se_cli", "--preset", "tiny", "--steps", 2,
         "--batch-size", 16, "--num-workers", 0, "--no-progress", "--seed", 1)
    api, cli = (celltwin.SEModel.load(tmp_path / d).module.state_dict() for d in ("se_api", "se_cli"))
    assert api.keys() == cli.keys()
    for k, v in api.items():
        torch.testing.assert_close(v, cli[k], rtol=0, atol=0)


# ---------------------------------------------------------------------------- State Transition
def test_st_model_equals_the_cli_and_round_trips(screen, tmp_path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    a, target, counts = screen["adata"], screen["target"], screen["counts"]
    sets = [f"--set={k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in ST_FAST.items()]
    _cli("train", "--model", "state", "--data", screen["data"], "--split", screen["split"], "-o", tmp_path / "cli",
         *sets)
    _cli("predict", tmp_path / "cli", "--data", screen["data"], "--split", screen["split"], "-o", tmp_path / "cli.h5ad")
    cli_pred = ad.read_h5ad(tmp_path / "cli.h5ad")
    m = celltwin.STModel(screen["train"]).train(**ST_FAST)
    _same_prediction(m.predict(a, counts, context=target), cli_pred)
    assert type(m.module).__name__ == "StateTransition"
    m.save(tmp_path / "saved")
    _cli("predict", tmp_path / "saved", "--data", screen["data"], "--split", screen["split"], "-o",
         tmp_path / "saved.h5ad")
    _same_prediction(ad.read_h5ad(tmp_path / "saved.h5ad"), cli_pred)
    _same_prediction(celltwin.STModel.load(tmp_path / "cli").predict(a, counts, context=target), cli_pred)
    meta = json.loads((tmp_path / "saved" / "run.json").read_text())
    assert meta["options"]["steps"] == 4 and meta["state"]["steps"] == 4
    with pytest.raises(ConfigError, match="state option steps: expected int"):
        m.train(steps="4")


@pytest.mark.slow
def test_st_model_on_an_obsm_matrix_equals_the_cli(screen, tmp_path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    a = screen["adata"].copy()
    a.obsm["X_pca"] = np.random.default_rng(0).normal(size=(a.n_obs, 8)).astype(np.float32)
    a.write_h5ad(tmp_path / "pca.h5ad")
    sets = [f"--set={k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in ST_FAST.items()]
    _cli("train", "--model", "state", "--data", tmp_path / "pca.h5ad", "--split", screen["split"], "--embed-key",
         "X_pca", "-o", tmp_path / "cli", *sets)
    _cli("predict", tmp_path / "cli", "--data", tmp_path / "pca.h5ad", "--split", screen["split"], "-o",
         tmp_path / "cli.h5ad")
    m = celltwin.STModel(a[screen["rows"]].copy(), embed_key="X_pca").train(**ST_FAST)
    _same_prediction(m.predict(a, screen["counts"], context=screen["target"]), ad.read_h5ad(tmp_path / "cli.h5ad"))
    assert m.genes == list(a.var_names)  # output space "all": decoded to every gene


@pytest.mark.slow
def test_st_on_se_embeddings_with_a_saved_se_model(screen, tmp_path):
    torch = pytest.importorskip("torch")
    torch.set_num_threads(1)
    a, target = screen["adata"], screen["target"]
    celltwin.SEModel(screen["train"]).train(log=None, **SE_FAST).save(tmp_path / "se")
    m = celltwin.STSEModel(screen["train"]).train(se_model=str(tmp_path / "se"), **ST_FAST)
    assert m.run_meta["model"] == "state-se" and m.module.config.input_space == "embedding"
    pred = m.predict(a, dict(list(screen["counts"].items())[:1]), context=target)
    assert pred.n_vars == a.n_vars and np.isfinite(pred.X.data).all()
    assert type(celltwin.load_model(m.save(tmp_path / "run"))) is celltwin.STSEModel
    with pytest.raises(ConfigError, match="input_space is 'embedding'"):
        celltwin.STSEModel(screen["train"]).train(input_space="expression", **ST_FAST)
