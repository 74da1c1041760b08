"""Toy training through a real ``torch.utils.data.DataLoader`` (run as a script by test_resume.py).

``python _train_dl.py OUT_DIR MAX_STEPS CKPT_EVERY SLEEP NUM_WORKERS SHUFFLE`` trains the toy
model of ``_train_toy.py`` (it has dropout, so the training RNG stream matters) on a map-style
dataset whose item ``i`` in epoch ``e`` is a pure function of ``(e, i)``, loaded by a
DataLoader with ``NUM_WORKERS`` workers (``SHUFFLE`` 1: ``shuffle=True`` without a generator,
so the order comes from the global torch RNG at iteration time), and writes the final
parameters to ``OUT_DIR/final.pt``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _train_toy as toy

from celltwin.train import TrainConfig, fit, seed_everything


class EpochData(Dataset):
    """Item i of epoch e: x ~ N(0, 1) from a generator keyed by (e, i); y = x @ W + noise."""

    def __init__(self, n: int = 80) -> None:
        self.n, self.epoch = n, 0
        self.w_true = torch.randn(8, 3, generator=torch.Generator().manual_seed(1234))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(self.epoch * 100_003 + i)
        x = torch.randn(8, generator=g)
        return {"x": x, "y": x @ self.w_true + 0.01 * torch.randn(3, generator=g)}


def main(out: str, max_steps: int, ckpt_every: int, sleep: float, workers: int, shuffle: bool) -> None:
    torch.set_num_threads(1)
    seed_everything(0)
    model = toy.make_model()
    loader = DataLoader(EpochData(), batch_size=16, shuffle=shuffle, num_workers=workers)

    def slow_step(m, b):
        if sleep:
            time.sleep(sleep)
        return toy.step(m, b)

    cfg = TrainConfig(max_steps=max_steps, lr=3e-2, warmup_steps=2, ckpt_every=ckpt_every, out_dir=out,
                      log_every=1, progress=False, tensorboard=False, precision="fp32", device="cpu")
    res = fit(model, slow_step, loader, cfg)
    torch.save({"params": model.state_dict(), "loss": res.last_losses, "resumed_from": res.resumed_from},
               Path(out) / "final.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5]),
         sys.argv[6] == "1")
