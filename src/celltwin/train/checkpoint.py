"""Atomic training checkpoints: model, optimiser, scheduler, grad scaler, RNG states, position.

A checkpoint is one ``torch.save`` file written through :func:`celltwin._io.atomic_path`
(temporary file + ``os.replace``), so a process killed at any moment leaves either the
previous checkpoint or the new one, never a torn file. A small JSON sidecar (``last.json``,
also atomic, written *after* the ``.pt``) records the step for humans and polling scripts.
A write killed half-way leaves its temporary file (``.last.pt.XXXX.tmp.pt``) behind;
:func:`remove_stale_temp_files` deletes such leftovers (called before every save and by
:func:`celltwin.train.fit` at start on rank 0).

Safety: a checkpoint holds tensors and plain data only (dicts, lists, tuples, str, int,
float, bool, None) and is read with ``torch.load(weights_only=True)``, whose unpickler refuses
every other global. A run directory is therefore not a code-execution vector: a crafted
``last.pt`` (a pickle whose ``__reduce__`` calls ``os.system``, say) is refused with an
:class:`~celltwin.errors.InputError` before anything in it runs. Checkpoints written by
celltwin before this format (they pickled NumPy arrays) are refused the same way; restart
such runs (``--set resume=false`` or remove the run directory).

RNG states are saved per rank (gathered to rank 0) in plain form (:func:`rng_state`): Python
``random`` (version, 625 state words as an int64 tensor, gauss_next), NumPy's legacy global
state (algorithm name, key as an int64 tensor, pos, has_gauss, cached_gaussian), the torch
CPU generator and, when present, the CUDA generator of the rank's device (uint8 tensors).

:func:`file_fingerprint` summarises a data file (size, mtime, partial content hash) so that
a caller can put it in :attr:`celltwin.train.TrainConfig.fingerprint` and resume refuses a
checkpoint trained on other data.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import random
import re
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from celltwin._io import atomic_path
from celltwin.data.inputs import file_fingerprint
from celltwin.errors import InputError

__all__ = [
    "CHECKPOINT_FORMAT",
    "CHECKPOINT_NAME",
    "file_fingerprint",
    "gather_rng_states",
    "load_checkpoint",
    "plain_data_problem",
    "remove_stale_temp_files",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]

CHECKPOINT_NAME = "last.pt"
SIDECAR_NAME = "last.json"
CHECKPOINT_FORMAT = "celltwin-checkpoint-v2"
"""Value of the ``"format"`` key every checkpoint written by :func:`save_checkpoint` carries."""



def rng_state(device: torch.device) -> dict[str, Any]:
    """This process's RNG states in plain form (loadable with ``weights_only=True``).

    Python ``random``: ``{"version", "state" (int64 tensor of the 625 words), "gauss_next"}``;
    NumPy legacy global: ``{"name", "key" (int64 tensor), "pos", "has_gauss", "cached_gaussian"}``;
    torch CPU (and CUDA of ``device`` when it is a CUDA device): uint8 state tensors.
    """
    version, words, gauss_next = random.getstate()
    name, key, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": {
            "version": int(version),
            "state": torch.tensor(words, dtype=torch.int64),
            "gauss_next": None if gauss_next is None else float(gauss_next),
        },
        "numpy": {
            "name": str(name),
            "key": torch.from_numpy(np.asarray(key, dtype=np.int64).copy()),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: dict[str, Any], device: torch.device) -> None:
    """Restore the states captured by :func:`rng_state` (the inverse conversion)."""
    py = state["python"]
    words = tuple(int(w) for w in py["state"].tolist())
    random.setstate((int(py["version"]), words, py["gauss_next"]))
    npst = state["numpy"]
    key = npst["key"].cpu().numpy().astype(np.uint32)
    np.random.set_state(
        (npst["name"], key, int(npst["pos"]), int(npst["has_gauss"]), float(npst["cached_gaussian"]))
    )
    torch.set_rng_state(state["torch"].cpu())
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"].cpu(), device)


def gather_rng_states(device: torch.device) -> list[dict[str, Any]]:
    """RNG states of every rank, in rank order (collective: call on all ranks)."""
    mine = rng_state(device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        out: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(out, mine)
        return out
    return [mine]


def remove_stale_temp_files(directory: str | Path) -> list[Path]:
    """Delete temporary files of interrupted checkpoint writes in ``directory``; return them.

    :func:`celltwin._io.atomic_path` names its temporary files ``.{name}.[{pid}-]{random}.tmp{suffix}``;
    a process killed during ``torch.save`` leaves one behind. Only that pattern, for the two
    files this module writes (``last.pt``, ``last.json``), is considered, and a file is removed
    at once (no age rule, unlike :func:`celltwin._io.clean_stale`) unless its name carries the
    pid of another *live* process on this machine (then another run is writing into the same
    directory right now, and its file is left alone). Symlinks and directories are never
    touched. Called before every save and by :func:`celltwin.train.fit` at start on rank 0.
    """
    directory = Path(directory)
    removed: list[Path] = []
    if not directory.is_dir():
        return removed
    for name in (CHECKPOINT_NAME, SIDECAR_NAME):
        pattern = re.compile(rf"^\.{re.escape(name)}\.(?:(?P<pid>\d+)-)?[A-Za-z0-9_]+\.tmp")
        for p in directory.glob(f".{name}.*.tmp*"):
            m = pattern.match(p.name)
            if m is None or p.is_symlink() or not p.is_file():
                continue
            pid = m.group("pid")
            if pid is not None and int(pid) != os.getpid() and _pid_alive(int(pid)):
                continue
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: existence check only, nothing is sent
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError, ValueError):
        return True  # exists (another user's) or unknowable: keep its file
    return True


def save_checkpoint(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/last.pt`` atomically, then ``last.json`` with its step.

    ``state`` must hold tensors and plain data only (see the module docstring); the format
    marker ``state["format"] = CHECKPOINT_FORMAT`` is added. Stale temporary files of earlier
    interrupted writes are removed first.
    """
    directory = Path(directory)
    path = directory / CHECKPOINT_NAME
    remove_stale_temp_files(directory)
    with atomic_path(path) as tmp:
        torch.save({**state, "format": CHECKPOINT_FORMAT}, tmp)
    with atomic_path(directory / SIDECAR_NAME) as tmp:
        tmp.write_text(json.dumps({"step": int(state["step"]), "epoch": int(state["epoch"])}) + "\n")
    return path


