"""``celltwin predict``: write predicted cells (plus the context's controls) from a trained run, one or several
contexts per file; ``--format vcc2026`` writes the Virtual Cell Challenge 2026 upload's shape."""

from __future__ import annotations

import argparse

from celltwin.commands._common import add_column_arguments, column_overrides

HELP = "predict perturbed cells from a trained run (ready for `celltwin eval`)"
DESCRIPTION = """\
Write predicted cells for the split's test perturbations (or --perturbations, or every
perturbation of a --counts CSV) in one context, plus that context's control cells, in the run's
gene order and model space (log1p). Each predicted cell is a control cell plus the model's
predicted change (baselines: the shift, clipped at 0), so cell-to-cell variation is kept.

Cells per perturbation: from --counts (a target_gene,n_cells CSV such as VCC's
pert_counts_Validation.csv) or the real cells of the test split. Control cells are drawn
without replacement when there are enough, with replacement otherwise. Without --split,
--counts alone names what to predict (the VCC workflow: train on every cell with a split that
holds out nothing, then predict the challenge's list for --context).

Obs written: the data's own perturbation column and control label (e.g. gene / 'control' for a
split made with --pert-col gene --control-pert control) and its context column (named 'context'
when the data has none), so evaluate with the same names: `celltwin eval --pert-col gene
--control-pert control` (the defaults target_gene / non-targeting need nothing). Column names not
given here come from the split's [columns] table, then the run's; a flag wins.

Genes written: the run's output space (`celltwin train --output-space`): every gene (gene/all),
the HVGs (--hvg with output space gene) or the embedding dimensions (output space embedding).
Memory stays bounded: each perturbation's cells are predicted and appended as a CSR block, the
controls and --write-real cells are streamed from disk.

Several contexts in one file: --context A,B,C (that order) or --all-contexts (every context of
the split's test pairs, else of the data, sorted). Each context is predicted from its own control
cells with the same --seed, so its rows are what `--context A` alone writes; obs holds each
cell's context. --controls (one context's cells) cannot serve several contexts.

The 2026 upload's shape (Virtual Cell Challenge 2026, `celltwin prep --format vcc2026`):
  --sample-counts poisson --target-depth D   integer counts; the context's control library sizes
                                             are rescaled so their median is D before the draws
  --cells-per-pert N                         exactly N cells per perturbation and context (over
                                             --counts' n_cells and the real counts; --counts then
                                             needs only target_gene, e.g. the 2026 pert_counts.csv,
                                             and a context column there gives each context its list)
  --no-controls                              no control rows
  --format vcc2026                           all of these: poisson counts at median depth 20000,
                                             400 cells per perturbation, no controls, every context
                                             of --data unless --context is given, obs columns
                                             target_gene and context (explicit flags still win)

Examples:
  celltwin predict runs/linear --data screen.h5ad --split split.toml -o pred.h5ad --write-real real.h5ad
  celltwin eval --pred pred.h5ad --real real.h5ad -o eval_out
  celltwin predict runs/st --data vcc.h5ad --counts pert_counts_Validation.csv --context H1 -o pred.h5ad
  celltwin predict runs/st --data controls_ABC.h5ad --counts pert_counts.csv --format vcc2026 -o pred.h5ad
  celltwin prep --format vcc2026 -i pred.h5ad -g gene_names.csv --perts pert_counts.csv --contexts A,B,C
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by `celltwin train`")
    p.add_argument("--data", default=None,
                   help=".h5ad (or folder / glob) holding the control cells and the real test cells; "
                        "default with --split: the split's own [datasets]")
    p.add_argument("--split", default=None, help="split .toml: predict its test perturbations")
    p.add_argument("-o", "--output", required=True, help="predicted .h5ad to write")
    p.add_argument("--counts", default=None,
                   help="CSV with columns target_gene,n_cells (with --cells-per-pert: target_gene alone, e.g. the "
                        "2026 pert_counts.csv; a context column there gives each context its own list)")
    p.add_argument("--controls", default=None, help=".h5ad of control cells to predict from (default: the data's)")
    p.add_argument("--perturbations", default=None, help="comma-separated perturbations to predict (A,B,C+D)")
    p.add_argument("--context", default=None,
                   help="context to predict in (needed when several); A,B,C: several contexts in one file")
    p.add_argument("--all-contexts", action="store_true",
                   help="predict every context (of the split's test pairs, else of the data) into one file")
    p.add_argument("--cells-per-pert", type=int, default=None, metavar="N",
                   help="exactly N cells per perturbation and context (over --counts' n_cells / the real counts)")
    p.add_argument("--no-controls", action="store_true", help="write no control rows")
    p.add_argument("--target-depth", type=float, default=None, metavar="D",
                   help="with --sample-counts: rescale the controls' library sizes to median D (e.g. 20000)")
    p.add_argument("--format", choices=["vcc2026"], default=None,
                   help="vcc2026: the 2026 upload's shape (poisson counts at median depth 20000, 400 cells per "
                        "perturbation, no controls, every context, obs target_gene + context)")
    p.add_argument("--repeat-mean", action="store_true", help="repeat each perturbation's mean predicted cell")
    p.add_argument("--write-real", default=None, metavar="FILE",
                   help="also write the real test cells + controls (raw values) for `celltwin eval --real`")
    p.add_argument("--seed", type=int, default=0, help="seed of the control-cell draws (default 0)")
    p.add_argument("--sample-counts", choices=["poisson", "nb"], default=None,
                   help="write integer counts: predicted cells drawn around expm1(x) * L / T with library sizes L "
                        "of the context's real controls; control rows = their real counts (runs trained on counts)")
    p.add_argument("--nb-theta", type=float, default=10.0, help="NB inverse dispersion for --sample-counts nb (10)")
    add_column_arguments(p)


def _contexts(value: str | None):
    """``--context``: one context, or a comma-separated list of several (a list)."""
    if value is None or "," not in value:
        return value
    return [c.strip() for c in value.split(",") if c.strip()]


def run(args: argparse.Namespace) -> int:
    from celltwin._output_checks import check_outputs
    from celltwin.predict_files import predict_from_files

    check_outputs({"-o/--output": args.output, "--write-real": args.write_real},
                  {"RUN_DIR": args.run_dir, "--data": args.data, "--split": args.split,
                   "--counts": args.counts, "--controls": args.controls})

    perts = [p.strip() for p in args.perturbations.split(",") if p.strip()] if args.perturbations else None
    res = predict_from_files(args.run_dir, args.data, args.output, split=args.split, counts=args.counts,
                              controls=args.controls, perturbations=perts, context=_contexts(args.context),
                              repeat_mean=args.repeat_mean, write_real=args.write_real, seed=args.seed,
                              columns=column_overrides(args), sample_counts=args.sample_counts,
                              nb_theta=args.nb_theta, all_contexts=args.all_contexts,
                              cells_per_pert=args.cells_per_pert, no_controls=args.no_controls,
                              target_depth=args.target_depth, vcc2026=args.format == "vcc2026")
    srcs = res.sources
    fb = sorted(p for p, s in srcs.items() if not s.startswith("model"))
    n_pert = len(res.perturbations) if len(res.contexts) <= 1 else len(dict.fromkeys(res.perturbations))
    ctl = " + controls" if res.controls else ", no controls"
    where = (f"in context {res.context!r}" if len(res.contexts) <= 1
             else f"in {len(res.contexts)} contexts ({', '.join(res.contexts)})")
    msg = f"wrote {args.output}: {res.n_obs} cells ({n_pert} perturbations{ctl}) {where}"
    if fb:
        msg += f"; {len(fb)} fell back ({', '.join(fb[:5])}{', ...' if len(fb) > 5 else ''})"
    print(msg)
    if args.write_real:
        print(f"wrote {args.write_real}: real test cells + controls (raw values)")
    return 0
