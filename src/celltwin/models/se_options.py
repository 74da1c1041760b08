"""Options of a State Embedding fit (``celltwin embed fit``, ``SEModel.train``): :class:`SEOptions`.

Standard library only at import; :meth:`SEOptions.configs` builds the model and loop configurations
(the one mapping from options to :class:`~celltwin.models.state_embedding.StateEmbeddingConfig` and
:class:`~celltwin.train.TrainConfig`, used by both the command and the class).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from celltwin.errors import ConfigError
from celltwin.options import Options, option

__all__ = ["SEOptions"]


@dataclass
class SEOptions(Options):
    """Options of an SE fit (0 / "" = the preset's value where noted)."""

    what = "SE option"

    preset: str = option("small", "model size: tiny | small | published (512 wide, 8 layers, 16 heads, L 2048)")
    loss: str = option("", "training loss: mse | energy | mmd | mse+energy | mse+mmd (\"\" = the preset's, mse)")
    sentence_len: int = option(0, "top genes per cell (0 = the preset's)")
    n_mask: int = option(0, "masked genes per cell (0 = the preset's)")
    gene_dim: int = option(64, "size of the learned gene vectors when no gene table is given")
    n_top_genes: int = option(0, "restrict the vocabulary to the N highly variable genes (0 = every gene)")
    steps: int = option(1000, "optimiser steps")
    batch_size: int = option(32, "cells per step")
    num_workers: int = option(-1, "DataLoader processes reading the batches (-1 = 1 for files, 0 in memory)")
    lr: float = option(3e-4, "peak learning rate")
    warmup: int = option(-1, "warmup steps (-1 = 5% of steps)")
    ckpt_every: int = option(200, "checkpoint every N steps")
    device: str = option("auto", "auto | cpu | cuda | cuda:K")
    precision: str = option("auto", "auto | fp32 | bf16 | fp16")
    resume: bool = option(True, "continue from the model directory's checkpoints when present")
    progress: bool = option(True, "show a progress bar")
    genes: str = option("", "gene embedding table (`celltwin genes embed`, .safetensors/.pt/.npy/.csv); "
                            "\"\" = learned gene vectors")
    gene_list: str = option("", "gene names of a .npy gene table, one per line")
    hgnc: str = option("", "HGNC table (hgnc_genes.tsv) mapping aliases / old symbols / Ensembl IDs")

    def validate(self) -> None:
        from celltwin.models.presets import SE_PRESETS

        if self.preset not in SE_PRESETS:
            raise ConfigError(f"SE option preset: expected one of {', '.join(SE_PRESETS)}, got {self.preset!r}")
        for name in ("gene_dim", "steps", "batch_size", "ckpt_every"):
            if getattr(self, name) < 1:
                raise ConfigError(f"SE option {name}: expected >= 1, got {getattr(self, name)}")
        for name in ("sentence_len", "n_mask", "n_top_genes"):
            if getattr(self, name) < 0:
                raise ConfigError(f"SE option {name}: expected >= 0 (0 = default), got {getattr(self, name)}")
        for name in ("num_workers", "warmup"):
            if getattr(self, name) < -1:
                raise ConfigError(f"SE option {name}: expected >= 0 or -1 (auto), got {getattr(self, name)}")
        if not self.lr > 0:
            raise ConfigError(f"SE option lr: expected > 0, got {self.lr}")
        if self.precision not in ("auto", "fp32", "bf16", "fp16"):
            raise ConfigError(f"SE option precision: expected auto, fp32, bf16 or fp16, got {self.precision!r}")
        for name in ("genes", "gene_list", "hgnc"):
            if getattr(self, name) and not Path(getattr(self, name)).is_file():
                raise ConfigError(f"SE option {name}: file {getattr(self, name)} not found")

    def configs(self, seed: int = 0):
        """``(StateEmbeddingConfig, TrainConfig)`` of this fit (the loop's ``out_dir`` is set by the fit)."""
        from celltwin.models.state_embedding import StateEmbeddingConfig
        from celltwin.train import TrainConfig

        overrides = {k: v for k, v in (("loss", self.loss), ("sentence_len", self.sentence_len),
                                       ("n_mask", self.n_mask)) if v}
        cfg = StateEmbeddingConfig.preset(self.preset, seed=seed, **overrides)
        warmup = self.warmup if self.warmup >= 0 else max(0, self.steps // 20)
        tcfg = TrainConfig(max_steps=self.steps, lr=self.lr, warmup_steps=min(warmup, self.steps), device=self.device,
                           precision=self.precision, seed=seed, ckpt_every=self.ckpt_every, resume=self.resume,
                           progress=self.progress, log_every=10)
        return cfg, tcfg
