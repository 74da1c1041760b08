"""Training throughput of celltwin's ST vs Arc's STATE ST (``arc-state``), side by side, same data.

arc-state is under a non-commercial licence: it is never a dependency of celltwin and none of its
code is read or copied here. It runs as a black box through its documented CLI (``state tx
train``, configuration printed by ``state tx train --help``) from a separate virtualenv, e.g.::

    python3 -m venv /tmp/arcvenv
    /tmp/arcvenv/bin/pip install torch==2.13.0 arc-state==0.11.1
    .venv/bin/python bench/arc_state_compare.py --state-cli /tmp/arcvenv/bin/state

Protocol: a simulated screen (2 contexts x 8 perturbations, every group larger than a set, 1,500
genes, log1p(normalize_total 1e4) written once, the same file for both), a few-shot split of the
last context, and the same
architecture on both sides as far as the two configurations express it: Llama-style backbone
with hidden 696, 8 layers, 12 heads (head dim 58), MLP 2784, bidirectional attention, no
positional encoding, 4-layer encoders, energy loss, set size ``--set-size`` (64 on CPU: 512 is
impractically slow there) and ``--sets`` sets per step, fp32, CPU, no data-loader workers, no
validation, no logging service. Each tool is run twice as a subprocess, for ``--lo`` and ``--hi``
optimiser steps; the per-step time is the difference of the two wall times divided by the
difference of the step counts, so start-up, data loading and final checkpoint writing cancel.
Cells/s = sets x set size / per-step time. ``--repeats N`` repeats the whole measurement with
the tools interleaved and reports the median per-step time and the median of the per-repeat
ratios: on a shared machine a single arc-state measurement varied from 0.53 to 0.73 s/step.
``--celltwin-bf16`` adds celltwin with bf16 autocast (on CPUs with native bf16 instructions),
reported separately because arc-state's CLI offers no precision setting.

Differences that remain (the two are not the same network): arc-state's model has its own
decoder and projection heads (it reports its parameter count in its log); celltwin's ``state``
preset has a 4-layer basal MLP and a gene-space output head. Both parameter counts are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _data(work: Path, set_size: int) -> tuple[Path, list[str]]:
    import numpy as np
    import scipy.sparse as sp

    from celltwin.sim import SimConfig, simulate

    # every (context, perturbation) group holds more cells than a set, so both tools fill their
    # sets with distinct cells and do the same work per step (a smaller group would give arc-state
    # shorter sets while celltwin samples with replacement up to the set size)
    a = simulate(SimConfig(n_genes=1500, n_contexts=2, n_perts=8, cells_per_pert=set_size + 50,
                           n_controls=2 * set_size + 50, n_batches=2, seed=0))
    X = sp.csr_matrix(a.X, dtype=np.float64)
    X = sp.diags(1e4 / np.asarray(X.sum(1)).ravel()) @ X
    X.data = np.log1p(X.data)
    a.X = sp.csr_matrix(X, dtype=np.float32)
    (work / "data").mkdir(parents=True, exist_ok=True)
    path = work / "data" / "demo.h5ad"
    a.write_h5ad(path)
    target = sorted(set(a.obs["context"].astype(str)))[-1]
    perts = sorted(set(a.obs.loc[a.obs["context"] == target, "target_gene"].astype(str)) - {"non-targeting"})
    return path, [target, *perts[: len(perts) // 2]]


def _split(work: Path, target: str, test: list[str]) -> Path:
    quoted = ", ".join(f'"{p}"' for p in test)
    text = (f'[datasets]\ndemo = "{work / "data"}"\n\n[training]\ndemo = "train"\n\n[zeroshot]\n\n[fewshot]\n\n'
            f'[fewshot."demo.{target}"]\nval = []\ntest = [{quoted}]\n')
    path = work / "split.toml"
    path.write_text(text)
    return path


def _arc_cmd(cli: str, split: Path, out: Path, steps: int, args) -> list[str]:
    return [
        cli, "tx", "train",
        f"data.kwargs.toml_config_path={split}", "data.kwargs.pert_col=target_gene",
        "data.kwargs.cell_type_key=context", "data.kwargs.batch_col=batch",
        "data.kwargs.control_pert=non-targeting", "data.kwargs.num_workers=0", "data.kwargs.pin_memory=false",
        "model=state", "model.device=cpu", f"model.kwargs.cell_set_len={args.set_size}",
        "model.kwargs.hidden_dim=696", "model.kwargs.n_encoder_layers=4", "model.kwargs.loss=energy",
        "model.kwargs.transformer_backbone_kwargs.intermediate_size=2784",
        "model.kwargs.transformer_backbone_kwargs.num_hidden_layers=8",
        "model.kwargs.transformer_backbone_kwargs.num_attention_heads=12",
        "model.kwargs.transformer_backbone_kwargs.num_key_value_heads=12",
        "model.kwargs.transformer_backbone_kwargs.head_dim=58",
        f"training.max_steps={steps}", f"training.batch_size={args.sets}", "training.val_freq=1000000",
        "training.ckpt_every_n_steps=1000000", "use_wandb=false", "training.wandb_track=false",
        f"output_dir={out}", f"name=s{steps}",
    ]


def _celltwin_cmd(data: Path, split: Path, out: Path, steps: int, args, precision: str = "fp32") -> list[str]:
    sets = {"preset": "state", "set_size": args.set_size, "batch_sets": args.sets, "steps": steps,
            "lr": "1e-4", "warmup": 0, "precision": precision, "device": "cpu", "progress": "false",
            "tensorboard": "false", "resume": "false", "log_every": 1000}
    cmd = [sys.executable, "-m", "celltwin", "train", "--model", "state", "--data", str(data), "--split", str(split),
           "-o", str(out), "--context-col", "context"]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    return cmd


def _timed(cmd: list[str], cwd: Path, log: Path) -> float:
    t = time.perf_counter()
    with log.open("w") as f:
        subprocess.run(cmd, cwd=cwd, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--state-cli", required=True, help="path of arc-state's `state` executable (its own venv)")
    ap.add_argument("--set-size", type=int, default=64)
    ap.add_argument("--sets", type=int, default=2, help="sets per optimiser step")
    ap.add_argument("--lo", type=int, default=3)
    ap.add_argument("--hi", type=int, default=13)
    ap.add_argument("--threads", type=int, default=2, help="OMP/torch threads for both tools")
    ap.add_argument("--repeats", type=int, default=1, help="repeat the whole measurement (median reported)")
    ap.add_argument(
        "--celltwin-bf16", action="store_true",
        help="also time celltwin with bf16 autocast on CPU (a different precision from arc-state's fp32: "
             "reported on its own line, not as the like-for-like ratio)",
    )
    args = ap.parse_args(argv)
    if not Path(args.state_cli).exists():
        print(f"skipped: {args.state_cli} not found (see the module docstring to install arc-state)", file=sys.stderr)
        return 0
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    os.environ["WANDB_MODE"] = "disabled"
    with tempfile.TemporaryDirectory(prefix="celltwin-arc-") as tmp:
        work = Path(tmp)
        data, (target, *test) = _data(work, args.set_size)
        split = _split(work, target, test)
        tools = ["arc-state", "celltwin"] + (["celltwin-bf16"] if args.celltwin_bf16 else [])
        # per repeat: every tool at lo then at hi steps, interleaved, so slow phases of a shared
        # machine hit all tools alike; the ratio is computed per repeat and summarised by its median
        per_step: dict[str, list[float]] = {tool: [] for tool in tools}
        for rep in range(args.repeats):
            res: dict[str, dict[int, float]] = {tool: {} for tool in tools}
            for steps in (args.lo, args.hi):
                for tool in tools:
                    out = work / f"r{rep}-{tool}-{steps}"
                    if tool == "arc-state":
                        cmd = _arc_cmd(args.state_cli, split, out, steps, args)
                    else:
                        precision = "bf16" if tool == "celltwin-bf16" else "fp32"
                        cmd = _celltwin_cmd(data, split, out, steps, args, precision)
                    res[tool][steps] = _timed(cmd, work, work / f"r{rep}-{tool}-{steps}.log")
                    print(f"[{rep + 1}/{args.repeats}] {tool:13s} {steps:3d} steps: {res[tool][steps]:.1f} s wall",
                          flush=True)
            for tool in tools:
                per_step[tool].append((res[tool][args.hi] - res[tool][args.lo]) / (args.hi - args.lo))
        arc_log = (work / f"r0-arc-state-{args.hi}.log").read_text()
        m = re.search(r"Total params:\s*([\d.]+ \w)", arc_log)
        ct = json.loads((work / f"r0-celltwin-{args.hi}" / "run.json").read_text())["state"]["n_params"]
        cells = args.sets * args.set_size
        print(f"\nset size {args.set_size}, {args.sets} sets/step, 1,500 genes, {args.threads} threads, CPU, "
              f"{args.repeats} repeat(s), steps {args.lo} / {args.hi}")
        print(f"arc-state params: {m.group(1) if m else '?'}; celltwin params: {ct / 1e6:.1f} M")
        for tool in tools:
            s = statistics.median(per_step[tool])
            runs = ", ".join(f"{x:.3f}" for x in per_step[tool])
            print(f"{tool:13s} median {s:.3f} s/step ({cells / s:,.0f} cells/s); per repeat: {runs}")
        for tool, label in (("celltwin", "both fp32"),
                            ("celltwin-bf16", "celltwin bf16 autocast vs arc-state fp32: different precision, "
                                              "not the like-for-like ratio")):
            if tool not in per_step:
                continue
            ratios = [a / c for a, c in zip(per_step["arc-state"], per_step[tool], strict=True)]
            print(f"{tool} / arc-state throughput ({label}): median {statistics.median(ratios):.2f}x; "
                  f"per repeat: {', '.join(f'{r:.2f}x' for r in ratios)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
