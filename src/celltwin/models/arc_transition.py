"""Arc Institute's State Transition model (arc-state 0.11.1), re-implemented clean-room.

Written only from observed behaviour: the facts in ``shared/reference/state-facts.md`` and the
files arc-state wrote as a black box (``tests/data/state_golden``: ``README.md``, ``FORMATS.md``,
``manifest.json`` and the recorded tensors, incl. per-module outputs ``call0.module.*``). Every
rule below was fitted to those records (max abs error <= 4e-7 fp32 CPU, ``tests/models/
test_arc_transition.py``) unless marked *unverified*. Shapes: ``B`` sets, ``S`` cells per set,
``H`` hidden, ``D_in``/``D_out`` input/output features, ``P`` perturbation one-hot width::

    basal = basal_encoder(ctrl)             (B, S, H)  MLP: n_encoder_layers Linear, GELU+Dropout between
                                                       (a single Linear when use_basal_projection=False)
    x = basal + pert_encoder(pert_onehot)   (B, S, H)  per-cell one-hot (multi-hot sum for combinations)
        (+ batch_encoder(batch))                       nn.Embedding(batch_dim, H), per cell
    [x ; confidence_token]                  (B, S+1, H) the learned token is appended LAST (confidence_token)
    h = backbone(x)                         (B, S(+1), H) incl. the final norm (HF last_hidden_state)
    output_space gene / embedding:  y = project_out(h + basal)           (residual in hidden space)
    output_space all:               y = final_down_then_up(project_out(h) + ctrl)  (residual on raw input,
                                        then Linear(D, D//8), GELU, Linear(D//8, D), no skip around it)
    relu_output:                    y = relu(y)
    confidence = confidence_head(h[:, -1])  (B, 1)

Numerical choices found in the records:

* Llama backbone: bidirectional (no mask; a causal mask does not fit), no rotary ("NoRoPE"),
  pre-norm RMSNorm ``w * x / sqrt(mean(x^2) + 1e-6)`` in fp32 (``celltwin.nn.RMSNorm``; the
  ``layer_norm_eps`` key in the configs is not a Llama field, Llama's default 1e-6 fits), q/k/v/o
  without bias, grouped-query attention (kv head j serves query heads j*r..j*r+r-1), scale
  1/sqrt(head_dim), SwiGLU ``down(silu(gate(x)) * up(x))``, final RMSNorm. ``embed_tokens`` is all
  zero and unused: dropped.
* GPT-2 backbone: **causal** attention. The facts file and arc's class name say bidirectional,
  but with transformers 4.57.6 the recorded block outputs fit a causal mask to 2e-7 and miss a
  bidirectional one by 2e-3, so cell i sees cells 0..i of its set (the output depends on cell
  order). Pre-norm LayerNorm (eps ``layer_norm_epsilon``, default 1e-5), Conv1D ``x @ W + b``
  (W is [in, out]), MLP ``c_fc -> gelu_new (tanh approximation; the HF default, the config names
  none; erf-GELU fits the records about as well because the pre-activations are small) -> c_proj``,
  final ``ln_f``. ``wte``/``wpe`` are all zero (position embeddings add 0): dropped.
* Encoder MLPs and ``project_out``: ``Linear(in, H), GELU(erf), Dropout, ..., Linear(H, out)``.
* ReLU rule (facts file; records: a ``relu`` module ran for X_hvg / no-embed-key input and not for
  the X_state input): ReLU when the input is expression (``embed_key`` None or ``X_hvg``) or when
  there is no gene decoder (output_space embedding; that case is from the facts file only, no
  golden variant has it). ``tx infer`` further clips to [0, 14]; that is not part of the model.
* Gene decoder (``LatentToGeneDecoder``): ``[Linear, LayerNorm(eps 1e-5), GELU, Dropout] x len(hidden)
  -> Linear -> ReLU``. Built for output_space gene / all; for embedding input its output is the
  gene-space prediction (``decode_genes``; ``tx infer`` writes it to X).
* Padding: ``padded=True`` reshapes N rows into N/set_size sets of consecutive rows; each set is
  attended to independently (set 0 of a padded call equals the unpadded call, records <= 4e-7).
* Confidence head, *unverified*: every recorded confidence is 0. The structure is from the
  checkpoint keys (Linear H->H/2, LayerNorm, Linear ->H/4, LayerNorm, Linear ->1, at the gene
  decoder's indices 0/1/4/5/8); GELU between, a final ReLU (needed for the recorded 0s: the
  pre-ReLU value is negative under every plausible reading) and reading the token's normed output
  are assumptions. Its training loss (MSE to 10x the set loss, weight 0.01) is not implemented.
* Not covered by the records and refused by :meth:`ArcSTConfig.from_arc_hparams`: predict_residual
  False, residual_decoder, LoRA, the batch token, mask_attn, a transformer decoder, a causal/RoPE
  Llama. A model with a batch encoder needs batch indices (there is no "unknown batch").
"""

