"""Size presets of the ST and SE models and the set-loss names: plain data, no torch; :func:`from_preset`.

The option classes (:mod:`celltwin.models.st_options`, :mod:`celltwin.models.se_options`) validate
against these without importing torch, so a bad ``--set preset=...`` fails at once;
:mod:`celltwin.models.state_transition` / :mod:`celltwin.models.state_embedding` build their
configurations from them (re-exported there as ``PRESETS`` / ``SE_PRESETS``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields
from typing import Any, TypeVar

from celltwin.errors import ConfigError

__all__ = ["SET_LOSSES", "SE_PRESETS", "ST_PRESETS", "from_preset"]

_C = TypeVar("_C")

#: the set losses of :func:`celltwin.losses.set_loss` (``celltwin.losses.LOSSES``; a test keeps them equal)
SET_LOSSES = ("energy", "mmd", "sinkhorn", "mse")

ST_PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests
    "tiny": dict(hidden=32, n_layers=2, n_heads=2, mlp_hidden=64, set_size=16, encoder_layers=2),
    # the demo and CPU experiments (~1 M parameters + the gene-sized input/output layers)
    "small": dict(hidden=128, n_layers=4, n_heads=4, mlp_hidden=512, set_size=64, encoder_layers=4),
    # the published ST configuration
    "state": dict(hidden=696, n_layers=8, n_heads=12, mlp_hidden=2784, norm_eps=1e-6, set_size=512,
                  encoder_layers=4, loss_weights={"energy": 1.0}, blur=0.05),
    # arc-state 0.11.1's state.yaml (hidden 768, 12 heads of 64, MLP 3072, 1-layer encoders and head);
    # with arch=arc-state this is that release's default ST
    "state-0.11": dict(hidden=768, n_layers=8, n_heads=12, mlp_hidden=3072, norm_eps=1e-6, set_size=512,
                       encoder_layers=1, loss_weights={"energy": 1.0}, blur=0.05),
}

SE_PRESETS: dict[str, dict[str, Any]] = {
    # CPU unit tests: a few thousand parameters per block.
    "tiny": dict(
        d_model=32,
        n_layers=2,
        n_heads=2,
        mlp_hidden=64,
        d_out=32,
        sentence_len=64,
        n_mask=40,
        n_unexpressed=16,
        mask_strata=4,
        n_bins=8,
        decoder_hidden=32,
    ),
    # Quick real-data runs on a laptop CPU (minutes).
    "small": dict(
        d_model=128,
        n_layers=4,
        n_heads=4,
        mlp_hidden=256,
        d_out=128,
        sentence_len=512,
        n_mask=320,
        n_unexpressed=128,
        mask_strata=8,
        n_bins=10,
        decoder_hidden=128,
    ),
    # The published SE configuration (width 512, 8 layers, 16 heads, MLP 1024, output 512, L 2048, mask 1280).
    "published": {},
}


def from_preset(kind: str, presets: Mapping[str, Mapping[str, Any]], cls: type[_C], name: str,
                overrides: Mapping[str, Any]) -> _C:
    """``cls`` built from preset ``name`` of ``presets`` with ``overrides`` applied (``kind``: ``SE`` / ``ST``).

    A ConfigError names an unknown preset or an override that is no field of ``cls``.
    """
    if name not in presets:
        raise ConfigError(f"unknown {kind} preset {name!r}; choose one of {sorted(presets)}")
    bad = sorted(set(overrides) - {f.name for f in fields(cls)})
    if bad:
        raise ConfigError(f"unknown {cls.__name__} fields {bad}")
    return cls(**{**presets[name], **overrides})
