"""Run directories: train a registered model into one (:func:`train_run`), read one back.

A run directory ``RUN/`` (what ``celltwin train -o RUN`` and ``Model.save(RUN)`` write) holds
``run.json`` (``{"model": NAME, "celltwin_version", "preprocess", "inputs", "options", "seed",
"data_fingerprint", ...}`` plus the provenance of :func:`celltwin._provenance.run_provenance`:
``package_versions``, ``git_revision``, ``argv``, ``started_at`` / ``finished_at``, ``host``,
``data_fingerprints`` of every input file and the ``precision`` a torch model trained in), ``genes.txt`` (the run's *output* genes), ``preprocess.json``,
``inputs.json`` (+ ``input_genes.txt`` for ``--hvg`` with output ``all``) and the model's files.

Model space: :class:`celltwin.data.preprocess.Preprocessing` fitted on the training cells
(``log1p(normalize_total(X, target_sum=T))`` in float32, ``T`` the median library size of the
training cells; a file that is not integer-valued is taken as already log-normalised and passed
through), applied again at predict time to the control cells.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from celltwin import __version__
from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin._io import atomic_path
from celltwin.errors import InputError
from celltwin.registry import get_spec

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from celltwin.options import Options

__all__ = ["Predictor", "TrainRequest", "load_predictor", "read_run", "train_run"]


class Predictor(Protocol):
    """What a registry ``load_fn`` returns.

    ``predict(controls (n, G) float32 log1p model space, perturbation, context, rng) -> (n, G)``:
    predicted perturbed cells aligned with the given control cells. Optional: ``describe(perturbation,
    context) -> str`` (``"model"`` / ``"fallback:cell-mean"``, recorded in the prediction's uns),
    ``output_names`` (the predicted columns when they are not ``genes``) and an ``inputs=`` keyword
    of ``predict`` (the control cells' ``obsm`` rows of an ``--embed-key`` run).
    """

    genes: list[str]

    def predict(self, controls: np.ndarray, perturbation: str, context: str | None,
                rng: np.random.Generator) -> np.ndarray: ...


@dataclass
class TrainRequest:
    """What a model's train function receives.

    ``data``: a :class:`celltwin.data.dataset.CellDataset` (one or more files or an in-memory
    AnnData, read lazily; canonical labels in ``data.obs``); ``rows``: the training cells (sorted
    global row ids). Models read what they need block by block (``data.read_model(rows,
    preprocess)``): nothing holds a dense matrix of all training cells.
    ``preprocess``: the run's :class:`celltwin.data.preprocess.Preprocessing`; its ``genes`` are the
    run's *output* genes (what ``celltwin predict`` writes).
    ``input_genes``: the genes a model reads as input when they differ from the output genes
    (``--hvg N`` with output space ``all``), else ``None``. ``embed_key``: read the input from
    ``obsm[embed_key]`` instead (``--embed-key``). ``output_space``: ``gene`` | ``all`` |
    ``embedding`` (see :class:`celltwin.data.inputs.InputConfig`).
    ``options``: the model's typed options (:meth:`celltwin.registry.ModelSpec.parse_options`).
    """

    model: str
    data: Any  # celltwin.data.dataset.CellDataset
    rows: np.ndarray
    run_dir: Path
    preprocess: Any
    options: Options
    seed: int = 0
    input_genes: list[str] | None = None
    embed_key: str | None = None
    output_space: str = "gene"
    fingerprint: dict = field(default_factory=dict)  # data files + rows + preprocessing (resume checks)

    @property
    def obs(self) -> pd.DataFrame:
        """Canonical labels of the training cells (``PERT_COL``, ``CONTEXT_COL``, ``BATCH_COL``, ...)."""
        return self.data.obs.iloc[self.rows]

    @property
    def genes(self) -> list[str]:
        return list(self.preprocess.genes)


def read_run(run_dir: str | Path) -> tuple[dict, list[str]]:
    """``(run.json content, genes)`` of a run directory, with clear errors when incomplete."""
    run_dir = Path(run_dir)
    meta_path, genes_path = run_dir / "run.json", run_dir / "genes.txt"
    for p in (meta_path, genes_path):
        if not p.exists():
            msg = f"run {run_dir}: {p.name} not found (expected a directory written by `celltwin train`)"
            raise InputError(msg)
    meta = json.loads(meta_path.read_text())
    genes = [g for g in genes_path.read_text().splitlines() if g]
    return meta, genes


def load_predictor(run_dir: str | Path) -> Predictor:
    """Load the predictor of any registered model from its run directory."""
    meta, _ = read_run(run_dir)
    return get_spec(str(meta.get("model"))).load_fn()(Path(run_dir))


def train_run(model: str, data, run_dir: str | Path, seed: int = 0, options: Any = None,
              extra_meta: dict | None = None, n_top_genes: int | None = None, rows: np.ndarray | None = None,
              inputs=None, input_files: Sequence[tuple[str, str]] = (), started_at: str | None = None) -> dict:
    """Fit the preprocessing on the training cells, train ``model``, write the run.

    ``data``: an AnnData with canonical obs (``PERT_COL``, ``CONTEXT_COL``; every cell trains) or a
    :class:`celltwin.data.dataset.CellDataset` with ``rows`` (default: every cell). X may hold
    counts or log-normalised values (see the module docstring). ``options``: the model's typed
    options, or a mapping of ``--set`` strings / typed values (the model's options dataclass
    converts and checks them). ``inputs``: a :class:`celltwin.data.inputs.InputConfig` (``--hvg``,
    ``--embed-key``, ``--output-space``); ``n_top_genes`` is the older spelling of
    ``InputConfig(hvg=N, output_space="gene")``.
    Everything is read block by block (totals, HVG statistics, the models' own passes).
    Writes ``preprocess.json``, ``genes.txt`` (output genes), ``input_genes.txt`` (when the input
    genes differ), the model files and ``run.json``; returns run.json's content.

    Provenance (:mod:`celltwin._provenance`): ``input_files`` (``(role, path)`` pairs, e.g. the
    split file) are fingerprinted with the data files and the option values naming files;
    ``started_at`` (UTC ISO) defaults to now. A model's ``train_fn`` may return ``precision`` (the
    autocast precision it trained in) and ``device`` (recorded as ``host.torch_device``).
    """
    from celltwin._provenance import option_files, run_provenance, utc_now

    started_at = started_at or utc_now()
    from celltwin.data.dataset import CellDataset
    from celltwin.data.inputs import InputConfig, fit_inputs

    spec = get_spec(model)
    opts = spec.parse_options(options)  # bad options fail before any reading
    train_fn = spec.train_fn()
    run_dir = Path(run_dir)
    if not isinstance(data, CellDataset):
        for col in (PERT_COL, CONTEXT_COL):
            if col not in data.obs:
                msg = f"training data: obs[{col!r}] missing (expected canonical columns; see celltwin.runs)"
                raise InputError(msg)
        data = CellDataset.from_anndata(data)
    rows = np.arange(data.n_obs, dtype=np.int64) if rows is None else np.sort(np.asarray(rows, dtype=np.int64))
    if rows.size == 0:
        msg = "training data: the split selects 0 training cells"
        raise InputError(msg)
    if inputs is None:
        inputs = InputConfig(hvg=n_top_genes, output_space="gene" if n_top_genes else "")
    fitted = fit_inputs(data, rows, inputs, model)
    pre = fitted.preprocess
    run_dir.mkdir(parents=True, exist_ok=True)
    req = TrainRequest(model=model, data=data, rows=rows, run_dir=run_dir, preprocess=pre, options=opts, seed=seed,
                       input_genes=fitted.input_genes, embed_key=inputs.embed_key,
                       output_space=fitted.output_space, fingerprint=fitted.fingerprint)
    extra = dict(train_fn(req) or {})
    device = extra.pop("device", None)
    pre.save(run_dir)
    fitted.save(run_dir)
    meta = {
        "model": model,
        "celltwin_version": __version__,
        "preprocess": pre.to_dict(),
        "inputs": fitted.to_dict(),
        "control_label": CONTROL_LABEL,
        "n_train_cells": int(rows.size),
        "n_genes": len(pre.genes),
        "seed": seed,
        "options": opts.changes(),
        "data_fingerprint": fitted.fingerprint,
        **(extra_meta or {}),
        **extra,
    }
    files = [("data", str(f)) for f in getattr(data, "files", [])] + list(input_files) + option_files(opts)
    meta.update(run_provenance(started_at=started_at, device=device, precision=extra.get("precision"),
                               files=files))
    with atomic_path(run_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return meta
