"""The VCC 2026 competition scale of one context: baseline ``b``, replicate ``r``, scaled ``s``.

Each of the six ``vcc2026`` metrics (:data:`METRICS`) is reported on the scale

    s = (u - b) / (r - b)

where ``u`` is the submission's aggregate, ``b`` the aggregate of the mean-perturbation baseline
scored as an ordinary submission (:mod:`._baseline`) and ``r`` the reference scored against
itself by split halves (:mod:`._replicate`). A context's score is the equal-weight mean of
the six ``s`` (:func:`context_score`); contexts are averaged by the caller (``_run``).

This is celltwin's own implementation of the conventions of cell-eval2 0.20.0 ``--preset
vcc2026`` (``baseline.build_generic_baseline``, ``ceiling._disjoint_halves``,
``anchor.compute_replicate_anchor``, ``lfc_nmae_ref``, ``scoring.score_one``), written from its
documented behaviour and checked value for value against it in ``tests/eval/test_v2026_scale.py``.
The conventions of ``b`` and ``r`` stand with their code (:mod:`._baseline`, :mod:`._replicate`);
those of ``s``:

Scaled value ``s`` (cell-eval2 ``score.score_metrics(real_bundle=...)`` / ``scoring.score_one``):

* higher-is-better members (``pds_cosine`` and the three DE members in [0, 1]): ``(u - b)/(r - b)``
  unclamped; a missing or non-finite ``u`` scores as the metric's worst value 0.
* ``expr_mse_unbiased_capped_norm`` (lower is better): ``1 - (u - r)/(b - r)`` clamped to
  ``[0, 1]``; a missing ``u`` scores 0.
* ``de_wilcoxon_lfc_nmae`` (lower is better): ``1 - (u - r)/(b - r)``, floored at -6; a missing
  ``u`` scores -6.
* a metric whose ``r`` is not strictly on the better side of ``b`` has no scale: refused
  (:class:`ScaleError`).
* the context score is the mean of the six in the order lower-is-better members (sorted by name)
  then higher-is-better members (sorted by name), the order cell-eval2 averages them in.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from celltwin.errors import InputError

__all__ = [
    "METRICS",
    "POLICIES",
    "Policy",
    "ScaleError",
    "context_score",
    "scale",
    "scale_one",
]

#: The six scored members of the ``vcc2026`` profile.
METRICS: tuple[str, ...] = (
    "pds_cosine",
    "expr_mse_unbiased_capped_norm",
    "de_wilcoxon_direction_fidelity_yield_raw",
    "de_wilcoxon_direction_reach_raw",
    "de_wilcoxon_sig_jaccard",
    "de_wilcoxon_lfc_nmae",
)


class ScaleError(InputError):
    """A metric of a context has no usable scale (``r`` not strictly better than ``b``)."""


@dataclass(frozen=True)
class Policy:
    """How ``u`` is placed on the scale: direction, clamps, the value of a missing ``u``."""

    direction: str  # "higher" or "lower"
    clamp_low: float = -math.inf
    clamp_high: float = math.inf
    #: the metric's structural worst value, scored in place of a missing / non-finite ``u`` when
    #: the scale has no finite floor (the four unclamped members in [0, 1])
    worst: float | None = None


POLICIES: dict[str, Policy] = {
    "pds_cosine": Policy("higher", worst=0.0),
    "de_wilcoxon_direction_fidelity_yield_raw": Policy("higher", worst=0.0),
    "de_wilcoxon_direction_reach_raw": Policy("higher", worst=0.0),
    "de_wilcoxon_sig_jaccard": Policy("higher", worst=0.0),
    "expr_mse_unbiased_capped_norm": Policy("lower", clamp_low=0.0, clamp_high=1.0),
    "de_wilcoxon_lfc_nmae": Policy("lower", clamp_low=-6.0),
}
#: Order in which the six scaled values are averaged (lower-is-better, then higher, each sorted).
SCORE_ORDER: tuple[str, ...] = tuple(
    sorted(m for m in METRICS if POLICIES[m].direction == "lower")
    + sorted(m for m in METRICS if POLICIES[m].direction == "higher")
)


def _finite(x: Any) -> bool:
    try:
        return x is not None and math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def scale_one(metric: str, u: float | None, b: float, r: float) -> float:
    """``u`` of ``metric`` on the 0 = baseline / 1 = replicate scale, with its clamps."""
    pol = POLICIES[metric]
    if not (_finite(b) and _finite(r)):
        msg = f"{metric}: baseline {b!r} / replicate {r!r} is not finite; no scale"
        raise ScaleError(msg)
    b, r = float(b), float(r)
    span = (r - b) if pol.direction == "higher" else (b - r)
    if not (math.isfinite(span) and span > 0.0):
        msg = (
            f"{metric}: the replicate ({r:.6g}) is not better than the baseline ({b:.6g}); "
            "the reference gives this metric no scale"
        )
        raise ScaleError(msg)

    def _raw(x: float) -> float:
        if pol.direction == "higher":
            return (x - b) / (r - b)
        return 1.0 - (x - r) / (b - r)

    def _unusable() -> float:
        if math.isfinite(pol.clamp_low) or pol.worst is None:
            return pol.clamp_low
        return _clip(_raw(pol.worst), pol)

    if not _finite(u):
        return _unusable()
    s = _raw(float(u))
    if not math.isfinite(s):
        return _unusable()
    return _clip(s, pol)


def _clip(x: float, pol: Policy) -> float:
    if x <= pol.clamp_low:
        return pol.clamp_low
    return pol.clamp_high if x >= pol.clamp_high else x


def scale(u: Mapping[str, float], b: Mapping[str, float], r: Mapping[str, float]) -> dict[str, float]:
    """:func:`scale_one` for each of the six metrics."""
    return {m: scale_one(m, u.get(m), b[m], r[m]) for m in METRICS}


def context_score(s: Mapping[str, float]) -> float:
    """The context's score: the equal-weight mean of the six scaled values."""
    return float(np.mean([float(s[m]) for m in SCORE_ORDER]))
