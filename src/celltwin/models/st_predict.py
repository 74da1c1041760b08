"""Prediction with a trained ST run: :class:`StatePredictor` / :func:`load_state` (registry ``load_fn``).

A run's ST files: ``RUN/state/{model.safetensors,config.json,vocab.json,vocabularies.json}``
(+ ``RUN/state/se/`` for ST on SE embeddings), written by :mod:`celltwin.models.st_train`.

Prediction: the given control cells are shuffled with the caller's ``rng`` and cut into
``ceil(n / set_size)`` near-equal sets, each mapped by the model (so every cell of a set sees
the same perturbation), then put back in the input order. A perturbation outside the training
vocabulary gets the control cells back unchanged (``describe`` says ``fallback:control``),
unless the run encodes perturbations by gene-embedding vectors (``pert_embeddings=TABLE``, any
:func:`celltwin.genes.load_gene_table` format): then an unseen gene found in that table (by
name, or through ``pert_hgnc``) is encoded by its vector and predicted by the model
(``describe``: ``model:gene-embedding``). The table is read again from its recorded path at
predict time (it can be large: it is not copied into the run);
a combination ``A+B`` is encoded as the sum of its members' one-hot inputs, so an unseen
combination of seen genes is predicted by the model; a context outside the vocabulary uses the
"unknown context" token, trained by dropping the context token of a set with probability
``context_dropout``. Predicted values below
``zero_below`` are written as exact zeros (the output never reaches 0 exactly; without this
snap the evaluator's rank test would call every sparse gene differentially expressed).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

from celltwin._constants import CONTROL_LABEL
from celltwin.data.columns import parse_perturbation
from celltwin.errors import ConfigError, InputError
from celltwin.models.st_se_bridge import SEBridge
from celltwin.models.state_transition import StateTransition

__all__ = ["MODEL_SUBDIR", "SE_SUBDIR", "TRAIN_SUBDIR", "StatePredictor", "load_st_module", "load_state",
           "output_space_of"]

MODEL_SUBDIR = "state"
TRAIN_SUBDIR = "train"
SE_SUBDIR = "se"  # RUN/state/se: the SE model of an embedding-space run




def _load_pert_genes(path: str, hgnc: str) -> tuple[Any, Any]:
    from celltwin.genes import HgncIndex, load_gene_table

    return load_gene_table(path), (HgncIndex.from_tsv(hgnc) if hgnc else None)



class _Predictor:
    """Set-wise prediction with an in-memory model (shared by validation and :class:`StatePredictor`)."""

    def __init__(self, model: StateTransition, zero_below: float, bridge: SEBridge | None = None,
                 pert_genes: tuple[str, str] | None = None, clip_max: float | None = None) -> None:
        self.model = model
        self.zero_below = zero_below
        self.clip_max = clip_max  # gene-space outputs above are written as clip_max (arc-state's tx infer: 14)
        # (table path, hgnc path): where vectors of perturbations unseen in training are looked up
        self.pert_genes = pert_genes
        self._pert_lookup: tuple[Any, Any] | None = None
        self.from_table: set[str] = set()  # genes added from the table after training
        self.bridge = bridge  # embedding input: run-space cells -> SE embeddings
        if (model.config.input_space == "embedding" and not (model.vocab.get("embed_key"))
                and (bridge is None or model.gene_decoder is None)):
            raise ConfigError("ST on SE embeddings needs its SE model and a gene decoder (n_genes > 0)")
        v = model.vocab
        self.genes: list[str] = list(v.get("genes", []))
        self.pert_ids = {p: i for i, p in enumerate(v.get("perturbations", []))}
        self.control_id = self.pert_ids.get(CONTROL_LABEL, 0)  # 0 in celltwin's runs; arc-state's map is sorted
        self.ctx_ids = {c: i for i, c in enumerate(v.get("contexts", []))}
        self.batch_ids = {b: i for i, b in enumerate(v.get("batches", []))}
        # arc-state's batch encoder: each predicted cell gets the batch of the control cell it comes from
        self.uses_batch = bool(getattr(model.config, "batch_dim", 0))
        self.output_space = output_space_of(model)
        self.embed_key = (v.get("embed_key") or [None])[0]
        pos = {g: i for i, g in enumerate(self.genes)}
        self.input_idx = (np.array([pos[g] for g in v["input_genes"]], dtype=np.int64)
                          if v.get("input_genes") else None)
        # names of the predicted columns: the run's genes, or the embedding's dimensions
        self.output_names = (self.genes if self.output_space != "embedding"
                             else [f"{self.embed_key or 'emb'}_{i}" for i in range(model.config.input_dim)])

    def _members(self, perturbation: str) -> list[int] | None:
        """Member ids of a label (None when a member is outside the vocabulary and has no vector)."""
        if perturbation == CONTROL_LABEL:
            return [self.control_id]
        ids = [self.pert_ids[m] if m in self.pert_ids else self._add_from_table(m) for m in parse_perturbation(perturbation)]
        return None if (not ids or any(i is None for i in ids)) else ids  # type: ignore[return-value]

    def _add_from_table(self, gene: str) -> int | None:
        """A perturbation unseen in training: append its gene vector to the model's table (inference only)."""
        m = self.model
        if m.pert_table is None or self.pert_genes is None:
            return None
        from celltwin.genes import align_gene_table

        if self._pert_lookup is None:
            path, hgnc = self.pert_genes
            if not Path(path).is_file():
                raise InputError(f"perturbation {gene!r} is not in the trained vocabulary and the gene table the "
                                 f"run was trained with ({path}) is gone; restore it to predict unseen genes")
            self._pert_lookup = _load_pert_genes(path, hgnc)
        table, hgnc_index = self._pert_lookup
        vec, found, _ = align_gene_table(table, [gene], hgnc_index)
        if not found[0]:
            return None
        row = torch.from_numpy(vec).to(m.pert_table.device, m.pert_table.dtype)  # (1, E)
        m.pert_table = torch.cat([m.pert_table, row])  # buffer grows by one row
        self.pert_ids[gene] = m.pert_table.shape[0] - 1
        self.from_table.add(gene)
        return self.pert_ids[gene]

    def describe(self, perturbation: str, context: str | None) -> str:
        members = self._members(perturbation)
        if members is None:
            return "fallback:control"
        src = "model:gene-embedding" if any(g in self.from_table for g in parse_perturbation(perturbation)) else "model"
        return src if context is None or context in self.ctx_ids else f"{src}:unknown-context"

    def _inputs(self, controls: np.ndarray, inputs: np.ndarray | None) -> np.ndarray:
        """The model's input rows for these control cells (genes, HVG columns, obsm rows or SE)."""
        if self.bridge is not None:
            return self.bridge.embed(controls, cache=True)  # (n, E)
        if self.embed_key is not None:
            if inputs is None:
                raise InputError(f"this run reads obsm[{self.embed_key!r}] (--embed-key): give the control "
                                 "cells' embeddings (celltwin predict reads them from the data file)")
            return np.ascontiguousarray(inputs, dtype=np.float32)
        if self.input_idx is not None:
            return np.ascontiguousarray(controls[:, self.input_idx])
        return controls

    @torch.no_grad()
    def predict(self, controls: np.ndarray, perturbation: str, context: str | None,
                rng: np.random.Generator, inputs: np.ndarray | None = None,
                batches: np.ndarray | None = None) -> np.ndarray:
        """Predicted cells (n, len(output_names)) for ``controls`` (n, G) model-space genes.

        ``inputs`` (n, D): the control cells' ``obsm[embed_key]`` rows for an ``--embed-key`` run.
        ``batches`` (n,): the control cells' batch labels, for a model with a batch encoder
        (arc-state's ``batch_encoder``); a label outside the model's batches is an InputError.
        """
        controls = np.asarray(controls, dtype=np.float32)
        n = controls.shape[0]
        ids = self._members(perturbation)
        if ids is None or n == 0:
            if self.output_space == "embedding":
                return self._inputs(controls, inputs).copy()
            return controls.copy()
        m = self.model
        was_training = m.training
        m.eval()
        device = next(m.parameters()).device
        S = m.config.set_size
        if getattr(m, "arch", "celltwin") == "arc-state":
            # as arc-state's tx infer: the cells in the given order, sets of set_size then the rest
            # (its GPT-2 backbone attends causally, so the order of a set matters there)
            order = np.arange(n)
            chunks = [order[i:i + S] for i in range(0, n, S)]
        else:
            order = rng.permutation(n)
            chunks = np.array_split(order, math.ceil(n / S))
        x_in = self._inputs(controls, inputs)  # (n, D)
        key = "genes" if self.output_space == "all" else "pred"
        out = np.empty((n, len(self.output_names)), dtype=np.float32)  # (n, G) or (n, E)
        pid = torch.tensor([ids], device=device)  # (1, K)
        cid = torch.tensor([self.ctx_ids.get(context, 0) if context is not None else 0], device=device)
        bidx = self._batch_index(batches, n) if self.uses_batch else None
        for chunk in chunks:
            x = torch.from_numpy(x_in[chunk]).to(device)[None]  # (1, s, D)
            genes = torch.from_numpy(controls[chunk]).to(device)[None] if key == "genes" else None
            kw = {} if bidx is None else {"batch_idx": torch.from_numpy(bidx[chunk]).to(device)[None]}  # (1, s)
            y = m(x, pid, cid if m.context_emb is not None else None, ctrl_genes=genes, **kw)[key][0]  # (s, G)
            out[chunk] = y.float().cpu().numpy()
        if self.output_space != "embedding":
            out[out < self.zero_below] = 0.0
            if self.clip_max is not None:
                np.minimum(out, self.clip_max, out=out)
        if was_training:
            m.train()
        return out


    def _batch_index(self, batches: np.ndarray | None, n: int) -> np.ndarray:
        if batches is None:
            raise InputError("this model has a batch encoder: give the control cells' batch labels (celltwin "
                             "predict reads them from the run's batch column)")
        labels = np.asarray(batches).astype(str)
        bad = sorted(set(labels.tolist()) - set(self.batch_ids))
        if bad:
            raise InputError(f"control cells: batch label(s) {', '.join(bad[:5])} are not among the model's batches "
                             f"({', '.join(self.batch_ids)})")
        return np.array([self.batch_ids[b] for b in labels], dtype=np.int64)


