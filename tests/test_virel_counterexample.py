"""VIREL Sec. 2.2: the MERL optimum p1* against its closed form, and the VIREL
Boltzmann policy choosing the optimal action as epsilon -> 0."""

import json
import math

import numpy as np
import pytest
from experiments_loader import load_experiment

from pplrl import tabular as tb
from pplrl.envs import virel_counterexample


@pytest.mark.parametrize("k1", [2, 4, 16])
@pytest.mark.parametrize("c", [0.2, 1.0, 5.0])
@pytest.mark.parametrize("gamma", [0.5, 0.9])
def test_merl_soft_vi_matches_closed_form(k1, c, gamma):
    mdp = virel_counterexample(k1, 10)
    _, _, pi = tb.maxent_value_iteration(mdp, c, gamma, action_mask=mdp.meta["action_mask"])
    assert pi[0, 0] == pytest.approx(1.0 / (k1 ** (-gamma) * math.exp(1.0 / c) + 1.0), abs=1e-12)
    # p1* > 1/2 (the MaxEnt MAP action is the suboptimal a1) exactly when c > 1/(gamma ln k1)
    assert (pi[0, 0] > 0.5) == (c > 1.0 / (gamma * math.log(k1)))
    # in s1 the MERL policy is uniform over the k1 actions (the maximiser of eq. 2's last term)
    np.testing.assert_allclose(pi[1, :k1], 1.0 / k1, atol=1e-12)


def test_virel_boltzmann_policy_picks_the_optimal_action():
    mdp = virel_counterexample(64, 10)
    mask = mdp.meta["action_mask"]
    p1 = [tb.boltzmann_fixed_point(mdp, eps, 0.9, action_mask=mask)[1][0, 0] for eps in (10.0, 1.0, 0.1, 0.01)]
    assert all(p < 0.5 for p in p1)
    assert all(a > b for a, b in zip(p1, p1[1:]))  # decreasing in epsilon
    assert p1[-1] < 1e-40
    Q, _ = tb.boltzmann_fixed_point(mdp, 0.01, 0.9, action_mask=mask)
    assert Q[0, 1] == pytest.approx(1.0) and Q[0, 0] == pytest.approx(0.0, abs=1e-12)  # Q* of the MDP


def test_bad_mask_and_temperature():
    mdp = virel_counterexample(2, 3)
    with pytest.raises(ValueError, match="action_mask"):
        tb.maxent_value_iteration(mdp, 1.0, 0.9, action_mask=np.zeros((2, 2), bool))
    with pytest.raises(ValueError, match="temperature"):
        tb.maxent_value_iteration(mdp, 0.0, 0.9)
    with pytest.raises(ValueError, match="epsilon"):
        tb.boltzmann_fixed_point(mdp, -1.0, 0.9)


def test_experiment_writes_plot_and_results(tmp_path):
    exp = load_experiment("virel_counterexample")
    exp.main(["--out", str(tmp_path), "--k1", "2", "8"])
    res = json.loads((tmp_path / "results.json").read_text())
    assert res["max_abs_error_closed_form_vs_soft_vi"] < 1e-10
    assert res["virel_max_p1"] < 0.5
    assert (tmp_path / "virel_counterexample.png").stat().st_size > 10_000


def test_virel_em_with_the_residual_temperature_reaches_the_greedy_optimum():
    """VIREL's own EM (epsilon = lambda * MSBE, recomputed as the critic learns): the
    suboptimal a1 never gets probability 1/2, where MERL's p1* is 0.94 at c = 1, and the
    residual, epsilon and pi(a1|s0) all go to 0 (Theorem 1's greedy policy in Q*)."""
    mdp = virel_counterexample(64, 10)
    mask = mdp.meta["action_mask"]
    Q_star, _ = tb.boltzmann_fixed_point(mdp, 1e-4, 0.9, action_mask=mask)
    for lam in (1.0, 100.0, 1000.0):
        em = tb.virel_em(mdp, 0.9, lam, iters=400, action_mask=mask)
        p1, eps = em["pi"][:, 0, 0], em["epsilon"]
        assert p1.max() < 0.5 and p1[-1] < 1e-9
        assert eps[0] > 0 and eps[-1] < 1e-12 * eps[0]
        np.testing.assert_allclose(em["Q"][0, :2], Q_star[0, :2], atol=1e-9)
    assert 1.0 / (64 ** -0.9 * math.exp(1.0) + 1.0) > 0.9  # MERL at c = 1 picks a1
    with pytest.raises(ValueError, match="lam"):
        tb.virel_em(mdp, 0.9, 0.0, action_mask=mask)
