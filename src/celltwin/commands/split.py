"""``celltwin split``: write a few-shot or zero-shot split TOML for a dataset."""

from __future__ import annotations

import argparse

HELP = "write a few-shot / zero-shot train-val-test split (cell-load / STATE TOML format)"
DESCRIPTION = """\
Write a split file for DATA (an .h5ad; only obs is read).

fewshot (default): hold out --holdout perturbations (a count, or a fraction in (0, 1)) of the
  --target context for test (and --val more for validation), chosen with --seed among the
  perturbations with at least --min-cells cells there (smaller ones always stay training data).
  --test A,B,C (or --test @FILE, one perturbation per line) names the test perturbations instead
  of --holdout; each must have cells in the target context (--min-cells does not apply to them).
  The target context's control cells and remaining perturbations are training data; the same
  controls are the basal inputs / control reference when predicting the held-out ones.
zeroshot: hold out the whole --target context for test. Its perturbed cells are never trained
  on; its control cells are used only as prediction inputs (not training data).
Every other context is training data. The dataset is named after the file (dots -> '_') unless
--name is given; [datasets] records DATA relative to the output file's folder.

Columns: --pert-col (default target_gene), --control-pert (default non-targeting),
--context-col (default context; when DATA has no such column and none is named, DATA is one
context named 'all' and --target may be left out) and --batch-col (optional) are recorded in the
split's [columns] table; `celltwin train`, `predict` and `score` read them from there when their
own flags are not given (a flag given there wins over the table).
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
    p.add_argument(
        "--target",
        default=None,
        help="the context to hold out perturbations from (or all of it); default: the only context",
    )
    hold = p.add_mutually_exclusive_group()
    hold.add_argument(
        "--holdout",
        type=_number,
        default=None,
        help="fewshot: test perturbations, a count (N >= 1) or a fraction in (0, 1)",
    )
    hold.add_argument(
        "--test",
        default=None,
        metavar="A,B,C|@FILE",
        help="fewshot: the test perturbations, comma-separated or @FILE with one per line (instead of --holdout)",
    )
    p.add_argument(
        "--val", type=_number, default=0, help="fewshot: validation perturbations (count or fraction)"
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the choice of held-out perturbations")
    p.add_argument("--kind", choices=("fewshot", "zeroshot"), default="fewshot")
    p.add_argument(
        "--min-cells",
        type=int,
        default=1,
        help="only perturbations with at least this many cells in the target are held out",
    )
    p.add_argument("--name", default=None, help="dataset name in the TOML (default: file stem)")
    p.add_argument("-o", "--output", required=True, help="output split.toml")
    g = p.add_argument_group("data columns (recorded in the split's [columns] table)")
    g.add_argument("--pert-col", default=None, help="obs column with the perturbation (default target_gene)")
    g.add_argument(
        "--control-pert",
        "--control-label",
        dest="control_label",
        default=None,
        help="label of control cells in the perturbation column (default non-targeting)",
    )
    g.add_argument(
        "--context-col",
        default=None,
        help="obs column with the context (cell type / line / condition); default context, and "
        "without that column the file is one context named 'all'",
    )
    g.add_argument("--batch-col", default=None, help="obs column with the batch (optional; only recorded)")


def _test_list(text: str) -> list[str]:
    """``--test``: ``A,B,C`` or ``@FILE`` (one perturbation per line; blank lines and ``#`` lines skipped)."""
    from celltwin._io import read_text
    from celltwin.errors import ConfigError

    if text.startswith("@"):
        lines = read_text(text[1:], "--test file").splitlines()
        items = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    else:
        items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        msg = f"--test {text!r}: no perturbation given"
        raise ConfigError(msg)
    return items


def run(args: argparse.Namespace) -> int:
    import os
    from pathlib import Path

    from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
    from celltwin._output_checks import check_outputs
    from celltwin.data.columns import ObsColumns, require_columns
    from celltwin.data.source import H5adSource
    from celltwin.data.split import resolve_split
    from celltwin.data.split_draw import make_split
    from celltwin.errors import ConfigError, InputError

    check_outputs({"-o/--output": args.output}, {"DATA": args.data})
    if args.kind == "fewshot" and args.holdout is None and args.test is None:
        raise ConfigError("--holdout is required for a few-shot split (a count or a fraction), or --test with the list")
    if args.kind == "zeroshot" and args.test is not None:
        raise ConfigError("--test: only for a few-shot split (zeroshot holds out the whole --target context)")
    test = _test_list(args.test) if args.test is not None else None
    src = H5adSource(args.data)
    context_col = args.context_col
    if context_col is None and CONTEXT_COL in src.obs.columns:
        context_col = CONTEXT_COL
    cols = ObsColumns(
        pert_col=args.pert_col or PERT_COL,
        control_label=args.control_label or CONTROL_LABEL,
        context_col=context_col,
        batch_col=args.batch_col,
    )
    require_columns(src.obs, [cols.pert_col, cols.context_col, cols.batch_col], str(args.data))
    target = args.target
    if target is None:
        contexts = sorted(set(cols.contexts(src.obs).tolist()))
        if len(contexts) != 1:
            shown = ", ".join(contexts[:20]) + (" ..." if len(contexts) > 20 else "")
            msg = f"--target: {args.data} has {len(contexts)} contexts in column {cols.context_col}; name one ({shown})"
            raise InputError(msg)
        target = contexts[0]
    out = Path(args.output)
    name = args.name or Path(args.data).name.removesuffix(".h5ad").replace(".", "_")
    rel = os.path.relpath(Path(args.data).resolve(), out.resolve().parent)
    split = make_split(
        src.obs,
        cols,
        target=target,
        holdout=args.holdout or 0,
        seed=args.seed,
        kind=args.kind,
        val=args.val,
        dataset=name,
        data_path=rel,
        min_cells=args.min_cells,
        where=str(args.data),
        test=test,
    )
    split.write(out)
    split.path = out
    counts = resolve_split(split, src.obs, cols, where=str(args.data)).summary()
    ctx_note = f"context {cols.context_col}" if cols.context_col else "no context column (one context, 'all')"
    print(
        f"wrote {out}: " + ", ".join(f"{k} {v}" for k, v in counts.items()) + " cells; "
        f"columns: perturbation {cols.pert_col} (control {cols.control_label!r}), {ctx_note}"
        + (f", batch {cols.batch_col}" if cols.batch_col else "")
    )
    return 0
