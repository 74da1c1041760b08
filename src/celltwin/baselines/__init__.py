"""Baselines: control, cell-mean, perturbation-mean, context-transfer (+scaled), linear, additive.

Each predicts a shift in model space (log1p-normalised) added to control cells; the exact rules,
including what happens for a perturbation never seen in training, are in
:mod:`celltwin.baselines.models`. ``train`` / ``load_predictor`` are the registry entry points used
by ``celltwin train`` / ``celltwin predict`` (see :mod:`celltwin.predict`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin.baselines._effects import EffectTable, fit_effect_table, group_means
from celltwin.baselines.models import BASELINES, Baseline, BaselineConfig, fit_baseline, load_baseline

if TYPE_CHECKING:  # pragma: no cover
    from celltwin.predict import TrainRequest

__all__ = [
    "BASELINES",
    "Baseline",
    "BaselineConfig",
    "EffectTable",
    "fit_baseline",
    "fit_effect_table",
    "group_means",
    "load_baseline",
    "train",
    "load_predictor",
]


def train(request: TrainRequest) -> dict:
    """Registry train function: fit baseline ``request.model`` and save ``baseline.npz``."""
    cfg = BaselineConfig.from_options(request.model, request.options)
    a = request.adata
    model, dropped = fit_baseline(
        cfg, a.X, a.obs[PERT_COL].astype(str).to_numpy(), a.obs[CONTEXT_COL].astype(str).to_numpy(),
        list(a.var_names), CONTROL_LABEL,
    )
    meta = model.save(request.run_dir)
    meta["dropped_pairs"] = dropped
    if cfg.name == "scaled-context-transfer":
        meta["alpha"] = {c: (None if v != v else float(v)) for c, v in zip(model.table.contexts, model.params["alpha"], strict=True)}
        meta["alpha_pooled"] = float(model.params["alpha_pooled"])
    return meta


def load_predictor(run_dir: str | Path) -> Baseline:
    """Registry load function: the fitted :class:`Baseline` of a run directory."""
    from celltwin.predict import read_run

    _, genes = read_run(run_dir)
    return load_baseline(run_dir, genes)
