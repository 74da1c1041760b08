"""The ``celltwin`` command line.

Each subcommand lives in ``celltwin.commands.<name>`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Command modules import only the standard
library at top level; heavy imports (numpy, anndata, torch) happen inside ``run``, so
``celltwin eval --help`` is instant and never imports torch.

Exit codes and what reaches stderr:

* 0: success.
* 2: a failure the user can cause or fix, as ONE line ``celltwin CMD: error: ...``: a
  :class:`~celltwin.errors.CelltwinError` (bad input, bad configuration, output path that would
  destroy an input), a full disk / quota / file size limit (``ENOSPC`` / ``EDQUOT`` / ``EFBIG``, also
  when wrapped by h5py and friends), a path that cannot be read or written (permission denied,
  is / is not a directory, not found, read-only file system), and argparse's usage errors.
* 1: anything else (a bug): one line ``celltwin CMD: internal error: Type: message (full
  traceback saved to FILE; rerun with --debug to see it)``; the traceback goes to
  ``$XDG_CACHE_HOME/celltwin/crash-YYYYmmdd-HHMMSS-PID.txt`` (default ``~/.cache/celltwin``; the
  temp directory when that is not writable).
* 130: interrupted (Ctrl-C); 141: stdout closed early (``celltwin ... | head``).

Global flags (before or after the command name): ``--debug`` prints the full traceback of any
failure. ``-q/--quiet`` / ``-v/--verbose`` set the level of celltwin's own loggers (``celltwin.*``,
through :mod:`logging`, on stderr): WARNING with ``-q``, INFO by default, DEBUG with ``-v``;
other libraries' loggers show errors with ``-q``, else warnings (info with ``-v``). ``-q`` also
turns progress off: the command's ``--no-progress`` is set, and the training loop shows no
progress while the ``celltwin`` logger is above INFO (:func:`celltwin.train.progress.progress_wanted`).
Results printed on stdout (scores, summaries) are not logging and stay.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import os
import re
import sys
from collections.abc import Sequence

from celltwin import __version__
from celltwin.errors import CelltwinError

__all__ = ["COMMANDS", "build_parser", "main"]

# Subcommand name -> module under celltwin.commands. Order is the order shown in --help.
COMMANDS: dict[str, str] = {
    "demo": "demo",
    "sim": "sim",
    "eval": "eval",
    "score": "score",
    "baseline": "baseline",
    "prep": "prep",
    "split": "split",
    "train": "train",
    "predict": "predict",
    "embed": "embed",
    "genes": "genes",
    "import-state": "import_state",
}

_DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DISK_FULL_TEXT = ("no space left", "disk quota exceeded", "file too large", "quota exceeded")
# OSErrors about a path the user gave: exit 2 with one line
_PATH_ERRNOS = {
    errno.EACCES,
    errno.EPERM,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.ENOENT,
    errno.EROFS,
    errno.ENAMETOOLONG,
    errno.ELOOP,
    errno.EEXIST,
}
_TMP_PART = re.compile(r"^\.(.+)\.(?:\d+-)?[a-z0-9_]{8}\.(?:tmp|old)[^/]*$")


def _load(name: str):
    return importlib.import_module(f"celltwin.commands.{COMMANDS[name]}")


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line too: ``celltwin CMD: error: ... (see ... --help)``."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {_one_line(message)} (see '{self.prog} --help')\n")

    def parse_args(self, args=None, namespace=None):
        """As argparse, but unrecognized arguments are reported by the command's parser (its name shown)."""
        ns, extra = self.parse_known_args(args, namespace)
        if extra:
            subs = [a for a in self._actions if isinstance(a, argparse._SubParsersAction)]
            sub = subs[0].choices.get(getattr(ns, "command", None)) if subs else None
            (sub or self).error(f"unrecognized arguments: {' '.join(extra)}")
        return ns


