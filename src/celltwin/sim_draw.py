"""The simulator's random draws (see :mod:`celltwin.sim` for the generative model they follow).

:func:`draw_truth` draws every parameter (:class:`SimTruth`) from ``SeedSequence([seed, 0])``,
:func:`draw_cells` the cell table (:class:`CellTable`) from ``SeedSequence([seed, 1])``,
:func:`iter_blocks` the counts of block ``k`` from ``SeedSequence([seed, 2, k])`` and
:func:`effect_normalized` the Monte-Carlo compositional truth from ``SeedSequence([seed, 4])``.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from celltwin._constants import COMBO_SEP

if TYPE_CHECKING:  # pragma: no cover
    from celltwin.sim import SimConfig

__all__ = ["CellTable", "SimTruth", "draw_cells", "draw_truth", "effect_normalized", "iter_blocks", "sample_block"]

_MAX_LFC = 3.0  # downstream programme effects are clipped to [-3, 3] (natural log) before the knockdown


@dataclass(frozen=True)
class SimTruth:
    """Parameters drawn from ``SeedSequence([seed, 0])`` (everything but the cells).

    Shapes: C contexts, P perturbations (singles then combos), G genes, B batches, K state programs.
    """

    genes: list[str]
    gene_ids: list[str]
    contexts: list[str]
    batches: list[str]
    perturbations: list[str]
    effect_class: list[str]
    target_index: np.ndarray  # (P, 2) int64
    effect: np.ndarray  # (C, P, G) float32
    log_base: np.ndarray  # (C, G) float64: log p + ctx
    batch_effect: np.ndarray  # (B, G) float64
    state_loadings: np.ndarray  # (K, G) float64
    theta: np.ndarray  # (G,) float64


def draw_truth(cfg: SimConfig) -> SimTruth:
    """Every parameter of the screen (genes, targets, classes, effects, baselines, dispersions)."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0]))
    G, C, B = cfg.n_genes, cfg.n_contexts, cfg.n_batches
    width = max(5, len(str(G)))
    genes = [f"G{i + 1:0{width}d}" for i in range(G)]
    gene_ids = [f"SIMG{i + 1:011d}" for i in range(G)]
    contexts = [f"context_{c}" for c in range(C)]
    batches = [f"batch_{b}" for b in range(B)]

    log_p = rng.normal(0.0, cfg.gene_log_sd, size=G)
    ctx_mask = rng.random((C, G)) < cfg.context_frac
    log_base = log_p[None, :] + ctx_mask * rng.normal(0.0, cfg.context_sd, size=(C, G))
    batch_effect = rng.normal(0.0, cfg.batch_sd, size=(B, G))
    state_loadings = rng.normal(0.0, cfg.state_sd, size=(cfg.n_state_programs, G))
    theta = cfg.nb_theta * np.exp(rng.normal(0.0, cfg.nb_theta_log_sd, size=G))

    # targets: distinct genes from the upper half of the baseline profile (knockdown must be visible)
    upper = np.argsort(-log_p, kind="stable")[: max(G // 2, cfg.n_perts)]
    targets = np.sort(rng.choice(upper, size=cfg.n_perts, replace=False)) if cfg.n_perts else np.zeros(0, int)
    classes = np.array(
        ["strong"] * cfg.n_strong
        + ["subtle"] * cfg.n_subtle
        + ["null"] * (cfg.n_perts - cfg.n_strong - cfg.n_subtle)
    )
    classes = classes[rng.permutation(cfg.n_perts)] if cfg.n_perts else classes

    # shared low-rank programmes: M sparse gene loadings
    M = cfg.n_programs
    n_prog_genes = max(3, round(cfg.program_frac * G))
    loadings = np.zeros((M, G))
    for m in range(M):
        idx = rng.choice(G, size=min(n_prog_genes, G), replace=False)
        loadings[m, idx] = rng.normal(0.0, 1.0, size=idx.size)
    # per-context modulation of each programme: scale and (rare) sign flip; context 0 never flips
    mod = rng.uniform(1.0 - cfg.context_mod, 1.0 + cfg.context_mod, size=(C, M))
    flips = rng.random((C, M)) < cfg.context_flip
    flips[0] = False
    mod = np.where(flips, -mod, mod)

    P1 = cfg.n_perts
    coef = np.zeros((P1, M))
    for p, cls in enumerate(classes):
        if cls == "null":
            continue
        k, scale = (2, cfg.strong_scale) if cls == "strong" else (1, cfg.subtle_scale)
        ms = rng.choice(M, size=min(k, M), replace=False)
        coef[p, ms] = scale * rng.uniform(0.6, 1.4, size=ms.size) * rng.choice([-1.0, 1.0], size=ms.size)
    log_kd = np.minimum(np.log(cfg.knockdown) + rng.normal(0.0, cfg.knockdown_sd, size=P1), np.log(0.9))

    singles = np.clip(np.einsum("pm,cm,mg->cpg", coef, mod, loadings), -_MAX_LFC, _MAX_LFC)  # (C, P1, G)
    for p in range(P1):
        singles[:, p, targets[p]] = log_kd[p]

    # combinations among non-null singles
    nonnull = np.flatnonzero(classes != "null")
    pairs_all = [(int(a), int(b)) for i, a in enumerate(nonnull) for b in nonnull[i + 1 :]]
    chosen = rng.choice(len(pairs_all), size=cfg.n_combos, replace=False) if cfg.n_combos else []
    pairs = sorted(pairs_all[int(j)] for j in chosen)
    combos = np.zeros((C, len(pairs), G))
    for j, (a, b) in enumerate(pairs):
        support = (np.abs(coef[a] @ loadings) + np.abs(coef[b] @ loadings)) > 0
        support[targets[a]] = support[targets[b]] = False
        inter = np.where(support, rng.normal(0.0, cfg.combo_interaction_sd, size=G), 0.0)
        combos[:, j] = singles[:, a] + singles[:, b] + inter[None, :]

    pert_names = [genes[t] for t in targets] + [
        f"{genes[targets[a]]}{COMBO_SEP}{genes[targets[b]]}" for a, b in pairs
    ]
    target_index = np.full((P1 + len(pairs), 2), -1, dtype=np.int64)
    target_index[:P1, 0] = targets
    for j, (a, b) in enumerate(pairs):
        target_index[P1 + j] = (targets[a], targets[b])
    effect = np.concatenate([singles, combos], axis=1).astype(np.float32)
    return SimTruth(
        genes=genes,
        gene_ids=gene_ids,
        contexts=contexts,
        batches=batches,
        perturbations=pert_names,
        effect_class=[str(c) for c in classes] + ["combo"] * len(pairs),
        target_index=target_index,
        effect=effect,
        log_base=log_base,
        batch_effect=batch_effect,
        state_loadings=state_loadings,
        theta=theta,
    )


@dataclass(frozen=True)
class CellTable:
    """The cells of a screen, in output order (context, then controls, then perturbations)."""

    context: np.ndarray  # (N,) int: context index
    pert: np.ndarray  # (N,) int: perturbation index, -1 = control
    batch: np.ndarray  # (N,) int
    guide: np.ndarray  # (N,) int: guide index within the perturbation
    library: np.ndarray  # (N,) float64: L_i


def draw_cells(cfg: SimConfig) -> CellTable:
    """Context, perturbation, batch, guide and library size of every cell."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 1]))
    n_p = cfg.n_perts + cfg.n_combos
    per_ctx_pert = np.concatenate(
        [np.full(cfg.n_controls, -1), np.repeat(np.arange(n_p), cfg.cells_per_pert)]
    )
    pert = np.tile(per_ctx_pert, cfg.n_contexts)
    context = np.repeat(np.arange(cfg.n_contexts), per_ctx_pert.size)
    N = pert.size
    batch = rng.integers(0, cfg.n_batches, size=N)
    guide = rng.integers(0, cfg.n_guides, size=N)
    lib = np.exp(np.log(cfg.library_median) + rng.normal(0.0, cfg.library_log_sd, size=N))
    lib = np.clip(lib, cfg.library_min, cfg.library_max)
    return CellTable(context=context, pert=pert, batch=batch, guide=guide, library=lib)


def sample_block(
    cfg: SimConfig,
    truth: SimTruth,
    cells: CellTable,
    start: int,
    stop: int,
    block: int,
    effect: np.ndarray | None = None,
) -> np.ndarray:
    """Counts (stop - start, G) int64 of cells [start, stop) drawn with block ``block``'s stream."""
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 2, block]))
    eff = truth.effect if effect is None else effect
    sl = slice(start, stop)
    ctx, pert, bat, lib = cells.context[sl], cells.pert[sl], cells.batch[sl], cells.library[sl]
    n = stop - start
    z = rng.normal(0.0, 1.0, size=(n, truth.state_loadings.shape[0]))
    log_r = truth.log_base[ctx] + truth.batch_effect[bat] + z @ truth.state_loadings  # (n, G)
    log_r -= log_r.max(axis=1, keepdims=True)
    r = np.exp(log_r)
    r /= r.sum(axis=1, keepdims=True)
    is_pert = pert >= 0
    if is_pert.any():
        r[is_pert] *= np.exp(eff[ctx[is_pert], pert[is_pert]].astype(np.float64))
    mu = r * lib[:, None]
    lam = rng.gamma(truth.theta[None, :], mu / truth.theta[None, :])
    return rng.poisson(lam)


