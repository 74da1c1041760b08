"""``evaluate``: the AnnData adapter of the VCC evaluator (cell-eval 0.8.2 ``run``, exact).

Pipeline: open and validate both sides in one streamed pass each (:mod:`celltwin.eval._sides`,
rules of :mod:`celltwin.eval._load`), check that the two files agree (genes, perturbations),
then per side the float32/float64 pseudobulks and the DE statistics, group batch by group batch
from disk (the real side's DE table cached by content hash), then the metrics of the profile
(:mod:`celltwin.eval._registry`).

Output tables match cell-eval's ``results.csv`` / ``agg_results.csv``: one row per non-control
perturbation in sorted order (``np.unique``), a ``perturbation`` column then the metric columns in
cell-eval's order (DE metrics first, then the AnnData metrics: ``overlap_at_N, mae,
discrimination_score_l1`` for the ``vcc`` profile), and the ``describe`` statistics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from celltwin.errors import InputError

# the options: celltwin.eval._config; the metric columns and profiles: celltwin.eval._registry
# (importable from here too)
from celltwin.eval._config import DEFAULT_CACHE_DIR, EvalConfig
from celltwin.eval._registry import PROFILE_METRICS, PROFILES

# the result and its files: celltwin.eval._results (importable from here too)
from celltwin.eval._results import DE_FORMATS, OUTPUT_NAMES, EvalResult, write_de_table

__all__ = [
    "DEFAULT_CACHE_DIR",
    "DE_FORMATS",
    "OUTPUT_NAMES",
    "PROFILES",
    "PROFILE_METRICS",
    "EvalConfig",
    "EvalResult",
    "evaluate",
    "evaluate_by_celltype",
    "write_de_table",
]

_MIN_CLUSTER_PERTS = 3  # clustering_agreement: kNN graph of the perturbation centroids


def evaluate_by_celltype(
    pred: Any, real: Any, celltype_col: str, *, config: EvalConfig | None = None, de_real: Any = None,
    de_pred: Any = None,
) -> dict[str, EvalResult]:
    """:func:`evaluate` once per cell type of ``obs[celltype_col]`` (cell-eval ``--celltype-col``).

    Each cell type's cells of both files are evaluated as files of their own (a counts file is
    normalised with the median of that cell type's cells, as cell-eval does on its AnnData
    subsets), streamed from the same files. Cell types come in the real file's order of first
    appearance; both files must hold the same cell types. Returns ``{cell type: EvalResult}``;
    write them with ``result.write(outdir, prefix=cell_type)``.
    """
    from celltwin.eval._sides import _open_source

    cfg = config if config is not None else EvalConfig()
    groups = []
    for obj, which in ((real, "real"), (pred, "pred")):
        source, name = _open_source(obj, which)
        if celltype_col not in source.obs.columns:
            cols = ", ".join(map(str, source.obs.columns[:10]))
            msg = f"{name}: obs column {celltype_col!r} not found (expected the cell type column; obs has: {cols})"
            raise InputError(msg)
        col = source.obs[celltype_col].astype(str).to_numpy()
        groups.append((name, col))
    (real_name, ct_r), (pred_name, ct_p) = groups
    import pandas as pd

    order = [str(c) for c in pd.unique(ct_r)]
    if set(order) != set(ct_p.tolist()):
        msg = (f"{pred_name}: cell types in obs[{celltype_col!r}] differ from {real_name} "
               f"(real: {sorted(order)[:5]}, pred: {sorted(set(ct_p.tolist()))[:5]})")
        raise InputError(msg)
    return {
        ct: evaluate(pred, real, config=cfg, de_real=de_real, de_pred=de_pred,
                     _rows=(np.flatnonzero(ct_p == ct), np.flatnonzero(ct_r == ct)))
        for ct in order
    }


@contextlib.contextmanager
def _progress(enabled: bool) -> Iterator[Any]:
    """A rich Progress (or a no-op stand-in) whose ``step(name)`` context shows one spinner per step."""
    if not enabled:

        class _Null:
            @contextlib.contextmanager
            def step(self, name: str) -> Iterator[None]:
                yield

        yield _Null()
        return
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    with Progress(
        SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), transient=False
    ) as prog:

        class _Steps:
            @contextlib.contextmanager
            def step(self, name: str) -> Iterator[None]:
                task = prog.add_task(name, total=1)
                yield
                prog.update(task, completed=1)

        yield _Steps()


def _align_genes(real, pred, reorder: bool) -> None:
    """Make ``pred`` return its genes in ``real``'s order, or raise a one-line InputError."""
    if np.array_equal(real.genes, pred.genes):
        return
    rs, ps = set(real.genes.tolist()), set(pred.genes.tolist())
    if rs != ps:
        only_real = sorted(rs - ps)
        only_pred = sorted(ps - rs)
        msg = (
            f"{pred.name}: var_names differ from {real.name} (expected the same {real.genes.size} genes; "
            f"{len(only_real)} missing, e.g. {only_real[:3]}, {len(only_pred)} extra, e.g. {only_pred[:3]})"
        )
        raise InputError(msg)
    if not reorder:
        first = int(np.flatnonzero(real.genes != pred.genes)[0])
        msg = (
            f"{pred.name}: var_names are in a different order than {real.name} (position {first}: expected "
            f"{real.genes[first]!r}, found {pred.genes[first]!r}); pass --reorder-genes to reorder the prediction"
        )
        raise InputError(msg)
    pred.reorder(real.genes)


