"""Tests of the synthetic Perturb-seq simulator (celltwin.sim) and `celltwin sim`."""

from __future__ import annotations

import hashlib
import json

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from celltwin import cli
from celltwin._constants import BATCH_COL, CONTEXT_COL, CONTROL_LABEL, GUIDE_COL, PERT_COL, SIM_UNS_KEY
from celltwin.errors import ConfigError
from celltwin.sim import PRESETS, SimConfig, simulate, simulate_eval_pair, write_simulated


@pytest.fixture(scope="module")
def tiny() -> ad.AnnData:
    return simulate("tiny")


def _normlog(X: sp.csr_matrix) -> np.ndarray:
    x = X.toarray().astype(np.float64)
    tot = x.sum(1, keepdims=True)
    return np.log1p(x / tot * np.median(tot))


def test_layout_and_truth_schema(tiny):
    cfg = PRESETS["tiny"]
    assert tiny.shape == (cfg.n_cells, cfg.n_genes) == (960, 200)
    assert sp.issparse(tiny.X) and tiny.X.format == "csr" and tiny.X.dtype == np.float32
    assert np.array_equal(tiny.X.data, np.round(tiny.X.data)) and tiny.X.data.min() >= 1
    for col in (PERT_COL, GUIDE_COL, BATCH_COL, CONTEXT_COL):
        assert isinstance(tiny.obs[col].dtype, type(tiny.obs[PERT_COL].dtype))  # all categorical
    assert str(tiny.obs[PERT_COL].dtype) == "category"
    assert (tiny.obs[PERT_COL] == CONTROL_LABEL).sum() == cfg.n_controls * cfg.n_contexts
    assert list(tiny.var_names[:2]) == ["G00001", "G00002"] and tiny.var_names.is_unique
    assert tiny.var["gene_id"].iloc[0] == "SIMG00000000001"
    t = tiny.uns[SIM_UNS_KEY]
    assert t["effect"].shape == (2, 6, 200) and t["effect"].dtype == np.float32
    assert list(t["effect_class"]).count("strong") == 2 and list(t["effect_class"]).count("null") == 2
    # perturbation names are the target genes' symbols, and the targets are measured genes
    names = list(t["perturbations"])
    assert [tiny.var_names[i] for i in t["target_index"][:, 0]] == names
    assert set(tiny.obs[PERT_COL].unique()) == set(names) | {CONTROL_LABEL}
    assert (tiny.obs.groupby(PERT_COL, observed=True).size().drop(CONTROL_LABEL) == 60 * 2).all()
    assert SimConfig.from_json(t["config_json"]) == cfg
    # guides belong to their perturbation
    assert all(g.startswith(p + "_g") for p, g in zip(tiny.obs[PERT_COL], tiny.obs[GUIDE_COL], strict=True))


def test_deterministic_and_seed_dependent(tiny, tmp_path):
    again = simulate("tiny")
    assert (again.X != tiny.X).nnz == 0
    other = simulate(PRESETS["tiny"].replace(seed=1))
    assert (other.X != tiny.X).nnz > 0
    a, b = tmp_path / "a.h5ad", tmp_path / "b.h5ad"
    write_simulated("tiny", a)
    write_simulated("tiny", b)
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()


