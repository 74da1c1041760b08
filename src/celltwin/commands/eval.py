"""``celltwin eval``: score a prediction against the real data, exactly as cell-eval 0.8.2 ``run``."""

from __future__ import annotations

import argparse
import os
import sys

HELP = "evaluate a prediction (.h5ad) against the real data with the VCC metrics (cell-eval exact)"
DESCRIPTION = """\
Evaluate predicted single cells against the real cells with the Virtual Cell Challenge metrics,
reproducing cell-eval 0.8.2 `cell-eval run` value for value (same results.csv / agg_results.csv
columns and rows), much faster and without densifying the matrices.

Both files need obs[--pert-col] with the perturbation of every cell, the control label, the same
perturbations and the same genes (var_names). Each file that holds integer counts is normalised on
its own (median library size, then log1p); a file with fractional values must already be log1p.

Metrics (profile vcc, the 2025 challenge):
  overlap_at_N             DES: overlap of the significant DE genes (Wilcoxon vs control, BH
                           FDR < 0.05, ranked by |log2 fold change|), truncated to the real count.
  discrimination_score_l1  PDS: 1 - rank/P of the true perturbation among all real pseudobulk
                           deltas by L1 distance to the predicted delta (target gene excluded).
  mae                      mean absolute error of the perturbation pseudobulks (log1p space).
Profile pds computes PDS only (no DE, fast). Profile full computes every metric of cell-eval's
full profile (overlap/precision at N/50/100/200/500, DE Spearman/direction/recall/counts, PR and
ROC AUC, pearson_delta, mse, mae, their deltas, PDS l1/l2/cosine, pearson_edistance,
clustering_agreement). clustering_agreement (Leiden clustering of perturbation centroids) needs
the optional extra: pip install 'celltwin[cluster]' (scanpy + python-igraph); without it the column
is left out with a warning. pearson_edistance is quadratic in the number of control cells.
Profile de computes the DE metrics of full; profile minimal computes overlap_at_N,
precision_at_N, de_nsig_counts_real/_pred, pearson_delta, mse, mae and discrimination_score_l1
(cell-eval's profiles, same column order). --skip-metrics mae,mse leaves columns out (cell-eval's
names; de_nsig_counts leaves out both count columns).

--mode legacy reproduces the 2025 leaderboard scorer (cell-eval 0.6.6 + pdex 0.1.27) instead.

Profile vcc2026 (the 2026 challenge, cell-eval2 0.20.0 --preset vcc2026) scores six metrics per
cellular context (pds_cosine, expr_mse_unbiased_capped_norm, de_wilcoxon_direction_fidelity_yield_raw,
de_wilcoxon_direction_reach_raw, de_wilcoxon_sig_jaccard, de_wilcoxon_lfc_nmae) and places each on
the scale s = (u - b) / (r - b): 0 is the mean-perturbation baseline b (the context's average
response emitted as cells and scored like a submission), 1 the replicate r (the reference scored
against itself by split halves, 5 seeds). expr_mse is clamped to [0, 1], lfc_nmae floored at -6. A
context's score is the mean of its six; the score is the mean over the contexts of --context-col.
The prediction holds raw integer counts (cell totals <= 1e6), the reference's genes in its order
and its perturbations; the reference's control cells serve both sides. --bundle DIR caches b and r
of every context (built on first use, reused after; a bundle of other reference data or another
configuration is refused). --write-baseline FILE writes the baseline prediction (.h5ad). Outputs:
results.csv (per perturbation), agg_results.csv (u, b, r, s per context and metric),
replicate_splits.csv (the replicate's per-split values) and score.json.

Outputs in -o DIR: results.csv (one row per perturbation), agg_results.csv (count, mean, std,
quantiles per metric), real_de.parquet and pred_de.parquet (DE tables, pdex columns, one row per
perturbation and gene), report.html (self-contained: summary, per-metric distributions, best and
worst perturbations, per-perturbation table) and report.md with the same plots (PNG). --de-format csv writes the DE tables as
real_de.csv / pred_de.csv, the files cell-eval writes (about 5x slower to write and 3x larger at
18,080 genes); --de-format none skips them. Read either with pandas or polars.

-dr/--de-real and -dp/--de-pred read precomputed DE tables (.csv as cell-eval writes them, or
.parquet as written here) instead of computing them. --num-threads N sets the threads of the DE
computation (default: every core; the values do not depend on it).

cell-eval's spellings work too: -ap/--adata-pred, -ar/--adata-real, --control-pert (also
--control), --pert-col, --profile, --skip-metrics, --num-threads, -dp/-dr, -o/--outdir,
--celltype-col (each cell type evaluated on its own, files prefixed with it), --embed-key.

Memory: the files are streamed (validated in one pass, then read group batch by group batch);
peak memory is about the control cells plus ~1.5 GB, whatever the number of cells.

--control-source real takes the control cells of the REAL file for the predicted side too (deltas
and DE). Predicted control cells are part of a submission and can be tuned to game the deltas and
DE calls (cell-eval issues #183, #196); use it to score only the perturbed predictions.

Bad input (missing columns, label or gene mismatches, NaN, negative values, ...) exits with code 2
and a one-line message.

Examples:
  celltwin eval --pred pred.h5ad --real real.h5ad -o eval_out
  celltwin eval --pred pred.h5ad --real real.h5ad --profile pds --control-source real -o out
  celltwin eval -ap pred.h5ad -ar real.h5ad --control-pert non-targeting --skip-metrics mae -o out
  celltwin eval --profile vcc2026 -ap pred.h5ad -ar real.h5ad --context-col context --bundle ref.bundle -o out
"""

