"""Provenance of a run: what ``run.json`` records about how, where and from what it was made.

:func:`run_provenance` builds the fields (standard library only at import; never imports torch:
its version is recorded only when torch is already imported):

* ``package_versions``: celltwin, numpy, scipy, anndata, h5py, numba, polars (installed
  distribution versions, ``None`` when absent) and torch when imported;
* ``git_revision`` / ``git_dirty``: the commit of the celltwin source checkout when celltwin runs
  from a git checkout (``src/celltwin`` of a work tree), else ``None``; read with ``git`` under a
  short timeout, never failing (``None`` when git is missing, slow or says no);
* ``argv``, ``started_at`` / ``finished_at`` (UTC, ISO 8601);
* ``host``: hostname, platform, python version, CPU model (``/proc/cpuinfo`` when present),
  number of CPUs (and those this process may use), the torch device trained on;
* ``data_fingerprints``: ``{path: {"role", "size", "mtime_ns", "blake2b"}}`` of every input file
  (:func:`celltwin.data.inputs.file_fingerprint`);
* ``precision``: the autocast precision a torch model trained in (what ``auto`` resolved to),
  ``None`` for models without torch.
"""

from __future__ import annotations

import datetime
import os
import platform
import socket
import subprocess
import sys
from collections.abc import Iterable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = [
    "PACKAGES",
    "cpu_model",
    "file_fingerprints",
    "git_revision",
    "host_info",
    "option_files",
    "package_versions",
    "run_provenance",
    "source_checkout",
    "utc_now",
]

#: distributions whose versions every run records (torch only when already imported)
PACKAGES = ("celltwin", "numpy", "scipy", "anndata", "h5py", "numba", "polars")
_GIT_TIMEOUT_S = 5.0
#: files of a directory given as an option (e.g. an SE model directory) that are fingerprinted
_MODEL_FILE_SUFFIXES = (".safetensors", ".json", ".txt", ".npz", ".npy", ".pt", ".tsv", ".csv")


def utc_now() -> str:
    """The current UTC time, ISO 8601 with seconds (``2025-01-31T12:00:00+00:00``)."""
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def package_versions() -> dict[str, str | None]:
    """Versions of :data:`PACKAGES` (``None`` when not installed), plus torch when imported."""
    from celltwin import __version__

    out: dict[str, str | None] = {p: _version(p) for p in PACKAGES}
    out["celltwin"] = __version__  # the imported source (an editable checkout may differ from the metadata)
    torch = sys.modules.get("torch")
    if torch is not None:
        out["torch"] = str(getattr(torch, "__version__", None) or _version("torch"))
    return out


def source_checkout() -> Path | None:
    """The root of the git work tree celltwin is imported from (``ROOT/src/celltwin``), else ``None``.

    An installed copy (site-packages) is never attributed to whatever repository happens to
    contain the environment: the package directory must be ``src/celltwin`` next to a ``.git``.
    """
    pkg = Path(__file__).resolve().parent
    root = pkg.parent.parent
    if pkg.name == "celltwin" and pkg.parent.name == "src" and (root / ".git").exists():
        return root
    return None


def _git(root: Path, *args: str) -> str | None:
    env = {**os.environ, "GIT_TERMINAL_PROMPT": "0", "GIT_OPTIONAL_LOCKS": "0"}
    for k in ("GIT_DIR", "GIT_WORK_TREE", "GIT_INDEX_FILE"):  # read the checkout itself, not a caller's repo
        env.pop(k, None)
    try:
        res = subprocess.run(["git", "--no-optional-locks", "-C", str(root), *args], capture_output=True,
                             text=True, timeout=_GIT_TIMEOUT_S, env=env, stdin=subprocess.DEVNULL, check=False)
    except (OSError, subprocess.SubprocessError, ValueError):
        return None
    return res.stdout if res.returncode == 0 else None


def git_revision(root: Path | None = None) -> tuple[str | None, bool | None]:
    """``(commit, dirty)`` of the celltwin source checkout (``(None, None)`` when there is none).

    ``dirty``: tracked files differ from the commit (``git status --porcelain
    --untracked-files=no``, without taking the index lock); ``None`` when it could not be read.
    """
    root = source_checkout() if root is None else root
    if root is None:
        return None, None
    head = _git(root, "rev-parse", "HEAD")
    rev = head.strip() if head else ""
    if len(rev) < 40 or any(c not in "0123456789abcdef" for c in rev):
        return None, None
    status = _git(root, "status", "--porcelain", "--untracked-files=no")
    return rev, (None if status is None else bool(status.strip()))


def cpu_model() -> str | None:
    """The CPU model name from ``/proc/cpuinfo`` (Linux), else :func:`platform.processor`, else ``None``."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "Model", "cpu model", "Processor"):
                    return value.strip() or None
    except OSError:
        pass
    return platform.processor() or None


def host_info(device: str | None = None) -> dict[str, Any]:
    """Where the run ran: hostname, platform, python, CPU model and counts, the torch device."""
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_device": device,
    }


def file_fingerprints(files: Iterable[tuple[str, str | os.PathLike[str]]]) -> dict[str, dict[str, Any]]:
    """``{absolute path: {"role", "size", "mtime_ns", "blake2b"}}`` of ``(role, path)`` pairs.

    A directory contributes its model-like files (top level only: :data:`_MODEL_FILE_SUFFIXES`);
    paths that do not exist are skipped (e.g. an in-memory AnnData has no file).
    """
    from celltwin.data.inputs import file_fingerprint
    from celltwin.errors import InputError

    out: dict[str, dict[str, Any]] = {}
    for role, path in files:
        p = Path(path)
        if p.is_dir():
            members = sorted(f for f in p.iterdir() if f.is_file() and f.suffix in _MODEL_FILE_SUFFIXES)
        elif p.is_file():
            members = [p]
        else:
            continue
        for f in members:
            key = str(f.absolute())
            if key in out:
                continue
            try:  # after training: an unreadable file is recorded as such, the run is not lost
                out[key] = {"role": role, **file_fingerprint(f)}
            except InputError as e:
                out[key] = {"role": role, "error": str(e)}
    return out


def option_files(options: Any) -> list[tuple[str, str]]:
    """``(role, path)`` of the options (a dataclass or mapping) whose string value names an existing
    file or directory (``pert_embeddings``, ``se_model``, ...)."""
    from dataclasses import asdict, is_dataclass

    items: Mapping[str, Any]
    if is_dataclass(options) and not isinstance(options, type):
        items = asdict(options)
    elif isinstance(options, Mapping):
        items = options
    else:
        return []
    out = []
    for k, v in items.items():
        if isinstance(v, str | os.PathLike) and str(v) and os.path.exists(v):
            out.append((f"option {k}", os.fspath(v)))
    return out


def run_provenance(*, started_at: str, finished_at: str | None = None, argv: list[str] | None = None,
                   device: str | None = None, precision: str | None = None,
                   files: Iterable[tuple[str, str | os.PathLike[str]]] = ()) -> dict[str, Any]:
    """The provenance fields of ``run.json`` (see the module docstring); ``files``: ``(role, path)``."""
    rev, dirty = git_revision()
    return {
        "package_versions": package_versions(),
        "git_revision": rev,
        "git_dirty": dirty,
        "argv": list(sys.argv if argv is None else argv),
        "started_at": started_at,
        "finished_at": finished_at or utc_now(),
        "host": host_info(device),
        "data_fingerprints": file_fingerprints(files),
        "precision": precision,
    }
