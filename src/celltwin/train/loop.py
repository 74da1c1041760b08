"""The one explicit training loop shared by every celltwin torch model (ST, SE).

Usage::

    from celltwin.train import TrainConfig, fit, seed_everything, unwrap

    seed_everything(0)                      # before building the model (same init everywhere)
    model = MyModel(...)

    def step(model, batch):                 # model: the (possibly DDP-wrapped) module
        pred = model(batch["x"])            # call the wrapper so DDP hooks run
        mse = ((pred - batch["y"]) ** 2).mean()
        return {"loss": mse, "mse": mse}    # "loss" is optimised; every part is logged

    result = fit(model, step, loader, TrainConfig(max_steps=1000, out_dir="run/"))

What one optimiser step does: ``grad_accum`` micro-batches, each moved to the device
(tensors inside dicts/lists/tuples), forward under autocast (bf16 on CUDA when supported,
else fp16 with a GradScaler; on CPU bf16 when the CPU has native bf16 instructions, else fp32;
``precision="fp32"`` forces fp32), backward of ``loss / grad_accum``
(DDP gradient sync only on the last micro-batch via ``no_sync``), gradient-norm clipping,
AdamW step, LR scheduler step (linear warmup then cosine to ``min_lr_ratio * lr``).

Data (:mod:`celltwin.train.batches`): ``loader`` is re-iterated every epoch, with
``set_epoch(epoch)`` called on its sampler / batch sampler / dataset first (or ``loader`` may be
a callable ``epoch -> iterable``). For exact resume the batches must be a function of
``(epoch, position)`` only (e.g. a sampler seeded by ``seed + epoch``); on resume the batches
already consumed in the epoch are read again and skipped. In DDP each rank must get its own
disjoint shard (the celltwin set sampler takes ``rank``/``world_size``). Every call into the
loader runs on its own global RNG streams seeded from ``(seed, rank, epoch)``, so the training
RNG (dropout, masking, ...) never sees the loader's draws and a resume replays them exactly.

Loss plot: rank 0 writes ``out_dir/loss.png`` (``TrainConfig.loss_plot``; :mod:`celltwin._loss_plot`)
from ``metrics.csv`` at every checkpoint and at the end, atomically; after a resume it covers
every step of the run. A plot that cannot be drawn is a logged warning, never a failed run.

Checkpoints (``out_dir/checkpoints/last.pt``, atomic) hold model, optimiser, scheduler,
grad scaler, every rank's RNG states, ``step``, ``epoch``, position in the epoch and the
config; with ``resume=True`` a run restarts from there and reaches the same parameters
as an uninterrupted run (bitwise on CPU with deterministic kernels; tested with SIGKILL,
also with a real ``DataLoader`` with workers). Checkpoints hold tensors and plain data only
and are read with ``weights_only=True`` (:mod:`celltwin.train.checkpoint`). Resume refuses a
checkpoint whose ``TrainConfig.fingerprint`` (data files, split, options: whatever the
caller puts there) differs from this run's, naming the differing keys. Only rank 0 writes
files. Weight decay applies to parameters with ``ndim >= 2`` only (not to norms and biases).

Divergence: a non-finite loss, a non-finite gradient norm (without fp16 loss scaling, whose
GradScaler legitimately skips steps with inf gradients) or non-finite parameters after an
optimiser step stop training with :class:`DivergenceError` (one line in the CLI, exit 2)
naming the step and the learning rate. It is raised before anything is written, so the last
good checkpoint stays on disk; a checkpoint with non-finite weights is never written.

Progress (``progress=True``, rank 0, unless the ``celltwin`` logger's level is above INFO, e.g.
``celltwin -q``: :func:`progress_wanted`; :class:`TrainProgress`): a rich bar on stderr when stderr is a
terminal; otherwise (output going to a log file) plain lines ``step 100/500 loss 0.1234 12.3 it/s``
on stderr, every :func:`plain_progress_every` steps (a multiple of ``log_every``, at most about
100 lines a run) and at the last step, so a log shows how far a run got and how fast it goes.

Modules: :mod:`celltwin.train.config` (:class:`TrainConfig`, :class:`TrainResult`),
:mod:`celltwin.train.optim` (AdamW, LR schedule), :mod:`celltwin.train.batches` (the epochs of the
loader), :mod:`celltwin.train.resume` and :mod:`celltwin.train.checkpoint` (checkpoints and resume),
:mod:`celltwin.train.metrics` / :mod:`celltwin.train.progress` (logging), :mod:`celltwin.train.distributed` (DDP).
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from celltwin.errors import CelltwinError, ConfigError
from celltwin.train.batches import EpochBatches
from celltwin.train.checkpoint import (
    CHECKPOINT_NAME,
    gather_rng_states,
    load_checkpoint,
    plain_data_problem,
    remove_stale_temp_files,
    save_checkpoint,
)
from celltwin.train.config import TrainConfig, TrainResult, normalised_fingerprint
from celltwin.train.distributed import (
    DistInfo,
    all_reduce_mean,
    any_rank,
    barrier,
    init_distributed,
    is_distributed,
)
from celltwin.train.metrics import MetricsLogger
from celltwin.train.optim import lr_lambda, make_optimizer, params_finite
from celltwin.train.progress import TrainProgress, progress_wanted
from celltwin.train.resume import check_same_run, restore

__all__ = [
    "DivergenceError",
    "StepFn",
    "ValFn",
    "cpu_has_native_bf16",
    "fit",
    "move_to_device",
    "resolve_precision",
    "seed_everything",
    "unwrap",
]

StepFn = Callable[[nn.Module, Any], Mapping[str, torch.Tensor]]
"""``step(model, batch) -> {"loss": scalar tensor, other named parts...}``."""
ValFn = Callable[[nn.Module, int], Mapping[str, float]]
"""``val(model, step) -> {name: float}``; runs on rank 0 under ``no_grad`` in eval mode."""

_log = logging.getLogger(__name__)


class DivergenceError(CelltwinError, FloatingPointError):
    """Training diverged (non-finite loss, gradients or parameters); the message names the step and lr."""


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy's global RNG and torch (CPU and all CUDA devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def unwrap(model: nn.Module) -> nn.Module:
    """The underlying module of a DDP wrapper (or the model itself)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Tensors inside (nested) dicts, lists and tuples moved to ``device``; other values kept."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, Mapping):
        return {k: move_to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, list | tuple):
        return type(batch)(move_to_device(v, device) for v in batch)
    return batch