def test_streaming_writer_equals_in_memory(tiny, tmp_path):
    # block_size 100 makes the writer append 10 blocks of CSR (last one partial)
    cfg = PRESETS["tiny"].replace(block_size=100, n_combos=1)
    mem = simulate(cfg)
    path = tmp_path / "s.h5ad"
    seen = []
    write_simulated(cfg, path, progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (960 + 120, 960 + 120) and len(seen) == 11
    disk = ad.read_h5ad(path)
    assert disk.X.format == "csr" and disk.X.dtype == np.float32
    assert np.array_equal(disk.X.indptr, mem.X.indptr) and np.array_equal(disk.X.indices, mem.X.indices)
    assert np.array_equal(disk.X.data, mem.X.data)
    assert disk.obs.equals(mem.obs) and disk.var.equals(mem.var)
    assert list(disk.obs_names) == list(mem.obs_names)
    np.testing.assert_array_equal(disk.uns[SIM_UNS_KEY]["effect"], mem.uns[SIM_UNS_KEY]["effect"])
    assert list(disk.uns[SIM_UNS_KEY]["perturbations"]) == list(mem.uns[SIM_UNS_KEY]["perturbations"])
    # the block layout changes the random stream (documented), not the cell table
    assert (mem.X != simulate(PRESETS["tiny"].replace(n_combos=1)).X).nnz > 0


def test_library_sizes_and_sparsity():
    cfg = PRESETS["demo"].replace(n_perts=6, cells_per_pert=40, n_controls=100, n_contexts=2)
    a = simulate(cfg)
    tot = np.asarray(a.X.sum(1)).ravel()
    assert 0.8 * cfg.library_min <= tot.min() and tot.max() <= 1.2 * cfg.library_max
    assert abs(np.median(tot) / cfg.library_median - 1) < 0.1
    zeros = 1 - a.X.nnz / np.prod(a.shape)
    assert 0.4 < zeros < 0.8  # 1,500 genes at ~4,000 UMI: realistic sparsity


def test_knockdown_and_effect_classes(tiny):
    t = tiny.uns[SIM_UNS_KEY]
    x = _normlog(tiny.X)
    pert = tiny.obs[PERT_COL].to_numpy()
    ctx = tiny.obs[CONTEXT_COL].to_numpy()
    eff = t["effect"]
    obs_strength = {"strong": [], "null": [], "subtle": []}
    true_strength = {"strong": [], "null": [], "subtle": []}
    for c, cname in enumerate(t["contexts"]):
        ctrl = x[(pert == CONTROL_LABEL) & (ctx == cname)].mean(0)
        for p, name in enumerate(t["perturbations"]):
            tgt = t["target_index"][p, 0]
            raw = tiny.X[np.flatnonzero((pert == name) & (ctx == cname))].toarray()
            raw_c = tiny.X[np.flatnonzero((pert == CONTROL_LABEL) & (ctx == cname))].toarray()
            # CRISPRi knockdown of the target: the expected count drops to ~15 % of control
            assert eff[c, p, tgt] < np.log(0.5)
            assert raw[:, tgt].mean() < 0.6 * raw_c[:, tgt].mean()
            delta = x[(pert == name) & (ctx == cname)].mean(0) - ctrl
            others = np.arange(x.shape[1]) != tgt
            cls = t["effect_class"][p]
            obs_strength[cls].append(np.abs(delta[others]).sum())
            true_strength[cls].append(np.abs(eff[c, p, others]).sum())
            if cls == "null":
                assert np.all(eff[c, p, others] == 0)
            if cls == "strong":  # observed per-gene changes track the truth
                assert np.corrcoef(delta[others], eff[c, p, others])[0, 1] > 0.8
    assert min(true_strength["strong"]) > max(true_strength["subtle"]) > 0
    # observed |delta| includes a sampling-noise floor (~15 here), which null perturbations show alone
    assert min(obs_strength["strong"]) > 1.3 * max(obs_strength["null"])
    assert np.mean(obs_strength["strong"]) > 2.5 * np.mean(obs_strength["null"])
    assert min(true_strength["subtle"]) > 0 and max(true_strength["null"]) == 0


def test_truth_is_log_fold_of_expected_counts():
    # many cells, one context: log(mean count pert / mean count control) ~ effect for expressed genes
    cfg = SimConfig(
        n_genes=100,
        n_contexts=1,
        n_perts=2,
        frac_strong=1.0,
        frac_subtle=0.0,
        cells_per_pert=3000,
        n_controls=3000,
        library_median=20000.0,
        seed=5,
    )
    a = simulate(cfg)
    t = a.uns[SIM_UNS_KEY]
    pert = a.obs[PERT_COL].to_numpy()
    ctrl = np.asarray(a.X[np.flatnonzero(pert == CONTROL_LABEL)].mean(0)).ravel()
    for p, name in enumerate(t["perturbations"]):
        m = np.asarray(a.X[np.flatnonzero(pert == name)].mean(0)).ravel()
        ok = ctrl > 20
        lfc = np.log(m[ok] / ctrl[ok])
        err = lfc - t["effect"][0, p, ok]
        assert np.median(np.abs(err)) < 0.05 and np.abs(err).max() < 0.3
        # after per-cell library normalisation the composition's log-fold is effect_normalized
        frac = sp.diags(1.0 / np.asarray(a.X.sum(1)).ravel()) @ a.X
        fc = np.asarray(frac[np.flatnonzero(pert == CONTROL_LABEL)].mean(0)).ravel()
        fp = np.asarray(frac[np.flatnonzero(pert == name)].mean(0)).ravel()
        err_n = np.log(fp[ok] / fc[ok]) - t["effect_normalized"][0, p, ok]
        offset = np.median(t["effect_normalized"][0, p] - t["effect"][0, p])
        assert abs(offset) > 0.1  # the compositional shift is not negligible here ...
        assert np.median(np.abs(err_n)) < 0.03 < np.median(np.abs(err_n - offset))  # ... and is captured


def test_context_modulation_and_combos():
    cfg = PRESETS["tiny"].replace(n_contexts=3, n_combos=2, context_flip=0.0, seed=2)
    a = simulate(cfg)
    t = a.uns[SIM_UNS_KEY]
    eff, cls, tgt = t["effect"], list(t["effect_class"]), t["target_index"]
    names = list(t["perturbations"])
    assert cls[-2:] == ["combo", "combo"] and all("+" in n for n in names[-2:])
    for j in (6, 7):
        ia, ib = (names.index(s) for s in names[j].split("+"))
        assert tuple(tgt[j]) == (tgt[ia, 0], tgt[ib, 0])
        additive = eff[:, ia] + eff[:, ib]
        inter = eff[:, j] - additive
        np.testing.assert_allclose(inter[:, tgt[j]], 0.0, atol=1e-6)  # targets: sum of singles
        assert np.abs(inter).max() > 0.05  # an interaction exists elsewhere
        assert np.allclose(inter[0], inter[1], atol=1e-6)  # the interaction is shared by contexts
        assert set(a.obs.loc[a.obs[PERT_COL] == names[j], GUIDE_COL].str.rsplit("_g", n=1).str[0]) == {
            names[j]
        }
    strong = [p for p, c in enumerate(cls) if c == "strong"]
    # contexts share programmes but rescale them: effects correlate yet are not identical ...
    for p in strong:
        assert not np.allclose(eff[0, p], eff[1, p])
        assert np.corrcoef(eff[0, p], eff[1, p])[0, 1] > 0.5
    # ... and with every programme flipped outside context 0, downstream effects anti-correlate
    flipped = simulate(cfg.replace(context_flip=1.0, n_combos=0)).uns[SIM_UNS_KEY]["effect"]
    for p in strong:
        others = np.arange(flipped.shape[2]) != tgt[p, 0]
        np.testing.assert_array_equal(flipped[0, p], eff[0, p])  # context 0 is never flipped
        assert np.corrcoef(flipped[0, p, others], flipped[1, p, others])[0, 1] < -0.5


def test_eval_pair():
    pred, real = simulate_eval_pair(
        n_perts=6, cells_per_pert=80, n_controls=100, n_genes=150, seed=3, noise=0.0
    )
    assert pred.shape == real.shape == (100 + 6 * 80, 150)
    assert pred.obs.equals(real.obs) and list(pred.var_names) == list(real.var_names)
    ctrl = np.flatnonzero(real.obs[PERT_COL].to_numpy() == CONTROL_LABEL)
    assert (pred.X[ctrl] != real.X[ctrl]).nnz == 0
    assert (pred.X != real.X).nnz > 0  # perturbed cells are fresh draws

    def deltas(adata):
        x = _normlog(adata.X)
        pert = adata.obs[PERT_COL].to_numpy()
        c = x[pert == CONTROL_LABEL].mean(0)
        return {p: x[pert == p].mean(0) - c for p in np.unique(pert) if p != CONTROL_LABEL}

    good_pred, wrong_pred, truth = (
        deltas(pred),
        deltas(simulate_eval_pair(6, 80, 100, 150, 3, 1.0)[0]),
        deltas(real),
    )
    good = np.mean([np.corrcoef(good_pred[p], truth[p])[0, 1] for p in truth])
    wrong = np.mean([np.corrcoef(wrong_pred[p], truth[p])[0, 1] for p in truth])
    assert good > 0.8 and good > wrong + 0.3
    with pytest.raises(ConfigError, match="noise"):
        simulate_eval_pair(noise=2.0)


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"n_genes": 1}, "n_genes"),
        ({"n_perts": 150}, "n_perts"),
        ({"frac_strong": 0.8, "frac_subtle": 0.5}, "frac_strong"),
        ({"knockdown": 0.0}, "knockdown"),
        ({"library_min": 10.0, "library_median": 5.0}, "library"),
        ({"n_combos": 10}, "n_combos"),
        ({"cells_per_pert": 2.5}, "cells_per_pert"),
    ],
)
def test_config_validation(changes, match):
    with pytest.raises(ConfigError, match=match):
        SimConfig(**changes)


