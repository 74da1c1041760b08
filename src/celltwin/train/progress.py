"""Training progress: a rich bar on a terminal, plain lines in a log file (rank 0 only)."""

from __future__ import annotations

import logging
import math
import sys
import time
from typing import Any

__all__ = ["TrainProgress", "plain_progress_every", "progress_wanted"]


def progress_wanted() -> bool:
    """False when the ``celltwin`` logger's level was set above INFO (``celltwin -q``, or
    ``logging.getLogger("celltwin").setLevel(logging.WARNING)``): :func:`fit` then shows no progress
    even with ``TrainConfig.progress``. An unset level (a plain library call) keeps the progress."""
    level = logging.getLogger("celltwin").level
    return level == logging.NOTSET or level <= logging.INFO


def plain_progress_every(max_steps: int, log_every: int, max_lines: int = 100) -> int:
    """Steps between plain progress lines: a multiple of ``log_every`` (fresh loss), <= ~``max_lines`` lines."""
    base = max(1, log_every)
    return base * max(1, math.ceil(max_steps / (max_lines * base)))


class TrainProgress:
    """Training progress on rank 0 (see the module docstring): ``update(step, loss)``, ``close()``.

    On a terminal (``stream.isatty()``) a rich bar on that stream; otherwise one plain line per
    ``every`` steps and at the last step: ``step 100/500 loss 0.1234 12.3 it/s`` (``loss``: the
    mean over the last log window, left out before the first one; ``it/s``: optimiser steps per
    second since the previous line). ``stream`` defaults to ``sys.stderr`` at creation.
    """

    def __init__(self, total: int, start: int = 0, log_every: int = 10, *, stream: Any = None,
                 every: int | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.total = int(total)
        self.every = every if every is not None else plain_progress_every(self.total, log_every)
        isatty = getattr(self.stream, "isatty", None)
        self.tty = bool(isatty()) if callable(isatty) else False
        self._last_step, self._last_t = int(start), time.perf_counter()
        self._bar = None
        if self.tty:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                                 console=Console(file=self.stream))
            self._task = self._bar.add_task("train", total=self.total, completed=start, info="")
            self._bar.start()

    def line(self, step: int, loss: float | None, rate: float) -> str:
        """The plain progress line of ``step``."""
        part = f" loss {loss:.4g}" if loss is not None else ""
        return f"step {step}/{self.total}{part} {rate:.1f} it/s"

    def update(self, step: int, loss: float | None = None) -> None:
        if self._bar is not None:
            info = f"loss {loss:.4g}" if loss is not None else ""
            self._bar.update(self._task, completed=step, info=info)
            return
        if step % self.every != 0 and step != self.total:
            return
        now = time.perf_counter()
        dt = now - self._last_t
        rate = (step - self._last_step) / dt if dt > 0 else 0.0
        self._last_step, self._last_t = step, now
        print(self.line(step, loss, rate), file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
