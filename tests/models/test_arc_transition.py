"""celltwin's re-implementation of arc-state's ST model vs arc-state's recorded outputs (tests/data/state_golden).

Tolerance 1e-5 absolute, fp32, CPU (the golden README's target). The golden files are only read.
"""

from __future__ import annotations

import functools
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from celltwin.errors import ConfigError, InputError
from celltwin.models.arc_transition import DEAD_KEYS, ArcStateTransition, ArcSTConfig, arc_state_dict
from celltwin.state_import._unpickle import load_pickle, load_torch, plain

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "state_golden"
VARIANTS = ["st_llama_hvg", "st_llama_all", "st_gpt2_hvg", "st_llama_emb", "st_llama_extras"]
TOL = 1e-5


@functools.cache
def _ckpt(variant: str):
    ck = load_torch(GOLDEN / variant / "checkpoints" / "final.ckpt")
    return ck["state_dict"], plain(ck["hyper_parameters"]), plain(load_pickle(GOLDEN / variant / "var_dims.pkl"))


@functools.cache
def _model(variant: str) -> ArcStateTransition:
    sd, hp, vd = _ckpt(variant)
    cfg = ArcSTConfig.from_arc_hparams(hp, vd)
    m = ArcStateTransition(cfg, vocab={"perturbations": list(vd["pert_names"])})
    m.load_state_dict(arc_state_dict(sd))  # strict
    return m.eval()


@functools.cache
def _npz(variant: str, name: str):
    return dict(np.load(GOLDEN / variant / name))


def _t(a) -> torch.Tensor:
    return torch.from_numpy(np.asarray(a))


def _maxdiff(a: torch.Tensor, b) -> float:
    b = _t(b)
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.detach().float() - b.float()).abs().max().item()


def _call_inputs(z, c, m):
    ctrl, pert = _t(z[f"call{c}.args.0.ctrl_cell_emb"]), _t(z[f"call{c}.args.0.pert_emb"])
    batch = _t(z[f"call{c}.args.0.batch"]) if m.config.batch_dim else None
    return ctrl, pert, batch


def test_derived_configs():
    c = _model("st_llama_hvg").config
    assert (c.backbone, c.hidden, c.n_layers, c.n_heads, c.n_kv_heads, c.head_dim, c.mlp_hidden) == \
        ("llama", 32, 2, 4, 4, 8, 64)
    assert (c.norm_eps, c.output_space, c.relu_output, c.final_down_then_up, c.decode_genes) == \
        (1e-6, "gene", True, False, False)
    assert (c.gene_dim, c.decoder_hidden_dims, c.set_size, c.input_space) == (32, [16, 16], 8, "expression")
    g = _model("st_gpt2_hvg").config
    assert (g.backbone, g.norm_eps, g.mlp_hidden, g.gpt2_activation, g.use_basal_projection) == \
        ("gpt2", 1e-5, 128, "gelu_new", False)
    assert (g.n_encoder_layers, g.n_decoder_layers) == (2, 2)
    a = _model("st_llama_all").config
    assert (a.output_space, a.final_down_then_up, a.relu_output, a.input_dim, a.output_dim) == ("all", True, True, 64, 64)
    e = _model("st_llama_emb").config
    assert (e.input_space, e.decode_genes, e.relu_output, e.gene_dim, e.final_down_then_up) == \
        ("embedding", True, False, 64, True)
    x = _model("st_llama_extras").config
    assert (x.n_kv_heads, x.batch_dim, x.confidence_token) == (2, 2, True)
    json.dumps(x.to_dict())  # JSON-able


