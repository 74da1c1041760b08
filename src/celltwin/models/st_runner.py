"""Train / predict glue of the ST model for the model registry (model name ``state``).

* :func:`train_state` (``request: celltwin.predict.TrainRequest``) trains
  :class:`~celltwin.models.state_transition.StateTransition` on the request's training cells
  (model space, log1p) with the shared loop :func:`celltwin.train.fit` and writes
  ``RUN/state/{model.safetensors,config.json,vocab.json}`` plus ``RUN/train/`` (checkpoints,
  ``metrics.csv``, TensorBoard). Options come from ``celltwin train --set key=value`` and are
  parsed by :class:`StateOptions` (``--set preset=small --set steps=400 --set lr=1e-3``).
* :func:`load_state` (``run_dir``) returns a :class:`StatePredictor` (registry ``load_fn``).

Training sets come from :class:`celltwin.data.sampler.CellSetSampler` through
:class:`celltwin.data.torch_sets.CellSetDataset` and a DataLoader (``num_workers`` processes;
default one for files), each set's rows read from disk and normalised when it is drawn
(:class:`celltwin.models.st_data.SetReader`): nothing holds the training matrix, and under DDP
each rank reads only the rows of its own sets. One (context, perturbation) group per set,
controls matched in the same context, or context and batch with ``match=batch``; control ->
control sets included, so the control label is perturbation 0 and teaches the identity. Each
optimiser step sees ``batch_sets`` sets of ``set_size`` cells. Inputs and outputs follow the
run's :class:`celltwin.data.inputs.InputConfig`: every gene, ``--hvg`` genes (decoded to every
gene with output space ``all``), an ``obsm`` matrix (``--embed-key``) or SE embeddings. With ``val_pairs=N``, N random (context, perturbation) groups are held out
and scored every ``val_every`` steps (and at the end) with :func:`celltwin.eval.evaluate`
(``overlap_at_N``, ``discrimination_score_l1``, ``mae`` means, logged under ``val``). Under
torchrun (``WORLD_SIZE > 1``) every rank gets its own disjoint share of each epoch's sets and
rank 0 writes the files.

Prediction: the given control cells are shuffled with the caller's ``rng`` and cut into
``ceil(n / set_size)`` near-equal sets, each mapped by the model (so every cell of a set sees
the same perturbation), then put back in the input order. A perturbation outside the training
vocabulary gets the control cells back unchanged (``describe`` says ``fallback:control``),
unless the run encodes perturbations by gene-embedding vectors (``pert_embeddings=TABLE``, any
:func:`celltwin.genes.load_gene_table` format): then an unseen gene found in that table (by
name, or through ``pert_hgnc``) is encoded by its vector and predicted by the model
(``describe``: ``model:gene-embedding``). The table is read again from its recorded path at
predict time (it can be large: it is not copied into the run);
a combination ``A+B`` is encoded as the sum of its members' one-hot inputs, so an unseen
combination of seen genes is predicted by the model; a context outside the vocabulary uses the
"unknown context" token, trained by dropping the context token of a set with probability
``context_dropout``. Predicted values below
``zero_below`` are written as exact zeros (the output never reaches 0 exactly; without this
snap the evaluator's rank test would call every sparse gene differentially expressed).

**ST on SE embeddings** (``--set input_space=embedding``, or ``celltwin train --input-space
embedding``): every training cell is first embedded by a State Embedding model
(:mod:`celltwin.models.state_embedding`), block by block into ``RUN/state/se_embeddings.npy``
(read as a memmap); ST maps the *embedded* control set to the embedded
perturbed set and a learned gene decoder (in the ST model) maps each predicted embedding to the
run's genes, so predictions are gene-space cells scored by ``celltwin eval`` like any other.
By default the decoder is residual (``STConfig.decoder_residual``): a predicted cell is its basal
cell's genes plus ``dec(predicted embedding) - dec(basal embedding)`` (in softplus space), so the
embedding carries the perturbation and the cell keeps the detail a small embedding cannot hold.
The loss is the set loss on embeddings plus ``gene_loss_weight`` x the same loss on the decoded
genes against the observed perturbed cells. The SE model is ``se_model`` (a directory from
``celltwin embed fit``, copied into ``RUN/state/se`` so the run is self-contained), or, when
``se_model`` is empty, one fitted on the run's training cells first (``se_preset``,
``se_steps``, ``se_batch``, ``se_lr``; written to ``RUN/state/se``, resumable like the rest).
Normalisation bridge (:class:`SEBridge`): the run's cells are ``log1p(x / total * T_run)`` and
an SE model fitted on counts expects ``log1p(x / total * T_se)``; both totals are over all the
file's genes, so ``log1p(expm1(v) * T_se / T_run)`` converts exactly. When either side was
fitted on already log-normalised data the values are used as they are (recorded in run.json).
SE genes that are not among the run's genes are fed as zero expression, as ``celltwin embed
transform`` does for genes missing from a file; the share found is recorded, and no overlap at
all is an error. Design choice: the predictor embeds the control cells it is given (instead of
reading a precomputed ``obsm["X_state"]``), so ``celltwin predict`` takes the same inputs for
every model and ``--controls`` works unchanged.
"""

from __future__ import annotations

import json
import math
import typing
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celltwin._constants import BATCH_COL, COMBO_SEP, CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError
from celltwin.losses import LOSSES
from celltwin.models.state_transition import PRESETS, StateTransition, STConfig
from celltwin.train import TrainConfig, cleanup_distributed, fit, init_distributed, seed_everything

__all__ = ["StateOptions", "train_state", "train_state_se", "load_state", "StatePredictor", "parse_loss", "split_combo", "DEMO_OPTIONS"]

