"""Wall time and peak RSS of `celltwin eval` vs cell-eval 0.8.2 `run` (profile vcc), side by side.

For each scale, simulates a real file (CSR float32 UMI counts) and a prediction (CSR float32
log1p-normalised values from an independent draw with partly shuffled effects), writes both as
.h5ad, then evaluates them in fresh subprocesses (one per tool, so each peak RSS is its own):

* cell-eval: ``MetricsEvaluator(...).compute(profile="vcc")`` (writes its DE CSVs and results),
* celltwin:  ``evaluate(...)`` + ``EvalResult.write(report=False, de_format=...)`` (the same tables:
  parquet by default, ``--de-format csv`` for cell-eval's CSV files).

It prints wall time (read + DE + metrics + write; module imports excluded for both tools), peak RSS, the time ratio and
the largest difference between the two results tables. Numba caches are warmed on a tiny pair first.

Scales (perturbations x cells + controls, genes):
  S    50 x 100 + 1,000 controls, 2,000 genes
  M    50 x 100 + 1,000 controls, 18,080 genes
  L    50 x 1,000 + 10,000 controls, 18,080 genes
  VCC  100 x 1,000 + 38,000 controls, 18,080 genes (celltwin only unless --cell-eval-vcc)

Cells have ~1,500 UMIs (log-normal library sizes), so the VCC-scale files hold ~1,200 non-zeros
per cell. Run with 2 threads, as in CI::

    OMP_NUM_THREADS=2 NUMBA_NUM_THREADS=2 python bench/eval_speed.py --scales S M L VCC
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SCALES = {
    "S": (50, 100, 1000, 2000),
    "M": (50, 100, 1000, 18080),
    "L": (50, 1000, 10000, 18080),
    "VCC": (100, 1000, 38000, 18080),
}
CTRL = "non-targeting"


def _simulate(
    path: Path, perts: int, cells: int, controls: int, genes: int, seed: int, log: bool, shuffle: float = 0.0
) -> int:
    """Write one CSR float32 .h5ad; returns its sparse size in bytes (data + indices + indptr)."""
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    prm = np.random.default_rng(1234)  # shared truth between real and pred
    base = prm.lognormal(0.0, 1.5, genes)
    base /= base.sum()
    names = [f"P{i:03d}" for i in range(perts)]
    effects = []
    for i in range(perts):
        hit = prm.choice(genes, genes // 40, replace=False)
        eff = np.ones(genes)
        eff[hit] = prm.choice([0.25, 3.0], hit.size)
        eff[i % genes] = 0.2  # knock-down of a target-like gene
        effects.append((hit, eff))
    if shuffle:
        order = np.roll(np.arange(perts), 1)
        effects = [effects[order[i]] if rng.random() < shuffle else effects[i] for i in range(perts)]
    labels = np.array([CTRL] * controls + [n for n in names for _ in range(cells)])
    n = labels.size
    group = np.r_[np.full(controls, -1), np.repeat(np.arange(perts), cells)]
    indptr = [np.zeros(1, dtype=np.int64)]
    data, indices = [], []
    nnz = 0
    chunk = 4000
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        lib = np.maximum(rng.lognormal(np.log(1500.0), 0.35, stop - start).astype(np.int64), 50)
        rows_codes = []
        for g in np.unique(group[start:stop]):
            sel = np.flatnonzero(group[start:stop] == g)
            q = base if g < 0 else base * effects[g][1]
            cdf = np.cumsum(q / q.sum())
            draws = np.searchsorted(cdf, rng.random(int(lib[sel].sum())) * cdf[-1], side="right")
            draws = np.minimum(draws, genes - 1)
            rows = np.repeat(sel, lib[sel])
            rows_codes.append(rows.astype(np.int64) * genes + draws)
        codes, counts = np.unique(np.concatenate(rows_codes), return_counts=True)
        r, c = np.divmod(codes, genes)
        vals = counts.astype(np.float32)
        if log:
            tot = np.bincount(r, weights=vals, minlength=stop - start)
            vals = np.log1p(vals / tot[r] * 1e4).astype(np.float32)
        data.append(vals)
        indices.append(c.astype(np.int32))
        indptr.append(nnz + np.cumsum(np.bincount(r, minlength=stop - start)))
        nnz += vals.size
    X = sp.csr_matrix(
        (np.concatenate(data), np.concatenate(indices), np.concatenate(indptr)), shape=(n, genes)
    )
    a = ad.AnnData(X)
    a.obs["target_gene"] = pd.Categorical(labels)
    a.obs_names = [f"c{i}" for i in range(n)]
    a.var_names = [f"G{i:05d}" for i in range(genes - 3)] + names[:3]  # three genes named like perturbations
    a.write_h5ad(path)
    return int(X.data.nbytes + X.indices.nbytes + X.indptr.nbytes)


def _child(tool: str, real: str, pred: str, outdir: str, result: str, de_format: str = "parquet") -> None:
    if tool == "cell-eval":
        import logging

        logging.disable(logging.CRITICAL)
        from cell_eval import MetricsEvaluator

        t = time.perf_counter()
        ev = MetricsEvaluator(
            pred,
            real,
            control_pert=CTRL,
            pert_col="target_gene",
            num_threads=int(os.environ.get("NUMBA_NUM_THREADS", "2")),
            outdir=outdir,
        )
        res, _ = ev.compute(profile="vcc")
        wall = time.perf_counter() - t
        table = res.to_pandas()
    else:
        # import the modules evaluate() loads lazily, so that (as for cell-eval, whose import above
        # loads everything) module import time is not timed
        import anndata  # noqa: F401
        import polars  # noqa: F401  (writes the DE tables; cell-eval imports it at import time)
        import scipy.spatial.distance  # noqa: F401

        import celltwin.eval._de
        import celltwin.eval._full
        import celltwin.eval._load
        import celltwin.eval._rowops  # noqa: F401
        from celltwin.eval import EvalConfig, evaluate

        t = time.perf_counter()
        r = evaluate(pred, real, config=EvalConfig(profile="vcc"))
        r.write(outdir, report=False, de_format=de_format)
        wall = time.perf_counter() - t
        table = r.results
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    table.to_csv(result + ".csv", index=False)
    Path(result).write_text(json.dumps({"wall_s": wall, "peak_rss": rss}))


def _run(tool: str, real: Path, pred: Path, work: Path, de_format: str = "parquet") -> dict:
    out = work / f"out_{tool}"
    res = work / f"res_{tool}.json"
    subprocess.run(
        [sys.executable, __file__, "--_child", tool, str(real), str(pred), str(out), str(res), de_format], check=True
    )
    info = json.loads(res.read_text())
    import pandas as pd

    info["table"] = pd.read_csv(str(res) + ".csv")
    return info


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scales", nargs="+", default=["S", "M", "L", "VCC"], choices=list(SCALES))
    ap.add_argument(
        "--cell-eval-vcc", action="store_true", help="also run cell-eval at VCC scale (very slow)"
    )
    ap.add_argument(
        "--workdir", default=None, help="where to write the simulated files (default: a temp dir)"
    )
    ap.add_argument("--de-format", default="parquet", choices=["parquet", "csv"],
                    help="file format of celltwin's DE tables (cell-eval always writes CSV)")
    ap.add_argument("--_child", nargs=6, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        _child(*args._child)
        return 0

    tmp = tempfile.TemporaryDirectory(dir=args.workdir)
    work = Path(tmp.name)
    # warm numba caches on a tiny pair so JIT compilation is not timed
    _simulate(work / "w_real.h5ad", 3, 20, 40, 200, 0, log=False)
    _simulate(work / "w_pred.h5ad", 3, 20, 40, 200, 1, log=True, shuffle=0.5)
    _run("celltwin", work / "w_real.h5ad", work / "w_pred.h5ad", work)

    rows = []
    for scale in args.scales:
        perts, cells, controls, genes = SCALES[scale]
        t = time.perf_counter()
        size = _simulate(work / f"{scale}_real.h5ad", perts, cells, controls, genes, 0, log=False)
        size += _simulate(
            work / f"{scale}_pred.h5ad", perts, cells, controls, genes, 1, log=True, shuffle=0.3
        )
        print(
            f"[{scale}] simulated in {time.perf_counter() - t:.1f}s, sparse size {size / 2**30:.2f} GiB",
            flush=True,
        )
        ct = _run("celltwin", work / f"{scale}_real.h5ad", work / f"{scale}_pred.h5ad", work, args.de_format)
        ce = None
        if scale != "VCC" or args.cell_eval_vcc:
            ce = _run("cell-eval", work / f"{scale}_real.h5ad", work / f"{scale}_pred.h5ad", work)
        diff = float("nan")
        if ce is not None:
            a, b = ce["table"], ct["table"]
            same = (
                list(a.columns) == list(b.columns)
                and a["perturbation"].tolist() == b["perturbation"].tolist()
            )
            diff = max(
                float(np.nanmax(np.abs(a[c].to_numpy(float) - b[c].to_numpy(float)))) for c in a.columns[1:]
            )
            diff = diff if same else float("inf")
        rows.append((scale, perts, cells, controls, genes, size, ct, ce, diff))
        _print_row(rows[-1])
    print()
    print(
        "| scale | cells (pert x n + ctrl) x genes | sparse size | cell-eval wall | cell-eval RSS "
        "| celltwin wall | celltwin RSS | speed-up | RSS / sparse size | max abs diff |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        _print_row(row, markdown=True)
    return 0


def _print_row(row, markdown: bool = False) -> None:
    scale, perts, cells, controls, genes, size, ct, ce, diff = row
    gib = 2**30
    ce_wall = f"{ce['wall_s']:.1f} s" if ce else "-"
    ce_rss = f"{ce['peak_rss'] / gib:.2f} GiB" if ce else "-"
    ratio = f"{ce['wall_s'] / ct['wall_s']:.1f}x" if ce else "-"
    cells_s = f"{perts} x {cells} + {controls} x {genes}"
    cols = [
        scale,
        cells_s,
        f"{size / gib:.2f} GiB",
        ce_wall,
        ce_rss,
        f"{ct['wall_s']:.1f} s",
        f"{ct['peak_rss'] / gib:.2f} GiB",
        ratio,
        f"{ct['peak_rss'] / size:.2f}",
        "-" if ce is None else f"{diff:.1e}",
    ]
    print("| " + " | ".join(cols) + " |" if markdown else "  ".join(cols), flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
