"""Argument helpers shared by the train / predict / demo commands (stdlib only)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = [
    "add_column_arguments",
    "columns_from_args",
    "non_negative_int",
    "parse_sets",
    "positive_float",
    "positive_int",
    "progress_callback",
]


def _int(text: str, low: int, what: str) -> int:
    try:
        v = int(text)
    except ValueError:
        msg = f"expected {what}, got {text!r}"
        raise argparse.ArgumentTypeError(msg) from None
    if v < low:
        msg = f"expected {what}, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return v


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    return _int(text, 1, "a positive integer (>= 1)")


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    return _int(text, 0, "a non-negative integer (>= 0)")


def positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    import math

    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0):
        msg = f"expected a finite number > 0, got {text!r}"
        raise argparse.ArgumentTypeError(msg)
    return v


@contextmanager
def progress_callback(label: str, unit: str = "", enabled: bool = True) -> Iterator[Callable[[int, int], None] | None]:
    """A transient rich progress bar driven by the yielded ``callback(done, total)``; ``None`` when disabled."""
    if not enabled:
        yield None
        return
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    count = "{task.completed}/{task.total}" + (f" {unit}" if unit else "")
    with Progress(TextColumn(label), BarColumn(), TextColumn(count), TimeRemainingColumn(), transient=True) as prog:
        task = prog.add_task(label, total=None)
        yield lambda done, total: prog.update(task, completed=done, total=total)


def add_column_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data columns (default: the split file's, else target_gene / non-targeting / context)")
    g.add_argument("--pert-col", default=None, help="obs column with the perturbation label")
    g.add_argument("--control-label", default=None, help="label of control cells in the perturbation column")
    g.add_argument("--context-col", default=None, help="obs column with the context (cell line / condition)")
    g.add_argument("--batch-col", default=None, help="obs column with the batch")


def columns_from_args(args: argparse.Namespace):
    """An ObsColumns from the flags, or None when no flag was given (then the split's / run's apply)."""
    names = ("pert_col", "control_label", "context_col", "batch_col")
    given = {k: getattr(args, k) for k in names if getattr(args, k, None) is not None}
    if not given:
        return None
    from celltwin.data.columns import ObsColumns

    return ObsColumns(**given)


def parse_sets(items: list[str] | None) -> dict[str, str]:
    from celltwin.errors import ConfigError

    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            msg = f"--set expected KEY=VALUE, got {item!r}"
            raise ConfigError(msg)
        out[key.strip()] = value.strip()
    return out