def _add_global_flags(p: argparse.ArgumentParser, top: bool = False) -> None:
    """--debug / -q / -v; on subparsers with SUPPRESS defaults, so they do not undo the top level's."""
    kw = {} if top else {"default": argparse.SUPPRESS}
    g = p.add_argument_group("global options")
    g.add_argument("--debug", action="store_true", help="show the full traceback of any failure", **kw)
    v = g.add_mutually_exclusive_group()
    v.add_argument("-q", "--quiet", action="store_true", help="log errors only", **kw)
    v.add_argument("-v", "--verbose", action="store_true", help="log debug messages", **kw)


def _add_global_flags_deep(p: argparse.ArgumentParser) -> None:
    taken = set(p._option_string_actions)
    if not taken & {"--debug", "-q", "--quiet", "-v", "--verbose"}:
        _add_global_flags(p)
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in set(action.choices.values()):
                _add_global_flags_deep(sub)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="celltwin",
        description="Virtual cells for Perturb-seq: simulate, evaluate (VCC metrics), train and predict.",
    )
    parser.add_argument("--version", action="version", version=f"celltwin {__version__}")
    _add_global_flags(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        mod = _load(name)
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        _add_global_flags_deep(p)
        p.set_defaults(_run=mod.run)
    return parser


# ---------------------------------------------------------------------------------------------
# failures -> one line


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes / contexts (each once, at most 20)."""
    out: list[BaseException] = []
    todo = [exc]
    while todo and len(out) < 20:
        e = todo.pop(0)
        if e is None or any(e is o for o in out):
            continue
        out.append(e)
        todo += [e.__cause__, e.__context__]
    return out


def _display_path(path: str) -> str:
    """``path`` with the temporary names of atomic writes mapped back to the final names."""
    parts = path.split(os.sep)
    return os.sep.join(m.group(1) if (m := _TMP_PART.match(p)) else p for p in parts)


def _path_in_text(text: str) -> str | None:
    m = re.search(r"(?:file)?name = '([^']+)'", text) or re.search(r'(?:file)?name = "([^"]+)"', text)
    return m.group(1) if m else None


def _output_of(args: argparse.Namespace) -> str | None:
    for key in ("outdir", "output", "output_path", "output_de_path"):
        v = getattr(args, key, None)
        if isinstance(v, str):
            return v
    return None


def _disk_full(exc: BaseException, args: argparse.Namespace) -> str | None:
    """The path being written when a full disk / quota / file size limit caused ``exc``, else None."""
    for e in _chain(exc):
        text = str(e)
        hit = isinstance(e, OSError) and e.errno in _DISK_FULL
        hit = hit or any(t in text.lower() for t in _DISK_FULL_TEXT)
        m = re.search(r"errno = (\d+)|os error (\d+)", text)
        hit = hit or (m is not None and int(m.group(1) or m.group(2)) in _DISK_FULL)
        if hit:
            path = getattr(e, "filename", None) if isinstance(e, OSError) else None
            path = path or _path_in_text(text) or _output_of(args) or "the output"
            return _display_path(os.fspath(path))
    return None


def _path_error(exc: BaseException) -> str | None:
    """One-line text of an OSError about a path (permission, is/is not a directory, ...), else None."""
    for e in _chain(exc):
        if not isinstance(e, OSError):
            continue
        known = isinstance(e, (PermissionError, IsADirectoryError, NotADirectoryError))
        if not (known or e.errno in _PATH_ERRNOS):
            continue
        name = e.filename or _path_in_text(str(e))
        if name is None and not known:
            continue
        reason = e.strerror or str(e)
        if name is None:
            return reason
        where = _display_path(os.fspath(name))
        if e.filename2:
            where += f" -> {_display_path(os.fspath(e.filename2))}"
        return f"{where}: {reason}"
    return None


def _crash_file(cmd: str, argv: Sequence[str] | None, text: str) -> str | None:
    """Write the traceback to a crash file; its path, or None when nothing could be written."""
    import datetime
    import platform
    import tempfile

    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"crash-{stamp}-{os.getpid()}.txt"
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    header = (
        f"celltwin {__version__} {cmd}\nargv: {list(sys.argv if argv is None else argv)!r}\n"
        f"python {platform.python_version()} on {platform.platform()}\ncwd: {os.getcwd()}\n\n"
    )
    for folder in (os.path.join(cache, "celltwin"), os.path.join(tempfile.gettempdir(), "celltwin")):
        try:
            os.makedirs(folder, exist_ok=True)
            path = os.path.join(folder, name)
            with open(path, "w", encoding="utf-8") as f:
                f.write(header + text)
            return path
        except OSError:
            continue
    return None


def _one_line(text: str) -> str:
    """``text`` on one line (line breaks and the blanks around them become one space)."""
    return re.sub(r"\s*[\r\n]+\s*", " ", str(text).strip()) or "(no message)"


def _setup_logging(args: argparse.Namespace):
    """Levels of -q / default / -v (see the module docstring); returns a function undoing it all.

    The undo matters when ``main`` is called in-process (tests, notebooks): a ``-q`` call must not
    leave the ``celltwin`` logger at WARNING (which would hide later training progress).
    """
    quiet, verbose = bool(getattr(args, "quiet", False)), bool(getattr(args, "verbose", False))
    own = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    others = logging.ERROR if quiet else (logging.INFO if verbose else logging.WARNING)
    root, lg = logging.getLogger(), logging.getLogger("celltwin")
    saved = (root.level, lg.level)
    handler = None
    if not root.handlers:  # as logging.basicConfig: leave a host application's handlers alone
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("celltwin: %(levelname)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(others)
    lg.setLevel(own)
    if quiet and hasattr(args, "no_progress"):
        args.no_progress = True  # eval, embed, sim, genes: no progress bars under -q

    def restore() -> None:
        root.setLevel(saved[0])
        lg.setLevel(saved[1])
        if handler is not None:
            root.removeHandler(handler)

    return restore


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    restore_logging = _setup_logging(args)
    # "embed fit", "genes coverage": the words argparse's own errors use too
    subs = [v for k, v in sorted(vars(args).items()) if k.endswith("_command") and isinstance(v, str)]
    cmd = " ".join([args.command, *subs])
    debug = bool(getattr(args, "debug", False))
    try:
        return _run_command(args, cmd, argv, debug)
    finally:
        restore_logging()


def _run_command(args: argparse.Namespace, cmd: str, argv: Sequence[str] | None, debug: bool) -> int:
    """Run the parsed command; every failure becomes one line and an exit code (module docstring)."""
    try:
        return int(args._run(args) or 0)
    except KeyboardInterrupt:
        print(f"celltwin {cmd}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader of stdout went away (celltwin ... | head): quiet, like other Unix tools
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141
    except Exception as e:  # noqa: BLE001 -- every failure becomes one line (see the module docstring)
        import traceback

        if debug:
            traceback.print_exc()
        if isinstance(e, CelltwinError):
            print(f"celltwin {cmd}: error: {_one_line(str(e))}", file=sys.stderr)
            return e.exit_code
        full = _disk_full(e, args)
        if full is not None:
            print(f"celltwin {cmd}: error: disk full / file size limit while writing {full}", file=sys.stderr)
            return 2
        path = _path_error(e)
        if path is not None:
            print(f"celltwin {cmd}: error: {_one_line(path)}", file=sys.stderr)
            return 2
        saved = _crash_file(cmd, argv, traceback.format_exc())
        where = f"full traceback saved to {saved}" if saved else "the traceback could not be saved"
        hint = "rerun with --debug to see it" if not debug else "shown above"
        print(
            f"celltwin {cmd}: internal error: {type(e).__name__}: {_one_line(str(e))} ({where}; {hint})",
            file=sys.stderr,
        )
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
