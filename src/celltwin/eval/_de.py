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
from celltwin.eval import _de_cache, _kernels

__all__ = ["DE_COLUMNS", "LEGACY_DE_COLUMNS", "DEMode", "de_table"]

DEMode = Literal["v2", "legacy"]

#: Columns of a ``mode="v2"`` table, in order (pdex 0.3.0 ``mode="ref"`` output).
DE_COLUMNS = (
    "target",
    "feature",
    "target_mean",
    "ref_mean",
    "target_membership",
    "ref_membership",
    "log2_fold_change",
    "percent_change",
    "p_value",
    "statistic",
    "fdr",
)

#: Columns of a ``mode="legacy"`` table, in order (pdex 0.1.27 output).
LEGACY_DE_COLUMNS = (
    "target",
    "reference",
    "feature",
    "target_mean",
    "reference_mean",
    "percent_change",
    "fold_change",
    "p_value",
    "statistic",
    "fdr",
)

_BLOCK_BYTES = 64 << 20  # target size of one gene block's gathered values


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
    (see :func:`celltwin.eval._kernels.mwu_block`), which is O(nnz) per perturbation.
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
            frame = _de_v2(X, codes, ctrl_code, test_codes, target_names, genes_arr)
        else:
            frame = _de_legacy(X, codes, ctrl_code, test_codes, target_names, control, genes_arr)
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


def _name_column(names: Sequence[object], idx: np.ndarray) -> pd.Categorical | np.ndarray:
    """``names[idx]`` as a pandas Categorical (categories in ``names`` order), or as an object
    array when ``names`` repeat. A table holds each perturbation and gene name a few hundred
    thousand times; a Categorical stores them once plus integer codes, which is what makes
    building, caching and writing a 904,000-row table cheap. Values compare, print and
    export (CSV, parquet) exactly as the strings do."""
    arr = np.asarray([str(v) for v in names], dtype=object)
    if pd.Index(arr).is_unique:
        return pd.Categorical.from_codes(idx.astype(np.int32, copy=False), categories=pd.Index(arr, dtype=object))
    return arr[idx]


