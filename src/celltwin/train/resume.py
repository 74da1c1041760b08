"""Resume of :func:`celltwin.train.fit`: refuse another run's checkpoint, then restore the saved state.

A checkpoint belongs to this run when the :data:`RESUME_KEYS` of its ``TrainConfig`` and its
``TrainConfig.fingerprint`` (data files, split, options: whatever the caller puts there) equal
this run's (:func:`check_same_run` names the differing keys, :func:`fingerprint_diff`); the
world size must match too. :func:`restore` loads model, optimiser, scheduler, grad scaler and
this rank's RNG states and returns the position (step, epoch, batch in the epoch).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from celltwin.errors import ConfigError
from celltwin.train.checkpoint import CHECKPOINT_NAME, set_rng_state
from celltwin.train.config import TrainConfig
from celltwin.train.distributed import DistInfo

__all__ = ["RESUME_KEYS", "check_same_run", "fingerprint_diff", "restore"]

RESUME_KEYS = ("lr", "weight_decay", "betas", "min_lr_ratio", "grad_clip", "grad_accum", "seed")
"""TrainConfig fields a resume must not change: the optimiser and scheduler states restored from
the checkpoint would silently keep the old lr / betas / weight decay, and the others change
the result. ``max_steps`` and ``warmup_steps`` may change (extending a finished run), as may
bookkeeping (logging, checkpoint interval, progress), ``device`` and ``precision``."""


def check_same_run(state: dict[str, Any], cfg: TrainConfig, fingerprint: dict[str, Any], ckpt_dir: Path,
                   out: Path | None) -> None:
    """ConfigError naming the differences when checkpoint ``state`` was written by another run."""
    old_cfg = state.get("config", {})
    diff = [f"TrainConfig.{d}" for d in fingerprint_diff(
        {k: old_cfg.get(k) for k in RESUME_KEYS}, {k: getattr(cfg, k) for k in RESUME_KEYS})]
    diff += fingerprint_diff(state.get("fingerprint", {}), fingerprint)
    if diff:
        shown = "; ".join(diff[:6]) + (f"; ... ({len(diff) - 6} more)" if len(diff) > 6 else "")
        msg = (f"{ckpt_dir / CHECKPOINT_NAME}: the checkpoint belongs to a different run ({shown}); "
               f"start fresh with resume=false (celltwin train: --set resume=false; celltwin embed fit: "
               f"--no-resume) or remove {out}, or restore the original inputs and settings")
        raise ConfigError(msg)


def restore(state: dict[str, Any], ckpt_dir: Path, info: DistInfo, device: torch.device, *, model: nn.Module,
            optimizer: torch.optim.Optimizer, scheduler: Any, scaler: Any) -> tuple[int, int, int]:
    """Load the checkpoint's states into the training objects; ``(step, epoch, pos)`` to continue from."""
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    scaler.load_state_dict(state["scaler"])
    step, epoch, pos = int(state["step"]), int(state["epoch"]), int(state["pos"])
    rngs = state["rng"]
    if len(rngs) != info.world_size:
        msg = (f"checkpoint {ckpt_dir}/last.pt was written by {len(rngs)} processes, "
               f"this run has {info.world_size}: resume with the same world size")
        raise ConfigError(msg)
    set_rng_state(rngs[info.rank], device)
    return step, epoch, pos


def fingerprint_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two fingerprints differ (dicts compared key by key, other values whole)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{k}" if prefix else str(k)
            if k not in old:
                out.append(f"{path} (not in the checkpoint)")
            elif k not in new:
                out.append(f"{path} (only in the checkpoint)")
            else:
                out += fingerprint_diff(old[k], new[k], path)
        return out
    if old != new:
        return [f"{prefix or '(whole)'}: {_short(old)} in the checkpoint, {_short(new)} now"]
    return []


def _short(v: Any, limit: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."
