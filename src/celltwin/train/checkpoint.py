"""Atomic training checkpoints: model, optimiser, scheduler, grad scaler, RNG states, position.

A checkpoint is one ``torch.save`` file written through :func:`celltwin._io.atomic_path`
(temporary file + ``os.replace``), so a process killed at any moment leaves either the
previous checkpoint or the new one, never a torn file. A small JSON sidecar (``last.json``,
also atomic, written *after* the ``.pt``) records the step for humans and polling scripts.

RNG states are saved per rank (gathered to rank 0): Python ``random``, NumPy's legacy
global state, torch CPU and, when present, the CUDA generator of the rank's device.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from celltwin._io import atomic_path

__all__ = ["rng_state", "set_rng_state", "gather_rng_states", "save_checkpoint", "load_checkpoint",
           "CHECKPOINT_NAME"]

CHECKPOINT_NAME = "last.pt"


def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states (Python, NumPy global, torch CPU, CUDA of ``device``)."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def gather_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """RNG states of every rank, in rank order (collective: call on all ranks)."""
    mine = rng_state(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, mine)
        return out
    return [mine]


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/last.pt`` atomically, then ``last.json`` with its step."""
    directory = Path(directory)
    path = directory / CHECKPOINT_NAME
    with atomic_path(path) as tmp:
        torch.save(state, tmp)
    with atomic_path(directory / "last.json") as tmp:
        tmp.write_text(json.dumps({"step": int(state["step"]), "epoch": int(state["epoch"])}) + "\n")
    return path


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint`, or None when there is none."""
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    # weights_only=False: the file holds RNG tuples and NumPy states, and we wrote it ourselves.
    return torch.load(path, map_location=map_location, weights_only=False)