from __future__ import annotations

import itertools
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from celltwin.errors import ConfigError, InputError
from celltwin.losses import LOSSES
from celltwin.nn import RMSNorm

__all__ = ["DEAD_KEYS", "ArcSTConfig", "ArcStateTransition", "arc_state_dict"]

# all-zero, unused HF token / position tables arc-state keeps in its state_dict
DEAD_KEYS = ("transformer_backbone.embed_tokens.weight", "transformer_backbone.wte.weight",
             "transformer_backbone.wpe.weight")
_BACKBONES = ("llama", "gpt2")
_OUTPUT_SPACES = ("gene", "all", "embedding")
_GPT2_ACT = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


def _err(field_: str, expected: str, actual: Any) -> ConfigError:
    return ConfigError(f"ArcSTConfig.{field_}: expected {expected}, got {actual!r}")


@dataclass
class ArcSTConfig:
    """Sizes and switches of :class:`ArcStateTransition` (validated; 0 = derived, see comments)."""

    input_dim: int  # D_in
    output_dim: int  # D_out
    pert_dim: int  # P: one-hot width (perturbation vocabulary incl. the control)
    hidden: int = 328  # H
    backbone: str = "llama"  # llama | gpt2
    n_layers: int = 8
    n_heads: int = 8
    n_kv_heads: int = 0  # 0 = n_heads (grouped-query attention, llama only)
    head_dim: int = 0  # 0 = hidden // n_heads
    mlp_hidden: int = 0  # llama intermediate_size / gpt2 n_inner; 0 = 4 * hidden
    norm_eps: float = 1e-6  # rms_norm_eps (llama) / layer_norm_epsilon (gpt2)
    gpt2_activation: str = "gelu_new"  # gelu_new (tanh approximation) | gelu (erf)
    n_encoder_layers: int = 1
    n_decoder_layers: int = 1
    use_basal_projection: bool = True  # False: basal_encoder is a single nn.Linear
    predict_residual: bool = True
    output_space: str = "gene"  # gene | all | embedding (arc-state's output_space)
    relu_output: bool = True  # a final ReLU on the prediction
    final_down_then_up: bool = False  # bottleneck D_out -> D_out // 8 -> D_out after the residual
    batch_dim: int = 0  # > 0: batch_encoder = nn.Embedding(batch_dim, H), added per cell
    confidence_token: bool = False
    gene_dim: int = 0  # gene decoder output width (0 = no decoder)
    decoder_hidden_dims: list[int] = field(default_factory=lambda: [1024, 1024, 512])
    residual_decoder: bool = False  # not implemented (refused)
    decode_genes: bool = False  # the gene decoder's output is the prediction in gene space
    input_space: str = "expression"  # expression | embedding (what celltwin's predictor feeds)
    set_size: int = 512  # arc cell_set_len
    dropout: float = 0.1
    loss_weights: dict[str, float] = field(default_factory=lambda: {"energy": 1.0})
    blur: float = 0.05
    gene_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("input_dim", "output_dim", "pert_dim", "hidden", "n_layers", "n_heads", "set_size",
                     "n_encoder_layers", "n_decoder_layers"):
            if int(getattr(self, name)) < 1:
                raise _err(name, ">= 1", getattr(self, name))
        for name in ("n_kv_heads", "head_dim", "mlp_hidden", "batch_dim", "gene_dim"):
            if int(getattr(self, name)) < 0:
                raise _err(name, ">= 0", getattr(self, name))
        if self.backbone not in _BACKBONES:
            raise _err("backbone", f"one of {_BACKBONES}", self.backbone)
        if self.output_space not in _OUTPUT_SPACES:
            raise _err("output_space", f"one of {_OUTPUT_SPACES}", self.output_space)
        if self.input_space not in ("expression", "embedding"):
            raise _err("input_space", "'expression' or 'embedding'", self.input_space)
        self.n_kv_heads = self.n_kv_heads or self.n_heads
        self.head_dim = self.head_dim or self.hidden // self.n_heads
        self.mlp_hidden = self.mlp_hidden or 4 * self.hidden
        if self.n_heads % self.n_kv_heads:
            raise _err("n_kv_heads", f"a divisor of n_heads={self.n_heads}", self.n_kv_heads)
        if self.backbone == "gpt2":
            if self.n_heads * self.head_dim != self.hidden:
                raise _err("head_dim", f"hidden // n_heads = {self.hidden / self.n_heads} for gpt2", self.head_dim)
            if self.n_kv_heads != self.n_heads:
                raise _err("n_kv_heads", "n_heads (gpt2 has no grouped-query attention)", self.n_kv_heads)
            if self.gpt2_activation not in _GPT2_ACT:
                raise _err("gpt2_activation", f"one of {tuple(_GPT2_ACT)}", self.gpt2_activation)
        if self.output_space == "all" and self.predict_residual and self.input_dim != self.output_dim:
            raise _err("output_dim", f"input_dim={self.input_dim} (output_space 'all' adds the raw input)",
                       self.output_dim)
        if self.final_down_then_up and self.output_dim // 8 < 1:
            raise _err("output_dim", ">= 8 with final_down_then_up", self.output_dim)
        if self.residual_decoder:
            raise _err("residual_decoder", "False (arc's residual gene decoder is not implemented)", True)
        if self.decode_genes and not self.gene_dim:
            raise _err("gene_dim", ">= 1 with decode_genes", self.gene_dim)
        if self.confidence_token and self.hidden < 4:
            raise _err("hidden", ">= 4 with confidence_token", self.hidden)
        if not 0 <= self.dropout < 1:
            raise _err("dropout", "a value in [0, 1)", self.dropout)
        if not self.loss_weights or set(self.loss_weights) - set(LOSSES):
            raise _err("loss_weights", f"weights for some of {LOSSES}", self.loss_weights)
        self.decoder_hidden_dims = [int(d) for d in self.decoder_hidden_dims]
        self.loss_weights = {str(k): float(v) for k, v in self.loss_weights.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_arc_hparams(cls, hparams: dict[str, Any], var_dims: dict[str, Any] | None = None) -> ArcSTConfig:
        """Derive the config from a checkpoint's ``hyper_parameters`` (and ``var_dims.pkl``).

        Raises :class:`ConfigError` for options this re-implementation does not have.
        """
        hp, vd = dict(hparams), dict(var_dims or {})
        kw = dict(hp.get("transformer_backbone_kwargs") or {})
        refuse = {  # option -> (value that is fine, what it is)
            "lora": ({}, "LoRA adapters"), "use_batch_token": (False, "the batch token"),
            "mask_attn": (False, "attention masking"), "transformer_decoder": (False, "a transformer decoder"),
            "finetune_vci_decoder": (False, "the pretrained SE counts decoder"),
            "use_effect_gating_token": (False, "the effect-gating token"),
            "residual_decoder": (False, "the residual gene decoder"),
            "predict_residual": (True, "predict_residual=False (unverified)"),
        }
        for key, (ok, what) in refuse.items():
            val = hp.get(key, ok)
            if key == "lora":
                val = val if (val.get("enable") if isinstance(val, dict) else val) else {}
            if val != ok:
                raise ConfigError(f"arc-state hyper_parameters.{key}={val!r}: {what} is not supported by "
                                  f"celltwin's arc-state model (expected {ok!r})")
        key = str(hp.get("transformer_backbone_key", "GPT2")).lower()
        if key not in _BACKBONES:
            raise ConfigError(f"arc-state hyper_parameters.transformer_backbone_key: expected 'llama' or 'GPT2', "
                              f"got {hp.get('transformer_backbone_key')!r}")
        if key == "llama":
            if kw.get("bidirectional_attention") is not True or kw.get("use_rotary_embeddings"):
                raise ConfigError("arc-state llama backbone: only bidirectional_attention=true without rotary "
                                  f"embeddings is supported, got bidirectional_attention="
                                  f"{kw.get('bidirectional_attention')!r}, use_rotary_embeddings="
                                  f"{kw.get('use_rotary_embeddings')!r}")
            size = dict(n_layers=int(kw["num_hidden_layers"]), n_heads=int(kw["num_attention_heads"]),
                        n_kv_heads=int(kw.get("num_key_value_heads") or 0), head_dim=int(kw.get("head_dim") or 0),
                        mlp_hidden=int(kw["intermediate_size"]), norm_eps=float(kw.get("rms_norm_eps", 1e-6)))
            hsize = kw.get("hidden_size")
        else:
            size = dict(n_layers=int(kw["n_layer"]), n_heads=int(kw["n_head"]), mlp_hidden=int(kw.get("n_inner") or 0),
                        norm_eps=float(kw.get("layer_norm_epsilon", 1e-5)),
                        gpt2_activation=str(kw.get("activation_function", "gelu_new")))
            hsize = kw.get("n_embd", kw.get("hidden_size"))
        H = int(hp["hidden_dim"])
        if hsize is not None and int(hsize) != H:
            raise ConfigError(f"arc-state hyper_parameters: hidden_dim={H} but the backbone's hidden size is {hsize}")
        for k in ("input_dim", "output_dim", "pert_dim"):
            if k in vd and int(vd[k]) != int(hp[k]):
                raise ConfigError(f"arc-state var_dims.{k}={vd[k]} disagrees with hyper_parameters.{k}={hp[k]}")
        out_space = hp.get("output_space", "gene")
        embed_key = hp.get("embed_key")
        expression = embed_key in (None, "X_hvg")
        dec = hp.get("decoder_cfg") or {}
        gene_dim = int(dec.get("gene_dim", 0)) if dec and out_space in ("gene", "all") else 0
        loss = hp.get("loss", "energy")
        weights = {"energy": {"energy": 1.0}, "sinkhorn": {"sinkhorn": 1.0}, "mse": {"mse": 1.0},
                   "se": {"sinkhorn": float(hp.get("sinkhorn_weight", 0.01)),
                          "energy": float(hp.get("energy_weight", 1.0))}}.get(loss)
        if weights is None:
            raise ConfigError(f"arc-state hyper_parameters.loss={loss!r}: expected energy, sinkhorn, se or mse")
        return cls(
            input_dim=int(hp["input_dim"]), output_dim=int(hp["output_dim"]), pert_dim=int(hp["pert_dim"]),
            hidden=H, backbone=key, **size,
            n_encoder_layers=int(hp.get("n_encoder_layers", 1)), n_decoder_layers=int(hp.get("n_decoder_layers", 1)),
            use_basal_projection=bool(hp.get("use_basal_projection", True)), predict_residual=True,
            output_space=out_space, relu_output=expression or not gene_dim,
            final_down_then_up=out_space == "all",
            batch_dim=int(hp.get("batch_dim") or 0) if hp.get("batch_encoder") else 0,
            confidence_token=bool(hp.get("confidence_token", False)), gene_dim=gene_dim,
            decoder_hidden_dims=list(dec.get("hidden_dims") or hp.get("decoder_hidden_dims") or [1024, 1024, 512]),
            decode_genes=bool(gene_dim) and not expression,
            input_space="expression" if expression else "embedding", set_size=int(hp.get("cell_set_len", 512)),
            dropout=float(hp.get("dropout", 0.1)), loss_weights=weights, blur=float(hp.get("blur", 0.05)),
            gene_loss_weight=float(hp.get("decoder_weight", 1.0)))


def arc_state_dict(ckpt_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """arc-state's state_dict without the dead token/position tables (refused if one is not all zero)."""
    for k in DEAD_KEYS:
        if k in ckpt_state_dict and bool(ckpt_state_dict[k].any()):
            raise ConfigError(f"arc-state checkpoint: {k} is expected to be all zero (an unused table), "
                              "but it has non-zero values")
    return {k: v for k, v in ckpt_state_dict.items() if k not in DEAD_KEYS}


def _mlp(d_in: int, d_hidden: int, d_out: int, n_layers: int, dropout: float) -> nn.Sequential:
    """``Linear(d_in, H), GELU, Dropout, ..., Linear(H, d_out)`` (keys 0, 3, 6, ...)."""
    dims = [d_in] + [d_hidden] * (n_layers - 1) + [d_out]
    layers: list[nn.Module] = []
    for i in range(n_layers):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < n_layers - 1:
            layers += [nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


def _ln_mlp(dims: list[int], dropout: float) -> nn.Sequential:
    """``[Linear, LayerNorm, GELU, Dropout]`` per hidden layer, then ``Linear, ReLU`` (keys 0, 1, 4, 5, ...)."""
    layers: list[nn.Module] = []
    for a, b in itertools.pairwise(dims[:-1]):
        layers += [nn.Linear(a, b), nn.LayerNorm(b), nn.GELU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers, nn.Linear(dims[-2], dims[-1]), nn.ReLU())


class GeneDecoder(nn.Module):
    """arc's ``LatentToGeneDecoder``: (..., D_out) -> (..., G), non-negative."""

    def __init__(self, d_in: int, hidden_dims: list[int], gene_dim: int, dropout: float) -> None:
        super().__init__()
        self.decoder = _ln_mlp([d_in, *hidden_dims, gene_dim], dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(x)


class ConfidenceToken(nn.Module):
    """A learned token appended to each set; its output -> a non-negative per-set score (unverified head)."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        self.confidence_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.confidence_projection = _ln_mlp([dim, dim // 2, dim // 4, 1], dropout)

    def forward(self, h_token: torch.Tensor) -> torch.Tensor:  # (B, H) -> (B, 1)
        return self.confidence_projection(h_token)


class LlamaAttention(nn.Module):
    """Bidirectional grouped-query attention, no bias, no rotary."""

    def __init__(self, c: ArcSTConfig) -> None:
        super().__init__()
        self.nh, self.nkv, self.hd = c.n_heads, c.n_kv_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden, c.n_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden, c.n_kv_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden, c.n_kv_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.n_heads * c.head_dim, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, _ = x.shape
        q = self.q_proj(x).view(B, S, self.nh, self.hd).transpose(1, 2)  # (B, nh, S, hd)
        k = self.k_proj(x).view(B, S, self.nkv, self.hd).transpose(1, 2)  # (B, nkv, S, hd)
        v = self.v_proj(x).view(B, S, self.nkv, self.hd).transpose(1, 2)
        r = self.nh // self.nkv
        k, v = k.repeat_interleave(r, dim=1), v.repeat_interleave(r, dim=1)  # (B, nh, S, hd)
        y = F.scaled_dot_product_attention(q, k, v)  # scale 1/sqrt(hd), no mask
        return self.o_proj(y.transpose(1, 2).reshape(B, S, self.nh * self.hd))


class LlamaMLP(nn.Module):
    def __init__(self, c: ArcSTConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(c.hidden, c.mlp_hidden, bias=False)
        self.up_proj = nn.Linear(c.hidden, c.mlp_hidden, bias=False)
        self.down_proj = nn.Linear(c.mlp_hidden, c.hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaLayer(nn.Module):
    def __init__(self, c: ArcSTConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, c.norm_eps)
        self.self_attn = LlamaAttention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden, c.norm_eps)
        self.mlp = LlamaMLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, H)
        x = x + self.self_attn(self.input_layernorm(x))
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, c: ArcSTConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LlamaLayer(c) for _ in range(c.n_layers))
        self.norm = RMSNorm(c.hidden, c.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


class Conv1D(nn.Module):
    """HF GPT-2's linear layer: ``x @ weight + bias`` with weight [in, out]."""

    def __init__(self, d_in: int, d_out: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_in, d_out) * 0.02)
        self.bias = nn.Parameter(torch.zeros(d_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class GPT2Attention(nn.Module):
    def __init__(self, c: ArcSTConfig) -> None:
        super().__init__()
        self.nh = c.n_heads
        self.c_attn = Conv1D(c.hidden, 3 * c.hidden)
        self.c_proj = Conv1D(c.hidden, c.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, S, H = x.shape
        q, k, v = (t.view(B, S, self.nh, H // self.nh).transpose(1, 2) for t in self.c_attn(x).split(H, dim=-1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, S, hd); causal: see docstring
        return self.c_proj(y.transpose(1, 2).reshape(B, S, H))


class GPT2MLP(nn.Module):
    def __init__(self, c: ArcSTConfig) -> None:
        super().__init__()
        self.c_fc = Conv1D(c.hidden, c.mlp_hidden)
        self.c_proj = Conv1D(c.mlp_hidden, c.hidden)
        self.act = _GPT2_ACT[c.gpt2_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, c: ArcSTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(c.hidden, eps=c.norm_eps)
        self.attn = GPT2Attention(c)
        self.ln_2 = nn.LayerNorm(c.hidden, eps=c.norm_eps)
        self.mlp = GPT2MLP(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, H)
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Backbone(nn.Module):
    def __init__(self, c: ArcSTConfig) -> None:
        super().__init__()
        self.h = nn.ModuleList(GPT2Block(c) for _ in range(c.n_layers))
        self.ln_f = nn.LayerNorm(c.hidden, eps=c.norm_eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.h:
            x = block(x)
        return self.ln_f(x)


class ArcStateTransition(nn.Module):
    """arc-state's ST model (see the module docstring); state_dict keys are arc-state's minus :data:`DEAD_KEYS`."""

    arch = "arc-state"

    def __init__(self, config: ArcSTConfig, vocab: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        c = self.config = config
        H = c.hidden
        self.vocab = dict(vocab or {})
        self.pert_table = None  # arc has no gene-embedding table and no context token
        self.context_emb = None
        self.pert_encoder = _mlp(c.pert_dim, H, H, c.n_encoder_layers, c.dropout)
        self.basal_encoder = (_mlp(c.input_dim, H, H, c.n_encoder_layers, c.dropout) if c.use_basal_projection
                              else nn.Linear(c.input_dim, H))
        self.transformer_backbone = LlamaBackbone(c) if c.backbone == "llama" else GPT2Backbone(c)
        self.project_out = _mlp(H, H, c.output_dim, c.n_decoder_layers, c.dropout)
        self.final_down_then_up = (nn.Sequential(nn.Linear(c.output_dim, c.output_dim // 8), nn.GELU(),
                                                 nn.Linear(c.output_dim // 8, c.output_dim))
                                   if c.final_down_then_up else None)
        self.batch_encoder = nn.Embedding(c.batch_dim, H) if c.batch_dim else None
        self.confidence_token = ConfidenceToken(H, c.dropout) if c.confidence_token else None
        self.gene_decoder = (GeneDecoder(c.output_dim, c.decoder_hidden_dims, c.gene_dim, c.dropout)
                             if c.gene_dim else None)

    def _forward_sets(self, ctrl: torch.Tensor, pert: torch.Tensor,
                      batch: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """ctrl (B, S, D_in), pert (B, S, P) float, batch (B, S) long -> pred (B, S, D_out), conf (B, 1)."""
        c = self.config
        basal = self.basal_encoder(ctrl)  # (B, S, H)
        x = basal + self.pert_encoder(pert)  # (B, S, H)
        if self.batch_encoder is not None:
            if batch is None:
                raise InputError(f"arc-state model: batch indices are required (the model has a batch encoder "
                                 f"over {c.batch_dim} batches)")
            x = x + self.batch_encoder(batch.long())
        S = x.shape[1]
        if self.confidence_token is not None:
            x = torch.cat([x, self.confidence_token.confidence_token.expand(x.shape[0], -1, -1)], dim=1)
        h = self.transformer_backbone(x)  # (B, S(+1), H)
        conf = self.confidence_token(h[:, S]) if self.confidence_token is not None else None  # (B, 1)
        h = h[:, :S]
        # output_space all: residual on the raw input; gene / embedding: residual in hidden space
        y = self.project_out(h) + ctrl if c.output_space == "all" else self.project_out(h + basal)  # (B, S, D_out)
        if self.final_down_then_up is not None:
            y = self.final_down_then_up(y)
        if c.relu_output:
            y = F.relu(y)
        return y, conf

    def forward_arc(self, ctrl_cell_emb: torch.Tensor, pert_emb: torch.Tensor, batch: torch.Tensor | None = None,
                    padded: bool = True) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """arc-state's ``forward(batch_dict, padded)``: rows [N, ...] -> pred [N, D_out] (, confidence [B, 1]).

        ``padded=True``: N = B * set_size consecutive rows per set; ``padded=False``: one set of N cells.
        """
        c = self.config
        N = ctrl_cell_emb.shape[0]
        if ctrl_cell_emb.ndim != 2 or ctrl_cell_emb.shape[1] != c.input_dim or pert_emb.shape != (N, c.pert_dim):
            raise InputError(f"arc-state forward: expected ctrl_cell_emb [N, {c.input_dim}] and pert_emb "
                             f"[N, {c.pert_dim}], got {tuple(ctrl_cell_emb.shape)} and {tuple(pert_emb.shape)}")
        S = c.set_size if padded else N
        if N % S:
            raise InputError(f"arc-state forward(padded=True): {N} rows is not a multiple of set_size {S}")
        B = N // S
        y, conf = self._forward_sets(ctrl_cell_emb.reshape(B, S, -1), pert_emb.to(ctrl_cell_emb.dtype).reshape(B, S, -1),
                                     None if batch is None else batch.reshape(B, S))
        y = y.reshape(N, -1)
        return (y, conf) if conf is not None else y

    def perturbation_onehot(self, pert_idx: torch.Tensor) -> torch.Tensor:  # (B,) or (B, K) -> (B, P)
        """One-hot (B,) or multi-hot (B, K; -1 = padding) rows over the arc perturbation map."""
        P = self.config.pert_dim
        idx = pert_idx if pert_idx.ndim == 2 else pert_idx[:, None]  # (B, K)
        if bool((idx >= P).any()) or bool((idx < -1).any()):
            raise InputError(f"arc-state model: perturbation indices must be in [0, {P}) (-1 = padding), "
                             f"got {idx.min().item()}..{idx.max().item()}")
        valid = (idx >= 0).float()[..., None]  # (B, K, 1)
        return (F.one_hot(idx.clamp_min(0), P).float() * valid).sum(1)  # (B, P)

    def forward(self, ctrl: torch.Tensor, pert_idx: torch.Tensor, context_idx: torch.Tensor | None = None,
                ctrl_genes: torch.Tensor | None = None, batch_idx: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """celltwin interface: ctrl (B, S, D_in) -> ``{"pred": (B, S, D_out)}`` (+ ``"genes"`` (B, S, G) when
        ``decode_genes``, + ``"confidence"`` (B, 1)). ``context_idx`` and ``ctrl_genes`` are ignored;
        ``batch_idx`` (B, S) is required when the model has a batch encoder."""
        if ctrl.ndim != 3 or ctrl.shape[-1] != self.config.input_dim:
            raise InputError(f"arc-state input: expected (B, S, {self.config.input_dim}), got {tuple(ctrl.shape)}")
        B, S, _ = ctrl.shape
        pert = self.perturbation_onehot(pert_idx).to(ctrl.dtype)[:, None, :].expand(B, S, -1)  # (B, S, P)
        y, conf = self._forward_sets(ctrl, pert, batch_idx)
        out = {"pred": y}
        if self.config.decode_genes:
            out["genes"] = self.gene_decoder(y)  # (B, S, G)
        if conf is not None:
            out["confidence"] = conf
        return out

    def loss(self, out: dict[str, torch.Tensor], target: torch.Tensor,
             target_genes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named loss parts: set loss on ``pred`` vs ``target`` (B, S', D_out) (+ ``genes_*`` on decoded genes)."""
        from celltwin.models.state_transition import st_loss

        return st_loss(self.config, out, target, target_genes)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors``, ``config.json`` (``"arch": "arc-state"`` + the config) and ``vocab.json``."""
        from celltwin.models.state_transition import save_st_dir

        save_st_dir(self, directory, {"arch": self.arch, **self.config.to_dict()}, "celltwin.ArcStateTransition")

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> ArcStateTransition:
        """Load a model written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        d = Path(directory)
        for name in ("model.safetensors", "config.json", "vocab.json"):
            if not (d / name).exists():
                raise InputError(f"arc-state model directory {d}: {name} not found")
        raw = json.loads((d / "config.json").read_text())
        if raw.pop("arch", None) != cls.arch:
            raise InputError(f"arc-state model directory {d}: config.json is not an {cls.arch!r} model")
        model = cls(ArcSTConfig(**raw), vocab=json.loads((d / "vocab.json").read_text()))
        model.load_state_dict(load_file(str(d / "model.safetensors"), device=map_location))
        return model
