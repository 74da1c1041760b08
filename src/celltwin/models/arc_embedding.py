"""arc-state 0.11.1 State Embedding (SE): a clean-room re-implementation of its inference path.

Loads arc-state SE checkpoints (same state_dict keys) and reproduces ``state emb transform``.
Written only from black-box observations: ``../shared/reference/state-facts.md`` (sections 1E/1F),
``tests/data/state_golden/{README,FORMATS}.md`` and the tensors recorded around arc-state's own
calls in ``tests/data/state_golden/se/transform_{tiefree,counts}_calls.npz``. arc-state's source
was never read. Every step below was matched against those recordings (max abs diff 0.0 on CPU,
fp32, unless noted).

**Forward** (what arc passes: ``x`` (B, L, D) with L = pad_length + 1):

* ``x[:, 0]`` is the raw ``cls_token``, ``x[:, 1:L-1]`` the **L2-normalised** gene-table rows
  (``pe_embedding``) of the sentence genes, ``x[:, L-1]`` the raw ``dataset_token``.
* ``h = SiLU(LayerNorm(x W + b)) * sqrt(d_model)`` (``encoder``; the recorded ``encoder`` output is
  before the scaling, the input to layer 0 after it).
* Count soft-binning on positions ``0 .. L-2`` (CLS included, dataset token not):
  ``h += softmax(count_encoder(c)) @ bin_encoder.weight`` with ``count_encoder`` =
  Linear(1, 512), LeakyReLU(0.01), Linear(512, n_bins).
* ``nlayers`` post-norm layers: ``h = LN1(h + MHA(h)); h = LN2(h + W2 GELU(W1 h))`` with a fused
  ``qkv_proj`` laid out ``[q | k | v]`` (heads contiguous in each), SDPA scale ``1/sqrt(head_dim)``,
  exact (erf) GELU, LayerNorm eps 1e-5.
* ``decoder`` = SkipBlock then Linear; SkipBlock(x) = ``LN(x + dense(ReLU(intermediate_dense(x))))``
  (hidden 2 x width). Outputs: all tokens (B, L, E); cell embedding = L2norm(out[:, 0]);
  dataset embedding = out[:, -1] (not normalised).
* ``X_state = [cell embedding | dataset_embedder(dataset embedding)]`` (E + 10 columns).
* ``mask`` and ``dataset_nums`` do not enter the computation: the recordings are reproduced
  exactly without them (every recorded mask is all-False and every dataset number 0; the facts
  file says arc's July-2025 forward drops the mask and 0.11.1's collator makes it all-False), so
  a True entry here does not mask anything. They are accepted for call compatibility.

**Cell sentence** (arc's collator, per cell; checked on all 80 recorded cells):

* The row is taken as raw counts and log1p-transformed when its max exceeds ``raw_count_max``
  (15); otherwise it is used as is (taken as already log-scale). Observed: of 80 cells only one
  (max 15, sum 181) was left untransformed; every other cell has max >= 16 and sum >= 193. The
  data cannot tell a max rule (threshold in [15, 16)) from a sum rule (in [181, 193)): the max
  rule was chosen.
* Sentence = ``cls_token_idx`` then the top ``pad_length - 1`` expressed genes by value,
  descending. arc-state breaks ties at random (the recorded tie groups come in either order);
  here ties go to the lower gene-table row, so results are deterministic (the tie-free golden
  input gives arc's exact tokens).
* Counts feature = ``(v[gene] / sum(v over the row's columns)) * 100`` (float32); position 0
  uses the value of input **column** ``cls_token_idx`` (arc indexes the cell's count vector with
  the CLS id; with the golden identity gene mapping column 3 = table row 3).
* Not observable in the recordings (every recorded cell expresses more than 31 genes): with fewer
  expressed genes than ``pad_length - 1`` the rest is filled with unexpressed mapped genes drawn
  with replacement (as the facts file states) from ``rng``; columns not in the table
  (``gene_idx == -1``) never become tokens but do count in the row sum and the max.

``binary_decoder`` (:meth:`ArcStateEmbedding.predict_expression`) is never called by the
transform, so it could not be checked against a recording: its input layout follows the facts
file, and the gene token = ``encoder(raw table row)`` (no normalisation, no sqrt scaling) matches
the recorded gene tokens ``_compute_embedding_for_batch`` returns. ``gene_embedding_layer`` is the
same module as ``encoder`` (the checkpoint's tensors share storage). ``dataset_encoder`` (the
dataset classifier, training only) keeps its weights; its modules 1 and 3 have none and unknown
kinds, so they are ``Identity`` and the head is never run.

Shapes: ``B`` cells, ``P`` = pad_length, ``L`` = P + 1 tokens, ``D`` token_dim, ``H`` d_model,
``E`` output_dim, ``C`` input columns, ``Q`` query genes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn

from celltwin._io import atomic_path
from celltwin.errors import ConfigError, InputError

__all__ = ["ArcSEConfig", "ArcStateEmbedding"]

_FORMAT = "celltwin.arc_state_embedding.v1"


def _bad(field: str, expected: str, actual: object) -> ConfigError:
    return ConfigError(f"ArcSEConfig.{field}: expected {expected}, got {actual!r}")


@dataclass
class ArcSEConfig:
    """Sizes of an arc-state SE model (arc's names; validated, ConfigError names the field)."""

    token_dim: int  # D: gene-table vector size (5120 for ESM2-15B)
    d_model: int  # H (arc `emsize`)
    nhead: int
    d_hid: int  # feed-forward hidden size
    nlayers: int
    output_dim: int  # E: cell-embedding size
    dropout: float = 0.1  # kept for round-tripping; inference applies no dropout
    n_genes: int = 0  # rows of the gene table (pe_embedding)
    pad_length: int = 2048  # P: CLS + top P-1 genes
    cls_token_idx: int = 3
    ds_emb_dim: int = 10  # dataset_embedder output
    n_bins: int = 10  # count soft bins
    count_hidden: int = 512  # count_encoder hidden size
    n_datasets: int = 1  # dataset_encoder classes (training only)
    raw_count_max: float = 15.0  # rows with a larger max are log1p-transformed
    counts: bool = True  # arc cfg model.counts
    rda: bool = True  # arc cfg model.rda (read depth into binary_decoder)
    dataset_correction: bool = True  # arc cfg model.dataset_correction

    def __post_init__(self) -> None:
        for name in ("token_dim", "d_model", "nhead", "d_hid", "nlayers", "output_dim", "ds_emb_dim", "n_bins",
                     "count_hidden", "n_datasets"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | np.integer) or v < 1:
                raise _bad(name, "an integer >= 1", v)
        if self.d_model % self.nhead:
            raise _bad("d_model", f"a multiple of nhead={self.nhead}", self.d_model)
        if not 0 <= self.dropout < 1:
            raise _bad("dropout", "a value in [0, 1)", self.dropout)
        if isinstance(self.pad_length, bool) or not isinstance(self.pad_length, int) or self.pad_length < 2:
            raise _bad("pad_length", "an integer >= 2", self.pad_length)
        if not isinstance(self.n_genes, int) or self.n_genes < 0:
            raise _bad("n_genes", "an integer >= 0", self.n_genes)
        if not 0 <= self.cls_token_idx < max(self.n_genes, self.cls_token_idx + 1):
            raise _bad("cls_token_idx", f"an index in [0, n_genes={self.n_genes})", self.cls_token_idx)
        if not self.raw_count_max >= 0:
            raise _bad("raw_count_max", "a value >= 0", self.raw_count_max)
        for name in ("counts", "rda", "dataset_correction"):  # the only variant observed
            if getattr(self, name) is not True:
                raise _bad(name, "True (the only arc-state variant observed)", getattr(self, name))

    @classmethod
    def from_arc_checkpoint(cls, hparams: dict, cfg: dict) -> ArcSEConfig:
        """From an SE checkpoint's ``hyper_parameters`` and its parsed ``cfg_yaml``."""
        try:
            kw = {k: hparams[k] for k in ("token_dim", "d_model", "nhead", "d_hid", "nlayers", "output_dim")}
            kw = {k: int(v) for k, v in kw.items()}
            ds, emb, model = cfg["dataset"], cfg["embeddings"], cfg.get("model", {})
            cur = emb[emb["current"]]
            return cls(**kw, dropout=float(hparams.get("dropout", 0.1)), n_genes=int(cur["num"]),
                       pad_length=int(ds["pad_length"]), cls_token_idx=int(ds["cls_token_idx"]),
                       n_datasets=int((ds.get(ds.get("current"), None) or {}).get("num_datasets", 1)),
                       counts=bool(model.get("counts", True)), rda=bool(model.get("rda", True)),
                       dataset_correction=bool(model.get("dataset_correction", True)))
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"arc-state SE checkpoint: hyper_parameters/cfg lack {e}") from e

    def to_dict(self) -> dict:
        return asdict(self)


