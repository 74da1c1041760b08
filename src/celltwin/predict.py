"""The in-memory prediction writers: :func:`predict_cells` and :class:`AnnDataWriter`.

The model registry is :mod:`celltwin.registry`; run directories (``train_run``, ``read_run``,
``load_predictor``, ``TrainRequest``) are :mod:`celltwin.runs` (re-exported here for older callers).
The file-level flows of ``celltwin train`` / ``celltwin predict`` (streamed from disk, several
files, bounded memory) are in :mod:`celltwin.pipeline`; the notebook classes (``Model.predict``)
share their prediction loop (:func:`celltwin.predict_stream.write_predictions`) and write with
:class:`AnnDataWriter`.

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

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Self

import numpy as np

from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.errors import InputError
from celltwin.registry import MODELS
from celltwin.runs import Predictor, TrainRequest, load_predictor, read_run, train_run

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    import pandas as pd

__all__ = [
    # re-exported from celltwin.registry / celltwin.runs (tests, bench and older scripts import them here)
    "MODELS",
    "AnnDataWriter",
    "PredictRequest",
    "Predictor",
    "TrainRequest",
    "load_predictor",
    "predict_cells",
    "read_run",
    "summarize_sources",
    "train_run",
]


# ---------------------------------------------------------------------------- prediction
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
        "sources": sources_record(sources),
        "controls_drawn_with_replacement": np.asarray(replaced, dtype=object),
    }
    return out


def sources_record(sources: dict[str, str]) -> dict[str, np.ndarray]:
    """``uns["celltwin_predict"]["sources"]`` as native arrays (perturbation names may hold any
    character, so they are values, not HDF5 group keys): ``{"perturbation": [...], "source": [...]}``."""
    return {"perturbation": np.asarray(list(sources), dtype=object),
            "source": np.asarray([str(v) for v in sources.values()], dtype=object)}


def summarize_sources(adata: ad.AnnData) -> dict[str, Any]:
    """``{perturbation: source}`` recorded in ``uns["celltwin_predict"]["sources"]`` (files written
    before 0.2 held a JSON string there; it is read too)."""
    rec = adata.uns.get("celltwin_predict", {}).get("sources")
    if rec is None:
        return {}
    if isinstance(rec, str):
        return json.loads(rec or "{}")
    return {str(p): str(v) for p, v in zip(rec["perturbation"], rec["source"], strict=True)}


class AnnDataWriter:
    """The interface of :class:`celltwin.data.writer.CSRH5adWriter` (``append`` row blocks, set ``uns``),
    collecting an in-memory :class:`anndata.AnnData` instead of a file (``Model.predict``).

    Usage::

        with AnnDataWriter(obs, var) as w:
            w.append(block)        # (n_i, G) CSR or dense
            w.uns["key"] = {...}
        adata = w.adata            # X CSR float32 (explicit zeros dropped, as in the file writer)
    """

    def __init__(self, obs: pd.DataFrame, var: pd.DataFrame) -> None:
        self.obs, self.var = obs, var
        self.uns: dict[str, Any] = {}
        self._blocks: list = []
        self._rows = 0
        self.adata: ad.AnnData | None = None

    def append(self, block) -> None:
        import scipy.sparse as sp

        b = sp.csr_matrix(block, dtype=np.float32)
        if b.shape[1] != len(self.var) or self._rows + b.shape[0] > len(self.obs):
            msg = (f"AnnDataWriter: block {b.shape} after {self._rows} rows does not fit "
                   f"{len(self.obs)} x {len(self.var)}")
            raise InputError(msg)
        b.eliminate_zeros()
        self._blocks.append(b)
        self._rows += b.shape[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self._blocks = []
            return
        import anndata as ad
        import scipy.sparse as sp

        if self._rows != len(self.obs):
            msg = f"AnnDataWriter: {self._rows} rows written, obs has {len(self.obs)}"
            raise InputError(msg)
        X = (sp.vstack(self._blocks, format="csr", dtype=np.float32) if self._blocks
             else sp.csr_matrix((0, len(self.var)), dtype=np.float32))
        self._blocks = []
        self.adata = ad.AnnData(X=X, obs=self.obs, var=self.var, uns=self.uns)
