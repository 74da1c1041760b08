"""Train / val / test splits in the TOML format used by cell-load / STATE, and their resolution.

Drawing a new split around a target context (``celltwin split``) is :mod:`celltwin.data.split_draw`.

File format (as publicly documented for STATE's ``state tx train``)::

    [datasets]                # dataset name -> data location (celltwin: an .h5ad file; a relative
    replogle = "data.h5ad"    # path is relative to the TOML file's folder)

    [training]                # datasets whose contexts are training data unless overridden below
    replogle = "train"

    [zeroshot]                # whole contexts held out: "dataset.context" = "val" | "test"
    "replogle.jurkat" = "test"

    [fewshot]                 # perturbations held out inside a context
    [fewshot."replogle.k562"]
    val = ["GENE1"]
    test = ["GENE2", "GENE3"]

    [columns]                 # celltwin only, optional: the data's obs columns and control label
    pert_col = "gene"         # (keys pert_col, control_label, context_col, batch_col; written by
    control_label = "control" # `celltwin split`, read by train / predict / score when the command
    context_col = "day"       # line does not name them; a flag wins over the table)

A key ``"dataset.context"`` is split at the first dot: dataset names cannot contain dots, context
names can. Differences from cell-load: a ``[datasets]`` value names one ``.h5ad`` file (not a
folder of files); celltwin accepts only ``"train"`` as a ``[training]`` value. ``[columns]`` is
celltwin's: a split without it (every cell-load / STATE TOML) uses the default column names; with
several datasets it applies to each of them.

Resolution (:func:`resolve_split`) assigns each cell of one dataset:

* zero-shot context with value v: perturbed cells -> v; its control cells -> ``v_controls`` only
  (they are never training data by default: the only cells of that context a model sees are its
  controls, as prediction inputs; ``zeroshot_controls_in_train=True`` also puts them in train);
* few-shot context: cells of the listed perturbations -> val / test; every other perturbed cell
  *and all control cells* of the context -> train; the same control cells are also returned as
  ``val_controls`` / ``test_controls`` (the basal inputs and the evaluator's control reference);
* any other context of a dataset listed in ``[training]``: every cell -> train;
* contexts of datasets not in ``[training]`` and not named in an override: unused.
"""

from __future__ import annotations

import json
import os
import tomllib
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from celltwin._io import atomic_path
from celltwin.data.columns import COLUMN_FIELDS, ObsColumns, require_columns
from celltwin.errors import ConfigError, InputError

__all__ = ["Split", "SplitIndices", "read_split", "resolve_split", "split_key"]

_ROLES = ("val", "test")


def split_key(dataset: str, context: str) -> str:
    """The ``"dataset.context"`` key of a zero-shot / few-shot entry."""
    return f"{dataset}.{context}"


def _parse_key(key: str, datasets: dict[str, str], where: str) -> tuple[str, str]:
    ds, sep, ctx = key.partition(".")
    if not sep or not ctx:
        msg = f'{where}: key {key!r} must be "dataset.context"'
        raise ConfigError(msg)
    if ds not in datasets:
        known = ", ".join(datasets) or "none"
        msg = f"{where}: key {key!r} names dataset {ds!r}, which is not in [datasets] ({known})"
        raise ConfigError(msg)
    return ds, ctx


