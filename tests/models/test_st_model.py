"""Tests of the ST model: shapes, permutation equivariance, identity start, presets, persistence, counts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from celltwin.errors import ConfigError
from celltwin.models import PRESETS, StateTransition, STConfig, sample_counts
from celltwin.models.state_transition import inverse_softplus


def _model(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = STConfig.from_preset("tiny", input_dim=12, n_perts=5, n_contexts=2, **kw)
    m = StateTransition(cfg)
    # move off the identity start so the tests see a non-trivial map
    with torch.no_grad():
        m.head.weight.normal_(std=0.3)
    return m.eval()


def _inputs(B=2, S=10, D=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ctrl = torch.rand(B, S, D, generator=g) * 3
    ctrl[ctrl < 1] = 0  # sparse-ish log1p values
    return ctrl, torch.tensor([1, 4][:B]), torch.tensor([1, 2][:B])


def test_published_preset_matches_the_paper_configuration():
    c = STConfig.from_preset("state", input_dim=2000, n_perts=10)
    assert (c.hidden, c.n_layers, c.n_heads, c.mlp_hidden, c.norm_eps, c.set_size) == (696, 8, 12, 2784, 1e-6, 512)
    assert c.hidden // c.n_heads == 58 and c.encoder_layers == 4 and c.loss_weights == {"energy": 1.0}
    assert c.blur == 0.05 and c.predict_residual
    m = StateTransition(c)
    blk = m.transformer.blocks[0]
    assert len(m.transformer.blocks) == 8
    assert all(mod.bias is None for mod in (blk.attn.qkv, blk.attn.out, blk.mlp.gate, blk.mlp.up, blk.mlp.down))
    assert blk.mlp.gate.out_features == 2784 and blk.attn.head_dim == 58
    assert sum(isinstance(x, torch.nn.Linear) for x in m.basal_encoder.net) == 4
    assert sum(isinstance(x, torch.nn.GELU) for x in m.pert_encoder.net) == 3
    assert set(PRESETS) == {"tiny", "small", "state", "state-0.11"}


def test_config_validation():
    with pytest.raises(ConfigError, match="divisible"):
        STConfig(input_dim=4, hidden=10, n_heads=3)
    with pytest.raises(ConfigError, match="input_space"):
        STConfig(input_dim=4, input_space="counts")
    with pytest.raises(ConfigError, match="loss_weights"):
        STConfig(input_dim=4, loss_weights={"l1": 1.0})
    with pytest.raises(ConfigError, match="preset"):
        STConfig.from_preset("huge", input_dim=4)


def test_output_shape_and_positivity():
    m = _model()
    ctrl, p, c = _inputs()
    out = m(ctrl, p, c)
    assert out["pred"].shape == (2, 10, 12) and (out["pred"] > 0).all()


def test_permutation_equivariant_over_the_set():
    m = _model()
    ctrl, p, c = _inputs()
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(5))
    out = m(ctrl, p, c)["pred"]
    out_p = m(ctrl[:, perm], p, c)["pred"]
    torch.testing.assert_close(out_p, out[:, perm], rtol=1e-5, atol=1e-6)
    # ...but not a per-cell map: changing another cell changes this cell's output (attention mixes)
    ctrl2 = ctrl.clone()
    ctrl2[:, 1:] += 1.0
    assert not torch.allclose(m(ctrl2, p, c)["pred"][:, 0], out[:, 0])


def test_perturbation_and_context_change_the_output():
    m = _model()
    ctrl, p, c = _inputs()
    a = m(ctrl, p, c)["pred"]
    assert not torch.allclose(a, m(ctrl, torch.tensor([2, 3]), c)["pred"])
    assert not torch.allclose(a, m(ctrl, p, torch.tensor([0, 0]))["pred"])


def test_identity_at_initialisation():
    torch.manual_seed(0)
    m = StateTransition(STConfig.from_preset("tiny", input_dim=12, n_perts=5)).eval()
    ctrl, p, _ = _inputs()
    out = m(ctrl, p)["pred"]
    torch.testing.assert_close(out, ctrl.clamp_min(1e-3), rtol=1e-5, atol=1e-6)
    y = torch.tensor([1e-3, 0.5, 3.0, 30.0])
    torch.testing.assert_close(torch.nn.functional.softplus(inverse_softplus(y)), y)


def test_gene_embedding_perturbations_reach_unseen_rows():
    torch.manual_seed(0)
    table = torch.randn(7, 6)
    cfg = STConfig.from_preset("tiny", input_dim=12, n_perts=7, pert_emb_dim=6)
    m = StateTransition(cfg, pert_table=table).eval()
    e = m.encode_perturbation(torch.tensor([0, 6]))
    assert e.shape == (2, 32) and not torch.allclose(e[0], e[1])
    with pytest.raises(ConfigError, match="pert_table"):
        StateTransition(cfg, pert_table=torch.randn(3, 6))


def test_embedding_input_with_gene_decoder_and_loss():
    torch.manual_seed(0)
    cfg = STConfig.from_preset("tiny", input_dim=8, n_perts=3, input_space="embedding", n_genes=20,
                               loss_weights={"energy": 1.0, "mse": 0.1})
    m = StateTransition(cfg)
    ctrl = torch.randn(2, 6, 8)
    out = m(ctrl, torch.tensor([0, 2]))
    assert out["pred"].shape == (2, 6, 8) and out["genes"].shape == (2, 6, 20)
    torch.testing.assert_close(out["pred"], ctrl)  # identity start, no softplus on embeddings
    parts = m.loss(out, torch.randn(2, 6, 8), torch.rand(2, 6, 20))
    assert {"loss", "energy", "mse", "genes_energy", "genes_mse"} <= set(parts)
    parts["loss"].backward()
    assert m.gene_decoder.net[0].weight.grad.abs().sum() > 0
    # residual decoder: at the identity start a predicted cell is its basal cell's genes (floored at 1e-3)
    genes = torch.rand(2, 6, 20) * 3
    genes[0, 0, :5] = 0.0
    out = m(ctrl, torch.tensor([0, 2]), ctrl_genes=genes)
    torch.testing.assert_close(out["genes"], genes.clamp_min(1e-3), rtol=1e-5, atol=1e-6)
    m.config.decoder_residual = False  # plain decoder: basal genes ignored
    torch.testing.assert_close(m(ctrl, torch.tensor([0, 2]), ctrl_genes=genes)["genes"],
                               m(ctrl, torch.tensor([0, 2]))["genes"])


def test_save_and_load_pretrained_roundtrip(tmp_path):
    m = _model()
    m.vocab = {"perturbations": list("abcde"), "genes": [f"g{i}" for i in range(12)]}
    m.save_pretrained(tmp_path)
    assert {p.name for p in tmp_path.iterdir()} == {"model.safetensors", "config.json", "vocab.json"}
    m2 = StateTransition.from_pretrained(tmp_path).eval()
    assert m2.config == m.config and m2.vocab == m.vocab
    ctrl, p, c = _inputs()
    torch.testing.assert_close(m2(ctrl, p, c)["pred"], m(ctrl, p, c)["pred"], rtol=0, atol=0)


def test_a_few_steps_reduce_the_energy_loss():
    """The tiny model learns a constant shift of +1 on genes 0..3 (with perturbation 1)."""
    torch.manual_seed(0)
    m = StateTransition(STConfig.from_preset("tiny", input_dim=12, n_perts=3))
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    shift = torch.zeros(12)
    shift[:4] = 1.0
    losses = []
    for _ in range(60):
        ctrl = torch.rand(4, 16, 12, generator=g) + 0.5
        target = torch.rand(4, 16, 12, generator=g) + 0.5 + shift
        parts = m.loss(m(ctrl, torch.ones(4, dtype=torch.long)), target)
        opt.zero_grad()
        parts["loss"].backward()
        opt.step()
        losses.append(parts["loss"].item())
    assert np.mean(losses[-5:]) < 0.3 * np.mean(losses[:5])


def test_sample_counts_means():
    rng = np.random.default_rng(0)
    x = np.log1p(np.array([[0.0, 1.0, 9.0]] * 4000))  # normalised expression 0, 1, 9 at T = 100
    c = sample_counts(x, library_size=200.0, target_sum=100.0, rng=rng)
    assert c.dtype == np.int64 and (c[:, 0] == 0).all()
    np.testing.assert_allclose(c.mean(0), [0, 2, 18], rtol=0.05, atol=0.01)
    nb = sample_counts(x, 200.0, 100.0, rng, dist="nb", theta=2.0)
    np.testing.assert_allclose(nb.mean(0), [0, 2, 18], rtol=0.07, atol=0.01)
    # NB variance mu + mu^2 / theta: 18 + 162 = 180 vs Poisson 18
    assert 140 < nb[:, 2].var() < 220 and 15 < c[:, 2].var() < 21


def test_combination_input_is_the_sum_of_members():
    m = _model()
    a = m.encode_perturbation(torch.tensor([[1, 3], [2, -1]]))
    onehot = torch.zeros(2, 5)
    onehot[0, 1] = onehot[0, 3] = 1
    onehot[1, 2] = 1
    torch.testing.assert_close(a, m.pert_encoder(onehot))
    # a (B,) index and the same index as a padded (B, 1) combination agree
    torch.testing.assert_close(m.encode_perturbation(torch.tensor([2])), a[1:2])
