"""The neural models (torch). Importing this package is cheap: each name below loads its module on first use.

Notebook classes (scvi-tools style; see :mod:`celltwin.api`):

* :class:`STModel` / :class:`STSEModel` (``st_api``): the State Transition model on expression /
  on State Embedding cells; :class:`SEModel` (``se_api``): the State Embedding model.

The ST model, by job:

* ``state_transition``: the torch module (:class:`StateTransition`, :class:`STConfig`, ``PRESETS``);
* ``st_options``: :class:`StateOptions`, its typed options (standard library only);
* ``st_train``: training for the registry (``state`` / ``state-se``), with ``st_build`` (building the
  module) and ``st_validate`` (the validation pass); ``st_data``: what a set reads;
* ``st_predict``: loading a run and predicting (:class:`StatePredictor`);
* ``st_se_bridge``: run-space cells -> SE embeddings (:class:`SEBridge`).

The SE model: ``state_embedding`` (torch module), ``se_options`` (:class:`SEOptions`), ``se_runner``
(fit), ``se_embed`` (transform / embed cells).
"""

from __future__ import annotations

from celltwin._lazy import lazy_exports

__all__ = ["PRESETS", "SEModel", "SEOptions", "STConfig", "STModel", "STSEModel", "StateOptions",
           "StateTransition", "sample_counts"]

_LAZY = {
    "STConfig": "celltwin.models.state_transition",
    "StateTransition": "celltwin.models.state_transition",
    "PRESETS": "celltwin.models.state_transition",
    "sample_counts": "celltwin.data.preprocess",
    "StateOptions": "celltwin.models.st_options",
    "SEOptions": "celltwin.models.se_options",
    "STModel": "celltwin.models.st_api",
    "STSEModel": "celltwin.models.st_api",
    "SEModel": "celltwin.models.se_api",
}


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