def _check_perts(real, pred, control: str, pert_col: str) -> np.ndarray:
    pr, pp = np.unique(real.labels), np.unique(pred.labels)
    if not np.array_equal(pr, pp):
        only_real = sorted(set(pr.tolist()) - set(pp.tolist()))
        only_pred = sorted(set(pp.tolist()) - set(pr.tolist()))
        msg = (
            f"{pred.name}: obs[{pert_col!r}] has a different perturbation set than {real.name} (expected the same "
            f"{pr.size} labels; missing {len(only_real)}, e.g. {only_real[:3]}; extra {len(only_pred)}, e.g. {only_pred[:3]})"
        )
        raise InputError(msg)
    perts = pr[pr != control]
    if perts.size == 0:
        msg = f"{real.name}: obs[{pert_col!r}] has no perturbation other than the control {control!r} (expected at least one)"
        raise InputError(msg)
    return perts


def _side_stats(prog, side, which: str, names: np.ndarray, cfg: EvalConfig, de: Any):
    """``(pseudobulks of names, DE table)`` of one side. ``de``: a precomputed table (kept), ``None``
    (compute it) or ``False`` (not needed). v2 streams group batches; legacy (2025 scorer) reads
    the whole side into memory and runs :func:`de_table` on it, as before."""
    from celltwin.eval import _de, _de_cache
    from celltwin.eval._sides import side_tables

    want = de is None
    if want and cfg.mode == "legacy":
        from celltwin.eval._metrics import pseudobulk

        with prog.step(f"differential expression ({which}, legacy: whole file in memory)"):
            X = side.rows(np.arange(side.n_obs))
            bulk = pseudobulk(X, np.searchsorted(names, side.labels), names.size)
            table = _de.de_table(X, side.labels, cfg.control, side.genes, mode="legacy",
                                 cache_dir=cfg.cache_dir if which == "real" else None,
                                 n_threads=cfg.num_threads)
        return bulk, table
    key = None
    if want and which == "real" and cfg.cache_dir is not None and side.digest is not None:
        key = _stream_cache_key(side, cfg)
        cached = _de_cache.load(cfg.cache_dir, key)
        if cached is not None:
            de, want = cached, False
    label = f"pseudobulks and differential expression ({which})" if want else f"pseudobulks ({which})"
    with prog.step(label), _numba_threads(cfg.num_threads):
        bulk, arrays = side_tables(side, names, cfg.control, de=want)
    if want:
        targets = [str(n) for n in names if n != cfg.control]
        de = _de.de_v2_frame(arrays, targets, side.genes)
        if key is not None:
            _de_cache.save(cfg.cache_dir, key, de)
    return bulk, (de if de is not False else None)


