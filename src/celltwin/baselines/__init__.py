"""Baselines: control, cell-mean, perturbation-mean, context-transfer (+scaled), linear, additive.

Each predicts a shift in model space (log1p-normalised) added to control cells; the exact rules,
including what happens for a perturbation never seen in training, are in
:mod:`celltwin.baselines.models`. ``train`` / ``load_predictor`` are the registry entry points used
by ``celltwin train`` / ``celltwin predict`` (see :mod:`celltwin.registry`); the notebook classes
(``CellMeanModel``, ...) are in :mod:`celltwin.baselines.api`, the options in
:mod:`celltwin.baselines.options`. Importing the package is cheap (names load on first use).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from celltwin._constants import CONTEXT_COL, CONTROL_LABEL, PERT_COL
from celltwin._lazy import lazy_exports

if TYPE_CHECKING:  # pragma: no cover
    from celltwin.baselines.models import Baseline
    from celltwin.runs import TrainRequest

__all__ = [
    "BASELINES",
    "CHUNK",
    "AdditiveModel",
    "Baseline",
    "BaselineConfig",
    "BaselineModel",
    "BaselineOptions",
    "CellMeanModel",
    "ContextTransferModel",
    "ControlModel",
    "EffectTable",
    "LinearModel",
    "PerturbationMeanModel",
    "ScaledContextTransferModel",
    "fit_baseline",
    "fit_effect_table",
    "group_means",
    "load_baseline",
    "load_predictor",
    "train",
]

# names loaded on first use (importing the package stays cheap: `celltwin train --help` reads the options)
_LAZY = {
    **dict.fromkeys(("BASELINES", "Baseline", "BaselineConfig", "fit_baseline", "load_baseline"),
                    "celltwin.baselines.models"),
    **dict.fromkeys(("EffectTable", "fit_effect_table", "group_means"), "celltwin.baselines._effects"),
    "BaselineOptions": "celltwin.baselines.options",
    **dict.fromkeys(("BaselineModel", "ControlModel", "CellMeanModel", "PerturbationMeanModel",
                     "ContextTransferModel", "ScaledContextTransferModel", "LinearModel", "AdditiveModel"),
                    "celltwin.baselines.api"),
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)


def train(request: TrainRequest) -> dict:
    """Registry train function: fit baseline ``request.model`` from streamed blocks, save ``baseline.npz``.

    The training rows are read in blocks of ``CHUNK`` cells in model space (CSR) and added to
    per-group sums (:class:`~celltwin.baselines._effects.GroupSums`); memory is the groups x genes
    table, never the cells. The result is bitwise the in-memory fit on the same cells.
    """
    from celltwin.baselines._effects import GroupSums, effect_groups, effect_table_from_sums
    from celltwin.baselines.models import Baseline, BaselineConfig, fitted_params

    cfg = BaselineConfig.from_options(request.model, request.options)
    obs = request.obs
    groups = effect_groups(obs[PERT_COL].to_numpy(dtype=str), obs[CONTEXT_COL].to_numpy(dtype=str), CONTROL_LABEL)
    pre = request.preprocess
    sums = GroupSums(groups.n_groups, len(pre.genes))
    rows = request.rows
    for start in range(0, rows.size, CHUNK):
        r = rows[start:start + CHUNK]
        sums.add(request.data.read_model(r, pre, dense=False), groups.codes[start:start + CHUNK])
    table, dropped = effect_table_from_sums(groups, sums, CONTROL_LABEL, cfg.min_cells)
    model = Baseline(cfg, list(pre.genes), table, fitted_params(cfg, table, list(pre.genes)))
    meta = model.save(request.run_dir)
    meta["dropped_pairs"] = dropped
    if cfg.name == "scaled-context-transfer":
        meta["alpha"] = {c: (None if v != v else float(v)) for c, v in zip(model.table.contexts, model.params["alpha"], strict=True)}
        meta["alpha_pooled"] = float(model.params["alpha_pooled"])
    return meta


#: cells per streamed block when fitting a baseline (a 4,096 x 18,080 float32 CSR block at 25%
#: density is ~150 MB during normalisation)
CHUNK = 4096


def load_predictor(run_dir: str | Path) -> Baseline:
    """Registry load function: the fitted :class:`Baseline` of a run directory."""
    from celltwin.baselines.models import load_baseline
    from celltwin.runs import read_run

    _, genes = read_run(run_dir)
    return load_baseline(run_dir, genes)
