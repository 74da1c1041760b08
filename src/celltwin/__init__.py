"""celltwin: virtual cells for Perturb-seq.

Importing the package is cheap and never imports torch; heavy modules load on use. The notebook
API (see :mod:`celltwin.api`) is reachable from here and loads on first access::

    import celltwin
    m = celltwin.CellMeanModel(adata).train()          # or STModel, LinearModel, ...; SEModel
    pred = m.predict(adata, ["TP53"], n_cells=100)
    res = celltwin.evaluate(pred, real)                 # celltwin.eval.evaluate: the VCC metrics
"""

from __future__ import annotations

from celltwin._lazy import lazy_exports

__version__ = "0.1.0"

# name -> module; each is imported on first access (``celltwin.STModel`` imports no torch until it trains)
_LAZY: dict[str, str] = {
    # notebook models (celltwin.api)
    "Model": "celltwin.api",
    "load_model": "celltwin.api",
    "ControlModel": "celltwin.baselines.api",
    "CellMeanModel": "celltwin.baselines.api",
    "PerturbationMeanModel": "celltwin.baselines.api",
    "ContextTransferModel": "celltwin.baselines.api",
    "ScaledContextTransferModel": "celltwin.baselines.api",
    "LinearModel": "celltwin.baselines.api",
    "AdditiveModel": "celltwin.baselines.api",
    "STModel": "celltwin.models.st_api",
    "STSEModel": "celltwin.models.st_api",
    "SEModel": "celltwin.models.se_api",
    # torch modules with from_pretrained (celltwin's own, or arc-state checkpoints: celltwin import-state)
    "StateEmbeddingModel": "celltwin.models.state_embedding",
    "StateTransition": "celltwin.models.state_transition",
    "import_state": "celltwin.state_import",
    # typed options of the models (the one source of option names, defaults and help)
    "BaselineOptions": "celltwin.baselines.options",
    "StateOptions": "celltwin.models.st_options",
    "SEOptions": "celltwin.models.se_options",
    # evaluation (celltwin.eval: numpy / numba, never torch): cell-eval 0.8.2 ``run`` on AnnData or files
    "evaluate": "celltwin.eval",
    "evaluate_by_celltype": "celltwin.eval",
    "EvalConfig": "celltwin.eval",
}

__all__ = [  # noqa: RUF022 - grouped as _LAZY
    "__version__",
    "Model", "load_model",
    "ControlModel", "CellMeanModel", "PerturbationMeanModel", "ContextTransferModel", "ScaledContextTransferModel",
    "LinearModel", "AdditiveModel", "STModel", "STSEModel", "SEModel",
    "StateEmbeddingModel", "StateTransition", "import_state",
    "BaselineOptions", "StateOptions", "SEOptions",
    "evaluate", "evaluate_by_celltype", "EvalConfig",
]


__getattr__, __dir__ = lazy_exports(__name__, _LAZY, cache=True)