def _stream_cache_key(side, cfg: EvalConfig) -> str:
    """DE-cache key of a streamed side: its stored content digest, how it was read, labels, genes."""
    import hashlib

    from celltwin.eval._de_cache import DE_CACHE_VERSION, _update_strings

    h = hashlib.blake2b(digest_size=20)
    h.update(f"{DE_CACHE_VERSION}|stream|v2|{side.digest}|{side.was_counts}|{side.dtype.str}".encode())
    for part, values in (("labels", side.labels), ("control", [cfg.control]), ("genes", side.genes)):
        h.update(part.encode())
        _update_strings(h, values)
    return h.hexdigest()


@contextlib.contextmanager
def _numba_threads(n: int | None) -> Iterator[None]:
    if n is None:
        yield
        return
    import numba

    prev = numba.get_num_threads()
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))
    try:
        yield
    finally:
        numba.set_num_threads(prev)


def _results_frames(perts: np.ndarray, metrics: dict[str, np.ndarray], nulls: dict[str, np.ndarray]):
    """``results`` (nulls as NaN; see ``nulls``) and ``agg`` (polars ``describe``) DataFrames."""
    import pandas as pd

    from celltwin.eval._metrics import DESCRIBE_ROWS, describe

    results = pd.DataFrame({"perturbation": perts.astype(object)})
    for name, vals in metrics.items():
        results[name] = np.asarray(vals, dtype=np.float64)
    agg = pd.DataFrame({"statistic": list(DESCRIBE_ROWS)})
    for name, vals in metrics.items():
        agg[name] = describe(vals, nulls.get(name))
    return results, agg


