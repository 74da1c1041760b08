"""Sufficient statistics of a training set for the baselines: control means and mean effects.

Everything here is a pure array kernel. Means are accumulated in float64 whatever the input
dtype (dense or CSR), so float32 and float64 inputs give the same statistics up to input rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp

from celltwin.errors import InputError

__all__ = ["EffectTable", "GroupSums", "effect_table_from_sums", "fit_effect_table", "group_means"]


def group_means(X, codes: np.ndarray, n_groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-group column means of ``X`` (n, G) for integer ``codes`` (n,) in ``[0, n_groups)``.

    Codes < 0 are ignored. Returns ``(means (n_groups, G) float64, counts (n_groups,) int64)``;
    groups without cells get a row of NaN.
    """
    codes = np.asarray(codes, dtype=np.int64)
    keep = codes >= 0
    rows = np.flatnonzero(keep)
    ind = sp.csr_matrix(
        (np.ones(rows.size, dtype=np.float64), (codes[keep], rows)), shape=(n_groups, codes.size)
    )
    Xf = X.astype(np.float64) if sp.issparse(X) else np.asarray(X, dtype=np.float64)
    sums = ind @ Xf
    sums = np.asarray(sums.todense()) if sp.issparse(sums) else np.asarray(sums)
    counts = np.bincount(codes[keep], minlength=n_groups).astype(np.int64)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = sums / counts[:, None]
    means[counts == 0] = np.nan
    return means, counts


class GroupSums:
    """Per-group column sums accumulated block by block (streamed training data).

    Each block's rows are added to their group's row of a (n_groups, G) float64 table, one row
    after another in the order given, so the result is bitwise the sum a single in-memory pass
    in row order gives (:func:`group_means`, i.e. scipy's sparse product, adds the same values in
    the same order). Rows with code < 0 are skipped. Memory: n_groups x G x 8 bytes.
    """

    def __init__(self, n_groups: int, n_genes: int) -> None:
        self.sums = np.zeros((n_groups, n_genes), dtype=np.float64)
        self.counts = np.zeros(n_groups, dtype=np.int64)

    def add(self, block, codes: np.ndarray) -> None:
        """Add rows of ``block`` (n, G) dense or CSR to the groups ``codes`` (n,)."""
        from celltwin.baselines._accumulate import add_csr_rows, add_dense_rows

        codes = np.ascontiguousarray(codes, dtype=np.int64)
        if block.shape[0] != codes.size or block.shape[1] != self.sums.shape[1]:
            msg = f"GroupSums.add: block {block.shape} vs {codes.size} codes x {self.sums.shape[1]} genes"
            raise InputError(msg)
        if sp.issparse(block):
            b = sp.csr_matrix(block)
            add_csr_rows(self.sums, codes, b.indptr.astype(np.int64), b.indices.astype(np.int64),
                         b.data.astype(np.float64))
        else:
            add_dense_rows(self.sums, codes, np.ascontiguousarray(block, dtype=np.float64))
        keep = codes[codes >= 0]
        self.counts += np.bincount(keep, minlength=self.counts.size).astype(np.int64)

    def means(self) -> tuple[np.ndarray, np.ndarray]:
        """``(means (n_groups, G), counts)``; groups without cells get NaN rows."""
        with np.errstate(invalid="ignore", divide="ignore"):
            means = self.sums / self.counts[:, None]
        means[self.counts == 0] = np.nan
        return means, self.counts.copy()


