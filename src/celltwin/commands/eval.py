"""``celltwin eval``: score a prediction against the real data, exactly as cell-eval 0.8.2 ``run``."""

from __future__ import annotations

import argparse
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

--mode legacy reproduces the 2025 leaderboard scorer (cell-eval 0.6.6 + pdex 0.1.27) instead.

Outputs in -o DIR: results.csv (one row per perturbation), agg_results.csv (count, mean, std,
quantiles per metric), real_de.parquet and pred_de.parquet (DE tables, pdex columns, one row per
perturbation and gene), report.md with plots (PNG). --de-format csv writes the DE tables as
real_de.csv / pred_de.csv, the files cell-eval writes (about 5x slower to write and 3x larger at
18,080 genes); --de-format none skips them. Read either with pandas or polars.

--control-source real takes the control cells of the REAL file for the predicted side too (deltas
and DE). Predicted control cells are part of a submission and can be tuned to game the deltas and
DE calls (cell-eval issues #183, #196); use it to score only the perturbed predictions.

Bad input (missing columns, label or gene mismatches, NaN, negative values, ...) exits with code 2
and a one-line message.

Examples:
  celltwin eval --pred pred.h5ad --real real.h5ad -o eval_out
  celltwin eval --pred pred.h5ad --real real.h5ad --profile pds --control-source real -o out
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pred", required=True, help="predicted cells (.h5ad)")
    p.add_argument("--real", required=True, help="real cells (.h5ad)")
    p.add_argument("-o", "--outdir", required=True, help="output directory")
    p.add_argument(
        "--profile", default="vcc", choices=["vcc", "pds", "full"], help="metric set (default: vcc)"
    )
    p.add_argument(
        "--pert-col", default="target_gene", help="obs column with the perturbation (default: target_gene)"
    )
    p.add_argument("--control", default="non-targeting", help="control label (default: non-targeting)")
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
    p.add_argument("--no-report", action="store_true", help="skip report.md and its plots")
    p.add_argument("--no-progress", action="store_true", help="do not show progress")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from celltwin._io import check_outputs
    from celltwin.eval import EvalConfig, evaluate

    check_outputs(
        {"-o/--outdir": args.outdir}, {"--pred": args.pred, "--real": args.real}, dirs={"-o/--outdir"}
    )

    cfg = EvalConfig(
        profile=args.profile,
        pert_col=args.pert_col,
        control=args.control,
        control_source=args.control_source,
        reorder_genes=args.reorder_genes,
        mode=args.mode,
        cache_dir=None if args.no_cache else Path(args.cache_dir),
        progress=not args.no_progress,
    )
    result = evaluate(args.pred, args.real, config=cfg)
    paths = result.write(args.outdir, report=not args.no_report, de_format=args.de_format)
    means = result.agg.set_index("statistic").loc["mean"]
    for name, value in means.items():
        print(f"{name}\t{value:.6f}")
    print(f"wrote {len(paths)} files to {args.outdir}", file=sys.stderr)
    return 0
