"""``celltwin train``: fit a model (a baseline or a registered neural model) on a split's training cells."""

from __future__ import annotations

import argparse

from celltwin.commands._common import add_column_arguments, column_overrides, parse_sets

HELP = "train a model (baselines, ST) on the training cells of a split"
DESCRIPTION = """\
Fit MODEL on the training cells of SPLIT and write a run directory (run.json, genes.txt and the
model files). Models work in log1p(normalize_total) space with the median library size of the
training cells (non-integer data is taken as already log-normalised).

Baselines: control, cell-mean, perturbation-mean, context-transfer, scaled-context-transfer,
linear, additive (rules and fallbacks for unseen perturbations: see celltwin.baselines.models).
cell-mean is NOT the VCC baseline: it adds the cell-weighted mean shift of the training perturbed
cells to each control cell (cell-to-cell variation kept), while the VCC baseline (`celltwin
baseline`, cell-eval's cell-mean) gives every predicted cell one vector, the unweighted mean of the
perturbation groups' means (control group included). Scores differ; `celltwin score --train/--split`
normalises against the real VCC baseline.

Columns: --pert-col / --control-pert / --context-col / --batch-col default to the split's
[columns] table (written by `celltwin split`), else target_gene / non-targeting / context / batch;
a flag wins over the split file.

State Transition model (--model state; needs torch). Multi-process: torchrun --nproc_per_node N
-m celltwin train ... Every model's --set options, with their defaults, are listed at the end.

ST on State Embedding cells (--input-space embedding, or --model state-se): ST works on SE cell embeddings and a learned
decoder maps its output back to the run's genes. --se-model DIR uses a model from `celltwin embed
fit` (copied into the run); without it an SE model is fitted on the training cells first
(options se_preset, se_steps, se_batch, se_lr).

Unseen perturbations (--set pert_embeddings=genes.safetensors): perturbations are encoded by their
gene's vector from a table (`celltwin genes embed`, or .pt/.npy/.csv tables; pert_hgnc=hgnc_genes.tsv
matches aliases), so a gene never perturbed in training is predicted from its vector at predict time.

Data: the split's [datasets] (each one .h5ad, a folder of .h5ad files or a glob; several datasets
are aligned by gene name) or --data. Everything is read from disk block by block: memory does
not grow with the number of cells. Inputs and outputs as arc-state's embed_key / output_space:
--hvg N (input = N highly variable genes; output every gene by default), --embed-key KEY (input =
obsm[KEY]), --output-space gene|all|embedding. ST data loading: --set num_workers=N.

Examples:
  celltwin train --model state --split split.toml --hvg 2000 -o runs/st-hvg   # HVG in, all genes out
  celltwin train --model linear --data screen.h5ad --split split.toml -o runs/linear
  celltwin train --model state --data screen.h5ad --split split.toml -o runs/st --set preset=small
  celltwin train --model state-se --se-model se_model --data screen.h5ad --split split.toml -o runs/st-se
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    from celltwin.registry import model_names, options_help  # standard library only: --help stays cheap

    p.add_argument("--model", required=True, metavar="MODEL", help=f"model name: {', '.join(model_names())}")
    p.add_argument("--data", default=None,
                   help="training .h5ad, folder of .h5ad or glob (counts or log1p-normalised); default: the "
                        "split's [datasets] (needed only to override a one-dataset split's path)")
    p.add_argument("--split", required=True, help="split .toml (see `celltwin split`)")
    p.add_argument("--hvg", type=int, default=None, metavar="N",
                   help="input genes: the N seurat_v3 highly variable genes of the training cells (saved in the run)")
    p.add_argument("--embed-key", default=None, metavar="KEY",
                   help="state: input from obsm[KEY] (X_pca, X_hvg, X_state from `celltwin embed transform`, ...)")
    p.add_argument("--output-space", choices=["gene", "all", "embedding"], default=None,
                   help="what the run predicts: gene (the input genes; default without --hvg/--embed-key), all "
                        "(every gene, decoded from the input; default with --hvg/--embed-key), embedding "
                        "(the obsm matrix itself)")
    p.add_argument("--zeroshot-controls-in-train", action="store_true",
                   help="also train on the control cells of zero-shot (held-out) contexts, as cell-load does")
    p.add_argument("-o", "--output", required=True, help="run directory to write")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="model option (repeatable; the options of each model are listed below)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--input-space", choices=["expression", "embedding"], default=None,
                   help="state only: train on expression (default) or on SE cell embeddings")
    p.add_argument("--se-model", default=None, metavar="DIR",
                   help="state --input-space embedding: SE model directory (default: fit one on the training cells)")
    p.add_argument("--init-from", default=None, metavar="DIR",
                   help="state: start from the weights of DIR (a celltwin run, a `celltwin import-state` run or an "
                        "arc-state ST run directory); its architecture is kept, tensors that do not fit the new data "
                        "(e.g. a new perturbation vocabulary) are re-initialised and listed (= --set init_from=DIR)")
    add_column_arguments(p)
    p.epilog = options_help()


def run(args: argparse.Namespace) -> int:
    from celltwin._output_checks import check_outputs
    from celltwin.errors import ConfigError

    check_outputs({"-o/--output": args.output},
                  {"--data": args.data, "--split": args.split, "--se-model": args.se_model,
                   "--init-from": args.init_from},
                  dirs={"-o/--output"})
    from celltwin.pipeline import train_from_files
    from celltwin.registry import get_spec

    get_spec(args.model)  # an unknown model name first
    given = parse_sets(args.set)
    flags = (("--input-space", "input_space", args.input_space), ("--se-model", "se_model", args.se_model),
             ("--init-from", "init_from", args.init_from))
    extra: dict[str, str] = {}
    for flag, key, value in flags:
        if value is None:
            continue
        if args.model not in ("state", "state-se"):
            msg = f"{flag}: only for --model state / state-se, got --model {args.model}"
            raise ConfigError(msg)
        extra[key] = value
    embedding = args.model == "state-se" or {**given, **extra}.get("input_space", "expression") == "embedding"
    if args.se_model is not None and not embedding:
        msg = "--se-model: needs --input-space embedding"
        raise ConfigError(msg)
    options = parse_sets(args.set, args.model, extra)  # the model's typed options (ConfigError on a bad one)
    from celltwin.data.inputs import InputConfig

    inputs = InputConfig(hvg=args.hvg, embed_key=args.embed_key, output_space=args.output_space or "")
    meta = train_from_files(args.model, args.data, args.split, args.output, seed=args.seed,
                            options=options, columns=column_overrides(args), inputs=inputs,
                            zeroshot_controls_in_train=args.zeroshot_controls_in_train)
    dropped = meta.get("dropped_pairs") or []
    note = f"; dropped {len(dropped)} pair(s) below min_cells" if dropped else ""
    print(f"trained {args.model} on {meta['n_train_cells']} cells x {meta['n_genes']} genes -> {args.output}{note}")
    return 0
