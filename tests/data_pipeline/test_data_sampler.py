"""Control matching, the cell-set sampler (determinism, ranks, composition) and the torch Dataset."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from celltwin.data import (
    CellLabels,
    CellSetSampler,
    ControlMatcher,
    H5adSource,
    ObsColumns,
    SetSamplerConfig,
    Vocab,
    Vocabularies,
    fit_preprocessing,
    match_controls,
    normalize_log1p,
)
from celltwin.errors import ConfigError, InputError

COLS = ObsColumns(context_col="cell_type", batch_col="batch")


def _labels(a, rows=None):
    return CellLabels.from_obs(a.obs, COLS, rows, where="tiny.h5ad")


def test_random_matching_same_context_and_deterministic(tiny):
    obs = tiny.obs
    m1 = match_controls(obs, COLS, "random", seed=3)
    m2 = match_controls(obs, COLS, "random", seed=3)
    np.testing.assert_array_equal(m1, m2)
    assert not np.array_equal(m1, match_controls(obs, COLS, "random", seed=4))
    assert (obs["target_gene"].to_numpy()[m1] == "non-targeting").all()
    np.testing.assert_array_equal(obs["cell_type"].to_numpy()[m1], obs["cell_type"].to_numpy())
    # both batches of c1 are drawn from (random ignores batch)
    c1 = (obs["cell_type"] == "c1").to_numpy()
    assert set(obs["batch"].to_numpy()[m1[c1]]) == {"b1", "b2"}


def test_batch_matching_and_fallback_warning(tiny):
    obs = tiny.obs
    with pytest.warns(UserWarning, match=r"no control cells in batch 'b2' of context 'c2'"):
        m = match_controls(obs, COLS, "batch", seed=0)
    ctx, bat = obs["cell_type"].to_numpy(), obs["batch"].to_numpy()
    np.testing.assert_array_equal(ctx[m], ctx)
    fallback = (ctx == "c2") & (bat == "b2")
    np.testing.assert_array_equal(bat[m][~fallback], bat[~fallback])  # same batch wherever possible
    assert (bat[m][fallback] == "b1").all()  # c2's only controls are in b1


def test_matcher_errors(tiny):
    obs = tiny.obs
    no_ctrl = (obs["cell_type"] == "c1").to_numpy() & (obs["target_gene"] == "non-targeting").to_numpy()
    with pytest.raises(InputError, match=r"context\(s\) without control cells.*'c1' \(96 perturbed cells\)"):
        ControlMatcher(_labels(tiny, np.flatnonzero(~no_ctrl)))
    with pytest.raises(ConfigError, match="strategy"):
        ControlMatcher(_labels(tiny), "nearest")
    with pytest.raises(
        InputError, match=r"obs column\(s\) 'donor' not found; available columns: target_gene"
    ):
        CellLabels.from_obs(obs, ObsColumns(context_col="donor"), where="tiny.h5ad")


def _plan_key(plan):
    return [(s.context, s.perturbation, tuple(s.pert_rows), tuple(s.ctrl_rows)) for s in plan]


@pytest.mark.parametrize("match", ["random", "batch"])
def test_sampler_composition(tiny, match):
    obs = tiny.obs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        s = CellSetSampler(_labels(tiny), SetSamplerConfig(set_size=5, seed=1, match=match))
    pert, ctx, bat = (obs[c].to_numpy() for c in ("target_gene", "cell_type", "batch"))
    plan = s.epoch_plan(0)
    # 2 contexts x 24 cells per (context, perturbation) -> ceil(24 / 5) = 5 sets each; 7 groups
    assert len(plan) == 7 * 5 == len(s)
    seen = set()
    for cs in plan:
        assert cs.pert_rows.shape == cs.ctrl_rows.shape == (5,)
        assert (pert[cs.pert_rows] == cs.perturbation).all() and (ctx[cs.pert_rows] == cs.context).all()
        assert (pert[cs.ctrl_rows] == "non-targeting").all() and (ctx[cs.ctrl_rows] == cs.context).all()
        if match == "batch":
            ok = (bat[cs.ctrl_rows] == bat[cs.pert_rows]) | (
                (cs.context == "c2") & (bat[cs.pert_rows] == "b2")
            )
            assert ok.all()
        seen.update(cs.pert_rows.tolist())
    assert seen == set(
        np.flatnonzero(pert != "non-targeting")
    )  # every perturbed cell once per epoch at least


def test_sampler_deterministic_and_epochs_differ(tiny):
    cfg = SetSamplerConfig(set_size=8, seed=7)
    a = CellSetSampler(_labels(tiny), cfg)
    b = CellSetSampler(_labels(tiny), cfg)
    assert _plan_key(a.epoch_plan(2)) == _plan_key(b.epoch_plan(2))
    assert _plan_key(a.epoch_plan(0)) != _plan_key(a.epoch_plan(1))
    b.set_epoch(2)
    assert _plan_key(list(b)) == _plan_key(a.epoch_plan(2))
    c = CellSetSampler(_labels(tiny), SetSamplerConfig(set_size=8, seed=8))
    assert _plan_key(c.epoch_plan(2)) != _plan_key(a.epoch_plan(2))


@pytest.mark.parametrize("world_size", [2, 3, 4])
def test_ranks_disjoint_and_cover_epoch(tiny, world_size):
    cfg = SetSamplerConfig(set_size=8, seed=0)
    full = CellSetSampler(_labels(tiny), cfg, rank=0, world_size=world_size).epoch_plan(5)
    n_real = CellSetSampler(_labels(tiny), cfg).n_sets_total  # 7 groups x ceil(24 / 8) = 21
    assert n_real == 21
    parts = []
    for r in range(world_size):
        s = CellSetSampler(_labels(tiny), cfg, rank=r, world_size=world_size)
        s.set_epoch(5)
        parts.append(list(s))
        assert len(parts[-1]) == len(s) == -(-21 // world_size)  # equal length on every rank
    ids = [id(x) for p in parts for x in p]
    keys = [k for p in parts for k in _plan_key(p)]
    assert len(keys) == len(full) and sorted(keys) == sorted(_plan_key(full))  # union is the epoch
    assert len(set(ids)) == len(ids)  # no set handed to two ranks
    # the un-padded part of the plan is the same as the single-process plan's sets (as a multiset)
    single = CellSetSampler(_labels(tiny), cfg).epoch_plan(5)
    assert sorted(_plan_key(single)) == sorted(_plan_key(full[:21]))


def test_small_groups_with_replacement_and_policies(tiny):
    obs = tiny.obs
    keep = np.flatnonzero(
        ~((obs["target_gene"] == "C").to_numpy() & (obs.index.str[4:].astype(int) % 24 > 2))
    )
    lab = _labels(tiny, keep)  # C now has 3 cells in c1 (one batch-b1 trio)
    n_c = int((lab.pert == "C").sum())
    assert n_c == 3
    s = CellSetSampler(lab, SetSamplerConfig(set_size=10, seed=0))
    sets_c = [cs for cs in s.epoch_plan(0) if cs.perturbation == "C"]
    assert len(sets_c) == 1 and sets_c[0].pert_rows.size == 10
    assert set(sets_c[0].pert_rows) == set(lab.rows[lab.pert == "C"])  # all 3 cells, repeated
    with pytest.raises(InputError, match=r"'C' in 'c1' \(3 cells\).*small_groups='error'"):
        CellSetSampler(lab, SetSamplerConfig(set_size=10, min_cells=4, small_groups="error"))
    with pytest.warns(UserWarning, match=r"dropping .*'C' in 'c1' \(3 cells\)"):
        s2 = CellSetSampler(lab, SetSamplerConfig(set_size=10, min_cells=4))
    assert all(cs.perturbation != "C" for cs in s2.epoch_plan(0))
    with pytest.raises(ConfigError):
        SetSamplerConfig(set_size=0)
    with pytest.raises(ConfigError):
        CellSetSampler(lab, rank=2, world_size=2)


def test_control_sets_option(tiny):
    s = CellSetSampler(_labels(tiny), SetSamplerConfig(set_size=8, control_sets=True))
    ctrl_sets = [cs for cs in s.epoch_plan(0) if cs.perturbation == "non-targeting"]
    assert {cs.context for cs in ctrl_sets} == {"c1", "c2"}
    pert = tiny.obs["target_gene"].to_numpy()
    assert all((pert[cs.pert_rows] == "non-targeting").all() for cs in ctrl_sets)


def test_vocab_roundtrip(tmp_path, tiny):
    v = Vocabularies.from_labels(_labels(tiny), ["A", "g3"])
    assert v.perturbations.names == ["non-targeting", "A", "A+B", "B", "C"]
    assert v.perturbations["non-targeting"] == 0 and v.contexts.names == ["c1", "c2"]
    p = v.save(tmp_path)
    assert p.name == "vocab.json"
    assert Vocabularies.load(tmp_path) == v
    with pytest.raises(InputError, match="perturbation 'Z' is not in the run's perturbation vocabulary"):
        v.perturbations["Z"]
    assert Vocab(["<unk>", "x"], unknown="<unk>")["y"] == 0
    np.testing.assert_array_equal(v.batches.encode(["b2", "b1"]), [1, 0])


# ---------------------------------------------------------------- torch Dataset
def _dataset(tmp_path, tiny, rank=0, world_size=1, **kw):
    from celltwin.data.torch_sets import CellSetDataset

    path = tmp_path / "tiny.h5ad"
    if not path.exists():
        tiny.write_h5ad(path)
    src = H5adSource(path)
    pre = fit_preprocessing(src, n_top_genes=12)
    vocabs = Vocabularies.from_labels(_labels(tiny), pre.genes)
    s = CellSetSampler(_labels(tiny), SetSamplerConfig(set_size=6, seed=2, match="random"), rank, world_size)
    return CellSetDataset(src, s, vocabs, pre, **kw), pre, vocabs


def test_torch_dataset_item(tmp_path, tiny):
    import torch

    ds, pre, vocabs = _dataset(tmp_path, tiny)
    ds.set_epoch(1)
    item = ds[0]
    cs = ds.sampler.rank_sets(1)[0]
    assert item["ctrl"].shape == item["pert"].shape == (6, 12)
    assert item["ctrl"].dtype == item["pert"].dtype == torch.float32
    assert item["pert_idx"].dtype == torch.long and item["pert_idx"].shape == ()
    assert vocabs.perturbations.names[int(item["pert_idx"])] == item["perturbation"] == cs.perturbation
    assert vocabs.contexts.names[int(item["context_idx"])] == item["context"] == cs.context
    assert item["batch_idx"].shape == (6,)
    bat = tiny.obs["batch"].to_numpy()
    assert vocabs.batches.decode(item["batch_idx"].tolist()) == list(bat[cs.pert_rows])
    gidx = pre.gene_index(tiny.var_names)
    expect = normalize_log1p(tiny.X[cs.pert_rows], pre.target_sum).toarray()[:, gidx]
    np.testing.assert_allclose(item["pert"].numpy(), expect, rtol=1e-6)
    expect_c = normalize_log1p(tiny.X[cs.ctrl_rows], pre.target_sum).toarray()[:, gidx]
    np.testing.assert_allclose(item["ctrl"].numpy(), expect_c, rtol=1e-6)
    np.testing.assert_array_equal(item["pert_rows"].numpy(), cs.pert_rows)


def test_torch_dataset_obsm_ctrl(tmp_path, tiny):
    ds, _, _ = _dataset(tmp_path, tiny, ctrl_obsm_key="X_state", pert_obsm_key="X_state")
    item = ds[3]
    cs = ds.sampler.rank_sets()[3]
    assert item["ctrl"].shape == (6, 4) and item["pert"].shape == (6, 12)
    np.testing.assert_allclose(item["ctrl"].numpy(), tiny.obsm["X_state"][cs.ctrl_rows])
    np.testing.assert_allclose(item["pert_emb"].numpy(), tiny.obsm["X_state"][cs.pert_rows])


def test_dataloader_two_workers_same_as_zero(tmp_path, tiny):
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    out = {}
    for nw in (0, 2):
        ds, _, _ = _dataset(tmp_path, tiny, rank=1, world_size=2)
        ds.set_epoch(3)
        batches = list(DataLoader(ds, batch_size=4, num_workers=nw, shuffle=False))
        out[nw] = batches
    assert len(out[0]) == len(out[2]) == -(-len(ds) // 4)
    for b0, b2 in zip(out[0], out[2], strict=True):
        assert b0["pert"].shape[1:] == (6, 12)
        torch.testing.assert_close(b0["pert"], b2["pert"])
        torch.testing.assert_close(b0["ctrl"], b2["ctrl"])
        torch.testing.assert_close(b0["pert_idx"], b2["pert_idx"])
        assert b0["perturbation"] == b2["perturbation"]


def test_persistent_workers_follow_set_epoch(tmp_path, tiny):
    import torch
    from torch.utils.data import DataLoader

    ds, _, _ = _dataset(tmp_path, tiny)
    loader = DataLoader(ds, batch_size=5, num_workers=2, persistent_workers=True, sampler=ds.epoch_indices())
    for epoch in (0, 1):
        ds.set_epoch(epoch)
        got = torch.cat([b["pert_rows"] for b in loader])
        expect = np.stack([cs.pert_rows for cs in ds.sampler.rank_sets(epoch)])
        np.testing.assert_array_equal(got.numpy(), expect)
    assert not np.array_equal(np.stack([cs.pert_rows for cs in ds.sampler.rank_sets(0)]), expect)
