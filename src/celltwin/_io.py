"""Small I/O helpers shared by every writer: nothing half-written.

* :func:`atomic_path`: one file, written to a temporary sibling and renamed onto its name.
* :func:`atomic_dir`: a directory of files that appears all together or not at all;
  :func:`copy_dir` copies a directory (a model's ``save``) through it.
* :func:`read_text`: a small text input (a gene list, a list of perturbations) with one-line errors.
* :func:`clean_stale`: remove the temporary leftovers of killed runs.

The commands' check that no output overwrites an input is :func:`celltwin._output_checks.check_outputs`.

Temporary names (all next to the final path ``NAME``, in the same directory)::

    .NAME.<pid>-<8 random chars>.tmp<suffix>   atomic_path: the file being written
    .NAME.<pid>-<8 random chars>.tmpdir        atomic_dir: the directory being written (after the
                                               swap it holds the previous content, then is removed)
    .NAME.<pid>-<8 random chars>.olddir        atomic_dir without RENAME_EXCHANGE: the previous
                                               content, moved aside for the swap

Stale leftovers: every :func:`atomic_path` / :func:`atomic_dir` first removes the leftovers of
*the same* ``NAME`` (in the same directory) that are older than :data:`STALE_AFTER_S` (1 hour,
by the newest modification time inside them) *and* whose ``<pid>`` is not a live process on this
machine, or that are older than :data:`STALE_ALWAYS_S` (24 hours) whatever their pid (a pid may be
reused, or belong to another machine sharing the file system). A concurrent run writing the same
``NAME`` is therefore never disturbed: its pid is alive (same machine) or its temp was written to
within the hour (another machine). Leftovers of older celltwin versions (no pid in the name) are
removed after 24 hours.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Collection, Iterator
from pathlib import Path

__all__ = ["STALE_AFTER_S", "STALE_ALWAYS_S", "atomic_dir", "atomic_path", "clean_stale", "copy_dir", "read_text"]

STALE_AFTER_S = 3600.0  # a leftover of a dead pid untouched this long is removed
STALE_ALWAYS_S = 24 * 3600.0  # a leftover untouched this long is removed whatever its pid


def _new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0o666 minus the process umask.

    Read once at import (``os.umask`` can only be read by setting it, which is not thread-safe,
    and the writers below run in threads).
    """
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


_NEW_FILE_MODE = _new_file_mode()
_NEW_DIR_MODE = _NEW_FILE_MODE | ((_NEW_FILE_MODE & 0o444) >> 2)  # + x wherever r (0o755 for umask 022)

# .NAME.<pid>-<rand>.tmp... / .old... ; the pid part is absent in names of older versions
_TMP_RE = re.compile(r"^\.(?P<name>.+)\.(?:(?P<pid>\d+)-)?[a-z0-9_]{8}\.(?:tmp|old)")


# ---------------------------------------------------------------------------------------------
# stale leftovers


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError, ValueError):
        return True  # exists (another user's) or unknowable: keep
    return True


def _newest_mtime(path: str, limit: int = 10_000) -> float:
    """Newest mtime of ``path`` and (for a directory) of what it holds, looking at ``limit`` entries."""
    newest = os.lstat(path).st_mtime
    if not os.path.isdir(path) or os.path.islink(path):
        return newest
    seen = 0
    for root, dirs, files in os.walk(path):
        for n in dirs + files:
            seen += 1
            with contextlib.suppress(OSError):
                newest = max(newest, os.lstat(os.path.join(root, n)).st_mtime)
            if seen >= limit:
                return newest
    return newest


def clean_stale(parent: str | os.PathLike[str], name: str, now: float | None = None) -> list[str]:
    """Remove the stale temporary leftovers of ``NAME`` in ``parent`` (rules: module docstring).

    Never raises (a leftover that cannot be removed is left); returns the removed names.
    """
    now = time.time() if now is None else now
    removed: list[str] = []
    try:
        entries = list(os.scandir(parent))
    except OSError:
        return removed
    for e in entries:
        m = _TMP_RE.match(e.name)
        if m is None or m.group("name") != name:
            continue
        try:
            age = now - _newest_mtime(e.path)
        except OSError:
            continue
        pid = m.group("pid")
        dead = pid is not None and not _pid_alive(int(pid))
        if not ((dead and age > STALE_AFTER_S) or age > STALE_ALWAYS_S):
            continue
        try:
            if e.is_dir(follow_symlinks=False):
                shutil.rmtree(e.path)
            else:
                os.unlink(e.path)
            removed.append(e.name)
        except OSError:
            pass
    return removed


