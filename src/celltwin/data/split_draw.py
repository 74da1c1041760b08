"""Drawing a few-shot or zero-shot split around a target context (``celltwin split``).

:func:`make_split` returns a :class:`~celltwin.data.split.Split` (the cell-load / STATE TOML format,
resolved by :func:`celltwin.data.split.resolve_split`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from celltwin.data.columns import ObsColumns, require_columns
from celltwin.data.split import Split, split_key
from celltwin.errors import ConfigError, InputError

__all__ = ["make_split"]


def _count(value: float, total: int, what: str) -> int:
    if value < 0:
        msg = f"{what}: expected >= 0, got {value}"
        raise ConfigError(msg)
    if 0 < value < 1:
        return max(1, round(value * total))
    if value != int(value):
        msg = f"{what}: expected an integer count or a fraction in (0, 1), got {value}"
        raise ConfigError(msg)
    return int(value)


def make_split(
    obs: pd.DataFrame,
    columns: ObsColumns,
    target: str,
    holdout: float = 0,
    seed: int = 0,
    kind: str = "fewshot",
    val: float = 0,
    dataset: str = "data",
    data_path: str = "",
    min_cells: int = 1,
    where: str = "data",
    test: Sequence[str] | None = None,
) -> Split:
    """Build a few-shot or zero-shot split around the ``target`` context.

    fewshot
        Among the target context's perturbations with at least ``min_cells`` cells (sorted by
        name, then permuted with ``default_rng(seed)``), the first ``holdout`` go to test and the
        next ``val`` to val. ``holdout`` / ``val`` are counts (>= 1) or fractions in (0, 1)
        (rounded, at least 1). Perturbations with fewer than ``min_cells`` cells are never held out
        (policy: they stay training data). The target context's controls and remaining
        perturbations are training data; every other context is training data.
        ``test``: an explicit list of test perturbations instead of ``holdout`` (each must have
        cells in the target context, else :class:`InputError` naming the unknown ones;
        ``min_cells`` does not apply to them); ``val`` is then drawn among the other eligible ones.
    zeroshot
        The whole target context goes to test (``holdout`` and ``val`` are ignored, ``test`` must
        be None); only its controls are seen (as prediction inputs, see :func:`celltwin.data.split.resolve_split`).

    The split records ``columns`` (their non-``None`` names) in its ``[columns]`` table, so
    ``celltwin train`` / ``predict`` read the same columns without being told again.
    """
    require_columns(obs, [columns.pert_col, columns.context_col], where)
    if kind not in ("fewshot", "zeroshot"):
        msg = f"split kind: expected 'fewshot' or 'zeroshot', got {kind!r}"
        raise ConfigError(msg)
    if "." in dataset or not dataset:
        msg = f"dataset name {dataset!r}: must be non-empty and contain no '.'"
        raise ConfigError(msg)
    pert = columns.perturbations(obs)
    ctx = columns.contexts(obs)
    contexts = sorted(set(ctx))
    if target not in contexts:
        col = columns.context_col or "(none)"
        msg = (
            f"{where}: target context {target!r} not found in column {col}; available: {', '.join(contexts)}"
        )
        raise InputError(msg)
    is_ctrl = pert == columns.control_label
    if not (is_ctrl & (ctx == target)).any():
        msg = f"{where}: target context {target!r} has no control cells ({columns.control_label!r})"
        raise InputError(msg)
    recorded = {k: v for k, v in columns.to_dict().items() if v is not None}
    sp = Split(datasets={dataset: data_path}, training={dataset: "train"}, columns=recorded)
    key = split_key(dataset, target)
    if kind == "zeroshot":
        if test is not None:
            raise ConfigError("test: an explicit test list is for few-shot splits (zeroshot holds out the whole context)")
        sp.zeroshot[key] = "test"
        sp.comment = f"celltwin split: zeroshot, target context {target!r}"
        return sp
    counts = pd.Series(pert[(ctx == target) & ~is_ctrl]).value_counts()
    eligible = sorted(str(p) for p, c in counts.items() if c >= min_cells)
    if test is not None:
        chosen = list(dict.fromkeys(str(t).strip() for t in test if str(t).strip()))
        if not chosen:
            raise ConfigError("test: the list of test perturbations is empty")
        unknown = [t for t in chosen if t not in counts.index]
        if unknown:
            shown = ", ".join(unknown[:20]) + (f" ... ({len(unknown)} in all)" if len(unknown) > 20 else "")
            msg = (f"{where}: test perturbation(s) with no cells in context {target!r} "
                   f"(column {columns.pert_col}): {shown}")
            raise InputError(msg)
        rest = [p for p in eligible if p not in set(chosen)]
        n_val = _count(val, len(eligible), "val")
        if n_val > len(rest):
            msg = (f"{where}: context {target!r} has {len(rest)} other perturbation(s) with >= {min_cells} cells; "
                   f"cannot hold out {n_val} val")
            raise InputError(msg)
        order = [rest[i] for i in np.random.default_rng(seed).permutation(len(rest))]
        sp.fewshot[key] = {"val": sorted(order[:n_val]), "test": sorted(chosen)}
        sp.comment = (
            f"celltwin split: fewshot, target context {target!r}, {len(chosen)} test perturbation(s) given, "
            f"seed {seed}, {n_val} val of {len(rest)} other perturbations with >= {min_cells} cells"
        )
        return sp
    n_test = _count(holdout, len(eligible), "holdout")
    n_val = _count(val, len(eligible), "val")
    if n_test < 1:
        raise ConfigError("holdout: a few-shot split needs at least one test perturbation")
    if n_test + n_val > len(eligible):
        msg = (
            f"{where}: context {target!r} has {len(eligible)} perturbation(s) with >= {min_cells} cells; "
            f"cannot hold out {n_test} test + {n_val} val"
        )
        raise InputError(msg)
    order = [eligible[i] for i in np.random.default_rng(seed).permutation(len(eligible))]
    sp.fewshot[key] = {"val": sorted(order[n_test : n_test + n_val]), "test": sorted(order[:n_test])}
    sp.comment = (
        f"celltwin split: fewshot, target context {target!r}, seed {seed}, "
        f"{n_test} test / {n_val} val of {len(eligible)} perturbations with >= {min_cells} cells"
    )
    return sp
