"""The baseline ``b`` of the VCC 2026 scale: the mean-perturbation prediction of a context, scored
as an ordinary submission. celltwin's own implementation of cell-eval2 0.20.0
``baseline.build_generic_baseline``, checked value for value against it in
``tests/eval/test_v2026_scale.py``.

Baseline ``b`` (cell-eval2 ``build_generic_baseline(emit="dispersed", seed=0,
exclude_target_gene=True)``):

* profile: the mean count vector of every non-control perturbation (mean over its cells, in the
  reference's own counts, float64), averaged with equal weight over the perturbations; gene ``g``
  leaves out the perturbation whose label is ``g`` (its own knockdown). No cell-count or
  knockdown-efficiency filter is applied here: in the competition the panel is already filtered
  (300 constructs per context passing both filters, see the spec's section 0), and cell-eval2
  0.20.0 averages over every non-control perturbation of the reference it is given. Pass
  ``perturbations=`` to restrict the average to a filtered subset of a larger file.
* emission as cells ("dispersed"): every perturbation keeps its real number of cells; each of them
  is a control cell drawn with replacement (``numpy.random.default_rng(seed).integers(0, n_ctrl,
  size=n_p)``, one call per perturbation in sorted label order, seed 0), its genes multiplied by
  ``profile[g] / control_mean[g]`` (0 where the control mean is 0), rounded to float32, explicit
  zeros dropped. The control rows are the reference's own control cells (float32). So each
  group's expected mean count is exactly the profile, and the cells keep a realistic spread for
  the DE test and the sampling correction of the expression error.
* the prediction is scored like a submission (control cells of the reference on both sides).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp

from celltwin.errors import InputError
from celltwin.eval.v2026._config import _csr, _labels, _make
from celltwin.eval.v2026._targets import _own_columns, _split_targets

__all__ = ["BASELINE_SEED", "BaselineProfile", "baseline_profile", "build_baseline"]

#: Seed of the baseline's cell emission (cell-eval2 ``build_generic_baseline(seed=0)``).
BASELINE_SEED = 0


def _target_columns(labels: Sequence[str], genes: Sequence[str], targets: Any) -> dict[int, int]:
    """``{index into labels -> gene column}`` of each perturbation whose own gene is measured, by
    the metrics' own resolver (cell-eval2 ``resolve_exclusion_columns``: a label is its gene symbol
    unless ``targets`` maps it; refused when no label resolves)."""
    mapping, _panel = _split_targets(targets)
    cols = _own_columns(list(labels), {g: j for j, g in enumerate(genes)}, mapping, "baseline")
    return {i: int(c) for i, c in enumerate(cols) if c >= 0}


@dataclass(frozen=True)
class BaselineProfile:
    """The mean perturbation response of a context (float64, one value per gene)."""

    values: np.ndarray
    perturbations: tuple[str, ...]
    n_excluded: int  # (perturbation, gene) terms left out for being the perturbation's own gene


def _group_means(X: sp.csr_matrix, labels: np.ndarray, groups: Sequence[str]) -> np.ndarray:
    """Mean count vector of each group (float64), as ``X[rows].mean(axis=0)`` over its cells."""
    out = np.zeros((len(groups), X.shape[1]), dtype=np.float64)
    for k, g in enumerate(groups):
        rows = np.flatnonzero(labels == g)
        sub = X[rows]
        sub = sp.csr_matrix((sub.data.astype(np.float64), sub.indices, sub.indptr), shape=sub.shape)
        out[k] = np.asarray(sub.mean(axis=0)).ravel()
    return out


def baseline_profile(
    real: Any,
    *,
    control: str = "non-targeting",
    targets: Mapping[str, Any] | None = None,
    perturbations: Sequence[str] | None = None,
) -> BaselineProfile:
    """The context's mean perturbation response: equal-weight mean over the non-control
    perturbations of their mean count vectors; gene ``g`` leaves out the perturbation targeting
    ``g``. ``perturbations`` restricts the average (e.g. to the constructs passing a cell-count /
    knockdown filter); default: every non-control perturbation of ``real``."""
    labels = _labels(real)
    genes = list(real.genes)
    perts = sorted(set(labels.tolist()) - {control})
    if perturbations is not None:
        unknown = sorted(set(map(str, perturbations)) - set(perts))
        if unknown:
            msg = f"baseline: perturbation(s) {unknown[:5]} are not in the reference"
            raise InputError(msg)
        perts = sorted(set(map(str, perturbations)))
    if not perts:
        msg = f"baseline: the reference has no perturbation besides the control {control!r}"
        raise InputError(msg)
    bulk = _group_means(_csr(real), labels, perts)
    total = bulk.sum(axis=0)
    count = np.full(len(genes), float(len(perts)))
    cols = _target_columns(perts, genes, targets)
    for i, j in cols.items():
        total[j] -= bulk[i, j]
        count[j] -= 1.0
    empty = np.flatnonzero(count <= 0)
    if empty.size:
        names = [genes[j] for j in empty[:5]]
        msg = f"baseline: every perturbation targets gene(s) {names}; their mean response is undefined"
        raise InputError(msg)
    return BaselineProfile(values=total / count, perturbations=tuple(perts), n_excluded=len(cols))


_SCALE_ROWS = 4096  # rows per block of the in-place scaling


def _scale_rows(out: sp.csr_matrix, perturbed: np.ndarray, factor: np.ndarray) -> sp.csr_matrix:
    """``out`` as float32 with the stored values of its ``perturbed`` rows scaled by
    ``factor[gene]`` as ``float32(value * float64 factor)`` and the zeros this leaves in those rows
    dropped (a control row keeps its stored values as they are). Row block by row block: no float64
    copy of the whole matrix."""
    data = out.data.astype(np.float32, copy=False)
    dropped: list[np.ndarray] = []
    n = out.shape[0]
    for r0 in range(0, n, _SCALE_ROWS):
        r1 = min(n, r0 + _SCALE_ROWS)
        a = int(out.indptr[r0])
        sel = np.flatnonzero(np.repeat(perturbed[r0:r1], np.diff(out.indptr[r0 : r1 + 1]))) + a
        vals = (out.data[sel] * factor[out.indices[sel]]).astype(np.float32)
        data[sel] = vals
        dropped.append(sel[vals == 0])
    drop = np.concatenate(dropped) if dropped else np.empty(0, np.intp)
    if drop.size == 0:
        return sp.csr_matrix((data, out.indices, out.indptr), shape=out.shape)
    keep = np.ones(out.nnz, dtype=bool)
    keep[drop] = False
    per_row = np.bincount(np.searchsorted(out.indptr, drop, side="right") - 1, minlength=n)
    indptr = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.diff(out.indptr) - per_row, out=indptr[1:])
    return sp.csr_matrix((data[keep], out.indices[keep], indptr), shape=out.shape)


def build_baseline(
    real: Any,
    *,
    control: str = "non-targeting",
    targets: Mapping[str, Any] | None = None,
    perturbations: Sequence[str] | None = None,
    seed: int = BASELINE_SEED,
    profile: BaselineProfile | None = None,
) -> Any:
    """The mean-perturbation baseline of a context as a prediction (a ContextCounts, float32 CSR).

    Same cells as ``real`` in the same order: every perturbation keeps its number of cells, each
    cell a control cell drawn with replacement and scaled gene-wise to the profile (see the module
    docstring); the control rows are ``real``'s control cells. The values are fractional (a mean
    is), so the prediction is scored without the integral-counts check.
    """
    labels = _labels(real)
    X = _csr(real)
    ctrl = np.flatnonzero(labels == control)
    if ctrl.size == 0:
        msg = f"baseline: control {control!r} has no cells in the reference"
        raise InputError(msg)
    if profile is None:
        profile = baseline_profile(real, control=control, targets=targets, perturbations=perturbations)
    ctrl_X = X[ctrl]
    ctrl_mean = np.asarray(
        sp.csr_matrix(
            (ctrl_X.data.astype(np.float64), ctrl_X.indices, ctrl_X.indptr), shape=ctrl_X.shape
        ).mean(axis=0)
    ).ravel()
    zero = ctrl_mean <= 0
    factor = np.where(zero, 0.0, profile.values / np.where(zero, 1.0, ctrl_mean))

    rng = np.random.default_rng(seed)
    groups = sorted(set(labels.tolist()) - {control})
    positions = [np.flatnonzero(labels == g) for g in groups]
    draws = [rng.integers(0, ctrl.size, size=int(p.size)) for p in positions]
    # every output row's source row in ctrl_X: the drawn control cell of a perturbed row, the
    # control cell itself for a control row; one gather, then the perturbed rows scaled in place
    # (no emitted + stacked + reordered copies: the peak stays at the reference plus one output)
    src = np.empty(labels.size, dtype=np.intp)
    src[ctrl] = np.arange(ctrl.size, dtype=np.intp)
    perturbed = np.zeros(labels.size, dtype=bool)
    for p, d in zip(positions, draws, strict=True):
        src[p] = d
        perturbed[p] = True
    out = _scale_rows(ctrl_X[src].tocsr(), perturbed, factor)
    return _make(real, out, labels)
