"""Regenerate the legacy (2025 VCC leaderboard) golden files under tests/data/legacy/.

Run with the legacy reference venv (cell-eval 0.6.6 + pdex 0.1.27, never part of celltwin)::

    python3 -m venv .venv-legacy && .venv-legacy/bin/pip install cell-eval==0.6.6 pdex==0.1.27
    .venv-legacy/bin/python scripts/make_legacy_golden.py

For each case it writes (all gzipped CSV except the inputs):

* ``<case>_inputs.npz``       X_real, X_pred (dense, log1p), labels, genes, control
* ``<case>_de_real.csv.gz``   pdex 0.1.27 DE of the real data, called as cell-eval 0.6.6 calls it
* ``<case>_de_pred.csv.gz``   the same for the prediction
* ``<case>_results.csv.gz``   cell-eval 0.6.6 ``MetricsEvaluator(...).compute(profile="vcc")``
* ``<case>_agg_results.csv.gz`` its aggregate table

Inputs are generated from seeded numpy only (see ``make_case``), so they are reproducible.
"""

from __future__ import annotations

import gzip
import io
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np

OUT = Path(__file__).resolve().parents[1] / "tests" / "data" / "legacy"
CONTROL = "non-targeting"

# name -> (seed, n_ctrl, cells per perturbation, n_genes, dtype)
CASES = {
    "small_f32": (11, 60, [25, 6, 18], 30, "float32"),
    "mid_f64": (12, 150, [30, 22, 40, 9], 40, "float64"),
    # large enough that scipy's float32 rank/tie sums round (tie counts > 256, n > 128)
    "big_f32": (13, 900, [420, 160], 10, "float32"),
}


def make_case(seed: int, n_ctrl: int, sizes: list[int], n_genes: int, dtype: str):
    """Seeded log1p-normalised real/pred matrices with zeros, ties and first-appearance order."""
    rng = np.random.default_rng(seed)
    perts = [f"T{chr(ord('Z') - i)}" for i in range(len(sizes))]  # TZ, TY, ... (unsorted)
    labels = np.asarray([CONTROL] * n_ctrl + [p for p, n in zip(perts, sizes, strict=True) for _ in range(n)], dtype=object)
    labels = labels[rng.permutation(labels.size)]
    n = labels.size
    base = rng.gamma(0.7, 1.5, size=n_genes)
    eff = np.ones((n, n_genes))
    for p in perts:
        hit = rng.choice(n_genes, size=max(2, n_genes // 6), replace=False)
        eff[np.ix_(labels == p, hit)] = rng.choice([0.05, 5.0], size=hit.size)

    def draw(scale):
        counts = rng.poisson(base * eff * scale).astype(np.float64)
        counts[:, 0] = 0.0  # all-zero gene
        lib = np.maximum(counts.sum(1, keepdims=True), 1.0)
        return np.log1p(counts / lib * 1000.0)

    X_real = draw(1.0)
    X_real[:, 1] = np.log1p(2.0)  # constant gene
    X_real[labels == CONTROL, 2] = 0.0  # zero in controls only
    X_real[:, 4] = np.log1p(rng.uniform(0.5, 5.0, size=n))  # tie-free: scipy goes exact for n <= 8
    X_pred = np.clip(X_real + rng.normal(0, 0.3, size=X_real.shape) * (X_real > 0), 0, None)
    genes = np.asarray([f"G{i:03d}" for i in range(n_genes)], dtype=object)
    genes[3] = perts[0]  # a gene named like a perturbation
    return X_real.astype(dtype), X_pred.astype(dtype), labels, genes


def _adata(X, labels, genes):
    import anndata as ad
    import pandas as pd

    obs = pd.DataFrame({"target_gene": pd.Categorical(labels)}, index=[f"c{i}" for i in range(len(labels))])
    return ad.AnnData(X.copy(), obs=obs, var=pd.DataFrame(index=list(genes)))


def _write_gz(path: Path, text: str) -> None:
    buf = io.BytesIO()
    with gzip.GzipFile(fileobj=buf, mode="wb", mtime=0) as fh:
        fh.write(text.encode())
    path.write_bytes(buf.getvalue())


def main() -> int:
    import cell_eval
    import pdex
    from cell_eval import MetricsEvaluator
    from pdex import parallel_differential_expression

    print(f"cell-eval {cell_eval.__version__ if hasattr(cell_eval, '__version__') else '?'}, pdex", file=sys.stderr)
    OUT.mkdir(parents=True, exist_ok=True)
    warnings.simplefilter("ignore")
    for name, (seed, n_ctrl, sizes, n_genes, dtype) in CASES.items():
        X_real, X_pred, labels, genes = make_case(seed, n_ctrl, sizes, n_genes, dtype)
        np.savez_compressed(
            OUT / f"{name}_inputs.npz", X_real=X_real, X_pred=X_pred,
            labels=labels.astype(str), genes=genes.astype(str), control=np.asarray(CONTROL),
        )
        for side, X in (("real", X_real), ("pred", X_pred)):
            # exactly cell-eval 0.6.6 _build_pdex_kwargs (+ as_polars=True)
            frame = parallel_differential_expression(
                adata=_adata(X, labels, genes), reference=CONTROL, groupby_key="target_gene",
                num_workers=1, batch_size=100, metric="wilcoxon", is_log1p=True, as_polars=True,
            )
            _write_gz(OUT / f"{name}_de_{side}.csv.gz", frame.write_csv(float_precision=None))
        with tempfile.TemporaryDirectory() as tmp:
            ev = MetricsEvaluator(
                adata_pred=_adata(X_pred, labels, genes), adata_real=_adata(X_real, labels, genes),
                control_pert=CONTROL, pert_col="target_gene", num_threads=1, outdir=tmp,
            )
            results, agg = ev.compute(profile="vcc", write_csv=False)
        _write_gz(OUT / f"{name}_results.csv.gz", results.write_csv())
        _write_gz(OUT / f"{name}_agg_results.csv.gz", agg.write_csv())
        print(f"{name}: {len(labels)} cells x {len(genes)} genes written", file=sys.stderr)
    _ = pdex
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
