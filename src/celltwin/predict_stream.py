"""The streamed prediction loop shared by ``celltwin predict`` and ``Model.predict``: :func:`write_predictions`.

One perturbation's control draw at a time is read from disk, predicted and appended to the output
writer, then the context's control cells follow in blocks of :data:`BLOCK`; :func:`write_contexts`
writes several contexts into one file, :func:`write_real_cells` the real cells a prediction is scored against.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from celltwin._constants import BATCH_COL, CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError

__all__ = ["BLOCK", "output_columns", "write_contexts", "write_predictions", "write_real_cells"]

#: control cells per streamed output block
BLOCK = 2048


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


def write_contexts(writer, jobs, predictor, cdata, pre, inputs: dict, info: dict, kw: dict):
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
    mean_ctrl = mean_control(cdata, crows, pre) if repeat_mean else None
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
                emb = read_obsm(cdata, r, inputs["embed_key"]) if inputs["embed_key"] else None
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
        for start in range(0, m if controls else 0, BLOCK):
            r = crows[start:start + BLOCK]
            if inputs["output_space"] == "embedding":
                w.append(read_obsm(cdata, r, inputs["embed_key"]))
            elif sample_counts is not None:
                w.append(raw_genes(cdata, r, pre))
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


def output_columns(dataset) -> tuple[str, str, str]:
    """(perturbation column, control label, context column) the data uses: the names predict writes."""
    cols = dataset.columns
    if cols is None:
        return PERT_COL, CONTROL_LABEL, CONTEXT_COL
    ctx = cols.context_col or CONTEXT_COL
    return cols.pert_col, cols.control_label, (ctx if ctx != cols.pert_col else CONTEXT_COL)


def _looks_like_counts(cdata) -> bool:
    from celltwin.data.preprocess import looks_like_counts

    return looks_like_counts(cdata)


def read_obsm(cdata, rows: np.ndarray, key: str) -> np.ndarray:
    import scipy.sparse as sp

    b = cdata.read_rows(rows, obsm_key=key)
    return b.toarray() if sp.issparse(b) else np.asarray(b, dtype=np.float32)


def raw_genes(cdata, rows: np.ndarray, pre):
    """Raw values of the run's genes (no normalisation), CSR float32."""
    import scipy.sparse as sp

    from celltwin.data.preprocess import Preprocessing

    raw = Preprocessing(genes=list(pre.genes), target_sum=None, log1p=False)
    return sp.csr_matrix(cdata.read_model(rows, raw, dense=False), dtype=np.float32)


def mean_control(cdata, rows: np.ndarray, pre) -> np.ndarray:
    """(1, G) float32 mean of the control cells in model space (float64 sums, row order)."""
    from celltwin.baselines._effects import GroupSums

    sums = GroupSums(1, len(pre.genes))
    for start in range(0, rows.size, BLOCK):
        r = rows[start:start + BLOCK]
        sums.add(cdata.read_model(r, pre, dense=False), np.zeros(r.size, np.int64))
    return sums.means()[0].astype(np.float32)


def write_real_cells(dataset, jobs, out_names: list[str], path, inputs: dict) -> None:
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
    out_pert, out_ctrl, out_ctx = output_columns(dataset)
    labels = np.where(pert_all[rows] == CONTROL_LABEL, out_ctrl, pert_all[rows])
    obs = pd.DataFrame({out_pert: pd.Categorical(labels), out_ctx: pd.Categorical(ctx_all[rows])},
                       index=pd.Index(dataset.obs.index[rows].astype(str)))
    if inputs["output_space"] == "embedding":
        read = (lambda r: read_obsm(dataset, r, inputs["embed_key"]))
    else:
        raw = Preprocessing(genes=list(out_names), target_sum=None, log1p=False)
        read = (lambda r: dataset.read_model(r, raw, dense=False))
    with CSRH5adWriter(path, obs, pd.DataFrame(index=pd.Index(out_names))) as w:
        for start in range(0, rows.size, BLOCK):
            w.append(read(rows[start:start + BLOCK]))
