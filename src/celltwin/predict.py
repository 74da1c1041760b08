"""The model registry, run directories, ``train_run`` and the in-memory prediction writer.

The file-level flows of ``celltwin train`` / ``celltwin predict`` (streamed from disk, several
files, bounded memory) are in :mod:`celltwin.pipeline`; this module holds what they share with
library use on an in-memory AnnData.

Registry contract (``MODELS``): a model name maps to ``("module:train_fn", "module:load_fn")``.

* ``train_fn(request: TrainRequest) -> dict`` fits the model on ``request.adata`` (training cells
  only, already in model space) and writes its model files into ``request.run_dir``; it returns
  extra fields for ``run.json``. :func:`train_run` writes ``run.json`` and ``genes.txt`` itself.
* ``load_fn(run_dir) -> Predictor`` with ``genes: list[str]`` and
  ``predict(controls (n, G) float32 log1p, perturbation, context, rng) -> (n, G)``; optionally
  ``describe(perturbation, context) -> str`` (e.g. ``"model"`` / ``"fallback:cell-mean"``), which the
  writer records in ``uns["celltwin_predict"]["sources"]``.

Model space: :class:`celltwin.data.preprocess.Preprocessing` fitted on the training cells
(``log1p(normalize_total(X, target_sum=T))`` in float32, ``T`` the median library size of the
training cells; a file that is not integer-valued is taken as already log-normalised and passed
through), saved in the run as ``preprocess.json`` + ``genes.txt`` and applied again at predict time
to the control cells (totals over all the file's genes, then the run's genes selected by name).

Prediction policy (:func:`predict_cells`):

* One context per output file (the VCC evaluator compares one perturbed population set to one
  control population). A request spanning several contexts needs ``context=`` to pick one.
* Number of cells per perturbation: from the ``counts`` table when given, else the number of real
  cells of that (context, perturbation) in the data; a perturbation with neither is an error.
* Control cells for a perturbation with ``n`` cells: ``n`` cells drawn from the context's controls
  without replacement when ``n`` <= the number of controls, with replacement otherwise (recorded in
  ``uns``). Draws come from ``numpy.random.default_rng(seed)`` in request order.
* ``repeat_mean`` (VCC-style repeated mean): the model predicts from ``n`` copies of the mean of
  *all* the context's control cells, so every predicted cell of a perturbation is the same row. For
  a baseline this is ``max(mean_controls + delta, 0)``: the cell-mean baseline then reproduces the
  mean perturbed training cell of the context exactly. Without it, each predicted cell is
  ``max(control_i + delta, 0)``, whose mean is >= ``mean_controls + delta`` where the clip bites.
* The output holds the predicted cells then *all* the context's control cells (model space), genes
  in the run's training order, ``obs[PERT_COL]`` / ``obs[CONTEXT_COL]`` with ``CONTROL_LABEL``.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from celltwin import __version__
from celltwin._constants import BATCH_COL, CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin._io import atomic_path
from celltwin.errors import ConfigError, InputError

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    import pandas as pd

__all__ = [
    "MODELS",
    "Predictor",
    "TrainRequest",
    "get_train_fn",
    "load_predictor",
    "train_run",
    "read_run",
    "PredictRequest",
    "predict_cells",
    "read_counts_csv",
]

_B = "celltwin.baselines"
# model name -> ("module:train_fn", "module:load_fn")
MODELS: dict[str, tuple[str, str]] = {
    "control": (f"{_B}:train", f"{_B}:load_predictor"),
    "cell-mean": (f"{_B}:train", f"{_B}:load_predictor"),
    "perturbation-mean": (f"{_B}:train", f"{_B}:load_predictor"),
    "context-transfer": (f"{_B}:train", f"{_B}:load_predictor"),
    "scaled-context-transfer": (f"{_B}:train", f"{_B}:load_predictor"),
    "linear": (f"{_B}:train", f"{_B}:load_predictor"),
    "additive": (f"{_B}:train", f"{_B}:load_predictor"),
    # the State Transition model (torch; imported only when used)
    "state": ("celltwin.models.st_runner:train_state", "celltwin.models.st_runner:load_state"),
    # ST on State Embedding cells: `state` with input_space=embedding (SE given by se_model or fitted in the run)
    "state-se": ("celltwin.models.st_runner:train_state_se", "celltwin.models.st_runner:load_state"),
}


class Predictor(Protocol):
    genes: list[str]

    def predict(self, controls: np.ndarray, perturbation: str, context: str | None,
                rng: np.random.Generator) -> np.ndarray: ...


@dataclass
class TrainRequest:
    """What a model's train function receives.

    ``data``: a :class:`celltwin.data.dataset.CellDataset` (one or more files, read lazily;
    canonical labels in ``data.obs``); ``rows``: the training cells (sorted global row ids).
    Models read what they need block by block (``data.read_model(rows, preprocess)``): nothing
    holds a dense matrix of all training cells.
    ``preprocess``: the run's :class:`celltwin.data.preprocess.Preprocessing`; its ``genes`` are the
    run's *output* genes (what ``celltwin predict`` writes).
    ``input_genes``: the genes a model reads as input when they differ from the output genes
    (``--hvg N`` with output space ``all``), else ``None``. ``embed_key``: read the input from
    ``obsm[embed_key]`` instead (``--embed-key``). ``output_space``: ``gene`` | ``all`` |
    ``embedding`` (see :class:`celltwin.data.inputs.InputConfig`).
    ``options``: ``--set key=value`` strings, parsed and validated by the model's config.
    """

    model: str
    data: Any  # celltwin.data.dataset.CellDataset
    rows: np.ndarray
    run_dir: Path
    preprocess: Any
    seed: int = 0
    options: dict[str, str] = field(default_factory=dict)
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


def _resolve(ref: str):
    mod, _, fn = ref.partition(":")
    return getattr(importlib.import_module(mod), fn)


def _entry(name: str) -> tuple[str, str]:
    if name not in MODELS:
        msg = f"model: expected one of {', '.join(MODELS)}, got {name!r}"
        raise ConfigError(msg)
    return MODELS[name]


def get_train_fn(name: str):
    return _resolve(_entry(name)[0])


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
    return _resolve(_entry(str(meta.get("model")))[1])(Path(run_dir))


# ---------------------------------------------------------------------------- training
def train_run(model: str, data, run_dir: str | Path, seed: int = 0,
              options: dict[str, str] | None = None, extra_meta: dict | None = None,
              n_top_genes: int | None = None, rows: np.ndarray | None = None, inputs=None) -> dict:
    """Fit the preprocessing on the training cells, train ``model``, write the run.

    ``data``: an AnnData with canonical obs (``PERT_COL``, ``CONTEXT_COL``; every cell trains) or a
    :class:`celltwin.data.dataset.CellDataset` with ``rows`` (default: every cell). X may hold
    counts or log-normalised values (see the module docstring). ``inputs``: a
    :class:`celltwin.data.inputs.InputConfig` (``--hvg``, ``--embed-key``, ``--output-space``);
    ``n_top_genes`` is the older spelling of ``InputConfig(hvg=N, output_space="gene")``.
    Everything is read block by block (totals, HVG statistics, the models' own passes).
    Writes ``preprocess.json``, ``genes.txt`` (output genes), ``input_genes.txt`` (when the input
    genes differ), the model files and ``run.json``; returns run.json's content.
    """
    from celltwin.data.dataset import CellDataset
    from celltwin.data.inputs import InputConfig, fit_inputs

    train_fn = get_train_fn(model)
    run_dir = Path(run_dir)
    if not isinstance(data, CellDataset):
        for col in (PERT_COL, CONTEXT_COL):
            if col not in data.obs:
                msg = f"training data: obs[{col!r}] missing (expected canonical columns; see celltwin.predict)"
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
    req = TrainRequest(model=model, data=data, rows=rows, run_dir=run_dir, preprocess=pre, seed=seed,
                       options=dict(options or {}), input_genes=fitted.input_genes, embed_key=inputs.embed_key,
                       output_space=fitted.output_space, fingerprint=fitted.fingerprint)
    extra = train_fn(req) or {}
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
        "options": dict(options or {}),
        "data_fingerprint": fitted.fingerprint,
        **(extra_meta or {}),
        **extra,
    }
    with atomic_path(run_dir / "run.json") as tmp:
        tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return meta


def pd_index_frame(genes: Sequence[str]) -> pd.DataFrame:
    """An empty var frame indexed by ``genes``."""
    import pandas as pd

    return pd.DataFrame(index=pd.Index([str(g) for g in genes]))


# ---------------------------------------------------------------------------- prediction
def read_counts_csv(path: str | Path) -> dict[str, int]:
    """Read a VCC-style ``target_gene,n_cells`` CSV (control rows are ignored)."""
    import pandas as pd

    try:
        df = pd.read_csv(path)
    except (OSError, ValueError) as e:
        msg = f"counts file {path}: cannot read as CSV ({e})"
        raise InputError(msg) from None
    for col in (PERT_COL, "n_cells"):
        if col not in df.columns:
            msg = f"counts file {path}: column {col!r} missing; expected columns {PERT_COL},n_cells, got {list(df.columns)}"
            raise InputError(msg)
    n = pd.to_numeric(df["n_cells"], errors="coerce")
    if n.isna().any() or (n < 1).any():
        bad = df.loc[n.isna() | (n < 1), PERT_COL].astype(str).tolist()[:5]
        msg = f"counts file {path}: n_cells expected integers >= 1, bad rows for {bad}"
        raise InputError(msg)
    out = {str(p): int(k) for p, k in zip(df[PERT_COL], n, strict=True) if str(p) != CONTROL_LABEL}
    return out


@dataclass
class PredictRequest:
    """A resolved prediction request: one context, perturbations with their cell counts."""

    context: str
    perturbations: list[str]
    n_cells: list[int]


def predict_cells(
    predictor: Predictor,
    controls: np.ndarray,
    request: PredictRequest,
    seed: int = 0,
    repeat_mean: bool = False,
    genes: Sequence[str] | None = None,
) -> ad.AnnData:
    """Predicted cells for every perturbation of ``request`` plus the controls (see module docs).

    ``controls`` (m, G) float32 model space, genes in the predictor's order.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    genes = list(predictor.genes if genes is None else genes)
    controls = np.asarray(controls, dtype=np.float32)
    m = controls.shape[0]
    if m == 0:
        msg = f"context {request.context!r}: no control cells to predict from"
        raise InputError(msg)
    if controls.shape[1] != len(genes):
        msg = f"controls: {controls.shape[1]} genes, expected {len(genes)} (the run's genes)"
        raise InputError(msg)
    rng = np.random.default_rng(seed)
    mean_control = controls.mean(0, dtype=np.float64)[None, :].astype(np.float32)  # (1, G)
    blocks, labels, sources, replaced = [], [], {}, []
    describe = getattr(predictor, "describe", None)
    for pert, n in zip(request.perturbations, request.n_cells, strict=True):
        with_repl = n > m
        if with_repl:
            replaced.append(pert)
        idx = rng.choice(m, size=n, replace=with_repl)
        base = np.repeat(mean_control, n, axis=0) if repeat_mean else controls[idx]
        pred = np.asarray(predictor.predict(base, pert, request.context, rng), dtype=np.float32)
        if pred.shape != (n, len(genes)):
            msg = f"model returned shape {pred.shape} for {pert!r}, expected {(n, len(genes))}"
            raise InputError(msg)
        blocks.append(pred)
        labels += [pert] * n
        if describe is not None:
            sources[pert] = str(describe(pert, request.context))
    blocks.append(controls)
    labels += [CONTROL_LABEL] * m
    X = sp.csr_matrix(np.vstack(blocks))
    obs = pd.DataFrame(
        {PERT_COL: pd.Categorical(labels), CONTEXT_COL: pd.Categorical([request.context] * len(labels))},
        index=[f"pred_{i}" for i in range(len(labels))],
    )
    out = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=pd.Index(genes)))
    out.uns["celltwin_predict"] = {
        "context": request.context,
        "repeat_mean": bool(repeat_mean),
        "seed": int(seed),
        "sources": json.dumps(sources),
        "controls_drawn_with_replacement": json.dumps(replaced),
    }
    return out


