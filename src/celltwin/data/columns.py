"""Which obs columns mean what, and the parsing of perturbation labels.

Users name their columns (perturbation, control label, context, batch); the defaults come from
:mod:`celltwin._constants`. :func:`require_columns` turns a missing column into an
:class:`~celltwin.errors.InputError` that names the file, the column and the columns present.

Where the names come from (``celltwin train`` / ``predict`` / ``score``), field by field, first
found wins (:func:`merge_columns`): the command line flags, the split TOML's ``[columns]`` table
(written by ``celltwin split``), the run's ``run.json`` (predict), then the defaults
``target_gene`` / ``non-targeting`` / ``context`` / ``batch``. The default context and batch
columns are optional: absent from a file, the file is one context (one batch) named ``"all"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd

from celltwin._constants import BATCH_COL, COMBO_SEP, CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError

__all__ = [
    "COLUMN_FIELDS",
    "ObsColumns",
    "column_values",
    "merge_columns",
    "parse_perturbation",
    "require_columns",
    "resolve_columns",
]

#: the fields of :class:`ObsColumns`, in order (also the keys of a split TOML's ``[columns]`` table)
COLUMN_FIELDS = ("pert_col", "control_label", "context_col", "batch_col")

# Label used for the single context / batch of a dataset that has no such column.
DEFAULT_LEVEL = "all"


def parse_perturbation(
    label: str, control_label: str = CONTROL_LABEL, sep: str = COMBO_SEP
) -> tuple[str, ...]:
    """Split a perturbation label into its target genes.

    ``"A+B" -> ("A", "B")``, ``"A" -> ("A",)``, the control label -> ``()``. Surrounding
    whitespace of each part is stripped and empty parts are dropped (``"A+"`` -> ``("A",)``); the
    order of the parts is kept as written (``"B+A"`` stays ``("B", "A")``).
    """
    label = str(label)
    if label == control_label:
        return ()
    return tuple(p.strip() for p in label.split(sep) if p.strip())


def require_columns(obs: pd.DataFrame, columns: Iterable[str | None], where: str) -> None:
    """Raise :class:`InputError` when any of ``columns`` (``None`` entries ignored) is not in ``obs``.

    ``where`` names the source (a file path or ``"<in-memory AnnData>"``) in the message, which
    also lists the columns that are present.
    """
    missing = [c for c in columns if c is not None and c not in obs.columns]
    if missing:
        avail = ", ".join(map(str, obs.columns)) or "(none)"
        msg = f"{where}: obs column(s) {', '.join(map(repr, missing))} not found; available columns: {avail}"
        raise InputError(msg)


def column_values(obs: pd.DataFrame, column: str | None, n: int | None = None) -> np.ndarray:
    """``obs[column]`` as a numpy array of ``str``; ``"all"`` everywhere when ``column`` is None."""
    if column is None:
        return np.full(len(obs) if n is None else n, DEFAULT_LEVEL, dtype=object)
    return obs[column].astype(str).to_numpy(dtype=object)


@dataclass(frozen=True)
class ObsColumns:
    """Names of the obs columns a dataset uses.

    Attributes
    ----------
    pert_col
        Column with the perturbation label (combinations written ``A+B``).
    control_label
        Value of ``pert_col`` that marks control (basal) cells.
    context_col
        Column with the biological context (cell type / line / condition); ``None`` means the whole
        dataset is one context named ``"all"``.
    batch_col
        Column with the technical batch; ``None`` means one batch named ``"all"``.
    """

    pert_col: str = PERT_COL
    control_label: str = CONTROL_LABEL
    context_col: str | None = CONTEXT_COL
    batch_col: str | None = BATCH_COL

    def __post_init__(self) -> None:
        if not self.pert_col:
            raise ConfigError("ObsColumns.pert_col: expected a column name, got an empty string")
        if not self.control_label:
            raise ConfigError("ObsColumns.control_label: expected a label, got an empty string")

    def present(self, obs: pd.DataFrame) -> ObsColumns:
        """Copy with ``context_col`` / ``batch_col`` set to ``None`` when the column is absent.

        Use this when optional columns may be missing (the defaults ``context`` and ``batch`` are
        often not in a file); ``pert_col`` is always required.
        """
        ctx = self.context_col if self.context_col in obs.columns else None
        bat = self.batch_col if self.batch_col in obs.columns else None
        return ObsColumns(self.pert_col, self.control_label, ctx, bat)

    def check(self, obs: pd.DataFrame, where: str) -> None:
        """Raise :class:`InputError` if a named column is missing or no cell carries the control label."""
        require_columns(obs, [self.pert_col, self.context_col, self.batch_col], where)
        if not (obs[self.pert_col].astype(str) == self.control_label).any():
            labels = pd.unique(obs[self.pert_col].astype(str))[:10]
            msg = (
                f"{where}: no control cells: no row of obs[{self.pert_col!r}] equals the control label "
                f"{self.control_label!r}; first labels present: {', '.join(map(str, labels))}"
            )
            raise InputError(msg)

    def perturbations(self, obs: pd.DataFrame) -> np.ndarray:
        """``obs[pert_col]`` as a numpy array of ``str``."""
        return column_values(obs, self.pert_col)

    def contexts(self, obs: pd.DataFrame) -> np.ndarray:
        """``obs[context_col]`` as ``str`` (``"all"`` everywhere if ``context_col`` is None)."""
        return column_values(obs, self.context_col, len(obs))

    def batches(self, obs: pd.DataFrame) -> np.ndarray:
        """``obs[batch_col]`` as ``str`` (``"all"`` everywhere if ``batch_col`` is None)."""
        return column_values(obs, self.batch_col, len(obs))

    def is_control(self, obs: pd.DataFrame) -> np.ndarray:
        """Boolean mask of control cells."""
        return self.perturbations(obs) == self.control_label

    def to_dict(self) -> dict[str, str | None]:
        return {
            "pert_col": self.pert_col,
            "control_label": self.control_label,
            "context_col": self.context_col,
            "batch_col": self.batch_col,
        }

    @classmethod
    def from_dict(cls, d: dict) -> ObsColumns:
        return cls(**{k: d[k] for k in COLUMN_FIELDS if k in d})


def merge_columns(*layers: ObsColumns | Mapping[str, str | None] | None) -> ObsColumns | None:
    """Column names from ``layers``, highest priority first, field by field.

    A layer is ``None`` (skipped), a mapping of some :data:`COLUMN_FIELDS` (only the keys present
    count; a ``None`` value for ``context_col`` / ``batch_col`` means "no such column") or a
    complete :class:`ObsColumns` (every field set: lower layers are not looked at). Fields no layer
    sets take the :class:`ObsColumns` defaults. Returns ``None`` when no layer sets anything (the
    caller's own default then applies).
    """
    got: dict[str, str | None] = {}
    for layer in layers:
        if layer is None:
            continue
        d = layer.to_dict() if isinstance(layer, ObsColumns) else dict(layer)
        unknown = sorted(set(d) - set(COLUMN_FIELDS))
        if unknown:
            msg = f"column names: unknown field(s) {', '.join(unknown)}; expected {', '.join(COLUMN_FIELDS)}"
            raise ConfigError(msg)
        for k in COLUMN_FIELDS:
            if k in d and k not in got:
                got[k] = d[k]
        if isinstance(layer, ObsColumns):
            break
    return ObsColumns(**got) if got else None


def resolve_columns(obs: pd.DataFrame, columns: ObsColumns | None, where: str, *,
                    require_controls: bool = True) -> ObsColumns:
    """``columns`` (default ``ObsColumns()``) checked against one file's ``obs``.

    A context / batch column named explicitly (not the default) must exist; an absent default one
    is dropped (:meth:`ObsColumns.present`); the perturbation column must exist, and with
    ``require_controls`` some cell must carry the control label (:meth:`ObsColumns.check`).
    """
    cols = columns or ObsColumns()
    explicit = [c for c, d in ((cols.context_col, CONTEXT_COL), (cols.batch_col, BATCH_COL)) if c not in (None, d)]
    require_columns(obs, explicit, where)
    cols = cols.present(obs)
    if require_controls:
        cols.check(obs, where)
    else:
        require_columns(obs, [cols.pert_col], where)
    return cols
