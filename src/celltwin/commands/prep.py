"""``celltwin prep``: pack a prediction into a ``.vcc`` submission file (cell-eval 0.8.2 ``prep``, or vcc-cli 0.3.0 ``prep`` with ``--format vcc2026``)."""

from __future__ import annotations

import argparse
import sys

HELP = "pack a prediction (.h5ad) into a .vcc submission file (cell-eval prep / vcc prep compatible)"
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

--format vcc2026 writes the Virtual Cell Challenge 2026 upload file instead, the archive `vcc prep`
(vcc-cli 0.3.0) writes: a tar holding meta.json (nnz, n_obs, n_vars, contexts, the fingerprint of
pert_counts.csv) then pred.h5ad.zst (raw counts in float32 CSR, obs target_gene + context, the genes
of --genes in order). Its checks: counts only (non-negative, whole, finite, no cell total above
--max-counts-per-cell), no control cells, every context of --contexts present and nothing else,
in each context exactly the perturbations of --perts (pert_counts.csv) with exactly
--cells-per-pert cells each, var_names = the gene list, at most --max-nnz stored entries, no
perturbation predicted as all zeros. The file is read in row blocks (bounded memory), and nothing
is written unless every check passes. --contexts defaults to the controls bundle's manifest.json
beside --perts. The vcc2026-only flags below are refused with --format vcc2025.

Examples:
  celltwin prep -i pred.h5ad -g gene_names.csv                 # writes pred.prep.vcc
  celltwin prep -i pred.h5ad -g genes.csv -o sub.vcc --expected-gene-dim -1
  celltwin prep --format vcc2026 -i pred.h5ad -g gene_names.csv --perts pert_counts.csv --contexts A,B,C
