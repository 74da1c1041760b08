"""Subprocess worker for tests/eval/test_numba_cache.py (not a test module).

``python _numba_cache_worker.py OUT.npz`` computes small v2 DE tables (dense float64, dense
float32, CSR float32: three signatures of each block kernel) with whatever numba cache
``NUMBA_CACHE_DIR`` names, and saves the numeric columns to ``OUT.npz``.
"""

from __future__ import annotations

import sys

import numpy as np
import scipy.sparse as sp


def inputs() -> tuple[np.ndarray, np.ndarray, list[str]]:
    rng = np.random.default_rng(7)
    n_ctrl, n_per, n_pert, n_genes = 300, 60, 4, 40
    labels = np.array(["ctrl"] * n_ctrl + [f"p{i}" for i in range(n_pert) for _ in range(n_per)])
    rate = rng.gamma(0.8, 1.5, size=n_genes)
    effect = np.ones((labels.size, n_genes))
    for i in range(n_pert):
        rows = labels == f"p{i}"
        effect[np.ix_(rows, rng.choice(n_genes, 5, replace=False))] = 3.0
    X = np.log1p(rng.poisson(rate * effect)).astype(np.float64)
    return X, labels, [f"g{i}" for i in range(n_genes)]


def compute() -> dict[str, np.ndarray]:
    from celltwin.eval._de import de_table

    X, labels, genes = inputs()
    cases = {
        "dense64": X,
        "dense32": X.astype(np.float32),
        "csr32": sp.csr_matrix(X.astype(np.float32)),
    }
    out: dict[str, np.ndarray] = {}
    for name, M in cases.items():
        df = de_table(M, labels, "ctrl", genes)
        for col in ("target_mean", "ref_mean", "p_value", "statistic", "fdr", "log2_fold_change"):
            out[f"{name}.{col}"] = df[col].to_numpy()
    return out





if __name__ == "__main__":
    np.savez(sys.argv[1], **compute())