@dataclass
class EffectTable:
    """Training statistics in model space (log1p-normalised), shared by every baseline.

    ``control_mean[c]`` is the mean of context ``c``'s control cells; ``pair_effect[k]`` is the mean
    of the cells of training pair ``(contexts[pair_context[k]], pair_pert[k])`` minus that context's
    control mean. ``pair_count`` holds the number of cells behind each pair.
    """

    contexts: list[str]  # C
    control_mean: np.ndarray  # (C, G) float64
    control_count: np.ndarray  # (C,) int64
    pair_context: np.ndarray  # (P,) int64 index into contexts
    pair_pert: list[str]  # P
    pair_effect: np.ndarray  # (P, G) float64
    pair_count: np.ndarray  # (P,) int64

    @property
    def n_genes(self) -> int:
        return self.control_mean.shape[1]

    def context_index(self, context: str | None) -> int:
        """Index of ``context``, or -1 when it is unknown to the training set."""
        try:
            return self.contexts.index(context)  # type: ignore[arg-type]
        except ValueError:
            return -1

    def pairs_in(self, c: int) -> np.ndarray:
        return np.flatnonzero(self.pair_context == c)

    def lookup(self, c: int, pert: str) -> int:
        """Index of training pair (context c, pert), or -1."""
        for k in self.pairs_in(c):
            if self.pair_pert[k] == pert:
                return int(k)
        return -1

    def _shift_pairs(self, c: int) -> tuple[np.ndarray, str]:
        """Training pairs a mean shift is taken over: ``(rows, scope)``, scope ``context`` (those of
        context ``c``), else ``all-contexts``, else ``none`` (no training pair at all)."""
        idx = self.pairs_in(c) if c >= 0 else np.array([], dtype=np.int64)
        if idx.size:
            return idx, "context"
        idx = np.arange(len(self.pair_pert))
        return idx, ("all-contexts" if idx.size else "none")

    def cell_mean_shift(self, c: int) -> tuple[np.ndarray, str]:
        """Cell-weighted mean shift of all training perturbed cells (the ``cell-mean`` model; not the VCC baseline).

        In context ``c`` when it has training perturbations, else pooled over all contexts
        (each cell's shift measured against its own context's controls). Returns (shift, scope).
        """
        idx, scope = self._shift_pairs(c)
        if idx.size == 0:
            return np.zeros(self.n_genes), scope
        w = self.pair_count[idx].astype(np.float64)
        return (w[:, None] * self.pair_effect[idx]).sum(0) / w.sum(), scope

    def pert_mean_shift(self, c: int) -> tuple[np.ndarray, str]:
        """Unweighted mean of the training pairs' effects (each perturbation counts once).

        In context ``c`` when it has training perturbations, else over all training pairs.
        """
        idx, scope = self._shift_pairs(c)
        if idx.size == 0:
            return np.zeros(self.n_genes), scope
        return self.pair_effect[idx].mean(0), scope

    def transfer(self, c: int, pert: str) -> np.ndarray | None:
        """Mean effect of ``pert`` over the *other* contexts that trained it (each context once)."""
        idx = [k for k in range(len(self.pair_pert)) if self.pair_pert[k] == pert and self.pair_context[k] != c]
        if not idx:
            return None
        return self.pair_effect[idx].mean(0)

    def to_arrays(self) -> dict[str, np.ndarray]:
        return {
            "contexts": np.asarray(self.contexts, dtype=str),
            "control_mean": self.control_mean,
            "control_count": self.control_count,
            "pair_context": self.pair_context,
            "pair_pert": np.asarray(self.pair_pert, dtype=str),
            "pair_effect": self.pair_effect,
            "pair_count": self.pair_count,
        }

    @classmethod
    def from_arrays(cls, a) -> EffectTable:
        return cls(
            contexts=[str(x) for x in a["contexts"]],
            control_mean=np.asarray(a["control_mean"], dtype=np.float64),
            control_count=np.asarray(a["control_count"], dtype=np.int64),
            pair_context=np.asarray(a["pair_context"], dtype=np.int64),
            pair_pert=[str(x) for x in a["pair_pert"]],
            pair_effect=np.asarray(a["pair_effect"], dtype=np.float64),
            pair_count=np.asarray(a["pair_count"], dtype=np.int64),
        )


@dataclass
class EffectGroups:
    """Group codes of training cells: one group per context's controls, one per training pair."""

    contexts: list[str]
    pair_keys: list[tuple[int, str]]  # (context index, perturbation), sorted
    codes: np.ndarray  # (n,) int64: c for controls of context c, C + j for pair j

    @property
    def n_groups(self) -> int:
        return len(self.contexts) + len(self.pair_keys)


