"""Distribution losses between sets of cells, as pure functions returning named parts.

Every function takes two batches of sets ``x`` (B, N, D) and ``y`` (B, M, D) (a single set
(N, D) is treated as B = 1) and returns one value per set pair, shape (B,); nothing is
averaged over the batch here. :func:`set_loss` combines them with weights and returns a
dict of named, batch-averaged parts plus their weighted sum under ``"loss"``.

Definitions (V-statistics: all pairs including i = j, as in geomloss):

* :func:`energy_distance`: ``2 E|x - y| - E|x - x'| - E|y - y'|`` (Euclidean norm). This is
  the classical E-statistic; geomloss' ``SamplesLoss("energy")`` returns half of it (its
  kernel ``-|x - y|`` enters ``0.5 <a - b, K (a - b)>``). ``blur`` has no effect on the
  energy kernel in geomloss either.
* :func:`gaussian_mmd`: squared MMD with the kernel ``mean_s exp(-|x - y|^2 / (2 s^2))`` over
  bandwidths ``s``; default bandwidths are ``(0.5, 1, 2) x`` the median pairwise distance of
  the pooled set (detached, per pair of sets).
* :func:`sinkhorn_divergence`: debiased entropic OT, ``p = 2``, via geomloss (tensorized).
* :func:`mean_mse`: mean over features of the squared difference of the set means.

Precision: squared distances use ``|x|^2 + |y|^2 - 2 x.y`` (one matmul, like geomloss),
clamped at 0; a distance whose square is below ``1e-12`` is taken as exactly 0 with zero
gradient (the square root has an infinite derivative at 0). Because the three energy terms
use the same kernel, ``energy_distance(x, x) == 0`` exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = [
    "LOSSES",
    "energy_distance",
    "gaussian_mmd",
    "mean_mse",
    "pairwise_sq_dists",
    "set_loss",
    "sinkhorn_divergence",
]

_TINY = 1e-12


def _as_batch(x: torch.Tensor) -> torch.Tensor:
    if x.ndim == 2:
        return x.unsqueeze(0)  # (N, D) -> (1, N, D)
    if x.ndim != 3:
        msg = f"expected a set (N, D) or a batch of sets (B, N, D), got shape {tuple(x.shape)}"
        raise ValueError(msg)
    return x


def pairwise_sq_dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distances (B, N, M) between the rows of ``x`` (B, N, D) and ``y`` (B, M, D)."""
    xx = (x * x).sum(-1)  # (B, N)
    yy = (y * y).sum(-1)  # (B, M)
    d2 = xx[:, :, None] + yy[:, None, :] - 2 * torch.bmm(x, y.transpose(1, 2))  # (B, N, M)
    return d2.clamp_min(0)


def _dists(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    d2 = pairwise_sq_dists(x, y)
    safe = d2 > _TINY
    return torch.where(safe, torch.where(safe, d2, 1.0).sqrt(), torch.zeros_like(d2))  # (B, N, M)


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """E-statistic ``2 E|x-y| - E|x-x'| - E|y-y'|`` per set pair: (B,) (see module docstring)."""
    x, y = _as_batch(x), _as_batch(y)
    dxy = _dists(x, y).mean((1, 2))  # (B,)
    dxx = _dists(x, x).mean((1, 2))
    dyy = _dists(y, y).mean((1, 2))
    return 2 * dxy - dxx - dyy


def _median_bandwidth(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    z = torch.cat([x, y], dim=1).detach()  # (B, N+M, D)
    d = _dists(z, z)  # (B, K, K)
    n = d.shape[1]
    iu = torch.triu_indices(n, n, offset=1, device=d.device)
    med = d[:, iu[0], iu[1]].median(dim=1).values  # (B,)
    return med.clamp_min(1e-6)


def gaussian_mmd(
    x: torch.Tensor, y: torch.Tensor, bandwidths: tuple[float, ...] | None = None
) -> torch.Tensor:
    """Squared MMD with a multi-bandwidth Gaussian kernel, per set pair: (B,).

    ``bandwidths``: absolute kernel widths ``s``; None = ``(0.5, 1, 2)`` times the median
    pairwise distance of the pooled pair of sets (computed without gradient).
    """
    x, y = _as_batch(x), _as_batch(y)
    if bandwidths is None:
        med = _median_bandwidth(x, y)  # (B,)
        s = torch.stack([0.5 * med, med, 2 * med], dim=1)  # (B, K)
    else:
        s = torch.tensor(bandwidths, dtype=x.dtype, device=x.device).expand(x.shape[0], -1)  # (B, K)
    inv = 1.0 / (2 * s * s)  # (B, K)

    def k(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        d2 = pairwise_sq_dists(a, b)  # (B, N, M)
        return torch.exp(-d2[..., None] * inv[:, None, None, :]).mean(-1).mean((1, 2))  # (B,)

    return k(x, x) + k(y, y) - 2 * k(x, y)


def sinkhorn_divergence(x: torch.Tensor, y: torch.Tensor, blur: float = 0.05) -> torch.Tensor:
    """Debiased Sinkhorn divergence (p = 2, geomloss ``SamplesLoss("sinkhorn")``) per set pair: (B,)."""
    from geomloss import SamplesLoss

    x, y = _as_batch(x), _as_batch(y)
    fn = SamplesLoss("sinkhorn", p=2, blur=blur, backend="tensorized")
    return fn(x.float(), y.float()).to(x.dtype)


def mean_mse(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean over features of ``(mean_i x_i - mean_j y_j)^2`` per set pair: (B,)."""
    x, y = _as_batch(x), _as_batch(y)
    return ((x.mean(1) - y.mean(1)) ** 2).mean(-1)


LOSSES = ("energy", "mmd", "sinkhorn", "mse")


def set_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    weights: Mapping[str, float],
    *,
    blur: float = 0.05,
    bandwidths: tuple[float, ...] | None = None,
) -> dict[str, torch.Tensor]:
    """Weighted combination of set losses: ``{"loss": sum_k w_k L_k, k: L_k for k in weights}``.

    ``weights`` maps names from :data:`LOSSES` to weights (a zero weight still reports the part,
    computed without gradient). Parts are averaged over the batch; computed in float32 or
    wider (under autocast, bf16 inputs are upcast: precision choice).
    """
    unknown = sorted(set(weights) - set(LOSSES))
    if unknown or not weights:
        msg = f"loss weights must name some of {LOSSES}, got {sorted(weights)}"
        raise ValueError(msg)
    p = _as_batch(pred)
    t = _as_batch(target)
    if p.dtype in (torch.float16, torch.bfloat16):
        p = p.float()
    t = t.to(p.dtype)
    fns = {
        "energy": lambda a, b: energy_distance(a, b),
        "mmd": lambda a, b: gaussian_mmd(a, b, bandwidths),
        "sinkhorn": lambda a, b: sinkhorn_divergence(a, b, blur),
        "mse": mean_mse,
    }
    parts: dict[str, torch.Tensor] = {}
    total = p.new_zeros(())
    for name, w in weights.items():
        if w == 0:
            with torch.no_grad():
                parts[name] = fns[name](p, t).mean()
            continue
        val = fns[name](p, t).mean()
        parts[name] = val
        total = total + w * val
    return {"loss": total, **parts}
