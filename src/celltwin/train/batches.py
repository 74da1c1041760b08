"""The batches of :func:`celltwin.train.fit`: epochs of a loader, resumable, on their own RNG streams.

Data contract: ``loader`` is re-iterated every epoch (an epoch ends when it is exhausted).
Before each epoch :class:`EpochBatches` calls ``set_epoch(epoch)`` on ``loader.sampler``,
``loader.batch_sampler`` and ``loader.dataset`` when they have it (or ``loader`` may be a
callable ``epoch -> iterable``). On resume it skips the batches already consumed in the
current epoch by iterating past them (cost: reading them again).

Loader RNG isolation: every call into the loader (``set_epoch``, ``iter(loader)``, each
``next``) runs on a separate set of global RNG streams (torch CPU, Python ``random``, NumPy
legacy), seeded from ``(seed, rank, epoch)`` at the start of each epoch and swapped out again
afterwards (:class:`LoaderRng`). Why: ``iter(torch.utils.data.DataLoader)`` draws the
workers' ``base_seed`` from the global torch generator (with any ``num_workers``), and a
``shuffle=True`` loader without its own ``generator`` draws its permutation seed there too. On
resume the loop re-creates the epoch's iterator at a different point of the training RNG
stream than the uninterrupted run did, which shifted every later dropout mask (a killed and
resumed ``state`` run ended 0.012 away from the uninterrupted weights). With the swap, the
training RNG (dropout, masking, ...) never sees the loader's draws, and the loader's own draws
(worker seeds, unseeded shuffles, random augmentation in ``__getitem__`` with
``num_workers=0``) are a function of ``(seed, rank, epoch, position)``, identical after a
resume. Cost: a few tens of microseconds per batch. Not covered: ``persistent_workers=True``
(workers keep their RNG across epochs, which a resume cannot reproduce).
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np
import torch

from celltwin.errors import ConfigError

__all__ = ["EpochBatches", "LoaderRng", "set_epoch"]


class LoaderRng:
    """Separate global RNG streams for the loader (see "Loader RNG isolation" in the module docstring).

    ``start(epoch)`` marks a new epoch: the next :meth:`active` block begins from streams seeded
    by ``(seed, rank, epoch)``. Inside ``with rng.active():`` the loader's streams are installed
    (torch CPU, Python ``random``, NumPy legacy global); on exit they are saved and the training
    streams restored exactly. The loader streams need no checkpointing: a resumed epoch is
    re-iterated from its start (skipping consumed batches), which replays them.
    """

    def __init__(self, seed: int, rank: int) -> None:
        self.seed, self.rank = seed % 2**63, rank
        self._epoch = 0
        self._state: tuple[Any, Any, Any] | None = None

    def start(self, epoch: int) -> None:
        self._epoch, self._state = epoch, None

    @contextlib.contextmanager
    def active(self):
        saved = (torch.get_rng_state(), random.getstate(), np.random.get_state())
        try:
            if self._state is None:
                words = np.random.SeedSequence([self.seed, self.rank, self._epoch, 0x1DA7A]).generate_state(2)
                s64 = (int(words[0]) << 32) | int(words[1])
                torch.manual_seed(s64)
                random.seed(s64)
                np.random.seed(int(words[0]))
            else:
                torch.set_rng_state(self._state[0])
                random.setstate(self._state[1])
                np.random.set_state(self._state[2])
            yield
        finally:
            self._state = (torch.get_rng_state(), random.getstate(), np.random.get_state())
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])


def set_epoch(loader: Any, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on the loader's sampler, batch sampler, dataset and itself where present."""
    for obj in (getattr(loader, "sampler", None), getattr(loader, "batch_sampler", None),
                getattr(loader, "dataset", None), loader):
        fn = getattr(obj, "set_epoch", None)
        if callable(fn):
            fn(epoch)


class EpochBatches:
    """Endless stream of batches continuing from ``(epoch, pos)``; :attr:`epoch` / :attr:`pos` follow it.

    ``pos`` is the number of batches of ``epoch`` handed out so far (what a checkpoint stores).
    Iterate it once (``iter(feed)``); closing that iterator releases the epoch's loader iterator
    (a DataLoader's workers).
    """

    def __init__(self, loader: Iterable[Any] | Callable[[int], Iterable[Any]], seed: int, rank: int,
                 epoch: int = 0, pos: int = 0) -> None:
        self.loader = loader
        self.epoch, self.pos = epoch, pos
        self._rng = LoaderRng(seed, rank)

    def __iter__(self) -> Iterator[Any]:
        loader, loader_rng = self.loader, self._rng
        while True:
            loader_rng.start(self.epoch)
            with loader_rng.active():  # loader code never touches the training RNG streams
                set_epoch(loader, self.epoch)
                src = loader(self.epoch) if callable(loader) and not hasattr(loader, "__iter__") else loader
                it = iter(src)
            n = 0
            while True:
                with loader_rng.active():
                    try:
                        b = next(it)
                    except StopIteration:
                        break
                if n < self.pos:  # resume: skip what this epoch already consumed
                    n += 1
                    continue
                n += 1
                self.pos = n
                yield b
            del it  # a finished DataLoader iterator: let its workers go now
            if n == 0:
                msg = f"the training loader yielded no batch in epoch {self.epoch}"
                raise ConfigError(msg)
            self.epoch += 1
            self.pos = 0