_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_REFUSED_OPCODE = re.compile(r"Unsupported operand (\d+)")


def load_checkpoint(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The state saved by :func:`save_checkpoint`, or None when there is none.

    Read with ``torch.load(weights_only=True)``: nothing in the file is executed. Raises
    :class:`~celltwin.errors.InputError` (one line, naming the file) when the file holds
    anything but tensors and plain data (a crafted pickle, or a checkpoint of an older
    celltwin), is truncated or corrupt, or is not a celltwin checkpoint of this format.
    """
    path = Path(directory) / CHECKPOINT_NAME
    if not path.exists():
        return None
    restart = f"start fresh with --set resume=false (or remove {path.parent})"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # protocol warnings of the weights-only unpickler on foreign files
            state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        if "Weights only load failed" in text or "weights_only" in text:
            glob, opcode = _REFUSED_GLOBAL.search(text), _REFUSED_OPCODE.search(text)
            what = (f" (global {glob.group(1)})" if glob else
                    f" (pickle opcode {opcode.group(1)}, not produced by torch.save)" if opcode else "")
            msg = (
                f"{path}: refused: not a celltwin checkpoint, it holds non-tensor objects{what} that would "
                f"run code when loaded; nothing in it was executed. A checkpoint of an older celltwin "
                f"is refused too: {restart}"
            )
        else:
            msg = f"{path}: not a readable celltwin checkpoint (corrupt pickle: {_one_line(text)}); {restart}"
        raise InputError(msg) from None
    except (RuntimeError, EOFError, OSError, ValueError, KeyError, IndexError, TypeError,
            AttributeError, UnicodeDecodeError) as e:
        msg = (
            f"{path}: not a readable celltwin checkpoint (truncated or corrupt: {type(e).__name__}: "
            f"{_one_line(str(e))}); {restart}"
        )
        raise InputError(msg) from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        found = state.get("format") if isinstance(state, dict) else type(state).__name__
        msg = (
            f"{path}: not a celltwin checkpoint of this version (format {found!r}, expected "
            f"{CHECKPOINT_FORMAT!r}); {restart}"
        )
        raise InputError(msg)
    return state


def _one_line(text: str, limit: int = 160) -> str:
    line = " ".join(text.split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def plain_data_problem(obj: Any, where: str) -> str | None:
    """Where ``obj`` holds something a checkpoint cannot (None when it is tensors and plain data).

    Plain data: dict (str/int keys), list, tuple, str, int, float, bool, None and tensors, the
    types ``torch.load(weights_only=True)`` accepts. NumPy arrays, paths and other objects are
    not (convert them: ``.tolist()``, ``str(path)``). Returns e.g. ``"extra.options.path:
    PosixPath"``.
    """
    if obj is None or isinstance(obj, bool | int | float | str | torch.Tensor):
        return None
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, str | int):
                return f"{where}: key {k!r} of type {type(k).__name__}"
            bad = plain_data_problem(v, f"{where}.{k}")
            if bad is not None:
                return bad
        return None
    if isinstance(obj, list | tuple):
        for i, v in enumerate(obj):
            bad = plain_data_problem(v, f"{where}[{i}]")
            if bad is not None:
                return bad
        return None
    return f"{where}: {type(obj).__module__}.{type(obj).__qualname__}"