# cell-eval's profiles (celltwin.eval._registry.PROFILES; spelled out to keep --help free of imports)
PROFILES = ["vcc", "pds", "minimal", "de", "full"]
# the 2026 challenge's profile: its own evaluator (celltwin.eval.v2026), not a cell-eval profile
PROFILE_2026 = "vcc2026"


def add_arguments(p: argparse.ArgumentParser) -> None:
    from celltwin.commands._common import positive_int

    p.add_argument(
        "--pred", "-ap", "--adata-pred", dest="pred", required=True, help="predicted cells (.h5ad)"
    )
    p.add_argument("--real", "-ar", "--adata-real", dest="real", required=True, help="real cells (.h5ad)")
    p.add_argument("-o", "--outdir", required=True, help="output directory")
    p.add_argument(
        "--profile",
        default="vcc",
        choices=[*PROFILES, PROFILE_2026],
        help="metric set (default: vcc; minimal, de and full are cell-eval's profiles; vcc2026: the 2026 "
        "challenge, cell-eval2 --preset vcc2026)",
    )
    p.add_argument(
        "--skip-metrics",
        default=None,
        metavar="M1,M2",
        help="comma-separated metrics to leave out of the profile (cell-eval's names)",
    )
    p.add_argument(
        "-dr",
        "--de-real",
        default=None,
        help="precomputed DE table of the real cells (.csv or .parquet, pdex columns) instead of computing it",
    )
    p.add_argument(
        "-dp",
        "--de-pred",
        default=None,
        help="precomputed DE table of the predicted cells (.csv or .parquet, pdex columns)",
    )
    p.add_argument(
        "--num-threads",
        type=positive_int,
        default=None,
        help="threads of the DE computation (default: every core)",
    )
    p.add_argument(
        "--pert-col", default="target_gene", help="obs column with the perturbation (default: target_gene)"
    )
    p.add_argument(
        "--control-pert",
        "--control",
        dest="control",
        default="non-targeting",
        metavar="LABEL",
        help="control label (default: non-targeting; --control is an alias)",
    )
    p.add_argument(
        "--control-source",
        default="own",
        choices=["own", "real"],
        help="controls of each side: 'own' (cell-eval) or 'real' (real controls on both sides; ungameable)",
    )
    p.add_argument(
        "--mode",
        default="v2",
        choices=["v2", "legacy"],
        help="v2: cell-eval 0.8.2 + pdex 0.3.0 (default); legacy: the 2025 leaderboard scorer (cell-eval 0.6.6 + pdex 0.1.27)",
    )
    p.add_argument(
        "--reorder-genes", action="store_true", help="reorder the prediction's genes to the real order"
    )
    p.add_argument(
        "--cache-dir", default="~/.cache/celltwin", help="cache of real-side DE tables (default: %(default)s)"
    )
    p.add_argument("--no-cache", action="store_true", help="do not read or write the DE cache")
    p.add_argument(
        "--de-format",
        default="parquet",
        choices=["parquet", "csv", "none"],
        help="file format of the DE tables: parquet (default), csv (cell-eval's real_de.csv / pred_de.csv) or none",
    )
    p.add_argument(
        "--celltype-col",
        default=None,
        metavar="COL",
        help="evaluate each cell type of obs[COL] on its own (cell-eval's --celltype-col); files are "
        "prefixed with the cell type: {celltype}_results.csv, {celltype}_agg_results.csv, ...",
    )
    p.add_argument(
        "--embed-key",
        default=None,
        metavar="KEY",
        help="discrimination_score_l2 / _cosine on the pseudobulks of obsm[KEY] (cell-eval's --embed-key)",
    )
    p.add_argument("--no-report", action="store_true", help="skip report.html, report.md and their plots")
    g = p.add_argument_group("profile vcc2026")
    g.add_argument(
        "--context-col",
        default=None,
        metavar="COL",
        help="obs column of the cellular context: each context is scored on its own scale, the score "
        "is their mean (default: one context)",
    )
    g.add_argument(
        "--bundle",
        default=None,
        metavar="DIR",
        help="reference bundle: the baseline and replicate of every context, built into DIR when absent "
        "and reused when it matches the reference and configuration",
    )
    g.add_argument(
        "--write-baseline",
        default=None,
        metavar="FILE",
        help="also write the mean-perturbation baseline prediction to FILE (.h5ad)",
    )
    p.add_argument("--no-progress", action="store_true", help="do not show progress")