@pytest.mark.parametrize("variant", VARIANTS)
def test_state_dict_keys_are_arc_keys(variant):
    sd, _, _ = _ckpt(variant)
    ours = set(_model(variant).state_dict())
    assert ours == set(sd) - set(DEAD_KEYS)
    assert set(sd) & set(DEAD_KEYS)  # every variant carries a dead table, which we drop


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_infer_forward_calls(variant):
    m, z = _model(variant), _npz(variant, "infer_forward_calls.npz")
    n = int(z["n_calls"])
    assert n == 11
    for c in range(n):
        assert not bool(z[f"call{c}.kwargs.padded"])
        out = m.forward_arc(*_call_inputs(z, c, m), padded=False)
        if m.config.confidence_token:
            assert _maxdiff(out[0], z[f"call{c}.out.0"]) <= TOL
            assert _maxdiff(out[1], z[f"call{c}.out.1"]) <= TOL
        else:
            assert _maxdiff(out, z[f"call{c}.out"]) <= TOL


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_forward_padded(variant):
    m, f = _model(variant), _npz(variant, "forward_padded.npz")
    S = int(f["fwd.cell_set_len"])
    assert m.config.set_size == S
    ctrl, pert = _t(f["fwd.ctrl_cell_emb"]), _t(f["fwd.pert_emb"])
    batch = _t(f["fwd.batch"]) if m.config.batch_dim else None
    padded = m.forward_arc(ctrl, pert, batch, padded=True)
    set0 = m.forward_arc(ctrl[:S], pert[:S], None if batch is None else batch[:S], padded=False)
    if m.config.confidence_token:
        for i in (0, 1):
            assert _maxdiff(padded[i], f[f"fwd.out_padded.{i}"]) <= TOL
            assert _maxdiff(set0[i], f[f"fwd.out_set0_unpadded.{i}"]) <= TOL
        assert padded[1].shape == (2, 1)
    else:
        assert _maxdiff(padded, f["fwd.out_padded"]) <= TOL
        assert _maxdiff(set0, f["fwd.out_set0_unpadded"]) <= TOL
    with pytest.raises(InputError, match="multiple of set_size"):
        m.forward_arc(ctrl[:S + 1], pert[:S + 1], None if batch is None else batch[:S + 1], padded=True)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_layer_by_layer_call0(variant):
    m, z = _model(variant), _npz(variant, "infer_forward_calls.npz")
    bb = m.transformer_backbone
    blocks = bb.layers if m.config.backbone == "llama" else bb.h
    prefix = "transformer_backbone.layers" if m.config.backbone == "llama" else "transformer_backbone.h"
    suffix = "" if m.config.backbone == "llama" else ".0"  # GPT-2 blocks return a tuple; element 0 recorded
    mods = {"pert_encoder": m.pert_encoder, "basal_encoder": m.basal_encoder, "project_out": m.project_out,
            "transformer_backbone.last_hidden_state": bb,
            **{f"{prefix}.{i}{suffix}": blk for i, blk in enumerate(blocks)}}
    if m.batch_encoder is not None:
        mods["batch_encoder"] = m.batch_encoder
    if m.final_down_then_up is not None:
        mods["final_down_then_up"] = m.final_down_then_up
    got: dict[str, torch.Tensor] = {}
    hooks = [mod.register_forward_hook(lambda _m, _i, o, name=name: got.__setitem__(name, o))
             for name, mod in mods.items()]
    try:
        out = m.forward_arc(*_call_inputs(z, 0, m), padded=False)
    finally:
        for h in hooks:
            h.remove()
    recorded = {k.removeprefix("call0.module."): v for k, v in z.items() if k.startswith("call0.module.")}
    assert set(recorded) - {"relu", "confidence_token"} == set(mods)  # every recorded module is checked
    for name in mods:
        assert _maxdiff(got[name], recorded[name]) <= TOL, name
    if "relu" in recorded:  # the final ReLU's output is the prediction
        assert m.config.relu_output
        pred = out[0] if isinstance(out, tuple) else out
        assert _maxdiff(pred[None], recorded["relu"]) <= TOL
    else:
        assert not m.config.relu_output


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_gene_decoder(variant):
    m, z = _model(variant), _npz(variant, "infer_forward_calls.npz")
    n = int(z["n_outside"])
    assert n == 11
    for j in range(n):
        assert str(z[f"outside{j}.module"]) == "gene_decoder"
        assert _maxdiff(m.gene_decoder(_t(z[f"outside{j}.args.0"])), z[f"outside{j}.out"]) <= TOL


