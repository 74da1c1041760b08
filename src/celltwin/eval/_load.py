"""Loading, validation and normalisation of the two evaluation files.

This module turns a ``.h5ad`` path (or an in-memory AnnData) into an :class:`EvalMatrix`: a CSR or
dense expression matrix in log1p space, the per-cell perturbation labels and the gene names.
Every rule below mirrors what cell-eval 0.8.2 does to its inputs before computing metrics, so the
metrics see bit-identical values.

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError

__all__ = [
    "EvalMatrix",
    "FRACTION_EPS",
    "LOG_MAX",
    "read_h5ad",
    "is_counts",
    "normalize_log1p",
    "prepare",
]

FRACTION_EPS = 1e-3  # a value whose fractional part exceeds this marks a log-normalised file
LOG_MAX = 15.0  # log-normalised values must be < LOG_MAX (cell-eval's validation threshold)


@dataclass
class EvalMatrix:
    """One side of an evaluation: log1p expression, labels and genes.

    ``X`` is ``(n_cells, n_genes)``, CSR (``scipy.sparse.csr_matrix``) or a C-contiguous ndarray, float32
    or float64. ``labels`` is a ``(n_cells,)`` array of ``str``. ``was_counts`` records whether the file
    held counts (and was normalised here).
    """

    X: Any
    labels: np.ndarray
    genes: np.ndarray
    name: str
    was_counts: bool


def read_h5ad(path: str | os.PathLike[str]):
    """Read an ``.h5ad`` file fully into memory, turning any read failure into an :class:`InputError`."""
    import anndata as ad

    p = Path(path)
    if not p.is_file():
        msg = f"{p}: file not found (expected an .h5ad file)"
        raise InputError(msg)
    try:
        return ad.read_h5ad(p)
    except Exception as e:  # h5py/anndata raise many types for truncated or foreign files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        msg = (
            f"{p}: not a readable .h5ad file (expected an AnnData HDF5 file; got {type(e).__name__}: {first})"
        )
        raise InputError(msg) from None


def _stored_values(X: Any) -> np.ndarray:
    return X.data if sp.issparse(X) else np.asarray(X)


def _check_values(X: Any, name: str) -> None:
    """Reject float16, NaN/inf and negative values (stored entries only for sparse matrices)."""
    vals = _stored_values(X)
    if vals.dtype == np.float16:
        msg = f"{name}: X dtype is float16 (expected float32, float64 or an integer dtype; convert with X.astype('float32'))"
        raise InputError(msg)
    if vals.dtype.kind not in "fiu":
        msg = f"{name}: X dtype is {vals.dtype} (expected a numeric dtype)"
        raise InputError(msg)
    if vals.size == 0:
        return
    flat = vals.reshape(-1)
    if flat.dtype.kind == "f":
        from celltwin.eval._rowops import scan_finite

        n_bad, first, vmin = scan_finite(flat)  # one pass, no nnz-sized temporaries
        if n_bad:
            msg = f"{name}: X contains {n_bad} non-finite value(s) (expected finite values; found {flat[first]})"
            raise InputError(msg)
        vmin = flat.dtype.type(vmin)
    else:
        vmin = flat.min()
    if vmin < 0:
        msg = f"{name}: X contains negative values (expected counts or log1p values >= 0; min is {vmin})"
        raise InputError(msg)


def is_counts(X: Any, name: str = "X") -> bool:
    """True when no stored value has a fractional part ``> 1e-3`` (cell-eval's integer-count detection).

    For a fractional (log-normalised) matrix, also check the cell-eval range ``[0, 15)`` and raise an
    :class:`InputError` for a mix of counts and log values. Call after :func:`_check_values`.
    """
    vals = _stored_values(X)
    if vals.dtype.kind in "iu" or vals.size == 0:
        return True
    from celltwin.eval._rowops import has_fraction

    # np.modf(v)[0] > 1e-3 evaluated in the array's dtype, stopping at the first fractional value
    if not has_fraction(vals.reshape(-1), vals.dtype.type(FRACTION_EPS)):
        return True
    vmax = float(vals.max())
    if vmax >= LOG_MAX:
        msg = (
            f"{name}: X mixes counts and log values (fractional values present, so expected log1p values "
            f"< {LOG_MAX:g}; max is {vmax:g})"
        )
        raise InputError(msg)
    return False


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
        nnz_rows = np.diff(X.indptr)
        nonempty = nnz_rows > 0
        totals64 = np.zeros(X.shape[0], dtype=np.float64)
        if data.size:
            totals64[nonempty] = np.add.reduceat(data, X.indptr[:-1][nonempty], dtype=np.float64)
        totals = totals64.astype(data.dtype)
        target = np.median(totals)  # CSR rule: median over all cells, zero-count cells included
        factor = totals / target
        factor = factor + (factor == 0)
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


def prepare(adata, *, pert_col: str, control: str, name: str) -> EvalMatrix:
    """Validate one AnnData and return its log1p :class:`EvalMatrix` (``adata.X`` may be modified in place)."""
    X = adata.X
    if X is None:
        msg = f"{name}: X is missing (expected a cells x genes expression matrix)"
        raise InputError(msg)
    if not (sp.issparse(X) or isinstance(X, np.ndarray)):
        try:
            X = np.asarray(X)
        except Exception:
            msg = f"{name}: X has unsupported type {type(X).__name__} (expected a numpy array or CSR matrix)"
            raise InputError(msg) from None
    if X.shape[0] == 0 or X.shape[1] == 0:
        msg = f"{name}: X is empty (shape {X.shape}; expected at least one cell and one gene)"
        raise InputError(msg)
    genes = np.asarray(adata.var_names.astype(str))
    uniq, counts = np.unique(genes, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        msg = f"{name}: var_names has {dup.size} duplicated gene name(s) (expected unique names; e.g. {dup[0]!r})"
        raise InputError(msg)
    labels = _labels(adata, pert_col, name)
    if not (labels == control).any():
        present = ", ".join(np.unique(labels)[:5])
        msg = f"{name}: control label {control!r} not found in obs[{pert_col!r}] (labels include: {present})"
        raise InputError(msg)
    _check_values(X, name)
    counts_file = is_counts(X, name)
    if counts_file:
        X = normalize_log1p(X)
    elif sp.issparse(X) and X.format != "csr":
        X = X.tocsr()
    elif not sp.issparse(X):
        X = np.ascontiguousarray(X)
    if sp.issparse(X) and not isinstance(X, sp.csr_matrix):
        X = sp.csr_matrix(X)
    return EvalMatrix(X=X, labels=labels, genes=genes, name=name, was_counts=counts_file)
