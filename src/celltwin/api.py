"""Notebook models (scvi-tools style): construct from an AnnData, ``train``, ``predict``, ``save`` / ``load``.

::

    import celltwin
    m = celltwin.CellMeanModel(adata, pert_col="gene", control_pert="ctrl", context_col="cell_line")
    m.train(min_cells=5)                       # typed options (celltwin.baselines.options.BaselineOptions)
    pred = m.predict(adata, {"TP53": 200, "MYC": 150}, context="K562")   # an AnnData
    m.save("runs/cell-mean")                   # a run directory, exactly what `celltwin train` writes
    m2 = celltwin.load_model("runs/cell-mean")  # or CellMeanModel.load; also reads CLI runs

Every class here is a thin face of the same code the command line runs: ``train`` is
:func:`celltwin.runs.train_run` on the AnnData (its cells read block by block, in memory),
``predict`` is the prediction loop of ``celltwin predict``
(:func:`celltwin.predict_stream.write_predictions`), so the same data, options and seed give the same
numbers as ``celltwin train`` / ``celltwin predict``. Options are the model's typed dataclass
(:attr:`Model.options_class`; ``celltwin train --help`` lists them); keyword values must have the
field's type (``steps=200``, not ``"200"``).

What the classes read and write:

* the caller's AnnData is never modified (X, a ``layer`` or ``obsm[embed_key]`` and the label
  columns are read; the SE model's :meth:`~celltwin.models.se_api.SEModel.get_latent_representation`
  writes ``obsm[key]``, as documented there);
* ``train`` writes a run directory: ``train(run_dir=...)``, or a temporary one (removed with the
  object) that :meth:`Model.save` copies.
"""

from __future__ import annotations

import shutil
import tempfile
import weakref
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from celltwin._constants import BATCH_COL, CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError
from celltwin.registry import get_spec

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

__all__ = ["Model", "load_model"]

_NAME = "<in-memory AnnData>"


class _Cells:
    """What :class:`celltwin.data.source.MemorySource` reads of an AnnData, with X taken from ``layer``.

    Holds references (no copy) unless given sliced arrays; the caller's AnnData is never written.
    """

    def __init__(self, X, obs, var_names, obsm: Mapping[str, Any]) -> None:
        self.X, self.obs, self.var_names, self.obsm = X, obs, var_names, obsm

    @classmethod
    def of(cls, adata: ad.AnnData, layer: str | None, what: str = "adata") -> _Cells:
        if layer is None:
            X = adata.X
            if X is None:
                raise InputError(f"{what}: X is empty (give layer= to read a layer)")
        else:
            if layer not in adata.layers:
                avail = ", ".join(adata.layers.keys()) or "(none)"
                raise InputError(f"{what}: layer {layer!r} not found; layers: {avail}")
            X = adata.layers[layer]
        return cls(X, adata.obs, adata.var_names, adata.obsm)

    @property
    def n_obs(self) -> int:
        return int(self.X.shape[0])

    @property
    def n_vars(self) -> int:
        return int(self.X.shape[1])


def _source(cells: _Cells, name: str = _NAME):
    from celltwin.data.source import MemorySource

    return MemorySource(cells, name)


