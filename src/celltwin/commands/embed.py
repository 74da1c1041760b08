"""``celltwin embed``: train the State Embedding (SE) model and embed cells with it."""

from __future__ import annotations

import argparse
import os

from celltwin.commands._common import (
    add_column_arguments,
    column_overrides,
    non_negative_int,
    positive_float,
    positive_int,
    progress_callback,
)

HELP = "train the State Embedding model (fit) or write SE cell embeddings (transform)"
DESCRIPTION = """\
fit:       train an SE model on the cells of an .h5ad and write a model directory (config.json,
           genes.txt, gene_embeddings.safetensors, model.safetensors, run.json, checkpoints/,
           metrics.csv). Re-running the same command resumes from checkpoints/last.pt.
transform: embed every cell of an .h5ad and write obsm["X_state"] (rows read lazily in batches;
           the output file is written atomically).

Gene vectors: --genes takes a table from `celltwin genes embed` or any .safetensors / .pt / .npy
(+ gene list) / .csv table; names are matched exactly, then through the HGNC table (--hgnc).
Without --genes every gene gets a learned vector (random start, trained with the model): no
protein-language-model information is used, and the command says so.

Model space: counts become log1p(normalize_total(X, T)) with T the median library size of the
training cells; non-integer X is taken as already log-normalised.

Examples:
  celltwin embed fit --data screen.h5ad --genes genes.safetensors -o se_model --preset small --steps 2000
  celltwin embed fit --data screen.h5ad --split split.toml -o se_model   # training cells of a split only
  celltwin embed transform se_model screen.h5ad -o screen.se.h5ad
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="embed_command", metavar="{fit,transform}", required=True)
    f = sub.add_parser("fit", help="train an SE model", formatter_class=argparse.RawDescriptionHelpFormatter)
    f.add_argument("--data", required=True, help="training .h5ad (counts or log1p-normalised)")
    f.add_argument("-o", "--output", required=True, help="model directory to write")
    f.add_argument(
        "--split",
        default=None,
        help="split .toml (see `celltwin split`): train on its training cells only (default: all cells)",
    )
    f.add_argument("--genes", default=None, help="gene embedding table (default: learned gene vectors)")
    f.add_argument("--gene-list", default=None, help="gene names for a .npy --genes table, one per line")
    f.add_argument(
        "--hgnc", default=None, help="HGNC table (hgnc_genes.tsv) to map aliases / old symbols / Ensembl IDs"
    )
    f.add_argument(
        "--gene-dim",
        type=positive_int,
        default=64,
        help="size of the learned gene vectors without --genes (64)",
    )
    f.add_argument(
        "--preset",
        default="small",
        choices=["tiny", "small", "published"],
        help="model size (default small; published = 512 wide, 8 layers, 16 heads, L 2048)",
    )
    f.add_argument(
        "--loss",
        default=None,
        choices=["mse", "energy", "mmd", "mse+energy", "mse+mmd"],
        help="training loss (default mse)",
    )
    f.add_argument(
        "--sentence-len", type=positive_int, default=None, help="top genes per cell (preset's by default)"
    )
    f.add_argument(
        "--n-mask", type=positive_int, default=None, help="masked genes per cell (preset's by default)"
    )
    f.add_argument("--dataset-key", default=None, help="obs column naming datasets (one [DS] token each)")
    f.add_argument(
        "--n-top-genes",
        type=positive_int,
        default=None,
        help="restrict the vocabulary to the N highly variable genes (seurat_v3) of the training cells",
    )
    f.add_argument("--steps", type=positive_int, default=1000, help="optimiser steps (1000)")
    f.add_argument("--batch-size", type=positive_int, default=32, help="cells per step (32)")
    f.add_argument("--num-workers", type=non_negative_int, default=1,
                   help="DataLoader processes reading the batches from disk (1; 0 = in the training process)")
    f.add_argument("--lr", type=positive_float, default=3e-4, help="peak learning rate (3e-4)")
    f.add_argument(
        "--warmup", type=non_negative_int, default=None, help="warmup steps (default 5%% of --steps)"
    )
    f.add_argument("--ckpt-every", type=positive_int, default=200, help="checkpoint every N steps (200)")
    f.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K (CUDA untested here)")
    f.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"])
    f.add_argument("--seed", type=int, default=0)
    f.add_argument("--no-resume", action="store_true", help="start over even if checkpoints exist")
    f.add_argument("--no-progress", action="store_true")
    add_column_arguments(f)

    t = sub.add_parser(
        "transform",
        help="write SE embeddings to obsm['X_state']",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    t.add_argument("model", help="model directory from `celltwin embed fit`")
    t.add_argument("data", help="input .h5ad")
    t.add_argument("-o", "--output", required=True, help="output .h5ad")
    t.add_argument("--batch-size", type=positive_int, default=256, help="cells per forward pass (256)")
    t.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K (CUDA untested here)")
    t.add_argument(
        "--no-x",
        action="store_true",
        help="write obs, var and obsm['X_state'] only (default: a full copy of the input + X_state)",
    )
    t.add_argument("--dataset-key", default=None, help="obs column whose values name the model's datasets")
    t.add_argument("--hgnc", default=None, help="HGNC table to match gene names through aliases")
    t.add_argument("--no-progress", action="store_true")


def _fit(args: argparse.Namespace) -> int:
    from celltwin._output_checks import check_outputs

    check_outputs(
        {"-o/--output": args.output},
        {"--data": args.data, "--split": args.split, "--genes": args.genes, "--gene-list": args.gene_list,
         "--hgnc": args.hgnc},
        dirs={"-o/--output"},
    )
    cells = None
    if args.split is not None:  # read and check the split before the (slow) torch import
        from celltwin.data.columns import merge_columns, resolve_columns
        from celltwin.data.source import H5adSource
        from celltwin.data.split import read_split, resolve_split

        split = read_split(args.split)
        obs = H5adSource(args.data).obs
        cols = resolve_columns(obs, merge_columns(column_overrides(args), split.columns), args.data)
        cells = resolve_split(split, obs, cols, where=args.data).train
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"training on the {cells.size} training cells of {args.split}")
    from celltwin.models.se_options import SEOptions
    from celltwin.models.se_runner import fit_se  # torch: after the cheap checks

    opts = SEOptions.create(
        preset=args.preset, loss=args.loss or "", sentence_len=args.sentence_len or 0, n_mask=args.n_mask or 0,
        gene_dim=args.gene_dim, n_top_genes=args.n_top_genes or 0, steps=args.steps, batch_size=args.batch_size,
        num_workers=args.num_workers, lr=args.lr, warmup=-1 if args.warmup is None else args.warmup,
        ckpt_every=args.ckpt_every, device=args.device, precision=args.precision, resume=not args.no_resume,
        progress=not args.no_progress, genes=args.genes or "", gene_list=args.gene_list or "", hgnc=args.hgnc or "",
    )
    res = fit_se(args.data, args.output, opts, seed=args.seed, cells=cells, dataset_key=args.dataset_key)
    rate = f", {res.train.items_per_s:.1f} cells/s" if res.train.items_per_s else ""
    loss = res.train.last_losses.get("loss")
    msg = f"trained SE ({args.preset}) for {res.train.step} steps{rate}"
    if loss is not None:
        msg += f"; last loss {loss:.4g}"
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun only rank 0 reports
        print(f"{msg} -> {args.output}")
    return 0


def _transform(args: argparse.Namespace) -> int:
    from celltwin._constants import EMBED_KEY
    from celltwin._output_checks import check_outputs

    check_outputs({"-o/--output": args.output}, {"MODEL": args.model, "DATA": args.data, "--hgnc": args.hgnc})
    from celltwin.models.se_embed import transform

    kw = dict(
        batch_size=args.batch_size,
        device=args.device,
        copy_x=not args.no_x,
        dataset_key=args.dataset_key,
        hgnc=args.hgnc,
    )
    with progress_callback("embedding", "cells", not args.no_progress) as cb:
        emb = transform(args.model, args.data, args.output, **kw, progress=cb)
    print(f"wrote {args.output}: obsm[{EMBED_KEY!r}] {emb.shape[0]} cells x {emb.shape[1]} dims")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.embed_command == "fit":
        return _fit(args)
    return _transform(args)
