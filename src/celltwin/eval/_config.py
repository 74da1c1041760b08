"""``EvalConfig``: the options of one evaluation (:func:`celltwin.eval.evaluate`), validated once.

Light: numpy, the standard library, celltwin.errors / _constants and the metric registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from celltwin._constants import CONTROL_LABEL, PERT_COL
from celltwin.errors import ConfigError

# the metric columns and profiles are defined once, in celltwin.eval._registry (cell-eval's order)
from celltwin.eval._registry import PROFILE_METRICS, PROFILES

__all__ = ["DEFAULT_CACHE_DIR", "EvalConfig"]

DEFAULT_CACHE_DIR = Path("~/.cache/celltwin").expanduser()


@dataclass
class EvalConfig:
    """Options of one evaluation (validated once).

    profile
        ``"vcc"``: ``overlap_at_N`` (DES), ``mae``, ``discrimination_score_l1`` (PDS), the 2025
        challenge metrics. ``"pds"``: PDS only (no DE, fast). ``"full"``: every metric of cell-eval's
        ``full`` profile (see :mod:`celltwin.eval._full`); ``clustering_agreement`` needs scanpy +
        python-igraph (``pip install 'celltwin[cluster]'``); ``pearson_edistance`` is quadratic in
        the number of control cells.
    pert_col, control
        obs column holding the perturbation and the control label in it.
    control_source
        ``"own"`` (cell-eval's behaviour): each file's deltas and DE use that file's own control
        cells. ``"real"``: the predicted side uses the *real* file's control cells instead of the
        predicted file's, for the pseudobulk deltas and for the DE test. Predicted controls are
        part of a submission and can be tuned to move the deltas and the DE calls (cell-eval issues
        #183 and #196); with ``"real"`` only the perturbed predictions are scored.
    reorder_genes
        When both files hold the same genes in a different order, reorder the prediction to the
        real order instead of failing.
    cache_dir
        Where the real-side DE table is cached by content hash (``None``: no cache).
    mode
        ``"v2"`` (default): cell-eval 0.8.2 + pdex 0.3.0. ``"legacy"``: the 2025 leaderboard scorer,
        cell-eval 0.6.6 + pdex 0.1.27: the DE tables come from ``de_table(..., mode="legacy")`` (no
        ``log2_fold_change`` column), and cell-eval 0.6.6 derives ``log2_fold_change =
        log2(fold_change)`` with NaN -> 0 (computed here as ``ln(fc)`` rounded to the fold change's
        dtype divided by ``ln 2`` in that dtype), correlates the float32 *fold changes* (not their logs) in
        ``de_spearman_lfc_sig`` (the correlation itself rounded to float32) and scores AUCs with ``-log10(fdr)`` where only ``fdr == 0`` is
        replaced by ``1e-10`` (no clipping). Every other rule is shared.
    progress
        Show rich progress bars on stderr.
    skip_metrics
        Metric columns to leave out of the profile (cell-eval ``--skip-metrics``); a cell-eval
        metric name covering several columns (``de_nsig_counts``) skips all of them. Unknown names
        raise :class:`ConfigError`; a known metric that the profile lacks is ignored, as in cell-eval.
    num_threads
        Numba threads of the DE computation (``de_table(n_threads=...)``); ``None``: numba's
        current setting (every core by default). Values are the same for any thread count.
    embed_key
        cell-eval's ``--embed-key``: ``discrimination_score_l2`` and ``discrimination_score_cosine``
        are computed on the pseudobulks of ``obsm[embed_key]`` (every dimension kept, no target
        exclusion) instead of the genes; every other metric still uses X (as in cell-eval, where
        the L1 score ignores the key).
    """

    profile: Literal["vcc", "pds", "minimal", "de", "full"] = "vcc"
    pert_col: str = PERT_COL
    control: str = CONTROL_LABEL
    control_source: Literal["own", "real"] = "own"
    reorder_genes: bool = False
    cache_dir: Path | None = None
    mode: Literal["v2", "legacy"] = "v2"
    progress: bool = False
    skip_metrics: tuple[str, ...] = ()
    num_threads: int | None = None
    embed_key: str | None = None

    def __post_init__(self) -> None:
        if self.profile not in PROFILE_METRICS:
            msg = f"EvalConfig.profile must be one of {', '.join(PROFILES)}, got {self.profile!r}"
            raise ConfigError(msg)
        if self.control_source not in ("own", "real"):
            msg = f"EvalConfig.control_source must be 'own' or 'real', got {self.control_source!r}"
            raise ConfigError(msg)
        if self.mode not in ("v2", "legacy"):
            msg = f"EvalConfig.mode must be 'v2' or 'legacy', got {self.mode!r}"
            raise ConfigError(msg)
        if not self.pert_col or not self.control:
            msg = "EvalConfig.pert_col and EvalConfig.control must be non-empty"
            raise ConfigError(msg)
        if self.cache_dir is not None:
            self.cache_dir = Path(self.cache_dir).expanduser()
        if self.embed_key is not None and (not isinstance(self.embed_key, str) or not self.embed_key):
            msg = f"EvalConfig.embed_key must be a non-empty obsm key or None, got {self.embed_key!r}"
            raise ConfigError(msg)
        self._check_skip_and_threads()

    def _check_skip_and_threads(self) -> None:
        from celltwin.eval._registry import metric_names, valid_skip_names

        if isinstance(self.skip_metrics, str):
            self.skip_metrics = (self.skip_metrics,)
        self.skip_metrics = tuple(str(m).strip() for m in self.skip_metrics if str(m).strip())
        unknown = [m for m in self.skip_metrics if m not in valid_skip_names()]
        if unknown:
            msg = (
                f"EvalConfig.skip_metrics: unknown metric {', '.join(map(repr, unknown))} "
                f"(valid: {', '.join(valid_skip_names())})"
            )
            raise ConfigError(msg)
        if not metric_names(self.profile, self.skip_metrics):
            msg = f"EvalConfig.skip_metrics removes every metric of profile {self.profile!r}"
            raise ConfigError(msg)
        n = self.num_threads
        if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1):
            msg = f"EvalConfig.num_threads must be a positive integer or None, got {self.num_threads!r}"
            raise ConfigError(msg)