class Model:
    """Base of the notebook model classes (one subclass per registered model; see the module docstring).

    Parameters
    ----------
    adata
        Training cells: counts or log-normalised values in X (or ``layer``), one row per cell.
    pert_col, control_pert
        obs column with the perturbation label (``A+B`` for combinations) and the label of controls.
    context_col
        obs column with the context (cell line / condition); the default ``context`` may be absent
        (one context, named ``all``), a column named explicitly must exist. ``None``: one context.
    batch_col
        obs column with the batch (``match=batch`` of ST); the default ``batch`` may be absent.
    layer
        read this layer instead of X (training and, by default, prediction).
    embed_key
        ST: read the input from ``obsm[embed_key]`` (``--embed-key``); baselines refuse it.
    hvg, output_space
        ``--hvg N`` / ``--output-space`` of ``celltwin train`` (:class:`celltwin.data.inputs.InputConfig`).
    """

    #: the registry name (``celltwin train --model NAME``) of the class
    model_name: ClassVar[str] = ""

    def __init__(self, adata: ad.AnnData, *, pert_col: str = PERT_COL, context_col: str | None = CONTEXT_COL,
                 control_pert: str = CONTROL_LABEL, batch_col: str | None = BATCH_COL, layer: str | None = None,
                 embed_key: str | None = None, hvg: int | None = None, output_space: str | None = None) -> None:
        from celltwin.data.columns import ObsColumns
        from celltwin.data.inputs import InputConfig

        if not self.model_name:
            raise ConfigError("Model: use a model class (celltwin.CellMeanModel, celltwin.STModel, ...) "
                              "or celltwin.load_model(run_dir)")
        self._init_empty()
        self.columns = ObsColumns(pert_col, control_pert, context_col, batch_col)
        self.layer = layer
        self.inputs = InputConfig(hvg=hvg, embed_key=embed_key, output_space=output_space or "")
        if embed_key and get_spec(self.model_name).options.startswith("celltwin.baselines"):
            raise ConfigError(f"embed_key: model {self.model_name} is a gene-space baseline; it reads X "
                              "(or a layer), not an obsm matrix")
        self.adata = adata
        # checks the columns, the layer and that there are control cells; keeps the columns present
        # (a default context / batch column the data lacks means one context / batch, as in run.json)
        self.columns = self._dataset().columns

    def _init_empty(self) -> None:
        self.adata = None
        self.run_dir: Path | None = None
        self.run_meta: dict[str, Any] = {}
        self._predictor = None
        self._tmp: weakref.finalize | None = None

    def __repr__(self) -> str:
        state = f"trained, run {self.run_dir}" if self.is_trained else "not trained"
        shape = "" if self.adata is None else f", {self.adata.n_obs} x {self.adata.n_vars}"
        return f"{type(self).__name__}({self.model_name!r}{shape}, {state})"

    # ------------------------------------------------------------------ properties
    @classmethod
    def options_class(cls):
        """The typed options dataclass of :meth:`train` (every option's type, default and help)."""
        return get_spec(cls.model_name).options_class()

    @property
    def is_trained(self) -> bool:
        return self.run_dir is not None

    @property
    def genes(self) -> list[str]:
        """The genes (or embedding dimensions) :meth:`predict` writes, in order."""
        p = self._require_trained()
        return list(getattr(p, "output_names", p.genes))

    def _require_trained(self):
        if self._predictor is None:
            raise ConfigError(f"{type(self).__name__}: not trained; call .train() or load a run with .load(dir)")
        return self._predictor

    def _dataset(self):
        from celltwin.data.dataset import CellDataset

        cells = _Cells.of(self.adata, self.layer)
        return CellDataset([_source(cells)], ["adata"], self.columns)

    # ------------------------------------------------------------------ training
    def train(self, options: Any = None, /, *, seed: int = 0, run_dir: str | Path | None = None, **kwargs: Any):
        """Train on every cell of the AnnData; returns ``self``.

        Options: keyword arguments (``steps=200``) or one options instance (:meth:`options_class`),
        not both. ``seed``: as ``celltwin train --seed``. ``run_dir``: where the run is written
        (kept; an existing ST run there resumes like the command's); default: a temporary directory
        that lives as long as the object (:meth:`save` copies it).
        """
        from celltwin.runs import train_run

        if self.adata is None:
            raise ConfigError(f"{type(self).__name__}: loaded from {self.run_dir} without training data; "
                              "construct it from an AnnData to train")
        if options is not None and kwargs:
            raise ConfigError("train: give options as keyword arguments or as one options object, not both")
        spec = get_spec(self.model_name)
        opts = spec.parse_options(options if options is not None else kwargs, strict=True)
        dataset = self._dataset()
        tmp = None
        if run_dir is None:
            out = Path(tempfile.mkdtemp(prefix=f"celltwin-{self.model_name}-"))
            tmp = weakref.finalize(self, shutil.rmtree, str(out), True)
        else:
            out = Path(run_dir)
        extra = {"data": [_NAME], "columns": dataset.columns.to_dict(), "layer": self.layer,
                 "api": f"{type(self).__module__}.{type(self).__qualname__}"}
        try:
            meta = train_run(spec.name, dataset, out, seed=seed, options=opts, extra_meta=extra, inputs=self.inputs)
        except BaseException:
            if tmp is not None:
                tmp()
            raise
        if self._tmp is not None:
            self._tmp()  # the previous temporary run
        self._tmp = tmp
        self._attach(out, meta)
        return self

    def _attach(self, run_dir: Path, meta: dict) -> None:
        from celltwin.runs import load_predictor

        self.run_dir = Path(run_dir)
        self.run_meta = meta
        self._predictor = load_predictor(run_dir)

    # ------------------------------------------------------------------ persistence
    def save(self, dir_path: str | Path, overwrite: bool = False) -> Path:
        """Write the run directory to ``dir_path`` (what ``celltwin train -o`` writes; ``celltwin predict`` reads it).

        An existing non-empty directory is refused unless ``overwrite`` (then replaced as a whole,
        atomically).
        """
        from celltwin._io import copy_dir

        self._require_trained()
        return copy_dir(self.run_dir, dir_path, overwrite=overwrite)

    @classmethod
    def load(cls, run_dir: str | Path):
        """The model of a run directory (written by :meth:`save` or ``celltwin train``), ready to predict."""
        from celltwin.data.columns import ObsColumns
        from celltwin.data.inputs import InputConfig, load_inputs
        from celltwin.runs import read_run

        tmp = None
        if not (Path(run_dir) / "run.json").is_file():
            run_dir, tmp = _import_arc_run(run_dir)
        meta, _ = read_run(run_dir)
        spec = get_spec(str(meta.get("model")))
        target = spec.api_class()
        if not issubclass(target, cls):
            raise ConfigError(f"{run_dir} holds a {spec.name!r} run: load it with celltwin.{target.__name__}.load "
                              f"or celltwin.load_model, not {cls.__name__}.load")
        obj = target.__new__(target)
        obj._init_empty()
        obj.columns = ObsColumns.from_dict(meta["columns"]) if "columns" in meta else ObsColumns()
        obj.layer = meta.get("layer")
        info = load_inputs(run_dir)
        obj.inputs = InputConfig(embed_key=info.get("embed_key"), output_space=info.get("output_space") or "")
        obj._attach(Path(run_dir), meta)
        if tmp is not None:
            obj._tmp = weakref.finalize(obj, shutil.rmtree, str(tmp), True)
        return obj

    # ------------------------------------------------------------------ prediction
    def predict(self, controls: ad.AnnData, perturbations: Sequence[str] | Mapping[str, int] | str,
                n_cells: int | None = None, context: str | None = None, *, seed: int = 0,
                repeat_mean: bool = False, layer: str | type[Ellipsis] | None = ..., sample_counts: str | None = None,
                nb_theta: float = 10.0) -> ad.AnnData:
        """Predicted cells of each perturbation, then the context's control cells: an AnnData.

        ``controls``: cells to predict from; the rows labelled ``control_pert`` in ``pert_col`` are
        used (every row when the column is absent), restricted to ``context`` when ``context_col``
        exists. ``context``: default the one context of those controls. ``perturbations``: a list
        (``n_cells`` cells each; default one per control cell) or ``{perturbation: n_cells}`` (e.g.
        VCC's counts). ``layer``: default the training layer. The rest as ``celltwin predict``
        (``--seed``, ``--repeat-mean``, ``--sample-counts``, ``--nb-theta``), with the same numbers.

        The result: X float32 CSR in model space (or counts with ``sample_counts``), var = the
        run's output genes, obs ``pert_col`` / ``context_col`` (``context`` when there is none)
        with ``control_pert`` for the controls, and ``uns["celltwin_predict"]`` (sources per
        perturbation, e.g. ``model`` / ``fallback:cell-mean``) as in the command's file.
        """
        import pandas as pd

        from celltwin.data.dataset import CellDataset
        from celltwin.data.inputs import load_inputs
        from celltwin.data.preprocess import Preprocessing
        from celltwin.predict import AnnDataWriter
        from celltwin.predict_stream import write_predictions

        predictor = self._require_trained()
        if sample_counts not in (None, "poisson", "nb"):
            raise ConfigError(f"predict: sample_counts must be 'poisson' or 'nb', got {sample_counts!r}")
        perts, counts_given = _requested(perturbations, n_cells)
        layer = self.layer if layer is ... else layer
        cols = self.columns
        obs = controls.obs
        if cols.pert_col in obs.columns:
            is_ctrl = obs[cols.pert_col].astype(str).to_numpy() == cols.control_label
        else:
            is_ctrl = np.ones(controls.n_obs, dtype=bool)
        has_ctx = cols.context_col is not None and cols.context_col in obs.columns
        ctx_vals = obs[cols.context_col].astype(str).to_numpy() if has_ctx else None
        if context is None:
            if has_ctx:
                found = sorted(set(ctx_vals[is_ctrl].tolist()))
                if len(found) != 1:
                    raise ConfigError(f"predict: give context=; the control cells span {len(found)} contexts "
                                      f"({', '.join(found[:10])})")
                context = found[0]
            elif cols.context_col is None:
                context = "all"  # trained as one context (no context column)
            else:
                raise ConfigError(f"predict: the controls have no obs[{cols.context_col!r}]; give context=")
        context = str(context)
        rows = np.flatnonzero(is_ctrl & (ctx_vals == context)) if has_ctx else np.flatnonzero(is_ctrl)
        if rows.size == 0:
            where = f" of context {context!r}" if has_ctx else ""
            raise InputError(f"predict: no control cells{where} (obs[{cols.pert_col!r}] == {cols.control_label!r})")
        m = int(rows.size)
        n_per = list(counts_given) if counts_given is not None else [m if n_cells is None else int(n_cells)] * len(perts)

        pre = Preprocessing.load(self.run_dir)
        inputs = load_inputs(self.run_dir)
        full = _Cells.of(controls, layer, "controls")
        pre.gene_index(full.var_names, "controls")  # every run gene must be there
        obsm: dict[str, Any] = {}
        if inputs["embed_key"]:
            key = inputs["embed_key"]
            if key not in controls.obsm:
                avail = ", ".join(controls.obsm.keys()) or "(none)"
                raise InputError(f"controls: the run reads obsm[{key!r}] (embed_key), which the controls lack; "
                                 f"available: {avail}")
            v = controls.obsm[key]
            obsm[key] = v[rows] if hasattr(v, "tocsr") else np.asarray(v)[rows]
        # the controls alone (a copy of their rows), labelled canonically for the shared loop
        labels = pd.DataFrame({PERT_COL: [CONTROL_LABEL] * m, CONTEXT_COL: [context] * m},
                              index=pd.Index(obs.index[rows].astype(str)))
        cells = _Cells(full.X[rows], labels, full.var_names, obsm)
        cdata = CellDataset([_source(cells, "<controls AnnData>")], ["controls"])

        out_pert = cols.pert_col
        out_ctx = cols.context_col or CONTEXT_COL
        if out_ctx == out_pert:
            out_ctx = CONTEXT_COL
        lab = [p for p, n in zip(perts, n_per, strict=True) for _ in range(n)] + [cols.control_label] * m
        out_obs = pd.DataFrame({out_pert: pd.Categorical(lab), out_ctx: pd.Categorical([context] * len(lab))},
                               index=pd.Index([f"pred_{i}" for i in range(len(lab))]))
        out_var = pd.DataFrame(index=pd.Index(list(getattr(predictor, "output_names", pre.genes))))
        info = {"context": context, "repeat_mean": bool(repeat_mean), "seed": int(seed),
                "model": str(self.run_meta.get("model")), "run": str(self.run_dir),
                "output_space": inputs["output_space"], "pert_col": out_pert,
                "control_label": cols.control_label, "context_col": out_ctx}
        writer = AnnDataWriter(out_obs, out_var)
        write_predictions(lambda: writer, predictor, cdata, np.arange(m), pre, inputs, perts, n_per, context,
                          seed=seed, repeat_mean=repeat_mean, sample_counts=sample_counts, nb_theta=nb_theta,
                          info=info, where=f"{type(self).__name__} (run {self.run_dir})")
        return writer.adata


