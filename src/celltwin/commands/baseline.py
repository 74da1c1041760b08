"""``celltwin baseline``: the cell-mean baseline prediction (cell-eval 0.8.2 ``baseline``)."""

from __future__ import annotations

import argparse

HELP = "write the cell-mean baseline prediction (.h5ad), as cell-eval baseline"
DESCRIPTION = """\
Build the cell-mean baseline of `cell-eval baseline`: every perturbation's predicted cells are one
vector, the mean over perturbation groups (controls included) of each group's mean log-normalised
expression, followed by the real control cells. --as-delta writes the mean over perturbations of
(group mean - control mean) instead (the as_delta option of cell-eval's Python API).

The number of cells per perturbation comes from --counts (a CSV with --pert-col and --counts-col
columns, e.g. the challenge's pert_counts_Validation.csv; its perturbations need not be in the
input) or, by default, from the input. Integer counts are log-normalised first (median library
size, log1p). Like cell-eval, it also writes the baseline's differential expression table against
its controls (-O, default ./baseline_de.csv; pdex columns) unless --skip-de.

Examples:
  celltwin baseline -a train.h5ad -c pert_counts_Validation.csv -o baseline.h5ad
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-a", "--adata", required=True, help="input .h5ad (training data with controls)")
    p.add_argument("-c", "--counts", default=None, help="CSV with the number of cells per perturbation")
    p.add_argument(
        "-o", "--output-path", default="./baseline.h5ad", help="output .h5ad (default: %(default)s)"
    )
    p.add_argument(
        "-O",
        "--output-de-path",
        default="./baseline_de.csv",
        help="output CSV of the baseline's differential expression (default: %(default)s)",
    )
    p.add_argument("--skip-de", action="store_true", help="do not compute / write the DE table")
    p.add_argument(
        "-t", "--num-threads", type=int, default=1, help="threads for the DE (default: %(default)s)"
    )
    p.add_argument("--control-pert", default="non-targeting", help="control label (default: %(default)s)")
    p.add_argument("--pert-col", default="target_gene", help="perturbation column (default: %(default)s)")
    p.add_argument(
        "--counts-col", default="n_cells", help="cell-number column of --counts (default: %(default)s)"
    )
    p.add_argument(
        "--as-delta",
        action="store_true",
        help="write the mean delta to control instead of the mean expression (cell-eval as_delta)",
    )
    p.add_argument(
        "--allow-discrete", action="store_true", help="keep integer counts as they are (no log-normalisation)"
    )


def run(args: argparse.Namespace) -> int:
    from celltwin._output_checks import check_outputs
    from celltwin.eval import write_cell_mean_baseline

    check_outputs(
        {
            "-o/--output-path": args.output_path,
            "-O/--output-de-path": None if args.skip_de else args.output_de_path,
        },
        {"-a/--adata": args.adata, "-c/--counts": args.counts},
    )
    out = write_cell_mean_baseline(
        args.adata,
        args.output_path,
        counts=args.counts,
        pert_col=args.pert_col,
        control_pert=args.control_pert,
        counts_col=args.counts_col,
        as_delta=args.as_delta,
        allow_discrete=args.allow_discrete,
        de_output=None if args.skip_de else args.output_de_path,
        n_threads=args.num_threads,
    )
    n_ctrl = int((out.obs[args.pert_col] == args.control_pert).sum())
    print(
        f"wrote {args.output_path}: {out.n_obs - n_ctrl} baseline cells + {n_ctrl} control cells "
        f"x {out.n_vars} genes"
    )
    if not args.skip_de:
        print(f"wrote {args.output_de_path}: differential expression of the baseline vs its controls")
    return 0
