"""Real-data benchmark: every baseline (and any registered model) on public Perturb-seq tasks.

Reads ``../shared/data`` (relative to the repository; never copied into it) and writes the
"Real tasks" section of ``bench/RESULTS.md`` (between the ``real-tasks`` markers) plus
``bench/real_tasks.csv``.

Tasks (split files are built with :func:`celltwin.data.split_draw.make_split` and resolved with the
same code as ``celltwin train``; ``fewshot`` holds out half of the target context's
perturbations, seed 0; ``zeroshot`` holds out the whole target context, whose controls only are
seen as prediction inputs):

* ``glioma``: McFaline-Figueroa 2023 CRISPRi in three glioblastoma lines + Norman 2019 K562
  CRISPRa singles (the doubles are dropped here), target line T98G. X is already log-normalised.
* ``jurkat``: Datlinger 2017 CROP-seq, contexts stimulated / unstimulated, target stimulated.
* ``papalexi``: THP-1 CRISPR knockouts, one context: unseen perturbations (few-shot only).
* ``norman-doubles``: K562 CRISPRa, train on the singles and half of the doubles, predict the
  other half (seed 0); the ``additive`` baseline sums the singles' effects.

Scoring (per task, per model): ``celltwin.eval.evaluate`` (cell-eval 0.8.2 semantics, ``vcc``
profile) of the predicted cells against the real held-out cells plus the target context's
controls. To compare like with like, the real cells are put through the run's own preprocessing
(model space) rather than left as counts, so both sides share one normalisation.
``pearson_delta``: Pearson correlation of the predicted and the real pseudobulk change (mean cell
minus mean control), averaged over the test perturbations. ``score``: the normalised VCC score
against the cell-mean baseline of the same task (cell-mean itself scores 0).

Usage: ``python bench/real_tasks.py`` (``--tasks glioma,jurkat`` to run a subset,
``--models`` to pick models, ``--no-write`` to only print).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
RESULTS_MD = REPO / "bench" / "RESULTS.md"
RESULTS_CSV = REPO / "bench" / "real_tasks.csv"
START, END = "<!-- real-tasks:start -->", "<!-- real-tasks:end -->"

# (row label, --set options); the label is a registered model name or an ALIASES key.
_ST = {"preset": "small", "steps": "250", "lr": "2e-3", "progress": "false", "tensorboard": "false", "threads": "1"}
ALIASES: dict[str, str] = {}  # row label -> registered model, for rows that are not model names
MODELS: list[tuple[str, dict[str, str]]] = [
    ("control", {}),
    ("cell-mean", {}),
    ("perturbation-mean", {}),
    ("context-transfer", {}),
    ("scaled-context-transfer", {}),
    ("linear", {}),
    ("additive", {}),
    ("state", dict(_ST)),
    # ST on SE embeddings: an SE model fitted on the task's training cells inside the run. SE "tiny":
    # on the demo the "small" SE scored the same (0.276 vs 0.277) at 8x the time
    ("state-se", {**_ST, "se_preset": "tiny", "se_steps": "300", "se_batch": "64"}),
]


@dataclass
class Task:
    name: str
    file: str
    pert_col: str
    control: str
    context_col: str | None
    target: str
    kinds: tuple[str, ...]
    keep: dict[str, list[str]] = field(default_factory=dict)  # obs column -> values kept
    drop_combos: bool = False
    doubles: bool = False
    note: str = ""


TASKS: dict[str, Task] = {
    "glioma": Task("glioma", "norman2019_mcfaline2023_perturbench.h5ad", "perturbation", "control", "cell_type",
                   "T98G", ("fewshot", "zeroshot"), drop_combos=True,
                   note="CRISPRi in A172/U87MG/T98G + CRISPRa singles in K562; target T98G"),
    "jurkat": Task("jurkat", "datlinger2017_jurkat_cropseq.h5ad", "target_gene", "control", "perturbation_2",
                   "stimulated", ("fewshot", "zeroshot"), note="CROP-seq, TCR-stimulated vs unstimulated"),
    "papalexi": Task("papalexi", "papalexi2021_thp1_ko.h5ad", "target_gene", "non-targeting", None, "all",
                     ("fewshot",), note="THP-1 knockouts, one context: unseen perturbations"),
    "norman-doubles": Task("norman-doubles", "norman2019_mcfaline2023_perturbench.h5ad", "perturbation", "control",
                           "cell_type", "k562", ("doubles",), keep={"cell_type": ["k562"]}, doubles=True,
                           note="K562 CRISPRa: singles + half the doubles -> the other doubles"),
}


def _load(task: Task):
    import anndata as ad

    path = DATA / task.file
    a = ad.read_h5ad(path)
    mask = np.ones(a.n_obs, dtype=bool)
    for col, vals in task.keep.items():
        mask &= a.obs[col].astype(str).isin(vals).to_numpy()
    if task.drop_combos:
        mask &= ~a.obs[task.pert_col].astype(str).str.contains("+", regex=False).to_numpy()
    a = a[mask].copy()
    for col in a.obs.columns:  # categories left empty by the subsetting would linger
        if hasattr(a.obs[col], "cat"):
            a.obs[col] = a.obs[col].cat.remove_unused_categories()
    return a


def _split(task: Task, kind: str, a, cols, path: Path):
    from celltwin.data.split import Split, split_key
    from celltwin.data.split_draw import make_split

    if kind == "doubles":
        perts = sorted(set(a.obs[task.pert_col].astype(str)) - {task.control})
        doubles = [p for p in perts if "+" in p]
        order = [doubles[i] for i in np.random.default_rng(0).permutation(len(doubles))]
        test = sorted(order[: len(doubles) // 2])
        sp = Split(datasets={"data": str(DATA / task.file)}, training={"data": "train"},
                   fewshot={split_key("data", task.target): {"val": [], "test": test}},
                   comment="norman doubles: train singles + half the doubles")
    else:
        sp = make_split(a.obs, cols, task.target, holdout=0.5, seed=0, kind=kind, data_path=str(DATA / task.file))
    sp.write(path)
    return path


def run_task(task: Task, kind: str, models: list[tuple[str, dict[str, str]]], workdir: Path, log=print):
    """Train, predict and score every model on one task variant; returns a list of result rows."""
    import anndata as ad
    import pandas as pd

    from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
    from celltwin.data.columns import ObsColumns
    from celltwin.data.dataset import CellDataset
    from celltwin.data.preprocess import Preprocessing
    from celltwin.data.split import read_split
    from celltwin.demo import pearson_rows
    from celltwin.eval import EvalConfig, evaluate, score
    from celltwin.pipeline import resolve_dataset_split
    from celltwin.predict import PredictRequest, load_predictor, predict_cells, summarize_sources, train_run

    a = _load(task)
    cols = ObsColumns(pert_col=task.pert_col, control_label=task.control, context_col=task.context_col,
                      batch_col=None)
    split_path = _split(task, kind, a, cols, workdir / f"{task.name}-{kind}.toml")
    split = read_split(split_path)
    dataset = CellDataset.from_anndata(a, cols, name=next(iter(split.datasets)))
    rs = resolve_dataset_split(dataset, split, require_test=True)
    obs = dataset.obs  # canonical labels: PERT_COL (controls relabelled CONTROL_LABEL), CONTEXT_COL
    (ctx,) = {c for c, _ in rs.test_pairs}
    test = [p for _, p in rs.test_pairs]
    pert_all = obs[PERT_COL].to_numpy()
    ctx_all = obs[CONTEXT_COL].to_numpy()
    in_ctx = ctx_all == ctx
    n_cells = [int(np.sum(in_ctx & (pert_all == p))) for p in test]
    ctrl_rows = np.flatnonzero(in_ctx & (pert_all == CONTROL_LABEL))
    real_rows = np.flatnonzero(in_ctx & (np.isin(pert_all, test) | (pert_all == CONTROL_LABEL)))
    train = ad.AnnData(X=a.X[rs.train_rows], obs=obs.iloc[rs.train_rows], var=a.var[[]].copy())
    log(f"[{task.name}/{kind}] {train.n_obs} training cells, {len(test)} test perturbations in {ctx!r} "
        f"({sum(n_cells)} cells, {ctrl_rows.size} controls)")

    rows, base_agg, de_real, real_m = [], None, None, None
    for name, opts in models:
        t0 = time.perf_counter()
        run_dir = workdir / f"{task.name}-{kind}" / name
        train_run(ALIASES.get(name, name), train, run_dir, options=opts)
        pre = Preprocessing.load(run_dir)
        gidx = pre.gene_index(a.var_names, task.file)
        if real_m is None:  # the same preprocessing for every model (same training cells)
            real_m = ad.AnnData(X=pre.transform(a.X[real_rows], gidx),
                                obs=pd.DataFrame({PERT_COL: pert_all[real_rows]}, index=a.obs_names[real_rows]),
                                var=pd.DataFrame(index=pre.genes))
        C = pre.transform(a.X[ctrl_rows], gidx)
        pred = predict_cells(load_predictor(run_dir), C, PredictRequest(ctx, test, n_cells), seed=0)
        res = evaluate(pred, real_m.copy(), config=EvalConfig(), de_real=de_real)
        de_real = res.de_real
        mean = res.agg.set_index("statistic").loc["mean"]
        n_fb = sum(1 for s in summarize_sources(pred).values() if s != "model")
        r = pearson_rows(res.bulk["delta_pred"], res.bulk["delta_real"])
        rows.append({"task": task.name, "kind": kind, "model": name, "n_test": len(test),
                     "DES": float(mean["overlap_at_N"]), "PDS": float(mean["discrimination_score_l1"]),
                     "MAE": float(mean["mae"]), "pearson_delta": float(np.nanmean(r)), "fallbacks": n_fb,
                     "seconds": time.perf_counter() - t0, "_agg": res.agg})
        if name == "cell-mean":
            base_agg = res.agg
    for r in rows:
        agg = r.pop("_agg")
        if base_agg is not None:
            s = score(agg, base_agg)
            r["score"] = float(s.loc[s["metric"] == "avg_score", "from_baseline"].iloc[0])
        else:
            r["score"] = float("nan")
    return rows


def _markdown(df, elapsed: float) -> str:
    lines = [START, "## Real tasks", "",
             "`python bench/real_tasks.py` (`bench/real_tasks.py` docstring: tasks, splits, scoring). "
             "DES = `overlap_at_N`, PDS = `discrimination_score_l1` (1 = the true perturbation is the closest), "
             "MAE on pseudobulks (lower is better), `score` = normalised VCC score vs the cell-mean baseline "
             "(0 = no better than cell-mean), `pearson_delta` = correlation of predicted and real pseudobulk "
             "change, `fb` = perturbations where the model's own rule did not apply (baselines fall back to "
             "cell-mean; `state` / `state-se` return the unchanged controls for a perturbation never trained, "
             "and in the zero-shot tasks predict with the \"unknown context\" token, also counted). "
             "`state-se` = ST on State Embedding cells (SE fitted on the task's training cells). Means over the test "
             f"perturbations. Whole run: {elapsed:.0f} s.", ""]
    for (task, kind), g in df.groupby(["task", "kind"], sort=False):
        t = TASKS[task]
        lines += [f"### {task} / {kind} ({t.note}; {int(g['n_test'].iloc[0])} test perturbations)", "",
                  "| model | DES | PDS | MAE | score | pearson_delta | fb |", "|---|---|---|---|---|---|---|"]
        for _, r in g.iterrows():
            lines.append(f"| {r['model']} | {r['DES']:.3f} | {r['PDS']:.3f} | {r['MAE']:.4f} | {r['score']:.3f} | "
                         f"{r['pearson_delta']:.3f} | {int(r['fallbacks'])} |")
        lines.append("")
    lines += ["Reading. On these small panels (300-2,000 genes, weak effects) no method separates clearly "
              "from the cell-mean baseline: DES is 0 for most models on most tasks (few real significant "
              "genes to recover), PDS stays close to the 0.5 of a random ranking, and every normalised score "
              "is small. `pearson_delta` of cell-mean and perturbation-mean is high in the few-shot tasks "
              "because the held-out perturbations share the context's common shift; context-transfer and "
              "its scaled version do not beat it, and `fb` shows where a rule did not apply (linear: target "
              "gene not in the panel; additive: no double, or a single never trained in the context), in "
              "which case the row equals cell-mean. ST (`state`) and ST on SE embeddings (`state-se`) give the "
              "largest scores in 4 of the 6 variants (glioma and jurkat few-shot: `state-se` 0.095 / 0.102, "
              "the latter with DES 0.30; glioma zero-shot and norman doubles: `state` 0.053 / 0.024), but on "
              "panels this weak a score of 0.1 is a few perturbations ranked differently, not a separation. "
              "Zero-shot jurkat: every model is at or below `control`. papalexi: every perturbation is unseen, "
              "so both ST rows equal `control` (one-hot inputs; gene-embedding inputs need a protein-language-"
              "model table, which this machine does not have).", ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def _write_results(section: str) -> None:
    from celltwin._io import atomic_path

    text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
    if START in text and END in text:
        pre, rest = text.split(START, 1)
        post = rest.split(END, 1)[1]
        text = pre + section.rstrip("\n") + post
    else:
        text = text.rstrip("\n") + "\n\n" + section
    with atomic_path(RESULTS_MD) as tmp:
        tmp.write_text(text)


def main(argv: list[str] | None = None) -> int:
    import tempfile

    import pandas as pd

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default=",".join(TASKS), help="comma-separated tasks")
    ap.add_argument("--models", default=None, help="comma-separated model names (default: MODELS)")
    ap.add_argument("--no-write", action="store_true", help="print only; do not touch RESULTS.md")
    ap.add_argument("--render", type=float, default=None, metavar="SECONDS",
                    help="only rewrite the RESULTS.md section from bench/real_tasks.csv (SECONDS: the run's wall time)")
    args = ap.parse_args(argv)
    if args.render is not None:
        import pandas as pd

        _write_results(_markdown(pd.read_csv(RESULTS_CSV), args.render))
        return 0
    if not DATA.exists():
        print(f"skipped: {DATA} not found", file=sys.stderr)
        return 0
    models = MODELS if args.models is None else [(m, dict(MODELS).get(m, {})) for m in args.models.split(",")]
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="celltwin-bench-") as tmp:
        for name in args.tasks.split(","):
            task = TASKS[name]
            for kind in task.kinds:
                rows += run_task(task, kind, models, Path(tmp))
    elapsed = time.perf_counter() - t0
    df = pd.DataFrame(rows)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(df.drop(columns=["seconds"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    print(f"total {elapsed:.1f}s")
    if not args.no_write:
        from celltwin._io import atomic_path

        with atomic_path(RESULTS_CSV) as tmp:
            df.to_csv(tmp, index=False, float_format="%.6g")
        _write_results(_markdown(df, elapsed))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    sys.exit(main())