@dataclass
class Split:
    """A split file's content. ``path`` (where it was read from) anchors relative dataset paths."""

    datasets: dict[str, str]
    training: dict[str, str] = field(default_factory=dict)
    zeroshot: dict[str, str] = field(default_factory=dict)
    fewshot: dict[str, dict[str, list[str]]] = field(default_factory=dict)
    path: Path | None = None
    comment: str = ""
    #: the ``[columns]`` table: obs column names / control label recorded by ``celltwin split``
    #: (keys of :data:`~celltwin.data.columns.COLUMN_FIELDS`; absent keys: the defaults)
    columns: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = str(self.path) if self.path else "split"
        if not isinstance(self.columns, dict):
            msg = f"{where}: [columns] must be a table of names, got {type(self.columns).__name__}"
            raise ConfigError(msg)
        unknown = sorted(set(self.columns) - set(COLUMN_FIELDS))
        if unknown:
            msg = f"{where}: [columns] unknown key(s) {', '.join(unknown)}; expected {', '.join(COLUMN_FIELDS)}"
            raise ConfigError(msg)
        bad = [k for k, v in self.columns.items() if not isinstance(v, str) or not v]
        if bad:
            msg = f"{where}: [columns] values must be non-empty strings; not for {', '.join(bad)}"
            raise ConfigError(msg)
        self.columns = {k: self.columns[k] for k in COLUMN_FIELDS if k in self.columns}
        for name in self.datasets:
            if "." in name or not name:
                msg = f"{where}: [datasets] name {name!r} must be non-empty and contain no '.'"
                raise ConfigError(msg)
        for name, v in self.training.items():
            if name not in self.datasets:
                known = ", ".join(self.datasets)
                msg = f"{where}: [training] names dataset {name!r}, not in [datasets] ({known})"
                raise ConfigError(msg)
            if v != "train":
                msg = f'{where}: [training] {name} = {v!r}; expected "train"'
                raise ConfigError(msg)
        for key, v in self.zeroshot.items():
            _parse_key(key, self.datasets, f"{where}: [zeroshot]")
            if v not in _ROLES:
                msg = f'{where}: [zeroshot] {key!r} = {v!r}; expected "val" or "test"'
                raise ConfigError(msg)
        for key, entry in self.fewshot.items():
            _parse_key(key, self.datasets, f"{where}: [fewshot]")
            if key in self.zeroshot:
                msg = f"{where}: context {key!r} is in both [zeroshot] and [fewshot]"
                raise ConfigError(msg)
            if not isinstance(entry, dict) or set(entry) - set(_ROLES):
                got = sorted(entry) if isinstance(entry, dict) else type(entry).__name__
                msg = f"{where}: [fewshot.{json.dumps(key)}] expects only 'val' and 'test' lists, got {got}"
                raise ConfigError(msg)
            for role in _ROLES:
                vals = entry.setdefault(role, [])
                if not isinstance(vals, list) or not all(isinstance(x, str) for x in vals):
                    msg = f"{where}: [fewshot.{json.dumps(key)}] {role} must be a list of strings"
                    raise ConfigError(msg)
            both = sorted(set(entry["val"]) & set(entry["test"]))
            if both:
                msg = (
                    f"{where}: [fewshot.{json.dumps(key)}] perturbation(s) in both val and test: "
                    f"{', '.join(both)}"
                )
                raise ConfigError(msg)

    def dataset_path(self, name: str) -> Path:
        """The file of dataset ``name``; relative paths are taken from the split file's folder."""
        if name not in self.datasets:
            msg = f"{self.path or 'split'}: dataset {name!r} not in [datasets] ({', '.join(self.datasets)})"
            raise ConfigError(msg)
        p = Path(self.datasets[name])
        if not p.is_absolute() and self.path is not None:
            p = Path(self.path).parent / p
        return p

    def to_toml(self) -> str:
        """TOML text of the split (strings and keys written as JSON-escaped basic strings)."""
        q = json.dumps
        lines: list[str] = []
        if self.comment:
            lines += [f"# {ln}" for ln in self.comment.splitlines()] + [""]
        lines.append("[datasets]")
        lines += [f"{q(k)} = {q(v)}" for k, v in self.datasets.items()]
        if self.columns:
            lines += ["", "[columns]  # the data's obs columns (celltwin; command-line flags win)"]
            lines += [f"{k} = {q(v)}" for k, v in self.columns.items()]
        lines += ["", "[training]"]
        lines += [f"{q(k)} = {q(v)}" for k, v in self.training.items()]
        lines += ["", "[zeroshot]"]
        lines += [f"{q(k)} = {q(v)}" for k, v in self.zeroshot.items()]
        lines += ["", "[fewshot]"]
        for k, entry in self.fewshot.items():
            lines += ["", f"[fewshot.{q(k)}]"]
            for role in _ROLES:
                lines.append(f"{role} = [{', '.join(q(x) for x in entry.get(role, []))}]")
        return "\n".join(lines) + "\n"

    def obs_columns(self) -> ObsColumns | None:
        """The ``[columns]`` table as :class:`ObsColumns` (defaults for absent keys); None without one."""
        return ObsColumns.from_dict(self.columns) if self.columns else None

    def write(self, path: str | os.PathLike[str]) -> None:
        """Write the TOML file atomically."""
        with atomic_path(path) as tmp:
            Path(tmp).write_text(self.to_toml(), encoding="utf-8")


