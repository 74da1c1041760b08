"""Fixtures shared by every test folder.

* :func:`make_screen` (fixture ``make_screen``): small Perturb-seq-like AnnData screens built in
  memory, the one builder for test data (no files shipped);
* ``kill_after_checkpoint``: kill a training process once it has checkpointed (resume tests);
* the ``reference`` marker (a test comparing against cell-eval, pdex, scanpy, ...) implies ``slow``.
"""

from __future__ import annotations

import os

# Idle OpenMP threads sleep instead of spinning, in this process and the commands it starts. numba's
# OpenMP threading layer (the evaluator's kernels) and torch's OpenMP pool each keep spinning
# threads; on the 2-core machines the suite runs on, torch ops that follow an evaluation in the
# same process ran up to 10x slower (a training step after `celltwin.evaluate`, torch's pool once
# sized 2 then set to 1 thread). Set before numba or torch load their OpenMP runtime.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import json
import signal
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

CTRL = "non-targeting"


# ----------------------------------------------------------------------------------- test screens
def make_screen(
    seed: int | np.random.Generator = 0,
    *,
    n_genes: int = 20,
    genes: Sequence[str] | None = None,
    perts: Sequence[str] = ("A", "B", "C"),
    n_per: int | tuple[int, int] = 12,
    n_ctrl: int | None = None,
    contexts: Sequence[str] | None = None,
    batches: Sequence[str] | None = None,
    skip: Callable[[str, str | None, str | None], bool] | None = None,
    control: str = CTRL,
    pert_col: str = "target_gene",
    context_col: str = "context",
    batch_col: str = "batch",
    categorical: bool = False,
    cell_prefix: str = "cell",
    base: float | tuple[float, ...] = (2.0, 2.0, 0.5),
    size_factor: tuple[float, float] | None = (0.5, 1.5),
    effect: float | Mapping[str, float] | str | None = 0.1,
    targets: Mapping[str, str] | None = None,
    n_hits: int = 5,
    hit_factors: Sequence[float] = (0.1, 5.0),
    null_perts: Sequence[str] = (),
    counts: bool = True,
    target_sum: float = 1e4,
    shuffle: bool = False,
    fmt: str = "csr",
    dtype: Any = np.float32,
    obsm: Mapping[str, int] | None = None,
):
    """A small screen of Poisson counts: ``AnnData`` (cells x genes) with the labels in obs.

    Layout: for each context (``contexts``; ``None``: no context column), each batch (``batches``;
    ``None``: no batch column), the control (``n_ctrl`` cells, default ``n_per``) then each of
    ``perts`` (``n_per`` cells, or a random count in ``[lo, hi)`` for a tuple), in that order;
    ``skip(pert, context, batch)`` leaves a group out. obs: ``pert_col`` (a Categorical with
    ``categorical``), ``context_col``, ``batch_col`` (plain strings), index ``{cell_prefix}{i}``;
    var_names ``genes`` (default ``g0``, ``g1``, ...).

    Values, drawn from ``seed`` (an int or a Generator, whose stream continues) in this order:

    1. per-gene base rates: ``gamma(shape, scale)`` (+ ``offset``) for ``base=(shape, scale[, offset])``,
       or the constant ``base``;
    2. ``effect`` a number or ``{context: number}`` (targeted): per-cell size factors
       ``uniform(*size_factor)`` (none for ``None``), the rate of each target gene of a perturbed
       cell (``targets[pert]``, default the ``+``-separated parts of the label that are genes)
       multiplied by the effect, then one Poisson draw of the whole matrix; ``effect=None``: no
       effect. ``effect="random"``: group by group, ``n_per`` if a range, then for a perturbation
       not in ``null_perts`` ``n_hits`` random genes with factors drawn from ``hit_factors``,
       then the group's Poisson draw (no size factors);
    3. with ``shuffle`` a random row permutation; with ``counts=False`` ``log1p(x / total *
       target_sum)`` (in float64);
    4. X cast to ``dtype`` and stored as ``fmt`` (``csr``, ``csc`` or ``dense``); then each
       ``obsm[key]`` a float32 standard normal matrix of ``obsm[key]`` columns.

    The order of the draws is part of the contract: tests compare numbers built from it.
    """
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    genes = list(genes) if genes is not None else [f"g{i}" for i in range(n_genes)]
    G = len(genes)
    if isinstance(base, tuple):
        rates = rng.gamma(base[0], base[1], G) + (base[2] if len(base) > 2 else 0.0)
    else:
        rates = np.full(G, float(base))
    groups = [(p, c, b) for c in (contexts or [None]) for b in (batches or [None]) for p in [control, *perts]
              if skip is None or not skip(p, c, b)]

    def size(p: str) -> int:
        if p == control:
            return n_per if n_ctrl is None else n_ctrl
        return int(rng.integers(*n_per)) if isinstance(n_per, tuple) else n_per

    recs: list[tuple[str, str | None, str | None]] = []
    if effect == "random":
        if size_factor is not None:
            raise ValueError("make_screen: effect='random' draws no size factors; pass size_factor=None")
        blocks = []
        for p, c, b in groups:
            k = size(p)
            mu = rates.copy()
            if p != control and p not in null_perts:
                hit = rng.choice(G, n_hits, replace=False)
                mu[hit] *= rng.choice(list(hit_factors), n_hits)
            blocks.append(rng.poisson(mu, (k, G)).astype(np.float64))
            recs += [(p, c, b)] * k
        X = np.vstack(blocks)
    else:
        recs = [g for g in groups for _ in range(size(g[0]))]
        lam = np.tile(rates, (len(recs), 1))
        if size_factor is not None:
            lam = lam * rng.uniform(size_factor[0], size_factor[1], (len(recs), 1))
        if effect is not None:
            col = {g: j for j, g in enumerate(genes)}
            for i, (p, c, _) in enumerate(recs):
                if p == control:
                    continue
                hit = [targets[p]] if targets is not None and p in targets else p.split("+")
                f = effect[c] if isinstance(effect, Mapping) else effect
                for g in hit:
                    if g in col:
                        lam[i, col[g]] *= f
        X = rng.poisson(lam)
    labels = np.array([r[0] for r in recs], dtype=object)
    order = rng.permutation(len(recs)) if shuffle else None
    if order is not None:
        X, recs = X[order], [recs[i] for i in order]
        labels = labels[order]
    if not counts:
        X = np.log1p(X / np.maximum(X.sum(1, keepdims=True), 1) * target_sum)
    X = X.astype(dtype)
    if fmt != "dense":
        X = {"csr": sp.csr_matrix, "csc": sp.csc_matrix}[fmt](X)
    cols: dict[str, Any] = {pert_col: pd.Categorical(labels) if categorical else list(labels)}
    if contexts is not None:
        cols[context_col] = [r[1] for r in recs]
    if batches is not None:
        cols[batch_col] = [r[2] for r in recs]
    obs = pd.DataFrame(cols, index=[f"{cell_prefix}{i}" for i in range(len(recs))])
    a = ad.AnnData(X=X, obs=obs, var=pd.DataFrame(index=genes))
    for key, dim in (obsm or {}).items():
        a.obsm[key] = rng.normal(size=(len(recs), dim)).astype(np.float32)
    return a