def iter_blocks(
    cfg: SimConfig, truth: SimTruth, cells: CellTable, effect: np.ndarray | None = None
) -> Iterator[tuple[int, int, np.ndarray]]:
    """``(start, stop, counts)`` of each block of ``cfg.block_size`` cells, in order."""
    N = cells.pert.size
    for k, start in enumerate(range(0, N, cfg.block_size)):
        stop = min(start + cfg.block_size, N)
        yield start, stop, sample_block(cfg, truth, cells, start, stop, k, effect)


def effect_normalized(cfg: SimConfig, truth: SimTruth, n_mc: int = 2048, chunk: int = 512) -> np.ndarray:
    """(C, P, G) float32 log-fold change of the expected composition ``E[x_g / sum_h x_h]``.

    A cell's composition is ``q_ig g_ig exp(e_g) / S_i`` with ``S_i = sum_h q_ih g_ih exp(e_h)``, where
    ``g`` is the Gamma (NB overdispersion) factor of each count; so the truth is
    ``e_g + log(E_i[q_ig g_ig / S_i(e)] / E_i[q_ig g_ig / S_i(0)])`` over basal cells ``i`` (batch,
    cell state and Gamma noise vary). The expectations are Monte-Carlo averages over ``n_mc`` basal
    cells per context drawn from their own stream ``SeedSequence([seed, 4])``; Poisson noise of the
    totals is ignored.
    """
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 4]))
    C, P, G = truth.effect.shape
    out = np.zeros((C, P, G), dtype=np.float32)
    if P == 0:
        return out
    theta = truth.theta[None, :]
    for c in range(C):
        e = truth.effect[c].astype(np.float64)  # (P, G)
        fold = np.exp(e).T  # (G, P)
        w_pert = np.zeros((P, G))
        w_ctrl = np.zeros(G)
        for start in range(0, n_mc, chunk):
            n = min(chunk, n_mc - start)
            bat = rng.integers(0, cfg.n_batches, size=n)
            z = rng.normal(0.0, 1.0, size=(n, truth.state_loadings.shape[0]))
            log_q = truth.log_base[c][None, :] + truth.batch_effect[bat] + z @ truth.state_loadings  # (n, G)
            log_q -= log_q.max(axis=1, keepdims=True)
            q = np.exp(log_q)
            q /= q.sum(axis=1, keepdims=True)
            qg = q * rng.gamma(theta, 1.0 / theta, size=(n, G))  # (n, G)
            w_pert += (1.0 / (qg @ fold)).T @ qg  # (P, G): sum_i q g / S_i(e)
            w_ctrl += (1.0 / qg.sum(axis=1)) @ qg  # (G,)
        out[c] = e + np.log(w_pert / w_ctrl[None, :])
    return out