# ---------------------------------------------------------------------------------------------
# one file


def _mode_or(path: Path, default: int) -> int:
    """``path``'s permission bits, else ``default`` (what a new file / directory would get)."""
    try:
        return path.stat().st_mode & 0o7777
    except FileNotFoundError:
        return default


def read_text(path: str | os.PathLike[str], what: str) -> str:
    """The UTF-8 text of ``path`` (a BOM dropped); missing or unreadable: one InputError line naming ``what``."""
    from celltwin.errors import InputError

    p = Path(path)
    try:
        return p.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        msg = f"{p}: {what} not found"
        raise InputError(msg) from None
    except (OSError, UnicodeDecodeError) as e:
        msg = f"{p}: cannot read the {what} ({type(e).__name__}: {e})"
        raise InputError(msg) from None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary file lives in the same directory (same file system), so the final
    ``os.replace`` is atomic. On any exception the temporary file is removed and ``path``
    is left untouched (an existing file keeps its old content). The written file gets the
    permissions a plain ``open(path, "w")`` would give it (an existing file's mode, else
    0o666 minus the umask), not ``mkstemp``'s private 0o600. Stale temporaries of ``path`` left by
    killed runs are removed first (see the module docstring).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path.parent, path.name)
    sfx = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}-", suffix=f".tmp{sfx}", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        mode = _mode_or(path, _NEW_FILE_MODE)
        with contextlib.suppress(FileNotFoundError):  # the block may have replaced tmp_path itself
            os.chmod(tmp_path, mode)
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


# ---------------------------------------------------------------------------------------------
# a directory of files


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux ``renameat2(RENAME_EXCHANGE)``).

    False when the system or the file system does not support it (then nothing happened).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EXDEV):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _in_place(path: Path) -> bool:
    """Whether ``path`` cannot be swapped by renames: a symlink, a mount point, the current
    directory or one of its ancestors."""
    if os.path.islink(path):
        return True
    if path.is_dir() and os.path.ismount(path):
        return True
    real = os.path.realpath(path)
    cwd = os.path.realpath(os.getcwd())
    return cwd == real or cwd.startswith(real.rstrip(os.sep) + os.sep)


def _foreign(old: Path, new: Path, owned: Collection[str] | None) -> list[os.DirEntry] | None:
    """Entries of ``old`` to keep in ``new`` (not written now, not owned, not a temp leftover);
    None when one of them is not a regular file or a symlink, or there are too many to link."""
    keep = []
    for e in os.scandir(old):
        if os.path.lexists(new / e.name) or (owned is not None and e.name in owned) or _TMP_RE.match(e.name):
            continue
        if not (e.is_symlink() or e.is_file(follow_symlinks=False)):
            return None
        keep.append(e)
    return keep if len(keep) <= 1000 else None


def _carry(entries: list[os.DirEntry], new: Path) -> None:
    """Hard-link (copy when linking fails) the kept files / symlinks into ``new``."""
    for e in entries:
        dst = new / e.name
        if e.is_symlink():
            os.symlink(os.readlink(e.path), dst)
            continue
        try:
            os.link(e.path, dst)
        except OSError:
            shutil.copy2(e.path, dst)


