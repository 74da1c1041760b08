"""``celltwin prep``: pack a prediction into a ``.vcc`` submission file (cell-eval 0.8.2 ``prep``)."""

from __future__ import annotations

import argparse
import sys

HELP = "pack a prediction (.h5ad) into a .vcc submission file (cell-eval prep compatible)"
DESCRIPTION = """\
Write the Virtual Cell Challenge 2025 submission file: a tar holding pred.h5ad.zst (a minimal,
zstd-compressed h5ad: CSR X, the perturbation column, string cell ids, gene names) and
watermark.txt, exactly as `cell-eval prep` does.

Checks: the perturbation (and cell type) column exists, control cells are present, var_names are
the genes of --genes (same genes in another order are reordered; missing / extra genes fail), at
most --max-cell-dim cells. Integer counts are log-normalised (median library size, log1p) like
cell-eval; non-integer data must already be log1p (values in [0, 15)).

--genes is a CSV file without header whose first column lists the expected genes in order (the
challenge's gene_names.csv).

Examples:
  celltwin prep -i pred.h5ad -g gene_names.csv                 # writes pred.prep.vcc
  celltwin prep -i pred.h5ad -g genes.csv -o sub.vcc --expected-gene-dim -1
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--input", required=True, help="prediction .h5ad")
    p.add_argument("-g", "--genes", required=True, help="CSV (no header) with the expected genes in order")
    p.add_argument(
        "-o",
        "--output",
        default=None,
        help="output .vcc (default: the input with .h5ad replaced by .prep.vcc)",
    )
    p.add_argument(
        "-p", "--pert-col", default="target_gene", help="perturbation column (default: %(default)s)"
    )
    p.add_argument("-c", "--celltype-col", default=None, help="cell type column to keep (optional)")
    p.add_argument(
        "--control-pert",
        "-n",
        "--ntc-name",
        dest="ntc_name",
        default="non-targeting",
        metavar="LABEL",
        help="control label (default: %(default)s; -n/--ntc-name, cell-eval prep's spelling, is an alias)",
    )
    p.add_argument(
        "-P",
        "--output-pert-col",
        default="target_gene",
        help="perturbation column name in the output (default: %(default)s)",
    )
    p.add_argument(
        "-C",
        "--output-celltype-col",
        default="celltype",
        help="cell type column name in the output (default: %(default)s)",
    )
    p.add_argument(
        "-e", "--encoding", type=int, default=32, choices=[32, 64], help="float bits of X (default: 32)"
    )
    p.add_argument(
        "--allow-discrete",
        action="store_true",
        help="keep integer counts as they are (no log-normalisation, no range check)",
    )
    p.add_argument(
        "--expected-gene-dim",
        type=int,
        default=18080,
        help="expected number of genes; a mismatch only warns (default: %(default)s; -1 disables)",
    )
    p.add_argument(
        "--max-cell-dim",
        type=int,
        default=200000,
        help="maximum number of cells (default: %(default)s; -1 disables)",
    )


def _default_output(path: str) -> str:
    return path[: -len(".h5ad")] + ".prep.vcc" if path.endswith(".h5ad") else path + ".prep.vcc"


def run(args: argparse.Namespace) -> int:
    from celltwin._io import check_outputs
    from celltwin.eval import prep_vcc

    out = args.output or _default_output(args.input)
    check_outputs({"-o/--output": out}, {"-i/--input": args.input, "-g/--genes": args.genes})
    res = prep_vcc(
        args.input,
        args.genes,
        out,
        pert_col=args.pert_col,
        celltype_col=args.celltype_col,
        control_label=args.ntc_name,
        output_pert_col=args.output_pert_col,
        output_celltype_col=args.output_celltype_col,
        encoding=args.encoding,
        allow_discrete=args.allow_discrete,
        expected_gene_dim=None if args.expected_gene_dim == -1 else args.expected_gene_dim,
        max_cell_dim=None if args.max_cell_dim == -1 else args.max_cell_dim,
    )
    for w in res.warnings:
        print(f"celltwin prep: warning: {w}", file=sys.stderr)
    norm = "log-normalised counts" if res.normalized else "kept values"
    print(f"wrote {res.path}: {res.n_cells} cells x {res.n_genes} genes ({norm})")
    return 0
