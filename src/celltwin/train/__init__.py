"""Training machinery shared by the celltwin torch models (see :mod:`celltwin.train.loop`).

One explicit loop (:func:`fit`): AdamW, warmup + cosine, gradient clipping and accumulation,
bf16/fp16 autocast (CUDA; bf16 on CPUs with native bf16), DDP (torchrun / env://; gloo on CPU, nccl on CUDA), atomic
checkpoints with exact resume, CSV + TensorBoard metrics, periodic validation.
"""

from __future__ import annotations

from celltwin.train.checkpoint import load_checkpoint, save_checkpoint
from celltwin.train.distributed import DistInfo, cleanup_distributed, init_distributed, is_distributed
from celltwin.train.loop import (
    TrainConfig,
    TrainResult,
    fit,
    lr_lambda,
    move_to_device,
    cpu_has_native_bf16,
    resolve_precision,
    seed_everything,
    unwrap,
)
from celltwin.train.metrics import MetricsLogger

__all__ = [
    "TrainConfig",
    "TrainResult",
    "fit",
    "seed_everything",
    "unwrap",
    "move_to_device",
    "resolve_precision",
    "cpu_has_native_bf16",
    "lr_lambda",
    "DistInfo",
    "init_distributed",
    "cleanup_distributed",
    "is_distributed",
    "save_checkpoint",
    "load_checkpoint",
    "MetricsLogger",
]