@torch.no_grad()
def test_gpt2_attends_causally_and_llama_as_a_set():
    """Observed: arc's GPT-2 backbone (transformers 4.57.6) is causal; the Llama one is bidirectional."""
    for variant, equivariant in (("st_llama_hvg", True), ("st_gpt2_hvg", False)):
        m, f = _model(variant), _npz(variant, "forward_padded.npz")
        ctrl, pert = _t(f["fwd.ctrl_cell_emb"])[:8], _t(f["fwd.pert_emb"])[:8]
        perm = torch.arange(7, -1, -1)
        a = m.forward_arc(ctrl, pert, padded=False)[perm]
        b = m.forward_arc(ctrl[perm], pert[perm], padded=False)
        assert torch.allclose(a, b, atol=1e-5) == equivariant
        # the first cell of a GPT-2 set sees only itself
        first = m.forward_arc(ctrl[:1], pert[:1], padded=False)
        assert torch.allclose(first, m.forward_arc(ctrl, pert, padded=False)[:1], atol=1e-6) == (not equivariant)


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_celltwin_forward_matches_forward_arc_and_round_trip(variant, tmp_path):
    m, f = _model(variant), _npz(variant, "forward_padded.npz")
    c = m.config
    ctrl = _t(f["fwd.ctrl_cell_emb"])[:8]
    k = 3
    pert = torch.zeros(8, c.pert_dim)
    pert[:, k] = 1
    batch = _t(f["fwd.batch"])[:8] if c.batch_dim else None
    ref = m.forward_arc(ctrl, pert, batch, padded=False)
    ref_pred = ref[0] if c.confidence_token else ref
    out = m(ctrl[None], torch.tensor([k]), batch_idx=None if batch is None else batch[None])
    assert _maxdiff(out["pred"][0], ref_pred.numpy()) <= 1e-6
    if c.confidence_token:
        assert _maxdiff(out["confidence"], ref[1].numpy()) <= 1e-6
    assert ("genes" in out) == c.decode_genes
    if c.decode_genes:
        assert out["genes"].shape == (1, 8, c.gene_dim)
        assert _maxdiff(out["genes"], m.gene_decoder(out["pred"]).numpy()) == 0.0
    # a combination (B, K) padded with -1 = the multi-hot sum; a single member equals the (B,) form
    single = m(ctrl[None], torch.tensor([[k, -1]]), batch_idx=None if batch is None else batch[None])
    assert torch.equal(single["pred"], out["pred"])
    combo = m(ctrl[None], torch.tensor([[0, k]]), batch_idx=None if batch is None else batch[None])
    two = pert.clone()
    two[:, 0] = 1
    ref2 = m.forward_arc(ctrl, two, batch, padded=False)
    assert _maxdiff(combo["pred"][0], (ref2[0] if c.confidence_token else ref2).numpy()) <= 1e-6
    with pytest.raises(InputError, match="perturbation indices"):
        m(ctrl[None], torch.tensor([c.pert_dim]), batch_idx=None if batch is None else batch[None])
    # loss contract
    target = ctrl[None, :, :c.output_dim] if c.output_dim <= c.input_dim else out["pred"] + 0.1
    parts = m.loss(out, target, out["genes"] + 0.5 if "genes" in out else None)
    assert torch.isfinite(parts["loss"]) and parts["loss"] > 0
    assert ("genes_energy" in parts) == c.decode_genes
    # save / load round trip, bitwise
    m.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["arch"] == "arc-state"
    m2 = ArcStateTransition.from_pretrained(tmp_path / "m").eval()
    assert m2.config == c and m2.vocab == m.vocab
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys() and all(torch.equal(sd1[key], sd2[key]) for key in sd1)
    out2 = m2(ctrl[None], torch.tensor([k]), batch_idx=None if batch is None else batch[None])
    assert all(torch.equal(out[key], out2[key]) for key in out)


def test_batch_encoder_requires_batch_indices():
    m = _model("st_llama_extras")
    with pytest.raises(InputError, match="batch indices are required"):
        m(torch.zeros(1, 4, 32), torch.tensor([0]))


