"""The model registry: every model name ``celltwin train --model NAME`` accepts, and where its parts live.

A :class:`ModelSpec` names its parts by ``"module:attribute"`` strings, imported only when used, so
this module (and the CLI's ``--help``, which lists the models and their options from here) never
imports numpy or torch:

* ``train``: ``train_fn(request: celltwin.runs.TrainRequest) -> dict`` fits the model on the
  request's training rows and writes its model files into ``request.run_dir``; it returns extra
  fields for ``run.json`` (:func:`celltwin.runs.train_run` writes ``run.json`` and ``genes.txt``).
* ``load``: ``load_fn(run_dir) -> Predictor`` (see :class:`celltwin.runs.Predictor`).
* ``api``: the notebook class (``celltwin.CellMeanModel``, ``celltwin.STModel``, ...).
* ``options``: the typed option dataclass (:class:`celltwin.options.Options`), the one source of the
  model's option names, defaults and help; ``defaults`` are this name's own defaults on top of the
  class's (``state-se`` is ``state`` with ``input_space=embedding``).

Dependencies point one way: ``registry`` <- ``runs`` <- (``baselines``, ``models``, ``pipeline``,
``api``); nothing here imports a model module at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from celltwin.errors import ConfigError

__all__ = ["MODELS", "ModelSpec", "get_spec", "model_names", "resolve"]


def resolve(ref: str) -> Any:
    """The object a ``"module:attribute"`` reference names (imports the module)."""
    mod, _, attr = ref.partition(":")
    return getattr(importlib.import_module(mod), attr)


@dataclass(frozen=True)
class ModelSpec:
    """One registered model (see the module docstring)."""

    name: str
    summary: str
    train: str
    load: str
    api: str
    options: str
    defaults: Mapping[str, Any] = field(default_factory=dict)
    needs_torch: bool = False

    @property
    def module(self) -> str:
        """The module of the train function (importing it tells whether the model's dependencies are installed)."""
        return self.train.partition(":")[0]

    def train_fn(self):
        return resolve(self.train)

    def load_fn(self):
        return resolve(self.load)

    def api_class(self):
        return resolve(self.api)

    def options_class(self):
        return resolve(self.options)

    def parse_options(self, values: Any = None, *, strict: bool = False):
        """Typed options of this model from an options instance, or a mapping (``defaults`` applied first).

        A mapping may hold ``--set`` strings (converted by the field types) unless ``strict``
        (Python keyword arguments: values must have the field's type).
        """
        cls = self.options_class()
        if isinstance(values, cls):
            return values
        if values is not None and not isinstance(values, Mapping):
            raise ConfigError(f"model {self.name}: options expected a {cls.__name__} or a mapping, "
                              f"got {type(values).__name__}")
        given = dict(values or {})
        cls.check_keys(given)
        merged = {**self.defaults, **given}
        return cls.create(merged) if strict else cls.from_strings(merged)


_B = "celltwin.baselines"
_BO = "celltwin.baselines.options:BaselineOptions"
_BA = "celltwin.baselines.api"
_ST = "celltwin.models"
_SO = "celltwin.models.st_options:StateOptions"


def _baseline(name: str, cls: str, summary: str) -> ModelSpec:
    return ModelSpec(name, summary, f"{_B}:train", f"{_B}:load_predictor", f"{_BA}:{cls}", _BO)


#: model name -> spec, in the order ``--help`` and the demo show them
MODELS: dict[str, ModelSpec] = {s.name: s for s in (
    _baseline("control", "ControlModel", "no change (the controls themselves)"),
    _baseline("cell-mean", "CellMeanModel", "mean shift of all training perturbed cells of the context (NOT the VCC baseline: see celltwin score)"),
    _baseline("perturbation-mean", "PerturbationMeanModel", "mean of the training perturbations' effects in the context"),
    _baseline("context-transfer", "ContextTransferModel", "mean effect of the perturbation in the other contexts"),
    _baseline("scaled-context-transfer", "ScaledContextTransferModel",
              "context-transfer times a least-squares factor fitted on the context"),
    _baseline("linear", "LinearModel", "gene PCA embedding + ridge (Ahlmann-Eltze et al. 2025)"),
    _baseline("additive", "AdditiveModel", "A+B = effect(A) + effect(B) in the context"),
    ModelSpec("state", "State Transition model (torch): a control set + the perturbation -> the perturbed set",
              f"{_ST}.st_train:train_state", f"{_ST}.st_predict:load_state", f"{_ST}.st_api:STModel", _SO,
              needs_torch=True),
    ModelSpec("state-se", "ST on State Embedding cells, decoded back to genes (state with input_space=embedding)",
              f"{_ST}.st_train:train_state_se", f"{_ST}.st_predict:load_state", f"{_ST}.st_api:STSEModel", _SO,
              defaults={"input_space": "embedding"}, needs_torch=True),
)}


def model_names() -> list[str]:
    return list(MODELS)


def get_spec(name: str) -> ModelSpec:
    """The spec of model ``name``; ConfigError listing the registered names otherwise."""
    if name not in MODELS:
        raise ConfigError(f"model: expected one of {', '.join(MODELS)}, got {name!r}")
    return MODELS[name]


def options_help() -> str:
    """The ``--set`` options of every model, generated from the option dataclasses (``celltwin train --help``)."""
    groups: dict[str, list[ModelSpec]] = {}
    for spec in MODELS.values():
        groups.setdefault(spec.options, []).append(spec)
    out = ["model options (--set KEY=VALUE, repeatable; shown with their defaults):"]
    for ref, specs in groups.items():
        cls = resolve(ref)
        names = ", ".join(s.name for s in specs)
        out.append("")
        out.append(f"{names} ({cls.__module__}.{cls.__name__}):")
        out += cls.help_lines()
        for s in specs:
            if s.defaults:
                shown = ", ".join(f"{k}={v}" for k, v in s.defaults.items())
                out.append(f"  ({s.name}: {shown})")
    return "\n".join(out)