def output_space_of(model: Any) -> str:
    """What a loaded ST module predicts, in celltwin's terms: ``gene`` (its input genes), ``all`` (genes
    through a decoder, the ``"genes"`` output) or ``embedding``."""
    c = model.config
    if getattr(model, "arch", "celltwin") == "arc-state":
        if c.decode_genes:
            return "all"
        return "embedding" if c.input_space == "embedding" else "gene"
    return c.output_space


def load_st_module(directory: str | Path) -> Any:
    """The ST module saved in ``directory``: celltwin's :class:`StateTransition`, or arc-state's
    architecture (:class:`~celltwin.models.arc_transition.ArcStateTransition`) when config.json says
    ``"arch": "arc-state"``."""
    d = Path(directory)
    cfg = d / "config.json"
    if cfg.is_file():
        try:
            arch = json.loads(cfg.read_text()).get("arch", "celltwin")
        except ValueError:
            raise InputError(f"{cfg}: not valid JSON") from None
        if arch == "arc-state":
            from celltwin.models.arc_transition import ArcStateTransition

            return ArcStateTransition.from_pretrained(d)
    return StateTransition.from_pretrained(d)


class StatePredictor(_Predictor):
    """Registry Predictor of a trained ST run: ``genes``, ``predict(...)``, ``describe(...)``."""

    def __init__(self, run_dir: str | Path, device: str = "auto") -> None:
        run_dir = Path(run_dir)
        d = run_dir / MODEL_SUBDIR
        model = load_st_module(d)
        dev = "cuda" if (device == "auto" and torch.cuda.is_available()) else ("cpu" if device == "auto" else device)
        model.to(dev).eval()
        meta = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").exists() else {}
        zero_below = float(meta.get("state", {}).get("options", {}).get("zero_below", 0.01))
        bridge = None
        if model.config.input_space == "embedding" and not model.vocab.get("embed_key"):
            from celltwin.data.preprocess import Preprocessing
            from celltwin.models.state_embedding import StateEmbeddingModel

            se_dir = d / SE_SUBDIR
            se = StateEmbeddingModel.from_pretrained(se_dir).to(dev)
            run_pre = Preprocessing.load(run_dir) if (run_dir / "preprocess.json").exists() else None
            bridge = SEBridge.build(se, se_dir, list(model.vocab.get("genes", [])), run_pre)
        opts = meta.get("state", {}).get("options", {})
        pert_genes = (opts["pert_embeddings"], opts.get("pert_hgnc", "")) if opts.get("pert_embeddings") else None
        clip = opts.get("clip_max")
        super().__init__(model, zero_below, bridge, pert_genes, clip_max=None if clip is None else float(clip))


def load_state(run_dir: str | Path) -> StatePredictor:
    """Registry ``load_fn``."""
    return StatePredictor(run_dir)