def evaluate(
    pred: Any, real: Any, *, config: EvalConfig | None = None, de_real: Any = None, de_pred: Any = None,
    _rows: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> EvalResult:
    """Evaluate a prediction against the real data with cell-eval 0.8.2's exact semantics.

    ``pred`` / ``real``: ``.h5ad`` paths or AnnData objects; neither is modified (counts are
    normalised on copies of the rows as they are read). ``de_real`` / ``de_pred``: optional
    precomputed DE tables (pandas or polars, pdex columns) used instead of computing them. Raises
    :class:`InputError` on bad input.

    Memory: files are not loaded whole. Each side is validated in one streamed pass, then its
    control cells are held and the perturbations are read in batches (see
    :mod:`celltwin.eval._sides`): peak memory is about the control cells plus two batches of
    ~768 MiB, not the files' size. ``mode="legacy"`` and the cell-level metrics of the ``full``
    profile (``pearson_edistance``, ``clustering_agreement``) still read what they need whole.
    """
    from celltwin.eval import _registry
    from celltwin.eval._side_rows import MixedSide
    from celltwin.eval._sides import open_side

    cfg = config if config is not None else EvalConfig()
    metric_names = _registry.metric_names(cfg.profile, cfg.skip_metrics)
    if "clustering_agreement" in metric_names and not _has_cluster_extra():
        import warnings

        warnings.warn(
            "clustering_agreement skipped: it needs scanpy and python-igraph "
            "(pip install 'celltwin[cluster]'); every other metric of the profile is computed",
            stacklevel=2,
        )
        metric_names = tuple(m for m in metric_names if m != "clustering_agreement")
    with _progress(cfg.progress) as prog:
        # Both sides stay on disk (an AnnData stays untouched): one validation pass each, then rows
        # are read and normalised per group batch (celltwin.eval._sides).
        with prog.step("reading and checking real"):
            r = open_side(real, pert_col=cfg.pert_col, control=cfg.control, which="real",
                          digest=cfg.cache_dir is not None, rows=_rows[1])
        with prog.step("reading and checking pred"):
            p = open_side(pred, pert_col=cfg.pert_col, control=cfg.control, which="pred", rows=_rows[0])
        _align_genes(r, p, cfg.reorder_genes)
        perts = _check_perts(r, p, cfg.control, cfg.pert_col)
        if "clustering_agreement" in metric_names and len(perts) < _MIN_CLUSTER_PERTS:
            # scanpy's kNN graph of the perturbation centroids needs >= 2 neighbours (cell-eval
            # crashes with "Maximum allowed size exceeded"): leave the column out, like without scanpy
            import warnings

            warnings.warn(
                f"clustering_agreement skipped: it needs at least {_MIN_CLUSTER_PERTS} perturbations "
                f"(got {len(perts)}); every other metric of the profile is computed",
                stacklevel=2,
            )
            metric_names = tuple(m for m in metric_names if m != "clustering_agreement")
        names = np.unique(r.labels)  # all labels, control included, sorted
        ctrl = int(np.searchsorted(names, cfg.control))
        if cfg.control_source == "real":
            p = MixedSide(p, r, cfg.control)

        need_de = any(m in _registry.DE_METRICS for m in metric_names)
        bulk_r, de_real = _side_stats(prog, r, "real", names, cfg, de_real if need_de else False)
        bulk_p, de_pred = _side_stats(prog, p, "pred", names, cfg, de_pred if need_de else False)
        keep = np.flatnonzero(names != cfg.control)
        delta_r = bulk_r[keep] - bulk_r[ctrl]
        delta_p = bulk_p[keep] - bulk_p[ctrl]
        embed = None
        if cfg.embed_key is not None and {"discrimination_score_l2", "discrimination_score_cosine"} & set(metric_names):
            from celltwin.eval._sides import obsm_bulk

            with prog.step(f"pseudobulks of obsm[{cfg.embed_key!r}]"):
                e_r = obsm_bulk(r, names, cfg.embed_key)
                e_p = obsm_bulk(p, names, cfg.embed_key)
            if e_r.shape[1] != e_p.shape[1]:
                msg = (f"{p.name}: obsm[{cfg.embed_key!r}] has {e_p.shape[1]} dimensions, {r.name} has "
                       f"{e_r.shape[1]} (expected the same embedding on both sides)")
                raise InputError(msg)
            embed = (e_r[keep] - e_r[ctrl], e_p[keep] - e_p[ctrl])
        with prog.step("metrics"):
            metrics, nulls = _compute_metrics(
                metric_names,
                r,
                p,
                perts,
                bulk_r[keep],
                bulk_p[keep],
                delta_r,
                delta_p,
                de_real,
                de_pred,
                cfg.control,
                legacy=cfg.mode == "legacy",
                embed=embed,
            )
    results, agg = _results_frames(perts, {m: metrics[m] for m in metric_names}, nulls)
    bulk = {"delta_real": delta_r, "delta_pred": delta_p, "perts": perts, "genes": r.genes}
    return EvalResult(
        results=results, agg=agg, de_real=de_real, de_pred=de_pred, config=cfg, bulk=bulk, nulls=nulls
    )


def _has_cluster_extra() -> bool:
    """Whether scanpy, python-igraph and scikit-learn import (the ``cluster`` extra)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("scanpy", "igraph", "sklearn"))


def _compute_metrics(
    names, r, p, perts, pb_r, pb_p, delta_r, delta_p, de_real, de_pred, control, legacy=False, embed=None
):
    """Values (and null masks) of the requested metric columns (:mod:`celltwin.eval._registry`)."""
    from celltwin.eval._registry import MetricContext, compute_metrics

    ctx = MetricContext(r, p, perts, pb_r, pb_p, delta_r, delta_p, de_real, de_pred, control, legacy, embed)
    return compute_metrics(names, ctx)
