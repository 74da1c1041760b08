"""Reading a VCC 2026 submission and its reference for :func:`~celltwin.eval.v2026.evaluate_2026`,
and the checks made on them before any metric is computed.

Reading. Both sides are read lazily (:class:`celltwin.data.source.H5adSource` for a path,
:class:`~celltwin.data.source.MemorySource` for an AnnData): obs first, then one context at a time,
its rows as a CSR matrix (a dense-stored file is read in row blocks converted to CSR), so memory
holds one context of each side and never a dense cells x genes matrix.

Checks, all before any metric is computed (each a one-line :class:`~celltwin.errors.InputError`):

* the perturbation column (and the context column when given) exists on both sides;
* the prediction's genes are the reference's, in the same order (unknown and missing genes named);
* the prediction has every context of the reference and no other;
* per context, the prediction has every perturbation of the reference and no other, and the
  reference has control cells. The prediction's own control rows are optional and never read: the
  reference's control cells are the origin of both sides (``control_source: real``; an upload
  carries no controls, the platform adds the reference's before scoring);
* the 2026 counts rule on every predicted cell (non-negative, integral, finite, cell totals at most
  1e6; ``check_counts``), read in row blocks so a bad file fails in seconds; and on the reference.
"""

from __future__ import annotations

import os
import re
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval.v2026._config import ContextCounts
from celltwin.eval.v2026._counts import check_counts

__all__ = ["load_context"]

_BLOCK = 8192


def _source(data: Any, what: str) -> Any:
    from celltwin.data.source import open_source

    if isinstance(data, str | os.PathLike) and not os.path.exists(data):
        msg = f"{what} {data}: file not found"
        raise InputError(msg)
    return open_source(data)


def _column(src: Any, col: str, what: str) -> np.ndarray:
    if col not in src.obs.columns:
        have = ", ".join(map(str, list(src.obs.columns)[:10])) or "(none)"
        msg = f"{what} {src.name}: obs has no column {col!r} (columns: {have})"
        raise InputError(msg)
    values = src.obs[col]
    if values.isna().any():
        msg = f"{what} {src.name}: obs[{col!r}] has {int(values.isna().sum())} missing value(s)"
        raise InputError(msg)
    return values.astype(str).to_numpy()


def _context_rows(
    src: Any, context_col: str | None, what: str
) -> tuple[list[str | None], dict[str | None, np.ndarray]]:
    """The contexts of ``src`` (sorted; ``[None]`` without a context column) and the rows of each."""
    if context_col is None:
        return [None], {None: np.arange(src.n_obs)}
    ctx = _column(src, context_col, what)
    contexts: list[str | None] = sorted(set(ctx.tolist()))
    return contexts, {c: np.flatnonzero(ctx == c) for c in contexts}


def _split_contexts(
    real_src: Any, pred_src: Any, context_col: str | None
) -> tuple[list[str | None], dict[str | None, np.ndarray], dict[str | None, np.ndarray]]:
    """The reference's contexts and the rows of each on both sides; refused unless the prediction
    has exactly the reference's contexts."""
    contexts, real_rows = _context_rows(real_src, context_col, "reference")
    pred_contexts, pred_rows = _context_rows(pred_src, context_col, "prediction")
    missing = sorted(set(contexts) - set(pred_contexts))
    if missing:
        msg = f"prediction {pred_src.name}: context(s) {missing} of the reference have no predicted cells"
        raise InputError(msg)
    extra = sorted(set(pred_contexts) - set(contexts))
    if extra:
        msg = f"prediction {pred_src.name}: context(s) {extra} are not in the reference {real_src.name}"
        raise InputError(msg)
    return contexts, real_rows, pred_rows


