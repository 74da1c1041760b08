"""The model registry, run directories, and the shared prediction writer.

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
    "register_model",
    "get_train_fn",
    "load_predictor",
    "train_run",
    "read_run",
    "PredictRequest",
    "predict_cells",
    "read_counts_csv",
    "to_counts",
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

    ``adata``: the training cells only, X float32 in model space (dense or CSR), genes in the
    training order, ``obs[PERT_COL]`` (controls = ``CONTROL_LABEL``) and ``obs[CONTEXT_COL]`` (str)
    always present (renamed from the data's own columns), other obs columns kept.
    ``options``: ``--set key=value`` strings, parsed and validated by the model's config.
    ``preprocess``: the run's :class:`celltwin.data.preprocess.Preprocessing` (how ``adata.X``
    was made from the file; ``None`` = unknown, taken as already log-normalised). The
    embedding-space ST uses it to put cells into its SE model's own normalisation.
    """

    model: str
    adata: ad.AnnData
    run_dir: Path
    seed: int = 0
    options: dict[str, str] = field(default_factory=dict)
    preprocess: Any = None


def register_model(name: str, train: str, load: str) -> None:
    """Add ``name`` to :data:`MODELS` (``"module:function"`` strings, imported on use)."""
    MODELS[name] = (train, load)


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
def train_run(model: str, adata: ad.AnnData, run_dir: str | Path, seed: int = 0,
              options: dict[str, str] | None = None, extra_meta: dict | None = None,
              n_top_genes: int | None = None) -> dict:
    """Fit the preprocessing on ``adata`` (training cells, canonical obs), train ``model``, write the run.

    ``adata.X`` may hold counts or log-normalised values (see the module docstring);
    ``n_top_genes`` keeps the seurat_v3 highly variable genes of the training cells.
    Writes ``preprocess.json``, ``genes.txt``, the model files and ``run.json``; returns run.json.
    """
    import anndata as ad

    from celltwin.data.preprocess import fit_preprocessing

    train_fn = get_train_fn(model)
    run_dir = Path(run_dir)
    for col in (PERT_COL, CONTEXT_COL):
        if col not in adata.obs:
            msg = f"training data: obs[{col!r}] missing (expected canonical columns; see celltwin.predict)"
            raise InputError(msg)
    if adata.n_obs == 0:
        msg = "training data: the split selects 0 training cells"
        raise InputError(msg)
    pre = fit_preprocessing(adata, n_top_genes=n_top_genes)
    Xm = pre.transform(adata.X, pre.gene_index(adata.var_names, "training data"))
    obs = adata.obs.copy()
    obs[PERT_COL] = obs[PERT_COL].astype(str).values
    obs[CONTEXT_COL] = obs[CONTEXT_COL].astype(str).values
    mdata = ad.AnnData(X=Xm, obs=obs, var=pd_index_frame(pre.genes))
    run_dir.mkdir(parents=True, exist_ok=True)
    req = TrainRequest(model=model, adata=mdata, run_dir=run_dir, seed=seed, options=dict(options or {}),
                       preprocess=pre)
    extra = train_fn(req) or {}
    pre.save(run_dir)
    meta = {
        "model": model,
        "celltwin_version": __version__,
        "preprocess": pre.to_dict(),
        "control_label": CONTROL_LABEL,
        "n_train_cells": int(adata.n_obs),
        "n_genes": len(pre.genes),
        "seed": seed,
        "options": dict(options or {}),
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


def _subset_rows(X, mask: np.ndarray):
    return X[np.flatnonzero(mask)]


def train_from_files(model: str, data: str | Path, split: str | Path, out: str | Path, *, seed: int = 0,
                     options: dict[str, str] | None = None, columns=None) -> dict:
    """``celltwin train``: read ``data``, keep the split's training cells, train ``model`` into ``out``."""
    import anndata as ad

    _entry(model)  # unknown model names fail before any reading
    adata = read_h5ad(data)
    rs = resolve_split(adata, split, columns, where=str(data))
    obs = canonical_obs(adata, rs.columns)
    sub = ad.AnnData(X=_subset_rows(adata.X, rs.train_mask), obs=obs.iloc[np.flatnonzero(rs.train_mask)],
                     var=adata.var[[]].copy())
    extra = {"data": str(data), "split": str(split), "columns": rs.columns.to_dict(),
             "test_pairs": [list(p) for p in rs.test_pairs]}
    return train_run(model, sub, out, seed=seed, options=options, extra_meta=extra)


def _controls_from_file(path: str | Path, pre, columns):
    """``(model-space controls, raw control rows)`` of ``path`` (rows labelled as controls when the
    file has the perturbation column, else every row). The file must be on the training data's
    scale (counts or log-normalised), as the run's preprocessing is applied unchanged."""
    a = read_h5ad(path)
    idx = pre.gene_index(a.var_names, f"controls file {path}")
    rows = np.arange(a.n_obs)
    if columns is not None and columns.pert_col in a.obs.columns:
        rows = np.flatnonzero(columns.perturbations(a.obs) == columns.control_label)
    if rows.size == 0:
        msg = f"controls file {path}: no control cells (obs[{columns.pert_col!r}] == {columns.control_label!r})"
        raise InputError(msg)
    raw = a.X[rows]
    return pre.transform(raw, idx), raw, idx


def to_counts(pred: ad.AnnData, raw_controls, gene_idx: np.ndarray, target_sum: float | None, seed: int,
              dist: str = "poisson", theta: float = 10.0) -> ad.AnnData:
    """``pred`` (model space, predicted rows then the controls) with integer counts in ``X``.

    Predicted cells: counts drawn by :func:`celltwin.data.preprocess.sample_counts` (Poisson or
    negative binomial around ``expm1(x) * L / T``), each cell's library size ``L`` drawn with
    replacement from the totals (over all the file's genes) of the context's real control cells,
    ``numpy.random.default_rng([seed, 7])``. Control rows: the real control cells' own counts
    (the run's genes). Needs a run trained on counts (``target_sum`` known).
    """
    import scipy.sparse as sp

    from celltwin.data.preprocess import library_sizes, looks_like_counts, sample_counts

    if target_sum is None:
        msg = ("--sample-counts: the run was trained on log-normalised data (no normalize_total target), "
               "so there is no count scale to sample on")
        raise ConfigError(msg)
    import anndata as ad

    if not looks_like_counts(ad.AnnData(X=raw_controls)):
        msg = "--sample-counts: the control cells do not hold integer counts"
        raise InputError(msg)
    m = raw_controls.shape[0]
    n = pred.n_obs - m
    lib = library_sizes(ad.AnnData(X=raw_controls))  # (m,) totals over all genes
    rng = np.random.default_rng([seed, 7])
    Xp = pred.X[:n].toarray() if sp.issparse(pred.X) else np.asarray(pred.X[:n])
    draws = sample_counts(Xp, lib[rng.integers(0, m, size=n)], float(target_sum), rng, dist=dist, theta=theta)
    ctrl = raw_controls[:, gene_idx]
    ctrl = sp.csr_matrix(ctrl, dtype=np.float32) if sp.issparse(ctrl) else sp.csr_matrix(np.asarray(ctrl, np.float32))
    out = pred.copy()
    out.X = sp.vstack([sp.csr_matrix(draws.astype(np.float32)), ctrl], format="csr")
    out.uns["celltwin_predict"] = {**pred.uns["celltwin_predict"], "counts": json.dumps(
        {"dist": dist, "theta": theta if dist == "nb" else None, "target_sum": float(target_sum),
         "library_sizes": "totals of the context's real control cells, drawn with replacement"})}
    return out


def predict_from_files(run_dir: str | Path, data: str | Path, out: str | Path, *, split: str | Path | None = None,
                       counts: str | Path | None = None, controls: str | Path | None = None,
                       perturbations: Sequence[str] | None = None, context: str | None = None,
                       repeat_mean: bool = False, write_real: str | Path | None = None, seed: int = 0,
                       columns=None, sample_counts: str | None = None, nb_theta: float = 10.0) -> ad.AnnData:
    """``celltwin predict``: predicted cells for the split's test pairs (or ``perturbations``).

    See the module docstring for the policy on counts, controls, contexts and ``repeat_mean``.
    ``sample_counts`` (``"poisson"`` / ``"nb"``): write integer counts instead of model-space
    values (:func:`to_counts`).
    Writes ``out`` (and ``write_real``) atomically and returns the predicted AnnData.
    """
    import anndata as ad
    import pandas as pd

    from celltwin.data.preprocess import Preprocessing

    meta, genes = read_run(run_dir)
    pre = Preprocessing.load(run_dir)
    predictor = load_predictor(run_dir)
    adata = read_h5ad(data)
    if columns is None and "columns" in meta:
        from celltwin.data.columns import ObsColumns

        columns = ObsColumns.from_dict(meta["columns"])
    table = read_counts_csv(counts) if counts is not None else None
    if split is not None:
        rs = resolve_split(adata, split, columns, where=str(data))
        cols, pairs = rs.columns, list(rs.test_pairs)
    else:
        if not perturbations and table is None:
            msg = "predict: give --split, --perturbations or --counts (nothing to predict)"
            raise ConfigError(msg)
        cols = resolve_columns(adata.obs, columns, str(data))
        pairs = []
    gidx = pre.gene_index(adata.var_names, f"data file {data}")
    obs = canonical_obs(adata, cols)
    ctx_all = obs[CONTEXT_COL].to_numpy()
    pert_all = obs[PERT_COL].to_numpy()

    explicit = list(perturbations) if perturbations else (list(table) if (split is None and table) else None)
    if explicit is not None:
        if context is None:
            ctxs = sorted({c for c, _ in pairs}) or sorted(set(ctx_all.tolist()))
            if len(ctxs) != 1:
                msg = f"predict: give --context; the data has several contexts ({', '.join(ctxs)})"
                raise ConfigError(msg)
            context = ctxs[0]
        pairs = [(context, p) for p in explicit]
    if context is not None:
        if context not in set(ctx_all.tolist()):
            msg = (f"predict: context {context!r} not found in {data}; contexts present: "
                   f"{', '.join(sorted(set(ctx_all.tolist())))}")
            raise InputError(msg)
        pairs = [(c, p) for c, p in pairs if c == context]
    ctxs = sorted({c for c, _ in pairs})
    if not pairs:
        msg = f"predict: no perturbation to predict{f' in context {context!r}' if context else ''}"
        raise InputError(msg)
    if len(ctxs) > 1:
        msg = f"predict: the test pairs span several contexts ({', '.join(ctxs)}); pick one with --context"
        raise ConfigError(msg)
    ctx = ctxs[0]
    in_ctx = ctx_all == ctx
    perts = [p for _, p in pairs]
    if table is not None:
        missing = [p for p in perts if p not in table]
        if missing:
            msg = f"counts file {counts}: no n_cells row for {', '.join(missing[:10])}"
            raise InputError(msg)
        n_cells = [table[p] for p in perts]
    else:
        n_cells = [int(np.sum(in_ctx & (pert_all == p))) for p in perts]
        zero = [p for p, n in zip(perts, n_cells, strict=True) if n == 0]
        if zero:
            msg = (f"predict: no real cells of {', '.join(zero[:10])} in context {ctx!r} of {data} to take the "
                   f"number of cells from; give --counts (a {PERT_COL},n_cells CSV)")
            raise InputError(msg)
    ctrl_mask = in_ctx & (pert_all == CONTROL_LABEL)
    if sample_counts not in (None, "poisson", "nb"):
        msg = f"predict: sample_counts must be 'poisson' or 'nb', got {sample_counts!r}"
        raise ConfigError(msg)
    if controls is not None:
        C, raw_c, raw_idx = _controls_from_file(controls, pre, cols)
    else:
        if not ctrl_mask.any():
            msg = f"predict: context {ctx!r} of {data} has no control cells (label {cols.control_label!r})"
            raise InputError(msg)
        raw_c, raw_idx = adata.X[np.flatnonzero(ctrl_mask)], gidx
        C = pre.transform(raw_c, gidx)
    req = PredictRequest(context=ctx, perturbations=perts, n_cells=n_cells)
    pred = predict_cells(predictor, C, req, seed=seed, repeat_mean=repeat_mean, genes=genes)
    pred.uns["celltwin_predict"].update({"model": str(meta.get("model")), "run": str(run_dir)})
    if sample_counts is not None:
        pred = to_counts(pred, raw_c, raw_idx, pre.target_sum, seed, dist=sample_counts, theta=nb_theta)
    with atomic_path(out, suffix=".h5ad") as tmp:
        pred.write_h5ad(tmp)
    if write_real is not None:
        sel = in_ctx & (np.isin(pert_all, perts) | (pert_all == CONTROL_LABEL))
        rows = np.flatnonzero(sel)
        robs = pd.DataFrame({PERT_COL: pd.Categorical(pert_all[rows]), CONTEXT_COL: pd.Categorical(ctx_all[rows])},
                            index=adata.obs_names[rows].astype(str))
        real = ad.AnnData(X=adata.X[rows][:, gidx], obs=robs, var=pd.DataFrame(index=pd.Index(genes)))
        with atomic_path(write_real, suffix=".h5ad") as tmp:
            real.write_h5ad(tmp)
    return pred


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
