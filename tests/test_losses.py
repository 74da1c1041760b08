"""Property and reference tests of celltwin.losses."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from celltwin.losses import energy_distance, gaussian_mmd, mean_mse, set_loss, sinkhorn_divergence


def _np_energy(x, y):
    dxy = np.linalg.norm(x[:, None] - y[None], axis=-1).mean()
    dxx = np.linalg.norm(x[:, None] - x[None], axis=-1).mean()
    dyy = np.linalg.norm(y[:, None] - y[None], axis=-1).mean()
    return 2 * dxy - dxx - dyy


def _np_mmd(x, y, bws):
    def k(a, b):
        d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
        return np.mean([np.exp(-d2 / (2 * s * s)) for s in bws], axis=0).mean()

    return k(x, x) + k(y, y) - 2 * k(x, y)


def _sets(dtype, b=3, n=7, m=9, d=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64).to(dtype)
    y = (torch.randn(b, m, d, generator=g, dtype=torch.float64) + 0.7).to(dtype)
    return x, y


def test_energy_hand_computed_1d():
    # x = {0, 1}, y = {3}: E|x-y| = 2.5, E|x-x'| = (0+1+1+0)/4 = 0.5, E|y-y'| = 0 -> 5 - 0.5 = 4.5
    x = torch.tensor([[0.0], [1.0]])
    y = torch.tensor([[3.0]])
    assert energy_distance(x, y).item() == pytest.approx(4.5, abs=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_energy_properties_and_numpy_reference(dtype):
    x, y = _sets(dtype)
    e = energy_distance(x, y)
    assert e.shape == (3,)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for b in range(3):
        ref = _np_energy(x[b].double().numpy(), y[b].double().numpy())
        assert e[b].item() == pytest.approx(ref, abs=tol)
    torch.testing.assert_close(energy_distance(y, x), e)  # symmetry
    assert (e > 0).all()  # non-negativity (strictly positive for different sets)
    assert (energy_distance(x, x) == 0).all()  # d(x, x) = 0 exactly
    # invariant to permuting the set
    perm = torch.randperm(x.shape[1])
    torch.testing.assert_close(energy_distance(x[:, perm], y), e)


@pytest.mark.reference
def test_energy_agrees_with_geomloss():
    from geomloss import SamplesLoss

    x, y = _sets(torch.float32, b=2, n=32, m=40, d=20, seed=3)
    ours = energy_distance(x, y)
    theirs = SamplesLoss("energy", blur=0.05)(x, y)  # geomloss: half the E-statistic
    torch.testing.assert_close(ours, 2 * theirs, rtol=1e-5, atol=1e-4)


def test_energy_gradient_finite_with_duplicates():
    x = torch.tensor([[[0.0, 1.0], [0.0, 1.0], [2.0, 0.0]]], requires_grad=True)
    y = torch.tensor([[[0.0, 1.0], [1.0, 1.0]]])
    energy_distance(x, y).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_mmd_properties_and_numpy_reference(dtype):
    x, y = _sets(dtype)
    bws = (0.5, 1.0, 3.0)
    m = gaussian_mmd(x, y, bws)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    for b in range(3):
        assert m[b].item() == pytest.approx(_np_mmd(x[b].double().numpy(), y[b].double().numpy(), bws), abs=tol)
    torch.testing.assert_close(gaussian_mmd(y, x, bws), m)
    assert (m > 0).all()
    assert gaussian_mmd(x, x, bws).abs().max().item() < 10 * tol
    md = gaussian_mmd(x, y)  # median heuristic
    assert (md > 0).all() and gaussian_mmd(x, x).abs().max().item() < 10 * tol


def test_sinkhorn_properties():
    x, y = _sets(torch.float32, n=16, m=16)
    s = sinkhorn_divergence(x, y, blur=0.05)
    assert s.shape == (3,) and (s > 0).all()
    assert sinkhorn_divergence(x, x, blur=0.05).abs().max().item() < 1e-4
    torch.testing.assert_close(sinkhorn_divergence(y, x), s, rtol=1e-3, atol=1e-4)
    # shifting a set by a constant vector c: W2^2 grows by |c|^2 (up to entropic blur)
    c = torch.tensor([3.0, 0, 0, 0, 0])
    big = sinkhorn_divergence(x, x + c, blur=0.05)
    assert big.mean().item() == pytest.approx(0.5 * 9.0, rel=0.05)  # geomloss cost is |x-y|^2 / 2


def test_mean_mse_hand_computed():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])  # mean (2, 3)
    y = torch.tensor([[0.0, 0.0]])
    assert mean_mse(x, y).item() == pytest.approx((4 + 9) / 2)


def test_set_loss_weighted_sum_and_parts():
    x, y = _sets(torch.float32)
    parts = set_loss(x, y, {"energy": 1.0, "mse": 0.5, "mmd": 0.0})
    assert set(parts) == {"loss", "energy", "mse", "mmd"}
    expected = energy_distance(x, y).mean() + 0.5 * mean_mse(x, y).mean()
    torch.testing.assert_close(parts["loss"], expected)
    assert not parts["mmd"].requires_grad
    with pytest.raises(ValueError, match="loss weights"):
        set_loss(x, y, {"wasserstein": 1.0})