class _SkipBlock(nn.Module):
    """``LN(x + dense(ReLU(intermediate_dense(x))))``, hidden 2 x dim (arc's SkipBlock, observed)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.intermediate_dense = nn.Linear(dim, 2 * dim)
        self.dense = nn.Linear(2 * dim, dim)
        self.layer_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer_norm(x + self.dense(F.relu(self.intermediate_dense(x))))


class _Layer(nn.Module):
    """arc's ``FlashTransformerEncoderLayer`` as observed: post-norm, fused qkv, GELU FFN."""

    def __init__(self, d: int, nhead: int, d_hid: int) -> None:
        super().__init__()
        self.nhead = nhead
        self.qkv_proj = nn.Linear(d, 3 * d)
        self.out_proj = nn.Linear(d, d)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.linear1, self.linear2 = nn.Linear(d, d_hid), nn.Linear(d_hid, d)

    def forward(self, h: torch.Tensor) -> torch.Tensor:  # (B, L, H) -> (B, L, H)
        B, L, H = h.shape
        q, k, v = self.qkv_proj(h).view(B, L, 3, self.nhead, H // self.nhead).permute(2, 0, 3, 1, 4)  # (B, nh, L, hd)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, L, H)
        h = self.norm1(h + self.out_proj(a))
        return self.norm2(h + self.linear2(F.gelu(self.linear1(h))))


class _Encoder(nn.Module):
    def __init__(self, cfg: ArcSEConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList(_Layer(cfg.d_model, cfg.nhead, cfg.d_hid) for _ in range(cfg.nlayers))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            h = layer(h)
        return h


class ArcStateEmbedding(nn.Module):
    """arc-state's SE model (state_dict keys = arc's); see the module docstring."""

    arch = "arc-state"

    def __init__(self, config: ArcSEConfig, genes: list[str] | None = None) -> None:
        super().__init__()
        cfg = self.config = config
        if cfg.n_genes < 1:
            raise _bad("n_genes", "an integer >= 1 (the gene-table size) to build a model", cfg.n_genes)
        if genes is not None and len(genes) != cfg.n_genes:
            raise InputError(f"{len(genes)} gene names for a gene table of {cfg.n_genes} rows")
        self.genes = list(genes) if genes is not None else None
        D, H, E = cfg.token_dim, cfg.d_model, cfg.output_dim
        self.cls_token = nn.Parameter(torch.zeros(1, D))
        self.dataset_token = nn.Parameter(torch.zeros(1, D))
        self.encoder = nn.Sequential(nn.Linear(D, H), nn.LayerNorm(H), nn.SiLU())
        self.transformer_encoder = _Encoder(cfg)
        self.decoder = nn.Sequential(_SkipBlock(H), nn.Linear(H, E))
        n_bin_in = H + E + int(cfg.rda) + cfg.ds_emb_dim
        self.binary_decoder = nn.Sequential(_SkipBlock(n_bin_in), _SkipBlock(n_bin_in), nn.Linear(n_bin_in, 1))
        self.bin_encoder = nn.Embedding(cfg.n_bins, H)
        self.count_encoder = nn.Sequential(nn.Linear(1, cfg.count_hidden), nn.LeakyReLU(),
                                           nn.Linear(cfg.count_hidden, cfg.n_bins))
        self.gene_embedding_layer = self.encoder  # the same module (shared storage in arc's checkpoint)
        self.dataset_embedder = nn.Linear(E, cfg.ds_emb_dim)
        self.dataset_encoder = nn.Sequential(nn.Linear(E, H), nn.Identity(), nn.LayerNorm(H), nn.Identity(),
                                             nn.Linear(H, cfg.n_datasets))
        self.pe_embedding = nn.Embedding(cfg.n_genes, D)
        self.pe_embedding.weight.requires_grad_(False)
        self.eval()

    # ---------------------------------------------------------------- model
    def forward(self, input_ids: torch.Tensor, mask: torch.Tensor | None = None, counts: torch.Tensor | None = None,
                dataset_nums: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """arc's ``forward``: ``input_ids`` (B, L, D) token vectors -> (tokens (B, L, E), emb (B, E), ds (B, E)).

        ``input_ids[:, 0]`` must be the CLS vector and ``input_ids[:, -1]`` the dataset token, as
        arc passes them (:meth:`sentences` builds it). ``counts`` (B, n <= L - 1) is added as soft
        count bins at positions ``0 .. n-1``; with ``counts=None`` no count information is added
        (the tokens carry gene identity only; arc never made such a call in the recordings).
        ``mask`` (B, L) (or (B, L, D), the primer's shape) and ``dataset_nums`` (B,) are accepted and
        ignored (see the module docstring).
        Inference only: no dropout is applied.
        """
        if input_ids.ndim != 3 or input_ids.shape[-1] != self.config.token_dim:
            raise InputError(f"input_ids must be (B, L, {self.config.token_dim}), got {tuple(input_ids.shape)}")
        B, L, _ = input_ids.shape
        if mask is not None and tuple(mask.shape) not in ((B, L), tuple(input_ids.shape)):
            # (B, L), or (B, L, D) as the primer writes it (one flag per token vector element)
            raise InputError(f"mask must be ({B}, {L}) or {tuple(input_ids.shape)}, got {tuple(mask.shape)}")
        h = self.encoder(input_ids) * math.sqrt(self.config.d_model)  # (B, L, H)
        if counts is not None:
            if counts.ndim != 2 or counts.shape[0] != B or counts.shape[1] > L - 1:
                raise InputError(f"counts must be ({B}, <= {L - 1}), got {tuple(counts.shape)}")
            n = counts.shape[1]
            w = torch.softmax(self.count_encoder(counts.to(h.dtype)[..., None]), dim=-1)  # (B, n, n_bins)
            h = torch.cat([h[:, :n] + w @ self.bin_encoder.weight, h[:, n:]], dim=1)  # (B, L, H)
        out = self.decoder(self.transformer_encoder(h))  # (B, L, E)
        return out, F.normalize(out[:, 0], dim=1), out[:, -1]

    def token_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Sentence ids (B, P) (position 0 = CLS) -> forward's input (B, P + 1, D)."""
        B = ids.shape[0]
        genes = F.normalize(self.pe_embedding(ids[:, 1:].long()), dim=-1)  # (B, P-1, D)
        return torch.cat([self.cls_token.expand(B, 1, -1), genes, self.dataset_token.expand(B, 1, -1)], dim=1)

    def predict_expression(self, cell_emb: torch.Tensor, gene_ids: torch.Tensor, read_depth: torch.Tensor,
                           dataset_emb: torch.Tensor) -> torch.Tensor:
        """``binary_decoder`` head -> (B, Q) raw outputs. **Never checked against arc-state.**

        Input per (cell, query gene): ``[encoder(raw table row) (H) | cell_emb (E) | read_depth (1) |
        dataset_embedder(dataset_emb) (10)]`` (the facts file's layout; arc's transform never calls
        this head). ``cell_emb`` (B, E) is forward's unit-norm embedding, ``gene_ids`` (B, Q) table
        rows, ``read_depth`` (B,) arc's "rda" (its collator field 6 was observed to equal the sum of
        the log1p values of the cell's target genes; how arc scales it is not recorded),
        ``dataset_emb`` (B, E) forward's third output.
        """
        Q = gene_ids.shape[1]
        g = self.gene_embedding_layer(self.pe_embedding(gene_ids.long()))  # (B, Q, H)
        per_cell = torch.cat([cell_emb, read_depth.reshape(-1, 1).to(cell_emb.dtype),
                              self.dataset_embedder(dataset_emb)], dim=1)  # (B, E + 1 + 10)
        z = torch.cat([g, per_cell[:, None].expand(-1, Q, -1)], dim=-1)  # (B, Q, H + E + 11)
        return self.binary_decoder(z).squeeze(-1)

    # ---------------------------------------------------------------- data
    def gene_index(self, names: list[str]) -> np.ndarray:
        """Input gene names -> gene-table rows (-1 = not in the table). Needs ``genes``."""
        if self.genes is None:
            raise InputError("this model has no gene names (genes=None)")
        pos = {g: i for i, g in enumerate(self.genes)}
        return np.array([pos.get(str(n), -1) for n in names], dtype=np.int64)

    def sentences(self, counts_rows: sp.csr_matrix | np.ndarray, gene_idx: np.ndarray,
                  rng: np.random.Generator | None = None, dataset_index: int = 0) -> dict[str, torch.Tensor]:
        """Raw rows (B, C) -> arc's batch: ``ids`` (B, P) table rows, ``counts`` (B, P) float32,
        ``input_ids`` (B, P + 1, D), ``mask`` (B, P + 1) all False, ``dataset_nums`` (B,).

        ``gene_idx`` (C,) maps input columns to table rows (-1 = not in the table). See the module
        docstring for the log rule, tie rule and the fill-in with unexpressed genes (drawn from
        ``rng``; default ``np.random.default_rng(0)``, so calls are reproducible).
        """
        cfg, P = self.config, self.config.pad_length
        gidx = np.asarray(gene_idx, dtype=np.int64)
        X = counts_rows.toarray() if sp.issparse(counts_rows) else np.asarray(counts_rows)
        X = np.ascontiguousarray(X, dtype=np.float32)
        X = X[None] if X.ndim == 1 else X  # (B, C)
        if X.shape[1] != gidx.shape[0]:
            raise InputError(f"rows have {X.shape[1]} columns but gene_idx has {gidx.shape[0]}")
        if ((gidx < -1) | (gidx >= cfg.n_genes)).any():
            raise InputError(f"gene_idx values must be in [-1, {cfg.n_genes})")
        mapped = np.flatnonzero(gidx >= 0)
        if mapped.size == 0:
            raise InputError("no input column maps to the gene table")
        rng = rng if rng is not None else np.random.default_rng(0)
        ids = np.empty((X.shape[0], P), dtype=np.int64)
        feats = torch.empty(X.shape[0], P, dtype=torch.float32)
        for r, row in enumerate(torch.from_numpy(X)):
            v = torch.log1p(row) if float(row.max()) > cfg.raw_count_max else row  # (C,)
            vn = v.numpy()
            expr = mapped[vn[mapped] > 0]
            top = expr[np.lexsort((gidx[expr], -vn[expr]))][: P - 1]  # descending value, ties: lower table row
            if top.size < P - 1:
                pool = mapped[vn[mapped] <= 0]
                pool = pool if pool.size else mapped
                top = np.concatenate([top, rng.choice(pool, size=P - 1 - top.size, replace=True)])
            ids[r, 0], ids[r, 1:] = cfg.cls_token_idx, gidx[top]
            cls_v = v[cfg.cls_token_idx : cfg.cls_token_idx + 1] if cfg.cls_token_idx < v.shape[0] else v.new_zeros(1)
            total = v.sum()
            sel = torch.cat([cls_v, v[torch.from_numpy(top)]])  # (P,)
            feats[r] = sel / total * 100 if float(total) != 0 else torch.zeros_like(sel)
        ids_t = torch.from_numpy(ids)
        with torch.no_grad():
            x = self.token_vectors(ids_t.to(self.cls_token.device))
        return {"ids": ids_t, "counts": feats, "input_ids": x, "mask": torch.zeros(x.shape[:2], dtype=torch.bool),
                "dataset_nums": torch.full((X.shape[0],), dataset_index, dtype=torch.int32)}

    @torch.no_grad()
    def embed_rows(self, counts_rows: sp.csr_matrix | np.ndarray, gene_idx: np.ndarray, batch_size: int = 64,
                   dataset_index: int = 0, rng: np.random.Generator | None = None) -> np.ndarray:
        """``state emb transform`` on rows (n, C) -> X_state float32 (n, E + ds_emb_dim)."""
        if batch_size < 1:
            raise InputError(f"batch_size must be >= 1, got {batch_size}")
        rng = rng if rng is not None else np.random.default_rng(0)
        was_training = self.training
        self.eval()
        dev = self.cls_token.device
        out = []
        try:
            for i in range(0, counts_rows.shape[0], batch_size):
                s = self.sentences(counts_rows[i : i + batch_size], gene_idx, rng=rng, dataset_index=dataset_index)
                _, emb, ds = self(s["input_ids"], s["mask"].to(dev), s["counts"].to(dev), s["dataset_nums"].to(dev))
                out.append(torch.cat([emb, self.dataset_embedder(ds)], dim=1).float().cpu().numpy())
        finally:
            self.train(was_training)
        width = self.config.output_dim + self.config.ds_emb_dim
        return np.concatenate(out) if out else np.zeros((0, width), dtype=np.float32)

    def embed(self, adata: Any, key: str | None = "X_state", *, layer: str | None = None, batch_size: int = 64,
              hgnc: str | Path | None = None, device: str = "cpu") -> np.ndarray:
        """``state emb transform`` on an in-memory AnnData: X_state (n, E + 10), also put in ``adata.obsm[key]``.

        Raw values of X (or ``layer``) are read in batches; genes are matched to the gene table by
        var_names (through HGNC with ``hgnc``). ``key=None`` only returns the embeddings.
        """
        from celltwin.api import _Cells, _source
        from celltwin.models.arc_se_embed import embed_source

        source = _source(_Cells.of(adata, layer))
        emb = embed_source(self, source, batch_size=batch_size, device=device, hgnc=hgnc, log=lambda _m: None,
                           where="adata")
        if key is not None:
            adata.obsm[key] = emb
        return emb

    # ---------------------------------------------------------------- files
    def save_pretrained(self, directory: str | Path) -> None:
        """``model.safetensors`` (arc's keys) + ``config.json`` (``"arch": "arc-state"``) + ``genes.txt``."""
        from safetensors.torch import save_file

        from celltwin.data.preprocess import write_genes_txt

        path = Path(directory)
        path.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous().clone() for k, v in self.state_dict().items()}  # unshare aliases
        with atomic_path(path / "model.safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": _FORMAT})
        if self.genes is not None:
            write_genes_txt(path / "genes.txt", self.genes)
        meta = {"arch": self.arch, "format": _FORMAT, "config": self.config.to_dict()}
        with atomic_path(path / "config.json") as tmp:
            Path(tmp).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> ArcStateEmbedding:
        """Load a directory written by :meth:`save_pretrained`."""
        from safetensors.torch import load_file

        from celltwin.data.preprocess import read_genes_txt

        path = Path(directory)
        cfg_file = path / "config.json"
        if not cfg_file.is_file():
            raise InputError(f"{path} is not an arc-state SE model directory (no config.json)")
        meta = json.loads(cfg_file.read_text())
        if meta.get("arch") != cls.arch:
            raise InputError(f"{cfg_file}: arch {meta.get('arch')!r}, expected {cls.arch!r}")
        known = {f.name for f in fields(ArcSEConfig)}
        config = ArcSEConfig(**{k: v for k, v in meta["config"].items() if k in known})
        genes = read_genes_txt(path / "genes.txt") if (path / "genes.txt").is_file() else None
        model = cls(config, genes)
        model.load_state_dict(load_file(str(path / "model.safetensors")))
        return model.to(map_location).eval()
