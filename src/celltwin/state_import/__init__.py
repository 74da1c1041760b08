"""Import Arc Institute STATE (arc-state 0.11.1) checkpoints into celltwin, without running their code.

* :func:`import_state` (``celltwin import-state SRC -o DIR``): an ST run directory (``state tx
  train`` output: config, checkpoint, one-hot maps, gene list) becomes a celltwin run directory
  (``celltwin predict``, ``STModel.load``, ``celltwin train --init-from``); an SE checkpoint (with
  its protein-embedding table) becomes a celltwin SE directory (``celltwin embed transform``,
  ``SEModel.load``, ``StateEmbeddingModel.from_pretrained``).
* ``SRC`` is a path, a Hugging Face cache folder (``models--arcinstitute--SE-600M``) or a model id
  found in the local Hugging Face cache (no network is used).
* Every pickled file is read by a restricted unpickler that admits plain data only
  (:mod:`celltwin.state_import._unpickle`); a checkpoint that would run code is refused.

arc-state is never imported: the architectures are celltwin's own re-implementations
(:mod:`celltwin.models.arc_transition`, :mod:`celltwin.models.arc_embedding`), checked against
arc-state's recorded outputs (``tests/data/state_golden``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from celltwin.state_import._source import ArcSource, find_source, resolve_path
from celltwin.state_import._unpickle import UnsafePickleError, load_pickle, load_torch

__all__ = ["ArcSource", "UnsafePickleError", "find_source", "import_state", "load_pickle", "load_torch",
           "resolve_path"]


def import_state(src: str | os.PathLike[str], out: str | os.PathLike[str], *,
                 checkpoint: str | os.PathLike[str] | None = None, target_sum: float | None = None,
                 protein_embeddings: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Convert the arc-state artefact ``src`` into a celltwin directory ``out``; returns what was recorded.

    ``target_sum``: for an ST run, normalise count input with ``log1p(normalize_total(X, T))``
    before the model (default: none; the model reads log1p-normalised X, as arc-state's does).
    ``protein_embeddings``: an SE gene table to use when the checkpoint does not carry one.
    """
    source = find_source(src, checkpoint)
    if source.kind == "st":
        from celltwin.state_import.st import import_st_run

        meta = import_st_run(source, out, target_sum=target_sum)
    else:
        from celltwin.state_import.se import import_se_checkpoint

        meta = import_se_checkpoint(source, out, protein_embeddings=protein_embeddings)
    return {"kind": source.kind, "source": str(Path(source.path)), "checkpoint": str(source.checkpoint),
            "output": str(out), "meta": meta}
