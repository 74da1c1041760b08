"""``celltwin train`` / ``celltwin predict`` on files, streamed: bounded memory at any screen size.

Training data (:func:`open_training_data`): the split TOML's ``[datasets]`` (each value one
``.h5ad``, a folder or a glob; several datasets allowed), or ``--data`` for a one-dataset split.
The files are read lazily as one :class:`~celltwin.data.dataset.CellDataset` (genes aligned by
name, global labels); the split is resolved dataset by dataset (:func:`resolve_dataset_split`).
A split may hold out nothing: every cell then trains, and ``celltwin predict --counts`` names
what to predict.

Prediction (:func:`predict_from_files`) follows the policy of :mod:`celltwin.predict` (one
context per file unless several are asked for, each then predicted from its own controls; cells
per perturbation from ``--counts``, the real test cells or ``--cells-per-pert``; control cells
drawn with ``numpy.random.default_rng(seed)`` without replacement when there are enough) but
never holds more than one perturbation's cells: each perturbation's control draw is read from
disk, predicted and appended to the output as a CSR block (:class:`~celltwin.data.writer.CSRH5adWriter`),
then the context's control cells are streamed in blocks. ``--write-real`` streams the real cells
the same way. ``--repeat-mean`` uses the mean control cell, accumulated block by block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from celltwin._constants import BATCH_COL, CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError

__all__ = [
    "DatasetSplit",
    "PredictSummary",
    "open_training_data",
    "predict_from_files",
    "resolve_dataset_split",
    "train_from_files",
    "write_predictions",
]

#: control cells per streamed output block
_BLOCK = 2048


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


@dataclass
class PredictSummary:
    """What :func:`predict_from_files` wrote.

    ``context`` is the one context predicted, or the contexts joined by ``,`` (``contexts`` lists
    them); ``perturbations`` / ``n_cells`` run over every context, in the file's order.
    """

    path: str
    context: str
    n_obs: int
    perturbations: list[str]
    n_cells: list[int]
    sources: dict[str, str] = field(default_factory=dict)
    uns: dict[str, Any] = field(default_factory=dict)
    contexts: list[str] = field(default_factory=list)
    controls: bool = True  # control rows written


#: ``--format vcc2026`` of ``celltwin predict``: the 2026 upload's shape
VCC2026_PREDICT = {"sample_counts": "poisson", "target_depth": 20_000.0, "cells_per_pert": 400}


def _controls_dataset(path: str | Path, columns):
    """Control cells of another file (rows labelled control when the pert column exists, else all)."""
    from celltwin.data.columns import ObsColumns
    from celltwin.data.dataset import CellDataset
    from celltwin.data.source import H5adSource

    src = H5adSource(path)
    cols = columns or ObsColumns()
    if cols.pert_col in src.obs.columns:
        ds = CellDataset([src], ["controls"], cols)
        rows = np.flatnonzero(ds.obs[PERT_COL].to_numpy() == CONTROL_LABEL)
    else:
        import pandas as pd

        src.obs = src.obs.assign(**{cols.pert_col: pd.Categorical([cols.control_label] * src.n_obs)})
        ds = CellDataset([src], ["controls"], cols)
        rows = np.arange(ds.n_obs)
    if rows.size == 0:
        msg = f"controls file {path}: no control cells (obs[{cols.pert_col!r}] == {cols.control_label!r})"
        raise InputError(msg)
    return ds, rows


class _SharedWriter:
    """One output writer shared by several :func:`write_predictions` calls (one per context): entering
    and leaving it does nothing, ``uns`` set by each call is kept for the caller to merge."""

    def __init__(self, writer) -> None:
        self.writer = writer
        self.uns: dict[str, Any] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> bool:
        return False

    def append(self, block) -> None:
        self.writer.append(block)


def predict_from_files(run_dir: str | Path, data: str | Path | None, out: str | Path, *,
                       split: str | Path | None = None, counts: str | Path | None = None,
                       controls: str | Path | None = None, perturbations: Sequence[str] | None = None,
                       context: str | Sequence[str] | None = None, repeat_mean: bool = False,
                       write_real: str | Path | None = None, seed: int = 0, columns=None,
                       sample_counts: str | None = None, nb_theta: float = 10.0,
                       all_contexts: bool = False, cells_per_pert: int | None = None,
                       no_controls: bool = False, target_depth: float | None = None,
                       vcc2026: bool = False) -> PredictSummary:
    """``celltwin predict`` (see the module docstring); returns what was written.

    ``data`` may be ``None`` when ``split`` is given (the split's datasets are read), else it is
    the file (folder, glob) holding the context's control cells.

    Several contexts in one file: ``context`` a list of contexts, or ``all_contexts`` (every
    context of the split's test pairs, else of the data). Each context is predicted from its own
    control cells, with the same ``seed`` (so each context's rows are what a one-context run of it
    writes), contexts one after the other (in the order given; sorted for ``all_contexts``).
    ``cells_per_pert``: exactly that many cells per perturbation (over ``counts``' n_cells and the
    real counts; ``counts`` then needs only a target_gene column, and an optional context column
    gives each context its own list). ``no_controls``: no control rows. ``target_depth`` (with
    ``sample_counts``): the controls' library sizes are rescaled so their median is this depth, per
    context. ``vcc2026``: the 2026 upload's shape: :data:`VCC2026_PREDICT` for whichever of
    ``sample_counts`` / ``target_depth`` / ``cells_per_pert`` is not given, no controls, every
    context unless ``context`` is given, obs columns ``target_gene`` and ``context``.
    """
    import pandas as pd

    from celltwin.data.columns import merge_columns
    from celltwin.data.dataset import CellDataset
    from celltwin.data.inputs import load_inputs
    from celltwin.data.preprocess import Preprocessing
    from celltwin.eval._baseline import read_pert_counts
    from celltwin.runs import load_predictor, read_run

    if vcc2026:
        sample_counts = sample_counts or VCC2026_PREDICT["sample_counts"]
        target_depth = VCC2026_PREDICT["target_depth"] if target_depth is None else target_depth
        cells_per_pert = VCC2026_PREDICT["cells_per_pert"] if cells_per_pert is None else cells_per_pert
        no_controls = True
        all_contexts = all_contexts or context is None
    if cells_per_pert is not None and int(cells_per_pert) < 1:
        msg = f"predict: --cells-per-pert must be >= 1, got {cells_per_pert}"
        raise ConfigError(msg)
    if target_depth is not None:
        if sample_counts is None:
            raise ConfigError("predict: --target-depth needs --sample-counts (it sets the depth of the drawn counts)")
        if not np.isfinite(target_depth) or target_depth <= 0:
            msg = f"predict: --target-depth must be a positive number, got {target_depth}"
            raise ConfigError(msg)
    if all_contexts and context is not None:
        raise ConfigError("predict: give --context or --all-contexts, not both")
    multi = all_contexts or (context is not None and not isinstance(context, str))
    meta, genes = read_run(run_dir)
    pre = Preprocessing.load(run_dir)
    inputs = load_inputs(run_dir)
    if sample_counts not in (None, "poisson", "nb"):
        msg = f"predict: sample_counts must be 'poisson' or 'nb', got {sample_counts!r}"
        raise ConfigError(msg)
    # names: the flags (columns), then the split's [columns], then the run's, then the defaults
    run_columns = meta.get("columns")
    table = None  # {context (None: every context): {perturbation: n_cells}}
    if counts is not None:
        if cells_per_pert is None:  # the VCC's target_gene,n_cells table (controls dropped), at least 1 cell each
            table = {None: {p: n for p, n in read_pert_counts(counts, min_cells=1).items() if p != CONTROL_LABEL}}
        else:  # a perturbation list (pert_counts.csv): n_cells not needed
            from celltwin.eval._prep2026 import read_pert_list

            table = read_pert_list(counts, default_n_cells=int(cells_per_pert))

    def listed(c: str) -> dict[str, int | None]:
        t = table.get(c, table.get(None))
        if t is None:
            msg = (f"counts file {counts}: no rows for context {c!r} (column 'context'); it lists contexts "
                   f"{', '.join(sorted(str(k) for k in table))}")
            raise InputError(msg)
        return t

    if split is not None:
        dataset, sp_obj = open_training_data(split, data, columns, fallback=run_columns)
        rs = resolve_dataset_split(dataset, sp_obj, bool(meta.get("zeroshot_controls_in_train", False)))
        pairs = list(rs.test_pairs)
    else:
        if data is None:
            raise ConfigError("predict: give --data (or --split, whose datasets are read)")
        if not perturbations and table is None:
            raise ConfigError("predict: give --split, --perturbations or --counts (nothing to predict)")
        dataset = CellDataset.from_path(data, merge_columns(columns, run_columns))
        pairs = []
    from celltwin._io import check_outputs

    check_outputs({"-o/--output": out, "--write-real": write_real},
                  {f"data file {f}": f for f in dataset.files if Path(f).exists()})
    where = str(data) if data is not None else dataset.name
    ctx_all = dataset.obs[CONTEXT_COL].to_numpy(dtype=object)
    pert_all = dataset.obs[PERT_COL].to_numpy(dtype=object)
    contexts_present = sorted(set(ctx_all.tolist()))
    explicit = bool(perturbations) or (table is not None and not pairs)

    def names_for(c: str) -> list[str]:
        return list(perturbations) if perturbations else list(listed(c))

    if not multi:
        if explicit:
            if context is None:
                ctxs = sorted({c for c, _ in pairs}) or contexts_present
                if len(ctxs) != 1:
                    msg = f"predict: give --context; the data has several contexts ({', '.join(ctxs)})"
                    raise ConfigError(msg)
                context = ctxs[0]
            pairs = [(context, p) for p in names_for(context)]
        if context is not None:
            if context not in set(contexts_present):
                msg = (f"predict: context {context!r} not found in {where}; contexts present: "
                       f"{', '.join(contexts_present)}")
                raise InputError(msg)
            pairs = [(c, p) for c, p in pairs if c == context]
        if not pairs:
            msg = f"predict: no perturbation to predict{f' in context {context!r}' if context else ''}"
            raise InputError(msg)
        ctxs = sorted({c for c, _ in pairs})
        if len(ctxs) > 1:
            msg = (f"predict: the test pairs span several contexts ({', '.join(ctxs)}); pick one with --context, "
                   "or --all-contexts")
            raise ConfigError(msg)
    else:
        if all_contexts:
            wanted = sorted({c for c, _ in pairs}) if (pairs and not explicit) else contexts_present
        else:
            wanted = list(dict.fromkeys(str(c) for c in context))
            absent = [c for c in wanted if c not in set(contexts_present)]
            if absent:
                msg = (f"predict: context(s) {', '.join(map(repr, absent))} not found in {where}; contexts present: "
                       f"{', '.join(contexts_present)}")
                raise InputError(msg)
        if explicit:
            pairs = [(c, p) for c in wanted for p in names_for(c)]
        else:
            empty = [c for c in wanted if not any(pc == c for pc, _ in pairs)]
            if empty:
                msg = f"predict: the split holds out no perturbation in context(s) {', '.join(map(repr, empty))}"
                raise InputError(msg)
            pairs = [(c, p) for c in wanted for pc, p in pairs if pc == c]
        if not pairs:
            raise InputError("predict: no perturbation to predict")
        ctxs = wanted
    if multi and len(ctxs) > 1 and controls is not None:
        raise ConfigError("predict: --controls holds one context's control cells; it cannot serve several "
                          "contexts (leave --controls out: each context's controls are read from --data)")

    jobs = []  # (context, perturbations, cells of each, control rows)
    for c in ctxs:
        perts = [p for pc, p in pairs if pc == c]
        in_ctx = ctx_all == c
        if cells_per_pert is not None:
            n_cells = [int(cells_per_pert)] * len(perts)
        elif table is not None:
            t = listed(c)
            missing = [p for p in perts if p not in t]
            if missing:
                msg = f"counts file {counts}: no n_cells row for {', '.join(missing[:10])}"
                raise InputError(msg)
            n_cells = [t[p] for p in perts]
        else:
            n_cells = [int(np.sum(in_ctx & (pert_all == p))) for p in perts]
            zero = [p for p, n in zip(perts, n_cells, strict=True) if n == 0]
            if zero:
                msg = (f"predict: no real cells of {', '.join(zero[:10])} in context {c!r} of {where} to take the "
                       f"number of cells from; give --counts (a {PERT_COL},n_cells CSV) or --cells-per-pert")
                raise InputError(msg)
        jobs.append([c, perts, n_cells, None])
    if controls is not None:
        cdata, crows = _controls_dataset(controls, dataset.columns)
        jobs[0][3] = crows
    else:
        cdata = dataset
        for job in jobs:
            job[3] = np.flatnonzero((ctx_all == job[0]) & (pert_all == CONTROL_LABEL))
            if job[3].size == 0:
                label = dataset.columns.control_label if dataset.columns is not None else CONTROL_LABEL
                msg = f"predict: context {job[0]!r} of {where} has no control cells (label {label!r})"
                raise InputError(msg)
    for s in cdata.sources:  # every run gene must be in the control file(s)
        pre.gene_index(s.var_names, f"data file {s.name}" if controls is None else f"controls file {s.name}")
    if inputs["embed_key"] and inputs["embed_key"] not in cdata.obsm_keys():
        msg = (f"{cdata.name}: the run reads obsm[{inputs['embed_key']!r}] (--embed-key), which the control "
               f"file lacks; available: {', '.join(cdata.obsm_keys()) or '(none)'}")
        raise InputError(msg)

    if meta.get("arch") == "arc-state" and pre.target_sum is None and inputs["kind"] == "genes" \
            and _looks_like_counts(cdata):
        msg = (f"{cdata.name}: the control cells hold integer counts, and the imported arc-state model {run_dir} reads "
               "log1p-normalised X (as arc-state's preprocess_train writes it); normalise the file, or import the "
               "model again with --target-sum T (celltwin then applies log1p(normalize_total(X, T)))")
        raise InputError(msg)
    predictor = load_predictor(run_dir)
    out_names = list(getattr(predictor, "output_names", genes))
    # the output keeps the data's own perturbation column, control label and context column names
    out_pert, out_ctrl, out_ctx = _output_columns(dataset)
    if vcc2026:  # the upload's names
        out_pert, out_ctx = PERT_COL, CONTEXT_COL
    labels: list[str] = []
    ctx_labels: list[str] = []
    for c, perts, n_cells, crows in jobs:
        lab = [p for p, n in zip(perts, n_cells, strict=True) for _ in range(n)]
        lab += [] if no_controls else [out_ctrl] * int(crows.size)
        labels += lab
        ctx_labels += [c] * len(lab)
    obs = pd.DataFrame({out_pert: pd.Categorical(labels), out_ctx: pd.Categorical(ctx_labels)},
                       index=pd.Index([f"pred_{i}" for i in range(len(labels))]))
    var = pd.DataFrame(index=pd.Index(out_names))
    info = {"context": jobs[0][0] if len(jobs) == 1 else ",".join(ctxs), "repeat_mean": bool(repeat_mean),
            "seed": int(seed), "model": str(meta.get("model")), "run": str(run_dir),
            "output_space": inputs["output_space"], "pert_col": out_pert, "control_label": out_ctrl,
            "context_col": out_ctx}
    if multi:
        info["contexts"] = np.asarray(ctxs, dtype=object)
    if no_controls:
        info["controls_written"] = False
    if cells_per_pert is not None:
        info["cells_per_pert"] = int(cells_per_pert)
    from celltwin.data.writer import CSRH5adWriter

    kw = {"seed": seed, "repeat_mean": repeat_mean, "sample_counts": sample_counts, "nb_theta": nb_theta,
          "where": f"run {run_dir}"}
    if no_controls:
        kw["controls"] = False
    if target_depth is not None:
        kw["target_depth"] = float(target_depth)
    if len(jobs) == 1:
        c, perts, n_cells, crows = jobs[0]
        sources, uns = write_predictions(lambda: CSRH5adWriter(out, obs, var), predictor, cdata, crows, pre,
                                         inputs, perts, n_cells, c, info=info, **kw)
    else:
        sources, uns = _write_contexts(CSRH5adWriter(out, obs, var), jobs, predictor, cdata, pre, inputs, info, kw)
    if write_real is not None:
        _write_real(dataset, [(c, perts) for c, perts, _, _ in jobs], out_names, write_real, inputs)
    all_perts = [p for _, perts, _, _ in jobs for p in perts]
    all_n = [n for _, _, ns, _ in jobs for n in ns]
    return PredictSummary(str(out), info["context"], len(labels), all_perts, all_n, sources, uns,
                          contexts=list(ctxs), controls=not no_controls)


def _write_contexts(writer, jobs, predictor, cdata, pre, inputs: dict, info: dict, kw: dict):
    """Several contexts into one file: :func:`write_predictions` per context on a shared writer.

    ``uns["celltwin_predict"]``: ``info``, with ``sources`` (perturbation, source, context arrays)
    and ``controls_drawn_with_replacement`` (+ ``..._context``) over every context.
    """
    sources: dict[str, str] = {}
    rec: dict[str, list[str]] = {"perturbation": [], "source": [], "context": []}
    repl: list[str] = []
    repl_ctx: list[str] = []
    counts_info = None
    with writer as w:
        shared = _SharedWriter(w)
        for c, perts, n_cells, crows in jobs:
            src, uns_c = write_predictions(lambda: shared, predictor, cdata, crows, pre, inputs, perts, n_cells, c,
                                           info=dict(info), **kw)
            sources.update(src)
            for p, v in src.items():
                rec["perturbation"].append(p)
                rec["source"].append(str(v))
                rec["context"].append(c)
            r = [str(x) for x in uns_c["celltwin_predict"]["controls_drawn_with_replacement"]]
            repl += r
            repl_ctx += [c] * len(r)
            counts_info = uns_c["celltwin_predict"].get("counts", counts_info)
        merged = dict(info)
        merged["sources"] = {k: np.asarray(v, dtype=object) for k, v in rec.items()}
        merged["controls_drawn_with_replacement"] = np.asarray(repl, dtype=object)
        merged["controls_drawn_with_replacement_context"] = np.asarray(repl_ctx, dtype=object)
        if counts_info is not None:
            merged["counts"] = counts_info
        uns = {"celltwin_predict": merged}
        w.uns = uns
    return sources, uns


def write_predictions(open_writer, predictor, cdata, crows: np.ndarray, pre, inputs: dict, perts: list[str],
                      n_cells: list[int], ctx: str, *, seed: int = 0, repeat_mean: bool = False,
                      sample_counts: str | None = None, nb_theta: float = 10.0, info: dict | None = None,
                      where: str = "run", controls: bool = True,
                      target_depth: float | None = None) -> tuple[dict[str, str], dict[str, Any]]:
    """The prediction loop shared by ``celltwin predict`` and ``Model.predict``: ``(sources, uns)``.

    ``open_writer()`` returns the output writer (a context manager with ``append(block)`` and
    ``uns``: :class:`~celltwin.data.writer.CSRH5adWriter` for a file, or
    :class:`celltwin.predict.AnnDataWriter`). Each perturbation's control draw (rows of ``crows``
    of ``cdata``, ``numpy.random.default_rng(seed)`` in request order) is read, predicted by
    ``predictor`` in context ``ctx`` and appended; then the controls themselves, in blocks
    (``controls=False``: not). ``info`` (the ``uns["celltwin_predict"]`` fields known to the caller)
    is completed with the sources, the perturbations whose controls were drawn with replacement and
    the count model. ``target_depth`` (with ``sample_counts``): the controls' library sizes are
    multiplied by ``target_depth / median`` before the draws, so the drawn cells' library sizes
    have that median.
    """
    m = int(crows.size)
    n_pred = int(sum(n_cells))
    out_names = list(getattr(predictor, "output_names", pre.genes))
    rng = np.random.default_rng(seed)
    counts_rng = np.random.default_rng([seed, 7])
    target_sum = pre.target_sum
    lib = None
    if target_depth is not None and sample_counts is None:
        raise ConfigError("target_depth needs sample_counts (the depth of drawn counts)")
    if sample_counts is not None:
        if target_sum is None:
            raise ConfigError("--sample-counts: the run was trained on log-normalised data (no normalize_total "
                              "target), so there is no count scale to sample on")
        if not _looks_like_counts(cdata):
            raise InputError("--sample-counts: the control cells do not hold integer counts")
        lib = cdata.library_sizes(crows)
        if target_depth is not None:
            med = float(np.median(lib)) if lib.size else 0.0
            if not med > 0:
                msg = (f"--target-depth: the control cells of context {ctx!r} have median library size {med:g}; "
                       "expected > 0 to rescale")
                raise InputError(msg)
            lib = lib * (float(target_depth) / med)
        lib_draw = lib[counts_rng.integers(0, m, size=n_pred)]
    mean_ctrl = _mean_control(cdata, crows, pre) if repeat_mean else None
    sources: dict[str, str] = {}
    replaced: list[str] = []
    describe = getattr(predictor, "describe", None)
    batch_all = None
    if getattr(predictor, "uses_batch", False):
        if BATCH_COL not in cdata.obs:
            msg = (f"{where}: the model has a batch encoder, and the control cells have no batch column "
                   "(give --batch-col)")
            raise InputError(msg)
        batch_all = cdata.obs[BATCH_COL].to_numpy(dtype=object).astype(str)
    uns = {"celltwin_predict": dict(info or {})}
    with open_writer() as w:
        done = 0
        for pert, n in zip(perts, n_cells, strict=True):
            with_repl = n > m
            if with_repl:
                replaced.append(pert)
            idx = rng.choice(m, size=n, replace=with_repl)
            if repeat_mean:
                base = np.repeat(mean_ctrl, n, axis=0)
                emb = None
            else:
                r = crows[idx]
                # an embedding-output run never reads the genes: skip the (n, G) read
                base = (np.zeros((n, 0), np.float32) if inputs["output_space"] == "embedding"
                        else cdata.read_model(r, pre))  # (n, G) float32
                emb = _read_obsm(cdata, r, inputs["embed_key"]) if inputs["embed_key"] else None
            kw: dict[str, Any] = {"inputs": emb} if emb is not None else {}
            if getattr(predictor, "uses_batch", False):  # a batch encoder: the drawn controls' batches
                kw["batches"] = batch_all[r] if not repeat_mean else None
            pred = np.asarray(predictor.predict(base, pert, ctx, rng, **kw), dtype=np.float32)
            if pred.shape != (n, len(out_names)):
                msg = f"model returned shape {pred.shape} for {pert!r}, expected {(n, len(out_names))}"
                raise InputError(msg)
            if not np.isfinite(pred).all():
                msg = (f"{where}: the model predicts non-finite values for {pert!r} (diverged or corrupted "
                       "weights); retrain it, e.g. with a lower learning rate")
                raise InputError(msg)
            if sample_counts is not None:
                from celltwin.data.preprocess import sample_counts as draw

                pred = draw(pred, lib_draw[done:done + n], float(target_sum), counts_rng, dist=sample_counts,
                            theta=nb_theta).astype(np.float32)
            w.append(pred)
            done += n
            if describe is not None:
                sources[pert] = str(describe(pert, ctx))
        for start in range(0, m if controls else 0, _BLOCK):
            r = crows[start:start + _BLOCK]
            if inputs["output_space"] == "embedding":
                w.append(_read_obsm(cdata, r, inputs["embed_key"]))
            elif sample_counts is not None:
                w.append(_raw_genes(cdata, r, pre))
            else:
                w.append(cdata.read_model(r, pre, dense=False))
        info = uns["celltwin_predict"]
        from celltwin.predict import sources_record

        info["sources"] = sources_record(sources)
        info["controls_drawn_with_replacement"] = np.asarray(replaced, dtype=object)
        if sample_counts is not None:
            info["counts"] = {
                "dist": sample_counts, "theta": float(nb_theta) if sample_counts == "nb" else float("nan"),
                "target_sum": float(target_sum),
                "library_sizes": "totals of the context's real control cells, drawn with replacement"}
            if target_depth is not None:
                info["counts"]["target_depth"] = float(target_depth)
                info["counts"]["library_sizes"] = ("totals of the context's real control cells, rescaled to median "
                                                   "target_depth, drawn with replacement")
        w.uns = uns
    return sources, uns


def _output_columns(dataset) -> tuple[str, str, str]:
    """(perturbation column, control label, context column) the data uses: the names predict writes."""
    cols = dataset.columns
    if cols is None:
        return PERT_COL, CONTROL_LABEL, CONTEXT_COL
    ctx = cols.context_col or CONTEXT_COL
    return cols.pert_col, cols.control_label, (ctx if ctx != cols.pert_col else CONTEXT_COL)


def _looks_like_counts(cdata) -> bool:
    from celltwin.data.preprocess import looks_like_counts

    return looks_like_counts(cdata)


def _read_obsm(cdata, rows: np.ndarray, key: str) -> np.ndarray:
    import scipy.sparse as sp

    b = cdata.read_rows(rows, obsm_key=key)
    return b.toarray() if sp.issparse(b) else np.asarray(b, dtype=np.float32)


def _raw_genes(cdata, rows: np.ndarray, pre):
    """Raw values of the run's genes (no normalisation), CSR float32."""
    import scipy.sparse as sp

    from celltwin.data.preprocess import Preprocessing

    raw = Preprocessing(genes=list(pre.genes), target_sum=None, log1p=False)
    return sp.csr_matrix(cdata.read_model(rows, raw, dense=False), dtype=np.float32)


def _mean_control(cdata, rows: np.ndarray, pre) -> np.ndarray:
    """(1, G) float32 mean of the control cells in model space (float64 sums, row order)."""
    from celltwin.baselines._effects import GroupSums

    sums = GroupSums(1, len(pre.genes))
    for start in range(0, rows.size, _BLOCK):
        r = rows[start:start + _BLOCK]
        sums.add(cdata.read_model(r, pre, dense=False), np.zeros(r.size, np.int64))
    return sums.means()[0].astype(np.float32)


def _write_real(dataset, jobs, out_names: list[str], path, inputs: dict) -> None:
    """The real cells of each ``(context, perturbations)`` of ``jobs`` and the controls of those contexts
    (raw values, the run's output genes), in the data's row order."""
    import pandas as pd

    from celltwin.data.preprocess import Preprocessing
    from celltwin.data.writer import CSRH5adWriter

    pert_all = dataset.obs[PERT_COL].to_numpy(dtype=object)
    ctx_all = dataset.obs[CONTEXT_COL].to_numpy(dtype=object)
    sel = np.zeros(dataset.n_obs, dtype=bool)
    for ctx, perts in jobs:
        sel |= (ctx_all == ctx) & (np.isin(pert_all, perts) | (pert_all == CONTROL_LABEL))
    rows = np.flatnonzero(sel)
    out_pert, out_ctrl, out_ctx = _output_columns(dataset)
    labels = np.where(pert_all[rows] == CONTROL_LABEL, out_ctrl, pert_all[rows])
    obs = pd.DataFrame({out_pert: pd.Categorical(labels), out_ctx: pd.Categorical(ctx_all[rows])},
                       index=pd.Index(dataset.obs.index[rows].astype(str)))
    if inputs["output_space"] == "embedding":
        read = (lambda r: _read_obsm(dataset, r, inputs["embed_key"]))
    else:
        raw = Preprocessing(genes=list(out_names), target_sum=None, log1p=False)
        read = (lambda r: dataset.read_model(r, raw, dense=False))
    with CSRH5adWriter(path, obs, pd.DataFrame(index=pd.Index(out_names))) as w:
        for start in range(0, rows.size, _BLOCK):
            w.append(read(rows[start:start + _BLOCK]))