def summarize_sources(adata: ad.AnnData) -> dict[str, Any]:
    """``{perturbation: source}`` recorded by :func:`predict_cells`."""
    info = adata.uns.get("celltwin_predict", {})
    return json.loads(info.get("sources", "{}"))


# ---------------------------------------------------------------------------- file-level flows
@dataclass
class ResolvedSplit:
    """A split applied to one dataset: which cells train, which (context, perturbation) pairs to predict."""

    train_mask: np.ndarray  # (n_cells,) bool
    test_pairs: list[tuple[str, str]]  # (context, perturbation), controls never listed
    columns: Any  # celltwin.data.columns.ObsColumns


def canonical_obs(adata: ad.AnnData, columns) -> pd.DataFrame:
    """obs with ``PERT_COL`` (controls relabelled ``CONTROL_LABEL``) and ``CONTEXT_COL`` (str) set.

    The dataset's own columns named by ``columns`` (an ``ObsColumns``) are read; other columns are
    kept unless they would be overwritten.
    """
    obs = adata.obs.copy()
    perts = columns.perturbations(obs)
    perts = np.where(perts == columns.control_label, CONTROL_LABEL, perts)
    ctxs = columns.contexts(obs)
    obs[PERT_COL] = perts.astype(str)
    obs[CONTEXT_COL] = ctxs.astype(str)
    return obs


