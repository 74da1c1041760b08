"""Training machinery shared by the celltwin torch models (see :mod:`celltwin.train.loop`).

One explicit loop (:func:`fit`): AdamW, warmup + cosine, gradient clipping and accumulation,
bf16/fp16 autocast (CUDA; bf16 on CPUs with native bf16), DDP (torchrun / env://; gloo on CPU, nccl on CUDA), atomic
checkpoints (tensors and plain data, loaded with ``weights_only=True``) with exact resume that
refuses another run's checkpoint (:attr:`TrainConfig.fingerprint`, :func:`file_fingerprint`),
divergence detection (:class:`DivergenceError`), CSV + TensorBoard metrics, periodic validation.
"""

from __future__ import annotations

from celltwin.train.checkpoint import (
    file_fingerprint,
    load_checkpoint,
    remove_stale_temp_files,
    save_checkpoint,
)
from celltwin.train.config import TrainConfig, TrainResult
from celltwin.train.distributed import DistInfo, cleanup_distributed, init_distributed, is_distributed
from celltwin.train.loop import (
    DivergenceError,
    cpu_has_native_bf16,
    fit,
    move_to_device,
    resolve_precision,
    seed_everything,
    unwrap,
)
from celltwin.train.metrics import MetricsLogger
from celltwin.train.optim import lr_lambda
from celltwin.train.resume import fingerprint_diff

__all__ = [
    "DistInfo",
    "DivergenceError",
    "MetricsLogger",
    "TrainConfig",
    "TrainResult",
    "cleanup_distributed",
    "cpu_has_native_bf16",
    "file_fingerprint",
    "fingerprint_diff",
    "fit",
    "init_distributed",
    "is_distributed",
    "load_checkpoint",
    "lr_lambda",
    "move_to_device",
    "remove_stale_temp_files",
    "resolve_precision",
    "save_checkpoint",
    "seed_everything",
    "unwrap",
]
