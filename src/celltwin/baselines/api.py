"""The baselines as notebook classes (see :mod:`celltwin.api`): one class per registered baseline.

Each trains with :class:`~celltwin.baselines.options.BaselineOptions` (``min_cells``,
``linear_dim``, ``linear_ridge``) and predicts with the rules of :mod:`celltwin.baselines.models`::

    m = celltwin.LinearModel(adata, pert_col="gene", control_pert="ctrl").train(linear_dim=20)
    pred = m.predict(adata, ["TP53", "MYC"], n_cells=100, context="K562")
"""

from __future__ import annotations

from celltwin.api import Model

__all__ = ["AdditiveModel", "BaselineModel", "CellMeanModel", "ContextTransferModel", "ControlModel", "LinearModel",
           "PerturbationMeanModel", "ScaledContextTransferModel"]


class BaselineModel(Model):
    """Base of the baseline classes; ``model`` is the fitted :class:`~celltwin.baselines.models.Baseline`."""

    @property
    def model(self):
        """The fitted :class:`~celltwin.baselines.models.Baseline` (shift rules, effect table, parameters)."""
        return self._require_trained()


class ControlModel(BaselineModel):
    """``control``: predicts no change (each predicted cell is a control cell)."""

    model_name = "control"


class CellMeanModel(BaselineModel):
    """``cell-mean``: the mean shift of all training perturbed cells of the context."""

    model_name = "cell-mean"


class PerturbationMeanModel(BaselineModel):
    """``perturbation-mean``: the unweighted mean of the training perturbations' effects in the context."""

    model_name = "perturbation-mean"


class ContextTransferModel(BaselineModel):
    """``context-transfer``: the perturbation's mean effect in the other contexts (else cell-mean)."""

    model_name = "context-transfer"


class ScaledContextTransferModel(BaselineModel):
    """``scaled-context-transfer``: context-transfer times a least-squares factor fitted on the context."""

    model_name = "scaled-context-transfer"


class LinearModel(BaselineModel):
    """``linear`` (Ahlmann-Eltze et al. 2025): gene PCA embedding + ridge; p embedded by its target gene."""

    model_name = "linear"


class AdditiveModel(BaselineModel):
    """``additive``: ``A+B`` = effect(A) + effect(B) in the context (else cell-mean)."""

    model_name = "additive"