def read_split(path: str | os.PathLike[str]) -> Split:
    """Parse a split TOML file; InputError / ConfigError (naming the file) on any bad content.

    InputError: the file is missing, not a regular file, unreadable, or not UTF-8 text.
    ConfigError: invalid TOML, or TOML that is not a split (unknown or mistyped sections / values).
    """
    p = Path(path)
    if not p.exists():
        msg = f"{p}: split file not found"
        raise InputError(msg)
    if not p.is_file():
        msg = f"{p}: expected a split .toml file, got a directory or special file"
        raise InputError(msg)
    try:
        raw = p.read_bytes()
    except OSError as e:
        msg = f"{p}: cannot read the split file ({e.strerror or e})"
        raise InputError(msg) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = raw[e.start : e.start + 1]
        msg = f"{p}: not a UTF-8 text file (byte {e.start}: {bad!r}); expected a split .toml"
        raise InputError(msg) from None
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        msg = f"{p}: invalid TOML ({e})"
        raise ConfigError(msg) from e
    except (ValueError, RecursionError) as e:  # e.g. deeply nested arrays
        msg = f"{p}: invalid TOML ({type(e).__name__}: {e})"
        raise ConfigError(msg) from None
    unknown = sorted(set(doc) - {"datasets", "training", "zeroshot", "fewshot", "columns"})
    if unknown:
        msg = (f"{p}: unknown section(s) {', '.join(unknown)}; expected datasets, training, zeroshot, fewshot "
               "(and celltwin's columns)")
        raise ConfigError(msg)
    for sec in ("datasets", "training", "zeroshot", "fewshot", "columns"):
        if sec in doc and not isinstance(doc[sec], dict):
            msg = f"{p}: [{sec}] must be a table (section), got {type(doc[sec]).__name__} {doc[sec]!r:.60}"
            raise ConfigError(msg)
    if not doc.get("datasets"):
        msg = f"{p}: [datasets] is missing or empty"
        raise ConfigError(msg)
    for sec in ("datasets", "training", "zeroshot", "columns"):
        bad = [k for k, v in doc.get(sec, {}).items() if not isinstance(v, str)]
        if bad:
            msg = f"{p}: [{sec}] values must be strings; not for {', '.join(bad)}"
            raise ConfigError(msg)
    fewshot: dict = {}
    for k, e in doc.get("fewshot", {}).items():
        if not isinstance(e, dict):
            got = type(e).__name__
            msg = f"{p}: [fewshot.{json.dumps(k)}] must be a table with 'val' / 'test' lists, got {got}"
            raise ConfigError(msg)
        for r, v in e.items():
            if not isinstance(v, list):
                msg = f"{p}: [fewshot.{json.dumps(k)}] {r} must be a list of strings, got {type(v).__name__}"
                raise ConfigError(msg)
        fewshot[k] = {r: list(v) for r, v in e.items()}
    return Split(
        datasets=dict(doc["datasets"]),
        training=dict(doc.get("training", {})),
        zeroshot=dict(doc.get("zeroshot", {})),
        fewshot=fewshot,
        path=p,
        columns=dict(doc.get("columns", {})),
    )


@dataclass
class SplitIndices:
    """Global row ids (sorted int64) of each part of a resolved split (see module docstring)."""

    train: np.ndarray
    val: np.ndarray
    test: np.ndarray
    val_controls: np.ndarray
    test_controls: np.ndarray

    def summary(self) -> dict[str, int]:
        return {
            k: int(getattr(self, k).size) for k in ("train", "val", "test", "val_controls", "test_controls")
        }


