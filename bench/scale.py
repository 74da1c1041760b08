"""The main job at screen size: wall time and peak memory of every step, read from disk.

On a simulated screen with 18,080 genes (``celltwin sim --preset vcc``: 300,000 cells; or a
smaller one for quick runs) this runs, each step as its own ``celltwin`` process exactly as a
user would type it:

1. ``split``: hold out 50 perturbations of the screen's context (few-shot);
2. ``train`` ``cell-mean``, ``context-transfer``, ``linear``, ``state`` (preset ``small``, every
   gene in and out) and ``state --hvg 2000`` (HVGs in, every gene out: output space ``all``);
3. ``predict`` the 50 held-out perturbations x ``--cells`` cells each (``--counts``) for every run;
4. ``eval`` each prediction against the real cells (``--write-real`` of the first predict);
5. ``prep`` the ST prediction into a ``.vcc`` file.

Memory: peak RSS of the whole process tree of each step (the command plus its DataLoader
workers), sampled every 0.1 s from /proc. Time: wall seconds. The ST steps also report the
loader's share: a second, short ``state`` run with ``num_workers=0`` is timed against an
in-memory run of the same configuration on a subset (``--loader-cells`` cells read into memory
once), so "reading from disk" vs "reading from memory" is the only difference.

    python bench/scale.py --data /tmp/scale/vcc300k.h5ad --workdir /tmp/scale/run300
    python bench/scale.py --data /tmp/scale/vcc100k.h5ad --workdir /tmp/scale/run100 --steps 100

Numbers go to ``WORKDIR/scale.json`` and a Markdown table on stdout (bench/RESULTS.md, "Scale").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path


def _tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (Linux /proc)."""
    total, todo, seen = 0, [pid], set()
    while todo:
        p = todo.pop()
        if p in seen:
            continue
        seen.add(p)
        try:
            with open(f"/proc/{p}/statm") as fh:
                total += int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            with open(f"/proc/{p}/task/{p}/children") as fh:
                todo += [int(x) for x in fh.read().split()]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
    return total


