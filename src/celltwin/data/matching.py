"""Cell labels of a dataset and the matching of perturbed cells to basal control cells.

:class:`CellLabels` holds, for a chosen set of rows, each cell's perturbation, context and batch
as string arrays. :class:`ControlMatcher` draws, for any perturbed cell, a control cell:

* ``"random"``: uniformly (with replacement) among the controls of the cell's context;
* ``"batch"``: uniformly among the controls of the same context *and* batch; when that batch has
  no control cell, among the controls of the whole context (a warning names the context and the
  batch, once per matcher).

A context with perturbed cells but no control cell is an :class:`~celltwin.errors.InputError`.
Draws come from the ``numpy.random.Generator`` passed in, groups are visited in sorted order,
so a seed fixes the result.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd

from celltwin.data.columns import ObsColumns, require_columns
from celltwin.errors import ConfigError, InputError

__all__ = ["MATCH_STRATEGIES", "CellLabels", "ControlMatcher", "match_controls"]

MATCH_STRATEGIES = ("random", "batch")


@dataclass
class CellLabels:
    """Labels of ``rows`` (global row ids into the data): one entry per row, in row order."""

    rows: np.ndarray  # (n,) int64 global row ids
    pert: np.ndarray  # (n,) str
    context: np.ndarray  # (n,) str
    batch: np.ndarray  # (n,) str
    control_label: str
    where: str = "data"

    @classmethod
    def from_obs(
        cls, obs: pd.DataFrame, columns: ObsColumns, rows: np.ndarray | None = None, where: str = "data"
    ) -> CellLabels:
        """Labels of ``rows`` (default: all) of ``obs``; missing columns raise InputError naming ``where``."""
        require_columns(obs, [columns.pert_col, columns.context_col, columns.batch_col], where)
        rows = np.arange(len(obs), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        return cls(
            rows=rows,
            pert=columns.perturbations(obs)[rows],
            context=columns.contexts(obs)[rows],
            batch=columns.batches(obs)[rows],
            control_label=columns.control_label,
            where=where,
        )

    def __len__(self) -> int:
        return int(self.rows.size)

    @property
    def is_control(self) -> np.ndarray:
        return self.pert == self.control_label

    def subset(self, mask: np.ndarray) -> CellLabels:
        """Labels of the rows where ``mask`` (aligned with :attr:`rows`) is True."""
        return CellLabels(
            self.rows[mask],
            self.pert[mask],
            self.context[mask],
            self.batch[mask],
            self.control_label,
            self.where,
        )

    def groups(self, include_controls: bool = False) -> dict[tuple[str, str], np.ndarray]:
        """(context, perturbation) -> global rows, sorted by key; controls only if asked."""
        keep = np.ones(len(self), bool) if include_controls else ~self.is_control
        df = pd.DataFrame({"c": self.context[keep], "p": self.pert[keep], "r": self.rows[keep]})
        return {
            (str(c), str(p)): g["r"].to_numpy(np.int64) for (c, p), g in df.groupby(["c", "p"], sort=True)
        }

    def control_rows(self) -> dict[str, np.ndarray]:
        """context -> global rows of its control cells."""
        m = self.is_control
        df = pd.DataFrame({"c": self.context[m], "r": self.rows[m]})
        return {str(c): g["r"].to_numpy(np.int64) for c, g in df.groupby("c", sort=True)}

    def control_rows_by_batch(self) -> dict[tuple[str, str], np.ndarray]:
        """(context, batch) -> global rows of control cells."""
        m = self.is_control
        df = pd.DataFrame({"c": self.context[m], "b": self.batch[m], "r": self.rows[m]})
        return {
            (str(c), str(b)): g["r"].to_numpy(np.int64) for (c, b), g in df.groupby(["c", "b"], sort=True)
        }


class ControlMatcher:
    """Draws matched control rows for perturbed rows (see the module docstring for the rules).

    Parameters
    ----------
    labels
        Labels of the cells that may be drawn as controls *and* of the perturbed cells to match
        (typically the training rows).
    strategy
        ``"random"`` or ``"batch"``.
    """

    def __init__(self, labels: CellLabels, strategy: str = "random") -> None:
        if strategy not in MATCH_STRATEGIES:
            msg = f"control matching strategy: expected one of {MATCH_STRATEGIES}, got {strategy!r}"
            raise ConfigError(msg)
        self.strategy = strategy
        self.labels = labels
        self.by_context = labels.control_rows()
        self.by_batch = labels.control_rows_by_batch() if strategy == "batch" else {}
        pert_ctx = np.unique(labels.context[~labels.is_control])
        missing = [c for c in pert_ctx if c not in self.by_context]
        if missing:
            counts = {c: int(((labels.context == c) & ~labels.is_control).sum()) for c in missing}
            shown = ", ".join(f"{c!r} ({n} perturbed cells)" for c, n in counts.items())
            msg = (
                f"{labels.where}: context(s) without control cells ({labels.control_label!r}): {shown}; "
                "every context with perturbed cells needs controls to match against"
            )
            raise InputError(msg)
        self.fallback_batches: set[tuple[str, str]] = set()
        if strategy == "batch":
            pert = ~labels.is_control
            for c, b in sorted(set(zip(labels.context[pert], labels.batch[pert], strict=True))):
                if (c, b) not in self.by_batch:
                    self.fallback_batches.add((str(c), str(b)))
            if self.fallback_batches:
                fb = sorted(self.fallback_batches)
                shown = ", ".join(f"batch {b!r} of context {c!r}" for c, b in fb[:10])
                shown += f" ... ({len(fb)} batches in all)" if len(fb) > 10 else ""
                warnings.warn(
                    f"{labels.where}: no control cells in {shown}; matching those cells to "
                    "controls of the whole context",
                    stacklevel=2,
                )
        # Flat pool table: pool k is flat[offset[k] : offset[k] + size[k]]; every labelled cell gets
        # the id of its pool (its (context, batch) pool, or its context's pool as fallback).
        keys: list[tuple[str, str]] = [(c, "") for c in self.by_context] + list(self.by_batch)
        pools = list(self.by_context.values()) + list(self.by_batch.values())
        kid = {k: i for i, k in enumerate(keys)}
        self._flat = np.concatenate(pools) if pools else np.zeros(0, np.int64)
        self._size = np.array([p.size for p in pools], dtype=np.int64)
        self._offset = (
            np.concatenate([[0], np.cumsum(self._size)[:-1]]).astype(np.int64) if pools else self._size
        )
        code = np.full(len(labels), -1, dtype=np.int64)
        for i, (c, b) in enumerate(zip(labels.context, labels.batch, strict=True)):
            k = kid.get((c, b)) if strategy == "batch" else None
            code[i] = k if k is not None else kid.get((c, ""), -1)
        self._code = code
        order = np.argsort(labels.rows, kind="stable")
        self._sorted_rows = labels.rows[order]
        self._order = order

    def pool(self, context: str, batch: str) -> np.ndarray:
        """The control rows a cell of (context, batch) is matched against."""
        if self.strategy == "batch":
            rows = self.by_batch.get((context, batch))
            if rows is not None:
                return rows
        rows = self.by_context.get(context)
        if rows is None:
            msg = f"{self.labels.where}: context {context!r} has no control cells"
            raise InputError(msg)
        return rows

    def sample(self, rows: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One control row per entry of ``rows`` (global ids present in ``labels``), same order.

        Each cell draws ``rng.integers(0, len(pool))`` for its own pool (one vectorised call over
        all cells, in the order given): uniform, with replacement.
        """
        rows = np.asarray(rows, dtype=np.int64)
        at = np.searchsorted(self._sorted_rows, rows)
        at = np.minimum(at, max(self._sorted_rows.size - 1, 0))
        bad = (
            (self._sorted_rows.size == 0) | (self._sorted_rows[at] != rows)
            if rows.size
            else np.zeros(0, bool)
        )
        if np.any(bad):
            msg = f"{self.labels.where}: row {int(rows[np.argmax(bad)])} is not among the matcher's rows"
            raise InputError(msg)
        code = self._code[self._order[at]]
        if np.any(code < 0):
            c = self.labels.context[self._order[at][np.argmax(code < 0)]]
            msg = f"{self.labels.where}: context {c!r} has no control cells"
            raise InputError(msg)
        draw = rng.integers(0, self._size[code]) if rows.size else np.zeros(0, np.int64)
        return self._flat[self._offset[code] + draw]


def match_controls(
    obs: pd.DataFrame,
    columns: ObsColumns,
    strategy: str = "random",
    seed: int = 0,
    rows: np.ndarray | None = None,
    where: str = "data",
) -> np.ndarray:
    """For every row in ``rows`` (default all), a matched control row (global id); controls too.

    Convenience wrapper over :class:`ControlMatcher` with ``np.random.default_rng(seed)``.
    """
    labels = CellLabels.from_obs(obs, columns, rows, where)
    return ControlMatcher(labels, strategy).sample(labels.rows, np.random.default_rng(seed))