def read_h5ad(path: str | Path) -> ad.AnnData:
    """Read an .h5ad with a one-line error when it is missing or unreadable."""
    import anndata as ad

    p = Path(path)
    if not p.exists():
        msg = f"data file {p}: not found"
        raise InputError(msg)
    try:
        return ad.read_h5ad(p)
    except Exception as e:  # noqa: BLE001 - h5py / anndata raise many types
        msg = f"data file {p}: cannot read as .h5ad ({type(e).__name__}: {e})"
        raise InputError(msg) from None


def resolve_columns(obs: pd.DataFrame, columns, where: str):
    """``columns`` (default ``ObsColumns()``) with absent optional default columns dropped, checked.

    A context / batch column named explicitly (not the default) must exist.
    """
    from celltwin.data.columns import ObsColumns, require_columns

    cols = columns or ObsColumns()
    explicit = [c for c, d in ((cols.context_col, CONTEXT_COL), (cols.batch_col, BATCH_COL)) if c not in (None, d)]
    require_columns(obs, explicit, where)
    cols = cols.present(obs)
    cols.check(obs, where)
    return cols


def resolve_split(adata: ad.AnnData, split: str | Path, columns=None, where: str = "<data>") -> ResolvedSplit:
    """Apply the split file ``split`` (see :mod:`celltwin.data.split`) to ``adata``.

    Unknown contexts / perturbations named by the split and held-out contexts without controls
    raise :class:`InputError` (from the data module's resolver). Test pairs are sorted by
    (context, perturbation).
    """
    from celltwin.data.split import read_split
    from celltwin.data.split import resolve_split as _resolve

    cols = resolve_columns(adata.obs, columns, where)
    idx = _resolve(read_split(split), adata.obs, cols, where=where)
    mask = np.zeros(adata.n_obs, dtype=bool)
    mask[idx.train] = True
    pert = cols.perturbations(adata.obs)
    ctx = cols.contexts(adata.obs)
    pairs = sorted({(str(ctx[i]), str(pert[i])) for i in idx.test if pert[i] != cols.control_label})
    if not pairs:
        msg = f"split {split}: no test perturbation in {where} (the split holds out nothing to predict)"
        raise InputError(msg)
    return ResolvedSplit(train_mask=mask, test_pairs=pairs, columns=cols)
