"""The settings and the result of :func:`celltwin.train.fit`: :class:`TrainConfig`, :class:`TrainResult`.

``TrainConfig.fingerprint`` (what makes a run this run) is stored normalised by
:func:`normalised_fingerprint`; :mod:`celltwin.train.resume` compares it with a checkpoint's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from celltwin.errors import ConfigError

__all__ = ["PRECISIONS", "TrainConfig", "TrainResult", "normalised_fingerprint"]

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    """Optimisation and bookkeeping settings of :func:`fit` (validated once, ConfigError)."""

    max_steps: int = 1000  # optimiser steps (each = grad_accum micro-batches)
    lr: float = 3e-4  # peak learning rate (AdamW)
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.95)
    warmup_steps: int = 0  # linear warmup from lr/warmup to lr
    min_lr_ratio: float = 0.1  # cosine decays to min_lr_ratio * lr at max_steps
    grad_clip: float | None = 1.0  # max global grad norm; None disables clipping
    grad_accum: int = 1  # micro-batches per optimiser step
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (autocast); auto: see resolve_precision
    device: str = "auto"  # auto | cpu | cuda | cuda:K
    seed: int = 0
    out_dir: str | None = None  # checkpoints/, metrics.csv, tb/, loss.png go here; None = nothing written
    ckpt_every: int = 0  # save every N steps (and at the end); 0 = only at the end
    resume: bool = True  # continue from out_dir/checkpoints/last.pt when present
    log_every: int = 10  # log averaged loss parts every N steps
    val_every: int = 0  # call val_fn every N steps (and at the end); 0 = only at the end
    progress: bool = True  # rank 0: rich bar on a terminal, plain lines when stderr is not a TTY
    tensorboard: bool = True  # also write TensorBoard scalars (when tensorboard is installed)
    deterministic: bool = False  # torch.use_deterministic_algorithms(True)
    # loss-curve PNG (celltwin._loss_plot) written at every checkpoint and at the end: a path relative to
    # out_dir (or absolute); None = no plot
    loss_plot: str | None = "loss.png"
    # what makes this run this run (data file fingerprints, split, options: plain JSON data); resume
    # refuses a checkpoint whose fingerprint differs. Stored normalised (a JSON round trip: tuples -> lists)
    fingerprint: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.max_steps < 1:
            raise ConfigError(f"TrainConfig.max_steps must be >= 1, got {self.max_steps}")
        if not self.lr > 0:
            raise ConfigError(f"TrainConfig.lr must be > 0, got {self.lr}")
        if self.weight_decay < 0:
            raise ConfigError(f"TrainConfig.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0 or self.warmup_steps > self.max_steps:
            raise ConfigError(
                f"TrainConfig.warmup_steps must be in [0, max_steps={self.max_steps}], got {self.warmup_steps}"
            )
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError(f"TrainConfig.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ConfigError(f"TrainConfig.grad_clip must be > 0 or None, got {self.grad_clip}")
        if self.grad_accum < 1:
            raise ConfigError(f"TrainConfig.grad_accum must be >= 1, got {self.grad_accum}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"TrainConfig.precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("ckpt_every", "log_every", "val_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"TrainConfig.{name} must be >= 0, got {getattr(self, name)}")
        self.betas = (float(self.betas[0]), float(self.betas[1]))
        self.fingerprint = normalised_fingerprint(self.fingerprint)


@dataclass
class TrainResult:
    """What :func:`fit` returns (on every rank)."""

    step: int
    epoch: int
    last_losses: dict[str, float] = field(default_factory=dict)  # mean parts over the last log window
    last_val: dict[str, float] = field(default_factory=dict)
    resumed_from: int | None = None  # step of the checkpoint resumed from
    seconds: float = 0.0  # wall time of this process's loop
    items_per_s: float | None = None  # from count_fn, all ranks together, excluding the first step
    precision: str = "fp32"  # the autocast precision actually used: fp32 | bf16 | fp16
    device: str = "cpu"  # the torch device trained on (this rank's), e.g. "cpu", "cuda:0"


def normalised_fingerprint(fp: Any) -> dict[str, Any]:
    """``fp`` after a JSON round trip (tuples -> lists, keys -> str), or ConfigError when not JSON data."""
    if not isinstance(fp, dict):
        msg = f"TrainConfig.fingerprint must be a dict, got {type(fp).__name__}"
        raise ConfigError(msg)
    try:
        return json.loads(json.dumps(fp, sort_keys=True))
    except (TypeError, ValueError) as e:
        msg = f"TrainConfig.fingerprint must be plain JSON data (str, numbers, lists, dicts): {e}"
        raise ConfigError(msg) from None
