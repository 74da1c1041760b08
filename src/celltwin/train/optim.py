"""The optimiser side of :func:`celltwin.train.fit`: AdamW groups, the LR schedule, the finiteness check.

Weight decay applies to parameters with ``ndim >= 2`` only (not to norms and biases); the
learning rate warms up linearly, then follows a cosine to ``min_lr_ratio * lr`` (:func:`lr_lambda`).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from celltwin.train.config import TrainConfig

__all__ = ["lr_lambda", "make_optimizer", "params_finite"]


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """LR multiplier at optimiser step ``step`` (0-based, the step about to be taken).

    Linear warmup ``(step + 1) / warmup`` for ``step < warmup``, then cosine from 1 to
    ``min_ratio`` over the remaining steps (reaching ``min_ratio`` at ``step = total``).
    """
    if step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters, weight decay on those with ``ndim >= 2`` only."""
    decay, no_decay = [], []
    for _, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused AdamW (one kernel over all parameters) on CUDA and on CPU: on CPU it cut the step of the
    # published ST preset from 0.46 s to 0.37 s (bench/RESULTS.md); other devices use the default
    fused = True if device.type in ("cuda", "cpu") else None
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, fused=fused)


def params_finite(params: list[torch.Tensor]) -> bool:
    """Whether every parameter is finite: max |p| per tensor (one fused ``_foreach_norm(inf)`` kernel
    on CUDA; NaN and inf propagate, no false positives), then one host sync for all of them.

    Cost: one read of the parameters per optimiser step, well under the AdamW step itself (which
    reads and writes parameters, gradients and two moment buffers).
    """
    if not params:
        return True
    with torch.no_grad():
        tensors = [p.detach() for p in params]
        try:
            norms = torch._foreach_norm(tensors, ord=math.inf)
        except (AttributeError, RuntimeError, TypeError):  # no foreach kernel for this device / dtype
            norms = [torch.linalg.vector_norm(t, ord=math.inf) for t in tensors]
        dev = norms[0].device
        return bool(torch.isfinite(torch.stack([n.to(dev, torch.float32) for n in norms])).all().item())
