"""The fixed point of VMBPO-MFE's exponential-TD critic loss (VMBPO eq. 39 with pplrl's
temperature tau): closed form against a numerical minimisation of pplrl's own loss."""

import numpy as np
import pytest
from experiments_loader import load_experiment

mfe = load_experiment("vmbpo_mfe")


@pytest.mark.parametrize("m, s, k", [(0.0, 1.0, 1.0), (-3.0, 0.5, 1.0), (2.0, 2.0, 0.01), (0.0, 1.5, 0.3)])
def test_gaussian_fixed_point_is_m_minus_1p5_k_s2(m, s, k):
    """argmin_Q E[(exp(k (Q - y)) - 1)^2] for y ~ N(m, s^2), found by minimising pplrl's exp_td_loss
    (no clamp) numerically, is m - 1.5 k s^2: at k = 1 and s = 1, 2 below the soft value m + s^2/2."""
    numeric = mfe.exp_td_loss_minimiser(m, s, k, clip=None)
    assert numeric == pytest.approx(m - 1.5 * k * s * s, abs=1e-6)
    assert mfe.exp_td_fixed_point_gaussian(m, s, k) == pytest.approx(numeric, abs=1e-6)
    if k == 1.0 and s == 1.0:
        assert mfe.soft_value_gaussian(m, s) - numeric == pytest.approx(2.0, abs=1e-6)


def test_general_fixed_point_matches_brute_force_on_a_two_point_target():
    """(1/k)(log E exp(-k y) - log E exp(-2 k y)) for y in {-2, 1} with probabilities 0.3, 0.7,
    against a grid search of the loss itself; it lies below the mean and the soft value."""
    y, w, k = np.array([-2.0, 1.0]), np.array([0.3, 0.7]), 1.0
    grid = np.linspace(-3, 2, 500_001)
    loss = (w[None] * np.expm1(k * (grid[:, None] - y[None])) ** 2).sum(1)
    brute = grid[loss.argmin()]
    q = mfe.exp_td_fixed_point(y, k, w)
    assert q == pytest.approx(brute, abs=2e-5)
    soft = np.log((w * np.exp(k * y)).sum()) / k
    assert q < (w * y).sum() < soft


def test_stable_loss_keeps_the_fixed_point_for_small_spread_and_moves_it_for_large():
    """The tangent continuation beyond |k (Q - y)| = 4 changes nothing while k s is small and
    pulls Q* up (less risk-averse) once the tails reach the clamp."""
    small = mfe.exp_td_loss_minimiser(0.0, 0.5, 1.0, clip=4.0)
    assert small == pytest.approx(-0.375, abs=1e-5)
    large_plain = mfe.exp_td_loss_minimiser(0.0, 2.0, 1.0, clip=None)
    large_stable = mfe.exp_td_loss_minimiser(0.0, 2.0, 1.0, clip=4.0)
    assert large_plain == pytest.approx(-6.0, abs=1e-5)
    assert large_stable > large_plain + 0.3


@pytest.mark.parametrize("s, k", [(1.0, 1.0), (0.5, 0.3)])
def test_linex_loss_has_the_soft_value_as_its_minimiser(s, k):
    """pplrl's exp_td_form='linex' (linex_td_loss): E[exp(k(y - Q)) - k(y - Q) - 1] is minimised
    at m + k s^2 / 2 (the soft value (1/k) log E exp(k y)), where eq. (39)'s loss gives
    m - 1.5 k s^2; the tangent continuation at 4 leaves it while k s is small."""
    assert mfe.linex_minimiser(1.0, s, k) == pytest.approx(1.0 + k * s * s / 2, abs=1e-6)
    assert mfe.linex_minimiser(1.0, s, k, clip=4.0) == pytest.approx(1.0 + k * s * s / 2, abs=1e-4)


def test_linex_continuation_is_c1_and_its_gradient_matches_finite_differences():
    """The clipped linex loss equals the plain one inside |u| <= c, is continuous with a
    continuous slope at +-c, linear beyond (slope 1 - exp(-u) frozen at the boundary), and its
    autograd gradient matches central differences everywhere."""
    import torch

    from pplrl.algorithms.vmbpo import linex_td_loss

    u = torch.linspace(-9, 9, 721, dtype=torch.float64, requires_grad=True)
    plain, clipped = linex_td_loss(u), linex_td_loss(u, 4.0)
    inside = u.detach().abs() <= 4
    torch.testing.assert_close(clipped[inside], plain[inside])
    (grad,) = torch.autograd.grad(clipped.sum(), u)
    h = 1e-6
    with torch.no_grad():
        fd = (linex_td_loss(u + h, 4.0) - linex_td_loss(u - h, 4.0)) / (2 * h)
    torch.testing.assert_close(grad, fd, rtol=1e-5, atol=1e-6)
    beyond = u.detach() < -4
    torch.testing.assert_close(grad[beyond], torch.full_like(grad[beyond], 1 - float(np.exp(4.0))))
    assert float(grad[u.detach() > 4].max()) == pytest.approx(1 - float(np.exp(-4.0)))