def test_preset_errors_and_sizes():
    with pytest.raises(ConfigError, match="unknown simulator preset"):
        SimConfig.preset("huge")
    with pytest.raises(ConfigError, match="no field"):
        SimConfig.preset("tiny", n_gene=3)
    assert PRESETS["vcc"].n_genes == 18080 and PRESETS["vcc"].n_cells == 300_000
    assert PRESETS["demo"].n_cells == 5040 and PRESETS["tiny"].n_cells == 960


def test_cli_sim(tmp_path, capsys):
    out = tmp_path / "t.h5ad"
    rc = cli.main(
        ["sim", "--preset", "tiny", "--seed", "4", "--n-genes", "120", "--n-combos", "1", "-o", str(out)]
    )
    assert rc == 0
    a = ad.read_h5ad(out)
    assert a.shape == (960 + 2 * 60, 120)
    assert json.loads(a.uns[SIM_UNS_KEY]["config_json"])["seed"] == 4
    assert "wrote" in capsys.readouterr().out
    rc = cli.main(["sim", "--preset", "tiny", "--n-perts", "101", "-o", str(tmp_path / "x.h5ad")])
    assert rc == 2 and not (tmp_path / "x.h5ad").exists()


@pytest.mark.reference
def test_readable_by_cell_eval_baseline(tmp_path):
    from cell_eval import build_base_mean_adata

    path = tmp_path / "t.h5ad"
    write_simulated(PRESETS["tiny"].replace(n_contexts=1), path)
    base = build_base_mean_adata(str(path))
    assert base.shape == (480, 200)
    assert set(base.obs[PERT_COL].unique()) >= {CONTROL_LABEL}


@pytest.mark.reference
@pytest.mark.filterwarnings("ignore")
def test_eval_pair_scores_with_cell_eval(tmp_path):
    """The reference evaluator ranks a correct prediction above a shuffled one (DES, PDS and MAE)."""
    from cell_eval import MetricsEvaluator

    means = {}
    for noise in (0.0, 1.0):
        pred, real = simulate_eval_pair(
            n_perts=10, cells_per_pert=50, n_controls=100, n_genes=300, seed=0, noise=noise
        )
        ev = MetricsEvaluator(
            adata_pred=pred,
            adata_real=real,
            control_pert=CONTROL_LABEL,
            pert_col=PERT_COL,
            outdir=str(tmp_path / f"ev{noise}"),
            num_threads=1,
        )
        _, agg = ev.compute(profile="vcc")
        row = agg.filter(agg["statistic"] == "mean")
        means[noise] = {k: float(row[k][0]) for k in ("overlap_at_N", "discrimination_score_l1", "mae")}
    good, bad = means[0.0], means[1.0]
    assert good["overlap_at_N"] > 0.7 and bad["overlap_at_N"] < 0.2
    assert good["discrimination_score_l1"] > bad["discrimination_score_l1"] + 0.2
    assert good["mae"] < bad["mae"]
