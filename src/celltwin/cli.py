"""The ``celltwin`` command line.

Each subcommand lives in ``celltwin.commands.<name>`` and defines ``HELP`` (one line),
``add_arguments(parser)`` and ``run(args) -> int``. Command modules import only the standard
library at top level; heavy imports (numpy, anndata, torch) happen inside ``run``, so
``celltwin eval --help`` is instant and never imports torch.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from celltwin import __version__
from celltwin.errors import CelltwinError

__all__ = ["main", "build_parser", "COMMANDS"]

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
}


def _load(name: str):
    return importlib.import_module(f"celltwin.commands.{COMMANDS[name]}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="celltwin",
        description="Virtual cells for Perturb-seq: simulate, evaluate (VCC metrics), train and predict.",
    )
    parser.add_argument("--version", action="version", version=f"celltwin {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            mod = _load(name)
        except ModuleNotFoundError as e:  # a command whose module is not present yet
            if e.name == f"celltwin.commands.{COMMANDS[name]}":
                continue
            raise
        p = sub.add_parser(name, help=mod.HELP, description=getattr(mod, "DESCRIPTION", mod.HELP),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help()
        return 0
    try:
        return int(args._run(args) or 0)
    except CelltwinError as e:
        print(f"celltwin {args.command}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"celltwin {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
