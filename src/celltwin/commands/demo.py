"""``celltwin demo``: the whole pipeline on the embedded simulator, with a table and a report."""

from __future__ import annotations

import argparse

HELP = "run the full pipeline on simulated data: split, train, predict, evaluate, report"
DESCRIPTION = """\
Simulate a screen with known ground truth (celltwin.sim), hold out half of the last context's
perturbations (few-shot, like the Virtual Cell Challenge), train every baseline (and every other
registered model, e.g. the State Transition model, when torch is installed), predict the held-out
cells, evaluate them with the VCC metrics and print a table: DES / PDS / MAE, the score
normalised against the project's cell-mean model (VCC formula; not the VCC baseline, see
`celltwin score`), and the correlation of each prediction with the true effect.

Writes under DIR: data.h5ad, split.toml, runs/<model>/, preds/<model>.h5ad, real.h5ad,
eval/<model>/ (cell-eval style CSVs), summary.csv and report/ (index.md, index.html, PNG plots).

Example:
  celltwin demo -o demo_out
"""


# what run_demo writes under DIR (an earlier run's entries of these names are replaced or removed;
# any other file of DIR is kept)
OUTPUT_NAMES = frozenset(
    {"data.h5ad", "split.toml", "runs", "preds", "real.h5ad", "eval", "summary.csv", "report"}
)


def _retarget_run_meta(tmp, final) -> None:
    """run.json files record the demo's data / split paths: point them at DIR, not the staging folder."""
    import json
    import os
    from pathlib import Path

    tmp_s, final_s = str(tmp), os.path.abspath(final)
    for meta in Path(tmp).glob("runs/*/run.json"):
        doc = json.loads(meta.read_text(encoding="utf-8"))
        changed = False
        for key, value in doc.items():
            if isinstance(value, str) and value.startswith(tmp_s):
                doc[key] = final_s + value[len(tmp_s):]
                changed = True
        if changed:
            meta.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", default="demo_out", help="output directory (default: demo_out)")
    p.add_argument("--preset", default="demo", help="simulator preset: tiny, demo (default: demo)")
    p.add_argument("--seed", type=int, default=0, help="simulator and prediction seed (default 0)")
    p.add_argument("--models", default=None, help="comma-separated models (default: all baselines + registered)")
    p.add_argument("--no-report", action="store_true", help="skip the plots and the HTML/markdown report")


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from celltwin._io import atomic_dir
    from celltwin._output_checks import check_outputs
    from celltwin.demo import DemoConfig, run_demo

    check_outputs({"-o/--output": args.output}, dirs={"-o/--output"})
    console = Console()
    models = tuple(m.strip() for m in args.models.split(",") if m.strip()) if args.models else None
    cfg = DemoConfig(preset=args.preset, seed=args.seed, models=models, report=not args.no_report)
    # all of DIR's demo files appear together or not at all (a killed run leaves the previous ones)
    with console.status("running the demo") as status, atomic_dir(args.output, owned=OUTPUT_NAMES) as tmp:
        res = run_demo(tmp, cfg, log=lambda s: (console.log(s), status.update(s)))
        _retarget_run_meta(tmp, args.output)
    table = Table(title=f"celltwin demo ({cfg.preset} preset): held-out perturbations of the target context")
    for col in res.table.columns:
        table.add_column(col, justify="left" if col == "model" else "right")
    for _, r in res.table.iterrows():
        cells = []
        for col in res.table.columns:
            v = r[col]
            cells.append(f"{v:.3f}" if isinstance(v, float) and v == v else ("" if isinstance(v, float) else str(v)))
        table.add_row(*cells)
    console.print(table)
    console.print("DES, PDS, score, pearson_true: higher is better; MAE: lower is better. "
                  "score = normalised vs the cell-mean model (not the VCC baseline); observed = the real held-out cells.")
    where = f"{args.output}/report/index.html" if cfg.report else f"{args.output}/summary.csv"
    console.print(f"done in {res.timings['total']:.1f}s; report: {where}")
    return 0
