"""Training and prediction from disk: streamed baselines, many files, HVG / obsm inputs, DDP reads.

Every test runs the real file-level flows (``celltwin.pipeline``) on real ``.h5ad`` files.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.baselines import BASELINES, BaselineConfig, fit_baseline, load_baseline
from celltwin.baselines._effects import GroupSums, group_means
from celltwin.cli import main
from celltwin.data.dataset import CellDataset, DatasetFiles, expand_location
from celltwin.data.preprocess import Preprocessing
from celltwin.data.writer import CSRH5adWriter
from celltwin.errors import InputError
from celltwin.pipeline import train_from_files
from celltwin.predict import read_run
from celltwin.predict_files import predict_from_files
from celltwin.sim import simulate

FAST_ST = {"preset": "tiny", "steps": "6", "batch_sets": "2", "progress": "false", "tensorboard": "false",
           "threads": "1", "num_workers": "0", "precision": "fp32"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("stream")
    a = simulate("tiny")
    a.obs = a.obs[[PERT_COL, CONTEXT_COL, "batch"]].copy()
    a.uns = {}
    a.write_h5ad(d / "tiny.h5ad")
    return a, d


def _split(d: Path, data: str, body: str = "", name: str = "split.toml", dataset: str = "tiny") -> Path:
    p = d / name
    p.write_text(f'[datasets]\n{dataset} = "{data}"\n\n[training]\n{dataset} = "train"\n{body}')
    return p


FEWSHOT = '\n[fewshot."tiny.context_1"]\ntest = ["{a}", "{b}"]\n'


def _fewshot(a):
    perts = sorted(set(a.obs.loc[a.obs[CONTEXT_COL] == "context_1", PERT_COL]) - {CONTROL_LABEL})
    return FEWSHOT.format(a=perts[0], b=perts[1])


# ---------------------------------------------------------------------------- group sums
@pytest.mark.parametrize("kind", ["dense", "csr"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_group_sums_streamed_equal_the_in_memory_pass_bitwise(kind, dtype):
    rng = np.random.default_rng(0)
    X = (rng.random((301, 17)) * (rng.random((301, 17)) < 0.3) * 10).astype(dtype)
    codes = rng.integers(-1, 5, size=301)
    Xin = sp.csr_matrix(X) if kind == "csr" else X
    ref, ref_n = group_means(Xin, codes, 5)
    gs = GroupSums(5, 17)
    for start in range(0, 301, 37):  # uneven blocks
        gs.add(Xin[start:start + 37], codes[start:start + 37])
    means, n = gs.means()
    np.testing.assert_array_equal(n, ref_n)
    np.testing.assert_array_equal(means, ref)  # bitwise: same values added in the same order
    # hand-checked group 0
    np.testing.assert_allclose(means[0], X[codes == 0].astype(np.float64).mean(0), rtol=1e-12)


# ---------------------------------------------------------------------------- baselines
@pytest.mark.parametrize("storage", ["csr", "dense"])
def test_streamed_baselines_equal_the_in_memory_fit(tiny, tmp_path, storage):
    a, _d = tiny
    data = tmp_path / "x.h5ad"
    b = a.copy()
    if storage == "dense":
        b.X = b.X.toarray()
    b.write_h5ad(data)
    split = _split(tmp_path, str(data), _fewshot(a))
    import celltwin.baselines as bl

    old_chunk = bl.CHUNK
    bl.CHUNK = 97  # many uneven blocks
    try:
        for name in BASELINES:
            train_from_files(name, None, split, tmp_path / name)
    finally:
        bl.CHUNK = old_chunk
    meta, genes = read_run(tmp_path / "cell-mean")
    pre = Preprocessing.load(tmp_path / "cell-mean")
    train = np.ones(a.n_obs, bool)
    tp = {(c, p) for c, p in meta["test_pairs"]}
    obs = a.obs
    for i, (c, p) in enumerate(zip(obs[CONTEXT_COL].astype(str), obs[PERT_COL].astype(str), strict=True)):
        train[i] = (c, p) not in tp
    Xm = pre.transform(a.X[np.flatnonzero(train)], pre.gene_index(a.var_names))
    for name in BASELINES:
        ref, _ = fit_baseline(BaselineConfig(name), Xm, obs[PERT_COL].astype(str).to_numpy()[train],
                              obs[CONTEXT_COL].astype(str).to_numpy()[train], genes, CONTROL_LABEL)
        got = load_baseline(tmp_path / name, genes)
        np.testing.assert_array_equal(got.table.control_mean, ref.table.control_mean)
        np.testing.assert_array_equal(got.table.pair_effect, ref.table.pair_effect)
        assert got.table.pair_pert == ref.table.pair_pert
        for k in ref.params:
            np.testing.assert_array_equal(got.params[k], ref.params[k])
    assert meta["n_train_cells"] == int(train.sum()) == a.n_obs - 120


# ---------------------------------------------------------------------------- many files
def test_a_folder_of_files_equals_the_same_cells_in_one_file(tiny, tmp_path):
    a, _d = tiny
    folder = tmp_path / "parts"
    folder.mkdir()
    ctx = a.obs[CONTEXT_COL].astype(str).to_numpy()
    first = a[ctx == "context_0"].copy()
    second = a[ctx == "context_1"].copy()
    second = second[:, list(reversed(second.var_names))].copy()  # other gene order: aligned by name
    first.write_h5ad(folder / "a.h5ad")
    second.write_h5ad(folder / "b.h5ad")
    one = tmp_path / "one.h5ad"
    ad.concat([first, a[ctx == "context_1"]]).write_h5ad(one)
    body = _fewshot(a)
    s_one = _split(tmp_path, str(one), body, "one.toml")
    s_many = _split(tmp_path, str(folder), body, "many.toml")
    s_glob = _split(tmp_path, str(folder / "*.h5ad"), body, "glob.toml")
    for name in ("cell-mean", "linear"):
        train_from_files(name, None, s_one, tmp_path / f"one-{name}")
        train_from_files(name, None, s_many, tmp_path / f"many-{name}")
        train_from_files(name, None, s_glob, tmp_path / f"glob-{name}")
        g1 = read_run(tmp_path / f"one-{name}")[1]
        r1 = load_baseline(tmp_path / f"one-{name}", g1)
        for other in ("many", "glob"):
            g2 = read_run(tmp_path / f"{other}-{name}")[1]
            assert g2 == g1
            r2 = load_baseline(tmp_path / f"{other}-{name}", g2)
            np.testing.assert_array_equal(r2.table.pair_effect, r1.table.pair_effect)
            np.testing.assert_array_equal(r2.table.control_mean, r1.table.control_mean)
    # predictions from the split's own datasets match too (same draws, same cells)
    predict_from_files(tmp_path / "one-linear", None, tmp_path / "p1.h5ad", split=s_one, write_real=tmp_path / "r1.h5ad")
    predict_from_files(tmp_path / "many-linear", None, tmp_path / "p2.h5ad", split=s_many,
                       write_real=tmp_path / "r2.h5ad")
    p1, p2 = ad.read_h5ad(tmp_path / "p1.h5ad"), ad.read_h5ad(tmp_path / "p2.h5ad")
    np.testing.assert_array_equal(p1.X.toarray(), p2.X.toarray())
    np.testing.assert_array_equal(ad.read_h5ad(tmp_path / "r1.h5ad").X.toarray(),
                                  ad.read_h5ad(tmp_path / "r2.h5ad").X.toarray())


def test_two_datasets_in_one_split_share_vocabularies(tiny, tmp_path):
    a, _d = tiny
    ctx = a.obs[CONTEXT_COL].astype(str).to_numpy()
    a[ctx == "context_0"].copy().write_h5ad(tmp_path / "x.h5ad")
    a[ctx == "context_1"].copy().write_h5ad(tmp_path / "y.h5ad")
    perts = sorted(set(a.obs.loc[ctx == "context_1", PERT_COL]) - {CONTROL_LABEL})
    (tmp_path / "s.toml").write_text(
        '[datasets]\nx = "x.h5ad"\ny = "y.h5ad"\n\n[training]\nx = "train"\ny = "train"\n\n'
        f'[fewshot."y.context_1"]\ntest = ["{perts[0]}"]\n')
    meta = train_from_files("context-transfer", None, tmp_path / "s.toml", tmp_path / "run")
    assert meta["test_pairs"] == [["context_1", perts[0]]]
    model = load_baseline(tmp_path / "run", read_run(tmp_path / "run")[1])
    assert model.table.contexts == ["context_0", "context_1"]
    # the held-out perturbation is transferred from the other file's context
    assert model.describe(perts[0], "context_1") == "model"


def test_files_that_cannot_be_aligned_are_named(tiny, tmp_path):
    a, _d = tiny
    a[:, :150].copy().write_h5ad(tmp_path / "p.h5ad")
    b = a[:, 50:].copy()
    b.write_h5ad(tmp_path / "q.h5ad")
    ds = CellDataset.from_path(tmp_path)  # shared genes: 100
    assert ds.n_vars == 100 and list(ds.var_names) == list(a.var_names[50:150])
    with pytest.raises(InputError, match=r"q\.h5ad: 50 of the 150 genes are not in var_names"):
        CellDataset.from_files([DatasetFiles("d", (tmp_path / "p.h5ad", tmp_path / "q.h5ad"))],
                               genes=list(a.var_names[:150]))
    with pytest.raises(InputError, match="matches no file"):
        expand_location(tmp_path / "nothing*.h5ad")


def test_bad_training_values_are_refused_with_file_and_row(tiny, tmp_path):
    a, _d = tiny
    b = a.copy()
    X = b.X.toarray()
    X[7, 3] = np.nan
    b.X = sp.csr_matrix(X)
    b.write_h5ad(tmp_path / "nan.h5ad")
    split = _split(tmp_path, str(tmp_path / "nan.h5ad"), _fewshot(a))
    with pytest.raises(InputError, match=r"nan\.h5ad: X row 7 holds nan"):
        train_from_files("cell-mean", None, split, tmp_path / "r")
    X[7, 3] = -1
    b.X = sp.csr_matrix(X)
    b.write_h5ad(tmp_path / "neg.h5ad")
    split = _split(tmp_path, str(tmp_path / "neg.h5ad"), _fewshot(a), "s2.toml")
    assert main(["train", "--model", "state", "--split", str(split), "-o", str(tmp_path / "r2")]) == 2


# ---------------------------------------------------------------------------- VCC workflow
def test_hold_out_nothing_then_predict_a_counts_list(tiny, tmp_path):
    a, d = tiny
    split = _split(tmp_path, str(d / "tiny.h5ad"))  # no held-out perturbation: every cell trains
    meta = train_from_files("cell-mean", None, split, tmp_path / "run")
    assert meta["n_train_cells"] == a.n_obs and meta["test_pairs"] == []
    pd.DataFrame({PERT_COL: ["NEW1", "NEW2", CONTROL_LABEL], "n_cells": [3, 5, 100]}).to_csv(
        tmp_path / "counts.csv", index=False)
    rc = main(["predict", str(tmp_path / "run"), "--data", str(d / "tiny.h5ad"), "--counts",
               str(tmp_path / "counts.csv"), "--context", "context_0", "-o", str(tmp_path / "p.h5ad")])
    assert rc == 0
    p = ad.read_h5ad(tmp_path / "p.h5ad")
    n_ctrl = int(((a.obs[CONTEXT_COL] == "context_0") & (a.obs[PERT_COL] == CONTROL_LABEL)).sum())
    assert p.obs[PERT_COL].astype(str).tolist() == ["NEW1"] * 3 + ["NEW2"] * 5 + [CONTROL_LABEL] * n_ctrl
    # cell-mean: every predicted cell is a control cell + the mean training shift of context_0
    shift = load_baseline(tmp_path / "run", read_run(tmp_path / "run")[1]).shift("NEW1", "context_0")[0]
    pre = Preprocessing.load(tmp_path / "run")
    ctrl = pre.transform(a.X[np.flatnonzero(((a.obs[CONTEXT_COL] == "context_0")
                                            & (a.obs[PERT_COL] == CONTROL_LABEL)).to_numpy())],
                         pre.gene_index(a.var_names))
    X = p.X.toarray()
    expect = np.maximum(ctrl + shift.astype(np.float32), 0)
    assert all(any(np.array_equal(r, e) for e in expect) for r in X[:8])


def test_zeroshot_controls_in_train_option(tiny, tmp_path):
    a, d = tiny
    split = _split(tmp_path, str(d / "tiny.h5ad"), '\n[zeroshot]\n"tiny.context_1" = "test"\n')
    m0 = train_from_files("cell-mean", None, split, tmp_path / "r0")
    m1 = train_from_files("cell-mean", None, split, tmp_path / "r1", zeroshot_controls_in_train=True)
    n_ctrl1 = int(((a.obs[CONTEXT_COL] == "context_1") & (a.obs[PERT_COL] == CONTROL_LABEL)).sum())
    assert m1["n_train_cells"] - m0["n_train_cells"] == n_ctrl1 == 120
    t1 = load_baseline(tmp_path / "r1", read_run(tmp_path / "r1")[1]).table
    assert t1.contexts == ["context_0", "context_1"] and t1.control_count.tolist() == [120, 120]


# ---------------------------------------------------------------------------- STATE inputs / outputs
def test_state_hvg_in_all_genes_out_and_gene_out(tiny, tmp_path):
    a, d = tiny
    split = _split(tmp_path, str(d / "tiny.h5ad"), _fewshot(a))
    opts = [f"--set={k}={v}" for k, v in FAST_ST.items()]
    assert main(["train", "--model", "state", "--split", str(split), "--hvg", "40", "-o", str(tmp_path / "all"),
                 *opts]) == 0
    assert main(["train", "--model", "state", "--split", str(split), "--hvg", "40", "--output-space", "gene",
                 "-o", str(tmp_path / "gene"), *opts]) == 0
    hvg = (tmp_path / "all" / "input_genes.txt").read_text().split()
    assert len(hvg) == 40 and set(hvg) <= set(a.var_names)
    assert json.loads((tmp_path / "all" / "state" / "config.json").read_text())["output_space"] == "all"
    assert json.loads((tmp_path / "gene" / "state" / "config.json").read_text())["input_dim"] == 40
    assert read_run(tmp_path / "gene")[1] == hvg  # output genes = the HVGs
    for run, n_genes in (("all", a.n_vars), ("gene", 40)):
        assert main(["predict", str(tmp_path / run), "--split", str(split), "-o", str(tmp_path / f"{run}.h5ad"),
                     "--write-real", str(tmp_path / f"{run}-real.h5ad")]) == 0
        p = ad.read_h5ad(tmp_path / f"{run}.h5ad")
        r = ad.read_h5ad(tmp_path / f"{run}-real.h5ad")
        assert p.n_vars == r.n_vars == n_genes and list(p.var_names) == list(r.var_names)
        assert np.isfinite(p.X.data).all() and (p.X.data >= 0).all()


def test_state_on_an_obsm_matrix(tiny, tmp_path):
    a, _d = tiny
    b = a.copy()
    lg = np.log1p(b.X.toarray())
    b.obsm["X_pca"] = (lg - lg.mean(0)) @ np.random.default_rng(0).normal(size=(a.n_vars, 12)).astype(np.float32)
    b.write_h5ad(tmp_path / "pca.h5ad")
    split = _split(tmp_path, str(tmp_path / "pca.h5ad"), _fewshot(a))
    opts = [f"--set={k}={v}" for k, v in FAST_ST.items()]
    assert main(["train", "--model", "state", "--split", str(split), "--embed-key", "X_pca",
                 "-o", str(tmp_path / "all"), *opts]) == 0
    assert main(["train", "--model", "state", "--split", str(split), "--embed-key", "X_pca",
                 "--output-space", "embedding", "-o", str(tmp_path / "emb"), *opts]) == 0
    cfg = json.loads((tmp_path / "emb" / "state" / "config.json").read_text())
    assert cfg["input_dim"] == 12 and cfg["output_space"] == "embedding" and cfg["n_genes"] == 0
    for run, n in (("all", a.n_vars), ("emb", 12)):
        assert main(["predict", str(tmp_path / run), "--split", str(split), "-o", str(tmp_path / f"{run}.h5ad"),
                     "--write-real", str(tmp_path / f"{run}-real.h5ad")]) == 0
        p = ad.read_h5ad(tmp_path / f"{run}.h5ad")
        assert p.n_vars == n
    emb = ad.read_h5ad(tmp_path / "emb.h5ad")
    assert list(emb.var_names[:2]) == ["X_pca_0", "X_pca_1"]
    # control rows of an embedding prediction are the controls' own obsm rows
    ctrl = (b.obs[CONTEXT_COL] == "context_1").to_numpy() & (b.obs[PERT_COL] == CONTROL_LABEL).to_numpy()
    got = emb.X.toarray()[emb.obs[PERT_COL].astype(str).to_numpy() == CONTROL_LABEL]
    np.testing.assert_allclose(got, b.obsm["X_pca"][ctrl], rtol=1e-6)
    # baselines do not read obsm
    assert main(["train", "--model", "cell-mean", "--split", str(split), "--embed-key", "X_pca",
                 "-o", str(tmp_path / "bl")]) == 2


# ---------------------------------------------------------------------------- writer
def test_csr_writer_round_trip_and_abort(tmp_path):
    obs = pd.DataFrame({PERT_COL: ["a", "b", "c"]}, index=["x", "y", "z"])
    var = pd.DataFrame(index=["g1", "g2"])
    with CSRH5adWriter(tmp_path / "o.h5ad", obs, var, uns={"k": {"v": 1}}) as w:
        w.append(np.array([[0, 1.5], [2, 0]], np.float32))
        w.append(sp.csr_matrix(np.array([[0, 0]], np.float32)))
    back = ad.read_h5ad(tmp_path / "o.h5ad")
    np.testing.assert_array_equal(back.X.toarray(), [[0, 1.5], [2, 0], [0, 0]])
    assert back.uns["k"]["v"] == 1 and list(back.obs_names) == ["x", "y", "z"]
    with pytest.raises(RuntimeError), CSRH5adWriter(tmp_path / "p.h5ad", obs, var) as w:
        w.append(np.ones((1, 2)))
        raise RuntimeError("killed")
    assert not (tmp_path / "p.h5ad").exists() and not list(tmp_path.glob(".p.h5ad*"))
    with pytest.raises(InputError, match="2 rows appended, obs has 3"), CSRH5adWriter(tmp_path / "q.h5ad", obs,
                                                                                       var) as w:
        w.append(np.ones((2, 2)))
    assert not (tmp_path / "q.h5ad").exists()


# ---------------------------------------------------------------------------- DDP reads
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_each_ddp_rank_reads_only_the_rows_of_its_own_sets(tiny, tmp_path):
    """Two gloo processes train ST; every row a rank reads belongs to one of its own sets."""
    from celltwin.data.columns import ObsColumns
    from celltwin.data.matching import CellLabels
    from celltwin.data.sampler import CellSetSampler, SetSamplerConfig
    from celltwin.pipeline import open_training_data, resolve_dataset_split

    a, d = tiny
    split = _split(tmp_path, str(d / "tiny.h5ad"), _fewshot(a))
    log = tmp_path / "reads"
    env = {**os.environ, "CELLTWIN_READ_LOG": str(log), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), "-m", "celltwin", "train", "--model", "state", "--split", str(split),
           "-o", str(tmp_path / "run"), *[f"--set={k}={v}" for k, v in {**FAST_ST, "num_workers": "1"}.items()]]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    ds, sp_ = open_training_data(split)
    rows = resolve_dataset_split(ds, sp_).train_rows
    obs = ds.obs.iloc[rows]
    labels = CellLabels.from_obs(obs.reset_index(drop=True), ObsColumns(), where="t")
    labels = CellLabels(rows, labels.pert, labels.context, labels.batch, CONTROL_LABEL)
    read = {}
    for f in log.iterdir():
        rank = int(f.name.split("-")[0].removeprefix("rank"))
        vals = [int(x) for line in f.read_text().splitlines() for x in line.split()]
        read.setdefault(rank, set()).update(vals)
    assert sorted(read) == [0, 1]
    for rank in (0, 1):
        sampler = CellSetSampler(labels, SetSamplerConfig(set_size=16, seed=0, match="random", control_sets=True),
                                 rank=rank, world_size=2)
        mine = set()
        for epoch in range(3):
            for s in sampler.rank_sets(epoch):
                mine |= set(s.pert_rows.tolist()) | set(s.ctrl_rows.tolist())
        assert read[rank] <= mine
        # at least the sets of the 6 steps x 2 sets this rank trained on were read
        first = set()
        for s in sampler.rank_sets(0)[:12]:
            first |= set(s.pert_rows.tolist()) | set(s.ctrl_rows.tolist())
        assert first <= read[rank]
    # the two ranks' perturbed reads differ (each reads its own share, not the whole data)
    assert read[0] != read[1] and len(read[0] | read[1]) < a.n_obs


# ---------------------------------------------------------------------------- faults
def _train_cmd(split: Path, out: Path, model: str, extra: dict) -> list[str]:
    opts = {**FAST_ST, "steps": "24", "ckpt_every": "4", "num_workers": "1", **extra}
    return [sys.executable, "-m", "celltwin", "train", "--model", model, "--split", str(split), "-o", str(out),
            *[f"--set={k}={v}" for k, v in opts.items()]]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["state", "state-se"])
def test_killed_state_run_resumes_bitwise(tiny, tmp_path, model, kill_after_checkpoint):
    """SIGKILL a real `celltwin train` (disk reads, one DataLoader worker) after a checkpoint, rerun:
    the final weights equal an uninterrupted run's bit for bit."""
    a, d = tiny
    split = _split(tmp_path, str(d / "tiny.h5ad"), _fewshot(a))
    extra = {"se_steps": "8", "se_batch": "16"} if model == "state-se" else {}
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = subprocess.run(_train_cmd(split, tmp_path / "full", model, extra), env=env, capture_output=True,
                          text=True, timeout=300)
    assert full.returncode == 0, full.stderr[-2000:]
    killed = tmp_path / "killed"
    ckpt = killed / "train" / "checkpoints" / "last.json"
    proc = subprocess.Popen(_train_cmd(split, killed, model, extra), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    step = kill_after_checkpoint(proc, ckpt, 8, timeout=240)
    assert 8 <= step < 24 and not (killed / "state" / "model.safetensors").exists()
    again = subprocess.run(_train_cmd(split, killed, model, extra), env=env, capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0, again.stderr[-2000:]
    meta = json.loads((killed / "run.json").read_text())
    assert meta["state"]["resumed_from"] == step
    from safetensors.numpy import load_file

    w_full = load_file(str(tmp_path / "full" / "state" / "model.safetensors"))
    w_res = load_file(str(killed / "state" / "model.safetensors"))
    assert w_full.keys() == w_res.keys()
    for k in w_full:
        np.testing.assert_array_equal(w_res[k], w_full[k], err_msg=k)


def test_predict_under_a_file_size_limit_is_one_line_and_leaves_nothing(tiny, tmp_path, capsys):
    import resource
    import signal

    a, d = tiny
    split = _split(tmp_path, str(d / "tiny.h5ad"), _fewshot(a))
    train_from_files("cell-mean", None, split, tmp_path / "run")
    data_before = (d / "tiny.h5ad").read_bytes()

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))

    r = subprocess.run([sys.executable, "-m", "celltwin", "predict", str(tmp_path / "run"), "--split", str(split),
                        "-o", str(tmp_path / "pred.h5ad")], preexec_fn=limit, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "file size limit" in lines[0] and "Traceback" not in r.stderr
    assert not (tmp_path / "pred.h5ad").exists() and not list(tmp_path.glob(".pred.h5ad*"))
    assert (d / "tiny.h5ad").read_bytes() == data_before
    # predict onto its own input is refused before anything is written (in-process: no limit needed)
    capsys.readouterr()
    rc = main(["predict", str(tmp_path / "run"), "--split", str(split), "-o", str(d / "tiny.h5ad")])
    assert rc == 2 and "destroy the input" in capsys.readouterr().err
    assert (d / "tiny.h5ad").read_bytes() == data_before


def test_rerun_on_other_data_is_refused_not_silently_kept(tiny, tmp_path, capsys):
    """A finished ST run re-run on a different file (same genes and perturbations) must not keep the
    old weights under the new data's name: resume compares the data fingerprint and refuses."""
    a, _d = tiny
    data = tmp_path / "x.h5ad"
    a.write_h5ad(data)
    split = _split(tmp_path, str(data), _fewshot(a))
    argv = ["train", "--model", "state", "--split", str(split), "-o", str(tmp_path / "run"),
            *[f"--set={k}={v}" for k, v in FAST_ST.items()]]
    assert main(argv) == 0
    before = (tmp_path / "run" / "run.json").read_bytes()
    b = a.copy()
    b.X = b.X.copy()
    b.X.data[:10] += 1  # other counts, same shape, genes and labels
    b.write_h5ad(data)
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "belongs to a different run" in err and "data.files" in err
    assert (tmp_path / "run" / "run.json").read_bytes() == before  # nothing rewritten
    assert main([*argv, "--set=resume=false"]) == 0  # starting fresh is one option away


# ---------------------------------------------------------------------------- fast reads
@pytest.mark.parametrize("layout", ["chunked", "contiguous", "gzip"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.int32])
def test_direct_reads_and_fused_normalisation_are_bitwise_the_h5py_path(tmp_path, layout, dtype):
    """Direct (pread) CSR slices equal h5py's; the fused dense model-space read equals
    ``Preprocessing.transform`` bit for bit (duplicates, unsorted rows, gene subsets, empty rows)."""
    import h5py

    from celltwin.data._h5rows import DirectArray
    from celltwin.data.source import H5adSource

    rng = np.random.default_rng(1)
    X = rng.poisson(rng.gamma(0.3, 3.0, size=(300, 57))).astype(dtype)
    X[5] = 0  # a zero-total cell stays all zero
    a = ad.AnnData(X=sp.csr_matrix(X), obs=pd.DataFrame({PERT_COL: [CONTROL_LABEL] * 300},
                                                        index=[f"c{i}" for i in range(300)]),
                   var=pd.DataFrame(index=[f"g{j}" for j in range(57)]))
    path = tmp_path / "x.h5ad"
    a.write_h5ad(path)
    if layout != "chunked":  # rewrite X's data / indices with another storage layout
        with h5py.File(path, "r+") as f:
            for k in ("data", "indices"):
                v = f["X"][k][:]
                del f["X"][k]
                kw = {"compression": "gzip"} if layout == "gzip" else {}
                f["X"].create_dataset(k, data=v, **kw)
    src = H5adSource(path)
    r = src._reader(None)
    assert isinstance(r[1], DirectArray) == (layout != "gzip")
    with h5py.File(path, "r") as f:
        for s_, e_ in ((0, 0), (3, 90), (17, 18), (0, int(f["X/indptr"][-1]))):
            np.testing.assert_array_equal(r[1][s_:e_], f["X/data"][s_:e_])
            np.testing.assert_array_equal(r[2][s_:e_], f["X/indices"][s_:e_])
    ds = CellDataset([src], ["x"])
    full = Preprocessing(genes=[f"g{j}" for j in range(57)], target_sum=1234.5)
    sub = Preprocessing(genes=[f"g{j}" for j in (40, 3, 7, 56)], target_sum=1000.0)
    passthrough = Preprocessing(genes=[f"g{j}" for j in range(0, 57, 2)], target_sum=None, log1p=False)
    rows = np.array([7, 5, 299, 7, 0, 150, 149, 5])
    for pre in (full, sub, passthrough):
        got = ds.read_model(rows, pre)
        ref = pre.transform(src.read_rows(rows), pre.gene_index(src.var_names))
        assert got.dtype == np.float32 and got.shape == (rows.size, len(pre.genes))
        np.testing.assert_array_equal(got, ref)
    assert not ds.read_model(np.array([5]), full).any()
    # hand-checked value: log1p(x / total * T) in float32
    i, j = 7, int(np.flatnonzero(X[7])[0])
    expect = np.log1p(np.float32(np.float64(X[i, j]) * (1234.5 / X[i].astype(np.float64).sum())))
    assert ds.read_model(np.array([i]), full)[0, j] == expect
