"""Lazy package exports (PEP 562): a package lists ``name -> module`` and each name loads on first use.

Used by the packages whose ``import`` must stay cheap (``celltwin.eval`` never imports torch,
``celltwin.models`` / ``celltwin.baselines`` import it only when a model is used)::

    from celltwin._lazy import lazy_exports

    _LAZY = {"evaluate": "celltwin.eval._evaluate", ...}
    __getattr__, __dir__ = lazy_exports(__name__, _LAZY)

Standard library only.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(
    module_name: str, table: Mapping[str, str], *, cache: bool = False
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The module-level ``(__getattr__, __dir__)`` of the module ``module_name``.

    ``__getattr__(name)``: for a ``name`` of ``table``, ``getattr(import_module(table[name]), name)``
    (with ``cache``, also stored on the module so later lookups skip ``__getattr__``); any other
    name raises ``AttributeError("module '<module_name>' has no attribute '<name>'")``.
    ``__dir__()``: the module's own names and the names of ``table``, sorted.
    """

    def __getattr__(name: str) -> Any:
        if name not in table:
            msg = f"module {module_name!r} has no attribute {name!r}"
            raise AttributeError(msg)
        value = getattr(importlib.import_module(table[name]), name)
        if cache:
            setattr(sys.modules[module_name], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[module_name])) | set(table))

    return __getattr__, __dir__
