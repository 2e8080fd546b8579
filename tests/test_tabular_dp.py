"""Exact solvers against each other, against closed forms, and against Pyro's
variable elimination (TraceEnum_ELBO with every model site enumerated)."""

import math

import numpy as np
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import TraceEnum_ELBO, config_enumerate

from models.trajectory import tabular_environment, trajectory_model
from pplrl import tabular as tb
from pplrl.envs.tabular_envs import cliff_gridworld, random_mdp, risky_arm, virel_counterexample


def test_risky_arm_soft_q_closed_form_and_switch():
    mdp = risky_arm()
    for beta in [0.5, 1.0, 2.0, 5.0, 20.0]:
        sol = tb.soft_value_iteration(mdp, scale=1 / beta, horizon=2)
        q_left, q_right = sol.Q[0, 0]
        assert q_left == pytest.approx(-5 / beta)
        assert q_right == pytest.approx(math.log(0.9 * math.exp(-10 / beta) + 0.1))
        # posterior ("optimistic") probability of the bad branch A, eq. (14)
        assert sol.q_d[0, 0, 1, 1] == pytest.approx(0.9 * math.exp(-10 / beta) / (0.9 * math.exp(-10 / beta) + 0.1))
    beta_star = 5 / math.log(9)  # solves log(0.9 u^2 + 0.1) = log u, u = exp(-5/beta)
    below = tb.soft_value_iteration(mdp, scale=1 / (beta_star * 0.99), horizon=2).Q[0, 0]
    above = tb.soft_value_iteration(mdp, scale=1 / (beta_star * 1.01), horizon=2).Q[0, 0]
    assert below[1] > below[0] and above[0] > above[1]


@pytest.mark.parametrize("make, scale", [
    (lambda: cliff_gridworld(), 1.0), (lambda: cliff_gridworld(), 0.2),
    (lambda: random_mdp(6, 3, seed=3).with_termination(0.7), 0.2),
    (lambda: random_mdp(4, 2, seed=5).with_termination(0.9), 1.0),
])
def test_value_and_policy_iteration_agree(make, scale):
    mdp = make()
    rng = np.random.default_rng(0)
    pi = rng.dirichlet(np.ones(mdp.n_actions), size=mdp.n_states)
    vi = tb.soft_value_iteration(mdp, pi, scale)
    pi_mb = tb.soft_policy_iteration(mdp, pi, scale, model_based=True)
    pi_mf = tb.soft_policy_iteration(mdp, pi, scale, model_based=False)
    for other in (pi_mb, pi_mf):
        np.testing.assert_allclose(other.V, vi.V, atol=1e-7)
        np.testing.assert_allclose(other.q_c, vi.q_c, atol=1e-7)
        np.testing.assert_allclose(other.q_d, vi.q_d, atol=1e-7)
    # closed forms are distributions, q_d only where p has mass, and V = T[V]
    np.testing.assert_allclose(vi.q_c.sum(-1), 1.0, atol=1e-9)
    np.testing.assert_allclose(vi.q_d.sum(-1), 1.0, atol=1e-9)
    assert np.all(vi.q_d[mdp.P == 0] == 0)
    # Lemma 1: V(x) = E_{q_c}[Q - log q_c/pi] at the optimum (eq. 10 with q_c*)
    lhs = np.sum(vi.q_c * (vi.Q - np.log(vi.q_c) + np.log(pi)), -1)
    np.testing.assert_allclose(lhs, vi.V, atol=1e-8)


@pytest.mark.parametrize("beta", [0.5, 1.0, 4.0])
def test_soft_backup_equals_pyro_variable_elimination(beta):
    """log p(O=1) by DP equals Pyro's exact marginal likelihood of the model."""
    mdp = random_mdp(5, 3, seed=2)
    H = 4
    P, R = torch.tensor(mdp.P), torch.tensor(mdp.R)
    rng = np.random.default_rng(1)
    pi = rng.dirichlet(np.ones(3), size=5)
    env = tabular_environment(P, R, torch.tensor(pi), dist.Categorical(probs=torch.tensor(mdp.p0)))
    model = config_enumerate(trajectory_model, default="parallel")
    log_z = -TraceEnum_ELBO(max_plate_nesting=0).loss(model, lambda *a, **k: None, env, H, beta=beta)
    exact = tb.soft_value_iteration(mdp, pi, 1 / beta, horizon=H).log_evidence(mdp.p0)
    assert log_z == pytest.approx(exact, abs=1e-9)


