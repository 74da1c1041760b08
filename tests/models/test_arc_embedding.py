"""arc-state SE re-implementation vs the outputs arc-state 0.11.1 recorded (tests/data/state_golden/se)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from celltwin.errors import ConfigError
from celltwin.models.arc_embedding import ArcSEConfig, ArcStateEmbedding

yaml = pytest.importorskip("yaml")
ad = pytest.importorskip("anndata")

SE = Path(__file__).resolve().parents[1] / "data" / "state_golden" / "se"
TOL = 1e-5
CASES = ("tiefree", "counts")


@pytest.fixture(scope="module")
def model() -> ArcStateEmbedding:
    from celltwin.state_import._unpickle import load_torch

    ck = load_torch(SE / "final.pt")
    cfg = ArcSEConfig.from_arc_checkpoint(ck["hyper_parameters"], yaml.safe_load(ck["cfg_yaml"]))
    m = ArcStateEmbedding(cfg, genes=list(ck["protein_embeds_dict"]))
    m.load_state_dict(ck["state_dict"])  # strict: arc's keys exactly
    return m.eval()


@pytest.fixture(scope="module")
def calls() -> dict[str, dict[str, np.ndarray]]:
    return {c: dict(np.load(SE / f"transform_{c}_calls.npz")) for c in CASES}


def _rows(case: str):
    a = ad.read_h5ad(SE / f"transform_input_{case}.h5ad")
    return a.X, list(a.var_names)


def _batches(z: dict[str, np.ndarray]):
    for c in range(0, int(z["n_calls"]), 2):  # forward is call c, _compute_embedding_for_batch call c + 1
        yield c, {i: z[f"call{c + 1}._compute_embedding_for_batch.args.0.{i}"] for i in range(9)}


def test_config_from_checkpoint(model: ArcStateEmbedding) -> None:
    cfg = model.config
    assert (cfg.token_dim, cfg.d_model, cfg.nhead, cfg.d_hid, cfg.nlayers, cfg.output_dim) == (24, 32, 4, 64, 2, 16)
    assert (cfg.n_genes, cfg.pad_length, cfg.cls_token_idx, cfg.n_datasets) == (64, 32, 3, 2)
    assert ArcSEConfig(**cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="d_model"):
        ArcSEConfig(token_dim=24, d_model=30, nhead=4, d_hid=64, nlayers=2, output_dim=16)
    with pytest.raises(ConfigError, match="nlayers"):
        ArcSEConfig(token_dim=24, d_model=32, nhead=4, d_hid=64, nlayers=0, output_dim=16)


@pytest.mark.parametrize("case", CASES)
def test_forward_matches_every_recorded_call(model, calls, case: str) -> None:
    z = calls[case]
    worst = 0.0
    with torch.no_grad():
        for c, _ in _batches(z):
            f = f"call{c}.forward."
            out = model(torch.tensor(z[f + "args.0"]), torch.tensor(z[f + "kwargs.mask"]),
                        counts=torch.tensor(z[f + "kwargs.counts"]), dataset_nums=torch.tensor(z[f + "kwargs.dataset_nums"]))
            for i in range(3):
                worst = max(worst, float((out[i] - torch.tensor(z[f"{f}out.{i}"])).abs().max()))
            assert torch.allclose(out[1].norm(dim=1), torch.ones(out[1].shape[0]), atol=1e-6)
    assert worst <= TOL, worst


@pytest.mark.parametrize("case", CASES)
def test_first_batch_block_outputs(model, calls, case: str) -> None:
    z = calls[case]
    x, cnt = torch.tensor(z["call0.forward.args.0"]), torch.tensor(z["call0.forward.kwargs.counts"])
    mod = {k.removeprefix("call0.module."): torch.tensor(v) for k, v in z.items() if k.startswith("call0.module.")}
    with torch.no_grad():
        enc = model.encoder(x)
        assert (enc - mod["encoder"]).abs().max() <= TOL
        assert (model.count_encoder(cnt[..., None]) - mod["count_encoder"]).abs().max() <= TOL
        h = enc * model.config.d_model**0.5
        h[:, :-1] += torch.softmax(mod["count_encoder"], -1) @ model.bin_encoder.weight
        for i, layer in enumerate(model.transformer_encoder.layers):
            h = layer(h)
            assert (h - mod[f"transformer_encoder.layers.{i}"]).abs().max() <= TOL, i
        assert (model.decoder(mod["transformer_encoder"]) - mod["decoder"]).abs().max() <= TOL
        # the target-gene tokens _compute_embedding_for_batch returns: encoder(raw table rows)
        b1 = torch.tensor(z["call1._compute_embedding_for_batch.args.0.1"]).long()
        assert (model.gene_embedding_layer(model.pe_embedding(b1))
                - torch.tensor(z["call1._compute_embedding_for_batch.out.0"])).abs().max() <= TOL
        # the dataset_embedder calls the transform made outside forward
        for j in range(5):
            got = model.dataset_embedder(torch.tensor(z[f"outside{j}.args.0"]))
            assert (got - torch.tensor(z[f"outside{j}.out"])).abs().max() <= TOL


@pytest.mark.parametrize("case", CASES)
def test_sentences_reproduce_collated_batches(model, calls, case: str) -> None:
    X, var = _rows(case)
    gidx = model.gene_index(var)
    z = calls[case]
    for c, b in _batches(z):
        s = model.sentences(X[b[3]], gidx)
        if case == "tiefree":  # no ties: arc's exact sentence and features
            np.testing.assert_array_equal(s["ids"].numpy(), b[0])
            np.testing.assert_array_equal(s["counts"].numpy(), b[7])
            np.testing.assert_array_equal(s["input_ids"].numpy(), z[f"call{c}.forward.args.0"])
        else:  # arc broke ties at random: same values in the same descending order, same sentence gene set by value
            rec = np.take_along_axis(X[b[3]].toarray(), b[0].astype(np.int64), 1)
            got = np.take_along_axis(X[b[3]].toarray(), s["ids"].numpy(), 1)
            np.testing.assert_array_equal(got[:, 1:], rec[:, 1:])
            np.testing.assert_array_equal(s["counts"].numpy(), b[7])
            assert not s["mask"].any()


def test_sentence_features_from_recorded_ids(model, calls) -> None:
    """With arc's tokens, the feature rule (incl. the per-cell log decision) gives arc's counts exactly."""
    X, _ = _rows("counts")
    for _, b in _batches(calls["counts"]):
        for j, r in enumerate(b[3]):
            row = torch.tensor(X[r].toarray()[0])
            v = torch.log1p(row) if float(row.max()) > model.config.raw_count_max else row
            np.testing.assert_array_equal(v.numpy(), b[4][j])
            np.testing.assert_array_equal((v[torch.tensor(b[0][j]).long()] / v.sum() * 100).numpy(), b[7][j])


def test_embed_rows_end_to_end(model) -> None:
    X, var = _rows("tiefree")
    want = np.load(SE / "transform_tiefree_X_state.npy")
    got = model.embed_rows(X, model.gene_index(var), batch_size=8)
    assert got.shape == want.shape == (40, 26)
    assert np.abs(got - want).max() <= TOL
    np.testing.assert_allclose(np.linalg.norm(got[:, :16], axis=1), 1.0, atol=1e-6)
    assert np.abs(model.embed_rows(X, model.gene_index(var), batch_size=5) - want).max() <= TOL


def test_fewer_expressed_genes_than_sentence(model) -> None:
    rows = np.zeros((2, 64), dtype=np.float32)
    rows[:, [5, 9, 20]] = [[30, 20, 20], [1, 2, 3]]
    s1 = model.sentences(rows, np.arange(64), rng=np.random.default_rng(1))
    s2 = model.sentences(rows, np.arange(64), rng=np.random.default_rng(1))
    assert torch.equal(s1["ids"], s2["ids"])
    np.testing.assert_array_equal(s1["ids"][0, :4].numpy(), [3, 5, 9, 20])  # tie 20 = 20: lower row first
    np.testing.assert_array_equal(s1["ids"][1, :4].numpy(), [3, 20, 9, 5])  # max 3 <= 15: used as is
    assert not np.isin(s1["ids"][:, 4:].numpy(), [5, 9, 20]).any()  # fill-in: unexpressed genes only
    assert (s1["counts"][:, 4:] == 0).all()
    assert torch.allclose(s1["counts"][1, 1:4], torch.tensor([50.0, 100 / 3, 100 / 6]))


def test_save_load_roundtrip_and_two_arg_call(model, tmp_path: Path) -> None:
    model.save_pretrained(tmp_path / "m")
    assert {p.name for p in (tmp_path / "m").iterdir()} == {"model.safetensors", "config.json", "genes.txt"}
    m2 = ArcStateEmbedding.from_pretrained(tmp_path / "m")
    assert m2.genes == model.genes and m2.config == model.config
    sd1, sd2 = model.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    assert m2.gene_embedding_layer is m2.encoder
    ids = torch.tensor([[3, 10, 20, 30, *range(36, 64)]])
    x = m2.token_vectors(ids.repeat(2, 1))
    with torch.no_grad():
        tokens, emb, ds = m2(x, torch.zeros(x.shape[:2], dtype=torch.bool))
    assert tokens.shape == (2, 33, 16) and ds.shape == (2, 16)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(2))
    with torch.no_grad():
        y = m2.predict_expression(emb, torch.tensor([[1, 2, 3]] * 2), torch.tensor([40.0, 30.0]), ds)
    assert y.shape == (2, 3) and torch.isfinite(y).all()
