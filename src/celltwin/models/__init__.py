"""Torch models of celltwin (importing this package imports torch).

* :mod:`celltwin.models.state_transition`: the State Transition model (ST), a set-to-set
  transformer mapping a set of control cells and a perturbation to the perturbed set.
* :mod:`celltwin.models.st_runner`: train/predict glue for the model registry (``state``).
"""

from __future__ import annotations

from celltwin.models.state_transition import PRESETS, STConfig, StateTransition, sample_counts

__all__ = ["STConfig", "StateTransition", "PRESETS", "sample_counts"]
