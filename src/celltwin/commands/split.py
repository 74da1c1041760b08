"""``celltwin split``: write a few-shot or zero-shot split TOML for a dataset."""

from __future__ import annotations

import argparse

HELP = "write a few-shot / zero-shot train-val-test split (cell-load / STATE TOML format)"
DESCRIPTION = """\
Write a split file for DATA (an .h5ad; only obs is read).

fewshot (default): hold out --holdout perturbations (a count, or a fraction in (0, 1)) of the
  --target context for test (and --val more for validation), chosen with --seed among the
  perturbations with at least --min-cells cells there (smaller ones always stay training data).
  The target context's control cells and remaining perturbations are training data; the same
  controls are the basal inputs / control reference when predicting the held-out ones.
zeroshot: hold out the whole --target context for test. Its perturbed cells are never trained
  on; its control cells are used only as prediction inputs (not training data).
Every other context is training data. The dataset is named after the file (dots -> '_') unless
--name is given; [datasets] records DATA relative to the output file's folder.
"""


def _number(text: str) -> float:
    import math

    try:
        v = float(text)
    except ValueError:
        msg = f"expected a count or a fraction, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if not math.isfinite(v) or v < 0:
        msg = f"expected a count (N >= 1) or a fraction in (0, 1), got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return v


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("data", metavar="DATA", help="input .h5ad")
    p.add_argument("--context-col", required=True, help="obs column with the context (cell type / line)")
    p.add_argument(
        "--target", required=True, help="the context to hold out perturbations from (or all of it)"
    )
    p.add_argument(
        "--holdout",
        type=_number,
        default=None,
        help="fewshot: test perturbations, a count (N >= 1) or a fraction in (0, 1)",
    )
    p.add_argument(
        "--val", type=_number, default=0, help="fewshot: validation perturbations (count or fraction)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of held-out perturbations")
    p.add_argument("--kind", choices=("fewshot", "zeroshot"), default="fewshot")
    p.add_argument("--pert-col", default=None, help="obs column with the perturbation (default target_gene)")
    p.add_argument("--control-label", default=None, help="label of control cells (default non-targeting)")
    p.add_argument(
        "--min-cells",
        type=int,
        default=1,
        help="only perturbations with at least this many cells in the target are held out",
    )
    p.add_argument("--name", default=None, help="dataset name in the TOML (default: file stem)")
    p.add_argument("-o", "--output", required=True, help="output split.toml")


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from celltwin._constants import CONTROL_LABEL, PERT_COL
    from celltwin._io import check_outputs
    from celltwin.data.columns import ObsColumns
    from celltwin.data.source import H5adSource
    from celltwin.data.split import make_split, resolve_split
    from celltwin.errors import ConfigError

    check_outputs({"-o/--output": args.output}, {"DATA": args.data})
    src = H5adSource(args.data)
    cols = ObsColumns(
        pert_col=args.pert_col or PERT_COL,
        control_label=args.control_label or CONTROL_LABEL,
        context_col=args.context_col,
        batch_col=None,
    )
    if args.kind == "fewshot" and args.holdout is None:
        raise ConfigError("--holdout is required for a few-shot split (a count or a fraction)")
    out = Path(args.output)
    name = args.name or Path(args.data).name.removesuffix(".h5ad").replace(".", "_")
    rel = os.path.relpath(Path(args.data).resolve(), out.resolve().parent)
    split = make_split(
        src.obs,
        cols,
        target=args.target,
        holdout=args.holdout or 0,
        seed=args.seed,
        kind=args.kind,
        val=args.val,
        dataset=name,
        data_path=rel,
        min_cells=args.min_cells,
        where=str(args.data),
    )
    split.write(out)
    split.path = out
    counts = resolve_split(split, src.obs, cols, where=str(args.data)).summary()
    print(f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " cells")
    return 0
