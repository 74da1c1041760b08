"""The two sides of an evaluation, read lazily from disk instead of held in memory.

:func:`open_side` reads a file's labels and gene names and streams its X once, in blocks of
:data:`SCAN_ROWS` rows, applying every check of :mod:`celltwin.eval._load` (same rules, same
one-line messages) and collecting what the normalisation needs: each cell's total and, from
them, the median target. It returns an :class:`~celltwin.eval._side_rows.EvalSide`, whose
:meth:`~celltwin.eval._side_rows.EvalSide.rows` returns any set of rows in log1p space, bit for
bit the rows of :func:`celltwin.eval._load.normalize_log1p` on the whole matrix (see
:mod:`celltwin.eval._side_rows`).

:func:`side_tables` then computes a side's pseudobulks and its v2 DE statistics group batch by
group batch: the control cells are read once and kept; the perturbations are taken in sorted
order in batches of about :data:`BATCH_BYTES` of stored values, each batch's rows are read,
appended after the controls in one reused buffer, and handed to the same kernels as the
in-memory path (:func:`celltwin.eval._metrics.pseudobulk`,
:func:`celltwin.eval._de.de_v2_arrays`). A group's cells keep their file order inside the
buffer, and every value of a perturbation's row of the DE table depends only on that group's
cells and the control cells, so the results equal one pass over the whole matrix exactly (the
tests compare bits). Peak memory: the control cells + about twice one batch + the
``perturbations x genes`` result arrays, whatever the number of cells.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval._load import ValueScan, _labels
from celltwin.eval._side_rows import EvalSide

__all__ = ["BATCH_BYTES", "SCAN_ROWS", "obsm_bulk", "open_side", "side_tables"]

SCAN_ROWS = 4096  # rows per block of the validation / totals pass
BATCH_BYTES = 768 << 20  # stored bytes of perturbed cells per group batch (controls come on top)


# --------------------------------------------------------------------------------------------
# opening and the validation pass
# --------------------------------------------------------------------------------------------


class _RowSubset:
    """The rows ``rows`` (sorted, unique) of a source, seen as a source of its own."""

    def __init__(self, source: Any, rows: np.ndarray) -> None:
        self.source = source
        self.rows = np.asarray(rows, dtype=np.int64)
        self.obs = source.obs.iloc[self.rows]
        self.var_names, self.x_format, self.n_vars = source.var_names, source.x_format, source.n_vars
        self.n_obs = int(self.rows.size)

    def stored_dtype(self) -> np.dtype:
        return self.source.stored_dtype()

    def row_nnz(self) -> np.ndarray | None:
        nnz = self.source.row_nnz()
        return None if nnz is None else nnz[self.rows]

    def read_stored(self, uniq: np.ndarray):
        return self.source.read_stored(self.rows[uniq])

    def read_csr_into(self, uniq: np.ndarray, data_out: np.ndarray, ind_out: np.ndarray):
        return self.source.read_csr_into(self.rows[uniq], data_out, ind_out)

    def read_obsm_stored(self, uniq: np.ndarray, key: str) -> np.ndarray:
        return self.source.read_obsm_stored(self.rows[uniq], key)


def _open_source(obj: Any, which: str):
    from celltwin.data.source import H5adSource, MemorySource

    if isinstance(obj, str | os.PathLike):
        p = Path(obj)
        if not p.is_file():
            msg = f"{p}: file not found (expected an .h5ad file)"
            raise InputError(msg)
        try:
            import h5py

            with h5py.File(p, "r") as f:
                keys = set(f.keys())
        except Exception as e:  # noqa: BLE001 - h5py raises many types on foreign files
            first = str(e).splitlines()[0] if str(e) else type(e).__name__
            msg = f"{p}: not a readable .h5ad file (expected an AnnData HDF5 file; got {type(e).__name__}: {first})"
            raise InputError(msg) from None
        if "X" not in keys and {"obs", "var"} <= keys:
            msg = f"{p}: X is missing (expected a cells x genes expression matrix)"
            raise InputError(msg)
        return H5adSource(p), str(p)
    if hasattr(obj, "X") and hasattr(obj, "obs") and hasattr(obj, "var_names"):
        name = f"<{which} AnnData>"
        X = obj.X
        if X is None:
            msg = f"{name}: X is missing (expected a cells x genes expression matrix)"
            raise InputError(msg)
        if not (sp.issparse(X) or isinstance(X, np.ndarray)):
            try:
                X = np.asarray(X)
            except Exception:  # noqa: BLE001
                msg = f"{name}: X has unsupported type {type(X).__name__} (expected a numpy array or CSR matrix)"
                raise InputError(msg) from None
            obj = SimpleNamespace(X=X, obs=obj.obs, var_names=obj.var_names, obsm={},
                                  n_obs=X.shape[0], n_vars=X.shape[1] if X.ndim > 1 else 0)
        return MemorySource(obj, name=name), name
    msg = f"{which}: expected a path to an .h5ad file or an AnnData, got {type(obj).__name__}"
    raise InputError(msg)


def open_side(obj: Any, *, pert_col: str, control: str, which: str, digest: bool = False,
              rows: np.ndarray | None = None) -> EvalSide:
    """Open and validate one side (a ``.h5ad`` path or an AnnData); see the module docstring.

    ``rows``: evaluate only these cells (sorted row indices), as if the file held nothing else
    (the normalisation's median included, as cell-eval does on a cell-type subset)."""
    source, name = _open_source(obj, which)
    if rows is not None:
        source = _RowSubset(source, rows)
    n_obs, n_genes = int(source.n_obs), int(source.n_vars)
    if n_obs == 0 or n_genes == 0:
        msg = f"{name}: X is empty (shape {(n_obs, n_genes)}; expected at least one cell and one gene)"
        raise InputError(msg)
    genes = np.asarray(source.var_names.astype(str))
    uniq, counts = np.unique(genes, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1]
        msg = f"{name}: var_names has {dup.size} duplicated gene name(s) (expected unique names; e.g. {dup[0]!r})"
        raise InputError(msg)
    labels = _labels(source, pert_col, name)
    if not (labels == control).any():
        present = ", ".join(np.unique(labels)[:5])
        msg = f"{name}: control label {control!r} not found in obs[{pert_col!r}] (labels include: {present})"
        raise InputError(msg)
    stored = np.dtype(source.stored_dtype())
    values = ValueScan(stored, name)  # the input rule (refuses float16 / non-numeric at once)
    sparse = source.row_nnz() is not None or source.x_format != "dense"
    scan = _scan(source, n_obs, stored, sparse, digest, values)
    was_counts = values.finish()
    dtype = np.dtype(np.float32) if stored.kind in "iu" else stored
    factor = None
    if was_counts:
        if sparse:  # CSR rule: float64 row sums stored in the dtype, median over all cells
            totals = scan["totals"].astype(dtype)
            target = np.median(totals)
        else:  # dense rule: sums in the dtype, median over the non-zero totals
            totals = scan["totals"]
            target = np.median(totals[totals > 0])
        factor = totals / target
        factor = factor + (factor == 0)
    return EvalSide(source, name, labels, genes, sparse=sparse, dtype=dtype, was_counts=was_counts,
                    factor=factor, digest=scan["digest"])


def _scan(source: Any, n_obs: int, stored: np.dtype, sparse: bool, want_digest: bool,
          values: ValueScan) -> dict:
    """One streamed pass over X: the value checks (``values``), per-cell totals and the digest."""
    work = np.dtype(np.float32) if stored.kind in "iu" else stored
    totals = np.zeros(n_obs, dtype=np.float64 if sparse else work)
    h = hashlib.blake2b(digest_size=20) if want_digest else None
    if h is not None:
        h.update(f"eval-side-1|{stored.str}|{n_obs}|{int(source.n_vars)}|{sparse}|{SCAN_ROWS}".encode())
    row_nnz = source.row_nnz() if sparse else None
    if row_nnz is not None:  # one reused buffer, read in place
        ends = np.minimum(np.arange(SCAN_ROWS, n_obs + SCAN_ROWS, SCAN_ROWS), n_obs)
        cum = np.concatenate([[0], np.cumsum(row_nnz, dtype=np.int64)])
        most = int(np.max(cum[ends] - cum[ends - np.minimum(SCAN_ROWS, ends)], initial=0))
        dbuf, ibuf = np.empty(most, dtype=stored), np.empty(most, dtype=np.int32)
    for a in range(0, n_obs, SCAN_ROWS):
        b = min(n_obs, a + SCAN_ROWS)
        if row_nnz is not None:
            ptr = source.read_csr_into(np.arange(a, b, dtype=np.int64), dbuf, ibuf)
            blk = SimpleNamespace(data=dbuf[: ptr[-1]], indices=ibuf[: ptr[-1]], indptr=ptr)
            vals = blk.data
        elif sparse:
            blk = sp.csr_matrix(source.read_stored(np.arange(a, b, dtype=np.int64)))
            vals = blk.data
        else:
            blk = source.read_stored(np.arange(a, b, dtype=np.int64))
            vals = np.ascontiguousarray(blk).reshape(-1)
        if h is not None:
            for arr in ((vals, blk.indices, blk.indptr - blk.indptr[0]) if sparse else (vals,)):
                h.update(memoryview(np.ascontiguousarray(arr)).cast("B"))
        values.update(vals)
        data = vals.astype(np.float32) if stored.kind in "iu" else vals
        if sparse:
            nonempty = np.diff(blk.indptr) > 0
            if data.size:
                part = np.zeros(b - a, dtype=np.float64)
                part[nonempty] = np.add.reduceat(data, blk.indptr[:-1][nonempty], dtype=np.float64)
                totals[a:b] = part
        else:
            totals[a:b] = np.sum(data.reshape(b - a, -1), axis=1)
    return {"totals": totals, "digest": h.hexdigest() if h is not None else None}


# --------------------------------------------------------------------------------------------
# pseudobulks and DE, group batch by group batch
# --------------------------------------------------------------------------------------------


class _Buffer:
    """Control rows at the front of one CSR (or dense) buffer, each batch written after them.

    The buffer is sized once for the controls plus the largest batch (stored entries known from
    the files' indptr), so a batch is read straight into it: no copy of the controls per batch.
    """

    def __init__(self, side: Any, ctrl_rows: np.ndarray, batch_nnz: int, batch_rows: int) -> None:
        self.side, self.n_genes, self.dtype = side, int(side.genes.size), side.dtype
        self.n_c = int(ctrl_rows.size)
        self.sparse = bool(side.sparse)
        if self.sparse:
            nnz_c = side.row_nnz(ctrl_rows)
            nnz_c = int(nnz_c.sum()) if nnz_c is not None else int(sp.csr_matrix(side.rows(ctrl_rows)).nnz)
            self.data = np.empty(nnz_c + batch_nnz, dtype=self.dtype)
            self.ind = np.empty(nnz_c + batch_nnz, dtype=np.int32)
            self.ptr_c = side.rows_into(ctrl_rows, self.data, self.ind)
            self.nnz_c = int(self.ptr_c[-1])
        else:
            self.dense = np.empty((self.n_c + batch_rows, self.n_genes), dtype=self.dtype)
            self.dense[: self.n_c] = side.rows(ctrl_rows)

    def with_batch(self, rows: np.ndarray, nnz: int | None):
        """The matrix ``[controls; rows of the batch]`` (a view of the buffer)."""
        n = self.n_c + rows.size
        if not self.sparse:
            if n > self.dense.shape[0]:
                grown = np.empty((n, self.n_genes), dtype=self.dtype)
                grown[: self.n_c] = self.dense[: self.n_c]
                self.dense = grown
            self.dense[self.n_c : n] = self.side.rows(rows)
            return self.dense[:n]
        if nnz is None:
            nnz = int(sp.csr_matrix(self.side.rows(rows)).nnz)
        if self.nnz_c + nnz > self.data.size:
            self.data = np.resize(self.data, self.nnz_c + nnz)  # controls stay at the front
            self.ind = np.resize(self.ind, self.nnz_c + nnz)
        ptr_b = self.side.rows_into(rows, self.data[self.nnz_c :], self.ind[self.nnz_c :])
        need = self.nnz_c + int(ptr_b[-1])
        ptr = np.concatenate([self.ptr_c, self.nnz_c + ptr_b[1:]])
        return sp.csr_matrix((self.data[:need], self.ind[:need], ptr), shape=(n, self.n_genes), copy=False)


def _batches(groups: list[np.ndarray], nbytes: list[int], budget: int) -> list[list[int]]:
    """Consecutive runs of group positions whose bytes stay within ``budget`` (one group at least)."""
    out: list[list[int]] = []
    cur: list[int] = []
    used = 0
    for i, b in enumerate(nbytes):
        if cur and used + b > budget:
            out.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += b
    if cur:
        out.append(cur)
    return out


def side_tables(side: Any, names: np.ndarray, control: str, *, de: bool, budget: int | None = None,
                on_batch: Any = None) -> tuple[np.ndarray, dict[str, np.ndarray] | None]:
    """Pseudobulks of every label in ``names`` (sorted, control included) and, with ``de``, the
    v2 DE arrays of the non-control labels in ``names`` order against the control cells.

    Returns ``(bulk (len(names), G) in the side's dtype, arrays or None)``; ``on_batch(i, n)`` is
    called after each of the ``n`` batches (progress)."""
    from celltwin.eval._de_v2 import concat_v2_arrays, de_v2_arrays
    from celltwin.eval._metrics import pseudobulk

    budget = BATCH_BYTES if budget is None else budget
    codes = np.searchsorted(names, side.labels)
    ctrl = int(np.searchsorted(names, control))
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(names.size + 1))
    rows_of = [order[bounds[g] : bounds[g + 1]] for g in range(names.size)]  # each ascending
    tests = [g for g in range(names.size) if g != ctrl]
    sizes = [int(side.row_bytes(rows_of[g]).sum()) for g in tests]
    plan = _batches([rows_of[g] for g in tests], sizes, budget)
    nnz_of = [side.row_nnz(rows_of[g]) for g in tests]
    batch_nnz = [None if any(nnz_of[i] is None for i in b) else int(sum(nnz_of[i].sum() for i in b)) for b in plan]
    batch_rows = [sum(rows_of[tests[i]].size for i in b) for b in plan]
    buf = _Buffer(side, rows_of[ctrl], max((n or 0 for n in batch_nnz), default=0), max(batch_rows, default=0))
    n_c = buf.n_c
    bulk = np.zeros((names.size, side.genes.size), dtype=side.dtype)
    parts = []
    for bi, batch in enumerate(plan):
        gs = [tests[i] for i in batch]
        local = np.full(names.size, -1, dtype=np.int64)
        local[gs] = np.arange(len(gs))
        rows_b = np.sort(np.concatenate([rows_of[g] for g in gs]))
        M = buf.with_batch(rows_b, batch_nnz[bi])
        lc = np.concatenate([np.full(n_c, len(gs), dtype=np.int64), local[codes[rows_b]]])
        pb = pseudobulk(M, lc, len(gs) + 1)
        bulk[gs] = pb[: len(gs)]
        if bi == 0:  # the control rows as read (later batches may see them index-sorted)
            bulk[ctrl] = pb[len(gs)]
        if de:
            if sp.issparse(M) and not M.has_sorted_indices:
                M.sort_indices()  # in place, as de_table sorts its own copy
            parts.append(de_v2_arrays(M, lc, len(gs), list(range(len(gs)))))
        del M
        if on_batch is not None:
            on_batch(bi + 1, len(plan))
    if not tests:
        bulk[ctrl] = pseudobulk(buf.with_batch(np.empty(0, np.int64), 0), np.zeros(n_c, np.int64), 1)[0]
    return bulk, (concat_v2_arrays(parts) if de and parts else None)


def obsm_bulk(side: Any, names: np.ndarray, key: str) -> np.ndarray:
    """Pseudobulk of ``obsm[key]`` for every label of ``names``, ``(len(names), d)``: the dense rule
    of :func:`celltwin.eval._metrics.pseudobulk` (cell-eval's polars mean), one label at a time."""
    from celltwin.eval._metrics import pseudobulk

    codes = np.searchsorted(names, side.labels)
    out = None
    for g in range(names.size):
        rows = np.flatnonzero(codes == g)
        M = side.obsm_rows(rows, key)
        if M.ndim != 2:
            msg = f"{side.name}: obsm[{key!r}] has shape {M.shape} (expected cells x dimensions)"
            raise InputError(msg)
        if M.dtype.kind != "f":
            M = M.astype(np.float64)
        b = pseudobulk(M, np.zeros(rows.size, dtype=np.int64), 1)[0]
        if out is None:
            out = np.empty((names.size, b.size), dtype=b.dtype)
        out[g] = b
    return out
