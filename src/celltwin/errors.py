"""Error types. Any :class:`CelltwinError` reaching the CLI becomes one line on stderr and exit code 2."""

from __future__ import annotations

__all__ = ["CelltwinError", "ConfigError", "InputError"]


class CelltwinError(Exception):
    """Base class of errors celltwin reports to the user as a single line (CLI exit code 2)."""

    exit_code = 2


class InputError(CelltwinError, ValueError):
    """Bad input data. Message names the file, the field, the expected and the actual value."""


class ConfigError(CelltwinError, ValueError):
    """Invalid configuration (a dataclass config, CLI flags, a split file)."""
