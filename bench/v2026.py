"""One full VCC 2026 scoring of a context: celltwin vs cell-eval2 0.20.0, side by side.

"Full" means what a participant's first submission against a new reference costs: the
mean-perturbation baseline b (built from the reference and scored), the split-half replicate r
(5 seeds, each half scored against the other), and the submission itself (u), then the scaled
score s. Each tool runs in its own fresh subprocess (so its peak RSS is its own; module imports
are not timed), on the same two files:

* cell-eval2 (``--preset vcc2026``, CPU, DE backend ``pdex`` = what ``auto`` resolves to on a CPU
  host, ``num_threads`` = ``--threads``): ``build_generic_baseline`` -> ``build_real_bundle``
  (scores the baseline and the 5 replicate splits) -> ``compute_metrics`` of the submission ->
  ``score_metrics``;
* celltwin: ``evaluate_2026(pred, real, bundle=DIR)`` (builds and writes the bundle: baseline,
  replicate, prepared reference statistics), then the same call again with the bundle reused (the
  cost of every later submission against that reference).

It prints, per tool, wall time and peak RSS (``wait4`` of the child), the time ratio, and the
largest |celltwin - cell-eval2| over u, b, r and s of the six metrics and the context score.

Simulated data (one context; the prediction carries control rows too, because cell-eval2's
``compute_metrics`` refuses a prediction whose label set lacks the control, although with
``control_source: real`` it never reads them; celltwin ignores them likewise): ``--genes`` genes (default 18,533, the 2026 panel), a
log-normal mean profile, Poisson-log-normal counts at ``--umi`` median UMIs per cell (default
13,000, about 3,700 non-zeros per cell, as ``celltwin sim --preset vcc``); each perturbation
knocks its own target gene down to 20% and moves 2.5% of the genes by x0.25 or x3, plus a
response program shared by all perturbations (so the baseline is informative, as on real data).
The prediction is an independent draw where a third of the perturbations get another
perturbation's effect. Perturbations are named after genes of the panel (target exclusion is
exercised). Run with 2 threads, as in CI::

    OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 python bench/v2026.py --perts 30 --cells 400
    OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 python bench/v2026.py --perts 300 --cells 400 --tools celltwin

cell-eval2's cost grows with perturbations x (cells + controls) per scoring; at the issue's size
(300 x 400 + 2,000 controls) one full scoring takes it hours on 2 cores, so the side-by-side rows
in RESULTS.md use fewer perturbations and say so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from celltwin.eval.v2026 import METRICS  # the six metric names, in the scorer's order

CTRL = "non-targeting"


# ----------------------------------------------------------------------------------- simulation
def _truth(perts: int, genes: int) -> tuple[np.ndarray, list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray]:
    """Mean profile, per-perturbation effects, target columns and the shared program (seed 1234)."""
    prm = np.random.default_rng(1234)
    base = prm.lognormal(0.0, 1.5, genes)
    base /= base.sum()
    targets = prm.choice(genes, perts, replace=False)
    program = prm.choice(genes, genes // 50, replace=False)
    effects = []
    for i in range(perts):
        hit = prm.choice(genes, genes // 40, replace=False)
        eff = np.ones(genes)
        eff[hit] = prm.choice([0.25, 3.0], hit.size)
        eff[program] *= 1.6
        eff[targets[i]] = 0.2
        effects.append((hit, eff))
    return base, effects, targets, program


def simulate(path: Path, perts: int, cells: int, controls: int, genes: int, umi: float, seed: int, pred: bool) -> int:
    """Write one CSR float32 counts .h5ad; returns its sparse size in bytes (data + indices + indptr)."""
    import anndata as ad
    import h5py
    import pandas as pd

    rng = np.random.default_rng(seed)
    base, effects, targets, _ = _truth(perts, genes)
    names = [f"G{j:05d}" for j in range(genes)]
    pnames = [names[t] for t in targets]
    if pred:  # a third of the perturbations get another perturbation's effect
        swap = rng.random(perts) < 1 / 3
        effects = [effects[(i + 1) % perts] if swap[i] else effects[i] for i in range(perts)]
    n_ctrl = controls
    labels = np.array([CTRL] * n_ctrl + [p for p in pnames for _ in range(cells)], dtype=object)
    group = np.r_[np.full(n_ctrl, -1), np.repeat(np.arange(perts), cells)]
    order = rng.permutation(labels.size)  # shuffled cell order, as a real file
    labels, group = labels[order], group[order]
    obs = pd.DataFrame({"target_gene": pd.Categorical(labels)}, index=[f"c{i}" for i in range(labels.size)])
    var = pd.DataFrame(index=names)
    # write the AnnData shell with an empty X, then stream X's CSR arrays into it block by block
    import scipy.sparse as sp

    shell = ad.AnnData(X=sp.csr_matrix((labels.size, genes), dtype=np.float32), obs=obs, var=var)
    shell.write_h5ad(path)
    chunk = 2000
    nnz = 0
    with h5py.File(path, "r+") as f:
        del f["X"]
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([labels.size, genes])
        dd = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(1 << 20,))
        di = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(1 << 20,))
        indptr = [np.zeros(1, dtype=np.int64)]
        for start in range(0, labels.size, chunk):
            gr = group[start : start + chunk]
            mu = np.broadcast_to(base, (gr.size, genes)).copy()
            for k in np.unique(gr[gr >= 0]):
                mu[gr == k] *= effects[k][1]
            mu /= mu.sum(axis=1, keepdims=True)
            lib = umi * rng.lognormal(0.0, 0.35, (gr.size, 1))
            x = sp.csr_matrix(rng.poisson(mu * lib).astype(np.float32))
            dd.resize((nnz + x.nnz,))
            di.resize((nnz + x.nnz,))
            dd[nnz:] = x.data
            di[nnz:] = x.indices.astype(np.int32)
            indptr.append(x.indptr[1:].astype(np.int64) + nnz)
            nnz += x.nnz
        ip = np.concatenate(indptr)
        g.create_dataset("indptr", data=ip)
    return nnz * 8 + ip.nbytes


# ------------------------------------------------------------------------------------ children
def _child_celltwin(real: str, pred: str, work: str, result: str) -> None:
    from celltwin.eval.v2026 import evaluate_2026

    out = {}
    for leg in ("fresh", "bundle reused"):
        t = time.perf_counter()
        ev = evaluate_2026(pred, real, bundle=os.path.join(work, "bundle"))
        out[leg] = time.perf_counter() - t
    m = ev.metrics.set_index("metric")
    out["values"] = {c: {k: float(m.loc[k, c]) for k in METRICS} for c in ("u", "b", "r", "s")}
    out["score"] = float(ev.score)
    Path(result).write_text(json.dumps(out))


def _child_cell_eval2(real: str, pred: str, work: str, result: str, threads: int) -> None:
    import logging
    from dataclasses import replace

    import polars as pl
    from cell_eval2.baseline import build_generic_baseline, build_run_meta
    from cell_eval2.config import EvalConfig
    from cell_eval2.real_bundle import build_real_bundle
    from cell_eval2.run import aggregate_metrics_wide, compute_metrics, metric_output_names
    from cell_eval2.score import score_metrics

    logging.disable(logging.WARNING)
    p = EvalConfig.from_preset("vcc2026")
    cfg = replace(p, pert_col="target_gene", device="cpu", de=replace(p.de, backend="pdex"), num_threads=threads)
    out: dict = {}
    t0 = t = time.perf_counter()
    build_generic_baseline(real, config=cfg, save_pred=os.path.join(work, "baseline.h5ad"))
    out["baseline"] = time.perf_counter() - t
    t = time.perf_counter()
    bundle = os.path.join(work, "bundle")
    build_real_bundle(real, os.path.join(work, "baseline.h5ad"), config=cfg, outdir=bundle, bundle_id="A")
    out["real bundle (b + 5 splits)"] = time.perf_counter() - t
    t = time.perf_counter()
    tidy = compute_metrics(pred, real, config=cfg)
    agg = aggregate_metrics_wide(tidy, metrics=metric_output_names(cfg))
    scored = score_metrics(agg, real_bundle=bundle, user_meta=build_run_meta(cfg, real, pred))
    out["submission (u, s)"] = time.perf_counter() - t
    out["fresh"] = time.perf_counter() - t0
    base = pl.read_csv(os.path.join(bundle, "baseline_agg.csv")).filter(pl.col("statistic") == "mean")
    anchor = pl.read_parquet(os.path.join(bundle, "anchor_agg.parquet"))
    r = dict(zip(anchor["metric"].to_list(), anchor["replicate"].to_list(), strict=True))
    s = dict(zip(scored["metric"].to_list(), scored["from_replicate"].to_list(), strict=True))
    umean = agg.filter(pl.col("statistic") == "mean")
    out["values"] = {
        "u": {k: float(umean[k][0]) for k in METRICS},
        "b": {k: float(base[k][0]) for k in METRICS},
        "r": {k: float(r[k]) for k in METRICS},
        "s": {k: float(s[k]) for k in METRICS},
    }
    out["score"] = float(s["avg_score"])
    Path(result).write_text(json.dumps(out))


def _run(tool: str, real: Path, pred: Path, work: Path, threads: int) -> dict:
    shutil.rmtree(work, ignore_errors=True)  # both tools refuse to write into an old bundle
    work.mkdir(parents=True)
    result = work / "result.json"
    cmd = [sys.executable, __file__, "--child", tool, str(real), str(pred), str(work), str(result), str(threads)]
    proc = subprocess.Popen(cmd)
    _, status, usage = os.wait4(proc.pid, 0)
    if status != 0:
        msg = f"{tool} failed (wait status {status})"
        raise SystemExit(msg)
    row = json.loads(result.read_text())
    row["peak_rss_gb"] = usage.ru_maxrss / 2**20  # GiB (ru_maxrss is in KiB on Linux)
    return row


def _max_diff(a: dict, b: dict) -> float:
    d = abs(a["score"] - b["score"])
    for c in ("u", "b", "r", "s"):
        for k in METRICS:
            x, y = a["values"][c][k], b["values"][c][k]
            if np.isnan(x) and np.isnan(y):
                continue
            d = max(d, abs(x - y))
    return d


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        tool, real, pred, work, result, threads = sys.argv[2:8]
        if tool == "celltwin":
            _child_celltwin(real, pred, work, result)
        else:
            _child_cell_eval2(real, pred, work, result, int(threads))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--perts", type=int, default=30)
    ap.add_argument("--cells", type=int, default=400, help="cells per perturbation (reference and prediction)")
    ap.add_argument("--controls", type=int, default=2000)
    ap.add_argument("--genes", type=int, default=18533)
    ap.add_argument("--umi", type=float, default=13000.0, help="median UMIs per cell")
    ap.add_argument("--tools", default="celltwin,cell-eval2")
    ap.add_argument("--threads", type=int, default=2, help="cell-eval2 num_threads (celltwin: NUMBA_NUM_THREADS)")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/bench_v2026"))
    ap.add_argument("--keep-files", action="store_true", help="reuse real.h5ad / pred.h5ad of the same size")
    a = ap.parse_args()
    tag = f"{a.perts}x{a.cells}+{a.controls}x{a.genes}@{a.umi:g}"
    d = a.workdir / tag
    d.mkdir(parents=True, exist_ok=True)
    real, pred = d / "real.h5ad", d / "pred.h5ad"
    sizes = d / "sizes.json"
    if not (a.keep_files and sizes.exists()):
        t = time.perf_counter()
        sz = [
            simulate(real, a.perts, a.cells, a.controls, a.genes, a.umi, seed=0, pred=False),
            simulate(pred, a.perts, a.cells, a.controls, a.genes, a.umi, seed=1, pred=True),
        ]
        sizes.write_text(json.dumps(sz))
        print(f"simulated {tag} in {time.perf_counter() - t:.0f} s", flush=True)
    sz = json.loads(sizes.read_text())
    print(f"{tag}: sparse size real {sz[0] / 1e9:.2f} GB + pred {sz[1] / 1e9:.2f} GB", flush=True)
    rows = {}
    for tool in a.tools.split(","):
        rows[tool] = _run(tool, real, pred, d / tool, a.threads)
        r = rows[tool]
        legs = {k: v for k, v in r.items() if isinstance(v, float) and k != "score" and k != "peak_rss_gb"}
        print(f"{tool}: " + ", ".join(f"{k} {v:.1f} s" for k, v in legs.items()) + f", peak RSS {r['peak_rss_gb']:.2f} GiB "
              f"({r['peak_rss_gb'] * 2**30 / sum(sz):.2f}x the files' sparse size), score {r['score']:.6f}", flush=True)
    if "celltwin" in rows and "cell-eval2" in rows:
        c, e = rows["celltwin"], rows["cell-eval2"]
        print(f"full scoring: cell-eval2 / celltwin = {e['fresh'] / c['fresh']:.1f}x; "
              f"vs a reused bundle {e['fresh'] / c['bundle reused']:.1f}x; "
              f"max |diff| over u, b, r, s and the score = {_max_diff(c, e):.2e}")
    (d / "rows.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
