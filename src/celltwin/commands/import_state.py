"""``celltwin import-state``: convert an arc-state ST run or SE checkpoint into a celltwin directory."""

from __future__ import annotations

import argparse

HELP = "convert an arc-state (STATE) ST run directory or SE checkpoint into a celltwin model directory"
DESCRIPTION = """\
SRC is one of:
  - an arc-state ST run directory (what `state tx train` writes: config.yaml, checkpoints/*.ckpt,
    var_dims.pkl, pert_onehot_map.pt, batch/cell-type maps, data_module.torch), or a folder with
    exactly one such run below it (a published ST repository has one per cell line: name it);
  - an arc-state SE checkpoint (`state emb fit`, e.g. SE-600M's *.ckpt), or a folder holding one
    (the highest-numbered *.ckpt is taken; --checkpoint picks another);
  - a Hugging Face cache folder (models--arcinstitute--SE-600M) or a model id already in the local
    Hugging Face cache (arcinstitute/SE-600M). Nothing is downloaded.

An ST run becomes a celltwin run directory: `celltwin predict DIR ...`, `celltwin train --init-from
DIR`, `celltwin.STModel.load(DIR)`. An SE checkpoint becomes an SE model directory: `celltwin embed
transform DIR data.h5ad`, `celltwin.SEModel.load(DIR)`, `celltwin.StateEmbeddingModel.from_pretrained(DIR)`.
The architectures are celltwin's re-implementations of arc-state 0.11.1's (equal outputs within
1e-5 in fp32 on the committed test checkpoints); arc-state is not needed.

Pickled files are read by a restricted unpickler that admits plain data only (dicts, lists,
strings, numbers, numpy arrays, torch tensors): a checkpoint that would run code is refused.

ST input: arc-state models read log1p-normalised X (arc-state's `preprocess_train` output), and so
does the imported run by default; --target-sum T makes it normalise count files itself
(log1p(normalize_total(X, T))). An `X_hvg` model reads its highly variable genes from X.

Examples:
  celltwin import-state runs/replogle_st -o st_replogle
  celltwin import-state ~/.cache/huggingface/hub/models--arcinstitute--SE-600M -o se600m
  celltwin import-state arcinstitute/SE-600M -o se600m
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from celltwin.commands._common import positive_float

    p.add_argument("src", metavar="SRC", help="arc-state ST run directory, SE checkpoint, HF cache folder or id")
    p.add_argument("-o", "--output", required=True, help="celltwin directory to write (atomically)")
    p.add_argument("--checkpoint", default=None,
                   help="checkpoint to use (ST: default checkpoints/final.ckpt, then last, best; SE: in a folder, "
                        "the highest-numbered *.ckpt)")
    p.add_argument("--target-sum", type=positive_float, default=None,
                   help="ST: normalise count input to this total then log1p (default: input is already log1p-normalised)")
    p.add_argument("--protein-embeddings", default=None,
                   help="SE: gene table {gene: vector} (.pt) when the checkpoint has no protein_embeds_dict")


def run(args: argparse.Namespace) -> int:
    from celltwin.state_import import import_state

    res = import_state(args.src, args.output, checkpoint=args.checkpoint, target_sum=args.target_sum,
                       protein_embeddings=args.protein_embeddings)
    meta = res["meta"]
    if res["kind"] == "st":
        cfg = meta["state"]
        print(f"imported arc-state ST run {res['source']} ({res['checkpoint']}, {cfg['n_params']:,} parameters, "
              f"{meta['n_genes']} genes) -> {res['output']}")
    else:
        print(f"imported arc-state SE checkpoint {res['checkpoint']} ({meta['n_genes']} genes in the gene table) "
              f"-> {res['output']}")
    return 0
