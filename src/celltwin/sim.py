"""Deterministic synthetic Perturb-seq generator with known ground truth (the embedded default data).

The generative model, for a cell ``i`` in context ``c``, batch ``b``, perturbation ``p``::

    log r_ig   = log p_g + ctx[c, g] + batch[b, g] + z_i @ W_state[:, g]      # baseline log rate
    q_ig       = r_ig / sum_g r_ig                                            # baseline composition
    mu_ig      = L_i * q_ig * exp(effect[c, p, g])                            # expected UMI count
    x_ig       ~ NegativeBinomial(mean=mu_ig, size=theta_g)                   # Gamma-Poisson draw

* ``p_g``: gene baseline profile, log-normal (``gene_log_sd``), so a few genes are highly expressed
  and most are rare, giving realistic sparsity.
* ``ctx[c]``: each context's (cell type's) own baseline program: ``N(0, context_sd)`` log-shifts on a
  random ``context_frac`` of the genes.
* ``batch[b]``: multiplicative batch effect ``N(0, batch_sd)`` per (batch, gene); batches are assigned
  to cells uniformly at random, independently of the perturbation.
* ``z_i @ W_state``: per-cell heterogeneity of the basal state (``n_state_programs`` latent programs).
* ``L_i``: library size, log-normal around ``library_median`` (``library_log_sd``), clipped to
  ``[library_min, library_max]``. Because the baseline is normalised to a composition, the observed
  UMI total of a cell is ``L_i`` up to the perturbation's (small) compositional shift and NB noise.
* ``effect[c, p]``: natural-log fold change of the expected count. Perturbations share
  ``n_programs`` low-rank gene modules (sparse loadings on ``program_frac`` of the genes). A
  perturbation's effect is ``sum_m a[p, m] * mod[c, m] * L[m]`` where ``a`` depends on its class
  (``strong``: 2 modules, scale ``strong_scale``; ``subtle``: 1 module, scale ``subtle_scale``;
  ``null``: no downstream effect; the sum is clipped to [-3, 3]) and ``mod[c, m]`` is the
  per-context modulation (a scale in ``[1 - context_mod, 1 + context_mod]``, sign flipped with
  probability ``context_flip``; the first
  context is never flipped). On top, every targeting perturbation knocks down its target gene
  (CRISPRi): the target's entry is ``log(knockdown) + N(0, knockdown_sd)`` (capped at ``log 0.9``),
  in every context, for every class including ``null``.
* Combinations ``A+B`` (``n_combos``, drawn among pairs of non-null singles) have
  ``effect[A] + effect[B] + interaction`` where the interaction is ``N(0, combo_interaction_sd)`` on
  the union of A's and B's programme genes (never on the two targets, whose entries are the sum of
  the singles' entries).

Ground truth: since ``L_i``, the batch and ``z_i`` are drawn independently of the perturbation,
``E[x_g | c, p] / E[x_g | c, control] = exp(effect[c, p, g])`` exactly: the truth is on expected raw
counts. After ``normalize_total`` every gene of a perturbation also moves by about the compositional
offset ``-log(sum_g q_cg exp(effect[c, p, g]))`` (``q_c`` = ``exp(base_log_mean[c])``; median |offset|
~0.01, up to ~0.3-0.6 for strong perturbations of highly expressed genes); ``effect_normalized``
holds the log-fold change of the expected composition ``E[x_g / sum_h x_h]`` (offset included;
cell-to-cell heterogeneity and NB overdispersion accounted for by a Monte-Carlo average over 2,048
basal cells per context).

Quick use::

    from celltwin.sim import simulate, write_simulated, simulate_eval_pair, SimConfig
    adata = simulate("demo")                      # or SimConfig.preset("tiny", seed=3, n_combos=2)
    truth = adata.uns["celltwin_sim"]             # celltwin._constants.SIM_UNS_KEY
    write_simulated("vcc", "vcc.h5ad")            # streamed, block by block
    pred, real = simulate_eval_pair(n_perts=10, noise=0.3)

``adata.uns[SIM_UNS_KEY]`` (``celltwin._constants.SIM_UNS_KEY``) holds:

* ``contexts`` (C,) str, ``perturbations`` (P,) str (singles then combos, never the control),
* ``effect`` float32 (C, P, G): the true log-fold effect described above (genes in ``var_names`` order),
* ``effect_normalized`` float32 (C, P, G): ``effect`` plus the compositional offset (see above),
* ``effect_class`` (P,) str in ``strong`` / ``subtle`` / ``null`` / ``combo``,
* ``target_index`` int64 (P, 2): column of each target gene in ``var_names`` (-1 when a single),
* ``base_log_mean`` float32 (C, G): ``log q`` of the context baseline averaged over batches (no cell state),
* ``seed`` int, ``config_json`` str (the :class:`SimConfig`, JSON), ``version`` int.

Cells are ordered by context, then controls, then perturbations in ``perturbations`` order.
Random streams: parameters come from ``SeedSequence([seed, 0])``, the cell table from
``SeedSequence([seed, 1])`` and the counts of block ``k`` (``block_size`` cells) from
``SeedSequence([seed, 2, k])``; hence :func:`simulate` and :func:`write_simulated` produce identical
matrices, and the result depends on ``block_size`` (a config field) but not on memory settings.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from celltwin._constants import (
    BATCH_COL,
    COMBO_SEP,
    CONTEXT_COL,
    CONTROL_LABEL,
    GUIDE_COL,
    PERT_COL,
    SIM_UNS_KEY,
)
from celltwin.errors import ConfigError

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad
    import pandas as pd

__all__ = [
    "EFFECT_CLASSES",
    "PRESETS",
    "SimConfig",
    "SimTruth",
    "simulate",
    "simulate_eval_pair",
    "write_simulated",
]

SIM_VERSION = 1
EFFECT_CLASSES = ("strong", "subtle", "null", "combo")
_MAX_LFC = 3.0  # downstream programme effects are clipped to [-3, 3] (natural log) before the knockdown


@dataclass(frozen=True)
class SimConfig:
    """Sizes and effect parameters of a simulated Perturb-seq screen (validated in ``__post_init__``).

    Cell counts are per context: each context has ``n_controls`` control cells and
    ``cells_per_pert`` cells for each of the ``n_perts`` singles and ``n_combos`` combinations.
    ``frac_strong`` / ``frac_subtle`` of the singles are strong / subtle (rounded to nearest,
    the remainder is null; the classes are assigned in a random order).
    """

    n_genes: int = 200
    n_contexts: int = 2
    n_perts: int = 6
    cells_per_pert: int = 60
    n_controls: int = 120
    n_combos: int = 0
    n_batches: int = 2
    n_guides: int = 2
    frac_strong: float = 0.34
    frac_subtle: float = 0.33
    n_programs: int = 4
    program_frac: float = 0.08
    strong_scale: float = 1.0
    subtle_scale: float = 0.3
    knockdown: float = 0.15
    knockdown_sd: float = 0.25
    context_sd: float = 0.5
    context_frac: float = 0.3
    context_mod: float = 0.5
    context_flip: float = 0.15
    combo_interaction_sd: float = 0.3
    batch_sd: float = 0.1
    n_state_programs: int = 3
    state_sd: float = 0.25
    gene_log_sd: float = 2.0
    library_median: float = 3000.0
    library_log_sd: float = 0.4
    library_min: float = 1000.0
    library_max: float = 50000.0
    nb_theta: float = 4.0
    nb_theta_log_sd: float = 0.5
    block_size: int = 1024
    seed: int = 0

    def __post_init__(self) -> None:
        ints = {
            "n_genes": 2,
            "n_contexts": 1,
            "n_perts": 0,
            "cells_per_pert": 1,
            "n_controls": 2,
            "n_combos": 0,
            "n_batches": 1,
            "n_guides": 1,
            "n_programs": 1,
            "n_state_programs": 0,
            "block_size": 1,
            "seed": 0,
        }
        for name, lo in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < lo:
                msg = f"SimConfig.{name}: expected an integer >= {lo}, got {v!r}"
                raise ConfigError(msg)
        fracs = ("frac_strong", "frac_subtle", "program_frac", "context_frac", "context_flip", "context_mod")
        for name in fracs:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and 0.0 <= v <= 1.0):
                msg = f"SimConfig.{name}: expected a number in [0, 1], got {v!r}"
                raise ConfigError(msg)
        if self.frac_strong + self.frac_subtle > 1.0 + 1e-9:
            total = self.frac_strong + self.frac_subtle
            msg = f"SimConfig: frac_strong + frac_subtle must be <= 1, got {total}"
            raise ConfigError(msg)
        nonneg = (
            "strong_scale",
            "subtle_scale",
            "knockdown_sd",
            "context_sd",
            "combo_interaction_sd",
            "batch_sd",
            "state_sd",
            "gene_log_sd",
            "library_log_sd",
            "nb_theta_log_sd",
        )
        for name in nonneg:
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and np.isfinite(v) and v >= 0):
                msg = f"SimConfig.{name}: expected a finite number >= 0, got {v!r}"
                raise ConfigError(msg)
        if not (0.0 < self.knockdown <= 1.0):
            msg = f"SimConfig.knockdown: expected the remaining fraction in (0, 1], got {self.knockdown!r}"
            raise ConfigError(msg)
        if not (self.nb_theta > 0):
            msg = f"SimConfig.nb_theta: expected > 0, got {self.nb_theta!r}"
            raise ConfigError(msg)
        if not (0 < self.library_min <= self.library_median <= self.library_max):
            msg = (
                f"SimConfig: expected 0 < library_min <= library_median <= library_max, got "
                f"{self.library_min}, {self.library_median}, {self.library_max}"
            )
            raise ConfigError(msg)
        n_targets = self.n_perts
        if n_targets > self.n_genes // 2:
            msg = (
                f"SimConfig.n_perts: at most n_genes // 2 = {self.n_genes // 2} target genes, got {n_targets}"
            )
            raise ConfigError(msg)
        n_nonnull = self.n_strong + self.n_subtle
        max_combos = n_nonnull * (n_nonnull - 1) // 2
        if self.n_combos > max_combos:
            msg = (
                f"SimConfig.n_combos: at most {max_combos} pairs of non-null singles "
                f"({n_nonnull} non-null of {self.n_perts}), got {self.n_combos}"
            )
            raise ConfigError(msg)

    # derived sizes ------------------------------------------------------------------
    @property
    def n_strong(self) -> int:
        return round(self.frac_strong * self.n_perts)

    @property
    def n_subtle(self) -> int:
        return min(round(self.frac_subtle * self.n_perts), self.n_perts - self.n_strong)

    @property
    def n_cells_per_context(self) -> int:
        return self.n_controls + (self.n_perts + self.n_combos) * self.cells_per_pert

    @property
    def n_cells(self) -> int:
        return self.n_contexts * self.n_cells_per_context

    def replace(self, **changes: Any) -> SimConfig:
        """A copy with ``changes`` applied (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SimConfig:
        return cls(**json.loads(text))

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SimConfig:
        """A named preset (``tiny``, ``demo``, ``vcc``) with ``overrides`` applied."""
        if name not in PRESETS:
            msg = f"unknown simulator preset {name!r}; expected one of {sorted(PRESETS)}"
            raise ConfigError(msg)
        fields = {f.name for f in dataclasses.fields(cls)}
        bad = sorted(set(overrides) - fields)
        if bad:
            msg = f"SimConfig has no field(s) {bad}"
            raise ConfigError(msg)
        return dataclasses.replace(PRESETS[name], **overrides)


PRESETS: dict[str, SimConfig] = {
    # unit tests: 2 contexts x (120 controls + 6 perts x 60) = 960 cells x 200 genes
    # (2 strong, 2 subtle, 2 null)
    "tiny": SimConfig(),
    # the demo: 3 contexts x (240 controls + 24 perts x 60) = 5,040 cells x 1,500 genes
    "demo": SimConfig(
        n_genes=1500,
        n_contexts=3,
        n_perts=24,
        cells_per_pert=60,
        n_controls=240,
        n_batches=3,
        n_programs=8,
        program_frac=0.04,
        library_median=4000.0,
    ),
    # VCC 2025 scale: 1 context, 300 perts x 880 cells + 36,000 controls = 300,000 cells x 18,080 genes
    "vcc": SimConfig(
        n_genes=18080,
        n_contexts=1,
        n_perts=300,
        cells_per_pert=880,
        n_controls=36000,
        n_batches=12,
        n_guides=4,
        n_programs=60,
        program_frac=0.02,
        library_median=12000.0,
        library_log_sd=0.45,
        frac_strong=0.3,
        frac_subtle=0.4,
        block_size=1024,
    ),
}


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


def _draw_truth(cfg: SimConfig) -> SimTruth:
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
class _CellTable:
    context: np.ndarray  # (N,) int: context index
    pert: np.ndarray  # (N,) int: perturbation index, -1 = control
    batch: np.ndarray  # (N,) int
    guide: np.ndarray  # (N,) int: guide index within the perturbation
    library: np.ndarray  # (N,) float64: L_i


def _draw_cells(cfg: SimConfig) -> _CellTable:
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
    return _CellTable(context=context, pert=pert, batch=batch, guide=guide, library=lib)


def _sample_block(
    cfg: SimConfig,
    truth: SimTruth,
    cells: _CellTable,
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


def _iter_blocks(
    cfg: SimConfig, truth: SimTruth, cells: _CellTable, effect: np.ndarray | None = None
) -> Iterator[tuple[int, int, np.ndarray]]:
    N = cells.pert.size
    for k, start in enumerate(range(0, N, cfg.block_size)):
        stop = min(start + cfg.block_size, N)
        yield start, stop, _sample_block(cfg, truth, cells, start, stop, k, effect)


def _obs_var_uns(
    cfg: SimConfig, truth: SimTruth, cells: _CellTable
) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    import pandas as pd

    perts = np.array([CONTROL_LABEL] + truth.perturbations, dtype=object)
    tg = perts[cells.pert + 1]
    guide = np.array([f"{t}_g{g + 1}" for t, g in zip(tg, cells.guide, strict=True)], dtype=object)
    guide_cats = [f"{t}_g{g + 1}" for t in perts for g in range(cfg.n_guides)]
    N = cells.pert.size
    width = max(6, len(str(N)))
    obs = pd.DataFrame(
        {
            PERT_COL: pd.Categorical(tg, categories=list(perts)),
            GUIDE_COL: pd.Categorical(guide, categories=guide_cats),
            BATCH_COL: pd.Categorical(
                np.array(truth.batches, dtype=object)[cells.batch], categories=truth.batches
            ),
            CONTEXT_COL: pd.Categorical(
                np.array(truth.contexts, dtype=object)[cells.context], categories=truth.contexts
            ),
        },
        index=pd.Index([f"cell_{i:0{width}d}" for i in range(N)]),
    )
    var = pd.DataFrame({"gene_id": truth.gene_ids}, index=pd.Index(truth.genes))
    # baseline composition per context, averaged over batches, without cell state
    lb = truth.log_base[:, None, :] + truth.batch_effect[None, :, :]  # (C, B, G)
    lb = lb - lb.max(axis=2, keepdims=True)
    q = np.exp(lb)
    q /= q.sum(axis=2, keepdims=True)
    base = np.log(q.mean(axis=1)).astype(np.float32)
    effect_norm = _effect_normalized(cfg, truth)
    uns = {
        SIM_UNS_KEY: {
            "version": SIM_VERSION,
            "seed": int(cfg.seed),
            "config_json": cfg.to_json(),
            "contexts": np.array(truth.contexts, dtype=object),
            "perturbations": np.array(truth.perturbations, dtype=object),
            "effect": truth.effect,
            "effect_normalized": effect_norm,
            "effect_class": np.array(truth.effect_class, dtype=object),
            "target_index": truth.target_index,
            "base_log_mean": base,
        }
    }
    return obs, var, uns


def _effect_normalized(cfg: SimConfig, truth: SimTruth, n_mc: int = 2048, chunk: int = 512) -> np.ndarray:
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


def _csr_from_dense(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data float32, indices int32, row nnz int64) of a dense count block, row-major order."""
    rows, cols = np.nonzero(x)
    return x[rows, cols].astype(np.float32), cols.astype(np.int32), np.bincount(rows, minlength=x.shape[0])


def simulate(
    config: SimConfig | str = "tiny", progress: Callable[[int, int], None] | None = None
) -> ad.AnnData:
    """Simulate a screen in memory and return it as AnnData.

    ``X`` is CSR float32 holding integer UMI counts; obs has categorical ``target_gene`` (controls:
    ``non-targeting``), ``guide_id``, ``batch``, ``context``; var_names are ``G00001``... with
    ``var["gene_id"]``; the ground truth is in ``uns[SIM_UNS_KEY]`` (see the module docstring).
    ``config`` may be a preset name. ``progress(done_cells, total_cells)`` is called after each block.
    """
    import anndata as ad
    import scipy.sparse as sp

    cfg = SimConfig.preset(config) if isinstance(config, str) else config
    truth = _draw_truth(cfg)
    cells = _draw_cells(cfg)
    datas, idxs, nnz = [], [], []
    N = cells.pert.size
    for _, stop, x in _iter_blocks(cfg, truth, cells):
        d, i, r = _csr_from_dense(x)
        datas.append(d)
        idxs.append(i)
        nnz.append(r)
        if progress is not None:
            progress(stop, N)
    indptr = np.concatenate([[0], np.cumsum(np.concatenate(nnz))]).astype(np.int64)
    X = sp.csr_matrix((np.concatenate(datas), np.concatenate(idxs), indptr), shape=(N, cfg.n_genes))
    obs, var, uns = _obs_var_uns(cfg, truth, cells)
    return ad.AnnData(X=X, obs=obs, var=var, uns=uns)


def write_simulated(
    config: SimConfig | str, path: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None
) -> None:
    """Simulate and stream the result to an ``.h5ad`` file, one block of cells at a time.

    Only one dense block (``block_size`` x ``n_genes``) and the growing on-disk CSR are ever held;
    the file equals ``simulate(config).write_h5ad(path)`` in content (X, obs, var, uns) and is read
    by ``anndata.read_h5ad``. The write is atomic (a temp file renamed on success).
    """
    import h5py
    from anndata.io import write_elem

    from celltwin._io import atomic_path

    cfg = SimConfig.preset(config) if isinstance(config, str) else config
    truth = _draw_truth(cfg)
    cells = _draw_cells(cfg)
    N, G = cells.pert.size, cfg.n_genes
    obs, var, uns = _obs_var_uns(cfg, truth, cells)
    with atomic_path(path, suffix=".h5ad") as tmp, h5py.File(tmp, "w") as f:
        f.attrs["encoding-type"] = "anndata"
        f.attrs["encoding-version"] = "0.1.0"
        g = f.create_group("X")
        g.attrs["encoding-type"] = "csr_matrix"
        g.attrs["encoding-version"] = "0.1.0"
        g.attrs["shape"] = np.array([N, G], dtype=np.int64)
        chunk = 1 << 16
        data = g.create_dataset("data", shape=(0,), maxshape=(None,), dtype=np.float32, chunks=(chunk,))
        indices = g.create_dataset("indices", shape=(0,), maxshape=(None,), dtype=np.int32, chunks=(chunk,))
        indptr = np.zeros(N + 1, dtype=np.int64)
        total = 0
        for start, stop, x in _iter_blocks(cfg, truth, cells):
            d, i, r = _csr_from_dense(x)
            data.resize((total + d.size,))
            indices.resize((total + d.size,))
            data[total:] = d
            indices[total:] = i
            indptr[start + 1 : stop + 1] = total + np.cumsum(r)
            total += d.size
            if progress is not None:
                progress(stop, N)
        g.create_dataset("indptr", data=indptr)
        write_elem(f, "obs", obs)
        write_elem(f, "var", var)
        write_elem(f, "uns", uns)
        for key in ("obsm", "varm", "obsp", "varp", "layers"):
            write_elem(f, key, {})


def simulate_eval_pair(
    n_perts: int = 10,
    cells_per_pert: int = 50,
    n_controls: int = 100,
    n_genes: int = 300,
    seed: int = 0,
    noise: float = 0.5,
) -> tuple[ad.AnnData, ad.AnnData]:
    """A (pred, real) pair of count AnnData for evaluator tests and benchmarks.

    ``real`` is :func:`simulate` of a one-context screen (``n_perts`` singles, 1/3 strong, 1/3 subtle).
    ``pred`` has the same obs (same cells per perturbation, same names, same genes) and shares
    ``real``'s control cells row for row (as a submission that copies the controls would); its
    perturbed cells are fresh draws (another stream, ``seed + 1``) from a model whose effect is
    ``(1 - noise) * true + noise * shuffled``, where ``shuffled`` is the true effect matrix of
    another perturbation (a random derangement of perturbations, genes unchanged). ``noise=0``
    gives a perfect-in-expectation prediction, ``noise=1`` one with every effect assigned to the
    wrong perturbation. Both X are CSR float32 counts.
    """
    import anndata as ad
    import scipy.sparse as sp

    if not (0.0 <= noise <= 1.0):
        msg = f"simulate_eval_pair: noise must be in [0, 1], got {noise!r}"
        raise ConfigError(msg)
    cfg = SimConfig(
        n_genes=n_genes,
        n_contexts=1,
        n_perts=n_perts,
        cells_per_pert=cells_per_pert,
        n_controls=n_controls,
        n_batches=1,
        n_programs=max(2, n_perts // 3),
        seed=seed,
    )
    real = simulate(cfg)
    truth = _draw_truth(cfg)
    cells = _draw_cells(cfg)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    P = len(truth.perturbations)
    perm = np.arange(P)
    if P > 1:
        perm = rng.permutation(P)
        while np.any(perm == np.arange(P)):
            perm = rng.permutation(P)
    eff = ((1.0 - noise) * truth.effect + noise * truth.effect[:, perm]).astype(np.float32)
    pcfg = cfg.replace(seed=seed + 1)
    blocks = [x for _, _, x in _iter_blocks(pcfg, truth, cells, effect=eff)]
    dense = np.concatenate(blocks, axis=0).astype(np.float32)
    ctrl = cells.pert < 0
    Xr = real.X
    dense[ctrl] = Xr[np.flatnonzero(ctrl)].toarray()
    pred = ad.AnnData(X=sp.csr_matrix(dense), obs=real.obs.copy(), var=real.var.copy())
    return pred, real
