"""Loading, validation and normalisation of the two evaluation files.

This module states, as whole-matrix functions, the rules by which the evaluator reads its inputs;
:mod:`celltwin.eval._sides` applies the same rules to files streamed row block by row block
(tests check the two bit for bit). Every rule below mirrors what cell-eval 0.8.2 does to its
inputs before computing metrics, so the metrics see bit-identical values.

Scale detection (per file, independently; cell-eval ``guess_is_lognorm``)
    A file is *counts* when no stored value has a fractional part ``> 1e-3`` (``np.modf``), looking
    at the stored entries of a sparse matrix and at every entry of a dense one. Otherwise it is
    taken as already log-normalised and must lie in ``[0, 15)``; a fractional file with a value
    ``>= 15`` is a mix of counts and log values and is rejected.

Normalisation of a counts file (scanpy ``normalize_total`` + ``log1p`` with default arguments)
    * integer dtypes are cast to float32 first; float32/float64 files keep their dtype;
    * per-cell totals: CSR rows are summed in float64 and stored in the file's dtype; dense rows are
      summed with ``np.sum(axis=1)`` in the file's dtype;
    * target sum: for CSR the median of *all* cell totals (``np.median``), for dense the median of
      the *non-zero* totals (the two code paths of scanpy differ; we keep the difference);
    * each cell is divided by ``total / target`` (a zero factor is replaced by 1, so empty cells
      stay zero), then ``log1p`` is applied in place, in the file's dtype.

Checks that cell-eval does not do (each a one-line :class:`~celltwin.errors.InputError`)
    NaN/inf, any negative value (integer ones too), float16 (too coarse for the metrics: convert
    to float32 explicitly), duplicated gene names, a missing perturbation column, a missing or
    empty label, a missing control label. Explicitly stored zeros in a sparse matrix are fine.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError

__all__ = [
    "FRACTION_EPS",
    "LOG_MAX",
    "ValueScan",
    "cell_eval_normlog",
    "csr_factors",
    "is_counts",
    "normalize_log1p",
    "read_h5ad",
    "row_totals",
]

FRACTION_EPS = 1e-3  # a value whose fractional part exceeds this marks a log-normalised file
LOG_MAX = 15.0  # log-normalised values must be < LOG_MAX (cell-eval's validation threshold)


def read_h5ad(path: str | os.PathLike[str]):
    """Read an ``.h5ad`` file fully into memory, turning any read failure into an :class:`InputError`.

    celltwin's one in-memory ``.h5ad`` reader (``celltwin eval``'s rules, ``prep``); lazy row reads
    (``baseline`` / ``score --train`` stream the training cells) go through
    :class:`celltwin.data.source.H5adSource`.
    """
    import anndata as ad

    p = Path(path)
    if not p.is_file():
        msg = f"{p}: file not found (expected an .h5ad file)"
        raise InputError(msg)
    try:
        return ad.read_h5ad(p)
    except Exception as e:  # noqa: BLE001 - h5py/anndata raise many types for truncated or foreign files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = (
            f"{p}: not a readable .h5ad file (expected an AnnData HDF5 file; got {type(e).__name__}: {first})"
        )
        raise InputError(msg) from None


class ValueScan:
    """The input rule, applied to the stored values of a matrix one block at a time.

    ``ValueScan(dtype, name)`` refuses a float16 or non-numeric dtype at once; ``update(values)``
    takes each block's stored values (any shape; sparse matrices: ``X.data`` only); ``finish()``
    raises the first failed check (non-finite values, then negative values, then a mix of counts
    and log values) as a one-line :class:`InputError` naming ``name``, and returns whether the
    matrix holds counts (no stored value with a fractional part ``> 1e-3``, compared in the
    matrix's dtype; integer dtypes always count as counts). ``finish(check_log_max=False)`` skips
    the mix check (``celltwin prep --allow-discrete``: fractional values of any size are taken as
    log values). The whole-matrix :func:`is_counts` and
    the streamed readers (:mod:`celltwin.eval._sides`, ``celltwin prep``, ``celltwin baseline``)
    all go through this class, so the rule exists once.
    """

    def __init__(self, dtype: np.dtype, name: str) -> None:
        dtype = np.dtype(dtype)
        if dtype == np.float16:
            msg = f"{name}: X dtype is float16 (expected float32, float64 or an integer dtype; convert with X.astype('float32'))"
            raise InputError(msg)
        if dtype.kind not in "fiu":
            msg = f"{name}: X dtype is {dtype} (expected a numeric dtype)"
            raise InputError(msg)
        self.dtype, self.name = dtype, name
        self.n_bad, self.first_bad, self.vmin, self.vmax, self.fraction = 0, None, None, -np.inf, False

    def update(self, values: np.ndarray) -> None:
        from celltwin.eval._rowops import has_fraction, scan_finite

        flat = np.ascontiguousarray(values).reshape(-1)
        if flat.size == 0:
            return
        if self.dtype.kind == "f":
            bad, first, vlo = scan_finite(flat)  # one pass, no nnz-sized temporaries
            if bad and self.first_bad is None:
                self.first_bad = flat[first]
            self.n_bad += int(bad)
            vlo = self.dtype.type(vlo)
            if not self.fraction and not bad:
                # np.modf(v)[0] > 1e-3 in the array's dtype, stopping at the first fractional value
                self.fraction = bool(has_fraction(flat, self.dtype.type(FRACTION_EPS)))
        else:
            vlo = flat.min()
        self.vmin = vlo if self.vmin is None or vlo < self.vmin else self.vmin
        self.vmax = max(self.vmax, float(flat.max()))

    def finish(self, check_log_max: bool = True) -> bool:
        name = self.name
        if self.n_bad:
            msg = f"{name}: X contains {self.n_bad} non-finite value(s) (expected finite values; found {self.first_bad})"
            raise InputError(msg)
        if self.vmin is not None and self.vmin < 0:
            msg = f"{name}: X contains negative values (expected counts or log1p values >= 0; min is {self.vmin})"
            raise InputError(msg)
        if self.dtype.kind in "iu" or not self.fraction:
            return True
        if check_log_max and self.vmax >= LOG_MAX:
            msg = (
                f"{name}: X mixes counts and log values (fractional values present, so expected log1p values "
                f"< {LOG_MAX:g}; max is {self.vmax:g})"
            )
            raise InputError(msg)
        return False


def _stored_values(X: Any) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X)


def is_counts(X: Any, name: str = "X", *, check_log_max: bool = True) -> bool:
    """Whether ``X`` holds counts by the input rule of :class:`ValueScan` (its checks included).

    ``check_log_max=False`` skips the "log values below 15" check (``--allow-discrete``). A missing
    X (``None``) is an :class:`InputError` naming ``name``.
    """
    if X is None:
        msg = f"{name}: X is missing (None); expected a cells x genes matrix"
        raise InputError(msg)
    vals = _stored_values(X)
    scan = ValueScan(vals.dtype, name)
    scan.update(vals)
    return scan.finish(check_log_max=check_log_max)


def row_totals(data: np.ndarray, indptr: np.ndarray) -> np.ndarray:
    """Per-row sums of CSR ``data`` accumulated in float64 (scanpy's per-cell totals; exact for counts)."""
    nonempty = np.diff(indptr) > 0
    out = np.zeros(indptr.size - 1, dtype=np.float64)
    if data.size:
        out[nonempty] = np.add.reduceat(data, indptr[:-1][nonempty], dtype=np.float64)
    return out


def csr_factors(totals: np.ndarray) -> np.ndarray:
    """Per-cell divisors ``total / median(totals)`` of scanpy's CSR rule (the median over *all*
    cells, zero-count cells included; a zero factor becomes 1, so empty cells stay zero)."""
    factor = totals / np.median(totals)
    return factor + (factor == 0)


def _divide_rows(indptr: np.ndarray, data: np.ndarray, factor: np.ndarray) -> None:
    """``data[row] /= factor[row]`` for every stored entry, in place, without an ``nnz``-sized temporary."""
    from celltwin.eval._rowops import divide_rows

    divide_rows(indptr, data, factor.astype(data.dtype, copy=False))


def normalize_log1p(X: Any) -> Any:
    """``log1p(normalize_total(X))`` with scanpy's defaults, in place where possible (see module docstring).

    Returns the normalised matrix (a new array only when an integer matrix had to become float32).
    """
    if sp.issparse(X):
        X = X.tocsr() if X.format != "csr" else X
        if X.dtype.kind in "iu":
            X = X.astype(np.float32)
        data = X.data
        # Row totals accumulated in float64, stored in the file's dtype (scanpy's numba loop).
        factor = csr_factors(row_totals(data, X.indptr).astype(data.dtype))
        _divide_rows(X.indptr, data, factor)
        np.log1p(data, out=data)
        return X
    X = np.asarray(X)
    if X.dtype.kind in "iu":
        X = X.astype(np.float32)
    elif not X.flags.c_contiguous or not X.flags.writeable:
        X = np.ascontiguousarray(X).copy()
    totals = np.sum(X, axis=1)
    target = np.median(totals[totals > 0])  # dense rule: median over non-zero totals only
    factor = totals / target
    factor = factor + (factor == 0)
    np.true_divide(X, factor[:, None], out=X)
    np.log1p(X, out=X)
    return X


def cell_eval_normlog(adata, *, allow_discrete: bool = False, source: str | None = None) -> bool:
    """Log-normalise ``adata.X`` in place when it holds counts; return whether it did.

    cell-eval's ``_convert_to_normlog`` (``prep``, ``baseline``) by the input rule of
    :func:`is_counts` (``source`` names the data in its errors): counts become
    :func:`normalize_log1p` of X and ``uns["log1p"] = {"base": None}`` is set, as scanpy does.
    Log-normalised data is left alone; with ``allow_discrete`` counts are left alone too and the
    "log values below 15" check is skipped.
    """
    if not is_counts(adata.X, source or "input", check_log_max=not allow_discrete) or allow_discrete:
        return False
    adata.X = normalize_log1p(adata.X)
    adata.uns["log1p"] = {"base": None}
    return True


def _labels(adata, pert_col: str, name: str) -> np.ndarray:
    if pert_col not in adata.obs.columns:
        cols = ", ".join(map(str, adata.obs.columns[:10]))
        msg = f"{name}: obs column {pert_col!r} not found (expected the perturbation column; obs has: {cols or 'no columns'})"
        raise InputError(msg)
    col = adata.obs[pert_col]
    missing = col.isna().to_numpy()
    labels = col.to_numpy(dtype=str)
    empty = missing | (np.char.str_len(labels.astype(str)) == 0)
    if empty.any():
        msg = (
            f"{name}: obs[{pert_col!r}] has {int(empty.sum())} cell(s) with an empty or missing label "
            f"(expected a perturbation name for every cell; first at row {int(np.flatnonzero(empty)[0])})"
        )
        raise InputError(msg)
    return labels
