"""Argument helpers shared by the train / predict / demo commands (stdlib only)."""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = [
    "add_column_arguments",
    "column_overrides",
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


#: the ObsColumns fields set by :func:`add_column_arguments` (``args`` attribute names)
_COLUMN_FLAGS = ("pert_col", "control_label", "context_col", "batch_col")


def add_column_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "data columns",
        "Each name not given here comes from the split's [columns] table (written by `celltwin split`), "
        "then (predict) the run's, else target_gene / non-targeting / context / batch; a flag given here "
        "wins over the split file. The default context (batch) column is optional: a file without it is "
        "one context (batch) named 'all'.",
    )
    g.add_argument("--pert-col", default=None, help="obs column with the perturbation label")
    g.add_argument("--control-pert", "--control-label", dest="control_label", default=None,
                   help="label of control cells in the perturbation column (--control-label is an alias)")
    g.add_argument("--context-col", default=None,
                   help="obs column with the context (cell line / condition); default context")
    g.add_argument("--batch-col", default=None, help="obs column with the batch")


def columns_from_args(args: argparse.Namespace):
    """An ObsColumns from the flags, or None when no flag was given (then the split's / run's apply)."""
    given = column_overrides(args)
    if given is None:
        return None
    from celltwin.data.columns import ObsColumns

    return ObsColumns(**given)


def column_overrides(args: argparse.Namespace) -> dict[str, str] | None:
    """The column names given on the command line, by ObsColumns field (None when none was given).

    Unlike :func:`columns_from_args`, fields not given stay unset, so the split's ``[columns]`` and
    the run's names fill them (:func:`celltwin.data.columns.merge_columns`).
    """
    given = {k: getattr(args, k) for k in _COLUMN_FLAGS if getattr(args, k, None) is not None}
    return given or None


def parse_sets(items: list[str] | None, model: str | None = None, extra: dict[str, str] | None = None):
    """``--set KEY=VALUE`` items (a later key wins).

    Without ``model``: the ``{key: value}`` strings. With ``model``: that model's typed options
    (its dataclass in :mod:`celltwin.registry`: values converted by the field types, the model's
    own defaults applied, ``extra`` (options set by other flags) on top; an unknown key is a
    one-line ConfigError listing the valid ones).
    """
    from celltwin.errors import ConfigError

    out: dict[str, str] = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            msg = f"--set expected KEY=VALUE, got {item!r}"
            raise ConfigError(msg)
        out[key.strip()] = value.strip()
    if model is None:
        return out
    from celltwin.registry import get_spec

    spec = get_spec(model)
    try:
        spec.options_class().check_keys(out)
    except ConfigError as e:
        raise ConfigError(f"--set (model {model}): {e}") from None
    return spec.parse_options({**out, **(extra or {})})