MODEL_SUBDIR = "state"
TRAIN_SUBDIR = "train"
SE_SUBDIR = "se"  # RUN/state/se: the SE model of an embedding-space run
_INPUT_SPACES = ("expression", "embedding")

#: ``--set`` options the demo uses (simulator preset ``demo``: 1,500 genes; ~40-50 s on a shared 2-core CPU;
#: one torch thread because OpenMP spin-waiting makes 2 threads 10-40x slower on an oversubscribed machine).
DEMO_OPTIONS: dict[str, str] = {"preset": "small", "steps": "250", "batch_sets": "8", "lr": "2e-3",
                                "progress": "false", "tensorboard": "false", "threads": "1"}
#: per registered model name (read by celltwin.demo.model_options before DEMO_OPTIONS)
DEMO_OPTIONS_FOR: dict[str, dict[str, str]] = {
    "state-se": {**DEMO_OPTIONS, "input_space": "embedding", "se_preset": "tiny", "se_steps": "200",
                 "se_batch": "64"},
}


def parse_loss(spec: str) -> dict[str, float]:
    """``"energy"`` or ``"energy:1,mse:0.1"`` -> ``{"energy": 1.0, "mse": 0.1}``."""
    out: dict[str, float] = {}
    for part in spec.split(","):
        name, _, w = part.strip().partition(":")
        if name not in LOSSES:
            raise ConfigError(f"state option loss: expected names from {LOSSES} (e.g. 'energy:1,mse:0.1'), got {spec!r}")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise ConfigError(f"state option loss: weight of {name!r} must be a number, got {w!r}") from None
    return out


@dataclass
class StateOptions:
    """Options of ``celltwin train --model state`` (``--set key=value``; 0 / "" = the preset's value)."""

    preset: str = "small"  # tiny | small | state (the published configuration)
    steps: int = 400  # optimiser steps
    batch_sets: int = 8  # sets per optimiser step (per process)
    set_size: int = 0  # cells per set (0 = preset's)
    hidden: int = 0
    n_layers: int = 0
    n_heads: int = 0
    mlp_hidden: int = 0
    dropout: float = 0.0
    loss: str = "energy"  # e.g. "energy:1,mse:0.1"
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup: int = 20
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    grad_accum: int = 1
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    device: str = "auto"  # auto | cpu | cuda
    match: str = "random"  # control matching: random (same context) | batch (same context and batch)
    context_dropout: float = 0.1  # probability of hiding a set's context token (teaches "unknown")
    zero_below: float = 0.01  # predicted values below this are written as 0
    ckpt_every: int = 0  # checkpoint every N steps (0 = at the end only)
    resume: bool = True  # continue from RUN/train/checkpoints when present
    log_every: int = 10
    val_pairs: int = 0  # hold out N (context, perturbation) groups for validation with celltwin.eval
    val_every: int = 0  # validate every N steps (0 = at the end when val_pairs > 0)
    threads: int = 0  # torch CPU threads (0 = torch's default)
    # DataLoader processes reading cell sets from disk (0 = in the training process; -1 = auto:
    # 1 for data read from files, 0 for an in-memory AnnData). One worker overlaps reading with the
    # step on a 2-core machine (bench/RESULTS.md, "Scale"); more help where cores are spare. The
    # sets do not depend on it (same weights for any value).
    num_workers: int = -1
    progress: bool = True
    tensorboard: bool = True
    # --- ST on SE embeddings (input_space=embedding)
    input_space: str = "expression"  # expression | embedding (SE cell embeddings, decoded to genes)
    se_model: str = ""  # SE model directory (`celltwin embed fit`); "" = fit one on the training cells
    se_preset: str = "tiny"  # size of the SE fitted in the run: tiny | small | published
    se_steps: int = 300  # optimiser steps of the SE fitted in the run
    se_batch: int = 64  # cells per step of the SE fitted in the run
    se_lr: float = 1e-3  # peak learning rate of the SE fitted in the run
    # weight of the decoded-genes loss (embedding input). SE embeddings are unit-norm, so the
    # embedding-space energy is ~100x smaller than the gene-space one; measured on the demo
    # (`celltwin demo`, SE tiny, 200 steps): weight 1 -> score 0.027, 10 -> 0.243, 50 -> 0.277, 200 -> 0.280
    gene_loss_weight: float = 50.0
    decoder_residual: bool = True  # embedding input: genes = basal genes + dec(pred) - dec(basal) (else dec(pred))
    # --- perturbations as gene-embedding vectors (unseen perturbations reachable)
    pert_embeddings: str = ""  # gene table (celltwin.genes.load_gene_table formats); "" = one-hot
    pert_hgnc: str = ""  # HGNC table (hgnc_genes.tsv) to match perturbation names through aliases

    def __post_init__(self) -> None:
        from celltwin.models.state_embedding import SE_PRESETS

        if self.preset not in PRESETS:
            raise ConfigError(f"state option preset: expected one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.input_space not in _INPUT_SPACES:
            raise ConfigError(f"state option input_space: expected one of {', '.join(_INPUT_SPACES)}, "
                              f"got {self.input_space!r}")
        if self.se_preset not in SE_PRESETS:
            raise ConfigError(f"state option se_preset: expected one of {', '.join(SE_PRESETS)}, got {self.se_preset!r}")
        if self.se_model and not (Path(self.se_model) / "config.json").is_file():
            raise ConfigError(f"state option se_model: {self.se_model} is not an SE model directory "
                              f"(expected config.json from `celltwin embed fit`)")
        if self.se_model and self.input_space != "embedding":
            raise ConfigError("state option se_model: only used with input_space=embedding")
        for name in ("se_steps", "se_batch"):
            if getattr(self, name) < 1:
                raise ConfigError(f"state option {name}: expected >= 1, got {getattr(self, name)}")
        if not self.se_lr > 0:
            raise ConfigError(f"state option se_lr: expected > 0, got {self.se_lr}")
        if self.gene_loss_weight < 0:
            raise ConfigError(f"state option gene_loss_weight: expected >= 0, got {self.gene_loss_weight}")
        for name in ("pert_embeddings", "pert_hgnc"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ConfigError(f"state option {name}: file {getattr(self, name)} not found")
        if self.pert_hgnc and not self.pert_embeddings:
            raise ConfigError("state option pert_hgnc: only used with pert_embeddings")
        # absolute paths: predict reads the gene table again, possibly from another directory
        for name in ("pert_embeddings", "pert_hgnc", "se_model"):
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).resolve()))
        for name in ("steps", "batch_sets"):
            if getattr(self, name) < 1:
                raise ConfigError(f"state option {name}: expected >= 1, got {getattr(self, name)}")
        if self.num_workers < -1:
            raise ConfigError(f"state option num_workers: expected >= 0 or -1 (auto), got {self.num_workers}")
        for name in ("set_size", "hidden", "n_layers", "n_heads", "mlp_hidden", "val_pairs", "threads"):
            if getattr(self, name) < 0:
                raise ConfigError(f"state option {name}: expected >= 0, got {getattr(self, name)}")
        if not 0 <= self.context_dropout < 1:
            raise ConfigError(f"state option context_dropout: expected in [0, 1), got {self.context_dropout}")
        parse_loss(self.loss)

    @classmethod
    def from_strings(cls, options: dict[str, str]) -> StateOptions:
        """Typed options from ``--set`` strings; unknown keys and bad values raise ConfigError."""
        hints = typing.get_type_hints(cls)
        known = {f.name for f in fields(cls)}
        bad = sorted(set(options) - known)
        if bad:
            raise ConfigError(f"state: unknown option(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")
        kw: dict[str, Any] = {}
        for k, v in options.items():
            t = hints[k]
            try:
                if t is bool:
                    low = str(v).lower()
                    if low not in ("1", "0", "true", "false", "yes", "no"):
                        raise ValueError(v)
                    kw[k] = low in ("1", "true", "yes")
                else:
                    kw[k] = t(v)
            except ValueError:
                raise ConfigError(f"state option {k}: expected {t.__name__}, got {v!r}") from None
        return cls(**kw)

    def model_config(self, input_dim: int, n_perts: int, n_contexts: int, n_genes: int = 0,
                     pert_emb_dim: int = 0, input_space: str | None = None, output_space: str = "") -> STConfig:
        over: dict[str, Any] = {"input_dim": input_dim, "n_perts": n_perts, "n_contexts": n_contexts,
                                "pert_emb_dim": pert_emb_dim,
                                "dropout": self.dropout, "loss_weights": parse_loss(self.loss),
                                "input_space": input_space or self.input_space,
                                "output_space": output_space,
                                "gene_loss_weight": self.gene_loss_weight,
                                "decoder_residual": self.decoder_residual, "n_genes": n_genes}
        for name in ("set_size", "hidden", "n_layers", "n_heads", "mlp_hidden"):
            if getattr(self, name):
                over[name] = getattr(self, name)
        return STConfig.from_preset(self.preset, **over)