def resolve_split(
    split: Split,
    obs: pd.DataFrame,
    columns: ObsColumns,
    dataset: str | None = None,
    where: str = "data",
    zeroshot_controls_in_train: bool = False,
) -> SplitIndices:
    """Assign the cells of one dataset (its ``obs``) to train / val / test (+ control sets).

    ``dataset`` defaults to the split's only dataset. Raises :class:`InputError` when the split
    names a context absent from ``obs``, a few-shot perturbation absent from its context, or a
    held-out context without control cells.
    """
    if dataset is None:
        if len(split.datasets) != 1:
            known = ", ".join(split.datasets)
            msg = f"{split.path or 'split'}: several datasets ({known}); say which one to resolve"
            raise ConfigError(msg)
        dataset = next(iter(split.datasets))
    elif dataset not in split.datasets:
        msg = f"{split.path or 'split'}: dataset {dataset!r} not in [datasets] ({', '.join(split.datasets)})"
        raise ConfigError(msg)
    require_columns(obs, [columns.pert_col, columns.context_col], where)
    sp_where = str(split.path or "split")
    pert = columns.perturbations(obs)
    ctx = columns.contexts(obs)
    is_ctrl = pert == columns.control_label
    known_ctx = set(np.unique(ctx))

    def ctx_of(key: str) -> str | None:
        ds, c = _parse_key(key, split.datasets, sp_where)
        if ds != dataset:
            return None
        if c not in known_ctx:
            col = columns.context_col or "(no context column: the one context is 'all')"
            msg = (
                f"{sp_where}: context {c!r} (key {key!r}) not found in {where} column {col}; "
                f"available: {', '.join(sorted(known_ctx))}"
            )
            raise InputError(msg)
        if not (is_ctrl & (ctx == c)).any():
            msg = f"{where}: held-out context {c!r} has no control cells ({columns.control_label!r})"
            raise InputError(msg)
        return c

    n = len(obs)
    role = np.full(n, "", dtype=object)  # "", train, val, test, val_controls, test_controls
    if dataset in split.training:
        role[:] = "train"
    extra_val_ctrl = np.zeros(n, bool)
    extra_test_ctrl = np.zeros(n, bool)
    for key, v in split.zeroshot.items():
        c = ctx_of(key)
        if c is None:
            continue
        m = ctx == c
        role[m & ~is_ctrl] = v
        if zeroshot_controls_in_train:
            role[m & is_ctrl] = "train"
            (extra_val_ctrl if v == "val" else extra_test_ctrl)[m & is_ctrl] = True
        else:
            role[m & is_ctrl] = f"{v}_controls"
    for key, entry in split.fewshot.items():
        c = ctx_of(key)
        if c is None:
            continue
        m = ctx == c
        present = set(np.unique(pert[m & ~is_ctrl]))
        for r in _ROLES:
            missing = [p for p in entry[r] if p not in present]
            if missing:
                msg = (
                    f"{sp_where}: [fewshot.{json.dumps(key)}] {r} perturbation(s) with no cells in context "
                    f"{c!r} of {where}: {', '.join(missing)}"
                )
                raise InputError(msg)
        role[m] = "train"
        for r in _ROLES:
            role[m & np.isin(pert, entry[r])] = r
        if entry["val"]:
            extra_val_ctrl |= m & is_ctrl
        if entry["test"]:
            extra_test_ctrl |= m & is_ctrl

    def rows(mask: np.ndarray) -> np.ndarray:
        return np.flatnonzero(mask).astype(np.int64)

    out = SplitIndices(
        train=rows(role == "train"),
        val=rows(role == "val"),
        test=rows(role == "test"),
        val_controls=rows((role == "val_controls") | extra_val_ctrl),
        test_controls=rows((role == "test_controls") | extra_test_ctrl),
    )
    if out.train.size == 0:
        warnings.warn(f"{sp_where}: no training cells in dataset {dataset!r} of {where}", stacklevel=2)
    return out
