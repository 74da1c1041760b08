"""Options of the baselines (``celltwin train --set key=value``, ``Model.train(key=value)``); stdlib only."""

from __future__ import annotations

from dataclasses import dataclass

from celltwin.errors import ConfigError
from celltwin.options import Options, option

__all__ = ["BaselineOptions"]


@dataclass
class BaselineOptions(Options):
    """Options shared by every baseline (the linear ones are used by ``linear`` only)."""

    what = "baseline option"

    min_cells: int = option(1, "training (context, perturbation) pairs with fewer cells are dropped (listed in run.json)")
    linear_dim: int = option(10, "linear: K, the size of the gene PCA embedding (paper default)")
    linear_ridge: float = option(0.1, "linear: ridge penalty (paper default)")

    def validate(self) -> None:
        if self.min_cells < 1:
            raise ConfigError(f"{self.what} min_cells: expected >= 1, got {self.min_cells}")
        if self.linear_dim < 1:
            raise ConfigError(f"{self.what} linear_dim: expected >= 1, got {self.linear_dim}")
        if not self.linear_ridge >= 0:
            raise ConfigError(f"{self.what} linear_ridge: expected >= 0, got {self.linear_ridge}")