"""

#: defaults that differ between the formats: flag dest -> (vcc2025, vcc2026)
_FORMAT_DEFAULTS = {"expected_gene_dim": (18080, 18533), "max_cell_dim": (200_000, 400_000)}
#: flags of --format vcc2026 only: dest -> flag
_ONLY_2026 = {
    "perts": "--perts", "contexts": "--contexts", "context_col": "--context-col",
    "cells_per_pert": "--cells-per-pert", "verify_targets": "--[no-]verify-targets",
    "check_cell_counts": "--[no-]check-cell-counts", "reject_controls": "--allow-controls/--reject-controls",
    "max_nnz": "--max-nnz", "max_counts_per_cell": "--max-counts-per-cell", "dry_run": "--dry-run",
}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=["vcc2025", "vcc2026"], default="vcc2025",
                   help="vcc2025: cell-eval 0.8.2 prep (default); vcc2026: vcc-cli 0.3.0 prep (the 2026 upload)")
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
        help="keep integer counts as they are (no log-normalisation, no range check; vcc2025 only)",
    )
    p.add_argument(
        "--expected-gene-dim",
        type=int,
        default=None,
        help="expected number of genes; a mismatch only warns (default: 18080 for vcc2025, 18533 for vcc2026; "
             "-1 disables)",
    )
    p.add_argument(
        "--max-cell-dim",
        type=int,
        default=None,
        help="maximum number of cells (default: 200000 for vcc2025, 400000 for vcc2026; -1 disables)",
    )
    g = p.add_argument_group("--format vcc2026 (vcc prep's flags)")
    g.add_argument("--perts", default=None, metavar="CSV",
                   help="pert_counts.csv of the controls bundle: the perturbations every context must predict "
                        "(column target_gene; optional context and n_cells columns)")
    g.add_argument("--contexts", default=None, metavar="A,B,C",
                   help="contexts the file must cover: A,B,C (validation phase), D,E,F (final phase); "
                        "default: manifest.json beside --perts or --genes; '' disables the context checks")
    g.add_argument("--context-col", default=None,
                   help="obs column of each cell's context, kept in the output (default: context)")
    g.add_argument("--cells-per-pert", type=int, default=None, metavar="N",
                   help="cells required per perturbation and context (default: 400; an n_cells column of "
                        "--perts wins; -1: no built-in expectation)")
    g.add_argument("--verify-targets", action=argparse.BooleanOptionalAction, default=None,
                   help="check each context predicts exactly the perturbations of --perts (default: yes)")
    g.add_argument("--check-cell-counts", action=argparse.BooleanOptionalAction, default=None,
                   help="check each perturbation has exactly --cells-per-pert cells (default: yes)")
    ctl = g.add_mutually_exclusive_group()
    ctl.add_argument("--reject-controls", dest="reject_controls", action="store_true", default=None,
                     help="refuse control cells (default: the 2026 upload holds none)")
    ctl.add_argument("--allow-controls", dest="reject_controls", action="store_false",
                     help="accept control cells (then they must be present)")
    g.add_argument("--max-nnz", type=int, default=None, metavar="N",
                   help="most stored entries of X (default: 4750000000, the scorer's limit; -1 disables)")
    g.add_argument("--max-counts-per-cell", type=int, default=None, metavar="N",
                   help="largest per-cell total count (default: 1000000; -1 disables)")
    g.add_argument("--dry-run", action="store_true", default=None,
                   help="check only, write nothing")


def _default_output(path: str) -> str:
    return path[: -len(".h5ad")] + ".prep.vcc" if path.endswith(".h5ad") else path + ".prep.vcc"


def _limit(value: int | None, default: int | None) -> int | None:
    """A size flag: ``None`` -> the default, ``-1`` -> no limit."""
    if value is None:
        return default
    return None if value == -1 else value


def run(args: argparse.Namespace) -> int:
    from celltwin._output_checks import check_outputs
    from celltwin.errors import ConfigError

    fmt = getattr(args, "format", "vcc2025")
    k = 1 if fmt == "vcc2026" else 0
    for dest, pair in _FORMAT_DEFAULTS.items():
        setattr(args, dest, _limit(getattr(args, dest, None), pair[k]))
    if fmt == "vcc2025":
        given = [flag for dest, flag in _ONLY_2026.items() if getattr(args, dest, None) is not None]
        if given:
            msg = f"{', '.join(given)}: only with --format vcc2026"
            raise ConfigError(msg)
    elif args.allow_discrete:
        raise ConfigError("--allow-discrete: only with --format vcc2025 (the 2026 upload holds raw counts)")

    out = args.output or _default_output(args.input)
    if fmt == "vcc2026":
        return _run_2026(args, out)
    check_outputs({"-o/--output": out}, {"-i/--input": args.input, "-g/--genes": args.genes})
    from celltwin.eval import prep_vcc

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
        expected_gene_dim=args.expected_gene_dim,
        max_cell_dim=args.max_cell_dim,
    )
    for w in res.warnings:
        print(f"celltwin prep: warning: {w}", file=sys.stderr)
    norm = "log-normalised counts" if res.normalized else "kept values"
    print(f"wrote {res.path}: {res.n_cells} cells x {res.n_genes} genes ({norm})")
    return 0


def _run_2026(args: argparse.Namespace, out: str) -> int:
    from celltwin._output_checks import check_outputs
    from celltwin.eval import _prep2026 as p26

    if not args.dry_run:
        check_outputs({"-o/--output": out},
                      {"-i/--input": args.input, "-g/--genes": args.genes, "--perts": args.perts})
    cells = args.cells_per_pert
    res = p26.prep_vcc2026(
        args.input,
        args.genes,
        None if args.dry_run else out,
        perts=args.perts,
        contexts=args.contexts,
        verify_targets=args.verify_targets is not False,
        check_cell_counts=args.check_cell_counts is not False,
        cells_per_pert=p26.CELLS_PER_PERT if cells is None else (None if cells == -1 else cells),
        pert_col=args.pert_col,
        celltype_col=args.celltype_col,
        control_label=args.ntc_name,
        output_pert_col=args.output_pert_col,
        output_celltype_col=args.output_celltype_col,
        context_col=args.context_col or p26.CONTEXT_COL_DEFAULT,
        encoding=args.encoding,
        reject_controls=args.reject_controls is not False,
        expected_gene_dim=args.expected_gene_dim,
        max_cell_dim=args.max_cell_dim,
        max_nnz=_limit(args.max_nnz, p26.MAX_NNZ),
        max_counts_per_cell=_limit(args.max_counts_per_cell, p26.MAX_COUNTS_PER_CELL),
        dry_run=bool(args.dry_run),
    )
    for w in res.warnings:
        print(f"celltwin prep: warning: {w}", file=sys.stderr)
    ctx = ", ".join(f"{c}={n}" for c, n in res.cells_per_context.items()) or "not checked"
    targets = "perturbations checked against --perts" if res.verified_targets else "perturbations NOT checked"
    what = "checked (dry run, nothing written)" if res.path is None else f"wrote {res.path}:"
    print(f"{what} {res.n_cells} cells x {res.n_genes} genes, {res.nnz} stored entries; contexts {ctx}; {targets}")
    return 0
