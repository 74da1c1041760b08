"""State Embedding model: config, sentence construction, masking, losses, fallback genes, persistence."""

from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from celltwin.errors import ConfigError, InputError
from celltwin.models.state_embedding import (
    StateEmbeddingConfig,
    StateEmbeddingModel,
    energy_distance_1d,
)

G = 80


def _model(n_missing: int = 0, seed: int = 0, **over) -> StateEmbeddingModel:
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    vec = rng.normal(size=(G, 12)).astype(np.float32)
    found = np.ones(G, bool)
    found[:n_missing] = False
    vec[~found] = 0.0
    cfg = StateEmbeddingConfig.preset("tiny", **over)
    return StateEmbeddingModel(cfg, [f"g{i}" for i in range(G)], vec, found, ["d0", "d1"])


def _cells(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    rate = torch.rand(n, G, generator=g) * 3 * (torch.rand(n, G, generator=g) < 0.6)
    return torch.poisson(rate, generator=g).log1p()  # (n, G) with many zeros and ties


def test_presets_and_validation():
    pub = StateEmbeddingConfig.preset("published")
    assert (pub.d_model, pub.n_layers, pub.n_heads, pub.mlp_hidden, pub.d_out) == (512, 8, 16, 1024, 512)
    assert (pub.sentence_len, pub.n_mask) == (2048, 1280)
    with pytest.raises(ConfigError, match="divisible"):
        StateEmbeddingConfig(d_model=30, n_heads=4)
    with pytest.raises(ConfigError, match="n_mask"):
        StateEmbeddingConfig(sentence_len=10, n_mask=10)
    with pytest.raises(ConfigError, match="loss"):
        StateEmbeddingConfig(loss="l1")
    with pytest.raises(ConfigError, match="unknown SE preset"):
        StateEmbeddingConfig.preset("huge")
    with pytest.raises(ConfigError, match="unknown StateEmbeddingConfig fields"):
        StateEmbeddingConfig.preset("tiny", width=3)


def test_sentence_is_top_genes_with_fixed_tie_break():
    m = _model()
    assert m.L == 64 and m.n_mask == 40
    x = _cells(4)
    idx, val = m.sentence(x, random_ties=False)
    assert idx.shape == (4, 64)
    assert torch.all(val[:, :-1] >= val[:, 1:])  # descending
    for b in range(4):  # exactly the top-64 values of the row
        np.testing.assert_allclose(val[b].numpy(), torch.sort(x[b], descending=True).values[:64].numpy())
        # ties (equal values) ordered by the fixed per-gene priority
        same = val[b, :-1] == val[b, 1:]
        r = m.tie_rank[idx[b]]
        assert torch.all(r[:-1][same] < r[1:][same])
    idx2, _ = m.sentence(x, random_ties=False)
    assert torch.equal(idx, idx2)
    # vocabulary smaller than the sentence: L capped, mask scaled
    small = StateEmbeddingModel(
        StateEmbeddingConfig.preset("tiny", sentence_len=200, n_mask=100),
        [f"g{i}" for i in range(G)],
        np.ones((G, 3)),
        np.ones(G, bool),
    )
    assert small.L == G and small.n_mask == 40


def test_mask_positions_spread_over_strata():
    m = _model()
    torch.manual_seed(1)
    pos = m.mask_positions(16, torch.device("cpu"))
    assert pos.shape == (16, 40)
    for row in pos:
        assert len(set(row.tolist())) == 40
        counts = np.bincount(row.numpy() // 16, minlength=4)  # 4 strata of 16 positions, quota 10 each
        assert counts.tolist() == [10, 10, 10, 10]


def test_energy_distance_1d_matches_pairwise_definition():
    from celltwin.losses import energy_distance

    assert float(energy_distance_1d(torch.tensor([[0.0]]), torch.tensor([[1.0]]))) == pytest.approx(2.0)
    # a = {0, 2}, b = {1}: 2*E|a-b| = 2, E|a-a'| = (0+2+2+0)/4 = 1, E|b-b'| = 0 -> 1
    assert float(energy_distance_1d(torch.tensor([[0.0, 2.0]]), torch.tensor([[1.0]]))) == pytest.approx(1.0)
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(3, 17, generator=g), torch.randn(3, 11, generator=g) + 0.5
    a[0, :5] = 0.0
    b[0, :4] = 0.0  # ties across the two samples
    ref = energy_distance(a[..., None].double(), b[..., None].double())
    np.testing.assert_allclose(energy_distance_1d(a, b).numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_embedding_deterministic_batch_invariant_and_magnitude_aware():
    m = _model().eval()
    x = _cells(6)
    e = m(x)
    assert e.shape == (6, 32)
    np.testing.assert_allclose(e.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)
    np.testing.assert_allclose(m(x[2:3]).detach().numpy(), e[2:3].detach().numpy(), atol=1e-5)
    # same ranking, different magnitudes -> different embedding (expression encoding is used)
    e_scaled = m(x * 2)
    assert (e_scaled - e).abs().max() > 1e-5  # exactly 0 if magnitudes were ignored
    # the dataset token matters; None = "unknown" token
    e_d1 = m(x, torch.ones(6, dtype=torch.long))
    assert (e_d1 - m(x, torch.zeros(6, dtype=torch.long))).abs().max() > 1e-5
    assert torch.allclose(m(x, torch.full((6,), 2, dtype=torch.long)), e)
    with pytest.raises(InputError, match="gene order"):
        m(x[:, :10])


def test_fallback_vectors_are_learned_not_zero():
    m = _model(n_missing=5)
    assert m.fallback.shape == (5, 12)
    v = m.gene_vectors(torch.arange(G))
    assert torch.equal(v[:5], m.fallback.detach()) and v[:5].abs().sum() > 0
    assert torch.equal(v[5:], m.gene_table[5:])
    assert "gene_table" not in dict(m.named_parameters())  # fixed table never trained
    x = _cells(8)
    x[:, :5] = 3.0  # missing genes highly expressed: they are in every sentence
    m.loss(x)["loss"].backward()
    assert m.fallback.grad is not None and m.fallback.grad.abs().sum() > 0


@pytest.mark.parametrize("loss", ["mse", "energy", "mmd", "mse+energy", "mse+mmd"])
def test_loss_variants_finite_with_gradients(loss):
    m = _model(loss=loss)
    parts = m(_cells(4), torch.tensor([0, 1, 0, 1]), return_loss=True)
    assert torch.isfinite(parts["loss"]) and "mse" in parts
    if loss != "mse":
        assert loss.removeprefix("mse+") in parts
    parts["loss"].backward()
    assert m.gene_proj.weight.grad.abs().sum() > 0 and m.decoder[0].weight.grad.abs().sum() > 0


def test_training_reduces_masked_prediction_loss():
    m = _model(seed=3)
    x = _cells(32, seed=5)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    torch.manual_seed(0)
    with torch.no_grad():
        before = np.mean([float(m.loss(x)["mse"]) for _ in range(3)])
    for _ in range(60):
        opt.zero_grad()
        m.loss(x)["loss"].backward()
        opt.step()
    with torch.no_grad():
        after = np.mean([float(m.loss(x)["mse"]) for _ in range(3)])
    assert after < 0.7 * before, (before, after)


def test_save_and_from_pretrained_roundtrip(tmp_path):
    m = _model(n_missing=3).eval()
    with torch.no_grad():
        m.fallback.add_(1.0)
    m.save_pretrained(tmp_path / "se", extra={"note": "x"})
    names = sorted(p.name for p in (tmp_path / "se").iterdir())
    assert names == ["config.json", "gene_embeddings.safetensors", "genes.txt", "model.safetensors"]
    meta = json.loads((tmp_path / "se" / "config.json").read_text())
    assert (
        meta["config"]["d_model"] == 32 and meta["n_missing_genes"] == 3 and meta["datasets"] == ["d0", "d1"]
    )
    m2 = StateEmbeddingModel.from_pretrained(tmp_path / "se")
    x = _cells(5)
    assert torch.equal(m2(x), m(x))
    assert torch.equal(m2.fallback, m.fallback) and m2.extra == {"note": "x"}
    assert m2.gene_found.tolist() == m.gene_found.tolist()
    with pytest.raises(InputError, match="no config.json"):
        StateEmbeddingModel.from_pretrained(tmp_path)