def _requested(perturbations, n_cells) -> tuple[list[str], list[int] | None]:
    """``(perturbations, cells of each or None)`` of a :meth:`Model.predict` request, checked."""
    counts = None
    if isinstance(perturbations, str):
        perts = [perturbations]
    elif isinstance(perturbations, Mapping):
        if n_cells is not None:
            raise ConfigError("predict: n_cells is taken from the {perturbation: n_cells} mapping; leave it out")
        perts = [str(p) for p in perturbations]
        counts = []
        for p, n in perturbations.items():
            if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
                raise ConfigError(f"predict: n_cells of {p!r} expected an integer >= 1, got {n!r}")
            counts.append(int(n))
    else:
        perts = [str(p) for p in perturbations]
    if not perts:
        raise ConfigError("predict: no perturbation to predict")
    if len(set(perts)) != len(perts):
        raise ConfigError("predict: a perturbation is listed twice")
    if n_cells is not None and (isinstance(n_cells, bool) or not isinstance(n_cells, int | np.integer) or n_cells < 1):
        raise ConfigError(f"predict: n_cells expected an integer >= 1, got {n_cells!r}")
    return perts, counts


def _import_arc_run(src: str | Path) -> tuple[Path, Path]:
    """An arc-state ST run (directory, Hugging Face cache folder or id) imported into a temporary run directory."""
    from celltwin.state_import import find_source
    from celltwin.state_import.st import import_st_run

    source = find_source(src)
    if source.kind != "st":
        raise ConfigError(f"{src}: an arc-state SE checkpoint; load it with celltwin.SEModel.load or "
                          "celltwin.StateEmbeddingModel.from_pretrained")
    tmp = Path(tempfile.mkdtemp(prefix="celltwin-arc-st-"))
    try:
        import_st_run(source, tmp / "run")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return tmp / "run", tmp


def load_model(run_dir: str | Path) -> Model:
    """The model of any run directory (``celltwin train`` or ``Model.save``), as its class."""
    return Model.load(run_dir)
