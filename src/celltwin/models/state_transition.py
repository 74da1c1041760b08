"""The State Transition model (ST): a set of control cells + a perturbation -> the perturbed set.

Architecture (one file, nanoGPT-like; shapes in comments)::

    ctrl (B, S, D) --basal MLP (4 x Linear, GELU)--> (B, S, H)
    pert (B,) index --one-hot (B, P) or gene-embedding row (B, E)--> pert MLP (4 x) --> (B, 1, H)  [added]
    (combinations A+B: (B, K) member indices, multi-hot / summed rows)
    context (B,) index --> Embedding --> (B, 1, H)                                                 [added]
    tokens (B, S, H) --Llama encoder: n_layers x [RMSNorm, bidirectional SDPA attention, RMSNorm, SwiGLU]--> (B, S, H)
    --> output head Linear --> delta (B, S, D)
    expression input:  out = softplus(softplus^-1(max(ctrl, 1e-3)) + delta)   (residual on the basal input)
    embedding input:   out = ctrl + delta
    output_space="all" (HVG or embedding in, G genes out):
                       genes = gene decoder MLP(out) -> softplus -> (B, S, G)
                       with ctrl_genes (B, S, G) and decoder_residual (default):
                       genes = softplus(softplus^-1(max(ctrl_genes, 1e-3)) + dec(out) - dec(ctrl))

No positional encoding: the set is unordered and the model is permutation equivariant over
the S axis (permuting the input cells permutes the output cells the same way; tested).
``D`` is the input space: expression (genes in log1p space, ``input_space="expression"``) or
a cell embedding such as SE's (``input_space="embedding"``; then a learned decoder maps
outputs to ``n_genes`` genes). Perturbations are one-hot over a vocabulary, or rows of a
fixed gene-embedding table (``pert_table``), so a perturbation unseen in training is
reachable when its gene has an embedding.

The residual in expression space is added before the softplus (its inverse applied to the
basal input, which is clamped at 1e-3 so zeros stay finite): ``delta = 0`` reproduces the
control cell (zeros become 1e-3), and the output is always positive. Training loss: the
energy distance between the predicted and the observed perturbed sets (``celltwin.losses``);
other set losses via ``loss_weights``. ``blur`` (0.05) matters only to the Sinkhorn loss.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from celltwin._io import atomic_path
from celltwin.data.preprocess import sample_counts
from celltwin.errors import ConfigError, InputError
from celltwin.losses import LOSSES, set_loss
from celltwin.models.presets import ST_PRESETS, from_preset
from celltwin.nn import MLP, LlamaEncoder

__all__ = ["PRESETS", "STConfig", "StateTransition", "inverse_softplus", "sample_counts", "save_st_dir", "st_loss"]

_INPUT_SPACES = ("expression", "embedding")
_OUTPUT_SPACES = ("gene", "all", "embedding")
_BASAL_FLOOR = 1e-3


@dataclass
class STConfig:
    """Configuration of :class:`StateTransition` (validated once in ``__post_init__``)."""

    # --- data-dependent sizes
    input_dim: int = 0  # D: genes (expression) or embedding width
    n_perts: int = 1  # P: perturbation vocabulary size (one-hot), or rows of pert_table
    pert_emb_dim: int = 0  # E > 0: perturbations are rows of a fixed (P, E) gene-embedding table
    n_contexts: int = 0  # context vocabulary (+1 for "unknown" = index 0); 0 = no context token
    input_space: str = "expression"  # expression | embedding
    # what the model predicts (arc-state's output_space): "gene" = the input genes (expression input),
    # "all" = n_genes genes through a decoder from the input space (HVG or embedding in, every gene out),
    # "embedding" = the input embedding only (no decoder). "" = derived: expression -> gene,
    # embedding -> all when n_genes > 0, else embedding.
    output_space: str = ""
    n_genes: int = 0  # G of the gene decoder (output_space="all"); 0 = no decoder
    # --- architecture (defaults: the published ST configuration)
    hidden: int = 696  # H
    n_layers: int = 8
    n_heads: int = 12  # head dim H / n_heads = 58
    mlp_hidden: int = 2784  # SwiGLU inner size
    norm_eps: float = 1e-6
    set_size: int = 512  # S cells per set during training
    encoder_layers: int = 4  # Linear layers in the basal and perturbation MLPs
    decoder_layers: int = 2  # Linear layers in the gene decoder (embedding input)
    dropout: float = 0.0
    predict_residual: bool = True
    # embedding input: decode genes as the basal cell's genes + (dec(predicted) - dec(basal embedding))
    # (in softplus space, as the expression residual) when the basal genes are given; else dec(predicted)
    decoder_residual: bool = True
    # --- loss
    loss_weights: dict[str, float] = field(default_factory=lambda: {"energy": 1.0})
    blur: float = 0.05  # Sinkhorn blur (unused by the energy kernel)
    gene_loss_weight: float = 1.0  # weight of the decoded-genes loss (embedding input)

    def __post_init__(self) -> None:
        if self.input_space not in _INPUT_SPACES:
            raise ConfigError(f"STConfig.input_space must be one of {_INPUT_SPACES}, got {self.input_space!r}")
        for name in ("input_dim", "n_perts", "hidden", "n_layers", "n_heads", "mlp_hidden", "set_size",
                     "encoder_layers", "decoder_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"STConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("pert_emb_dim", "n_contexts", "n_genes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"STConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.hidden % self.n_heads:
            raise ConfigError(f"STConfig.hidden ({self.hidden}) must be divisible by n_heads ({self.n_heads})")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"STConfig.dropout must be in [0, 1), got {self.dropout}")
        bad = sorted(set(self.loss_weights) - set(LOSSES))
        if bad or not self.loss_weights or any(w < 0 for w in self.loss_weights.values()):
            raise ConfigError(f"STConfig.loss_weights: expected non-negative weights for {LOSSES}, "
                              f"got {self.loss_weights}")
        if not self.output_space:
            if self.input_space == "expression":
                self.output_space = "all" if self.n_genes not in (0, self.input_dim) else "gene"
            else:
                self.output_space = "all" if self.n_genes else "embedding"
        if self.output_space not in _OUTPUT_SPACES:
            raise ConfigError(f"STConfig.output_space must be one of {_OUTPUT_SPACES}, got {self.output_space!r}")
        if self.output_space == "gene" and self.input_space != "expression":
            raise ConfigError("STConfig.output_space='gene' needs expression input (use 'all' or 'embedding')")
        if self.output_space == "embedding" and self.input_space != "embedding":
            raise ConfigError("STConfig.output_space='embedding' needs embedding input")
        if self.output_space == "all" and self.n_genes < 1:
            raise ConfigError(f"STConfig.output_space='all' needs n_genes >= 1, got {self.n_genes}")
        if self.output_space == "gene":
            self.n_genes = 0
        self.loss_weights = {str(k): float(v) for k, v in self.loss_weights.items()}

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> STConfig:
        """A preset (:data:`PRESETS`) with data-dependent sizes and other fields overridden."""
        return from_preset("ST", PRESETS, cls, name, overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


PRESETS = ST_PRESETS  # tiny | small | state (celltwin.models.presets)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """``softplus^-1(y) = y + log(-expm1(-y))`` for ``y > 0`` (stable for small and large y)."""
    return y + torch.log(-torch.expm1(-y))


def st_loss(c: Any, out: dict[str, torch.Tensor], target: torch.Tensor,
            target_genes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The ST training loss of a config with ``loss_weights``, ``blur`` and ``gene_loss_weight``: the set
    loss on ``out["pred"]`` vs ``target`` plus ``gene_loss_weight`` x the set loss on ``out["genes"]``
    (parts named ``genes_*``) when both are there. Shared by celltwin's and arc-state's architectures."""
    parts = set_loss(out["pred"], target, c.loss_weights, blur=c.blur)
    if "genes" in out and target_genes is not None and c.gene_loss_weight > 0:
        g = set_loss(out["genes"], target_genes, c.loss_weights, blur=c.blur)
        parts = {**parts, **{f"genes_{k}": v for k, v in g.items() if k != "loss"}}
        parts["loss"] = parts["loss"] + c.gene_loss_weight * g["loss"]
    return parts