@pytest.mark.parametrize(("key", "value", "match"), [
    ("lora", {"enable": True, "r": 16}, "LoRA"),
    ("use_batch_token", True, "batch token"),
    ("mask_attn", True, "attention masking"),
    ("transformer_decoder", True, "transformer decoder"),
    ("residual_decoder", True, "residual gene decoder"),
    ("transformer_backbone_key", "mamba", "transformer_backbone_key"),
    ("loss", "wasserstein", "loss"),
])
def test_from_arc_hparams_refuses_unsupported_options(key, value, match):
    _, hp, vd = _ckpt("st_llama_hvg")
    with pytest.raises(ConfigError, match=match):
        ArcSTConfig.from_arc_hparams({**hp, key: value}, vd)


def test_from_arc_hparams_refuses_causal_llama_and_inconsistent_dims():
    _, hp, vd = _ckpt("st_llama_hvg")
    kw = {**hp["transformer_backbone_kwargs"], "bidirectional_attention": False}
    with pytest.raises(ConfigError, match="bidirectional_attention"):
        ArcSTConfig.from_arc_hparams({**hp, "transformer_backbone_kwargs": kw}, vd)
    with pytest.raises(ConfigError, match="var_dims.pert_dim"):
        ArcSTConfig.from_arc_hparams(hp, {**vd, "pert_dim": 7})


def test_config_validation_names_field_expected_and_actual():
    with pytest.raises(ConfigError, match=r"ArcSTConfig\.backbone: expected one of .*got 'rnn'"):
        ArcSTConfig(input_dim=4, output_dim=4, pert_dim=2, backbone="rnn")
    with pytest.raises(ConfigError, match=r"ArcSTConfig\.n_kv_heads"):
        ArcSTConfig(input_dim=4, output_dim=4, pert_dim=2, hidden=32, n_heads=4, n_kv_heads=3)
    with pytest.raises(ConfigError, match=r"ArcSTConfig\.output_dim"):
        ArcSTConfig(input_dim=4, output_dim=8, pert_dim=2, output_space="all")
    c = ArcSTConfig(input_dim=4, output_dim=4, pert_dim=2, hidden=32, n_heads=4)
    assert (c.n_kv_heads, c.head_dim, c.mlp_hidden) == (4, 8, 128)


def test_arc_state_dict_refuses_a_nonzero_dead_table():
    sd, _, _ = _ckpt("st_gpt2_hvg")
    bad = dict(sd)
    bad["transformer_backbone.wpe.weight"] = sd["transformer_backbone.wpe.weight"].clone()
    bad["transformer_backbone.wpe.weight"][3, 1] = 0.5
    with pytest.raises(ConfigError, match="transformer_backbone.wpe.weight"):
        arc_state_dict(bad)
    kept = arc_state_dict(sd)
    assert not set(kept) & set(DEAD_KEYS) and len(kept) == len(sd) - 2


@pytest.mark.parametrize("preset", ["state", "state-0.11"])
def test_published_sizes_have_arc_states_parameter_count(preset):
    """Both published ST sizes built as arc-state's architecture: parameters counted by hand from the
    facts (Llama blocks without biases, MLP encoders with biases, 1 or 4 layers; the dead token table
    excluded), for a 2,000-HVG, 1,000-perturbation run."""
    from celltwin.models.arc_transition import ArcStateTransition, ArcSTConfig
    from celltwin.models.presets import ST_PRESETS

    p = ST_PRESETS[preset]
    H, M, L, n_enc = p["hidden"], p["mlp_hidden"], p["n_layers"], p["encoder_layers"]
    D, P = 2000, 1001
    cfg = ArcSTConfig(input_dim=D, output_dim=D, pert_dim=P, hidden=H, n_layers=L, n_heads=p["n_heads"],
                      mlp_hidden=M, n_encoder_layers=n_enc, n_decoder_layers=n_enc, set_size=p["set_size"])
    model = ArcStateTransition(cfg)

    def mlp(d_in, d_out, n):
        dims = [d_in] + [H] * (n - 1) + [d_out]
        return sum(a * b + b for a, b in itertools.pairwise(dims))

    block = 4 * H * H + 3 * H * M + 2 * H  # q, k, v, o; gate, up, down; two RMSNorm weights
    expected = mlp(D, H, n_enc) + mlp(P, H, n_enc) + L * block + H + mlp(H, D, n_enc)
    assert sum(t.numel() for t in model.parameters()) == expected
    assert expected == {"state": 69_867_176, "state-0.11": 79_354_832}[preset]  # worked by hand