def _commit_in_place(stage: Path, path: Path, owned: Collection[str] | None) -> None:
    """Move the staged entries into ``path`` one by one, then drop owned entries not written now."""
    written = set(os.listdir(stage))
    for name in sorted(written):
        src, dst = stage / name, path / name
        if dst.is_dir() and not dst.is_symlink() and src.is_dir():
            old = path / f".{name}.{os.getpid()}-{os.urandom(4).hex()[:8]}.olddir"
            os.rename(dst, old)
            os.rename(src, dst)
            shutil.rmtree(old, ignore_errors=True)
        elif dst.is_dir() and not dst.is_symlink():
            shutil.rmtree(dst)
            os.rename(src, dst)
        else:
            os.replace(src, dst)
    for name in owned or ():
        if name not in written and os.path.lexists(path / name):
            p = path / name
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    p.unlink()
    stage.rmdir()


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike[str], owned: Collection[str] | None = None) -> Iterator[Path]:
    """Yield an empty staging directory; on success it replaces ``path`` in one atomic swap.

    ``owned``: the top-level names this writer manages (e.g. ``results.csv``). Entries of an
    existing ``path`` that the block did not write are kept (hard-linked into the new directory)
    unless they are in ``owned`` (then they were written by an earlier run and are dropped, so
    the directory never mixes two runs' files). ``None``: every entry not written now is kept.

    Sequence (``P`` = ``path``, ``T`` = ``.NAME.<pid>-<rand>.tmpdir`` next to it):

    1. remove stale leftovers of ``NAME``; ``mkdtemp`` ``T``; the block writes into ``T``.
       A kill here: ``P`` untouched, ``T`` left (removed by a later run, see :func:`clean_stale`).
    2. ``P`` absent: ``rename(T, P)``, done (atomic: ``P`` is absent or complete).
    3. ``P`` present: hard-link its kept entries into ``T``; a kill: ``P`` untouched, ``T`` left.
    4. ``renameat2(T, P, RENAME_EXCHANGE)``: one atomic step, after which ``P`` holds the new
       content and ``T`` the old one; a kill before: old ``P``; after: new ``P`` + ``T`` left.
    5. ``rmtree(T)``; a kill during it: new ``P`` + a partial ``T`` left (removed later).

    Without RENAME_EXCHANGE (not Linux, or a file system without it) step 4 is
    ``rename(P, O)`` (``O`` = ``.NAME.<pid>-<rand>.olddir``) then ``rename(T, P)``: a kill between
    the two leaves no ``P``, the previous content in ``O`` and the complete new one in ``T``.

    In-place mode (``P`` is a symlink, a mount point, the current directory or an ancestor of it,
    the parent is not writable, or ``P`` holds kept entries other than regular files / symlinks or
    more than 1000 of them): the staging directory is made inside ``P`` and its entries are
    renamed into ``P`` one by one; each file is still atomic, the set is not (a kill mid-way
    leaves some new files next to old ones).

    On an exception in the block the staging directory is removed and ``P`` is left untouched.
    """
    path = Path(os.path.abspath(path))
    parent = path.parent
    if os.path.lexists(path) and not path.is_dir():
        raise NotADirectoryError(errno.ENOTDIR, "not a directory (expected an output directory)", str(path))
    parent.mkdir(parents=True, exist_ok=True)
    clean_stale(parent, path.name)
    in_place = _in_place(path)
    stage: Path | None = None
    if not in_place:
        try:
            prefix = f".{path.name}.{os.getpid()}-"
            stage = Path(tempfile.mkdtemp(prefix=prefix, suffix=".tmpdir", dir=parent))
        except PermissionError:
            if not path.is_dir():
                raise
            in_place = True
    if in_place:
        path.mkdir(parents=True, exist_ok=True)
        clean_stale(path, "celltwin")
        stage = Path(tempfile.mkdtemp(prefix=f".celltwin.{os.getpid()}-", suffix=".tmpdir", dir=path))
    assert stage is not None
    try:
        yield stage
        mode = _mode_or(path, _NEW_DIR_MODE)
        if in_place:
            _commit_in_place(stage, path, owned)
            return
        os.chmod(stage, mode)
        if not os.path.lexists(path):
            try:
                os.rename(stage, path)
                return
            except OSError as e:  # created meanwhile by someone else: swap with it below
                if e.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                    raise
        keep = _foreign(path, stage, owned)
        if keep is None:
            _commit_in_place(stage, path, owned)
            return
        _carry(keep, stage)
        if _exchange(stage, path):
            shutil.rmtree(stage, ignore_errors=True)
            return
        old = stage.with_name(stage.name[: -len(".tmpdir")] + ".olddir")
        os.rename(path, old)
        try:
            os.rename(stage, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.rename(old, path)
            raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)
        raise


def copy_dir(src: str | os.PathLike[str], target: str | os.PathLike[str], *, overwrite: bool = False,
             what: str = "save") -> Path:
    """Copy the directory ``src`` to ``target`` through :func:`atomic_dir`; returns ``target``.

    Nothing is done when ``target`` is ``src``. A file at ``target``, or a non-empty directory
    without ``overwrite``, is a one-line InputError starting with ``what``.
    """
    from celltwin.errors import InputError

    src, target = Path(src), Path(target)
    if target.exists() and target.resolve() == src.resolve():
        return target
    if target.exists() and not target.is_dir():
        raise InputError(f"{what}: {target} is a file; expected a directory")
    old = sorted(p.name for p in target.iterdir()) if target.is_dir() else []
    if old and not overwrite:
        raise InputError(f"{what}: {target} is not empty; pass overwrite=True to replace it")
    with atomic_dir(target, owned=old or None) as stage:
        shutil.copytree(src, stage, dirs_exist_ok=True)
    return target