def test_large_beta_recovers_risk_neutral_policy():
    mdp = cliff_gridworld()
    V_star, Q_star = tb.value_iteration(mdp)
    greedy = Q_star.argmax(-1)
    _, Q_big = tb.risk_sensitive_value_iteration(mdp, scale=1 / 200.0)
    live = ~mdp.terminal & ~np.isin(np.arange(mdp.n_states), mdp.meta["cliff"])
    # the same value is reached by the risk-sensitive greedy policy
    pol = np.eye(4)[Q_big.argmax(-1)]
    assert tb.policy_evaluation(mdp, pol)[mdp.meta["start"]] == pytest.approx(V_star[mdp.meta["start"]], abs=0.02)
    assert np.mean(Q_big.argmax(-1)[live] == greedy[live]) > 0.9
    # small beta is risk seeking: it walks along the cliff edge and earns less
    _, Q_small = tb.risk_sensitive_value_iteration(mdp, scale=1.0)
    path = tb.greedy_path(mdp, np.eye(4)[Q_small.argmax(-1)])
    assert path == [18, 12, 13, 14, 15, 16, 17, 23]
    assert tb.policy_evaluation(mdp, np.eye(4)[Q_small.argmax(-1)])[18] < V_star[18] - 1.0
    # the risk-neutral optimum goes round, two rows above the cliff
    assert tb.greedy_path(mdp, np.eye(4)[greedy]) == [18, 12, 6, 7, 8, 9, 10, 11, 17, 23]


def test_termination_discounting_matches_discounted_values():
    """With termination prob 1-gamma, risk-neutral values are gamma * discounted values."""
    mdp = random_mdp(5, 2, seed=4)
    gamma = 0.8
    V_term, _ = tb.value_iteration(mdp.with_termination(gamma))
    # discounted value iteration by hand, reward earned only when the transition happens
    V = np.zeros(5)
    for _ in range(2000):
        V = np.max(np.einsum("ijk,ijk->ij", mdp.P, gamma * (mdp.R + V[None, None, :])), -1)
        V[mdp.terminal] = 0
    np.testing.assert_allclose(V_term[:5], V, atol=1e-8)


def test_virel_counterexample_shape():
    mdp = virel_counterexample(k1=3, k2=6)
    assert mdp.expected_reward[0].tolist()[:2] == [0.0, 1.0]
    assert mdp.meta["action_mask"][1].sum() == 3 and mdp.meta["action_mask"][0].sum() == 2
    V, _ = tb.value_iteration(mdp)
    assert V[0] == 1.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(beta=0.0), "beta"), (dict(beta=-1.0), "beta"), (dict(eta=0.0), "eta"),
    (dict(eta=float("nan")), "eta"), (dict(eta=1.0, beta=1.0), "either"),
])
def test_bad_temperatures(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tb.reward_scale(**kwargs)


def test_bad_tables_and_settings():
    mdp = risky_arm()
    P = mdp.P.copy()
    P[0, 1, 1] = 0.5  # row sums to 0.6
    with pytest.raises(ValueError, match=r"not a distribution.*\(0, 1\)"):
        tb.TabularMDP(P, mdp.R, mdp.p0, mdp.terminal)
    with pytest.raises(ValueError, match="p0"):
        tb.TabularMDP(mdp.P, mdp.R, np.ones(6), mdp.terminal)
    for gamma in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="gamma"):
            mdp.with_termination(gamma)
    for horizon in (0, -3, 1.5):
        with pytest.raises(ValueError, match="horizon"):
            tb.soft_value_iteration(mdp, horizon=horizon)
    with pytest.raises(ValueError, match="terminal state"):
        R = mdp.R.copy()
        R[3, 0, 3] = 1.0
        tb.TabularMDP(mdp.P, R, mdp.p0, mdp.terminal)
    with pytest.raises(ValueError, match="policy"):
        tb.soft_value_iteration(mdp, np.ones((6, 2)))