def load_context(src: Any, rows: np.ndarray, labels: np.ndarray) -> Any:
    """One context of ``src`` (its sorted row indices ``rows``) as a ContextCounts (CSR)."""
    rows = np.asarray(rows, dtype=np.int64)
    fmt = getattr(src, "x_format", "csr")
    if fmt == "csr":
        X = src.read_stored(rows)
        X = sp.csr_matrix(X)
    else:  # dense / CSC: row blocks converted to CSR
        blocks = [sp.csr_matrix(src.read_stored(rows[i : i + _BLOCK])) for i in range(0, rows.size, _BLOCK)]
        X = sp.vstack(blocks, format="csr") if blocks else sp.csr_matrix((0, src.n_vars))
    return ContextCounts(X=X, perts=np.asarray(labels)[rows], genes=[str(g) for g in src.var_names])


def _check_counts_rows(X: Any, src: Any, rows: np.ndarray, where: str) -> None:
    """The 2026 counts rule on ``X`` (the cells ``rows`` of ``src``); the offending cell is named
    by its row and obs name in the file."""
    try:
        check_counts(X, where)
    except InputError as e:
        msg = str(e)
        m = re.search(r"\brow (\d+)", msg)
        if m is None:
            raise
        k = int(rows[int(m.group(1))])
        cell = f"cell {k} ({str(src.obs.index[k])!r})"
        raise InputError(msg[: m.start()] + cell + msg[m.end() :]) from None


def _check_counts_blocks(src: Any, rows: np.ndarray, where: str) -> None:
    """The 2026 counts rule over ``rows`` of ``src``, block by block."""
    for i in range(0, rows.size, _BLOCK):
        blk = rows[i : i + _BLOCK]
        _check_counts_rows(sp.csr_matrix(src.read_stored(blk)), src, blk, where)


def _refuse_any(names: list[str], head: str, what: str, tail: str = "") -> None:
    """Refuse ``names`` unless empty: ``{head}: {n} {what} (e.g. {the first five}){tail}``."""
    if names:
        msg = f"{head}: {len(names)} {what} (e.g. {names[:5]}){tail}"
        raise InputError(msg)


def _check_genes(real: Any, pred: Any) -> None:
    """The prediction's gene axis is the reference's (duplicated, unknown, missing or reordered
    genes are named)."""
    rg = [str(g) for g in real.var_names]
    pg = [str(g) for g in pred.var_names]
    if rg == pg:
        return
    rs, ps = set(rg), set(pg)
    if len(ps) != len(pg):
        dup = sorted({g for g in pg if pg.count(g) > 1})[:5]
        msg = f"prediction {pred.name}: duplicated gene name(s) {dup}"
        raise InputError(msg)
    head, exactly = f"prediction {pred.name}", "; the gene axis must be the reference's exactly"
    _refuse_any([g for g in pg if g not in rs], head, f"gene(s) not in the reference {real.name}", exactly)
    _refuse_any([g for g in rg if g not in ps], head, "gene(s) of the reference are missing", exactly)
    k = next(i for i, (a, b) in enumerate(zip(rg, pg, strict=True)) if a != b)
    msg = (
        f"prediction {pred.name}: genes are the reference's but in another order (position {k}: "
        f"{pg[k]!r}, reference {rg[k]!r}); write them in the reference's order"
    )
    raise InputError(msg)


def _check_labels(
    real_src: Any,
    pred_src: Any,
    real_labels: np.ndarray,
    pred_labels: np.ndarray,
    real_rows: dict[str | None, np.ndarray],
    pred_rows: dict[str | None, np.ndarray],
    control: str,
) -> None:
    """Per context: the reference has control cells, the prediction every perturbation of the
    reference and no other (its own control rows are optional)."""
    for c in real_rows:
        where = "" if c is None else f" context {c!r}"
        rl = set(real_labels[real_rows[c]].tolist())
        pl_ = set(pred_labels[pred_rows[c]].tolist())
        if control not in rl:
            msg = f"reference {real_src.name}{where}: no cells of the control {control!r}"
            raise InputError(msg)
        head = f"prediction {pred_src.name}{where}"
        absent = sorted(rl - pl_ - {control})
        _refuse_any(absent, head, "perturbation(s) of the reference have no predicted cells")
        _refuse_any(sorted(pl_ - rl), head, "perturbation(s) not in the reference")
