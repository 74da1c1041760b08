"""State Embedding model (SE): a cell -> one vector, learned by masked expression prediction.

A clean-room design from the public description (Arc's STATE primer and paper):

* **Gene tokens.** Each gene j has a fixed vector g_j (a protein-language-model embedding,
  :mod:`celltwin.genes`). Genes without one get a *learned* fallback vector (one per missing
  gene; never zeros). Token: ``SiLU(LayerNorm(g_j W + b))`` (d_model).
* **Cell sentence.** The cell's top ``L`` genes by expression (descending), ``[CLS]`` first and a
  dataset token ``[DS]`` last: ``(L + 2, d_model)``. Ties (mostly among zeros when a cell
  expresses fewer than L genes) are broken by fresh random keys in training and by a fixed
  per-gene random priority (``tie_rank``, from ``config.seed``) at inference, so an embedding
  does not depend on batch composition. The encoder has no positional encoding: the order of
  genes carries nothing; magnitude enters only through the expression encoding.
* **Expression encoding (soft binning).** For value v (model space: log1p-normalised), a small
  MLP ``1 -> n_bins`` gives logits; softmax gives soft bin memberships w (n_bins); the encoding
  is ``MLP(w @ B)`` with B (n_bins, d_model) learned bin vectors. It is added to the gene token.
* **Encoder.** Pre-norm Llama blocks from :mod:`celltwin.nn` (RMSNorm, bidirectional attention,
  SwiGLU) -- a deliberate deviation from a post-norm BERT stack. The ``[CLS]`` output through a
  linear head, L2-normalised, is the cell embedding (d_out). ``[DS]`` is a learned token per
  training dataset (plus one "unknown" token used at inference for unseen datasets and, with
  probability ``ds_dropout``, in training so that it is meaningful).
* **Training task.** ``n_mask`` sentence genes are masked, chosen *across the expression range*:
  the ranked sentence is cut into ``mask_strata`` equal rank strata and the same share is drawn
  uniformly inside each. Masked genes are removed from the encoder input entirely (the
  visible sentence is ``L - n_mask + 2`` tokens, also a large training speed-up). The model
  predicts the expression of the masked genes and of ``n_unexpressed`` query genes drawn
  from the cell's zero-expression genes outside the visible sentence, from
  ``MLP([cell embedding, query gene token, read depth])``. Read depth (``read_depth=True``) is
  ``log1p(number of detected genes) / 10``, computed from the row itself, so it is defined
  for counts and for log-normalised inputs alike. Losses: ``mse``, ``energy``
  (the exact per-cell 1-D energy distance between predicted and observed query values,
  O(Q log Q) via sorting), ``mmd`` (Gaussian-kernel squared MMD of the same 1-D samples,
  bandwidths 0.25/0.5/1/2 log-units, O(Q^2) memory) or ``mse+energy`` / ``mse+mmd``. A pure
  distributional loss ignores which gene got which value, hence the ``mse+`` variants.

Shapes: ``B`` cells, ``G`` genes in the model's vocabulary, ``L`` sentence length, ``V`` visible
sentence genes (L - n_mask), ``Q`` query genes, ``D`` gene-vector dim, ``H`` d_model, ``E`` d_out.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from celltwin._io import atomic_path
from celltwin.errors import ConfigError, InputError
from celltwin.losses import gaussian_mmd
from celltwin.models.presets import SE_PRESETS, from_preset
from celltwin.nn import LlamaEncoder

__all__ = ["SE_PRESETS", "StateEmbeddingConfig", "StateEmbeddingModel", "energy_distance_1d"]

_LOSSES = ("mse", "energy", "mmd", "mse+energy", "mse+mmd")
_MMD_BANDWIDTHS = (0.25, 0.5, 1.0, 2.0)  # absolute widths in log1p-expression units
_FORMAT = "celltwin.state_embedding.v1"


@dataclass
class StateEmbeddingConfig:
    """Architecture and training-task settings (validated once; ConfigError on bad values)."""

    d_model: int = 512  # H: token width (published 512)
    n_layers: int = 8  # transformer blocks (published 8)
    n_heads: int = 16  # attention heads (published 16)
    mlp_hidden: int = 1024  # SwiGLU hidden size (published 1024)
    d_out: int = 512  # E: cell embedding size (published 512)
    sentence_len: int = 2048  # L: top genes per cell (published 2048; capped at the vocabulary size)
    n_mask: int = 1280  # masked sentence genes per cell (published 1280 of 2048; scaled if L is capped)
    n_unexpressed: int = 512  # extra query genes drawn among the cell's unexpressed genes
    mask_strata: int = 8  # rank strata the masked genes are spread over
    n_bins: int = 10  # soft expression bins
    decoder_hidden: int = 512  # hidden width of the expression decoder MLP
    dropout: float = 0.0
    loss: str = "mse"  # mse | energy | mmd | mse+energy | mse+mmd
    energy_weight: float = 1.0  # weight of the distributional term in mse+energy / mse+mmd
    read_depth: bool = True  # give the decoder a read-depth feature
    ds_dropout: float = 0.1  # probability of replacing the dataset token by "unknown" in training
    seed: int = 0  # fixes the inference tie-break priority of genes

    def __post_init__(self) -> None:
        for name in (
            "d_model",
            "n_layers",
            "n_heads",
            "mlp_hidden",
            "d_out",
            "sentence_len",
            "n_bins",
            "decoder_hidden",
            "mask_strata",
        ):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"StateEmbeddingConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"StateEmbeddingConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}"
            )
        if not 1 <= self.n_mask < self.sentence_len:
            raise ConfigError(
                f"StateEmbeddingConfig.n_mask must be in [1, sentence_len={self.sentence_len}), "
                f"got {self.n_mask}"
            )
        if self.n_unexpressed < 0:
            raise ConfigError(f"StateEmbeddingConfig.n_unexpressed must be >= 0, got {self.n_unexpressed}")
        if self.loss not in _LOSSES:
            raise ConfigError(f"StateEmbeddingConfig.loss must be one of {_LOSSES}, got {self.loss!r}")
        if not 0 <= self.dropout < 1 or not 0 <= self.ds_dropout < 1:
            raise ConfigError(
                f"StateEmbeddingConfig dropout / ds_dropout must be in [0, 1), got "
                f"{self.dropout} / {self.ds_dropout}"
            )
        if self.energy_weight < 0:
            raise ConfigError(f"StateEmbeddingConfig.energy_weight must be >= 0, got {self.energy_weight}")

    @classmethod
    def preset(cls, name: str, **overrides: object) -> StateEmbeddingConfig:
        """A named size (``tiny``, ``small``, ``published``) with field overrides."""
        return from_preset("SE", SE_PRESETS, cls, name, overrides)





def energy_distance_1d(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Energy distance between the rows of ``a`` (B, n) and ``b`` (B, m) as 1-D samples -> (B,).

    Uses ``2 E|X-Y| - E|X-X'| - E|Y-Y'| = 2 * integral (F_a - F_b)^2`` (exact for empirical
    distributions): pool and sort the values, take the running CDF difference and sum its
    square times the gaps. O((n+m) log(n+m)); gradients flow through the sorted values.
    Computed in float32.
    """
    a, b = a.float(), b.float()
    z = torch.cat([a, b], dim=1)  # (B, n+m)
    w = torch.cat([torch.full_like(a, 1.0 / a.shape[1]), torch.full_like(b, -1.0 / b.shape[1])], dim=1)
    z_sorted, order = torch.sort(z, dim=1)
    cdf_diff = torch.cumsum(w.gather(1, order), dim=1)  # (B, n+m): F_a - F_b right of each point
    gaps = z_sorted[:, 1:] - z_sorted[:, :-1]  # (B, n+m-1)
    return 2.0 * (cdf_diff[:, :-1].pow(2) * gaps).sum(dim=1)


