"""Import an arc-state ST run directory (``state tx train`` output) as a celltwin run directory.

Read (all through the restricted unpickler, :mod:`celltwin.state_import._unpickle`):

* ``checkpoints/final.ckpt`` (or ``--checkpoint``): ``state_dict`` and ``hyper_parameters``;
* ``var_dims.pkl``: the gene names of the output space (``gene_names``) and the dimensions;
* ``pert_onehot_map.pt``: perturbation label -> one-hot row (the index order is the model's);
* ``batch_onehot_map.torch`` (batch encoder only) and ``cell_type_onehot_map.torch``;
* ``data_module.torch``: the obs column names and the control label the run was trained with.

Written (one atomic directory, :func:`celltwin._io.atomic_dir`)::

    OUT/run.json           model "state", arch "arc-state", the source files' sha256, the columns
    OUT/genes.txt          the predicted genes (arc's var_dims gene_names)
    OUT/preprocess.json    no normalisation (arc-state models read log1p-normalised X), or --target-sum
    OUT/inputs.json        (+ input_genes.txt) where the model's input comes from
    OUT/state/model.safetensors, config.json (ArcSTConfig, "arch": "arc-state"), vocab.json

How arc-state's inputs map onto celltwin's: ``embed_key: X_hvg`` (arc's ``preprocess_train`` writes
``obsm["X_hvg"]`` = the highly variable columns of the log-normalised X) reads those genes from X;
no ``embed_key`` reads every gene of X; any other key (``X_state`` from SE) reads that obsm matrix.
The control label is canonicalised: the predictor knows arc's control row by name.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from celltwin.errors import ConfigError, InputError
from celltwin.state_import._source import ArcSource
from celltwin.state_import._unpickle import load_pickle, load_torch, plain

__all__ = ["import_st_run", "read_st_run"]


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _onehot_order(mapping: dict, path: Path) -> list[str]:
    """Labels in one-hot index order; InputError unless every value is a distinct one-hot row."""
    import torch

    labels = [str(k) for k in mapping]
    idx: list[int] = []
    for k, v in mapping.items():
        t = torch.as_tensor(v).flatten()
        if t.numel() != len(labels) or int((t != 0).sum()) != 1 or float(t.max()) != 1.0:
            raise InputError(f"{path}: the value of {k!r} is not a one-hot row of width {len(labels)}")
        idx.append(int(t.argmax()))
    if sorted(idx) != list(range(len(labels))):
        raise InputError(f"{path}: one-hot rows are not a permutation of 0..{len(labels) - 1}")
    out = [""] * len(labels)
    for lab, i in zip(labels, idx, strict=True):
        out[i] = lab
    return out


def read_st_run(src: ArcSource) -> dict[str, Any]:
    """Everything a celltwin run needs from an arc-state ST run directory (nothing written)."""
    from celltwin.models.arc_transition import ArcSTConfig, arc_state_dict

    run, ckpt_path = src.path, src.checkpoint
    ckpt = load_torch(ckpt_path)
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "hyper_parameters" not in ckpt:
        raise InputError(f"{ckpt_path}: not a Lightning checkpoint (expected state_dict and hyper_parameters)")
    hp = plain(dict(ckpt["hyper_parameters"]))
    var_dims = plain(load_pickle(run / "var_dims.pkl"))
    if not isinstance(var_dims, dict) or "gene_names" not in var_dims:
        raise InputError(f"{run / 'var_dims.pkl'}: expected a dict with gene_names")
    config = ArcSTConfig.from_arc_hparams(hp, var_dims)
    perts = _onehot_order(plain(load_torch(run / "pert_onehot_map.pt")), run / "pert_onehot_map.pt")
    if len(perts) != config.pert_dim:
        raise InputError(f"{run / 'pert_onehot_map.pt'}: {len(perts)} perturbations, the checkpoint's "
                         f"pert_dim is {config.pert_dim}")
    batches: list[str] = []
    if config.batch_dim:
        bpath = run / "batch_onehot_map.torch"
        if not bpath.is_file():
            raise InputError(f"{run}: the model has a batch encoder but batch_onehot_map.torch is missing")
        batches = _onehot_order(plain(load_torch(bpath)), bpath)
    cpath = run / "cell_type_onehot_map.torch"
    cell_types = _onehot_order(plain(load_torch(cpath)), cpath) if cpath.is_file() else []
    dm_path = run / "data_module.torch"
    dm = plain(load_torch(dm_path)) if dm_path.is_file() else {}
    control = str(hp.get("control_pert") or dm.get("control_pert") or "non-targeting")
    if control not in perts:
        raise InputError(f"{run / 'pert_onehot_map.pt'}: the control label {control!r} is not in the map")
    genes = [str(g) for g in var_dims["gene_names"]]
    tensors = arc_state_dict(dict(ckpt["state_dict"]))
    files = [ckpt_path, run / "var_dims.pkl", run / "pert_onehot_map.pt"] + [
        p for p in (run / "batch_onehot_map.torch", cpath, dm_path, run / "config.yaml") if p.is_file()]
    return {"config": config, "tensors": tensors, "perts": perts, "control": control, "batches": batches,
            "cell_types": cell_types, "genes": genes, "hparams": hp, "data_module": dm,
            "embed_key": hp.get("embed_key") or dm.get("embed_key"), "output_space": hp.get("output_space", "gene"),
            "files": {str(p.relative_to(run) if p.is_relative_to(run) else p): _sha256(p) for p in files},
            "global_step": int(ckpt.get("global_step", 0) or 0)}


def _inputs_for(info: dict[str, Any]) -> tuple[dict[str, Any], list[str] | None]:
    """(inputs.json, input genes) of the imported run (see the module docstring)."""
    cfg = info["config"]
    key = info["embed_key"]
    if cfg.input_space == "embedding":
        out = "all" if cfg.decode_genes else "embedding"
        return {"kind": "obsm", "embed_key": key, "output_space": out, "n_input_genes": None,
                "embed_dim": cfg.input_dim}, None
    if key and key != "X_hvg":
        msg = (f"arc-state run: embed_key {key!r} with gene-space input is not supported (celltwin maps X_hvg to "
               "the highly variable columns of X, and no key to every gene of X)")
        raise ConfigError(msg)
    genes = info["genes"]
    if len(genes) != cfg.input_dim:
        raise InputError(f"arc-state run: var_dims has {len(genes)} gene names, the model reads {cfg.input_dim}")
    return ({"kind": "genes", "embed_key": None, "output_space": "gene", "n_input_genes": len(genes),
             "embed_dim": 0}, list(genes))


def import_st_run(src: ArcSource, out: str | Path, *, target_sum: float | None = None) -> dict[str, Any]:
    """Write the celltwin run directory ``out`` for the arc-state ST run ``src``; returns its run.json."""
    from celltwin import __version__
    from celltwin._constants import CONTROL_LABEL
    from celltwin._io import atomic_dir
    from celltwin.data.inputs import _INPUT_GENES
    from celltwin.data.preprocess import Preprocessing, write_genes_txt
    from celltwin.models.arc_transition import ArcStateTransition

    info = read_st_run(src)
    cfg = info["config"]
    inputs, input_genes = _inputs_for(info)
    control = info["control"]
    perts = [CONTROL_LABEL if p == control else p for p in info["perts"]]
    if perts.count(CONTROL_LABEL) != 1:
        raise InputError(f"arc-state run {src.path}: the perturbation map has both {control!r} (the control) and "
                         f"{CONTROL_LABEL!r}; celltwin cannot tell them apart")
    vocab = {"genes": info["genes"], "perturbations": perts, "contexts": info["cell_types"],
             "batches": info["batches"], "arc_control": [control]}
    if input_genes is not None and input_genes != info["genes"]:
        vocab["input_genes"] = input_genes
    if inputs["kind"] == "obsm":
        vocab["embed_key"] = [inputs["embed_key"]]
    model = ArcStateTransition(cfg, vocab=vocab)
    try:
        model.load_state_dict(info["tensors"], strict=True)
    except RuntimeError as e:
        raise InputError(f"{src.checkpoint}: the weights do not fit the architecture read from its "
                         f"hyper_parameters ({str(e).splitlines()[0]})") from None
    dm = info["data_module"]
    columns = {"pert_col": dm.get("pert_col") or "target_gene", "control_label": control,
               "context_col": dm.get("cell_type_key") or "cell_type", "batch_col": dm.get("batch_col") or None}
    pre = Preprocessing(genes=list(info["genes"]), target_sum=target_sum, log1p=target_sum is not None)
    meta = {
        "model": "state", "arch": "arc-state", "celltwin_version": __version__,
        "imported_from": {"kind": "arc-state ST run", "path": str(Path(src.path).absolute()),
                          "checkpoint": str(Path(src.checkpoint).absolute()), "global_step": info["global_step"],
                          "sha256": info["files"], "embed_key": info["embed_key"],
                          "output_space": info["output_space"]},
        "preprocess": pre.to_dict(), "inputs": inputs, "columns": columns, "control_label": CONTROL_LABEL,
        "n_genes": len(info["genes"]),
        # arc-state's tx infer writes clip(prediction, 0, 14) in gene space; no zero snap (ReLU gives zeros)
        "state": {"options": {"zero_below": 0.0, "clip_max": 14.0}, "arch": "arc-state",
                  "n_params": sum(p.numel() for p in model.parameters())},
    }
    with atomic_dir(out) as stage:
        pre.save(stage)
        if input_genes is not None and input_genes != info["genes"]:
            write_genes_txt(stage / _INPUT_GENES, input_genes)
        (stage / "inputs.json").write_text(json.dumps(inputs, indent=2) + "\n")
        model.save_pretrained(stage / "state")
        (stage / "run.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")
    return meta
