"""``celltwin predict``: write predicted cells (plus the context's controls) from a trained run."""

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

Examples:
  celltwin predict runs/linear --data screen.h5ad --split split.toml -o pred.h5ad --write-real real.h5ad
  celltwin eval --pred pred.h5ad --real real.h5ad -o eval_out
  celltwin predict runs/st --data vcc.h5ad --counts pert_counts_Validation.csv --context H1 -o pred.h5ad
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="run directory written by `celltwin train`")
    p.add_argument("--data", default=None,
                   help=".h5ad (or folder / glob) holding the control cells and the real test cells; "
                        "default with --split: the split's own [datasets]")
    p.add_argument("--split", default=None, help="split .toml: predict its test perturbations")
    p.add_argument("-o", "--output", required=True, help="predicted .h5ad to write")
    p.add_argument("--counts", default=None, help="CSV with columns target_gene,n_cells")
    p.add_argument("--controls", default=None, help=".h5ad of control cells to predict from (default: the data's)")
    p.add_argument("--perturbations", default=None, help="comma-separated perturbations to predict (A,B,C+D)")
    p.add_argument("--context", default=None, help="context to predict in (needed when several)")
    p.add_argument("--repeat-mean", action="store_true", help="repeat each perturbation's mean predicted cell")
    p.add_argument("--write-real", default=None, metavar="FILE",
                   help="also write the real test cells + controls (raw values) for `celltwin eval --real`")
    p.add_argument("--seed", type=int, default=0, help="seed of the control-cell draws (default 0)")
    p.add_argument("--sample-counts", choices=["poisson", "nb"], default=None,
                   help="write integer counts: predicted cells drawn around expm1(x) * L / T with library sizes L "
                        "of the context's real controls; control rows = their real counts (runs trained on counts)")
    p.add_argument("--nb-theta", type=float, default=10.0, help="NB inverse dispersion for --sample-counts nb (10)")
    add_column_arguments(p)


def run(args: argparse.Namespace) -> int:
    from celltwin._io import check_outputs
    from celltwin.pipeline import predict_from_files

    check_outputs({"-o/--output": args.output, "--write-real": args.write_real},
                  {"RUN_DIR": args.run_dir, "--data": args.data, "--split": args.split,
                   "--counts": args.counts, "--controls": args.controls})

    perts = [p.strip() for p in args.perturbations.split(",") if p.strip()] if args.perturbations else None
    res = predict_from_files(args.run_dir, args.data, args.output, split=args.split, counts=args.counts,
                              controls=args.controls, perturbations=perts, context=args.context,
                              repeat_mean=args.repeat_mean, write_real=args.write_real, seed=args.seed,
                              columns=column_overrides(args), sample_counts=args.sample_counts,
                              nb_theta=args.nb_theta)
    srcs = res.sources
    fb = sorted(p for p, s in srcs.items() if not s.startswith("model"))
    n_pert = len(res.perturbations)
    msg = f"wrote {args.output}: {res.n_obs} cells ({n_pert} perturbations + controls) in context {res.context!r}"
    if fb:
        msg += f"; {len(fb)} fell back ({', '.join(fb[:5])}{', ...' if len(fb) > 5 else ''})"
    print(msg)
    if args.write_real:
        print(f"wrote {args.write_real}: real test cells + controls (raw values)")
    return 0