class _ExpressionEncoding(nn.Module):
    """Soft binning of a scalar expression value into ``n_bins`` learned bins -> (..., H)."""

    def __init__(self, n_bins: int, dim: int) -> None:
        super().__init__()
        self.to_logits = nn.Sequential(
            nn.Linear(1, dim // 2 or 1), nn.SiLU(), nn.Linear(dim // 2 or 1, n_bins)
        )
        self.bins = nn.Parameter(torch.randn(n_bins, dim) * 0.02)  # (n_bins, H)
        self.out = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, v: torch.Tensor) -> torch.Tensor:  # (B, S) -> (B, S, H)
        w = torch.softmax(self.to_logits(v[..., None]), dim=-1)  # (B, S, n_bins) soft memberships
        return self.out(w @ self.bins)  # (B, S, H)


class StateEmbeddingModel(nn.Module):
    """The SE model over a fixed gene vocabulary ``genes`` (see the module docstring).

    Args:
        config: architecture / task settings.
        genes: the vocabulary (column order of the expression rows the model takes).
        gene_vectors: (G, D) fixed gene vectors aligned with ``genes``.
        found: (G,) bool; False rows of ``gene_vectors`` are ignored and replaced by learned
            fallback vectors (initialised with the scale of the found rows).
        datasets: names of the training datasets (one ``[DS]`` token each, plus "unknown").
    """

    def __init__(
        self,
        config: StateEmbeddingConfig,
        genes: list[str],
        gene_vectors: np.ndarray | torch.Tensor,
        found: np.ndarray | torch.Tensor,
        datasets: list[str] | None = None,
    ) -> None:
        super().__init__()
        cfg = self.config = config
        self.genes = list(genes)
        self.datasets = list(datasets or ["default"])
        self.extra: dict[str, object] = {}  # run metadata restored by from_pretrained
        vec = torch.as_tensor(np.asarray(gene_vectors, dtype=np.float32))  # (G, D)
        fnd = torch.as_tensor(np.asarray(found, dtype=bool))  # (G,)
        G = len(self.genes)
        if vec.ndim != 2 or vec.shape[0] != G or fnd.shape != (G,):
            msg = f"gene vectors {tuple(vec.shape)} / found {tuple(fnd.shape)} do not match {G} genes"
            raise InputError(msg)
        self.L = min(cfg.sentence_len, G)  # sentence length actually used
        self.n_mask = max(1, min(self.L - 1, round(cfg.n_mask * self.L / cfg.sentence_len)))
        self.n_query_neg = min(cfg.n_unexpressed, G - (self.L - self.n_mask))
        D, H = vec.shape[1], cfg.d_model

        self.register_buffer("gene_table", vec)  # (G, D) fixed (never trained)
        self.register_buffer("gene_found", fnd)  # (G,)
        missing_slot = torch.full((G,), -1, dtype=torch.long)
        n_missing = int((~fnd).sum())
        missing_slot[~fnd] = torch.arange(n_missing)
        self.register_buffer("missing_slot", missing_slot)  # (G,) row in `fallback` or -1
        scale = float(vec[fnd].std()) if bool(fnd.any()) and int(fnd.sum()) * D > 1 else 1.0
        fallback = torch.randn(n_missing, D) * (scale if scale > 0 else 1.0)  # (n_missing, D)
        if n_missing:
            self.fallback = nn.Parameter(fallback)
        else:  # a buffer, not a parameter: DDP rejects parameters that never get a gradient
            self.register_buffer("fallback", fallback)
        g = torch.Generator().manual_seed(cfg.seed)
        self.register_buffer("tie_rank", torch.randperm(G, generator=g).float())  # (G,) inference tie-break

        self.gene_proj = nn.Linear(D, H)
        self.gene_norm = nn.LayerNorm(H)
        self.expr_enc = _ExpressionEncoding(cfg.n_bins, H)
        self.cls_token = nn.Parameter(torch.randn(H) * 0.02)
        self.ds_tokens = nn.Embedding(len(self.datasets) + 1, H)  # last row = unknown dataset
        self.encoder = LlamaEncoder(H, cfg.n_layers, cfg.n_heads, cfg.mlp_hidden, dropout=cfg.dropout)
        self.head = nn.Linear(H, cfg.d_out)
        d_in = cfg.d_out + H + (1 if cfg.read_depth else 0)
        self.decoder = nn.Sequential(
            nn.Linear(d_in, cfg.decoder_hidden),
            nn.SiLU(),
            nn.Linear(cfg.decoder_hidden, cfg.decoder_hidden),
            nn.SiLU(),
            nn.Linear(cfg.decoder_hidden, 1),
        )

    # ------------------------------------------------------------------------------ pieces

    @property
    def unknown_dataset(self) -> int:
        return len(self.datasets)

    def gene_vectors(self, idx: torch.Tensor) -> torch.Tensor:
        """Fixed or fallback vectors of gene indices ``idx`` (...,) -> (..., D)."""
        slot = self.missing_slot[idx]
        fixed = self.gene_table[idx]
        if self.fallback.shape[0] == 0:
            return fixed
        fb = self.fallback[slot.clamp(min=0)]
        return torch.where((slot >= 0)[..., None], fb, fixed)

    def gene_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """``SiLU(LayerNorm(g W + b))`` for gene indices (...,) -> (..., H); each distinct gene once."""
        uniq, inv = torch.unique(idx, return_inverse=True)
        tok = F.silu(self.gene_norm(self.gene_proj(self.gene_vectors(uniq))))  # (U, H)
        return tok[inv]

    def sentence(self, x: torch.Tensor, random_ties: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-``L`` genes of each row of ``x`` (B, G), descending -> (idx (B, L), values (B, L)).

        Ties: random keys when ``random_ties`` (training), else the fixed ``tie_rank``. Two
        stable sorts: by tie key, then by value descending.
        """
        B, G = x.shape
        tie = torch.rand(B, G, device=x.device) if random_ties else self.tie_rank.expand(B, G)
        order = torch.sort(tie, dim=1, stable=True).indices  # (B, G)
        by_value = torch.sort(x.gather(1, order), dim=1, descending=True, stable=True).indices
        idx = order.gather(1, by_value)[:, : self.L]  # (B, L)
        return idx, x.gather(1, idx)

    def mask_positions(self, B: int, device: torch.device) -> torch.Tensor:
        """Sentence positions to mask (B, n_mask), spread evenly over ``mask_strata`` rank strata."""
        strata = min(self.config.mask_strata, self.n_mask)
        bounds = np.linspace(0, self.L, strata + 1).round().astype(int)
        quota = np.diff(np.linspace(0, self.n_mask, strata + 1).round().astype(int))
        keys = torch.rand(B, self.L, device=device)
        out = []
        for s in range(strata):
            lo, hi, k = int(bounds[s]), int(bounds[s + 1]), int(min(quota[s], bounds[s + 1] - bounds[s]))
            out.append(lo + torch.topk(keys[:, lo:hi], k, dim=1).indices)
        pos = torch.cat(out, dim=1)  # (B, <= n_mask)
        short = self.n_mask - pos.shape[1]
        if short > 0:  # a stratum was smaller than its quota: take the rest uniformly from the others
            keys = keys.scatter(1, pos, -1.0)
            pos = torch.cat([pos, torch.topk(keys, short, dim=1).indices], dim=1)
        return pos

    def encode(self, idx: torch.Tensor, values: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
        """Cell embeddings from sentence genes ``idx`` (B, S), values (B, S), dataset ids (B,) -> (B, E)."""
        tok = self.gene_tokens(idx) + self.expr_enc(values)  # (B, S, H)
        B = tok.shape[0]
        cls = self.cls_token.expand(B, 1, -1)  # (B, 1, H)
        dst = self.ds_tokens(ds)[:, None, :]  # (B, 1, H)
        h = self.encoder(torch.cat([cls, tok, dst], dim=1))  # (B, S + 2, H)
        return F.normalize(self.head(h[:, 0]), dim=-1)  # (B, E), unit L2 norm

    def decode(self, emb: torch.Tensor, query: torch.Tensor, depth: torch.Tensor) -> torch.Tensor:
        """Predicted expression of query genes (B, Q) from embeddings (B, E) and depth (B,) -> (B, Q)."""
        q = self.gene_tokens(query)  # (B, Q, H)
        parts = [emb[:, None, :].expand(-1, q.shape[1], -1), q]
        if self.config.read_depth:
            parts.append(depth[:, None, None].expand(-1, q.shape[1], 1).to(q.dtype))
        return self.decoder(torch.cat(parts, dim=-1)).squeeze(-1)  # (B, Q)

    @staticmethod
    def depth_feature(x: torch.Tensor) -> torch.Tensor:
        """Read-depth proxy ``log1p(#detected genes) / 10`` of rows ``x`` (B, G) -> (B,)."""
        return torch.log1p((x > 0).sum(dim=1).float()) / 10.0

    def _check(self, x: torch.Tensor, ds: torch.Tensor | None) -> torch.Tensor:
        if x.ndim != 2 or x.shape[1] != len(self.genes):
            msg = (f"expected expression rows (B, {len(self.genes)}) in the model's gene order, "
                   f"got {tuple(x.shape)}")
            raise InputError(msg)
        if ds is None:
            return torch.full((x.shape[0],), self.unknown_dataset, dtype=torch.long, device=x.device)
        return ds.to(device=x.device, dtype=torch.long)

    # ------------------------------------------------------------------------------ API

    def forward(
        self, x: torch.Tensor, ds: torch.Tensor | None = None, return_loss: bool = False
    ) -> torch.Tensor | dict[str, torch.Tensor]:
        """Cell embeddings (B, E) of rows ``x`` (B, G), or the training loss parts with ``return_loss``.

        The loss goes through ``forward`` so that a DDP wrapper's hooks run (``model(x, ds,
        return_loss=True)`` in the training step).
        """
        return self.loss(x, ds) if return_loss else self.embed(x, ds)

    def embed(self, x: torch.Tensor, ds: torch.Tensor | None = None) -> torch.Tensor:
        """Cell embeddings (B, E) of expression rows ``x`` (B, G) (model space, the model's gene order).

        ``ds``: dataset indices into ``self.datasets`` (None = the "unknown" token). The full
        top-L sentence is used, ties broken by the fixed gene priority (deterministic).
        """
        ds = self._check(x, ds)
        idx, val = self.sentence(x.float(), random_ties=False)
        return self.encode(idx, val, ds)

    def loss(self, x: torch.Tensor, ds: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """Masked-expression training loss on rows ``x`` (B, G); returns named parts (``loss`` first).

        Uses torch's global RNG (tie keys, masks, query sampling, dataset-token dropout), which
        the shared training loop checkpoints, so resumed runs draw the same masks.
        """
        ds = self._check(x, ds)
        x = x.float()
        B = x.shape[0]
        if self.training and self.config.ds_dropout > 0:
            drop = torch.rand(B, device=x.device) < self.config.ds_dropout
            ds = torch.where(drop, torch.full_like(ds, self.unknown_dataset), ds)
        idx, val = self.sentence(x, random_ties=True)  # (B, L)
        mpos = self.mask_positions(B, x.device)  # (B, M)
        visible = torch.ones(B, self.L, dtype=torch.bool, device=x.device).scatter(1, mpos, False)
        vpos = visible.nonzero()[:, 1].view(B, self.L - self.n_mask)  # (B, V), ascending rank order
        emb = self.encode(idx.gather(1, vpos), val.gather(1, vpos), ds)  # (B, E)

        query = [idx.gather(1, mpos)]  # (B, M)
        if self.n_query_neg > 0:
            w = (x == 0).float() + 1e-6  # prefer unexpressed genes; expressed only if too few zeros
            w = w.scatter(1, idx.gather(1, vpos), 0.0)  # never query a visible gene
            query.append(torch.multinomial(w, self.n_query_neg, replacement=False))  # (B, N)
        q = torch.cat(query, dim=1)  # (B, Q)
        target = x.gather(1, q)  # (B, Q)
        pred = self.decode(emb, q, self.depth_feature(x))  # (B, Q)
        mse = F.mse_loss(pred.float(), target)
        parts: dict[str, torch.Tensor] = {}
        kind = self.config.loss.removeprefix("mse+")
        if kind == "mse":
            parts["loss"] = mse
        else:
            if kind == "energy":
                dist = energy_distance_1d(pred, target).mean()
            else:
                dist = gaussian_mmd(
                    pred.float()[..., None], target[..., None], bandwidths=_MMD_BANDWIDTHS
                ).mean()
            w = self.config.energy_weight if self.config.loss.startswith("mse+") else None
            parts["loss"] = dist if w is None else mse + w * dist
            parts[kind] = dist.detach()
        parts["mse"] = mse.detach()
        return parts

    # ------------------------------------------------------------------------------ persistence

    def save_pretrained(self, path: str | Path, extra: dict[str, object] | None = None) -> None:
        """Write ``config.json``, ``genes.txt``, ``gene_embeddings.safetensors``, ``model.safetensors``.

        The gene table holds the fixed vectors for found genes and the *learned fallback*
        vectors for missing ones (which are which: the ``gene_found`` buffer); ``model.safetensors``
        holds every other parameter and buffer. ``extra`` is stored under ``"extra"`` in the
        config (e.g. the preprocessing of the training run). Each file is written atomically.
        """
        from safetensors.torch import save_file

        from celltwin.data.preprocess import write_genes_txt
        from celltwin.genes import GeneTable, save_gene_table

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        with torch.no_grad():
            table = (
                self.gene_vectors(torch.arange(len(self.genes), device=self.gene_table.device)).cpu().numpy()
            )
        save_gene_table(GeneTable(self.genes, table), path / "gene_embeddings.safetensors")
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k != "gene_table"}
        with atomic_path(path / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": _FORMAT})
        write_genes_txt(path / "genes.txt", self.genes)
        meta = {
            "format": _FORMAT,
            "config": asdict(self.config),
            "datasets": self.datasets,
            "gene_dim": int(self.gene_table.shape[1]),
            "n_genes": len(self.genes),
            "n_missing_genes": int((~self.gene_found).sum()),
            "extra": dict(extra or {}),
        }
        with atomic_path(path / "config.json") as tmp:
            tmp.write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(
        cls, path: str | Path, map_location: str | torch.device = "cpu"
    ) -> StateEmbeddingModel:
        """Load a model written by :meth:`save_pretrained` from a local directory.

        Anything else is taken as an arc-state SE model and loaded with its own architecture
        (:func:`celltwin.models.arc_se_embed.load_arc_se`; the result is then an
        :class:`~celltwin.models.arc_embedding.ArcStateEmbedding`, with arc-state's
        ``model(input_ids, mask)`` and :meth:`~celltwin.models.arc_embedding.ArcStateEmbedding.embed`):
        a ``celltwin import-state`` directory, an arc-state checkpoint (``.ckpt``) or a folder
        with one, a Hugging Face cache folder, or a model id found in the local cache
        (``"arcinstitute/SE-600M"``; nothing is downloaded).
        """
        from safetensors.torch import load_file

        from celltwin.data.preprocess import read_genes_txt
        from celltwin.genes import load_gene_table

        p = Path(path)
        if not (p / "config.json").is_file() or _arch(p) == "arc-state":
            # arc-state: a `celltwin import-state` directory, a checkpoint, a Hugging Face folder or id
            from celltwin.models.arc_se_embed import load_arc_se

            try:
                return load_arc_se(path, map_location)
            except InputError as e:
                if p.is_dir() and not (p / "config.json").is_file():
                    msg = f"{p} is not a State Embedding model directory (no config.json), nor an arc-state SE source: {e}"
                    raise InputError(msg) from None
                raise
        path = p
        cfg_file = path / "config.json"
        meta = json.loads(cfg_file.read_text())
        if meta.get("format") != _FORMAT:
            msg = f"{cfg_file}: format {meta.get('format')!r}, expected {_FORMAT!r}"
            raise InputError(msg)
        genes = read_genes_txt(path / "genes.txt")
        table = load_gene_table(path / "gene_embeddings.safetensors")
        if table.genes != genes:
            msg = f"{path}: gene_embeddings.safetensors and genes.txt list different genes"
            raise InputError(msg)
        state = load_file(str(path / "model.safetensors"))
        found = state["gene_found"].numpy()
        model = cls(StateEmbeddingConfig(**meta["config"]), genes, table.vectors, found, meta["datasets"])
        state["gene_table"] = torch.as_tensor(table.vectors)
        model.load_state_dict(state)
        model.extra = meta.get("extra", {})
        return model.to(map_location).eval()


def _arch(path: Path) -> str:
    try:
        return str(json.loads((path / "config.json").read_text()).get("arch", "celltwin"))
    except ValueError:
        return "celltwin"
