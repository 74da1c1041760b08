"""Training of the ST model for the model registry (``state``, ``state-se``): :func:`train_state`.

:func:`train_state` (``request: celltwin.runs.TrainRequest``) trains
:class:`~celltwin.models.state_transition.StateTransition` on the request's training cells
(model space, log1p) with the shared loop :func:`celltwin.train.fit` and writes
``RUN/state/{model.safetensors,config.json,vocab.json}`` plus ``RUN/train/`` (checkpoints,
``metrics.csv``, TensorBoard) and ``RUN/loss.png`` (the loss curve, rewritten at every checkpoint). Options: ``request.options``, a
:class:`~celltwin.models.st_options.StateOptions` (``--set preset=small --set steps=400``).
Loading and prediction: :mod:`celltwin.models.st_predict`.

Training sets come from :class:`celltwin.data.sampler.CellSetSampler` through
:class:`celltwin.data.torch_sets.CellSetDataset` and a DataLoader (``num_workers`` processes;
default one for files), each set's rows read from disk and normalised when it is drawn
(:class:`celltwin.models.st_data.SetReader`): nothing holds the training matrix, and under DDP
each rank reads only the rows of its own sets. One (context, perturbation) group per set,
controls matched in the same context, or context and batch with ``match=batch``; control ->
control sets included, so the control label is perturbation 0 and teaches the identity. Each
optimiser step sees ``batch_sets`` sets of ``set_size`` cells. Inputs and outputs follow the
run's :class:`celltwin.data.inputs.InputConfig`: every gene, ``--hvg`` genes (decoded to every
gene with output space ``all``), an ``obsm`` matrix (``--embed-key``) or SE embeddings. With
``val_pairs=N``, N random (context, perturbation) groups are held out and scored every ``val_every`` steps (and at the end) with :func:`celltwin.eval.evaluate`
(``overlap_at_N``, ``discrimination_score_l1``, ``mae`` means, logged under ``val``). Under
torchrun (``WORLD_SIZE > 1``) every rank gets its own disjoint share of each epoch's sets and
rank 0 writes the files.

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
``se_steps``, ``se_batch``, ``se_lr``; written to ``RUN/state/se``, resumable like the rest). Run
cells reach the SE model through :class:`~celltwin.models.st_se_bridge.SEBridge`.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celltwin._constants import BATCH_COL, CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.data.columns import parse_perturbation
from celltwin.errors import ConfigError, InputError
from celltwin.models.st_build import build_model, load_pert_table
from celltwin.models.st_options import StateOptions
from celltwin.models.st_predict import MODEL_SUBDIR, SE_SUBDIR, TRAIN_SUBDIR
from celltwin.models.st_se_bridge import SEBridge
from celltwin.models.st_validate import make_val_fn
from celltwin.train import TrainConfig, cleanup_distributed, fit, init_distributed, seed_everything

__all__ = ["train_state", "train_state_se"]


def _member_table(labels: list[str], member_ids: dict[str, int]) -> torch.Tensor:
    """(L, K) member ids of each full label (-1 padded); the model's combination input."""
    members = [[member_ids[m] for m in parse_perturbation(lab)] if lab != CONTROL_LABEL else [0] for lab in labels]
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

    opts = _options(request.options)
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
    pert_vocab = [CONTROL_LABEL] + sorted({m for p in perts for m in parse_perturbation(p)} - {CONTROL_LABEL})
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
    pert_table = load_pert_table(opts, pert_vocab) if opts.pert_embeddings else None
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
    model, init_report = build_model(opts, cfg, pert_table, vocab, decode)
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
        loss_plot=str((run_dir / "loss.png").absolute()),  # RUN/loss.png (from RUN/train/metrics.csv)
    )
    fingerprint = {"model": cfg.to_dict(), "options": asdict(opts), "genes": len(genes), "perts": pert_vocab,
                   "labels": label_vocab, "contexts": ctx_vocab, "seed": request.seed,
                   "data": dict(getattr(request, "fingerprint", {}) or {})}
    # resume refuses another run's checkpoint: data files, rows, preprocessing, model and the
    # options that change the result (celltwin.train.fit compares TrainConfig.fingerprint)
    tcfg.fingerprint = {**{k: v for k, v in fingerprint.items() if k != "options"},
                        "options": _resume_key(fingerprint["options"])}
    val_fn = make_val_fn(request.data, pre, labels, val_groups, opts, model, bridge, request.embed_key) \
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
        "precision": res.precision,  # what precision=auto resolved to (run.json; celltwin.runs)
        "device": res.device,  # moved into run.json's host.torch_device by celltwin.runs.train_run
        "state": {
            "preset": opts.preset, "n_params": sum(p.numel() for p in model.parameters()), "steps": res.step,
            "arch": getattr(model, "arch", "celltwin"),
            **({"init_from": init_report} if init_report else {}),
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

    opts = _options(request.options, {"input_space": "embedding"})
    if opts.input_space != "embedding":
        raise ConfigError(f"model state-se: input_space is 'embedding', got {opts.input_space!r} "
                          "(use --model state for expression input)")
    return train_state(replace(request, options=opts))


def _options(options: Any, defaults: dict[str, str] | None = None) -> StateOptions:
    """Typed options of a request (a mapping of ``--set`` strings from older callers is converted)."""
    if isinstance(options, StateOptions):
        return options
    return StateOptions.from_strings({**(defaults or {}), **dict(options or {})})


def _resume_key(options: dict) -> dict:
    # options that may change between a killed run and its resumption without changing the result
    free = {"resume", "progress", "tensorboard", "threads", "ckpt_every", "log_every", "steps", "val_every",
            "num_workers"}
    return {k: v for k, v in options.items() if k not in free}
