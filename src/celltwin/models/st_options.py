"""Options of the State Transition model (``--model state`` / ``state-se``): :class:`StateOptions`.

The one source of the ST options' names, types, defaults and help (``celltwin train --set
key=value``, ``STModel.train(key=value)``, ``celltwin train --help``). Standard library only:
validation reads the preset tables of :mod:`celltwin.models.presets`, so a bad option fails
before torch is imported.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from celltwin.errors import ConfigError
from celltwin.options import Options, option

__all__ = ["DEMO_OPTIONS", "DEMO_OPTIONS_FOR", "INPUT_SPACES", "StateOptions", "parse_loss"]

INPUT_SPACES = ("expression", "embedding")

#: ``--set`` options the demo uses (simulator preset ``demo``: 1,500 genes; ~40-50 s on a shared 2-core CPU;
#: one torch thread because OpenMP spin-waiting makes 2 threads 10-40x slower on an oversubscribed machine).
DEMO_OPTIONS: dict[str, str] = {"preset": "small", "steps": "250", "batch_sets": "8", "lr": "2e-3",
                                "progress": "false", "tensorboard": "false", "threads": "1"}
#: per registered model name (read by celltwin.demo.model_options before DEMO_OPTIONS)
DEMO_OPTIONS_FOR: dict[str, dict[str, str]] = {
    "state-se": {**DEMO_OPTIONS, "input_space": "embedding", "se_preset": "tiny", "se_steps": "200",
                 "se_batch": "64"},
}


def parse_loss(spec: str) -> dict[str, float]:
    """``"energy"`` or ``"energy:1,mse:0.1"`` -> ``{"energy": 1.0, "mse": 0.1}``."""
    from celltwin.models.presets import SET_LOSSES as LOSSES

    out: dict[str, float] = {}
    for part in spec.split(","):
        name, _, w = part.strip().partition(":")
        if name not in LOSSES:
            raise ConfigError(f"state option loss: expected names from {LOSSES} (e.g. 'energy:1,mse:0.1'), got {spec!r}")
        try:
            out[name] = float(w) if w else 1.0
        except ValueError:
            raise ConfigError(f"state option loss: weight of {name!r} must be a number, got {w!r}") from None
    return out


@dataclass
class StateOptions(Options):
    """Options of the ST model (0 / "" = the preset's value where noted)."""

    what = "state option"

    preset: str = option("small", "model size: tiny | small | state (the published 696-wide, 8-layer configuration) "
                                  "| state-0.11 (arc-state 0.11.1's state.yaml: 768 wide, 1-layer encoders)")
    steps: int = option(400, "optimiser steps")
    batch_sets: int = option(8, "cell sets per optimiser step (per process)")
    set_size: int = option(0, "cells per set (0 = the preset's)")
    hidden: int = option(0, "transformer width (0 = the preset's)")
    n_layers: int = option(0, "transformer layers (0 = the preset's)")
    n_heads: int = option(0, "attention heads (0 = the preset's)")
    mlp_hidden: int = option(0, "SwiGLU inner size (0 = the preset's)")
    dropout: float = option(0.0, "dropout probability")
    loss: str = option("energy", "set loss and weights, e.g. energy:1,mse:0.1 (energy, mmd, sinkhorn, mse)")
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.01, "AdamW weight decay")
    warmup: int = option(20, "linear warmup steps")
    min_lr_ratio: float = option(0.1, "final learning rate / peak (cosine decay)")
    grad_clip: float = option(1.0, "gradient norm clip (0 = off)")
    grad_accum: int = option(1, "micro-batches accumulated per step")
    precision: str = option("auto", "auto | fp32 | bf16 | fp16 (auto: bf16 on CUDA and CPUs with native bf16)")
    device: str = option("auto", "auto | cpu | cuda")
    match: str = option("random", "control matching: random (same context) | batch (same context and batch)")
    context_dropout: float = option(0.1, "probability of hiding a set's context token (teaches 'unknown context')")
    zero_below: float = option(0.01, "predicted values below this are written as 0")
    ckpt_every: int = option(0, "checkpoint every N steps (0 = at the end only)")
    resume: bool = option(True, "continue from RUN/train/checkpoints when present")
    log_every: int = option(10, "log metrics every N steps")
    val_pairs: int = option(0, "hold out N (context, perturbation) groups, scored with the VCC metrics")
    val_every: int = option(0, "validate every N steps (0 = at the end when val_pairs > 0)")
    threads: int = option(0, "torch CPU threads (0 = torch's default)")
    # The sets do not depend on num_workers (same weights for any value); one worker overlaps reading
    # with the step on a 2-core machine (bench/RESULTS.md, "Scale"), more help where cores are spare.
    num_workers: int = option(-1, "DataLoader processes reading cell sets (-1 = 1 for files, 0 in memory)")
    progress: bool = option(True, "show a progress bar")
    tensorboard: bool = option(True, "write TensorBoard logs under RUN/train")
    # --- ST on SE embeddings (input_space=embedding)
    input_space: str = option("expression", "expression | embedding (SE cell embeddings, decoded to genes)")
    se_model: str = option("", "SE model directory (`celltwin embed fit`); \"\" = fit one on the training cells")
    se_preset: str = option("tiny", "size of the SE fitted in the run: tiny | small | published")
    se_steps: int = option(300, "optimiser steps of the SE fitted in the run")
    se_batch: int = option(64, "cells per step of the SE fitted in the run")
    se_lr: float = option(1e-3, "peak learning rate of the SE fitted in the run")
    # SE embeddings are unit-norm, so the embedding-space energy is ~100x smaller than the gene-space
    # one; measured on the demo (`celltwin demo`, SE tiny, 200 steps): weight 1 -> score 0.027,
    # 10 -> 0.243, 50 -> 0.277, 200 -> 0.280
    gene_loss_weight: float = option(50.0, "embedding input: weight of the decoded-genes loss")
    decoder_residual: bool = option(True, "embedding input: genes = basal genes + dec(pred) - dec(basal)")
    # --- perturbations as gene-embedding vectors (unseen perturbations reachable)
    pert_embeddings: str = option("", "gene vector table encoding perturbations (unseen genes reachable); "
                                      "\"\" = one-hot")
    pert_hgnc: str = option("", "HGNC table (hgnc_genes.tsv) matching perturbation names through aliases")
    # --- architecture variant and starting weights (arc-state checkpoints: celltwin import-state)
    arch: str = option("celltwin", "celltwin | arc-state (arc-state 0.11.1's ST: MLP output head, residual in "
                                    "hidden space, ReLU output; sizes from the preset)")
    init_from: str = option("", "start from these weights: a celltwin run, an imported or an arc-state ST run "
                                "(architecture from there; tensors that do not fit are re-initialised and listed)")

    def validate(self) -> None:
        from celltwin.models.presets import SE_PRESETS
        from celltwin.models.presets import ST_PRESETS as PRESETS

        if self.arch not in ("celltwin", "arc-state"):
            raise ConfigError(f"state option arch: expected celltwin or arc-state, got {self.arch!r}")
        if self.init_from:
            if not Path(self.init_from).is_dir():
                raise ConfigError(f"state option init_from: {self.init_from} is not a directory")
            self.init_from = str(Path(self.init_from).resolve())
        if self.preset not in PRESETS:
            raise ConfigError(f"state option preset: expected one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.input_space not in INPUT_SPACES:
            raise ConfigError(f"state option input_space: expected one of {', '.join(INPUT_SPACES)}, "
                              f"got {self.input_space!r}")
        if self.se_preset not in SE_PRESETS:
            raise ConfigError(f"state option se_preset: expected one of {', '.join(SE_PRESETS)}, got {self.se_preset!r}")
        if self.se_model and not (Path(self.se_model) / "config.json").is_file():
            raise ConfigError(f"state option se_model: {self.se_model} is not an SE model directory "
                              f"(expected config.json from `celltwin embed fit`)")
        if self.se_model and self.input_space != "embedding":
            raise ConfigError("state option se_model: only used with input_space=embedding")
        for name in ("se_steps", "se_batch", "steps", "batch_sets", "grad_accum"):
            if getattr(self, name) < 1:
                raise ConfigError(f"state option {name}: expected >= 1, got {getattr(self, name)}")
        for name in ("se_lr", "lr"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"state option {name}: expected > 0, got {getattr(self, name)}")
        if self.gene_loss_weight < 0:
            raise ConfigError(f"state option gene_loss_weight: expected >= 0, got {self.gene_loss_weight}")
        for name in ("pert_embeddings", "pert_hgnc"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ConfigError(f"state option {name}: file {getattr(self, name)} not found")
        if self.pert_hgnc and not self.pert_embeddings:
            raise ConfigError("state option pert_hgnc: only used with pert_embeddings")
        # absolute paths: predict reads the gene table again, possibly from another directory
        for name in ("pert_embeddings", "pert_hgnc", "se_model"):
            if getattr(self, name):
                setattr(self, name, str(Path(getattr(self, name)).resolve()))
        if self.num_workers < -1:
            raise ConfigError(f"state option num_workers: expected >= 0 or -1 (auto), got {self.num_workers}")
        for name in ("set_size", "hidden", "n_layers", "n_heads", "mlp_hidden", "val_pairs", "threads", "warmup",
                     "ckpt_every", "val_every"):
            if getattr(self, name) < 0:
                raise ConfigError(f"state option {name}: expected >= 0, got {getattr(self, name)}")
        if self.log_every < 1:
            raise ConfigError(f"state option log_every: expected >= 1, got {self.log_every}")
        for name in ("context_dropout", "dropout"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"state option {name}: expected in [0, 1), got {getattr(self, name)}")
        if self.match not in ("random", "batch"):
            raise ConfigError(f"state option match: expected random or batch, got {self.match!r}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"state option precision: expected auto, fp32, bf16 or fp16, got {self.precision!r}")
        parse_loss(self.loss)

    def model_config(self, input_dim: int, n_perts: int, n_contexts: int, n_genes: int = 0,
                     pert_emb_dim: int = 0, input_space: str | None = None, output_space: str = ""):
        """The :class:`~celltwin.models.state_transition.STConfig` of these options for the given data sizes."""
        from celltwin.models.state_transition import STConfig

        over: dict[str, Any] = {"input_dim": input_dim, "n_perts": n_perts, "n_contexts": n_contexts,
                                "pert_emb_dim": pert_emb_dim,
                                "dropout": self.dropout, "loss_weights": parse_loss(self.loss),
                                "input_space": input_space or self.input_space,
                                "output_space": output_space,
                                "gene_loss_weight": self.gene_loss_weight,
                                "decoder_residual": self.decoder_residual, "n_genes": n_genes}
        for name in ("set_size", "hidden", "n_layers", "n_heads", "mlp_hidden"):
            if getattr(self, name):
                over[name] = getattr(self, name)
        return STConfig.from_preset(self.preset, **over)
