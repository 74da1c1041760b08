"""Where an arc-state artefact lives: a run directory, a checkpoint file, a Hugging Face snapshot.

No network is ever used. A Hugging Face model id (``arcinstitute/SE-600M``) is looked up in the
local hub cache only (``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``~/.cache/huggingface/hub``), as
``models--arcinstitute--SE-600M/snapshots/<revision>/``: the revision ``refs/main`` names, else
the most recently modified snapshot.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

from celltwin.errors import InputError

__all__ = ["ArcSource", "find_source", "hf_cache_dirs", "resolve_path"]

_CKPT_SUFFIXES = (".ckpt", ".pt", ".pth")
_ST_FILES = ("var_dims.pkl", "pert_onehot_map.pt")
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hf_cache_dirs() -> list[Path]:
    """The local Hugging Face hub caches, in lookup order (existing or not)."""
    out = []
    if os.environ.get("HF_HUB_CACHE"):
        out.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        out.append(Path(os.environ["HF_HOME"]) / "hub")
    out.append(Path(os.path.expanduser("~/.cache/huggingface/hub")))
    return out


def _snapshot(repo_dir: Path) -> Path:
    """The snapshot directory of a ``models--owner--name`` cache folder."""
    snaps = repo_dir / "snapshots"
    ref = repo_dir / "refs" / "main"
    if ref.is_file():
        rev = ref.read_text().strip()
        if (snaps / rev).is_dir():
            return snaps / rev
    found = sorted((p for p in snaps.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime) if snaps.is_dir() else []
    if not found:
        raise InputError(f"{repo_dir}: a Hugging Face cache folder without snapshots (expected snapshots/<revision>/)")
    return found[-1]


def resolve_path(src: str | os.PathLike[str]) -> Path:
    """A local path for ``src``: the path itself, a cache folder's snapshot, or a model id's snapshot."""
    p = Path(src)
    if p.exists():
        if p.is_dir() and p.name.startswith("models--") and (p / "snapshots").is_dir():
            return _snapshot(p)
        return p
    s = str(src)
    if _HF_ID.match(s):
        name = "models--" + s.replace("/", "--")
        for cache in hf_cache_dirs():
            if (cache / name).is_dir():
                return _snapshot(cache / name)
        where = ", ".join(str(c) for c in hf_cache_dirs())
        msg = (f"{s}: not a local path and not in the Hugging Face cache ({where}); celltwin does not download: "
               f"fetch it where there is network (`huggingface-cli download {s}`) and pass the directory")
        raise InputError(msg)
    raise InputError(f"{s}: no such file or directory")


@dataclass(frozen=True)
class ArcSource:
    """An arc-state artefact found on disk: ``kind`` "st" (a run directory) or "se" (an SE checkpoint)."""

    kind: str
    path: Path  # the ST run directory, or the SE checkpoint file
    checkpoint: Path


def _pick_checkpoint(run: Path, checkpoint: str | os.PathLike[str] | None) -> Path:
    if checkpoint is not None:
        c = Path(checkpoint)
        c = c if c.is_absolute() or c.exists() else run / c
        if not c.is_file():
            raise InputError(f"--checkpoint {checkpoint}: file not found")
        return c
    ck = run / "checkpoints"
    for name in ("final.ckpt", "last.ckpt", "best.ckpt"):  # tx infer's default first
        if (ck / name).is_file():
            return ck / name
    found = sorted(ck.glob("*.ckpt")) if ck.is_dir() else []
    if len(found) == 1:
        return found[0]
    msg = (f"{run}: no checkpoints/final.ckpt, last.ckpt or best.ckpt"
           + (f"; several others ({', '.join(p.name for p in found[:5])}): pick one with --checkpoint" if found else ""))
    raise InputError(msg)


def _epoch(p: Path) -> tuple[int, str]:
    nums = re.findall(r"\d+", p.stem)
    return (int(nums[-1]) if nums else -1, p.name)


def find_source(src: str | os.PathLike[str], checkpoint: str | os.PathLike[str] | None = None) -> ArcSource:
    """Classify ``src`` (path, HF cache folder or model id) as an ST run directory or an SE checkpoint.

    A directory holding ``var_dims.pkl`` and ``pert_onehot_map.pt`` is an ST run (arc-state's
    ``tx train`` output); a directory with several such runs below it (a published ST repository
    has one per cell line) must be narrowed to one, and the error lists them. Otherwise a
    checkpoint file, or the checkpoint of a directory (``--checkpoint``, or the single / the
    highest-numbered ``*.ckpt``), is an SE checkpoint.
    """
    p = resolve_path(src)
    if p.is_file():
        if p.suffix not in _CKPT_SUFFIXES:
            raise InputError(f"{p}: expected an arc-state run directory or an SE checkpoint (.ckpt / .pt), "
                             f"got a {p.suffix or 'suffix-less'} file")
        return ArcSource("se", p, p)
    if all((p / f).is_file() for f in _ST_FILES):
        return ArcSource("st", p, _pick_checkpoint(p, checkpoint))
    runs = sorted({f.parent for f in p.rglob("var_dims.pkl") if (f.parent / "pert_onehot_map.pt").is_file()})
    if len(runs) == 1:
        return ArcSource("st", runs[0], _pick_checkpoint(runs[0], checkpoint))
    if len(runs) > 1:
        shown = "\n  ".join(str(r) for r in runs[:20])
        raise InputError(f"{p}: holds {len(runs)} arc-state ST runs; pass one of them:\n  {shown}")
    if checkpoint is not None:
        c = Path(checkpoint) if Path(checkpoint).exists() else p / checkpoint
        if not c.is_file():
            raise InputError(f"--checkpoint {checkpoint}: file not found")
        return ArcSource("se", c, c)
    ckpts = sorted((f for f in p.iterdir() if f.is_file() and f.suffix in _CKPT_SUFFIXES
                    and "protein_embeddings" not in f.name), key=_epoch)
    if not ckpts:
        raise InputError(f"{p}: neither an arc-state ST run (var_dims.pkl, pert_onehot_map.pt) nor a folder with an "
                         "SE checkpoint (*.ckpt / *.pt)")
    return ArcSource("se", ckpts[-1], ckpts[-1])
