"""State Embedding (SE) benchmarks: embedding quality on real data, and training throughput.

Quality (default mode): for each data set in ../shared/data, cells are split 80/20 (stratified
by the label, seed 0); an SE model is trained briefly on the 80% (``--preset``, ``--steps``)
with *learned* gene vectors (no protein-language-model table exists here: the gene vectors
start random and are trained with the model); every cell is embedded with
``celltwin.models.se_embed.transform``. The baseline is PCA (``--n-pcs`` components, fitted
on the training cells) of the same model-space matrix (the same genes, log1p-normalised).
On the held-out 20% we report:

* kNN accuracy: each held-out cell gets the majority label of its ``k`` nearest *training*
  cells (Euclidean; SE embeddings are unit-norm so this is cosine ranking);
* silhouette: of the held-out cells with their labels (Euclidean);
* chance: the accuracy of always predicting the most frequent training label.

Labels: context (cell line / stimulation) and perturbation columns, per data set below.

Throughput (``--throughput``): training steps (forward + backward + AdamW) of the SE model on
synthetic counts (4,096 genes), timed after two warm-up steps, in a fresh subprocess per preset
so peak RSS (``ru_maxrss``) belongs to that preset alone.

Usage:
    OMP_NUM_THREADS=2 python bench/se_quality.py --steps 300 --out bench/se_quality.json
    OMP_NUM_THREADS=2 python bench/se_quality.py --throughput
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"

# "bench": a CPU-friendly size between the tiny and small presets (minutes on a shared 2-core box).
BENCH_PRESET = dict(
    d_model=64,
    n_layers=2,
    n_heads=4,
    mlp_hidden=128,
    d_out=64,
    sentence_len=256,
    n_mask=160,
    n_unexpressed=64,
    mask_strata=8,
    n_bins=10,
    decoder_hidden=64,
)

# name -> (file, label column, label kind, max cells used (subsample, seed 0))
TASKS = {
    "norman": ("norman2019_mcfaline2023_perturbench.h5ad", "cell_type", "context", None),
    "datlinger": ("datlinger2017_jurkat_cropseq.h5ad", "perturbation_2", "context", None),
    "papalexi": ("papalexi2021_thp1_ko.h5ad", "target_gene", "perturbation", 6000),
    "vcc": ("vcc2025_h1_subset.h5ad", "target_gene", "perturbation", None),
}


def _split(labels: np.ndarray, frac: float, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    train, test = [], []
    for lab in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == lab))
        n_test = max(1, round(frac * idx.size)) if idx.size > 1 else 0
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _scores(
    emb: np.ndarray, labels: np.ndarray, train: np.ndarray, test: np.ndarray, k: int
) -> dict[str, float]:
    from sklearn.metrics import silhouette_score
    from sklearn.neighbors import KNeighborsClassifier

    knn = KNeighborsClassifier(n_neighbors=k).fit(emb[train], labels[train])
    acc = float((knn.predict(emb[test]) == labels[test]).mean())
    sil = (
        float(silhouette_score(emb[test], labels[test])) if len(np.unique(labels[test])) > 1 else float("nan")
    )
    return {"knn_acc": acc, "silhouette": sil}


def _config(preset: str):
    from celltwin.models.state_embedding import StateEmbeddingConfig

    if preset == "bench":
        return StateEmbeddingConfig.preset("small", seed=0, **BENCH_PRESET)
    return StateEmbeddingConfig.preset(preset, seed=0)


def quality(args: argparse.Namespace) -> list[dict]:
    import anndata as ad
    import torch

    from celltwin.data.preprocess import Preprocessing
    from celltwin.data.source import H5adSource
    from celltwin.models.se_embed import transform
    from celltwin.models.se_runner import fit_state_embedding
    from celltwin.train import TrainConfig

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.datasets.split(","):
        fname, col, kind, max_cells = TASKS[name]
        path = DATA / fname
        if not path.is_file():
            print(f"skip {name}: {path} absent")
            continue
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            src = ad.read_h5ad(path)
            rng = np.random.default_rng(0)
            if max_cells is not None and src.n_obs > max_cells:
                src = src[np.sort(rng.choice(src.n_obs, max_cells, replace=False))].copy()
            labels = src.obs[col].astype(str).to_numpy()
            src.write_h5ad(tmp / "data.h5ad")
            train, test = _split(labels, 0.2, rng)
            t0 = time.perf_counter()
            res = fit_state_embedding(
                tmp / "data.h5ad",
                tmp / "model",
                config=_config(args.preset),
                train_config=TrainConfig(
                    max_steps=args.steps,
                    lr=args.lr,
                    warmup_steps=args.steps // 20,
                    progress=False,
                    tensorboard=False,
                    log_every=max(1, args.steps // 10),
                ),
                cells=train,
                batch_size=args.batch_size,
                log=lambda s, name=name: print(f"  [{name}] {s}"),
            )
            t_fit = time.perf_counter() - t0
            t0 = time.perf_counter()
            se = transform(
                tmp / "model",
                tmp / "data.h5ad",
                tmp / "out.h5ad",
                batch_size=256,
                copy_x=False,
                log=lambda s: None,
            )
            t_tr = time.perf_counter() - t0
            pre = Preprocessing.load(tmp / "model")
            h5 = H5adSource(tmp / "data.h5ad")
            x = pre.transform(h5.read_rows(np.arange(h5.n_obs)), pre.gene_index(h5.var_names))
            n_pcs = min(args.n_pcs, x.shape[1] - 1, train.size - 1)
            mu = x[train].mean(0)
            _, _, vt = np.linalg.svd(x[train] - mu, full_matrices=False)
            pcs = (x - mu) @ vt[:n_pcs].T
            vals, counts = np.unique(labels[train], return_counts=True)
            chance = float((labels[test] == vals[np.argmax(counts)]).mean())
            row = {
                "dataset": name,
                "label": col,
                "kind": kind,
                "n_cells": int(src.n_obs),
                "n_genes": x.shape[1],
                "n_labels": len(vals),
                "n_test": int(test.size),
                "chance": chance,
                "se": _scores(se, labels, train, test, args.k),
                "pca": _scores(pcs, labels, train, test, args.k),
                "se_dim": int(se.shape[1]),
                "n_pcs": int(n_pcs),
                "steps": args.steps,
                "fit_s": round(t_fit, 1),
                "transform_s": round(t_tr, 2),
                "train_cells_per_s": res.train.items_per_s,
                "last_loss": res.train.last_losses.get("loss"),
            }
            print(json.dumps(row))
            rows.append(row)
    return rows


def _throughput_child(preset: str, steps: int, batch: int, threads: int) -> None:
    import torch

    from celltwin.models.state_embedding import StateEmbeddingModel

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    G = 4096
    cfg = _config(preset)
    model = StateEmbeddingModel(
        cfg,
        [f"g{i}" for i in range(G)],
        np.random.default_rng(0).normal(size=(G, 64)).astype(np.float32),
        np.ones(G, bool),
    )
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    rate = torch.rand(batch, G) * 2 * (torch.rand(batch, G) < 0.7)
    x = torch.poisson(rate).log1p()
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        opt.zero_grad()
        model(x, return_loss=True)["loss"].backward()
        opt.step()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    n_params = sum(p.numel() for p in model.parameters())
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "preset": preset,
                "params": n_params,
                "batch": batch,
                "sentence": model.L,
                "visible_tokens": model.L - model.n_mask + 2,
                "steps_timed": steps,
                "s_per_step": float(np.median(times)),
                "s_per_step_min": float(np.min(times)),
                "cells_per_s": batch / float(np.median(times)),
                "cells_per_s_best": batch / float(np.min(times)),
                "peak_rss_mb": round(rss_mb),
                "threads": threads,
            }
        )
    )


def throughput(args: argparse.Namespace) -> list[dict]:
    rows = []
    for preset, batch, steps in (("tiny", 32, 20), ("bench", 32, 10), ("small", 16, 5), ("published", 4, 3)):
        out = subprocess.run(
            [sys.executable, __file__, "--_child", preset, str(steps), str(batch), str(args.threads)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        row = json.loads(out.strip().splitlines()[-1])
        print(json.dumps(row))
        rows.append(row)
    return rows


def _markdown(rows: list[dict]) -> str:
    lines = [
        "| data set | label (kind) | cells / genes / labels | chance | kNN acc SE | kNN acc PCA | "
        "silhouette SE | silhouette PCA | SE fit |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dataset']} | {r['label']} ({r['kind']}) | {r['n_cells']} / {r['n_genes']} / "
            f"{r['n_labels']} | {r['chance']:.3f} | {r['se']['knn_acc']:.3f} | {r['pca']['knn_acc']:.3f} | "
            f"{r['se']['silhouette']:.3f} | {r['pca']['silhouette']:.3f} | {r['fit_s']:.0f} s |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--datasets", default="norman,datlinger,papalexi,vcc")
    p.add_argument("--preset", default="bench", help="tiny | bench | small | published (default bench)")
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--n-pcs", type=int, default=50)
    p.add_argument("--k", type=int, default=15)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--throughput", action="store_true")
    p.add_argument("--out", default=None, help="write the rows as JSON here")
    p.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._child:
        preset, steps, batch, threads = args._child
        _throughput_child(preset, int(steps), int(batch), int(threads))
        return
    rows = throughput(args) if args.throughput else quality(args)
    if not args.throughput:
        print(_markdown(rows))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
