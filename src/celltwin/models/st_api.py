"""The State Transition model as notebook classes (see :mod:`celltwin.api`): :class:`STModel`, :class:`STSEModel`.

::

    m = celltwin.STModel(adata, pert_col="gene", control_pert="ctrl").train(preset="small", steps=400)
    pred = m.predict(adata, {"TP53": 200}, context="K562")
    m.save("runs/st")        # `celltwin predict runs/st ...` reads it

Options: :class:`~celltwin.models.st_options.StateOptions` (``celltwin train --help`` lists them).
Importing this module does not import torch; training and loading do.
"""

from __future__ import annotations

from celltwin.api import Model

__all__ = ["STModel", "STSEModel"]


class STModel(Model):
    """``state``: the State Transition model (a control set + the perturbation -> the perturbed set).

    ``embed_key=`` reads the input from ``obsm`` (with ``output_space="all"`` decoded to every gene,
    ``"embedding"`` predicting the embedding), ``hvg=N`` from the N highly variable genes;
    ``train(input_space="embedding")`` trains on State Embedding cells (as :class:`STSEModel`).
    """

    model_name = "state"

    @property
    def module(self):
        """The trained torch module (:class:`~celltwin.models.state_transition.StateTransition`)."""
        return self._require_trained().model


class STSEModel(STModel):
    """``state-se``: ST on State Embedding cells, decoded back to genes (``input_space=embedding``).

    The SE model is ``train(se_model=DIR)`` (from ``celltwin embed fit`` or :meth:`SEModel.save`)
    or, by default, one fitted on the training cells first (``se_preset``, ``se_steps``, ...).
    """

    model_name = "state-se"
