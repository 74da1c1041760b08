"""Wall time of celltwin's DE engine vs pdex 0.3.0 (as cell-eval 0.8.2 calls it).

Simulates log1p-normalised sparse Perturb-seq data (negative-binomial-like counts, a fraction
of genes shifted per perturbation), then times ``de_table`` and, unless ``--skip-pdex``,
``pdex(mode="ref", is_log1p=True, epsilon=0)`` on the same AnnData, checks that both agree
and prints both wall times and the ratio. Numba JIT is warmed up on a tiny input first.

Example (VCC test scale is --perts 100 --cells 1000 --controls 38000 --genes 18080)::

    NUMBA_NUM_THREADS=2 python bench/de_speed.py --perts 20 --cells 200 --controls 4000 --genes 4000
"""

from __future__ import annotations

import argparse
import os
import threading
import time
import warnings

import numpy as np
import pandas as pd
import scipy.sparse as sp


def simulate(perts: int, cells: int, controls: int, genes: int, seed: int = 0, mean_count: float = 0.35):
    """CSR float32 log1p(normalize_total(counts, 1e4)) and labels (controls first)."""
    rng = np.random.default_rng(seed)
    n = controls + perts * cells
    labels = np.asarray(["non-targeting"] * controls + [f"P{i:03d}" for i in range(perts) for _ in range(cells)])
    base = rng.gamma(0.4, mean_count / 0.4, size=genes)
    rows = []
    chunk = 2000
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        rate = np.broadcast_to(base, (stop - start, genes)).copy()
        for i in range(max(0, (start - controls) // cells), max(0, (stop - 1 - controls) // cells + 1)):
            lo = max(start, controls + i * cells) - start
            hi = min(stop, controls + (i + 1) * cells) - start
            if hi > lo:
                hit = np.random.default_rng(seed + 1 + i).choice(genes, size=max(1, genes // 50), replace=False)
                rate[lo:hi, hit] *= 3.0
        counts = rng.poisson(rate * rng.gamma(5.0, 0.2, size=(stop - start, 1))).astype(np.float32)
        lib = np.maximum(counts.sum(1, keepdims=True), 1.0)
        rows.append(sp.csr_matrix(np.log1p(counts / lib * 1e4).astype(np.float32)))
    X = sp.vstack(rows, format="csr")
    X.sort_indices()
    return X, labels


class RssPeak:
    """Samples the current RSS (``/proc/self/statm``) every 5 ms; ``.growth`` = peak - start, MiB."""

    def __enter__(self):
        self._page = os.sysconf("SC_PAGE_SIZE")
        self.start = self.peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> float:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page / 2**20

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._rss())
        self.growth = self.peak - self.start


def time_celltwin(X, labels, genes, threads: int):
    from celltwin.eval._de import de_table

    t = time.perf_counter()
    c = time.process_time()
    frame = de_table(X, labels, "non-targeting", genes, n_threads=threads)
    time_celltwin.cpu = time.process_time() - c
    return time.perf_counter() - t, frame


def time_pdex(X, labels, genes, threads: int):
    import anndata as ad
    from pdex import pdex

    obs = pd.DataFrame({"target": pd.Categorical(labels)}, index=np.arange(len(labels)).astype(str))
    adata = ad.AnnData(X, obs=obs, var=pd.DataFrame(index=genes))
    t = time.perf_counter()
    c = time.process_time()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = pdex(adata, mode="ref", groupby="target", reference="non-targeting", threads=threads,
                     is_log1p=True, epsilon=0.0).to_pandas()
    time_pdex.cpu = time.process_time() - c
    return time.perf_counter() - t, frame


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--perts", type=int, default=20)
    p.add_argument("--cells", type=int, default=200, help="cells per perturbation")
    p.add_argument("--controls", type=int, default=4000)
    p.add_argument("--genes", type=int, default=4000)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dense", action="store_true", help="time a dense float32 X instead of CSR")
    p.add_argument("--skip-pdex", action="store_true")
    args = p.parse_args()

    # warm-up: JIT (celltwin kernels are cached on disk; pdex's are not)
    Xw, lw = simulate(2, 20, 50, 30, seed=1)
    gw = [f"g{i}" for i in range(30)]
    time_celltwin(Xw, lw, gw, args.threads)
    if not args.skip_pdex:
        time_pdex(Xw, lw, gw, args.threads)

    t0 = time.perf_counter()
    X, labels = simulate(args.perts, args.cells, args.controls, args.genes)
    if args.dense:
        X = X.toarray()
    genes = [f"g{i}" for i in range(args.genes)]
    size_mb = (X.data.nbytes + X.indices.nbytes + X.indptr.nbytes) / 2**20 if sp.issparse(X) else X.nbytes / 2**20
    density = X.nnz / (X.shape[0] * X.shape[1]) if sp.issparse(X) else float((X != 0).mean())
    print(f"data: {X.shape[0]} cells x {X.shape[1]} genes, {'dense' if args.dense else 'CSR'} "
          f"{size_mb:.0f} MiB, density {density:.3f} (simulated in {time.perf_counter() - t0:.1f}s)")
    with RssPeak() as mem:
        t_ct, f_ct = time_celltwin(X, labels, genes, args.threads)
    print(f"celltwin de_table: {t_ct:8.2f} s wall, {time_celltwin.cpu:.2f} s CPU, peak RSS +{mem.growth:.0f} MiB "
          f"({mem.growth / size_mb:.2f} x the input, output frame included)")
    if not args.skip_pdex:
        t_pd, f_pd = time_pdex(X, labels, genes, args.threads)
        same = all(np.array_equal(f_ct[c].to_numpy(), f_pd[c].to_numpy(), equal_nan=True)
                   for c in ("p_value", "fdr", "statistic", "target_mean", "ref_mean", "log2_fold_change"))
        print(f"pdex 0.3.0       : {t_pd:8.2f} s wall, {time_pdex.cpu:.2f} s CPU")
        print(f"speed-up         : {t_pd / t_ct:8.1f} x   (identical tables: {same})")


if __name__ == "__main__":
    main()
