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

Modules: this one holds the configuration (:class:`SimConfig`, :data:`PRESETS`) and the entry points;
the random draws are :mod:`celltwin.sim_draw`, the AnnData / ``.h5ad`` output :mod:`celltwin.sim_anndata`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from celltwin.errors import ConfigError
from celltwin.sim_anndata import to_anndata, write_h5ad
from celltwin.sim_draw import draw_cells, draw_truth, iter_blocks

if TYPE_CHECKING:  # pragma: no cover
    import anndata as ad

__all__ = [
    "EFFECT_CLASSES",
    "PRESETS",
    "SimConfig",
    "simulate",
    "simulate_eval_pair",
    "write_simulated",
]

EFFECT_CLASSES = ("strong", "subtle", "null", "combo")


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


def simulate(
    config: SimConfig | str = "tiny", progress: Callable[[int, int], None] | None = None
) -> ad.AnnData:
    """Simulate a screen in memory and return it as AnnData.

    ``X`` is CSR float32 holding integer UMI counts; obs has categorical ``target_gene`` (controls:
    ``non-targeting``), ``guide_id``, ``batch``, ``context``; var_names are ``G00001``... with
    ``var["gene_id"]``; the ground truth is in ``uns[SIM_UNS_KEY]`` (see the module docstring).
    ``config`` may be a preset name. ``progress(done_cells, total_cells)`` is called after each block.
    """
    cfg = SimConfig.preset(config) if isinstance(config, str) else config
    return to_anndata(cfg, draw_truth(cfg), draw_cells(cfg), progress)


def write_simulated(
    config: SimConfig | str, path: str | os.PathLike[str], progress: Callable[[int, int], None] | None = None
) -> None:
    """Simulate and stream the result to an ``.h5ad`` file, one block of cells at a time.

    Only one dense block (``block_size`` x ``n_genes``) and the growing on-disk CSR are ever held;
    the file equals ``simulate(config).write_h5ad(path)`` in content (X, obs, var, uns) and is read
    by ``anndata.read_h5ad``. The write is atomic (a temp file renamed on success).
    """
    cfg = SimConfig.preset(config) if isinstance(config, str) else config
    write_h5ad(cfg, draw_truth(cfg), draw_cells(cfg), path, progress)


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
    truth = draw_truth(cfg)
    cells = draw_cells(cfg)
    rng = np.random.default_rng(np.random.SeedSequence([seed, 3]))
    P = len(truth.perturbations)
    perm = np.arange(P)
    if P > 1:
        perm = rng.permutation(P)
        while np.any(perm == np.arange(P)):
            perm = rng.permutation(P)
    eff = ((1.0 - noise) * truth.effect + noise * truth.effect[:, perm]).astype(np.float32)
    pcfg = cfg.replace(seed=seed + 1)
    blocks = [x for _, _, x in iter_blocks(pcfg, truth, cells, effect=eff)]
    dense = np.concatenate(blocks, axis=0).astype(np.float32)
    ctrl = cells.pert < 0
    Xr = real.X
    dense[ctrl] = Xr[np.flatnonzero(ctrl)].toarray()
    pred = ad.AnnData(X=sp.csr_matrix(dense), obs=real.obs.copy(), var=real.var.copy())
    return pred, real