_PRECISION_NAMES = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices natively (AVX512-BF16 or AMX tiles).

    On such CPUs oneDNN's bf16 GEMM is several times faster than fp32 GEMM (measured 4-5x at
    the ``state`` preset's shapes on a 2-core AMD EPYC with AVX512-BF16, bench/cpu_precision.py);
    elsewhere bf16 products go through conversions and are usually no faster than fp32 (not
    measured here). Uses torch's own CPU feature probes (False when absent).
    """
    for probe in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"):
        fn = getattr(torch.cpu, probe, None)
        try:
            if fn is not None and bool(fn()):
                return True
        except Exception:  # noqa: BLE001 - a probe that cannot run on this build counts as "no"
            continue
    return False


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device`` (None = plain fp32).

    ``auto``: bf16 on CUDA when the GPU supports it, else fp16 (with loss scaling); on CPU, bf16
    when the CPU has native bf16 matrix instructions (:func:`cpu_has_native_bf16`), else fp32.
    Why bf16 on such CPUs: the ``state`` preset's training step is 1.7-1.8x faster (0.375 ->
    0.207 s at 2 x 64 cells, 2 threads) and the demo's scores are unchanged within seed noise
    (state 0.367 fp32 vs 0.374 bf16 at seed 0, 0.150 vs 0.144 at seed 1); reproduce with
    ``python bench/cpu_precision.py --step --demo`` (numbers in bench/RESULTS.md).
    Autocast keeps the weights, the optimiser and the loss reductions in fp32; only matrix
    products (and what autocast lists with them) run in bf16. ``fp32`` forces plain fp32.
    """
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        return torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return None


