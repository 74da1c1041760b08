"""``evaluate``: the AnnData adapter of the VCC evaluator (cell-eval 0.8.2 ``run``, exact).

Pipeline: read and validate both files (:mod:`celltwin.eval._load`), normalise each counts file on
its own, check that the two files agree (genes, perturbations), build float32/float64 pseudobulks
without densifying, compute the DE tables with :func:`celltwin.eval._de.de_table` (the real side
cached by content hash), then the metrics of the profile (:mod:`celltwin.eval._metrics`).

Output tables match cell-eval's ``results.csv`` / ``agg_results.csv``: one row per non-control
perturbation in sorted order (``np.unique``), a ``perturbation`` column then the metric columns in
cell-eval's order (DE metrics first, then the AnnData metrics: ``overlap_at_N, mae,
discrimination_score_l1`` for the ``vcc`` profile), and the ``describe`` statistics.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from celltwin._constants import CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError, InputError

__all__ = [
    "EvalConfig",
    "EvalResult",
    "evaluate",
    "write_de_table",
    "PROFILES",
    "PROFILE_METRICS",
    "DE_FORMATS",
    "DEFAULT_CACHE_DIR",
]

#: Metric columns of each profile, in cell-eval's column order.
PROFILE_METRICS: dict[str, tuple[str, ...]] = {
    "vcc": ("overlap_at_N", "mae", "discrimination_score_l1"),
    "pds": ("discrimination_score_l1",),
    # cell-eval's ``full`` profile; clustering_agreement needs the optional ``cluster`` extra
    "full": (
        *(f"overlap_at_{k}" for k in ("N", "50", "100", "200", "500")),
        *(f"precision_at_{k}" for k in ("N", "50", "100", "200", "500")),
        "de_spearman_sig",
        "de_direction_match",
        "de_spearman_lfc_sig",
        "de_sig_genes_recall",
        "de_nsig_counts_real",
        "de_nsig_counts_pred",
        "pr_auc",
        "roc_auc",
        "pearson_delta",
        "mse",
        "mae",
        "mse_delta",
        "mae_delta",
        "discrimination_score_l1",
        "discrimination_score_l2",
        "discrimination_score_cosine",
        "pearson_edistance",
        "clustering_agreement",
    ),
}
_DE_METRICS = frozenset(
    m for m in PROFILE_METRICS["full"] if m.startswith(("overlap", "precision", "de_", "pr_", "roc_"))
)
PROFILES = tuple(PROFILE_METRICS)
#: File formats of the DE tables written by :meth:`EvalResult.write`.
DE_FORMATS = ("parquet", "csv", "none")
_MIN_CLUSTER_PERTS = 3  # clustering_agreement: kNN graph of the perturbation centroids
# every name EvalResult.write may write: an earlier run's file of these names that this run does
# not write (e.g. de_counts.png after --profile pds) is dropped, so an output directory never
# mixes two runs; any other file of the directory is kept
OUTPUT_NAMES = frozenset(
    {"results.csv", "agg_results.csv", "report.md", "scores.png", "effects.png", "de_counts.png"}
    | {f"{side}_de.{fmt}" for side in ("real", "pred") for fmt in ("parquet", "csv")}
)
DEFormat = Literal["parquet", "csv", "none"]
DEFAULT_CACHE_DIR = Path("~/.cache/celltwin").expanduser()


@dataclass
class EvalConfig:
    """Options of one evaluation (validated once).

    profile
        ``"vcc"``: ``overlap_at_N`` (DES), ``mae``, ``discrimination_score_l1`` (PDS), the 2025
        challenge metrics. ``"pds"``: PDS only (no DE, fast). ``"full"``: every metric of cell-eval's
        ``full`` profile (see :mod:`celltwin.eval._full`); ``clustering_agreement`` needs scanpy +
        python-igraph (``pip install 'celltwin[cluster]'``); ``pearson_edistance`` is quadratic in
        the number of control cells.
    pert_col, control
        obs column holding the perturbation and the control label in it.
    control_source
        ``"own"`` (cell-eval's behaviour): each file's deltas and DE use that file's own control
        cells. ``"real"``: the predicted side uses the *real* file's control cells instead of the
        predicted file's, for the pseudobulk deltas and for the DE test. Predicted controls are
        part of a submission and can be tuned to move the deltas and the DE calls (cell-eval issues
        #183 and #196); with ``"real"`` only the perturbed predictions are scored.
    reorder_genes
        When both files hold the same genes in a different order, reorder the prediction to the
        real order instead of failing.
    cache_dir
        Where the real-side DE table is cached by content hash (``None``: no cache).
    mode
        ``"v2"`` (default): cell-eval 0.8.2 + pdex 0.3.0. ``"legacy"``: the 2025 leaderboard scorer,
        cell-eval 0.6.6 + pdex 0.1.27: the DE tables come from ``de_table(..., mode="legacy")`` (no
        ``log2_fold_change`` column), and cell-eval 0.6.6 derives ``log2_fold_change =
        log2(fold_change)`` with NaN -> 0 (computed here as ``ln(fc)`` rounded to the fold change's
        dtype divided by ``ln 2`` in that dtype), correlates the float32 *fold changes* (not their logs) in
        ``de_spearman_lfc_sig`` (the correlation itself rounded to float32) and scores AUCs with ``-log10(fdr)`` where only ``fdr == 0`` is
        replaced by ``1e-10`` (no clipping). Every other rule is shared.
    progress
        Show rich progress bars on stderr.
    """

    profile: Literal["vcc", "pds", "full"] = "vcc"
    pert_col: str = PERT_COL
    control: str = CONTROL_LABEL
    control_source: Literal["own", "real"] = "own"
    reorder_genes: bool = False
    cache_dir: Path | None = None
    mode: Literal["v2", "legacy"] = "v2"
    progress: bool = False

    def __post_init__(self) -> None:
        if self.profile not in PROFILE_METRICS:
            msg = f"EvalConfig.profile must be one of {', '.join(PROFILES)}, got {self.profile!r}"
            raise ConfigError(msg)
        if self.control_source not in ("own", "real"):
            msg = f"EvalConfig.control_source must be 'own' or 'real', got {self.control_source!r}"
            raise ConfigError(msg)
        if self.mode not in ("v2", "legacy"):
            msg = f"EvalConfig.mode must be 'v2' or 'legacy', got {self.mode!r}"
            raise ConfigError(msg)
        if not self.pert_col or not self.control:
            msg = "EvalConfig.pert_col and EvalConfig.control must be non-empty"
            raise ConfigError(msg)
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir).expanduser()


@dataclass
class EvalResult:
    """Outcome of :func:`evaluate`.

    ``results``: pandas DataFrame, one row per perturbation (``perturbation`` + metric columns).
    ``agg``: ``statistic`` + metric columns (count, null_count, mean, std, min, 25%, 50%, 75%, max).
    ``de_real`` / ``de_pred``: the DE tables (pandas, pdex 0.3.0 columns) or ``None`` (``pds``).
    ``bulk``: pseudobulk deltas and names used by the report (``delta_real``, ``delta_pred`` (P, G),
    ``perts``, ``genes``).
    """

    results: Any
    agg: Any
    de_real: Any
    de_pred: Any
    config: EvalConfig
    bulk: dict[str, Any] = field(default_factory=dict, repr=False)
    nulls: dict[str, np.ndarray] = field(default_factory=dict, repr=False)

    def write(
        self, outdir: str | os.PathLike[str], *, report: bool = True, de_format: DEFormat = "parquet"
    ) -> list[Path]:
        """Write ``results.csv``, ``agg_results.csv``, the two DE tables and the report.

        ``de_format``: ``"parquet"`` (default) writes ``real_de.parquet`` / ``pred_de.parquet``;
        ``"csv"`` writes ``real_de.csv`` / ``pred_de.csv`` as cell-eval does (same file names,
        columns and number formatting, polars' CSV writer); ``"none"`` skips them. The tables
        are the same in every format; parquet keeps the dtypes (float32 means stay float32) and
        is about 3x smaller and 5x faster to write than CSV at 18,080 genes, which matters for
        tables of one row per (perturbation, gene). The files appear all together or not at all:
        they are written into a temporary sibling directory swapped in at the end
        (:func:`celltwin._io.atomic_dir`; other files already in ``outdir`` are kept, an earlier
        run's files of :data:`OUTPUT_NAMES` are replaced or removed). Returns the written paths.
        """
        from celltwin._io import atomic_dir

        if de_format not in DE_FORMATS:
            msg = f"EvalResult.write: de_format must be one of {', '.join(DE_FORMATS)}, got {de_format!r}"
            raise ConfigError(msg)
        final = Path(outdir)
        with atomic_dir(final, owned=OUTPUT_NAMES) as out:
            written = self._write_files(out, report=report, de_format=de_format)
        return [final / p.relative_to(out) for p in written]

    def _write_files(self, out: Path, *, report: bool, de_format: DEFormat) -> list[Path]:
        written: list[Path] = []

        def _csv(df, name: str, nulls: dict[str, np.ndarray]) -> None:
            path = out / name
            path.write_text(_to_csv(df, nulls), encoding="utf-8")
            written.append(path)

        _csv(self.results, "results.csv", self.nulls)
        _csv(self.agg, "agg_results.csv", {})
        tables = []
        if de_format != "none":
            tables = [
                (out / f"{side}_de.{de_format}", t)
                for side, t in (("real", self.de_real), ("pred", self.de_pred))
                if t is not None
            ]

        def _de(item: tuple[Path, Any]) -> Path:
            write_de_table(item[1], item[0], de_format)
            return item[0]

        # the two DE tables are written concurrently: polars formats and writes without the GIL
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, len(tables))) as pool:
            written.extend(pool.map(_de, tables))
        if report:
            from celltwin.eval._report import write_report

            written.extend(write_report(self, out))
        return written


def _polars_frame(table: Any):
    """A polars DataFrame of a DE table (pandas or polars) without a per-row Python object.

    Categorical columns become polars Enums built once from their categories and gathered by
    code; numeric columns are handed over as numpy arrays (zero-copy where possible).
    """
    import pandas as pd
    import polars as pl

    if isinstance(table, pl.DataFrame):
        return table
    cols = []
    for name in table.columns:
        col = table[name]
        if isinstance(col.dtype, pd.CategoricalDtype):
            cats = [str(c) for c in col.cat.categories]
            codes = np.asarray(col.cat.codes)
            if (codes < 0).any():  # missing values: let polars build the column from strings
                cols.append(pl.Series(name, col.astype(object).to_numpy(), dtype=pl.String))
            else:
                cols.append(pl.Series(name, cats, dtype=pl.Enum(cats)).gather(codes.astype(np.uint32)))
        elif col.dtype == object:
            cols.append(pl.Series(name, col.to_numpy(), dtype=pl.String))
        else:
            cols.append(pl.Series(name, col.to_numpy()))
    return pl.DataFrame(cols)


def write_de_table(table: Any, path: str | os.PathLike[str], de_format: DEFormat = "parquet") -> None:
    """Write one DE table (pandas or polars) as parquet (lz4) or as CSV with polars.

    The CSV is what cell-eval writes (polars ``write_csv``: floats in shortest round-trip form,
    ``inf`` / ``-inf`` / ``NaN`` spelled so); the parquet file holds the same columns and dtypes.
    """
    frame = _polars_frame(table)
    if de_format == "parquet":
        frame.write_parquet(path, compression="lz4")
    elif de_format == "csv":
        frame.write_csv(path)
    else:
        msg = f"write_de_table: de_format must be 'parquet' or 'csv', got {de_format!r}"
        raise ConfigError(msg)


def _fmt(v: Any) -> str:
    if isinstance(v, str):
        return v if not any(c in v for c in ',"\n') else '"' + v.replace('"', '""') + '"'
    f = float(v)
    if np.isnan(f):
        return "NaN"
    if np.isinf(f):
        return "inf" if f > 0 else "-inf"
    return repr(f)


def _to_csv(df, nulls: dict[str, np.ndarray]) -> str:
    """CSV text as polars writes it: null -> empty field, NaN -> ``NaN``, floats in shortest repr."""
    cols = list(df.columns)
    data = [df[c].tolist() for c in cols]
    lines = [",".join(cols)]
    for i in range(len(df)):
        row = []
        for c, vals in zip(cols, data, strict=True):
            null = nulls.get(c)
            row.append("" if null is not None and null[i] else _fmt(vals[i]))
        lines.append(",".join(row))
    return "\n".join(lines) + "\n"


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


def _as_anndata(obj: Any, which: str):
    from celltwin.eval._load import read_h5ad

    if isinstance(obj, (str, os.PathLike)):
        return read_h5ad(obj), str(obj)
    if hasattr(obj, "X") and hasattr(obj, "obs") and hasattr(obj, "var_names"):
        return obj, f"<{which} AnnData>"
    msg = f"{which}: expected a path to an .h5ad file or an AnnData, got {type(obj).__name__}"
    raise InputError(msg)


def _align_genes(real, pred, reorder: bool):
    """Return ``pred`` with its genes in ``real``'s order, or raise a one-line InputError."""
    if np.array_equal(real.genes, pred.genes):
        return pred
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
    pos = {g: i for i, g in enumerate(pred.genes.tolist())}
    idx = np.array([pos[g] for g in real.genes.tolist()], dtype=np.int64)
    X = pred.X[:, idx]
    pred.X = X.tocsr() if hasattr(X, "tocsr") else np.ascontiguousarray(X)
    if hasattr(pred.X, "has_sorted_indices") and not pred.X.has_sorted_indices:
        pred.X.sort_indices()
    pred.genes = real.genes.copy()
    return pred


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


def _bulks(side, names: np.ndarray) -> np.ndarray:
    from celltwin.eval._metrics import pseudobulk

    codes = np.searchsorted(names, side.labels)
    return pseudobulk(side.X, codes, names.size)


def legacy_log2_fold_change(fc: np.ndarray) -> np.ndarray:
    """cell-eval 0.6.6's ``log2(fold_change)`` with NaN -> 0, in the fold change's float dtype."""
    fc = np.asarray(fc)
    if fc.dtype.kind != "f":
        fc = fc.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        lfc = np.log(fc.astype(np.float64)).astype(fc.dtype) / fc.dtype.type(np.log(2.0))
    lfc[np.isnan(lfc)] = 0.0
    return lfc


def _lfc(table) -> np.ndarray:
    if "log2_fold_change" in table.columns:
        return np.asarray(table["log2_fold_change"], dtype=np.float64)
    return legacy_log2_fold_change(np.asarray(table["fold_change"])).astype(np.float64)


def _de_columns(table) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """target, feature, log2 fold change (derived from ``fold_change`` in legacy tables), fdr."""
    return (
        table["target"],  # categoricals stay categoricals (category_codes maps their codes)
        table["feature"],
        _lfc(table),
        np.asarray(table["fdr"], dtype=np.float64),
    )


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
    pred: Any, real: Any, *, config: EvalConfig | None = None, de_real: Any = None, de_pred: Any = None
) -> EvalResult:
    """Evaluate a prediction against the real data with cell-eval 0.8.2's exact semantics.

    ``pred`` / ``real``: ``.h5ad`` paths or AnnData objects (an AnnData's ``X`` is normalised in
    place when it holds counts). ``de_real`` / ``de_pred``: optional precomputed DE tables (pandas or
    polars, pdex columns) used instead of computing them. Raises :class:`InputError` on bad input.
    """
    from celltwin.eval._load import prepare

    cfg = config if config is not None else EvalConfig()
    metric_names = PROFILE_METRICS[cfg.profile]
    if "clustering_agreement" in metric_names and not _has_cluster_extra():
        import warnings

        warnings.warn(
            "clustering_agreement skipped: it needs scanpy and python-igraph "
            "(pip install 'celltwin[cluster]'); every other metric of the profile is computed",
            stacklevel=2,
        )
        metric_names = tuple(m for m in metric_names if m != "clustering_agreement")
    with _progress(cfg.progress) as prog:
        with prog.step("reading and normalising real"):
            ad_real, real_name = _as_anndata(real, "real")
            r = prepare(ad_real, pert_col=cfg.pert_col, control=cfg.control, name=real_name)
            del ad_real
        with prog.step("reading and normalising pred"):
            ad_pred, pred_name = _as_anndata(pred, "pred")
            p = prepare(ad_pred, pert_col=cfg.pert_col, control=cfg.control, name=pred_name)
            del ad_pred
        p = _align_genes(r, p, cfg.reorder_genes)
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
            p = _with_real_controls(p, r, cfg.control)

        with prog.step("pseudobulks"):
            bulk_r = _bulks(r, names)
            bulk_p = _bulks(p, names)
        keep = np.flatnonzero(names != cfg.control)
        delta_r = bulk_r[keep] - bulk_r[ctrl]
        delta_p = bulk_p[keep] - bulk_p[ctrl]

        if cfg.profile != "pds":
            from celltwin.eval._de import de_table

            if de_real is None:
                with prog.step("differential expression (real)"):
                    de_real = de_table(
                        r.X, r.labels, cfg.control, r.genes, mode=cfg.mode, cache_dir=cfg.cache_dir
                    )
            if de_pred is None:
                with prog.step("differential expression (pred)"):
                    de_pred = de_table(p.X, p.labels, cfg.control, p.genes, mode=cfg.mode)
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
    names, r, p, perts, pb_r, pb_p, delta_r, delta_p, de_real, de_pred, control, legacy=False
):
    """Values (and null masks) of the requested metric columns; each rule is documented in its kernel."""
    from celltwin.eval import _full
    from celltwin.eval._metrics import discrimination_l1, mae, rank_significant

    P = perts.size
    vals: dict[str, np.ndarray] = {}
    nulls: dict[str, np.ndarray] = {}
    want = set(names)
    if want & _DE_METRICS:
        ranked_r = rank_significant(*_de_columns(de_real), perts)
        ranked_p = rank_significant(*_de_columns(de_pred), perts)
        for kind in ("overlap", "precision"):
            for k in _full.KS:
                name = f"{kind}_at_{k or 'N'}"
                if name in want:
                    vals[name] = _full.overlap_k(ranked_r, ranked_p, perts, k, kind)
        if want & {
            "de_spearman_sig",
            "de_direction_match",
            "de_spearman_lfc_sig",
            "de_sig_genes_recall",
            "de_nsig_counts_real",
            "de_nsig_counts_pred",
            "pr_auc",
            "roc_auc",
        }:
            lfc_r, fdr_r = _full.de_matrices(de_real, perts, r.genes, _lfc(de_real))
            lfc_p, fdr_p = _full.de_matrices(de_pred, perts, r.genes, _lfc(de_pred))
            sig_r, sig_p = fdr_r < 0.05, fdr_p < 0.05
            vals["de_spearman_sig"] = np.full(P, _full.de_spearman_sig(sig_r, sig_p))
            vals["de_direction_match"], nulls["de_direction_match"] = _full.de_direction_match(
                sig_r, lfc_r, lfc_p
            )
            if legacy:  # cell-eval 0.6.6 correlates the fold changes themselves
                fc_r, _ = _full.de_matrices(
                    de_real, perts, r.genes, np.asarray(de_real["fold_change"], np.float64)
                )
                fc_p, _ = _full.de_matrices(
                    de_pred, perts, r.genes, np.asarray(de_pred["fold_change"], np.float64)
                )
                v, n = _full.de_spearman_lfc_sig(sig_r, fc_r, fc_p)
                vals["de_spearman_lfc_sig"] = v.astype(np.float32).astype(
                    np.float64
                )  # polars corr of Float32 columns
                nulls["de_spearman_lfc_sig"] = n
            else:
                vals["de_spearman_lfc_sig"], nulls["de_spearman_lfc_sig"] = _full.de_spearman_lfc_sig(
                    sig_r, lfc_r, lfc_p
                )
            vals["de_sig_genes_recall"], nulls["de_sig_genes_recall"] = _full.de_sig_genes_recall(
                sig_r, sig_p
            )
            vals["de_nsig_counts_real"] = sig_r.sum(1).astype(np.float64)
            vals["de_nsig_counts_pred"] = sig_p.sum(1).astype(np.float64)
            vals["pr_auc"], vals["roc_auc"] = _full.auc_metrics(sig_r, fdr_p, legacy=legacy)
    if "pearson_delta" in want:
        vals["pearson_delta"] = _full.pearson_delta(delta_p, delta_r)
    if "mse" in want:
        vals["mse"] = _full.mean_error(pb_p, pb_r, "mse")
    if "mae" in want:
        vals["mae"] = mae(pb_p, pb_r)
    if "mse_delta" in want:
        vals["mse_delta"] = _full.mean_error(delta_p, delta_r, "mse")
    if "mae_delta" in want:
        vals["mae_delta"] = _full.mean_error(delta_p, delta_r, "mae")
    if "discrimination_score_l1" in want:
        vals["discrimination_score_l1"] = discrimination_l1(delta_r, delta_p, perts, r.genes)
    for m in ("l2", "cosine"):
        if f"discrimination_score_{m}" in want:
            vals[f"discrimination_score_{m}"] = _full.discrimination(delta_r, delta_p, perts, r.genes, m)
    if "pearson_edistance" in want:
        vals["pearson_edistance"] = np.full(P, _full.edistance_pearson(r, p, perts, control))
    if "clustering_agreement" in want:
        vals["clustering_agreement"] = np.full(P, _full.clustering_agreement(r, p, control))
    return vals, {k: v for k, v in nulls.items() if k in want}


def _with_real_controls(pred, real, control: str):
    """``pred`` with its control cells replaced by the real file's control cells (rows appended last)."""
    import scipy.sparse as sp

    keep_p = np.flatnonzero(pred.labels != control)
    ctrl_r = np.flatnonzero(real.labels == control)
    if sp.issparse(pred.X) or sp.issparse(real.X):
        X = sp.vstack([sp.csr_matrix(pred.X[keep_p]), sp.csr_matrix(real.X[ctrl_r])], format="csr")
    else:
        X = np.vstack([pred.X[keep_p], real.X[ctrl_r]])
    labels = np.concatenate([pred.labels[keep_p], real.labels[ctrl_r]])
    pred.X, pred.labels = X, labels
    return pred