def effect_groups(perturbations: np.ndarray, contexts: np.ndarray, control_label: str) -> EffectGroups:
    """Group every training cell (see :class:`EffectGroups`); contexts and pairs sorted by name."""
    perts = np.asarray(perturbations).astype(str)
    ctxs = np.asarray(contexts).astype(str)
    if perts.size != ctxs.size:
        msg = f"training data: {perts.size} perturbation labels but {ctxs.size} context labels"
        raise InputError(msg)
    context_names, c_code = np.unique(ctxs, return_inverse=True)
    C = context_names.size
    is_ctrl = perts == control_label
    key = pd.DataFrame({"c": c_code[~is_ctrl], "p": perts[~is_ctrl]})
    pairs = key.drop_duplicates().sort_values(["c", "p"], kind="stable")
    pair_keys = [(int(c), str(p)) for c, p in zip(pairs["c"], pairs["p"], strict=True)]
    codes = np.where(is_ctrl, c_code, -1).astype(np.int64)
    if pair_keys:
        idx = pd.MultiIndex.from_tuples(pair_keys)
        pos = idx.get_indexer(pd.MultiIndex.from_arrays([c_code[~is_ctrl], perts[~is_ctrl]]))
        codes[~is_ctrl] = C + pos
    return EffectGroups([str(c) for c in context_names], pair_keys, codes)


def effect_table_from_sums(groups: EffectGroups, sums: GroupSums, control_label: str,
                           min_cells: int = 1) -> tuple[EffectTable, list[str]]:
    """The :class:`EffectTable` of accumulated group sums (see :func:`fit_effect_table`)."""
    means, counts = sums.means()
    C = len(groups.contexts)
    control_mean, control_count = means[:C], counts[:C]
    pair_mean, pair_count = means[C:], counts[C:]
    dropped: list[str] = []
    keep: list[int] = []
    for j, (c, p) in enumerate(groups.pair_keys):
        if pair_count[j] < min_cells:
            dropped.append(f"{groups.contexts[c]}/{p} ({pair_count[j]} cells)")
            continue
        if control_count[c] == 0:
            msg = (
                f"training data: context {groups.contexts[c]!r} has perturbed cells (e.g. {p!r}) but no "
                f"control cells labelled {control_label!r}; expected at least 1 control cell per context"
            )
            raise InputError(msg)
        keep.append(j)
    pc = np.array([groups.pair_keys[j][0] for j in keep], dtype=np.int64)
    G = means.shape[1]
    table = EffectTable(
        contexts=list(groups.contexts),
        control_mean=control_mean,
        control_count=control_count,
        pair_context=pc,
        pair_pert=[groups.pair_keys[j][1] for j in keep],
        pair_effect=(pair_mean[keep] - control_mean[pc]) if keep else np.zeros((0, G)),
        pair_count=pair_count[keep],
    )
    return table, dropped


def fit_effect_table(
    X,
    perturbations: np.ndarray,
    contexts: np.ndarray,
    control_label: str,
    min_cells: int = 1,
) -> tuple[EffectTable, list[str]]:
    """Build an :class:`EffectTable` from training cells ``X`` (n, G) in model space, in memory.

    ``perturbations`` / ``contexts`` are (n,) string arrays. Policy for small groups: a training
    pair with fewer than ``min_cells`` cells is dropped (its cells take part in nothing) and
    returned in the second value as ``"context/pert (n cells)"``. A context that has perturbed
    cells but no control cells raises :class:`InputError` (no effect can be measured there).
    Contexts are sorted by name; pairs by (context, perturbation), so results do not depend on
    cell order. The streamed fit (``celltwin train``) adds the same rows in the same order
    through :class:`GroupSums` and gives bitwise the same table.
    """
    if X.shape[0] != np.asarray(perturbations).size:
        msg = f"training data: X has {X.shape[0]} cells but {np.asarray(perturbations).size} perturbation labels"
        raise InputError(msg)
    groups = effect_groups(perturbations, contexts, control_label)
    sums = GroupSums(groups.n_groups, X.shape[1])
    sums.add(X, groups.codes)
    return effect_table_from_sums(groups, sums, control_label, min_cells)