def fit(
    model: nn.Module,
    step_fn: StepFn,
    loader: Iterable[Any] | Callable[[int], Iterable[Any]],
    config: TrainConfig,
    *,
    val_fn: ValFn | None = None,
    count_fn: Callable[[Any], int] | None = None,
    dist_info: DistInfo | None = None,
    extra_state: Mapping[str, Any] | None = None,
) -> TrainResult:
    """Train ``model`` in place with ``step_fn`` over ``loader`` (see the module docstring).

    ``val_fn(model, step)`` (rank 0 only, eval mode, no_grad) returns metrics logged under
    split ``val``. ``count_fn(batch)`` counts the items (cells) in a micro-batch for the
    throughput figure. ``dist_info``: from :func:`init_distributed` (called here with
    ``config.device`` when omitted; with ``WORLD_SIZE > 1`` the model is wrapped in DDP).
    ``extra_state`` is stored in checkpoints as is (e.g. the model config as a dict); it
    must be tensors and plain data (ConfigError otherwise, before training starts).
    Returns a :class:`TrainResult`; the trained weights are in ``model``. Raises
    :class:`DivergenceError` when training diverges and a ConfigError when resuming a
    checkpoint of another run (different ``config.fingerprint``) or world size.
    """
    cfg = config
    fingerprint = normalised_fingerprint(cfg.fingerprint)  # again: a caller may have set it after init
    extra = dict(extra_state or {})
    bad = plain_data_problem(extra, "extra_state")
    if bad is not None:
        msg = (f"fit: extra_state must hold tensors and plain data only (checkpoints are loaded with "
               f"weights_only=True), got {bad}")
        raise ConfigError(msg)
    info = dist_info or init_distributed(cfg.device)
    device = info.device
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True)
    model.to(device)
    model.train()
    ddp = is_distributed()
    wrapped: nn.Module = (
        nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if ddp
        else model
    )
    optimizer = make_optimizer(model, cfg, device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_lambda(s, cfg.warmup_steps, cfg.max_steps, cfg.min_lr_ratio)
    )
    amp_dtype = resolve_precision(cfg.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    out = Path(cfg.out_dir) if cfg.out_dir is not None else None
    ckpt_dir = out / "checkpoints" if out is not None else None
    step, epoch, pos = 0, 0, 0
    resumed_from: int | None = None
    if ckpt_dir is not None and info.is_main:
        remove_stale_temp_files(ckpt_dir)  # leftovers of checkpoint writes killed half-way
    state = load_checkpoint(ckpt_dir, map_location=device) if (ckpt_dir is not None and cfg.resume) else None
    if state is not None:
        check_same_run(state, cfg, fingerprint, ckpt_dir, out)
        step, epoch, pos = restore(state, ckpt_dir, info, device, model=model, optimizer=optimizer,
                                   scheduler=scheduler, scaler=scaler)
        resumed_from = step
    else:
        seed_everything(cfg.seed + info.rank)
    feed = EpochBatches(loader, cfg.seed, info.rank, epoch, pos)  # the batches; feed.epoch / feed.pos follow them

    logger = MetricsLogger(out, resume_step=resumed_from, tensorboard=cfg.tensorboard) \
        if (out is not None and info.is_main) else None

    params = list(model.parameters())
    last_saved: list[int | None] = [resumed_from]  # step of the newest checkpoint on disk (None: none)

    def checkpoint() -> None:
        if not params_finite(params):  # identical on every rank: all raise together
            diverged(f"non-finite parameters before writing the step-{step} checkpoint", step)
        rngs = gather_rng_states(device)  # collective
        if info.is_main and ckpt_dir is not None:
            save_checkpoint(ckpt_dir, {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "step": step, "epoch": feed.epoch, "pos": feed.pos, "rng": rngs,
                "config": {**asdict(cfg), "fingerprint": fingerprint}, "fingerprint": fingerprint,
                "world_size": info.world_size,
                "extra": extra,
            })
            last_saved[0] = step
            write_plot()
        barrier()

    plot_path = (out / cfg.loss_plot) if (out is not None and cfg.loss_plot and info.is_main) else None
    plotted: list[int | None] = [None]  # step of the loss.png on disk

    def write_plot() -> None:
        """loss.png from metrics.csv (every step of the run, resumed or not); never stops training."""
        if plot_path is None or logger is None or plotted[0] == step:
            return
        try:
            from celltwin._loss_plot import write_loss_plot

            write_loss_plot(logger.path, plot_path, title="/".join(Path(cfg.out_dir or "").parts[-2:]))
            plotted[0] = step
        except Exception as e:  # noqa: BLE001 - a plot is a convenience: training goes on without it
            _log.warning("could not write the loss plot %s: %s: %s", plot_path, type(e).__name__, e)

    def diverged(what: str, at_step: int) -> None:
        lr_now = scheduler.get_last_lr()[0]
        if ckpt_dir is None:
            kept = "no checkpoints are written (no out_dir)"
        elif last_saved[0] is None:
            kept = f"this run wrote no checkpoint yet in {ckpt_dir}"
        else:
            kept = f"the last good checkpoint (step {last_saved[0]}) is kept in {ckpt_dir / CHECKPOINT_NAME}"
        msg = (f"training diverged at step {at_step} (epoch {feed.epoch}): {what}; the learning rate was "
               f"{lr_now:.3g} at this step (peak lr={cfg.lr:g}): lower it, e.g. lr={cfg.lr / 10:g}, "
               f"and start fresh (resume=false); {kept}")
        raise DivergenceError(msg)

    def validate() -> dict[str, float]:
        res: dict[str, float] = {}
        if val_fn is not None and info.is_main:
            model.eval()
            with torch.no_grad():
                res = {k: float(v) for k, v in val_fn(model, step).items()}
            model.train()
            if logger is not None:
                logger.log(step, "val", res)
        barrier()
        return res

    progress = TrainProgress(cfg.max_steps, step, cfg.log_every) \
        if (cfg.progress and info.is_main and progress_wanted()) else None

    window: dict[str, list[float]] = {}
    last_losses: dict[str, float] = {}
    last_val: dict[str, float] = {}
    t0 = time.perf_counter()
    t_first: float | None = None
    items_after_first = 0
    stream = iter(feed)
    try:
        while step < cfg.max_steps:
            optimizer.zero_grad(set_to_none=True)
            n_items = 0
            bad_loss: float | None = None
            for micro in range(cfg.grad_accum):
                batch = move_to_device(next(stream), device)
                if count_fn is not None:
                    n_items += int(count_fn(batch))
                sync = (micro == cfg.grad_accum - 1) or not ddp
                ctx = contextlib.nullcontext() if sync else wrapped.no_sync()
                with ctx:
                    with torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None):
                        parts = step_fn(wrapped, batch)
                    if "loss" not in parts:
                        msg = f"step function must return a 'loss' entry, got keys {sorted(parts)}"
                        raise ConfigError(msg)
                    loss = parts["loss"]
                    if not torch.isfinite(loss.detach()):
                        bad_loss = float(loss.detach().float())
                        if not ddp:  # stop before backward; in DDP every rank must reach the all-reduce
                            diverged(f"non-finite loss ({bad_loss}) in batch {feed.pos} of the epoch", step + 1)
                    scaler.scale(loss.float() / cfg.grad_accum).backward()
                for k, v in parts.items():
                    window.setdefault(k, []).append(float(v.detach()))
            if ddp and any_rank(bad_loss is not None, device):  # all ranks stop together
                diverged("non-finite loss" + (f" ({bad_loss}) on this rank" if bad_loss is not None
                                              else " on another rank"), step + 1)
            if cfg.grad_clip is not None:
                scaler.unscale_(optimizer)
                gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
                g = float(gnorm)
                # with fp16 loss scaling an inf norm means "skip this step and lower the scale", not divergence
                if not math.isfinite(g) and not scaler.is_enabled():
                    diverged(f"non-finite gradient norm ({g})", step + 1)
                window.setdefault("grad_norm", []).append(g)
            window.setdefault("lr", []).append(scheduler.get_last_lr()[0])
            scaler.step(optimizer)
            if not params_finite(params):  # grads synced in DDP: every rank sees the same parameters
                diverged("non-finite parameters after the optimiser step", step + 1)
            scaler.update()
            scheduler.step()
            step += 1
            if t_first is None:
                t_first = time.perf_counter()
            else:
                items_after_first += n_items
            if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.max_steps):
                means = {k: float(np.mean(v)) for k, v in window.items()}
                last_losses = all_reduce_mean(means, device)
                window = {}
                if logger is not None:
                    logger.log(step, "train", last_losses)
            if progress is not None:
                progress.update(step, last_losses.get("loss"))
            if cfg.val_every and step % cfg.val_every == 0 and step < cfg.max_steps:
                last_val = validate()
            if cfg.ckpt_every and step % cfg.ckpt_every == 0 and step < cfg.max_steps:
                checkpoint()
        if resumed_from is None or resumed_from < cfg.max_steps:
            last_val = validate() or last_val
            checkpoint()
    finally:
        stream.close()  # releases the epoch's loader iterator (DataLoader workers) now
        if progress is not None:
            progress.close()
        if logger is not None:
            logger.close()
            write_plot()  # a run that stopped early (divergence, Ctrl-C) or had nothing left to do
    seconds = time.perf_counter() - t0
    rate = None
    if count_fn is not None and t_first is not None and items_after_first > 0:
        rate = items_after_first * info.world_size / (time.perf_counter() - t_first)
    return TrainResult(step=step, epoch=feed.epoch, last_losses=last_losses, last_val=last_val,
                       resumed_from=resumed_from, seconds=seconds, items_per_s=rate,
                       precision=_PRECISION_NAMES[amp_dtype], device=str(device))
