"""Training throughput of the ST model: cells/s and peak memory for the tiny, small and state presets.

Each preset trains a few optimiser steps (the first, warm-up step is excluded from the rates) with :func:`celltwin.train.fit` on random log1p-like
data (sets of ``set_size`` control and perturbed cells, energy loss). Reported: cells/s (perturbed
cells per second, excluding the first step), seconds per step, parameters, and peak memory
(CUDA: ``torch.cuda.max_memory_allocated``; CPU: the process's peak RSS, ``ru_maxrss``, which
includes the Python interpreter and earlier presets, so it only grows down the table).

On CPU the ``state`` preset runs with a reduced set size (``--state-set-size``, default 64 instead
of 512) and 2 sets per step; the architecture is otherwise the published one.

    python bench/train_speed.py                    # CPU, 2,000 genes, precision auto (bf16 on CPUs with native bf16)
    python bench/train_speed.py --precision fp32   # plain fp32
    python bench/train_speed.py --device cuda      # unverified: no GPU was available when written
"""

from __future__ import annotations

import argparse
import resource
import sys

import torch


def run_preset(name: str, genes: int, set_size: int, batch_sets: int, steps: int, device: str,
               precision: str) -> dict:
    from celltwin.models import StateTransition, STConfig
    from celltwin.train import TrainConfig, fit, seed_everything

    seed_everything(0)
    cfg = STConfig.from_preset(name, input_dim=genes, n_perts=50, n_contexts=2, set_size=set_size)
    model = StateTransition(cfg)
    g = torch.Generator().manual_seed(0)

    def batches():
        while True:
            ctrl = torch.log1p(torch.poisson(torch.rand(batch_sets, set_size, genes, generator=g) * 2))
            pert = torch.log1p(torch.poisson(torch.rand(batch_sets, set_size, genes, generator=g) * 2.5))
            yield {"ctrl": ctrl, "pert": pert, "pert_idx": torch.randint(0, 50, (batch_sets,), generator=g),
                   "context_idx": torch.randint(0, 3, (batch_sets,), generator=g)}

    stream = batches()
    data = [next(stream) for _ in range(steps)]

    def step(m, b):
        out = m(b["ctrl"], b["pert_idx"], b["context_idx"])
        from celltwin.train import unwrap

        return unwrap(m).loss(out, b["pert"])

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    tcfg = TrainConfig(max_steps=steps, lr=1e-4, device=device, precision=precision, progress=False,
                       log_every=0, tensorboard=False)
    res = fit(model, step, data, tcfg, count_fn=lambda b: b["pert"].shape[0] * b["pert"].shape[1])
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
        kind = "cuda_alloc"
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        kind = "rss"
    return {"preset": name, "params_M": model.n_params() / 1e6, "genes": genes, "set_size": set_size,
            "sets_per_step": batch_sets, "steps": steps,
            "s_per_step": batch_sets * set_size / res.items_per_s,  # steady state: first step excluded
            "cells_per_s": res.items_per_s, "peak_MiB": peak, "peak_kind": kind, "precision": res.precision}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--state-set-size", type=int, default=64, help="set size of the state preset on CPU")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cpu = not args.device.startswith("cuda")
    plan = [("tiny", 16, 8), ("small", 64, 8), ("state", args.state_set_size if cpu else 512, 2 if cpu else 8)]
    print(f"torch {torch.__version__}, device {args.device}, threads {torch.get_num_threads()}, genes {args.genes}")
    print(f"{'preset':7} {'params(M)':>9} {'set':>5} {'sets/step':>9} {'precision':>9} {'s/step':>8} {'cells/s':>9} "
          f"{'peak MiB':>9}")
    for name, s, b in plan:
        r = run_preset(name, args.genes, s, b, args.steps, args.device, args.precision)
        print(f"{r['preset']:7} {r['params_M']:9.2f} {r['set_size']:5d} {r['sets_per_step']:9d} {r['precision']:>9} "
              f"{r['s_per_step']:8.3f} {r['cells_per_s']:9.0f} {r['peak_MiB']:9.0f} ({r['peak_kind']})")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
