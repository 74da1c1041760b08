"""``celltwin score``: the VCC-normalised score (cell-eval 0.8.2 ``baseline`` + ``run`` + ``score``)."""

from __future__ import annotations

import argparse

HELP = "VCC-normalised score of a prediction against the VCC baseline (cell-eval baseline + run + score)"
DESCRIPTION = """\
One command for the Virtual Cell Challenge score: give the prediction (--pred, or its
agg_results.csv with -i), the real cells (--real) and the training cells (--train FILE, or
--split TOML: its training cells of the predicted context). The baseline is built here exactly as
cell-eval 0.8.2 does (`cell-eval baseline`, = `celltwin baseline`): every perturbation of the real
file gets as many cells as it has there, all equal to the unweighted mean over the training
perturbation groups (controls included) of each group's mean log-normalised expression, followed
by the training control cells. It is named "vcc-baseline (cell-eval cell-mean)" in the output.
Both files are evaluated against --real with the VCC metrics (as `celltwin eval`), then scored:
  metrics whose best value is 0 (mae, mse, ...):   1 - model / baseline
  metrics whose best value is 1 (PDS, DES, ...):   (model - baseline) / (1 - baseline)
NaN becomes 0 and scores are clipped below at 0; avg_score is the mean over the metrics.
Writes a CSV with columns metric, model, vcc-baseline (cell-eval cell-mean), from_baseline.

The project's `cell-mean` model (`celltwin train --model cell-mean`) is NOT this baseline (it adds
the cell-weighted mean shift of the training perturbed cells to each control cell, keeping the
cells' variation); it scores differently from this baseline (a higher MAE on the real screens
tried, DES either way), so scores normalised against it are not VCC scores.

Columns: --pert-col / --control-pert (and --context-col with --context) name the columns of every
file; with --split they default to the split's [columns] table (the names `celltwin predict`
writes), else target_gene / non-targeting / context.

Two ready agg_results.csv files (e.g. from `celltwin eval` of the model and of a `celltwin
baseline` file) are scored with -i MODEL_AGG -I BASELINE_AGG, as `cell-eval score` does; the
output then has the columns metric, from_baseline.

Examples:
  celltwin score --pred pred.h5ad --real real.h5ad --split split.toml -o score.csv
  celltwin score --pred pred.h5ad --real real.h5ad --train adata_Training.h5ad -o score.csv
  celltwin score -i out/agg_results.csv -I base/agg_results.csv -o score.csv
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from celltwin.commands._common import add_column_arguments

    m = p.add_argument_group("the model")
    m.add_argument("--pred", default=None, help="predicted cells (.h5ad), evaluated against --real")
    m.add_argument("-i", "--user-input", default=None, help="or: the model's agg_results.csv")
    b = p.add_argument_group("the vcc-baseline (cell-eval cell-mean), built here")
    b.add_argument("--real", default=None, help="real cells (.h5ad): cells per perturbation, genes, evaluation")
    b.add_argument("--train", default=None, help="training cells (.h5ad, controls included), as cell-eval baseline -a")
    b.add_argument("--split", default=None, help="or: split .toml; its training cells of --context are used")
    b.add_argument("--data", default=None, help="with --split: the data (default: the split's [datasets])")
    b.add_argument("--context", default=None,
                   help="context of the training cells (default with --split: the split's test context; "
                        "with --train: every cell)")
    b.add_argument("--save-baseline", default=None, metavar="FILE", help="also write the baseline (.h5ad)")
    b.add_argument("-I", "--base-input", default=None,
                   help="instead: a ready baseline agg_results.csv (then also give -i; nothing is built)")
    e = p.add_argument_group("evaluation (as celltwin eval)")
    from celltwin.commands.eval import PROFILES

    e.add_argument("--profile", default="vcc", choices=PROFILES, help="metric set (default: vcc), as celltwin eval")
    e.add_argument("--mode", default="v2", choices=["v2", "legacy"],
                   help="v2: cell-eval 0.8.2 (default); legacy: the 2025 leaderboard scorer")
    e.add_argument("--control-source", default="own", choices=["own", "real"],
                   help="controls of each side: 'own' (cell-eval) or 'real'")
    e.add_argument("--allow-discrete", action="store_true",
                   help="keep integer training counts as they are (no log-normalisation), as cell-eval baseline")
    p.add_argument("-o", "--output", default="score.csv", help="output CSV (default: %(default)s)")
    add_column_arguments(p)


def _agg_only(args: argparse.Namespace) -> int:
    from celltwin._io import atomic_path
    from celltwin._output_checks import check_outputs
    from celltwin.eval import score

    check_outputs(
        {"-o/--output": args.output}, {"-i/--user-input": args.user_input, "-I/--base-input": args.base_input}
    )
    table = score(args.user_input, args.base_input)
    with atomic_path(args.output) as tmp:
        table.to_csv(tmp, index=False)
    for name, value in zip(table["metric"], table["from_baseline"], strict=True):
        print(f"{name}\t{value:.6f}")
    return 0


def _training_from_split(args: argparse.Namespace, overrides):
    """(AnnData of the split's training cells in the context, ObsColumns, description)."""
    import anndata as ad
    import numpy as np
    import pandas as pd

    from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
    from celltwin.errors import ConfigError, InputError
    from celltwin.pipeline import open_training_data, resolve_dataset_split

    dataset, sp = open_training_data(args.split, args.data, overrides)
    rs = resolve_dataset_split(dataset, sp)
    context = args.context
    if context is None:
        ctxs = sorted({c for c, _ in rs.test_pairs})
        if len(ctxs) != 1:
            msg = (f"--context: the split {args.split} holds out {'no' if not ctxs else 'several'} test context(s)"
                   f"{' (' + ', '.join(ctxs) + ')' if ctxs else ''}; name the context of the training cells")
            raise ConfigError(msg)
        context = ctxs[0]
    ctx = dataset.obs[CONTEXT_COL].to_numpy(dtype=object)
    rows = rs.train_rows[ctx[rs.train_rows] == context]
    if rows.size == 0:
        present = ", ".join(sorted(set(ctx[rs.train_rows].tolist())))
        msg = f"--context {context!r}: no training cells of {args.split} there (training contexts: {present})"
        raise InputError(msg)
    cols = dataset.columns
    pert = dataset.obs[PERT_COL].to_numpy(dtype=object)[rows]
    pert = np.where(pert == CONTROL_LABEL, cols.control_label, pert)
    obs = pd.DataFrame({cols.pert_col: pert.astype(str)}, index=dataset.obs.index[rows].astype(str))
    train = ad.AnnData(X=dataset.read_rows(rows), obs=obs, var=pd.DataFrame(index=dataset.var_names.copy()))
    return train, cols, f"{rows.size} training cells of {args.split} (context {context!r})"


def _training_from_file(args: argparse.Namespace, overrides):
    """(the --train path, its sorted rows of --context or None, ObsColumns, description).

    Only obs is read here; X is streamed by the baseline (never read whole)."""
    import numpy as np

    from celltwin.data.columns import ObsColumns, merge_columns, require_columns
    from celltwin.data.source import H5adSource
    from celltwin.errors import InputError

    cols = merge_columns(overrides) or ObsColumns()
    src = H5adSource(args.train)
    what = f"{src.n_obs} training cells of {args.train}"
    rows = None
    if args.context is not None:
        require_columns(src.obs, [cols.context_col], str(args.train))
        keep = (src.obs[cols.context_col].astype(str) == args.context).to_numpy()
        if not keep.any():
            msg = f"{args.train}: no cell of context {args.context!r} in obs[{cols.context_col!r}]"
            raise InputError(msg)
        rows = np.flatnonzero(keep)
        what = f"{rows.size} training cells of {args.train} (context {args.context!r})"
    return str(args.train), rows, cols, what


def run(args: argparse.Namespace) -> int:
    from celltwin.errors import ConfigError

    if args.pred is not None and args.user_input is not None:
        raise ConfigError("give the model as --pred (predicted cells) or -i (its agg_results.csv), not both")
    builds = args.train is not None or args.split is not None
    if args.base_input is not None:
        if builds or args.pred is not None or args.real is not None:
            raise ConfigError("-I/--base-input scores two ready agg tables: give only -i with it "
                              "(or drop -I and give --real with --train/--split to build the vcc-baseline)")
        if args.user_input is None:
            raise ConfigError("-I/--base-input needs -i/--user-input (the model's agg_results.csv)")
        return _agg_only(args)
    if args.train is not None and args.split is not None:
        raise ConfigError("give the training cells as --train FILE or --split TOML, not both")
    if not builds or args.real is None:
        raise ConfigError("give --real and --train (or --split) to build the vcc-baseline "
                          "(or -i MODEL_AGG -I BASELINE_AGG to score two ready tables)")
    if args.pred is None and args.user_input is None:
        raise ConfigError("give the model: --pred (predicted cells) or -i (its agg_results.csv)")
    if args.data is not None and args.split is None:
        raise ConfigError("--data: only with --split")

    from pathlib import Path

    from celltwin._io import atomic_path
    from celltwin._output_checks import check_outputs
    from celltwin.commands._common import column_overrides
    from celltwin.eval import VCC_BASELINE_NAME, EvalConfig
    from celltwin.eval._score import score_vs_vcc_baseline

    check_outputs(
        {"-o/--output": args.output, "--save-baseline": args.save_baseline},
        {"--pred": args.pred, "-i/--user-input": args.user_input, "--real": args.real, "--train": args.train,
         "--split": args.split, "--data": args.data},
    )
    overrides = column_overrides(args)
    train_rows = None
    if args.split is not None:
        train, cols, what = _training_from_split(args, overrides)
    else:
        train, train_rows, cols, what = _training_from_file(args, overrides)
    cfg = EvalConfig(profile=args.profile, pert_col=cols.pert_col, control=cols.control_label,
                     control_source=args.control_source, mode=args.mode, cache_dir=None, progress=False)
    res = score_vs_vcc_baseline(args.real, train, pred=args.pred, agg=args.user_input, config=cfg,
                                allow_discrete=args.allow_discrete, train_rows=train_rows)
    if args.save_baseline is not None:
        with atomic_path(args.save_baseline, suffix=".h5ad") as tmp:
            res.baseline.write_h5ad(tmp)
    with atomic_path(args.output) as tmp:
        res.table.to_csv(tmp, index=False)
    n = sum(res.counts.values())
    print(f"baseline: {VCC_BASELINE_NAME}, built from {what} with the {n} cells of "
          f"{len(res.counts)} perturbation(s) of {Path(args.real).name}; columns {cols.pert_col} / "
          f"control {cols.control_label!r}")
    print(f"metric\tmodel\t{VCC_BASELINE_NAME}\tscore")
    for row in res.table.itertuples(index=False):
        name, model, base, value = row
        if name == "avg_score":
            print(f"{name}\t\t\t{value:.6f}")
        else:
            print(f"{name}\t{model:.6f}\t{base:.6f}\t{value:.6f}")
    extra = f" and {args.save_baseline}" if args.save_baseline else ""
    print(f"wrote {args.output}{extra}")
    return 0
