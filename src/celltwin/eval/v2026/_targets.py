"""Target genes of the VCC 2026 metrics: the gene column each perturbation leaves out.

Which gene is a perturbation's own (cell-eval2 ``target_gene_map``; ``targets`` here)
    By default a label is its own gene symbol. ``targets`` may be a mapping ``label -> gene``
    (``None`` declares "no target gene"; a ``"*": None`` entry declares it for every unmapped
    label), exactly cell-eval2's ``target_gene_map``; or a sequence of gene symbols, which
    replaces the *panel* set PDS removes (default: the genes of all reference labels) while each
    label stays its own gene. Expression and PDS resolve a label against the whole gene axis;
    the DE metrics resolve an unmapped label only against the genes the reference's DE table
    keeps (the CPM filter), and a mapped one authoritatively. When no label resolves (and none is
    declared) cell-eval2 refuses to score, and so do the metrics (``InputError``).

The rules are cell-eval2's (``resolve_exclusion_columns``, ``resolve_target_genes``), checked in
``tests/eval/test_v2026_metrics.py``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from celltwin.errors import InputError

_UNMAPPED = object()


def _split_targets(targets: Any) -> tuple[dict[str, str | None] | None, list[str] | None]:
    """``(target_gene_map, panel_genes)`` from the ``targets`` argument."""
    if targets is None:
        return None, None
    if isinstance(targets, Mapping):
        return {str(k): (None if v is None else str(v)) for k, v in targets.items()}, None
    if isinstance(targets, str | bytes):
        msg = f"targets: expected a mapping label -> gene or a sequence of gene symbols, got the string {targets!r}"
        raise InputError(msg)
    return None, [str(t) for t in targets]


def _entry(mapping: dict[str, str | None] | None, label: str) -> Any:
    """cell-eval2 ``target_gene_entry``: a gene name, ``None`` (declared: no target gene) or
    ``_UNMAPPED`` (the label itself is matched)."""
    if not mapping:
        return _UNMAPPED
    if label in mapping:
        return mapping[label]
    if "*" in mapping and mapping["*"] is None:
        return None
    return _UNMAPPED


def _resolve_columns(
    labels: Sequence[str], gene_pos: dict[str, int], mapping: Any, kept: np.ndarray | None = None
) -> tuple[np.ndarray, int]:
    """Each label's own gene column (-1: none) and how many labels resolved or were declared.

    Without ``kept`` a label resolves when its gene (its mapped gene, else itself) is on the gene
    axis. With ``kept`` (the genes the reference DE table tests) a mapped label counts
    authoritatively (its column kept when the gene is on the axis) and an unmapped one only when
    its gene is tested."""
    cols = np.full(len(labels), -1, dtype=np.int64)
    n_ok = 0
    for i, lab in enumerate(labels):
        e = _entry(mapping, lab)
        if e is None:
            n_ok += 1
            continue
        c = gene_pos.get(lab if e is _UNMAPPED else e)
        if kept is not None and e is _UNMAPPED and c is not None and not kept[c]:
            continue
        if c is not None:
            cols[i] = c
        if c is not None or (kept is not None and e is not _UNMAPPED):
            n_ok += 1
    return cols, n_ok


def _own_columns(labels: Sequence[str], gene_pos: dict[str, int], mapping: Any, who: str) -> np.ndarray:
    """Each label's own gene column over the whole gene axis (-1: none), cell-eval2
    ``resolve_exclusion_columns``; raises when no label resolves and none is declared."""
    cols, n_ok = _resolve_columns(labels, gene_pos, mapping)
    if labels and n_ok == 0:
        msg = (
            f"{who}: no perturbation label names a measured gene (0 of {len(labels)}, e.g. "
            f"{list(labels)[:3]}), so no perturbation's own gene can be excluded; pass targets="
            "{label: gene} (or {label: None} for perturbations without a target gene)"
        )
        raise InputError(msg)
    return cols


def _de_own_columns(labels: Sequence[str], gene_pos: dict[str, int], mapping: Any, kept: np.ndarray) -> np.ndarray:
    """Own-gene column for the DE metrics (cell-eval2 ``resolve_target_genes`` against the
    reference DE table's features): a mapped label authoritatively, an unmapped one only when its
    gene is tested (kept) by the reference. Raises when nothing resolves and nothing is declared."""
    cols, n_ok = _resolve_columns(labels, gene_pos, mapping, kept)
    if labels and n_ok == 0:
        msg = (
            f"DE metrics: no perturbation label names a gene tested in the reference DE table "
            f"(0 of {len(labels)}, e.g. {list(labels)[:3]}); pass targets={{label: gene}}"
        )
        raise InputError(msg)
    return cols


def _targets_key(targets: Any) -> Any:
    """A comparable form of ``targets`` (what prepared statistics were made with)."""
    mapping, panel = _split_targets(targets)
    if mapping is not None:
        return ("map", tuple(sorted(mapping.items(), key=lambda kv: kv[0])))
    if panel is not None:
        return ("panel", tuple(panel))
    return None
