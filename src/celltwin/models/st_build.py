"""The ST module of a training run (:func:`build_model`): celltwin's, arc-state's, or ``init_from``'s.

:func:`load_pert_table` reads the perturbation inputs of ``pert_embeddings`` (one gene vector per
perturbed gene); :func:`build_model` picks the architecture (``arch``, or the one of the
``init_from`` weights with what fits of them copied, :mod:`celltwin.models.st_init`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from celltwin.errors import ConfigError, InputError
from celltwin.models.st_options import StateOptions
from celltwin.models.st_predict import _load_pert_genes
from celltwin.models.state_transition import StateTransition

__all__ = ["arc_sizes", "build_model", "load_pert_table"]


def load_pert_table(opts: StateOptions, pert_vocab: list[str]) -> torch.Tensor:
    """(P, E) perturbation inputs: row 0 (control) = zeros (no perturbation), then each gene's vector.

    Every perturbed gene of the training data must have a vector (an InputError names the
    missing ones): a silent zero or random row would make the gene indistinguishable from control.
    """
    from celltwin.genes import align_gene_table

    table, hgnc = _load_pert_genes(opts.pert_embeddings, opts.pert_hgnc)
    genes = pert_vocab[1:]
    vec, found, _ = align_gene_table(table, genes, hgnc)
    if not found.all():
        missing = [g for g, f in zip(genes, found, strict=True) if not f]
        raise InputError(f"state option pert_embeddings: {opts.pert_embeddings} has no vector for {len(missing)} of "
                         f"the {len(genes)} perturbed genes of the training data ({', '.join(missing[:10])}"
                         f"{' ...' if len(missing) > 10 else ''}); use a table that covers them (pert_hgnc maps "
                         "aliases) or leave those perturbations out of the split")
    return torch.from_numpy(np.vstack([np.zeros((1, table.dim), np.float32), vec]))


def arc_sizes(cfg: Any, decode: bool) -> dict[str, Any]:
    """arc-state ST sizes for the run's data, from celltwin's STConfig of the same data."""
    if cfg.input_space == "expression" and cfg.output_space == "all":
        raise ConfigError("state option arch=arc-state: HVG input decoded to every gene (--hvg with output all) is "
                          "not an arc-state configuration; use --output-space gene, or every gene of X")
    out = {"input_dim": cfg.input_dim, "output_dim": cfg.input_dim, "pert_dim": cfg.n_perts,
           "input_space": cfg.input_space, "decode_genes": decode, "gene_dim": cfg.n_genes if decode else 0,
           "output_space": "all" if decode else ("gene" if cfg.input_space == "expression" else "embedding"),
           "batch_dim": 0, "loss_weights": cfg.loss_weights, "gene_loss_weight": cfg.gene_loss_weight,
           # arc-state's rule: ReLU on expression output, and when there is no gene decoder
           "relu_output": cfg.input_space == "expression" or not decode}
    return out


def build_model(opts: StateOptions, cfg: Any, pert_table: Any, vocab: dict, decode: bool) -> tuple[Any, dict]:
    """The ST module of a run: celltwin's (``cfg``), arc-state's architecture (``arch``), or ``init_from``'s
    architecture with the run's sizes and what fits of its weights (:mod:`celltwin.models.st_init`)."""
    import logging

    from celltwin.models.st_init import arch_config, init_model, read_init_source

    if opts.init_from:
        src = read_init_source(opts.init_from)
        if src.arch == "arc-state":
            from celltwin.models.arc_transition import ArcStateTransition

            if pert_table is not None:
                raise ConfigError("state option init_from: an arc-state model encodes perturbations one-hot; "
                                  "pert_embeddings does not apply")
            model = ArcStateTransition(arch_config(src, **arc_sizes(cfg, decode), dropout=opts.dropout), vocab=vocab)
        else:
            sizes = {f: getattr(cfg, f) for f in ("input_dim", "n_perts", "n_contexts", "pert_emb_dim", "input_space",
                                                  "n_genes", "loss_weights", "gene_loss_weight", "dropout",
                                                  "decoder_residual")}
            model = StateTransition(arch_config(src, output_space="", **sizes), pert_table=pert_table, vocab=vocab)
        report = init_model(model, src)
        log = logging.getLogger("celltwin")
        log.info("init_from %s: %d tensors copied, %d partly copied by name, %d re-initialised%s",
                 src.where, report["copied"], len(report["partially_copied"]), len(report["reinitialised"]),
                 f" ({', '.join(report['reinitialised'])})" if report["reinitialised"] else "")
        for k, v in report["partially_copied"].items():
            log.info("init_from: %s: %d of %d %s carried over by name, the rest re-initialised",
                     k, v["kept"], v["of"], v["by"].replace("_", " "))
        return model, report
    if opts.arch == "arc-state":
        from celltwin.models.arc_transition import ArcStateTransition, ArcSTConfig

        if pert_table is not None:
            raise ConfigError("state option arch=arc-state: perturbations are one-hot (pert_embeddings does not apply)")
        arc = ArcSTConfig(hidden=cfg.hidden, n_layers=cfg.n_layers, n_heads=cfg.n_heads, mlp_hidden=cfg.mlp_hidden,
                          n_encoder_layers=cfg.encoder_layers, n_decoder_layers=cfg.encoder_layers,
                          set_size=cfg.set_size, dropout=cfg.dropout, **arc_sizes(cfg, decode))
        return ArcStateTransition(arc, vocab=vocab), {}
    return StateTransition(cfg, pert_table=pert_table, vocab=vocab), {}