# ------------------------------------------------------------------------------------------ markers
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every ``reference`` test is also ``slow``: ``-m "not slow"`` (the quick loop) leaves out the
    runs of cell-eval, pdex, scanpy, ... that the exactness tests compare against; ``make test`` runs
    them all. The hand-computed exactness tests carry no marker and stay in the quick loop."""
    for item in items:
        if item.get_closest_marker("reference") is not None and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session", name="make_screen")
def _make_screen_fixture():
    """The function :func:`make_screen` (small in-memory screens)."""
    return make_screen


def _kill_after_checkpoint(proc: subprocess.Popen, marker: Path, min_step: int, timeout: float = 90.0) -> int:
    """SIGKILL ``proc``'s process group once ``marker`` (a checkpoint's ``last.json``) reaches ``min_step``.

    Fails the test if the process ends first (its stderr shown when it was piped). Returns the
    step of the last checkpoint written before the kill. ``proc`` must have been started with
    ``start_new_session=True`` so that DataLoader workers die with it.
    """
    deadline = time.time() + timeout
    while time.time() < deadline:
        if marker.exists() and json.loads(marker.read_text())["step"] >= min_step:
            break
        if proc.poll() is not None:
            err = proc.stderr.read().decode()[-3000:] if proc.stderr is not None else ""
            pytest.fail(f"the process ended (rc={proc.returncode}) before checkpoint step {min_step}: {err}")
        time.sleep(0.02)
    else:
        pytest.fail(f"no checkpoint at step >= {min_step} within {timeout} s ({marker})")
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    return int(json.loads(marker.read_text())["step"])


@pytest.fixture
def kill_after_checkpoint():
    """The function :func:`_kill_after_checkpoint` (kill-and-resume tests)."""
    return _kill_after_checkpoint