def save_st_dir(module: nn.Module, directory: str | Path, config: dict[str, Any], name: str) -> None:
    """``model.safetensors`` (the state_dict), ``config.json`` (``config``) and ``vocab.json``
    (``module.vocab``), each written atomically: the files of an ST module directory."""
    from safetensors.torch import save_file

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
    with atomic_path(d / "model.safetensors") as tmp:
        save_file(tensors, str(tmp), metadata={"format": "pt", "model": name})
    with atomic_path(d / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2) + "\n")
    with atomic_path(d / "vocab.json") as tmp:
        tmp.write_text(json.dumps(module.vocab) + "\n")


class StateTransition(nn.Module):
    """The ST model (see the module docstring).

    ``pert_table``: (P, E) float gene embeddings when ``config.pert_emb_dim > 0`` (a buffer,
    saved with the weights). ``vocab``: free-form lists saved by :meth:`save_pretrained`
    (``genes``, ``perturbations``, ``contexts``, ...).
    """

    def __init__(self, config: STConfig, pert_table: torch.Tensor | None = None,
                 vocab: dict[str, list[str]] | None = None) -> None:
        super().__init__()
        c = self.config = config
        H = c.hidden
        self.vocab = dict(vocab or {})
        self.basal_encoder = MLP(c.input_dim, H, H, c.encoder_layers, c.dropout)
        if c.pert_emb_dim > 0:
            if pert_table is None or tuple(pert_table.shape) != (c.n_perts, c.pert_emb_dim):
                got = None if pert_table is None else tuple(pert_table.shape)
                raise ConfigError(f"pert_table: expected shape {(c.n_perts, c.pert_emb_dim)}, got {got}")
            self.register_buffer("pert_table", pert_table.detach().float().clone())
            pert_in = c.pert_emb_dim
        else:
            self.pert_table = None
            pert_in = c.n_perts
        self.pert_encoder = MLP(pert_in, H, H, c.encoder_layers, c.dropout)
        self.context_emb = nn.Embedding(c.n_contexts + 1, H) if c.n_contexts else None
        self.transformer = LlamaEncoder(H, c.n_layers, c.n_heads, c.mlp_hidden, c.norm_eps, c.dropout)
        self.head = nn.Linear(H, c.input_dim)
        self.gene_decoder = (MLP(c.input_dim, H, c.n_genes, c.decoder_layers, c.dropout)
                             if c.output_space == "all" else None)
        self.transformer.apply(self._init)
        for mlp in (self.basal_encoder, self.pert_encoder, self.gene_decoder):
            if mlp is not None:
                mlp.apply(self._init_mlp)
        if self.pert_table is None:
            # one-hot input: the first layer is a lookup table; unit-scale rows like an Embedding
            nn.init.normal_(self.pert_encoder.net[0].weight, std=1.0)
        if self.context_emb is not None:
            nn.init.normal_(self.context_emb.weight, std=1.0)
        # start at the identity map: zero output head -> delta = 0 -> prediction = basal input
        nn.init.zeros_(self.head.weight)
        nn.init.zeros_(self.head.bias)

    @staticmethod
    def _init(m: nn.Module) -> None:
        """Transformer linears: N(0, 0.02) (GPT/Llama convention), no biases."""
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=0.02)

    @staticmethod
    def _init_mlp(m: nn.Module) -> None:
        """Encoder/decoder MLPs: He-normal (std sqrt(2 / fan_in)), zero bias, so the activation
        scale survives 4 GELU layers (a 0.02 init shrinks it ~10x per layer)."""
        if isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def encode_perturbation(self, pert_idx: torch.Tensor) -> torch.Tensor:  # (B,) or (B, K) -> (B, H)
        """Encode single perturbations (B,) or combinations (B, K) padded with -1.

        A combination's input is the sum of its members' inputs (multi-hot, or the sum of their
        gene-embedding rows), so an unseen combination of seen genes is reachable.
        """
        idx = pert_idx if pert_idx.ndim == 2 else pert_idx[:, None]  # (B, K)
        valid = (idx >= 0).to(self.head.weight.dtype)[..., None]  # (B, K, 1)
        safe = idx.clamp_min(0)
        if self.pert_table is not None:
            x = (self.pert_table[safe] * valid).sum(1)  # (B, E)
        else:
            x = (F.one_hot(safe, self.config.n_perts).to(valid.dtype) * valid).sum(1)  # (B, P)
        return self.pert_encoder(x)

    def forward(
        self,
        ctrl: torch.Tensor,  # (B, S, D) control cells
        pert_idx: torch.Tensor,  # (B,) perturbation index, or (B, K) members of combinations (-1 = pad)
        context_idx: torch.Tensor | None = None,  # (B,) 0 = unknown
        ctrl_genes: torch.Tensor | None = None,  # (B, S, G) basal cells in gene space (embedding input)
    ) -> dict[str, torch.Tensor]:
        """``{"pred": (B, S, D)}`` plus ``"genes": (B, S, G)`` when a gene decoder exists."""
        if ctrl.ndim != 3 or ctrl.shape[-1] != self.config.input_dim:
            raise InputError(f"ST input: expected (B, S, {self.config.input_dim}), got {tuple(ctrl.shape)}")
        x = self.basal_encoder(ctrl)  # (B, S, H)
        x = x + self.encode_perturbation(pert_idx)[:, None, :]  # (B, S, H)
        if self.context_emb is not None and context_idx is not None:
            x = x + self.context_emb(context_idx)[:, None, :]
        h = self.transformer(x)  # (B, S, H)
        delta = self.head(h)  # (B, S, D)
        if self.config.input_space == "expression":
            base = inverse_softplus(ctrl.float().clamp_min(_BASAL_FLOOR)) if self.config.predict_residual else 0.0
            out = {"pred": F.softplus(base + delta.float())}  # (B, S, D) > 0
        else:
            out = {"pred": (ctrl + delta) if self.config.predict_residual else delta}
        if self.gene_decoder is not None:
            dec = self.gene_decoder(out["pred"]).float()  # (B, S, G)
            if self.config.decoder_residual and ctrl_genes is not None:
                # the decoder carries the perturbation's shift; the basal cell keeps its own genes
                base_g = inverse_softplus(ctrl_genes.float().clamp_min(_BASAL_FLOOR))
                dec = base_g + dec - self.gene_decoder(ctrl).float()
            out["genes"] = F.softplus(dec)  # (B, S, G) > 0
        return out

    def loss(self, out: dict[str, torch.Tensor], target: torch.Tensor,
             target_genes: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Named loss parts: set loss on ``pred`` vs ``target`` (B, S', D) (+ ``genes_*`` on decoded genes)."""
        return st_loss(self.config, out, target, target_genes)

    # ------------------------------------------------------------------ persistence
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``model.safetensors``, ``config.json`` and ``vocab.json`` (each atomically)."""
        save_st_dir(self, directory, self.config.to_dict(), "celltwin.StateTransition")

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str = "cpu") -> StateTransition:
        """Load a model written by :meth:`save_pretrained`.

        Also accepted (returning arc-state's architecture,
        :class:`~celltwin.models.arc_transition.ArcStateTransition`, when that is what the files hold):
        a celltwin run directory (its ``state/``), a ``celltwin import-state`` directory, an arc-state
        ST run directory, a Hugging Face cache folder or a model id in the local cache (no download).
        """
        from safetensors.torch import load_file

        d = Path(directory)
        if (d / "state" / "config.json").is_file():
            d = d / "state"
        if not (d / "config.json").is_file() or json.loads((d / "config.json").read_text()).get("arch") == "arc-state":
            return _load_arc(directory if not (d / "config.json").is_file() else d, map_location)
        for name in ("model.safetensors", "config.json", "vocab.json"):
            if not (d / name).exists():
                raise InputError(f"ST model directory {d}: {name} not found")
        raw = json.loads((d / "config.json").read_text())
        if raw.pop("n_batches", 0):  # runs written before the (never used) batch token was removed
            raise InputError(f"ST model directory {d}: config.json has a batch embedding (n_batches > 0), "
                             "which this celltwin no longer supports")
        cfg = STConfig(**raw)
        tensors = load_file(str(d / "model.safetensors"), device=map_location)
        model = cls(cfg, pert_table=tensors.get("pert_table"), vocab=json.loads((d / "vocab.json").read_text()))
        model.load_state_dict(tensors)
        return model


def _load_arc(src: str | Path, map_location: str) -> Any:
    """arc-state's ST from an imported directory or an arc-state run (see StateTransition.from_pretrained)."""
    from celltwin.models.arc_transition import ArcStateTransition

    p = Path(src)
    if (p / "config.json").is_file():
        return ArcStateTransition.from_pretrained(p, map_location=map_location).eval()
    from celltwin.state_import import find_source
    from celltwin.state_import.st import read_st_run

    source = find_source(src)
    if source.kind != "st":
        raise InputError(f"{src}: not an ST model (an arc-state SE checkpoint: use StateEmbeddingModel.from_pretrained)")
    info = read_st_run(source)
    vocab = {"genes": info["genes"], "perturbations": info["perts"], "batches": info["batches"],
             "contexts": info["cell_types"]}
    model = ArcStateTransition(info["config"], vocab=vocab)
    model.load_state_dict(info["tensors"], strict=True)
    return model.to(map_location).eval()
