"""``celltwin predict`` on files, streamed: what to predict, from which control cells, into one output.

Prediction (:func:`predict_from_files`) follows the policy of :mod:`celltwin.predict` (one
context per file unless several are asked for, each then predicted from its own controls; cells
per perturbation from ``--counts``, the real test cells or ``--cells-per-pert``; control cells
drawn with ``numpy.random.default_rng(seed)`` without replacement when there are enough) but
never holds more than one perturbation's cells: each perturbation's control draw is read from
disk, predicted and appended to the output as a CSR block (:class:`~celltwin.data.writer.CSRH5adWriter`),
then the context's control cells are streamed in blocks (:mod:`celltwin.predict_stream`).
``--write-real`` streams the real cells the same way. ``--repeat-mean`` uses the mean control
cell, accumulated block by block.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError
from celltwin.pipeline import open_training_data, resolve_dataset_split
from celltwin.predict_stream import output_columns, write_contexts, write_predictions, write_real_cells

__all__ = ["VCC2026_PREDICT", "PredictSummary", "predict_from_files"]


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
    from celltwin.data.preprocess import Preprocessing, looks_like_counts
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
    from celltwin._output_checks import check_outputs

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
            and looks_like_counts(cdata):
        msg = (f"{cdata.name}: the control cells hold integer counts, and the imported arc-state model {run_dir} reads "
               "log1p-normalised X (as arc-state's preprocess_train writes it); normalise the file, or import the "
               "model again with --target-sum T (celltwin then applies log1p(normalize_total(X, T)))")
        raise InputError(msg)
    predictor = load_predictor(run_dir)
    out_names = list(getattr(predictor, "output_names", genes))
    # the output keeps the data's own perturbation column, control label and context column names
    out_pert, out_ctrl, out_ctx = output_columns(dataset)
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
        sources, uns = write_contexts(CSRH5adWriter(out, obs, var), jobs, predictor, cdata, pre, inputs, info, kw)
    if write_real is not None:
        write_real_cells(dataset, [(c, perts) for c, perts, _, _ in jobs], out_names, write_real, inputs)
    all_perts = [p for _, perts, _, _ in jobs for p in perts]
    all_n = [n for _, _, ns, _ in jobs for n in ns]
    return PredictSummary(str(out), info["context"], len(labels), all_perts, all_n, sources, uns,
                          contexts=list(ctxs), controls=not no_controls)
