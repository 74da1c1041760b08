"""``celltwin train`` on files, streamed: the split's datasets read lazily, bounded memory at any size.

Training data (:func:`open_training_data`): the split TOML's ``[datasets]`` (each value one
``.h5ad``, a folder or a glob; several datasets allowed), or ``--data`` for a one-dataset split.
The files are read lazily as one :class:`~celltwin.data.dataset.CellDataset` (genes aligned by
name, global labels); the split is resolved dataset by dataset (:func:`resolve_dataset_split`).
A split may hold out nothing: every cell then trains, and ``celltwin predict --counts`` names
what to predict.

``celltwin predict`` on files is :mod:`celltwin.predict_files` (what to predict, from which
controls) and :mod:`celltwin.predict_stream` (the streamed prediction loop, shared with ``Model.predict``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError

__all__ = [
    "DatasetSplit",
    "open_training_data",
    "resolve_dataset_split",
    "train_from_files",
]


@dataclass
class DatasetSplit:
    """A split applied to a :class:`CellDataset`: training rows and the (context, perturbation) pairs held out."""

    train_rows: np.ndarray  # (n_train,) int64 sorted global rows
    test_pairs: list[tuple[str, str]]  # sorted (context, perturbation); controls never listed
    test_rows: np.ndarray  # perturbed test cells
    test_control_rows: np.ndarray


def open_training_data(split_path: str | Path, data: str | Path | None = None, columns=None, fallback=None):
    """``(CellDataset, Split)``: the split's datasets (or ``data`` for a one-dataset split), lazily.

    Column names (:func:`celltwin.data.columns.merge_columns`, field by field): ``columns`` (an
    ``ObsColumns`` is used as is; a mapping holds the names given on the command line), then the
    split's ``[columns]`` table, then ``fallback`` (e.g. the run's columns), then the defaults.
    """
    from celltwin.data.columns import merge_columns
    from celltwin.data.dataset import CellDataset, DatasetFiles, expand_location
    from celltwin.data.split import read_split

    split = read_split(split_path)
    columns = merge_columns(columns, split.columns, fallback)
    if data is not None:
        if len(split.datasets) != 1:
            msg = (f"--data: the split {split_path} names {len(split.datasets)} datasets "
                   f"({', '.join(split.datasets)}); leave --data out to read the split's own [datasets]")
            raise ConfigError(msg)
        name = next(iter(split.datasets))
        entries = [DatasetFiles(name, tuple(expand_location(data, f"--data {data}")))]
    else:
        entries = [DatasetFiles(n, tuple(expand_location(split.dataset_path(n), f"{split_path} [datasets] {n}")))
                   for n in split.datasets]
    return CellDataset.from_files(entries, columns), split


def resolve_dataset_split(dataset, split, zeroshot_controls_in_train: bool = False,
                          require_test: bool = False) -> DatasetSplit:
    """Resolve ``split`` on every dataset of ``dataset`` (see :func:`celltwin.data.split.resolve_split`)."""
    from celltwin.data.columns import ObsColumns
    from celltwin.data.dataset import DATASET_COL
    from celltwin.data.split import resolve_split

    canon = ObsColumns(PERT_COL, CONTROL_LABEL, CONTEXT_COL, None)
    ds_names = dataset.obs[DATASET_COL].to_numpy(dtype=object)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("train", "test", "test_controls")}
    for name in split.datasets:
        rows = np.flatnonzero(ds_names == name)
        if rows.size == 0:
            continue
        obs = dataset.obs.iloc[rows]
        where = ", ".join(sorted({dataset.sources[int(k)].name for k in np.unique(obs["_file"])}))
        idx = resolve_split(split, obs, canon, dataset=name, where=where,
                            zeroshot_controls_in_train=zeroshot_controls_in_train)
        for k in parts:
            parts[k].append(rows[getattr(idx, k)])
    cat = {k: (np.sort(np.concatenate(v)) if v else np.zeros(0, np.int64)) for k, v in parts.items()}
    pert = dataset.obs[PERT_COL].to_numpy(dtype=object)
    ctx = dataset.obs[CONTEXT_COL].to_numpy(dtype=object)
    t = cat["test"]
    pairs = sorted({(str(ctx[i]), str(pert[i])) for i in t if pert[i] != CONTROL_LABEL})
    if require_test and not pairs:
        msg = f"split {split.path}: no test perturbation in {dataset.name} (the split holds out nothing to predict)"
        raise InputError(msg)
    return DatasetSplit(cat["train"], pairs, t, cat["test_controls"])


def train_from_files(model: str, data: str | Path | None, split: str | Path, out: str | Path, *, seed: int = 0,
                     options=None, columns=None, inputs=None,
                     zeroshot_controls_in_train: bool = False) -> dict:
    """``celltwin train``: train ``model`` on the split's training cells, read from disk block by block.

    ``options``: the model's typed options or a mapping of ``--set`` strings (see :func:`celltwin.runs.train_run`).
    """
    from celltwin._provenance import utc_now
    from celltwin.registry import get_spec
    from celltwin.runs import train_run

    started_at = utc_now()  # run.json's started_at: before the data are opened
    options = get_spec(model).parse_options(options)  # unknown models and bad options fail before any reading
    dataset, sp = open_training_data(split, data, columns)
    rs = resolve_dataset_split(dataset, sp, zeroshot_controls_in_train)
    if rs.train_rows.size == 0:
        msg = f"split {split}: selects 0 training cells in {dataset.name}"
        raise InputError(msg)
    extra = {"data": [str(f) for f in dataset.files], "split": str(split), "columns": dataset.columns.to_dict(),
             "test_pairs": [list(p) for p in rs.test_pairs],
             "zeroshot_controls_in_train": bool(zeroshot_controls_in_train)}
    return train_run(model, dataset, out, seed=seed, options=options, extra_meta=extra, rows=rs.train_rows,
                     inputs=inputs, input_files=[("split", str(split))], started_at=started_at)
