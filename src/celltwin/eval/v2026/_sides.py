"""One side of a VCC 2026 scoring (the reference, the prediction or the prediction's control
cells) read once: a canonical CSR matrix, its labels, both kinds of row totals (:mod:`._counts`),
the DE normalisation divisors, and its groups' profiles and jackknife corrections.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval.v2026 import _counts, _de
from celltwin.eval.v2026._config import V2026Config
from celltwin.eval.v2026._jackknife import jackknife


def _profiles(sums: np.ndarray, ts: float) -> np.ndarray:
    """cell-eval2 ``bulk_lognorm_means``: ``log1p(P * (TS / sum_g P))``, an empty group all zeros."""
    totals = sums.sum(axis=1)
    scale = np.zeros_like(totals)
    ok = totals > 0
    scale[ok] = ts / totals[ok]
    return np.log1p(sums * scale[:, None])


@dataclass
class _Side:
    """A matrix with per-row totals, as every metric reads it."""

    X: sp.csr_matrix  # canonical CSR (a dense input is converted once)
    dense_input: bool
    labels: np.ndarray
    lib_seq: np.ndarray  # row totals summed entry by entry (CSR order)
    lib_pair: np.ndarray | None  # dense input: numpy's pairwise row totals


def _side(cc: Any, where: str, genes: list[str] | None = None) -> _Side:
    """``cc`` (a :class:`ContextCounts`, or a bare matrix: no labels) read once: canonical CSR, the
    input's format and both kinds of row totals."""
    bare = isinstance(cc, np.ndarray | sp.spmatrix | sp.sparray)
    A = _counts.as_matrix(cc if bare else cc.X, where)
    labels = None if bare else np.asarray(cc.perts, dtype=object).astype(str)
    if labels is not None and labels.shape[0] != A.shape[0]:
        msg = f"{where}: {A.shape[0]} cells but {labels.shape[0]} perturbation labels"
        raise InputError(msg)
    if genes is not None and A.shape[1] != len(genes):
        msg = f"{where}: {A.shape[1]} gene columns, expected {len(genes)} (the reference's genes)"
        raise InputError(msg)
    if sp.issparse(A):
        X = A
        lib_pair = None
    else:
        lib_pair = _counts.cell_totals(A)
        X = sp.csr_matrix(A)
        X.sum_duplicates()
    lib_seq = _counts.cell_totals(X)
    return _Side(X=X, dense_input=not sp.issparse(A), labels=labels, lib_seq=lib_seq, lib_pair=lib_pair)


def _de_scale(side: _Side, sparse_mode: bool, target_sum: float) -> np.ndarray:
    """scanpy ``normalize_total`` divisors ``c = L / target_sum`` (``1`` for an empty cell)."""
    lib = side.lib_pair if (not sparse_mode and side.lib_pair is not None) else side.lib_seq
    c = lib / float(target_sum)
    return c + (c == 0)


def _group_stats(side: _Side, groups: _de.Groups, cfg: V2026Config, where: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(sums, profiles, jackknife)`` of ``groups`` (rows of ``side``)."""
    sums = _counts.group_sums(side.X, groups.order, groups.bounds, where)
    prof = _profiles(sums, cfg.bulk_target_sum)
    jk = jackknife(side.X, groups.order, groups.bounds, sums, side.lib_seq, cfg.bulk_target_sum)
    return sums, prof, jk


def _check_genes(genes: Sequence[str], where: str) -> list[str]:
    genes = [str(g) for g in genes]
    if len(set(genes)) != len(genes):
        seen: set[str] = set()
        dup = next(g for g in genes if g in seen or seen.add(g))
        msg = f"{where}: gene names must be unique; {dup!r} appears more than once"
        raise InputError(msg)
    return genes
