"""Metric logging: a long-format CSV (``step,split,name,value``) plus optional TensorBoard.

Long format keeps the CSV valid when new metric names appear mid-run (e.g. validation
metrics). On resume, rows with a step greater than the resumed step are dropped first, so
a killed-and-resumed run has the same CSV as an uninterrupted one (modulo timing metrics).
"""

from __future__ import annotations

import csv
from pathlib import Path

__all__ = ["MetricsLogger"]


class MetricsLogger:
    """Append metrics to ``out_dir/metrics.csv`` and (if available) TensorBoard ``out_dir/tb``."""

    def __init__(self, out_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True) -> None:
        self.path = Path(out_dir) / "metrics.csv"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is not None and self.path.exists():
            with self.path.open(newline="") as f:
                rows = list(csv.reader(f))
            keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= resume_step] if rows else []
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerows(keep)
        elif self.path.exists():
            self.path.unlink()
        new = not self.path.exists()
        self._f = self.path.open("a", newline="")
        self._w = csv.writer(self._f)
        if new:
            self._w.writerow(["step", "split", "name", "value"])
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard not installed: CSV only
                self._tb = None
            else:
                self._tb = SummaryWriter(log_dir=str(self.path.parent / "tb"), purge_step=resume_step)

    def log(self, step: int, split: str, values: dict[str, float]) -> None:
        for name, value in values.items():
            self._w.writerow([step, split, name, repr(float(value))])
            if self._tb is not None:
                self._tb.add_scalar(f"{split}/{name}", float(value), step)
        self._f.flush()

    def close(self) -> None:
        self._f.close()
        if self._tb is not None:
            self._tb.close()
