"""``celltwin score``: normalise aggregate metrics against a baseline (cell-eval 0.8.2 ``score``)."""

from __future__ import annotations

import argparse

HELP = "score agg_results.csv against a baseline's agg_results.csv (cell-eval score)"
DESCRIPTION = """\
Compare a model's agg_results.csv with a baseline's (e.g. the cell-mean baseline evaluated on the
same real data), as cell-eval 0.8.2 `cell-eval score` does, using the 'mean' row:
  metrics whose best value is 0 (mae, mse, ...):   1 - user / baseline
  metrics whose best value is 1 (PDS, DES, ...):   (user - baseline) / (1 - baseline)
NaN becomes 0 and scores are clipped below at 0; avg_score is the mean over the metrics.
Writes a CSV with columns metric, from_baseline.

Example:
  celltwin score -i out/agg_results.csv -I base/agg_results.csv -o score.csv
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-i", "--user-input", required=True, help="agg_results.csv of the model")
    p.add_argument("-I", "--base-input", required=True, help="agg_results.csv of the baseline")
    p.add_argument("-o", "--output", default="score.csv", help="output CSV (default: %(default)s)")


def run(args: argparse.Namespace) -> int:
    from celltwin._io import atomic_path, check_outputs
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
