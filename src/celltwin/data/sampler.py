"""Cell-set sampler: sets of S perturbed cells of one (context, perturbation) with S matched controls.

Epoch plan (a pure function of ``seed`` and ``epoch``; rng = ``default_rng([seed, epoch])``):

1. Groups are the (context, perturbation) pairs of the perturbed cells, in sorted order (plus the
   control "groups" of each context when ``control_sets=True``: controls mapped to controls).
2. Each group's rows are shuffled and cut into ``ceil(n / S)`` sets; the last set is topped up
   with rows drawn uniformly *with replacement* from the group (drawn after the shuffle). So
   every cell appears at least once per epoch, and a group with fewer than S cells gives one set
   with repeats.
3. Each perturbed row gets a control row from :class:`~celltwin.data.matching.ControlMatcher`
   (same context; same batch with ``match="batch"``; one draw per group, in row order), so
   ``ctrl_rows[k]`` is matched to ``pert_rows[k]``.
4. The sets are shuffled (when ``shuffle``). For ``world_size > 1`` the plan is extended to a
   multiple of ``world_size`` with extra sets (a random set of the plan is chosen, and a fresh set
   is drawn with replacement from its group); rank ``r`` takes sets ``r, r + W, r + 2W, ...``.
   Ranks therefore see disjoint sets of equal count whose union is the epoch plan.

Groups with fewer than ``min_cells`` cells follow ``small_groups``: ``"drop"`` (left out, with a
warning listing them) or ``"error"`` (InputError naming the group and its cell count).

This module is numpy-only; :mod:`celltwin.data.torch_sets` wraps it in a torch Dataset.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from celltwin.data.matching import MATCH_STRATEGIES, CellLabels, ControlMatcher
from celltwin.errors import ConfigError, InputError

__all__ = ["CellSet", "CellSetSampler", "SetSamplerConfig"]


@dataclass(frozen=True)
class CellSet:
    """One training example: S perturbed rows and their S matched control rows (global row ids)."""

    context: str
    perturbation: str
    pert_rows: np.ndarray  # (S,) int64
    ctrl_rows: np.ndarray  # (S,) int64


@dataclass(frozen=True)
class SetSamplerConfig:
    """Options of :class:`CellSetSampler` (validated once)."""

    set_size: int = 64
    seed: int = 0
    match: str = "random"  # "random" | "batch"
    shuffle: bool = True
    control_sets: bool = False  # also emit control -> control sets per context
    min_cells: int = 1
    small_groups: str = "drop"  # policy for groups with < min_cells cells: "drop" | "error"

    def __post_init__(self) -> None:
        if self.set_size < 1:
            msg = f"SetSamplerConfig.set_size: expected >= 1, got {self.set_size}"
            raise ConfigError(msg)
        if self.match not in MATCH_STRATEGIES:
            msg = f"SetSamplerConfig.match: expected one of {MATCH_STRATEGIES}, got {self.match!r}"
            raise ConfigError(msg)
        if self.small_groups not in ("drop", "error"):
            msg = f"SetSamplerConfig.small_groups: expected 'drop' or 'error', got {self.small_groups!r}"
            raise ConfigError(msg)
        if self.min_cells < 1:
            msg = f"SetSamplerConfig.min_cells: expected >= 1, got {self.min_cells}"
            raise ConfigError(msg)


class CellSetSampler:
    """Deterministic epoch plans of :class:`CellSet` for one rank (see module docstring).

    Parameters
    ----------
    labels
        Labels of the cells to train on (perturbed cells and the controls they are matched to).
    config
        :class:`SetSamplerConfig`.
    rank, world_size
        This process's share of each epoch (DistributedSampler-style); defaults: all of it.
    """

    def __init__(
        self, labels: CellLabels, config: SetSamplerConfig | None = None, rank: int = 0, world_size: int = 1
    ) -> None:
        self.config = config or SetSamplerConfig()
        if world_size < 1 or not 0 <= rank < world_size:
            msg = f"CellSetSampler: expected 0 <= rank < world_size, got rank={rank}, world_size={world_size}"
            raise ConfigError(msg)
        self.labels = labels
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.matcher = ControlMatcher(labels, self.config.match)
        groups = labels.groups(include_controls=self.config.control_sets)
        small = {k: v.size for k, v in groups.items() if v.size < self.config.min_cells}
        if small:
            shown = ", ".join(f"{p!r} in {c!r} ({n} cells)" for (c, p), n in sorted(small.items()))
            if self.config.small_groups == "error":
                msg = (
                    f"{labels.where}: perturbation(s) with fewer than min_cells={self.config.min_cells} "
                    f"cells: {shown} (policy small_groups='error'; use 'drop' to leave them out)"
                )
                raise InputError(msg)
            warnings.warn(
                f"{labels.where}: dropping perturbation(s) with fewer than "
                f"min_cells={self.config.min_cells} cells: {shown}",
                stacklevel=2,
            )
        self.groups: list[tuple[str, str, np.ndarray]] = [
            (c, p, rows) for (c, p), rows in groups.items() if rows.size >= self.config.min_cells
        ]
        if not self.groups:
            msg = f"{labels.where}: no (context, perturbation) group to sample cell sets from"
            raise InputError(msg)
        S = self.config.set_size
        self.n_sets_total = sum(math.ceil(rows.size / S) for _, _, rows in self.groups)
        self.n_sets_padded = math.ceil(self.n_sets_total / world_size) * world_size
        self._cache: tuple[int, list[CellSet]] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose plan :meth:`__iter__` / :meth:`rank_sets` return."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        """Number of sets this rank sees per epoch (the same every epoch and on every rank)."""
        return self.n_sets_padded // self.world_size

    def _draw_set(self, c: str, p: str, rows: np.ndarray, rng: np.random.Generator) -> CellSet:
        pr = rows[rng.integers(rows.size, size=self.config.set_size)]
        return CellSet(c, p, pr, self.matcher.sample(pr, rng))

    def epoch_plan(self, epoch: int | None = None) -> list[CellSet]:
        """All sets of an epoch, every rank's, padded to a multiple of ``world_size``."""
        epoch = self.epoch if epoch is None else int(epoch)
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        S = self.config.set_size
        rng = np.random.default_rng([self.config.seed, epoch])
        plan: list[CellSet] = []
        for c, p, rows in self.groups:
            perm = rows[rng.permutation(rows.size)] if self.config.shuffle else rows
            k = math.ceil(rows.size / S)
            if k * S > rows.size:  # top up the last set with draws from the group
                perm = np.concatenate([perm, rows[rng.integers(rows.size, size=k * S - rows.size)]])
            ctrl = self.matcher.sample(perm, rng)  # one call per group: ctrl[i] matched to perm[i]
            plan += [CellSet(c, p, perm[j * S : (j + 1) * S], ctrl[j * S : (j + 1) * S]) for j in range(k)]
        if self.config.shuffle:
            plan = [plan[i] for i in rng.permutation(len(plan))]
        group_of = {(c, p): rows for c, p, rows in self.groups}
        while len(plan) < self.n_sets_padded:
            base = plan[int(rng.integers(self.n_sets_total))]
            plan.append(
                self._draw_set(
                    base.context, base.perturbation, group_of[(base.context, base.perturbation)], rng
                )
            )
        self._cache = (epoch, plan)
        return plan

    def rank_sets(self, epoch: int | None = None) -> list[CellSet]:
        """This rank's sets of the epoch: ``epoch_plan()[rank::world_size]``."""
        return self.epoch_plan(epoch)[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[CellSet]:
        return iter(self.rank_sets())