def _read_de(path: str, flag: str):
    """A precomputed DE table (.parquet, else CSV read as cell-eval reads it) as a polars DataFrame."""
    import polars as pl

    from celltwin.errors import InputError

    if not os.path.isfile(path):
        msg = f"{flag} {path}: file not found"
        raise InputError(msg)
    try:
        if path.lower().endswith((".parquet", ".pq")):
            table = pl.read_parquet(path)
        else:  # cell-eval: pl.read_csv with target / feature as strings
            table = pl.read_csv(path, schema_overrides={"target": pl.Utf8, "feature": pl.Utf8})
    except pl.exceptions.PolarsError as e:
        msg = f"{flag} {path}: not a readable DE table ({type(e).__name__}; expected .csv or .parquet)"
        raise InputError(msg) from None
    need = {"target", "feature", "fdr"}
    missing = sorted(need - set(table.columns))
    if missing or not {"log2_fold_change", "fold_change"} & set(table.columns):
        msg = (
            f"{flag} {path}: missing DE column(s) {missing or ['log2_fold_change']} "
            f"(expected pdex columns target, feature, log2_fold_change, fdr; got {table.columns[:8]})"
        )
        raise InputError(msg)
    return table


def _run_vcc2026(args: argparse.Namespace) -> int:
    """``--profile vcc2026``: the 2026 scale (celltwin.eval.v2026.evaluate_2026)."""
    from celltwin._output_checks import check_outputs
    from celltwin.errors import ConfigError

    bad = [
        flag
        for flag, given in (
            ("--skip-metrics", args.skip_metrics),
            ("-dr/--de-real", args.de_real),
            ("-dp/--de-pred", args.de_pred),
            ("--mode legacy", args.mode != "v2"),
            ("--celltype-col (use --context-col)", args.celltype_col),
            ("--embed-key", args.embed_key),
            ("--reorder-genes", args.reorder_genes),
        )
        if given
    ]
    if bad:
        msg = f"--profile vcc2026 does not take {', '.join(bad)}"
        raise ConfigError(msg)
    # an existing bundle is read (it may be read-only); a new one is written
    reuse = args.bundle is not None and os.path.isdir(args.bundle) and any(os.scandir(args.bundle))
    check_outputs(
        {"-o/--outdir": args.outdir, "--bundle": None if reuse else args.bundle, "--write-baseline": args.write_baseline},
        {"--pred": args.pred, "--real": args.real, "--bundle": args.bundle if reuse else None},
        dirs={"-o/--outdir", "--bundle"},
    )
    if args.num_threads is not None:
        import numba

        numba.set_num_threads(min(args.num_threads, numba.config.NUMBA_NUM_THREADS))
    from celltwin.eval.v2026 import evaluate_2026

    ev = evaluate_2026(
        args.pred,
        args.real,
        pert_col=args.pert_col,
        control_pert=args.control,
        context_col=args.context_col,
        bundle=args.bundle,
        write_baseline_to=args.write_baseline,
    )
    paths = ev.write(args.outdir)
    for _, row in ev.metrics.iterrows():
        ctx = "" if args.context_col is None else f"{row['context']}\t"
        print(f"{ctx}{row['metric']}\tu={row['u']:.6f}\tb={row['b']:.6f}\tr={row['r']:.6f}\ts={row['s']:.6f}")
    if args.context_col is not None:
        for ctx, value in ev.context_scores.items():
            print(f"{ctx}\tscore\t{value:.6f}")
    print(f"score\t{ev.score:.6f}")
    what = "reused" if ev.bundle_reused else "wrote"
    if args.bundle is not None:
        print(f"{what} bundle {args.bundle}", file=sys.stderr)
    if args.write_baseline is not None:
        print(f"wrote baseline prediction {args.write_baseline}", file=sys.stderr)
    print(f"wrote {len(paths)} files to {args.outdir}", file=sys.stderr)
    return 0


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from celltwin._output_checks import check_outputs
    from celltwin.errors import ConfigError

    if args.profile == PROFILE_2026:
        return _run_vcc2026(args)
    given = [f for f, v in (("--context-col", args.context_col), ("--bundle", args.bundle),
                            ("--write-baseline", args.write_baseline)) if v is not None]
    if given:
        msg = f"{', '.join(given)}: only with --profile vcc2026"
        raise ConfigError(msg)
    from celltwin.eval import EvalConfig, evaluate

    check_outputs(
        {"-o/--outdir": args.outdir},
        {
            "--pred": args.pred,
            "--real": args.real,
            "-dr/--de-real": args.de_real,
            "-dp/--de-pred": args.de_pred,
        },
        dirs={"-o/--outdir"},
    )
    skip = tuple(m.strip() for m in (args.skip_metrics or "").split(",") if m.strip())

    cfg = EvalConfig(
        profile=args.profile,
        pert_col=args.pert_col,
        control=args.control,
        control_source=args.control_source,
        reorder_genes=args.reorder_genes,
        mode=args.mode,
        cache_dir=None if args.no_cache else Path(args.cache_dir),
        progress=not args.no_progress,
        skip_metrics=skip,
        num_threads=args.num_threads,
        embed_key=args.embed_key,
    )
    de_real = _read_de(args.de_real, "-dr/--de-real") if args.de_real else None
    de_pred = _read_de(args.de_pred, "-dp/--de-pred") if args.de_pred else None
    if args.celltype_col is None:
        results = {None: evaluate(args.pred, args.real, config=cfg, de_real=de_real, de_pred=de_pred)}
    else:
        from celltwin.eval import evaluate_by_celltype

        results = evaluate_by_celltype(args.pred, args.real, args.celltype_col, config=cfg, de_real=de_real,
                                       de_pred=de_pred)
    n_files = 0
    for ct, result in results.items():
        paths = result.write(args.outdir, report=not args.no_report, de_format=args.de_format, prefix=ct)
        n_files += len(paths)
        means = result.agg.set_index("statistic").loc["mean"]
        for name, value in means.items():
            print(f"{name}\t{value:.6f}" if ct is None else f"{ct}\t{name}\t{value:.6f}")
    print(f"wrote {n_files} files to {args.outdir}", file=sys.stderr)
    return 0