def split_combo(label: str) -> list[str]:
    """Members of a perturbation label: ``"A+B"`` -> ``["A", "B"]``, ``"A"`` -> ``["A"]``."""
    return [m for m in str(label).split(COMBO_SEP) if m]


def _member_table(labels: list[str], member_ids: dict[str, int]) -> torch.Tensor:
    """(L, K) member ids of each full label (-1 padded); the model's combination input."""
    members = [[member_ids[m] for m in split_combo(lab)] if lab != CONTROL_LABEL else [0] for lab in labels]
    k = max(len(m) for m in members)
    return torch.tensor([m + [-1] * (k - len(m)) for m in members], dtype=torch.long)


def _make_step(context_dropout: float, members: torch.Tensor):
    """The loop's step function: forward on the (possibly DDP-wrapped) model, ST loss parts.

    The context token of a set is replaced by "unknown" (id 0) with probability
    ``context_dropout`` (torch's global RNG: restored on resume, so resumption stays exact).
    A batch holds ``ctrl`` / ``pert`` (B, S, D) in the input space, and ``ctrl_genes`` /
    ``pert_genes`` (B, S, G) when the model decodes to genes (output space ``all``): the basal
    genes feed the residual decoder, the perturbed genes the decoded-genes loss.
    """
    from celltwin.train import unwrap

    def step(model: torch.nn.Module, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        ctx = batch["context_idx"]  # (B,)
        if context_dropout > 0:
            drop = torch.rand(ctx.shape, device=ctx.device) < context_dropout
            ctx = torch.where(drop, torch.zeros_like(ctx), ctx)
        pid = members.to(ctx.device)[batch["pert_idx"]]  # (B, K) member ids of the set's label
        out = model(batch["ctrl"], pid, ctx, ctrl_genes=batch.get("ctrl_genes"))
        return unwrap(model).loss(out, batch["pert"], batch.get("pert_genes"))

    return step


@dataclass
class SEBridge:
    """Run-space cells -> SE cell embeddings (see the module docstring, "Normalisation bridge").

    ``cols[j]``: column of SE gene j in the run's genes (-1 = absent, fed as 0); ``scale``:
    ``T_se / T_run`` applied as ``log1p(expm1(v) * scale)``, ``None`` = values used as they are.
    """

    model: Any  # celltwin.models.state_embedding.StateEmbeddingModel
    cols: np.ndarray  # (G_se,) int64
    scale: float | None
    note: str = ""
    batch_size: int = 512

    @classmethod
    def build(cls, model: Any, se_dir: Path, run_genes: list[str], run_pre: Any) -> SEBridge:
        from celltwin.data.preprocess import Preprocessing

        pos = {g: i for i, g in enumerate(run_genes)}
        cols = np.array([pos.get(g, -1) for g in model.genes], dtype=np.int64)
        found = int((cols >= 0).sum())
        if found == 0:
            raise InputError(f"SE model {se_dir}: none of its {len(model.genes)} genes is among the run's "
                             f"{len(run_genes)} genes (first run genes: {', '.join(run_genes[:5])})")
        se_pre = Preprocessing.load(se_dir) if (se_dir / "preprocess.json").exists() else None
        t_run = getattr(run_pre, "target_sum", None)
        t_se = getattr(se_pre, "target_sum", None)
        log_ok = getattr(run_pre, "log1p", True) and getattr(se_pre, "log1p", True)
        if t_run is not None and t_se is not None and log_ok:
            scale = None if t_se == t_run else float(t_se) / float(t_run)
            note = f"log1p(expm1(v) * {t_se:.6g} / {t_run:.6g})" if scale is not None else "same normalisation"
        else:
            scale = None
            note = ("values used as they are (the SE model or the run was fitted on log-normalised input, "
                    "e.g. an SE fitted on this run's own cells)")
        note = f"{found}/{len(model.genes)} SE genes found among the run's genes; {note}"
        return cls(model=model, cols=cols, scale=scale, note=note)

    @property
    def dim(self) -> int:
        return int(self.model.config.d_out)

    def __post_init__(self) -> None:
        # row hash -> embedding: prediction draws the same control cells again for every
        # perturbation (and repeat_mean repeats one row), so each distinct cell is embedded once
        self._cache: dict[bytes, np.ndarray] = {}

    @torch.no_grad()
    def embed(self, x: np.ndarray, cache: bool = False) -> np.ndarray:
        """(n, G_run) float32 run space -> (n, E) float32 SE embeddings (batched, eval mode).

        ``cache``: reuse the embedding of rows seen before (keyed by a 128-bit BLAKE2 hash of the
        row's bytes; the SE embedding is deterministic at inference); at most ~1,000,000 kept.
        """
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not cache:
            return self._embed_rows(x)
        import hashlib

        if len(self._cache) > 1_000_000:
            self._cache.clear()
        keys = [hashlib.blake2b(x[i].tobytes(), digest_size=16).digest() for i in range(x.shape[0])]
        first: dict[bytes, int] = {}
        todo = [i for i, k in enumerate(keys) if k not in self._cache and first.setdefault(k, i) == i]
        if todo:
            for i, e in zip(todo, self._embed_rows(x[todo]), strict=True):
                self._cache[keys[i]] = e
        return np.stack([self._cache[k] for k in keys]) if keys else np.empty((0, self.dim), np.float32)

    def _embed_rows(self, x: np.ndarray) -> np.ndarray:
        from celltwin.models.se_runner import embed_rows

        m = self.model
        was_training = m.training
        m.eval()
        device = next(m.parameters()).device
        present = self.cols >= 0
        out = np.empty((x.shape[0], self.dim), dtype=np.float32)
        for start in range(0, x.shape[0], self.batch_size):
            blk = x[start:start + self.batch_size]
            v = np.zeros((blk.shape[0], self.cols.size), dtype=np.float32)  # (b, G_se)
            v[:, present] = blk[:, self.cols[present]]
            if self.scale is not None:
                v = np.log1p(np.expm1(v.astype(np.float64)) * self.scale).astype(np.float32)
            out[start:start + blk.shape[0]] = embed_rows(m, v, None, device)
        if was_training:
            m.train()
        return out


def _load_pert_genes(path: str, hgnc: str) -> tuple[Any, Any]:
    from celltwin.genes import HgncIndex, load_gene_table

    return load_gene_table(path), (HgncIndex.from_tsv(hgnc) if hgnc else None)


def _pert_table(opts: StateOptions, pert_vocab: list[str]) -> torch.Tensor:
    """(P, E) perturbation inputs: row 0 (control) = zeros (no perturbation), then each gene's vector.

    Every perturbed gene of the training data must have a vector (an InputError names the
    missing ones): a silent zero or random row would make the gene indistinguishable from control.
    """
    from celltwin.genes import align_gene_table

    table, hgnc = _load_pert_genes(opts.pert_embeddings, opts.pert_hgnc)
    genes = pert_vocab[1:]
    vec, found, _ = align_gene_table(table, genes, hgnc)
    if not found.all():
        missing = [g for g, f in zip(genes, found, strict=True) if not f]
        raise InputError(f"state option pert_embeddings: {opts.pert_embeddings} has no vector for {len(missing)} of "
                         f"the {len(genes)} perturbed genes of the training data ({', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}); use a table that covers them (pert_hgnc maps "
                         "aliases) or leave those perturbations out of the split")
    return torch.from_numpy(np.vstack([np.zeros((1, table.dim), np.float32), vec]))


def _se_for_run(opts: StateOptions, request: Any, run_dir: Path) -> tuple[Any, str]:
    """The SE model of an embedding-space run: copied from ``opts.se_model`` or fitted on the training rows.

    Both end in ``RUN/state/se``; returns ``(model, how)``. A fitted SE reads the training rows
    from disk in batches (``celltwin embed fit``'s loader), like everything else here.
    """
    import shutil

    from celltwin.models.state_embedding import StateEmbeddingConfig, StateEmbeddingModel

    se_dir = run_dir / MODEL_SUBDIR / SE_SUBDIR
    if opts.se_model:
        src = Path(opts.se_model)
        model = StateEmbeddingModel.from_pretrained(src)
        if src.resolve() != se_dir.resolve():
            se_dir.mkdir(parents=True, exist_ok=True)
            for f in src.iterdir():  # the model files only (not checkpoints / metrics of its training)
                if f.is_file() and f.suffix in (".json", ".txt", ".safetensors"):
                    shutil.copyfile(f, se_dir / f.name)
        return model, f"copied from {src}"
    from celltwin.models.se_runner import fit_state_embedding
    from celltwin.train import TrainConfig

    cfg = StateEmbeddingConfig.preset(opts.se_preset, seed=request.seed)
    tcfg = TrainConfig(max_steps=opts.se_steps, lr=opts.se_lr, warmup_steps=min(opts.se_steps // 20, opts.se_steps),
                       device=opts.device, seed=request.seed, ckpt_every=opts.ckpt_every, resume=opts.resume,
                       progress=opts.progress, tensorboard=False, precision=opts.precision)
    res = fit_state_embedding(request.data, se_dir, config=cfg, train_config=tcfg, batch_size=opts.se_batch,
                              cells=np.asarray(request.rows), log=lambda _m: None)
    return res.model, f"fitted on the training cells ({opts.se_preset}, {opts.se_steps} steps)"


def _labels(request: Any) -> Any:
    """CellLabels of the request's training rows (global row ids)."""
    from celltwin.data.matching import CellLabels

    obs = request.obs
    return CellLabels(rows=np.asarray(request.rows, dtype=np.int64),
                      pert=obs[PERT_COL].to_numpy(dtype=object).astype(str),
                      context=obs[CONTEXT_COL].to_numpy(dtype=object).astype(str),
                      batch=obs[BATCH_COL].to_numpy(dtype=object).astype(str) if BATCH_COL in obs
                      else np.full(len(obs), "all", dtype=object).astype(str),
                      control_label=CONTROL_LABEL, where="training data")


def _worker_init(_worker_id: int) -> None:
    # a DataLoader worker only reads and normalises rows: one thread each, so that the workers
    # never compete with the training process's own matrix-product threads
    torch.set_num_threads(1)


def train_state(request: Any) -> dict:
    """Registry ``train_fn``: fit ST on the request's training rows (read from disk per set)."""
    from torch.utils.data import DataLoader

    from celltwin.data.sampler import CellSetSampler, SetSamplerConfig
    from celltwin.data.torch_sets import CellSetDataset
    from celltwin.data.vocab import Vocab, Vocabularies
    from celltwin.models.st_data import SE_CACHE, SetReader, build_se_cache

    opts = StateOptions.from_strings(dict(request.options))
    if opts.threads:
        torch.set_num_threads(opts.threads)
    run_dir = Path(request.run_dir)
    pre = request.preprocess
    genes = list(pre.genes)  # output genes (model space)
    if opts.input_space == "embedding" and (request.embed_key or request.input_genes is not None):
        raise ConfigError("state option input_space=embedding (SE embeddings): --embed-key / --hvg do not apply")
    if opts.match == "batch" and len(set(request.obs[BATCH_COL].tolist())) <= 1:
        raise ConfigError(f"state option match=batch: the training data has no obs[{BATCH_COL!r}] column")
    labels = _labels(request)
    perts = sorted(set(labels.pert.tolist()) - {CONTROL_LABEL})
    contexts = sorted(set(labels.context.tolist()))
    if not perts:
        raise InputError("training data: no perturbed cells (only controls)")
    label_vocab = [CONTROL_LABEL] + perts  # full labels (the dataset's ids), control first
    # the model's perturbation vocabulary: control (id 0, identity) + single genes; "A+B" = A and B
    pert_vocab = [CONTROL_LABEL] + sorted({m for p in perts for m in split_combo(p)} - {CONTROL_LABEL})
    ctx_vocab = ["<unknown>"] + contexts  # id 0 = unknown context

    val_groups: list[tuple[str, str]] = []
    train_mask = np.ones(len(labels), bool)
    if opts.val_pairs:
        all_groups = sorted(labels.groups().keys())
        if opts.val_pairs >= len(all_groups):
            raise ConfigError(f"state option val_pairs={opts.val_pairs}: only {len(all_groups)} "
                              f"(context, perturbation) groups to train on")
        pick = np.random.default_rng([request.seed, 11]).choice(len(all_groups), opts.val_pairs, replace=False)
        val_groups = [all_groups[i] for i in sorted(pick)]
        for c, p in val_groups:
            train_mask &= ~((labels.context == c) & (labels.pert == p))

    info = init_distributed(opts.device)
    input_idx = None
    if request.input_genes is not None:
        pos = {g: i for i, g in enumerate(genes)}
        input_idx = np.array([pos[g] for g in request.input_genes], dtype=np.int64)
    decode = request.output_space == "all" or opts.input_space == "embedding"
    bridge, se_how, se_cache = None, "", None
    if opts.input_space == "embedding":
        se_model, se_how = _se_for_run(opts, request, run_dir)
        se_model.to(info.device)
        bridge = SEBridge.build(se_model, run_dir / MODEL_SUBDIR / SE_SUBDIR, genes, pre)
        se_cache = run_dir / MODEL_SUBDIR / SE_CACHE
        if info.is_main:
            build_se_cache(bridge, request.data, pre, labels.rows, se_cache)
        from celltwin.train.distributed import barrier

        barrier()
        in_dim = bridge.dim
    elif request.embed_key:
        in_dim = int(request.data.read_rows(labels.rows[:1], obsm_key=request.embed_key).shape[1])
    else:
        in_dim = len(genes) if input_idx is None else int(input_idx.size)
    reader = SetReader(request.data, pre, input_idx=input_idx, embed_key=request.embed_key,
                       se_cache=None if se_cache is None else str(se_cache),
                       se_rows=labels.rows if se_cache is not None else None, decode_genes=decode)
    pert_table = _pert_table(opts, pert_vocab) if opts.pert_embeddings else None
    seed_everything(request.seed)
    input_space = "embedding" if (opts.input_space == "embedding" or request.embed_key) else "expression"
    output_space = "all" if decode else ("embedding" if input_space == "embedding" else "gene")
    cfg = opts.model_config(in_dim, len(pert_vocab), len(contexts), n_genes=len(genes) if decode else 0,
                            pert_emb_dim=0 if pert_table is None else int(pert_table.shape[1]),
                            input_space=input_space, output_space=output_space)
    vocab = {"genes": genes, "perturbations": pert_vocab, "contexts": ctx_vocab}
    if request.input_genes is not None:
        vocab["input_genes"] = list(request.input_genes)
    if request.embed_key:
        vocab["embed_key"] = [request.embed_key]
    model = StateTransition(cfg, pert_table=pert_table, vocab=vocab)
    vocabs = Vocabularies(perturbations=Vocab(label_vocab, "perturbation"),
                          contexts=Vocab(ctx_vocab, "context", unknown=ctx_vocab[0]),
                          batches=Vocab.from_values(labels.batch, "batch"), genes=Vocab(genes, "gene"))
    sampler = CellSetSampler(
        labels.subset(train_mask),
        SetSamplerConfig(set_size=cfg.set_size, seed=request.seed, match=opts.match, control_sets=True),
        rank=info.rank, world_size=info.world_size,
    )
    dataset = CellSetDataset(request.data, sampler, vocabs, reader=reader)
    reader(labels.rows[:2])  # compile the read kernels here: forked DataLoader workers inherit them
    from celltwin.data.source import MemorySource

    in_memory = all(isinstance(s, MemorySource) for s in request.data.sources)
    num_workers = opts.num_workers if opts.num_workers >= 0 else (0 if in_memory else 1)
    if num_workers > 0:
        # an (epoch, index) sampler: each item carries its epoch; workers are started per epoch
        # (not persistent) so that the loop's RNG isolation covers their seeds and resume is exact
        loader = DataLoader(dataset, batch_size=opts.batch_sets, sampler=dataset.epoch_indices(),
                            num_workers=num_workers, persistent_workers=False, prefetch_factor=4,
                            worker_init_fn=_worker_init)
    else:
        loader = DataLoader(dataset, batch_size=opts.batch_sets, shuffle=False, num_workers=0)
    tcfg = TrainConfig(
        max_steps=opts.steps, lr=opts.lr, weight_decay=opts.weight_decay, warmup_steps=min(opts.warmup, opts.steps),
        min_lr_ratio=opts.min_lr_ratio, grad_clip=opts.grad_clip or None, grad_accum=opts.grad_accum,
        precision=opts.precision, device=opts.device, seed=request.seed, out_dir=str(run_dir / TRAIN_SUBDIR),
        ckpt_every=opts.ckpt_every, resume=opts.resume, log_every=opts.log_every,
        val_every=opts.val_every, progress=opts.progress, tensorboard=opts.tensorboard,
    )
    fingerprint = {"model": cfg.to_dict(), "options": asdict(opts), "genes": len(genes), "perts": pert_vocab,
                   "labels": label_vocab, "contexts": ctx_vocab, "seed": request.seed,
                   "data": dict(getattr(request, "fingerprint", {}) or {})}
    # resume refuses another run's checkpoint: data files, rows, preprocessing, model and the
    # options that change the result (celltwin.train.fit compares TrainConfig.fingerprint)
    tcfg.fingerprint = {**{k: v for k, v in fingerprint.items() if k != "options"},
                        "options": _resume_key(fingerprint["options"])}
    val_fn = _make_val_fn(request.data, pre, labels, val_groups, opts, model, bridge, request.embed_key) \
        if val_groups else None
    try:
        members = _member_table(label_vocab, {p: i for i, p in enumerate(pert_vocab)})
        step_fn = _make_step(opts.context_dropout, members)
        res = fit(model, step_fn, loader, tcfg, val_fn=val_fn, dist_info=info,
                  count_fn=lambda b: int(b["pert"].shape[0] * b["pert"].shape[1]), extra_state=fingerprint)
        if info.is_main:
            model.to("cpu").save_pretrained(run_dir / MODEL_SUBDIR)
            vocabs.save(run_dir / MODEL_SUBDIR / "vocabularies.json")
    finally:
        cleanup_distributed()
    return {
        "state": {
            "preset": opts.preset, "n_params": model.n_params(), "steps": res.step,
            "resumed_from": res.resumed_from, "train_seconds": round(res.seconds, 2),
            "cells_per_s": None if res.items_per_s is None else round(res.items_per_s, 1),
            "precision": res.precision,
            "final_losses": res.last_losses, "val": res.last_val,
            "val_pairs": [list(g) for g in val_groups], "world_size": info.world_size,
            "options": asdict(opts), "input_space": input_space, "output_space": output_space,
            "num_workers": num_workers,
            **({"se": {"model": se_how, "bridge": bridge.note, "dim": bridge.dim}} if bridge is not None else {}),
        }
    }


def train_state_se(request: Any) -> dict:
    """Registry ``train_fn`` of ``state-se``: :func:`train_state` with ``input_space=embedding``."""
    from dataclasses import replace

    options = dict(request.options)
    if options.setdefault("input_space", "embedding") != "embedding":
        raise ConfigError(f"model state-se: input_space is 'embedding', got {options['input_space']!r} "
                          "(use --model state for expression input)")
    return train_state(replace(request, options=options))


def _resume_key(options: dict) -> dict:
    # options that may change between a killed run and its resumption without changing the result
    free = {"resume", "progress", "tensorboard", "threads", "ckpt_every", "log_every", "steps", "val_every",
            "num_workers"}
    return {k: v for k, v in options.items() if k not in free}


#: control cells per context read for validation (a random subset when a context has more)
VAL_MAX_CONTROLS = 2048


def _make_val_fn(data: Any, pre: Any, labels: Any, val_groups: list[tuple[str, str]], opts: StateOptions,
                 model: StateTransition, bridge: SEBridge | None = None, embed_key: str | None = None):
    """Validation: predict the held-out groups from their context's controls, score with celltwin.eval.

    Cells are read from disk at each validation: the held-out groups' real cells and up to
    :data:`VAL_MAX_CONTROLS` control cells per context (a fixed random subset, seed 0), so memory
    stays bounded on large screens.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from celltwin.eval import EvalConfig, evaluate

    by_ctx: dict[str, list[str]] = {}
    for c, p in val_groups:
        by_ctx.setdefault(c, []).append(p)
    ctrl_rows = labels.control_rows()
    pick = np.random.default_rng(0)
    ctrl_rows = {c: (np.sort(pick.choice(r, VAL_MAX_CONTROLS, replace=False)) if r.size > VAL_MAX_CONTROLS else r)
                 for c, r in ctrl_rows.items()}

    def val(m: torch.nn.Module, step: int) -> dict[str, float]:
        pred = _Predictor(m, opts.zero_below, bridge)
        if pred.output_space == "embedding":  # no gene output to score
            return {}
        rng = np.random.default_rng(0)
        sums: dict[str, list[float]] = {}
        for c, ps in sorted(by_ctx.items()):
            C = data.read_model(ctrl_rows[c], pre)  # (m, G)
            E = data.read_rows(ctrl_rows[c], obsm_key=embed_key) if embed_key else None
            E = E.toarray() if E is not None and sp.issparse(E) else E
            blocks, lab, real_rows = [], [], []
            for p in ps:
                rows = labels.rows[(labels.context == c) & (labels.pert == p)]
                real_rows.append(rows)
                idx = rng.choice(C.shape[0], size=rows.size, replace=rows.size > C.shape[0])
                kw = {"inputs": E[idx]} if E is not None else {}
                blocks.append(pred.predict(C[idx], p, c, rng, **kw))
                lab += [p] * rows.size
            n_ctrl = C.shape[0]
            plab = lab + [CONTROL_LABEL] * n_ctrl
            pa = ad.AnnData(sp.csr_matrix(np.vstack(blocks + [C])),
                            obs=pd.DataFrame({PERT_COL: plab}, index=[f"p{i}" for i in range(len(plab))]))
            rr = np.concatenate(real_rows)
            rlab = [str(x) for x in labels.pert[np.searchsorted(labels.rows, rr)]] + [CONTROL_LABEL] * n_ctrl
            ra = ad.AnnData(sp.vstack([data.read_model(rr, pre, dense=False), sp.csr_matrix(C)], format="csr"),
                            obs=pd.DataFrame({PERT_COL: rlab}, index=[f"r{i}" for i in range(len(rlab))]))
            res = evaluate(pa, ra, config=EvalConfig(progress=False))
            mean = res.agg.set_index("statistic").loc["mean"]
            for k in ("overlap_at_N", "discrimination_score_l1", "mae"):
                if k in mean:
                    sums.setdefault(k, []).append(float(mean[k]))
        return {k: float(np.mean(v)) for k, v in sums.items()}

    return val


class _Predictor:
    """Set-wise prediction with an in-memory model (shared by validation and :class:`StatePredictor`)."""

    def __init__(self, model: StateTransition, zero_below: float, bridge: SEBridge | None = None,
                 pert_genes: tuple[str, str] | None = None) -> None:
        self.model = model
        self.zero_below = zero_below
        # (table path, hgnc path): where vectors of perturbations unseen in training are looked up
        self.pert_genes = pert_genes
        self._pert_lookup: tuple[Any, Any] | None = None
        self.from_table: set[str] = set()  # genes added from the table after training
        self.bridge = bridge  # embedding input: run-space cells -> SE embeddings
        if (model.config.input_space == "embedding" and not (model.vocab.get("embed_key"))
                and (bridge is None or model.gene_decoder is None)):
            raise ConfigError("ST on SE embeddings needs its SE model and a gene decoder (n_genes > 0)")
        v = model.vocab
        self.genes: list[str] = list(v.get("genes", []))
        self.pert_ids = {p: i for i, p in enumerate(v.get("perturbations", []))}
        self.ctx_ids = {c: i for i, c in enumerate(v.get("contexts", []))}
        self.output_space = model.config.output_space
        self.embed_key = (v.get("embed_key") or [None])[0]
        pos = {g: i for i, g in enumerate(self.genes)}
        self.input_idx = (np.array([pos[g] for g in v["input_genes"]], dtype=np.int64)
                          if v.get("input_genes") else None)
        # names of the predicted columns: the run's genes, or the embedding's dimensions
        self.output_names = (self.genes if self.output_space != "embedding"
                             else [f"{self.embed_key or 'emb'}_{i}" for i in range(model.config.input_dim)])

    def _members(self, perturbation: str) -> list[int] | None:
        """Member ids of a label (None when a member is outside the vocabulary and has no vector)."""
        if perturbation == CONTROL_LABEL:
            return [0]
        ids = [self.pert_ids[m] if m in self.pert_ids else self._add_from_table(m) for m in split_combo(perturbation)]
        return None if (not ids or any(i is None for i in ids)) else ids  # type: ignore[return-value]

    def _add_from_table(self, gene: str) -> int | None:
        """A perturbation unseen in training: append its gene vector to the model's table (inference only)."""
        m = self.model
        if m.pert_table is None or self.pert_genes is None:
            return None
        from celltwin.genes import align_gene_table

        if self._pert_lookup is None:
            path, hgnc = self.pert_genes
            if not Path(path).is_file():
                raise InputError(f"perturbation {gene!r} is not in the trained vocabulary and the gene table the "
                                 f"run was trained with ({path}) is gone; restore it to predict unseen genes")
            self._pert_lookup = _load_pert_genes(path, hgnc)
        table, hgnc_index = self._pert_lookup
        vec, found, _ = align_gene_table(table, [gene], hgnc_index)
        if not found[0]:
            return None
        row = torch.from_numpy(vec).to(m.pert_table.device, m.pert_table.dtype)  # (1, E)
        m.pert_table = torch.cat([m.pert_table, row])  # buffer grows by one row
        self.pert_ids[gene] = m.pert_table.shape[0] - 1
        self.from_table.add(gene)
        return self.pert_ids[gene]

    def describe(self, perturbation: str, context: str | None) -> str:
        members = self._members(perturbation)
        if members is None:
            return "fallback:control"
        src = "model:gene-embedding" if any(g in self.from_table for g in split_combo(perturbation)) else "model"
        return src if context is None or context in self.ctx_ids else f"{src}:unknown-context"

    def _inputs(self, controls: np.ndarray, inputs: np.ndarray | None) -> np.ndarray:
        """The model's input rows for these control cells (genes, HVG columns, obsm rows or SE)."""
        if self.bridge is not None:
            return self.bridge.embed(controls, cache=True)  # (n, E)
        if self.embed_key is not None:
            if inputs is None:
                raise InputError(f"this run reads obsm[{self.embed_key!r}] (--embed-key): give the control "
                                 "cells' embeddings (celltwin predict reads them from the data file)")
            return np.ascontiguousarray(inputs, dtype=np.float32)
        if self.input_idx is not None:
            return np.ascontiguousarray(controls[:, self.input_idx])
        return controls

    @torch.no_grad()
    def predict(self, controls: np.ndarray, perturbation: str, context: str | None,
                rng: np.random.Generator, inputs: np.ndarray | None = None) -> np.ndarray:
        """Predicted cells (n, len(output_names)) for ``controls`` (n, G) model-space genes.

        ``inputs`` (n, D): the control cells' ``obsm[embed_key]`` rows for an ``--embed-key`` run.
        """
        controls = np.asarray(controls, dtype=np.float32)
        n = controls.shape[0]
        ids = self._members(perturbation)
        if ids is None or n == 0:
            if self.output_space == "embedding":
                return self._inputs(controls, inputs).copy()
            return controls.copy()
        m = self.model
        was_training = m.training
        m.eval()
        device = next(m.parameters()).device
        S = m.config.set_size
        order = rng.permutation(n)
        x_in = self._inputs(controls, inputs)  # (n, D)
        key = "genes" if self.output_space == "all" else "pred"
        out = np.empty((n, len(self.output_names)), dtype=np.float32)  # (n, G) or (n, E)
        pid = torch.tensor([ids], device=device)  # (1, K)
        cid = torch.tensor([self.ctx_ids.get(context, 0) if context is not None else 0], device=device)
        for chunk in np.array_split(order, math.ceil(n / S)):
            x = torch.from_numpy(x_in[chunk]).to(device)[None]  # (1, s, D)
            genes = torch.from_numpy(controls[chunk]).to(device)[None] if key == "genes" else None
            y = m(x, pid, cid if m.context_emb is not None else None, ctrl_genes=genes)[key][0]  # (s, G)
            out[chunk] = y.float().cpu().numpy()
        if self.output_space != "embedding":
            out[out < self.zero_below] = 0.0
        if was_training:
            m.train()
        return out


class StatePredictor(_Predictor):
    """Registry Predictor of a trained ST run: ``genes``, ``predict(...)``, ``describe(...)``."""

    def __init__(self, run_dir: str | Path, device: str = "auto") -> None:
        run_dir = Path(run_dir)
        d = run_dir / MODEL_SUBDIR
        model = StateTransition.from_pretrained(d)
        dev = "cuda" if (device == "auto" and torch.cuda.is_available()) else ("cpu" if device == "auto" else device)
        model.to(dev).eval()
        meta = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
        zero_below = float(meta.get("state", {}).get("options", {}).get("zero_below", 0.01))
        bridge = None
        if model.config.input_space == "embedding" and not model.vocab.get("embed_key"):
            from celltwin.data.preprocess import Preprocessing
            from celltwin.models.state_embedding import StateEmbeddingModel

            se_dir = d / SE_SUBDIR
            se = StateEmbeddingModel.from_pretrained(se_dir).to(dev)
            run_pre = Preprocessing.load(run_dir) if (run_dir / "preprocess.json").exists() else None
            bridge = SEBridge.build(se, se_dir, list(model.vocab.get("genes", [])), run_pre)
        opts = meta.get("state", {}).get("options", {})
        pert_genes = (opts["pert_embeddings"], opts.get("pert_hgnc", "")) if opts.get("pert_embeddings") else None
        super().__init__(model, zero_below, bridge, pert_genes)


def load_state(run_dir: str | Path) -> StatePredictor:
    """Registry ``load_fn``."""
    return StatePredictor(run_dir)
