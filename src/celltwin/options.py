"""Typed model options: one dataclass per model family holds every option's name, type, default and help.

The same dataclass serves the three ways options reach a model:

* Python: ``Model.train(steps=200, lr=1e-3)`` -> :meth:`Options.create` (unknown keys refused; values
  must already have the field's type: ``int``, ``float`` (an ``int`` is accepted), ``bool``, ``str``);
* the command line: ``celltwin train --set steps=200`` -> :meth:`Options.from_strings` (each string
  converted by the field's type);
* ``celltwin train --help``: :meth:`Options.help_lines` (generated, never a hand-written list).

Subclasses are ``@dataclass`` classes deriving from :class:`Options` whose fields are declared with
:func:`option` (default + one-line help) and whose checks live in :meth:`Options.validate` (called by
``__post_init__`` after the type checks). Standard library only: the CLI imports this to build its
help without numpy or torch.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any, ClassVar

from celltwin.errors import ConfigError

__all__ = ["Options", "option", "parse_bool"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_TYPES = (bool, int, float, str)


def option(default: Any, help: str) -> Any:
    """A dataclass field with its default and its one-line help text (shown by ``celltwin train --help``)."""
    return dataclasses.field(default=default, metadata={"help": help})


def parse_bool(text: str) -> bool:
    """``1/true/yes/on`` -> True, ``0/false/no/off`` -> False (any case); ValueError otherwise."""
    low = str(text).strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ValueError(text)


def _field_types(cls: type) -> dict[str, type]:
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if t not in _TYPES:  # pragma: no cover - a programming error in an options class
            raise TypeError(f"{cls.__name__}.{f.name}: option fields must be bool, int, float or str, got {t}")
        out[f.name] = t
    return out


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value == "":
        return '""'
    return str(value)


class Options:
    """Base of the typed option dataclasses (see the module docstring)."""

    #: how messages name these options, e.g. ``"state option"`` -> ``"state option steps: ..."``
    what: ClassVar[str] = "option"

    def __post_init__(self) -> None:
        for name, t in _field_types(type(self)).items():
            v = getattr(self, name)
            if t is float and isinstance(v, int) and not isinstance(v, bool):
                setattr(self, name, float(v))
                continue
            if not isinstance(v, t) or (t is int and isinstance(v, bool)):
                raise ConfigError(f"{self.what} {name}: expected {t.__name__}, got {v!r} ({type(v).__name__})")
        self.validate()

    def validate(self) -> None:
        """Value checks of the subclass (ConfigError naming the option); called after the type checks."""

    # ------------------------------------------------------------------ construction
    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]

    @classmethod
    def check_keys(cls, keys) -> None:
        bad = [k for k in keys if k not in set(cls.names())]
        if bad:
            s = "s" if len(bad) > 1 else ""
            raise ConfigError(f"{cls.what}: unknown option{s} {', '.join(map(repr, bad))}; "
                              f"valid options: {', '.join(cls.names())}")

    @classmethod
    def create(cls, values: Mapping[str, Any] | None = None, **kwargs: Any):
        """Typed construction (Python API): unknown keys and values of the wrong type raise ConfigError."""
        kw = {**(values or {}), **kwargs}
        cls.check_keys(kw)
        return cls(**kw)

    @classmethod
    def from_strings(cls, values: Mapping[str, Any] | None = None):
        """From ``--set`` strings: each ``str`` value is converted by its field's type (bool: true/false/1/0/yes/no).

        Non-string values are taken as they are (and type-checked), so a mapping may mix both.
        """
        values = dict(values or {})
        cls.check_keys(values)
        types = _field_types(cls)
        kw: dict[str, Any] = {}
        for k, v in values.items():
            t = types[k]
            if not isinstance(v, str) or t is str:
                kw[k] = v
                continue
            try:
                kw[k] = parse_bool(v) if t is bool else t(v.strip())
            except ValueError:
                raise ConfigError(f"{cls.what} {k}: expected {t.__name__}, got {v!r}") from None
        return cls(**kw)

    # ------------------------------------------------------------------ views
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)  # type: ignore[call-overload]

    def changes(self) -> dict[str, Any]:
        """The options that differ from the class defaults (what run.json records as ``options``)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)  # type: ignore[arg-type]
                if getattr(self, f.name) != f.default}

    @classmethod
    def help_lines(cls, defaults: Mapping[str, Any] | None = None, width: int = 24) -> list[str]:
        """``name=DEFAULT  help`` per option, in declaration order (``defaults`` overrides the shown default)."""
        lines = []
        for f in dataclasses.fields(cls):  # type: ignore[arg-type]
            d = (defaults or {}).get(f.name, f.default)
            key = f"{f.name}={_show(d)}"
            text = f.metadata.get("help", "")
            lines.append(f"  {key:<{width}} {text}" if len(key) < width else f"  {key}\n  {'':<{width}} {text}")
        return lines
