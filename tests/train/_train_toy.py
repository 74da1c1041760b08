"""A tiny deterministic regression task for the training-loop tests (also run as a script).

``python _toy.py OUT_DIR MAX_STEPS CKPT_EVERY SLEEP`` trains the toy model with
``celltwin.train.fit`` and writes the final parameters to ``OUT_DIR/final.pt``. Under
torchrun/env:// (``WORLD_SIZE`` > 1) it trains with DDP on gloo.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch import nn

from celltwin.train import TrainConfig, fit, init_distributed, seed_everything


class ToyData:
    """Map-style data: batch i of epoch e is a deterministic function of (seed, e, i, rank)."""

    def __init__(self, n_batches: int = 6, rank: int = 0, world_size: int = 1, seed: int = 0) -> None:
        self.n_batches, self.rank, self.world, self.seed, self.epoch = n_batches, rank, world_size, seed, 0
        g = torch.Generator().manual_seed(1234)
        self.w_true = torch.randn(8, 3, generator=g)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        for i in range(self.n_batches):
            # disjoint per rank: the generator key includes the rank
            g = torch.Generator().manual_seed(((self.seed * 1000 + self.epoch) * 1000 + i) * 16 + self.rank)
            x = torch.randn(16, 8, generator=g)
            yield {"x": x, "y": x @ self.w_true + 0.01 * torch.randn(16, 3, generator=g), "rank": self.rank}


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Dropout(0.1), nn.Linear(16, 3))


def step(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    mse = ((model(batch["x"]) - batch["y"]) ** 2).mean()
    return {"loss": mse, "mse": mse}


def main(out: str, max_steps: int, ckpt_every: int, sleep: float) -> None:
    torch.set_num_threads(1)
    info = init_distributed("cpu")
    seed_everything(0)
    model = make_model()
    data = ToyData(rank=info.rank, world_size=info.world_size)

    def slow_step(m, b):
        if sleep:
            time.sleep(sleep)
        return step(m, b)

    cfg = TrainConfig(max_steps=max_steps, lr=3e-2, warmup_steps=2, ckpt_every=ckpt_every, out_dir=out,
                      log_every=1, progress=False, tensorboard=False, grad_accum=2)
    res = fit(model, slow_step, data, cfg, dist_info=info)
    if info.rank == 0:
        torch.save({"params": model.state_dict(), "loss": res.last_losses}, Path(out) / "final.pt")
    else:
        torch.save({"params": model.state_dict()}, Path(out) / f"final_rank{info.rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]))
