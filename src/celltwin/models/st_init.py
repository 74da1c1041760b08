"""Start ST training from other weights (``--init-from DIR``): keep what fits, re-initialise the rest.

``DIR`` is a celltwin run (``RUN/state/``), an ST module directory (``config.json`` +
``model.safetensors``), a run written by ``celltwin import-state``, or an arc-state ST run
directory itself (read through the restricted unpickler, nothing written). The new model takes
the *architecture* of ``DIR`` (``arch``, widths, depths, heads, set size, output head) and the
*data-dependent sizes* of the new training data (input width, perturbation vocabulary, contexts,
genes). Then, tensor by tensor:

* same name and shape: copied;
* a tensor with one axis indexed by a named vocabulary: the rows / columns whose names exist in
  both runs are copied, the others keep their fresh initialisation. The named axes are the input
  columns of the perturbation encoder's first layer (perturbation names, for one-hot encoders),
  the input columns of the basal encoder's first layer and the output rows of the output head
  (gene names, for expression input/output);
* anything else (another shape, or absent from ``DIR``) keeps its fresh initialisation.

The report (``run.json`` ``state.init_from``, and the log) lists the re-initialised tensors and how
many named rows/columns were carried over, so a new perturbation vocabulary is visible at once.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

import torch

from celltwin._constants import CONTROL_LABEL
from celltwin.errors import ConfigError, InputError

__all__ = ["InitSource", "arch_config", "init_model", "read_init_source"]


class InitSource:
    """The architecture config, tensors and vocabulary of ``--init-from DIR``."""

    def __init__(self, arch: str, config: Any, tensors: dict[str, torch.Tensor], vocab: dict[str, list[str]],
                 where: str) -> None:
        self.arch, self.config, self.tensors, self.vocab, self.where = arch, config, tensors, vocab, where


def read_init_source(path: str | Path) -> InitSource:
    """Read ``--init-from`` (see the module docstring); InputError when it is none of the accepted layouts."""
    p = Path(path)
    d = p / "state" if (p / "state" / "config.json").is_file() else p
    if (d / "config.json").is_file() and (d / "model.safetensors").is_file():
        from safetensors.torch import load_file

        raw = json.loads((d / "config.json").read_text())
        vocab = json.loads((d / "vocab.json").read_text()) if (d / "vocab.json").is_file() else {}
        tensors = load_file(str(d / "model.safetensors"))
        if raw.get("arch") == "arc-state":
            from celltwin.models.arc_transition import ArcSTConfig

            known = {f.name for f in fields(ArcSTConfig)}
            return InitSource("arc-state", ArcSTConfig(**{k: v for k, v in raw.items() if k in known}), tensors,
                              vocab, str(d))
        from celltwin.models.state_transition import STConfig

        known = {f.name for f in fields(STConfig)}
        return InitSource("celltwin", STConfig(**{k: v for k, v in raw.items() if k in known}), tensors, vocab, str(d))
    if (p / "var_dims.pkl").is_file():
        from celltwin.state_import import find_source
        from celltwin.state_import.st import read_st_run

        info = read_st_run(find_source(p))
        perts = [CONTROL_LABEL if x == info["control"] else x for x in info["perts"]]
        return InitSource("arc-state", info["config"], info["tensors"],
                          {"genes": info["genes"], "perturbations": perts}, str(p))
    msg = (f"--init-from {p}: expected a celltwin run or ST model directory (state/config.json + model.safetensors), "
           "an imported arc-state run (celltwin import-state) or an arc-state ST run directory (var_dims.pkl)")
    raise InputError(msg)


def _named_axes(arch: str, model: torch.nn.Module) -> dict[str, tuple[int, str]]:
    """Tensor name -> (axis, vocabulary key) for the axes indexed by names (module docstring)."""
    sd = model.state_dict()
    out: dict[str, tuple[int, str]] = {}
    expression = model.config.input_space == "expression"
    if arch == "arc-state":
        first_pert = "pert_encoder.0.weight"
        first_basal = "basal_encoder.0.weight" if "basal_encoder.0.weight" in sd else "basal_encoder.weight"
        heads = sorted(k for k in sd if k.startswith("project_out."))
        last = heads[-1].rsplit(".", 2)[0] if heads else ""  # e.g. "project_out.3"
        out[first_pert] = (1, "perturbations")
    else:
        first_basal, last = "basal_encoder.net.0.weight", "head"
        if getattr(model, "pert_table", None) is None:
            out["pert_encoder.net.0.weight"] = (1, "perturbations")
    if expression:
        out[first_basal] = (1, "input_genes")
        if last and (arch != "arc-state" or model.config.output_space == "gene"):
            out[f"{last}.weight"] = (0, "input_genes")
            out[f"{last}.bias"] = (0, "input_genes")
    return out


def _names(vocab: dict[str, list[str]], key: str) -> list[str]:
    if key == "input_genes":
        return list(vocab.get("input_genes") or vocab.get("genes") or [])
    return list(vocab.get(key) or [])


def init_model(model: torch.nn.Module, src: InitSource) -> dict[str, Any]:
    """Copy what fits from ``src`` into ``model`` (freshly initialised); returns the report."""
    arch = getattr(model, "arch", "celltwin")
    if arch != src.arch:
        raise ConfigError(f"--init-from {src.where}: an {src.arch} model; the new model was built as {arch}")
    new_sd = model.state_dict()
    named = _named_axes(arch, model)
    state: dict[str, torch.Tensor] = {}
    copied, partial, reinit = [], {}, []
    for k, t in new_sd.items():
        old = src.tensors.get(k)
        if old is not None and tuple(old.shape) == tuple(t.shape) and k not in named:
            state[k] = old.to(t.dtype)
            copied.append(k)
            continue
        if old is not None and k in named:
            axis, key = named[k]
            new_names, old_names = _names(model.vocab, key), _names(src.vocab, key)
            if len(new_names) == t.shape[axis] and len(old_names) == old.shape[axis] and \
                    old.ndim == t.ndim and all(a == b for i, (a, b) in enumerate(zip(old.shape, t.shape, strict=True))
                                               if i != axis):
                pos = {n: i for i, n in enumerate(old_names)}
                pairs = [(i, pos[n]) for i, n in enumerate(new_names) if n in pos]
                merged = t.clone()
                if pairs:
                    dst = torch.tensor([a for a, _ in pairs])
                    srci = torch.tensor([b for _, b in pairs])
                    merged.index_copy_(axis, dst, old.index_select(axis, srci).to(t.dtype))
                state[k] = merged
                partial[k] = {"kept": len(pairs), "of": int(t.shape[axis]), "by": key}
                if len(pairs) == t.shape[axis]:
                    copied.append(k)
                    partial.pop(k)
                continue
        state[k] = t
        reinit.append(k)
    model.load_state_dict(state, strict=True)
    dropped = sorted(set(src.tensors) - set(new_sd))
    return {"from": src.where, "arch": arch, "copied": len(copied), "reinitialised": reinit,
            "partially_copied": partial, "not_used": dropped}


def arch_config(src: InitSource, **sizes: Any) -> Any:
    """``src``'s architecture config with the new data's sizes (``dataclasses.replace``, validated again)."""
    known = {f.name for f in fields(type(src.config))}
    bad = sorted(set(sizes) - known)
    if bad:
        raise ConfigError(f"--init-from {src.where}: {src.arch} configs have no field(s) {bad}")
    return replace(src.config, **sizes)