def run_step(name: str, cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd``; return wall seconds and the peak RSS (GiB) of its process tree."""
    t0 = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        peak = [0]

        def poll() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], _tree_rss(proc.pid))
                time.sleep(0.1)

        th = threading.Thread(target=poll, daemon=True)
        th.start()
        rc = proc.wait()
        th.join()
    wall = time.perf_counter() - t0
    row = {"step": name, "seconds": round(wall, 1), "peak_rss_gib": round(peak[0] / 2**30, 2), "rc": rc}
    print(f"  {name:<34} {wall:8.1f} s  {peak[0] / 2**30:6.2f} GiB  rc={rc}", flush=True)
    if rc != 0:
        print(log.read_text()[-3000:], file=sys.stderr)
        msg = f"step {name} failed (rc={rc}); log: {log}"
        raise SystemExit(msg)
    return row


def loader_share(data: str, split: str, work: Path, cells: int, steps: int, repeats: int = 3) -> dict:
    """ST throughput (cells/s) reading sets from disk vs from memory, same configuration.

    The same ``cells`` training cells (a random subset, so that the in-memory copy fits) are
    trained on from the file (``num_workers`` 0 and 1) and from an in-memory AnnData holding
    them; the three variants are interleaved ``repeats`` times and the medians reported (the
    machine's load drifts; back-to-back runs of one variant would fold that drift into the ratio).
    """
    import anndata as ad
    import numpy as np
    import pandas as pd

    from celltwin.data.dataset import CellDataset
    from celltwin.data.inputs import InputConfig
    from celltwin.pipeline import open_training_data, resolve_dataset_split
    from celltwin.predict import train_run

    ds, sp = open_training_data(split, data)
    rows = resolve_dataset_split(ds, sp).train_rows
    sub = np.sort(np.random.default_rng(0).choice(rows, size=min(cells, rows.size), replace=False))
    mem = ad.AnnData(X=ds.read_rows(sub), obs=ds.obs.iloc[sub].copy(), var=pd.DataFrame(index=ds.var_names))
    mem_ds = CellDataset.from_anndata(mem)
    opts = {"preset": "small", "steps": str(steps), "progress": "false", "tensorboard": "false", "resume": "false"}
    variants = [("disk, num_workers=0", ds, sub, "0"), ("disk, num_workers=1", ds, sub, "1"),
                ("memory", mem_ds, None, "0")]
    rates: dict[str, list[float]] = {v[0]: [] for v in variants}
    for rep in range(repeats):
        for k, (label, data_, rows_, nw) in enumerate(variants):
            m = train_run("state", data_, work / f"loader-{rep}-{k}", options={**opts, "num_workers": nw},
                          rows=rows_, inputs=InputConfig())
            rates[label].append(m["state"]["cells_per_s"])
            print(f"  loader {label:<22} repeat {rep}: {m['state']['cells_per_s']:.0f} cells/s", flush=True)
    out: dict[str, float | list[float]] = {f"{k} (runs)": v for k, v in rates.items()}
    med = {k: float(np.median(v)) for k, v in rates.items()}
    out.update({f"{k} (median)": v for k, v in med.items()})
    for k in med:
        if k != "memory":
            out[f"ratio {k} / memory"] = round(med[k] / med["memory"], 3)
    return out


def profile_loader(data: str, split: str, work: Path, cells: int, steps: int = 20) -> None:
    """Where an ST step's time goes when sets are read from disk in the training process."""
    import cProfile
    import pstats

    import numpy as np

    from celltwin.data.inputs import InputConfig
    from celltwin.pipeline import open_training_data, resolve_dataset_split
    from celltwin.predict import train_run

    ds, sp = open_training_data(split, data)
    rows = resolve_dataset_split(ds, sp).train_rows
    sub = np.sort(np.random.default_rng(0).choice(rows, size=min(cells, rows.size), replace=False))
    opts = {"preset": "small", "steps": str(steps), "progress": "false", "tensorboard": "false",
            "resume": "false", "num_workers": "0"}
    import time

    from celltwin.data.preprocess import fit_preprocessing

    pre = fit_preprocessing(ds, rows=sub)
    rng = np.random.default_rng(1)
    ds.read_model(rng.choice(sub, 1024), pre)  # compile, warm the page cache
    times = []
    for _ in range(5):
        r = rng.choice(sub, 1024)
        t0 = time.perf_counter()
        ds.read_model(r, pre)
        times.append(time.perf_counter() - t0)
    print(f"1,024 random rows -> dense model space: median {1e3 * float(np.median(times)):.0f} ms (5 draws)")
    prof = cProfile.Profile()
    prof.runcall(train_run, "state", ds, work / "profile", options=opts, rows=sub, inputs=InputConfig())
    st = pstats.Stats(prof)
    total = st.total_tt
    print(f"total {total:.1f} s over {steps} steps")
    # the set reads (SetReader.__call__: disk reads, normalisation, dense scatter; the first call
    # includes the one-off numba compile), the collation and the backward pass
    seen: set[str] = set()
    for (fname, _line, func), (_cc, ncalls, _tt, ct, _callers) in st.stats.items():
        name = None
        if func == "__call__" and fname.endswith("st_data.py"):
            name = "set reads (SetReader)"
        elif "run_backward" in func:
            name = "backward pass"
        elif "built-in method torch.stack" in func:
            name = "collation (torch.stack)"
        if name and name not in seen:  # a builtin can be listed under two callers' keys
            seen.add(name)
            print(f"  {name:<26} {ncalls:5d} calls  cumulative {ct:6.2f} s")


def _only_eval(exe: list[str], work: Path, names: list[str]) -> None:
    """The eval / prep steps of an earlier run, on its predictions (bench/RESULTS.md, run E)."""
    rows = []
    for name in names:
        rows.append(run_step(f"eval {name}", [*exe, "eval", "--pred", str(work / f"pred-{name}.h5ad"), "--real",
                                              str(work / "real.h5ad"), "-o", str(work / f"eval-{name}"),
                                              "--de-format", "none"], work / f"eval-{name}.log"))
        if name == "state":
            rows.append(run_step("prep state", [*exe, "prep", "-i", str(work / "pred-state.h5ad"), "-g",
                                                str(work / "genes.csv"), "-o", str(work / "state.vcc")],
                                 work / "prep.log"))
    print("\n| step | wall s | peak RSS GiB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']} | {r['peak_rss_gib']} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="screen .h5ad (celltwin sim --preset vcc)")
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--holdout", type=int, default=50)
    ap.add_argument("--cells", type=int, default=1000, help="predicted cells per perturbation")
    ap.add_argument("--steps", type=int, default=200, help="ST optimiser steps")
    ap.add_argument("--hvg", type=int, default=2000)
    ap.add_argument("--loader-cells", type=int, default=20000, help="cells of the disk-vs-memory comparison")
    ap.add_argument("--loader-steps", type=int, default=40)
    ap.add_argument("--loader-repeats", type=int, default=3)
    ap.add_argument("--only-loader", action="store_true", help="run only the disk-vs-memory comparison")
    ap.add_argument("--profile-loader", action="store_true",
                    help="cProfile 20 ST steps on --loader-cells cells read from disk (num_workers=0)")
    ap.add_argument("--skip", default="", help="comma-separated steps to skip (e.g. state,loader)")
    ap.add_argument("--only-eval", default=None, metavar="MODELS",
                    help="re-run only `eval` (and `prep` for state) of an earlier run in --workdir, on its "
                         "pred-MODEL.h5ad files (comma-separated MODELS, e.g. state,cell-mean); --data unused")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    skip = set(filter(None, args.skip.split(",")))
    exe = [sys.executable, "-m", "celltwin"]
    if args.only_eval:
        _only_eval(exe, work, args.only_eval.split(","))
        return
    rows: list[dict] = []
    t_all = time.perf_counter()

    import anndata as ad
    import h5py
    import numpy as np
    import pandas as pd

    with h5py.File(args.data, "r") as f:
        obs = ad.io.read_elem(f["obs"])
        n_genes = int(f["X"].attrs["shape"][1])
        genes = ad.io.read_elem(f["var"]).index.astype(str)
    ctx = sorted(obs["context"].astype(str).unique())[-1]
    print(f"{args.data}: {len(obs):,} cells x {n_genes:,} genes; target context {ctx}", flush=True)
    split = work / "split.toml"
    rows.append(run_step("split", [*exe, "split", args.data, "--context-col", "context", "--target", ctx,
                                   "--holdout", str(args.holdout), "-o", str(split)], work / "split.log"))
    if args.profile_loader:
        profile_loader(args.data, str(split), work, args.loader_cells)
        return
    if args.only_loader:
        res = {"data": args.data, "loader": loader_share(args.data, str(split), work, args.loader_cells,
                                                         args.loader_steps, args.loader_repeats)}
        (work / "loader.json").write_text(json.dumps(res, indent=2) + "\n")
        print(json.dumps(res["loader"], indent=2))
        return
    import tomllib

    test = tomllib.loads(split.read_text())["fewshot"][next(iter(tomllib.loads(split.read_text())["fewshot"]))]["test"]
    counts = work / "counts.csv"
    pd.DataFrame({"target_gene": test, "n_cells": [args.cells] * len(test)}).to_csv(counts, index=False)
    pd.DataFrame(np.asarray(genes)).to_csv(work / "genes.csv", header=False, index=False)
    st = ["--set=preset=small", f"--set=steps={args.steps}", "--set=progress=false", "--set=tensorboard=false",
          "--set=resume=false"]
    models = [("cell-mean", []), ("context-transfer", []), ("linear", []),
              ("state", st), ("state-hvg", ["--hvg", str(args.hvg), *st])]
    for name, extra in models:
        if name.split("-")[0] in skip or name in skip:
            continue
        model = "state" if name.startswith("state") else name
        rows.append(run_step(f"train {name}", [*exe, "train", "--model", model, "--split", str(split),
                                               "--data", args.data, "-o", str(work / name), *extra],
                             work / f"train-{name}.log"))
        real = work / "real.h5ad"
        pr = [*exe, "predict", str(work / name), "--data", args.data, "--counts", str(counts), "--context", ctx,
              "-o", str(work / f"pred-{name}.h5ad")]
        if not real.exists():  # the real held-out cells + controls, once
            pr += ["--split", str(split), "--write-real", str(real)]
        rows.append(run_step(f"predict {name}", pr, work / f"predict-{name}.log"))
        rows.append(run_step(f"eval {name}", [*exe, "eval", "--pred", str(work / f"pred-{name}.h5ad"), "--real",
                                              str(real), "-o", str(work / f"eval-{name}"), "--de-format", "none"],
                             work / f"eval-{name}.log"))
        if name == "state":
            rows.append(run_step("prep state", [*exe, "prep", "-i", str(work / f"pred-{name}.h5ad"), "-g",
                                                str(work / "genes.csv"), "-o", str(work / "state.vcc")],
                                 work / "prep.log"))
    total = time.perf_counter() - t_all
    result = {"data": args.data, "n_cells": len(obs), "n_genes": n_genes, "steps": rows,
              "total_seconds": round(total, 1)}
    if "loader" not in skip:
        result["loader"] = loader_share(args.data, str(split), work, args.loader_cells, args.loader_steps,
                                        args.loader_repeats)
        print(json.dumps(result["loader"], indent=2))
    (work / "scale.json").write_text(json.dumps(result, indent=2) + "\n")
    print("\n| step | wall s | peak RSS GiB |\n|---|---|---|")
    for r in rows:
        print(f"| {r['step']} | {r['seconds']} | {r['peak_rss_gib']} |")
    print(f"| **pipeline total** | {total:.0f} | max {max(r['peak_rss_gib'] for r in rows)} |")


if __name__ == "__main__":
    main()