def _row_layout(codes: np.ndarray, use: list[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of the groups in ``use`` ordered by position in ``use`` then by row.

    Returns ``row_order`` (int64), ``row_group`` (local group per row), ``group_ptr``
    and ``group_sizes`` (int64, one per local group).
    """
    local = np.full(int(codes.max(initial=-1)) + 2, -1, dtype=np.int64)
    local[np.asarray(use, dtype=np.int64)] = np.arange(len(use))
    lc = local[codes]  # codes == -1 -> local[-1] == -1 (the sentinel slot)
    rows = np.flatnonzero(lc >= 0)
    order = np.argsort(lc[rows], kind="stable")
    row_order = rows[order].astype(np.int64)
    row_group = lc[row_order]
    sizes = np.bincount(row_group, minlength=len(use)).astype(np.int64)
    group_ptr = np.zeros(len(use) + 1, dtype=np.int64)
    np.cumsum(sizes, out=group_ptr[1:])
    return row_order, row_group, group_ptr, sizes


def _block_size(X: np.ndarray | sp.csr_matrix, n_rows_used: int) -> int:
    n_genes = X.shape[1]
    if sp.issparse(X):
        per_gene = max(1.0, X.nnz / max(1, n_genes) * (n_rows_used / max(1, X.shape[0])))
    else:
        per_gene = float(max(1, n_rows_used))
    b = int(_BLOCK_BYTES / (per_gene * X.dtype.itemsize))
    return max(8, min(n_genes, b, 4096))


def iter_blocks(X: np.ndarray | sp.csr_matrix, row_order: np.ndarray, row_group: np.ndarray,
                group_ptr: np.ndarray):
    """Yield ``(g0, g1, seg_ptr, vals)`` gene blocks (see :mod:`celltwin.eval._kernels`)."""
    n_genes = X.shape[1]
    n_groups = group_ptr.shape[0] - 1
    bs = _block_size(X, row_order.shape[0])
    import numba

    n_chunks = max(1, min(numba.get_num_threads(), row_order.shape[0]))
    if sp.issparse(X):
        indptr = X.indptr.astype(np.int64, copy=False)
        cursor = indptr[row_order].copy()
        for g0 in range(0, n_genes, bs):
            g1 = min(n_genes, g0 + bs)
            seg_ptr, vals = _kernels.csr_block(
                indptr, X.indices, X.data, row_order, row_group, cursor, g0, g1, n_groups, n_chunks
            )
            yield g0, g1, seg_ptr, vals
    else:
        for g0 in range(0, n_genes, bs):
            g1 = min(n_genes, g0 + bs)
            seg_ptr, vals = _kernels.dense_block(X, row_order, row_group, g0, g1, n_groups, n_chunks)
            yield g0, g1, seg_ptr, vals


# --------------------------------------------------------------------------------------------
# v2 (pdex 0.3.0)
# --------------------------------------------------------------------------------------------


def _de_v2(
    X: np.ndarray | sp.csr_matrix,
    codes: np.ndarray,
    ctrl_code: int,
    test_codes: list[int],
    target_names: list[str],
    genes: np.ndarray,
) -> pd.DataFrame:
    return de_v2_frame(de_v2_arrays(X, codes, ctrl_code, test_codes), target_names, genes)


def de_v2_arrays(
    X: np.ndarray | sp.csr_matrix, codes: np.ndarray, ctrl_code: int, test_codes: list[int]
) -> dict[str, np.ndarray]:
    """The v2 statistics of ``test_codes`` against ``ctrl_code`` as ``(K, G)`` / ``(G,)`` arrays.

    Every value of a test row depends only on that group's cells and the control cells, so the
    arrays of several calls over disjoint sets of tests (each with the same control cells)
    concatenate to the arrays of one call over all of them (the streamed evaluator relies on it).
    """
    n_genes = X.shape[1]
    use = [*test_codes, ctrl_code]  # local group ids: tests 0..K-1, control K
    k = len(test_codes)
    row_order, row_group, group_ptr, sizes = _row_layout(codes, use)
    dtype = X.dtype
    inv_sizes = np.asarray([dtype.type(1.0 / n) for n in sizes], dtype=dtype)
    pre = np.zeros((k + 1, n_genes), dtype=dtype)
    stat = np.empty((k, n_genes), dtype=np.float64)
    pval = np.empty((k, n_genes), dtype=np.float64)
    tests = np.arange(k, dtype=np.int64)
    scaled = bool(sp.issparse(X))
    for g0, _g1, seg_ptr, vals in iter_blocks(X, row_order, row_group, group_ptr):
        _kernels.means_block(seg_ptr, vals, sizes, inv_sizes, k + 1, scaled, pre, g0)
        if k:
            _kernels.mwu_block(seg_ptr, vals, sizes, k, tests, k + 1, stat, pval, g0)
    means = _kernels.expm1_rows(pre)
    target_mean = means[:k]
    ref_mean = means[k]
    lfc, pc = _kernels.lfc_pc_rows(target_mean, ref_mean, 0.0)
    fdr = _kernels.bh_rows(pval) if k else np.empty((0, n_genes))
    return {
        "target_mean": target_mean,
        "ref_mean": ref_mean,
        "sizes": sizes,
        "log2_fold_change": lfc,
        "percent_change": pc,
        "p_value": pval,
        "statistic": stat,
        "fdr": fdr,
    }


def concat_v2_arrays(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Join :func:`de_v2_arrays` results of disjoint test sets (same controls) in the given order."""
    if len(parts) == 1:
        return parts[0]
    out = {name: np.concatenate([p[name] for p in parts]) for name in parts[0] if name not in ("ref_mean", "sizes")}
    out["ref_mean"] = parts[0]["ref_mean"]
    out["sizes"] = np.concatenate([p["sizes"][:-1] for p in parts] + [parts[0]["sizes"][-1:]])
    return out


def de_v2_frame(arrays: dict[str, np.ndarray], target_names: list[str], genes: np.ndarray) -> pd.DataFrame:
    """The pdex-shaped table (:data:`DE_COLUMNS`) of :func:`de_v2_arrays` output."""
    n_genes = genes.shape[0]
    k = len(target_names)
    sizes = arrays["sizes"]
    n = k * n_genes
    return pd.DataFrame(
        {
            "target": _name_column(target_names, np.repeat(np.arange(k), n_genes)),
            "feature": _name_column(genes, np.tile(np.arange(n_genes), k)),
            "target_mean": arrays["target_mean"].reshape(n),
            "ref_mean": np.tile(arrays["ref_mean"], k),
            "target_membership": np.repeat(sizes[:k], n_genes).astype(np.int64),
            "ref_membership": np.full(n, sizes[k], dtype=np.int64),
            "log2_fold_change": arrays["log2_fold_change"].reshape(n),
            "percent_change": arrays["percent_change"].reshape(n),
            "p_value": arrays["p_value"].reshape(n),
            "statistic": arrays["statistic"].reshape(n),
            "fdr": arrays["fdr"].reshape(n),
        },
        columns=list(DE_COLUMNS),
        copy=False,  # fresh arrays: no 2-D consolidation copy of ~7 x 904k floats
    )


# --------------------------------------------------------------------------------------------
# legacy (pdex 0.1.27, the 2025 leaderboard)
# --------------------------------------------------------------------------------------------


def _legacy_exact_pvalue(X, rows_t: np.ndarray, rows_c: np.ndarray, gene: int) -> tuple[float, float]:
    """scipy's own ``mannwhitneyu`` for the rare pairs its ``method="auto"`` makes exact."""
    from scipy import stats

    if sp.issparse(X):
        x = X[rows_t, gene].toarray().ravel()
        y = X[rows_c, gene].toarray().ravel()
    else:
        x = X[rows_t, gene]
        y = X[rows_c, gene]
    res = stats.mannwhitneyu(x, y, use_continuity=True)
    return res.statistic, res.pvalue


def _de_legacy(
    X: np.ndarray | sp.csr_matrix,
    codes: np.ndarray,
    ctrl_code: int,
    test_codes: list[int],
    target_names: list[str],
    control: str,
    genes: np.ndarray,
) -> pd.DataFrame:
    from scipy import special, stats

    n_genes = X.shape[1]
    dtype = X.dtype
    use = [*test_codes, ctrl_code]
    k = len(test_codes)
    row_order, _row_group, group_ptr, sizes = _row_layout(codes, use)
    n1s = [int(n) for n in sizes[:k]]
    n2 = int(sizes[k])
    ta = np.arange(max(n1s, default=0) + n2 + 1, dtype=dtype)
    tie_table = ta**3 - ta  # what scipy evaluates for its float tie counts, in X's dtype

    sums = np.zeros((k + 1, n_genes), dtype=dtype)
    r1 = np.zeros((k, n_genes), dtype=dtype)
    tie = np.zeros((k, n_genes), dtype=dtype)
    has_ties = np.zeros((k, n_genes), dtype=np.bool_)
    bs = max(8, min(n_genes, _BLOCK_BYTES // max(1, row_order.size * dtype.itemsize)))
    if sp.issparse(X):
        indptr = X.indptr.astype(np.int64, copy=False)
        cursor = indptr[row_order].copy()
    for g0 in range(0, n_genes, bs):
        g1 = min(n_genes, g0 + bs)
        if sp.issparse(X):
            D = _kernels.csr_dense_block(indptr, X.indices, X.data, row_order, cursor, g0, g1)
        else:
            D = np.ascontiguousarray(X[row_order, g0:g1])
        _kernels.legacy_block(D, group_ptr, k, k, tie_table, sums, r1, tie, has_ties, g0)

    # np.mean of a float32/64 column: pairwise sum, then dtype(float64(sum) / n)
    pre = (sums.astype(np.float64) / sizes[:, None]).astype(dtype)
    means = np.expm1(pre)
    tm, rm = means[:k], means[k]
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = tm / rm
        pc = ((tm - rm) / rm).astype(np.float64)
    fc = ratio.astype(np.float64)
    fc[np.broadcast_to(rm == 0, fc.shape)] = 20.0
    fc[tm == 0] = 1 / 20.0
    fc[(tm == 0) & (rm == 0)[None, :]] = 1.0
    pc[np.broadcast_to(rm == 0, pc.shape)] = np.nan

    stat = np.empty((k, n_genes), dtype=dtype)
    pval = np.empty((k, n_genes), dtype=dtype)
    for i, n1 in enumerate(n1s):
        # scipy.stats.mannwhitneyu's asymptotic branch, operation by operation, in X's dtype
        u1 = r1[i] - n1 * (n1 + 1) / 2
        u2 = n1 * n2 - u1
        u = np.maximum(u1, u2)
        mu = n1 * n2 / 2
        n = n1 + n2
        with np.errstate(divide="ignore", invalid="ignore"):
            s = np.sqrt(n1 * n2 / 12 * ((n + 1) - tie[i] / (n * (n - 1))))
            numerator = u - mu
            numerator -= 0.5
            z = numerator / s
        p = special.ndtr(-z)
        p *= 2
        p = np.clip(p, 0.0, 1.0)
        stat[i] = u1
        pval[i] = p
        if not (n1 > 8 and n2 > 8):  # scipy's method="auto": exact when small and tie-free
            rows_t = row_order[group_ptr[i] : group_ptr[i + 1]]
            rows_c = row_order[group_ptr[k] : group_ptr[k + 1]]
            for g in np.flatnonzero(~has_ties[i]):
                stat[i, g], pval[i, g] = _legacy_exact_pvalue(X, rows_t, rows_c, int(g))
    pval[np.isnan(pval)] = 1.0
    flat_p = pval.reshape(-1)
    fdr = stats.false_discovery_control(flat_p, method="bh") if flat_p.size else flat_p.copy()

    n_rows = k * n_genes
    return pd.DataFrame(
        {
            "target": _name_column(target_names, np.repeat(np.arange(k), n_genes)),
            "reference": _name_column([control], np.zeros(n_rows, dtype=np.int64)),
            "feature": _name_column(genes, np.tile(np.arange(n_genes), k)),
            "target_mean": tm.reshape(n_rows),
            "reference_mean": np.tile(rm, k),
            "percent_change": pc.reshape(n_rows),
            "fold_change": fc.reshape(n_rows),
            "p_value": flat_p,
            "statistic": stat.reshape(n_rows),
            "fdr": np.asarray(fdr).reshape(n_rows),
        },
        columns=list(LEGACY_DE_COLUMNS),
        copy=False,
    )
