"""Differential expression tables exactly as the VCC evaluator builds them.

:func:`de_table` is the array-level engine behind ``celltwin eval``: for every perturbation it
tests each gene against the control cells with a Wilcoxon rank-sum (Mann-Whitney U) test and
reports pseudobulk means, fold changes and Benjamini-Hochberg FDRs. ``mode="v2"`` reproduces
cell-eval 0.8.2 -> pdex 0.3.0 (``pdex(adata, mode="ref", is_log1p=True, epsilon=0.0,
geometric_mean=True)``); ``mode="legacy"`` reproduces the 2025 leaderboard scorer
(cell-eval 0.6.6 -> pdex 0.1.27 ``parallel_differential_expression``).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval import _de_cache
from celltwin.eval._de_legacy import LEGACY_DE_COLUMNS, de_legacy
from celltwin.eval._de_v2 import DE_COLUMNS, concat_v2_arrays, de_v2_arrays, de_v2_frame

__all__ = [
    "DE_COLUMNS",
    "LEGACY_DE_COLUMNS",
    "DEMode",
    "concat_v2_arrays",
    "de_table",
    "de_v2_arrays",
    "de_v2_frame",
]

DEMode = Literal["v2", "legacy"]


def de_table(
    X: np.ndarray | sp.spmatrix | sp.sparray,
    labels: Sequence[object] | np.ndarray | pd.Series | pd.Categorical,
    control: str,
    genes: Sequence[str] | np.ndarray | pd.Index,
    *,
    mode: DEMode = "v2",
    targets: Sequence[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    n_threads: int | None = None,
) -> pd.DataFrame:
    """Per-perturbation differential expression against the control cells.

    Parameters
    ----------
    X
        ``(n_cells, n_genes)`` expression in log1p space, exactly what cell-eval hands pdex
        after its own normalisation: a dense ``numpy.ndarray`` (C-contiguous for exact means)
        or a scipy sparse matrix/array (CSR used as is; other formats converted to CSR),
        float32 or float64 (float16 is widened to float32, as cell-eval does). NaN or
        infinite values raise :class:`~celltwin.errors.InputError`. The matrix is never
        densified: genes are processed in column blocks gathered straight from the rows.
    labels
        Per-cell perturbation label (``obs[PERT_COL]``). Cells labelled ``""`` or NaN are
        ignored, as in pdex.
    control
        Label of the control cells (the reference group). Must label at least one cell.
    genes
        ``n_genes`` gene names (``var_names``), used for the ``feature`` column.
    mode
        ``"v2"`` (default): cell-eval 0.8.2 / pdex 0.3.0. ``"legacy"``: cell-eval 0.6.6 /
        pdex 0.1.27 (the 2025 VCC leaderboard). See the two sections below.
    targets
        Perturbations to test, in output order. Default: every non-control label with at
        least one cell, ordered as pdex orders them (v2: the categories of
        ``pandas.Categorical(labels)``, i.e. sorted unique labels, or the existing category
        order when ``labels`` is categorical - but pandas re-sorts the categories when a
        ``""`` category is removed, and pdex inherits that; legacy: order of first
        appearance). Categories without cells are skipped (pdex 0.3.0 fails on them).
        Unknown names, or the control itself, raise ``InputError``.
    cache_dir
        If given, the finished table is stored there as ``<hash>.npz`` and re-used when a
        later call sees byte-identical inputs (see :mod:`celltwin.eval._de_cache`; the key
        covers X's content, labels, control, genes, mode, targets and a format version).
    n_threads
        Numba threads for this call (restored afterwards). Default: numba's current setting.

    Returns
    -------
    pandas.DataFrame
        One row per (target, gene): targets in the order above, genes in the input order.

        ``mode="v2"`` columns (:data:`DE_COLUMNS`), the same names, order and dtypes as
        ``pdex(...).to_pandas()`` except that ``target`` and ``feature`` are pandas
        Categoricals of the names (object str only when the gene names repeat; the values
        are the same strings), ``target_mean``,
        ``ref_mean`` (the input dtype: float32 for float32 X), ``target_membership``,
        ``ref_membership`` (int64 cell counts), ``log2_fold_change``, ``percent_change``,
        ``p_value``, ``statistic``, ``fdr`` (float64). (cell-eval itself then keeps only
        target/feature/log2_fold_change/p_value/fdr and casts the numbers to float32.)

        ``mode="legacy"`` columns (:data:`LEGACY_DE_COLUMNS`): see below.

    Statistics, ``mode="v2"`` (pdex 0.3.0 ``mode="ref"`` as called by cell-eval 0.8.2)
    -----------------------------------------------------------------------------------
    * **Test.** Two-sided Mann-Whitney U of the target's cells (sample 1, size ``n1``)
      against the control cells (``n2``), asymptotic normal approximation with tie and
      continuity correction: pooled average ranks (ties share the mean of their ranks; all
      zeros form one tie group), ``U1 = R1 - n1 (n1 + 1) / 2`` (reported as ``statistic``),
      ``U = max(U1, n1 n2 - U1)``, ``sigma**2 = n1 n2 / 12 * ((n + 1) - T / (n (n - 1)))``
      with ``T = sum(t**3 - t)`` over pooled tie groups, ``z = (U - n1 n2 / 2 - 0.5) / sigma``,
      ``p = 2 * Phi(-z)`` clipped to [0, 1]. When ``sigma**2 <= 0`` (every pooled value
      equal, e.g. a gene that is zero everywhere) ``p = 1``. Explicitly stored zeros count as
      zeros (pdex 0.3.0 refuses them; the result equals pdex on ``X.eliminate_zeros()``).
      Negative values are ranked like any other value (pdex 0.3.0 refuses them in CSR).
    * **Means.** ``target_mean`` / ``ref_mean`` are the geometric-mean pseudobulks back in
      count space: ``expm1(mean(X))`` over the group's cells, with ``mean`` accumulated in
      the input dtype in cell order (dense: sum then divide, as ``numpy.mean(axis=0)``;
      sparse: each value scaled by ``dtype(1/n)`` then summed, as scipy's sparse ``mean``)
      and ``expm1`` evaluated by numba in that dtype - identical bits to pdex.
    * **Fold changes** (float64, epsilon 0 as cell-eval pins it):
      ``log2_fold_change = log2(target_mean / ref_mean)``, ``percent_change =
      (target_mean - ref_mean) / ref_mean``; ``0 / 0`` gives 0 (no change), ``x / 0`` keeps
      ``+inf`` and ``log2(0 / x)`` keeps ``-inf``.
    * **FDR.** Benjamini-Hochberg per perturbation over all its genes
      (``scipy.stats.false_discovery_control``): ``q_(k) = min_{j >= k} p_(j) m / j``,
      clipped to 1.
    * **Precision.** U and the rank/tie sums are exact in float64 (sums of halves and
      integers far below 2**53), and p, FDR, means and fold changes repeat pdex's floating
      point operation sequence, so the table equals pdex's bit for bit (the tests require
      1e-12 relative and observe exact equality).

    Statistics, ``mode="legacy"`` (pdex 0.1.27 as called by cell-eval 0.6.6)
    -----------------------------------------------------------------------
    * Targets in order of first appearance in ``labels`` (control skipped; NaN labels
      ignored, ``""`` is an ordinary label here).
    * The test is ``scipy.stats.mannwhitneyu(x, y, use_continuity=True)`` on the gene's
      dense target/control columns: the same asymptotic tie- and continuity-corrected U test
      as v2, except that scipy's ``method="auto"`` uses the *exact* null distribution when
      ``n1 <= 8`` or ``n2 <= 8`` and the pooled sample has no ties (those rare pairs are
      handed to scipy itself). ``statistic`` is U1.
    * **Precision.** scipy computes in X's dtype: for float32 X it casts the ranks and tie
      counts to float32, sums them with numpy's pairwise summation (which rounds once sums
      pass 2**24) and evaluates ``z`` in float32 before ``scipy.special.ndtr``. celltwin
      computes the exact ranks, then replays those float32 pairwise sums in their exact
      order (ranks of the target cells in cell order; ``t**3 - t`` at each pooled tie
      group's first sorted position), and the ``z`` arithmetic with numpy in the same dtype,
      so p-values and statistics equal pdex 0.1.27's bit for bit (float64 X: exact values).
    * Means ``expm1(mean(x))``: numpy's pairwise sum of the gene's column in X's dtype, then
      ``dtype(float64(sum) / n)`` and numpy's ``expm1``. ``fold_change = target_mean /
      reference_mean`` (X's dtype, stored as float64) with ``20`` when only the reference
      mean is 0, ``1/20`` when only the target mean is 0 and ``1`` when both are 0;
      ``percent_change = (t - r) / r`` (float64 column), NaN when ``r == 0``.
    * ``p_value`` NaN -> 1; ``fdr`` is ``scipy.stats.false_discovery_control`` (BH) over
      **all** (target, gene) rows of the table at once, in X's dtype.
    * Dtypes: ``target``, ``reference`` (the control label), ``feature`` object;
      ``target_mean``, ``reference_mean``, ``p_value``, ``statistic``, ``fdr`` in X's dtype;
      ``percent_change``, ``fold_change`` float64 (as the reference frame holds them).

    Algorithm and cost
    ------------------
    Cells are ordered by group once; genes are processed in blocks whose non-zero values
    are gathered per (gene, group) straight from the CSR rows (a cursor per row, so every
    stored value is read once per call) or from the dense array. Per gene the control
    values are sorted once and reused for every perturbation: v2 locates each perturbed
    value in the sorted controls through a bucket index and never sorts the perturbation
    (see :func:`celltwin.eval._mwu.mwu_block`), which is O(nnz) per perturbation.
    Extra memory is one block of gathered values (about 64 MiB) plus the output table.
    Numba kernels are compiled with ``cache=True`` (first use in a fresh environment
    compiles for a few seconds) and run in parallel over genes.
    """
    if mode not in ("v2", "legacy"):
        msg = f"de_table: mode must be 'v2' or 'legacy', got {mode!r}"
        raise InputError(msg)
    X = _validate_matrix(X)
    n_cells, n_genes = X.shape
    genes_arr = np.asarray(genes, dtype=object)
    if genes_arr.ndim != 1 or genes_arr.shape[0] != n_genes:
        msg = f"de_table: genes must list {n_genes} names (X has {n_genes} columns), got {genes_arr.shape}"
        raise InputError(msg)
    if len(labels) != n_cells:
        msg = f"de_table: labels must have one entry per cell ({n_cells}), got {len(labels)}"
        raise InputError(msg)

    key = None
    if cache_dir is not None:
        key = _de_cache.content_key(X, _label_strings(labels), control, genes_arr, mode, targets)
        cached = _de_cache.load(cache_dir, key)
        if cached is not None:
            return cached

    group_names, codes = _groups(labels, mode)
    if control not in group_names:
        present = ", ".join(map(str, group_names[:10]))
        msg = f"de_table: control label {control!r} labels no cell (labels present: {present}...)"
        raise InputError(msg)
    ctrl_code = group_names.index(control)
    if targets is None:
        test_codes = [i for i, name in enumerate(group_names) if i != ctrl_code]
    else:
        index = {name: i for i, name in enumerate(group_names)}
        missing = [t for t in targets if t not in index]
        if missing:
            msg = f"de_table: targets not found in labels: {', '.join(map(str, missing[:10]))}"
            raise InputError(msg)
        if control in targets:
            msg = f"de_table: targets must not contain the control label {control!r}"
            raise InputError(msg)
        test_codes = [index[t] for t in targets]
    target_names = [group_names[c] for c in test_codes]

    prev_threads = None
    if n_threads is not None:
        import numba

        prev_threads = numba.get_num_threads()
        numba.set_num_threads(max(1, min(int(n_threads), numba.config.NUMBA_NUM_THREADS)))
    try:
        if mode == "v2":
            frame = de_v2_frame(de_v2_arrays(X, codes, ctrl_code, test_codes), target_names, genes_arr)
        else:
            frame = de_legacy(X, codes, ctrl_code, test_codes, target_names, control, genes_arr)
    finally:
        if prev_threads is not None:
            import numba

            numba.set_num_threads(prev_threads)

    if cache_dir is not None and key is not None:
        _de_cache.save(cache_dir, key, frame)
    return frame


# --------------------------------------------------------------------------------------------
# Input handling
# --------------------------------------------------------------------------------------------


def _validate_matrix(X: object) -> np.ndarray | sp.csr_matrix:
    if sp.issparse(X):
        if X.format != "csr":
            X = sp.csr_matrix(X)
        elif not isinstance(X, sp.csr_matrix):
            X = sp.csr_matrix(X, copy=False)
        data = X.data
    elif isinstance(X, np.ndarray):
        data = X
    else:
        msg = f"de_table: X must be a numpy.ndarray or scipy sparse matrix, got {type(X).__name__}"
        raise InputError(msg)
    if X.ndim != 2:
        msg = f"de_table: X must be 2-D (cells x genes), got shape {X.shape}"
        raise InputError(msg)
    if data.dtype == np.float16:
        X = X.astype(np.float32)
        data = X.data if sp.issparse(X) else X
    if data.dtype not in (np.float32, np.float64):
        msg = f"de_table: X must hold float32 or float64 log1p values, got dtype {data.dtype}"
        raise InputError(msg)
    if not np.isfinite(data).all():
        msg = "de_table: X contains NaN or infinite values (expected finite log1p expression)"
        raise InputError(msg)
    if sp.issparse(X):
        if not X.has_sorted_indices:
            X = X.copy()
            X.sort_indices()
    elif not X.flags.c_contiguous:
        X = np.ascontiguousarray(X)
    return X


def _label_strings(labels: object) -> list[object]:
    return list(pd.Series(labels, copy=False).astype(object))


def _groups(labels: object, mode: str) -> tuple[list[str], np.ndarray]:
    """Group names (pdex's order) and per-cell codes (-1 = ignored cell)."""
    if mode == "v2":
        cat = pd.Categorical(labels.array if isinstance(labels, pd.Series) else labels)
        bad = [c for c in cat.categories if c == "" or pd.isna(c)]
        if bad:
            cat = cat.remove_categories(bad)
        codes = np.asarray(cat.codes, dtype=np.int64)
        sizes = np.bincount(codes[codes >= 0], minlength=len(cat.categories))
        # pdex fails on empty categories; they cannot produce a test, so they are dropped.
        keep = np.flatnonzero(sizes > 0)
        remap = np.full(len(cat.categories) + 1, -1, dtype=np.int64)
        remap[keep] = np.arange(keep.size)
        codes = remap[codes]  # codes == -1 maps through remap[-1] == -1
        names = [str(cat.categories[i]) for i in keep]
        return names, codes
    values = pd.Series(labels, copy=False)
    fcodes, uniq = pd.factorize(values, use_na_sentinel=True)  # first-appearance order
    codes = np.asarray(fcodes, dtype=np.int64)
    names = [str(v) for v in uniq]
    return names, codes
