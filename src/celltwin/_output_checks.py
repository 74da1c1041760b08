"""Output path checks of the commands: refuse, before any work, outputs that would destroy an input.

:func:`check_outputs` is called by every ``celltwin`` command (and :mod:`celltwin.pipeline`) with
its output and input flags; it reads the file system only (nothing is created). The writers
themselves are in :mod:`celltwin._io`.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Mapping
from pathlib import Path

__all__ = ["check_outputs"]

PathArg = str | os.PathLike[str] | None


def _real(p: str | os.PathLike[str]) -> str:
    return os.path.realpath(os.path.abspath(os.path.expanduser(os.fspath(p))))


def _same(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> bool:
    """Same file: equal resolved paths, or both exist and share (st_dev, st_ino) (hard links too)."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def _inside(child: str | os.PathLike[str], parent: str | os.PathLike[str]) -> bool:
    c, p = _real(child), _real(parent)
    return c.startswith(p.rstrip(os.sep) + os.sep)


def check_outputs(
    outputs: Mapping[str, PathArg],
    inputs: Mapping[str, PathArg] | None = None,
    *,
    dirs: Collection[str] = (),
) -> None:
    """Refuse output paths that would destroy an input or cannot be written; call before any work.

    ``outputs`` / ``inputs``: flag (as the user knows it, e.g. ``"-o/--output"``) -> path; ``None``
    paths (flag not given) are skipped. ``dirs``: the output flags naming a directory; every other
    output is a file. Raises :class:`celltwin.errors.InputError` (CLI exit code 2) when

    * an output is the same file as an input (same resolved path, or both exist and
      ``os.path.samefile``: symlinks and hard links included);
    * two outputs are the same path, or a file output lies inside a directory output;
    * a file output is an existing directory, or a directory output an existing non-directory;
    * the nearest existing ancestor of an output is not a directory (``file.txt/out.csv``) or is
      not writable (an existing output directory must itself be writable).
    """
    from celltwin.errors import InputError

    outs = [(f, os.fspath(p)) for f, p in outputs.items() if p is not None]
    ins = [(f, os.fspath(p)) for f, p in (inputs or {}).items() if p is not None]
    for flag, out in outs:
        for iflag, inp in ins:
            if _same(out, inp):
                msg = (
                    f"{flag} {out} is the same file as {iflag} {inp}; writing it would destroy the "
                    f"input (choose another output path)"
                )
                raise InputError(msg)
    for i, (flag, out) in enumerate(outs):
        for flag2, out2 in outs[i + 1 :]:
            if _same(out, out2):
                msg = f"{flag} and {flag2} are the same path ({out}); give them different paths"
                raise InputError(msg)
            for (fa, a), (fb, b) in (((flag, out), (flag2, out2)), ((flag2, out2), (flag, out))):
                if fa in dirs and fb not in dirs and _inside(b, a):
                    msg = f"{fb} {b} lies inside the output directory {fa} {a}; write it elsewhere"
                    raise InputError(msg)
    for flag, out in outs:
        p = Path(os.path.expanduser(out))
        is_dir_out = flag in dirs
        if p.exists():
            if is_dir_out and not p.is_dir():
                msg = f"{flag} {out}: is an existing file; expected an output directory"
                raise InputError(msg)
            if not is_dir_out and p.is_dir():
                msg = f"{flag} {out}: is an existing directory; expected an output file path"
                raise InputError(msg)
        probe = p if (is_dir_out and p.is_dir()) else p.parent
        anc = Path(os.path.abspath(probe))
        while not os.path.lexists(anc) and anc != anc.parent:
            anc = anc.parent
        if not anc.is_dir():
            msg = f"{flag} {out}: {anc} is not a directory, so nothing can be written under it"
            raise InputError(msg)
        if not os.access(anc, os.W_OK | os.X_OK):
            msg = f"{flag} {out}: directory {anc} is not writable"
            raise InputError(msg)
