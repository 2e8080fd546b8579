"""The ELBO computed by Pyro from the model/guide pair, against brute-force
enumeration and against exact dynamic programming (VMBPO eqs. 4, 14-16; beta eq. 7)."""

import itertools

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI

from guides.tabular import TabularGuide
from models.trajectory import tabular_environment, trajectory_model
from pplrl import tabular as tb
from pplrl.elbo import OptimalityELBO, RiskSensitiveELBO
from pplrl.envs.tabular_envs import cliff_gridworld, random_mdp, risky_arm


def make(mdp, H, pi=None, initial=None, terminal_value=None, time_varying=True):
    P, R = torch.tensor(mdp.P), torch.tensor(mdp.R)
    pi = torch.tensor(mdp.uniform_policy() if pi is None else pi)
    init = dist.Categorical(probs=torch.tensor(mdp.p0)) if initial is None else initial
    V = None if terminal_value is None else torch.tensor(terminal_value)
    env = tabular_environment(P, R, pi, init, V)
    guide = TabularGuide(P, pi, horizon=H, time_varying=time_varying)
    return env, guide


def brute_force_elbo(mdp, pi, q_c, q_d, H, scale):
    """sum over all trajectories of q(xi) [sum_t scale r - log q_c/pi - log q_d/p]."""
    terms = np.zeros(3)
    for x0 in np.flatnonzero(mdp.p0):
        for seq in itertools.product(range(mdp.n_actions), range(mdp.n_states), repeat=H):
            x, prob, r, kc, kd = x0, mdp.p0[x0], 0.0, 0.0, 0.0
            for t in range(H):
                a, x2 = seq[2 * t], seq[2 * t + 1]
                if mdp.P[x, a, x2] == 0:  # q_d has mass < 1e-28 there (floored logits)
                    break
                prob *= q_c[t, x, a] * q_d[t, x, a, x2]
                r += scale * mdp.R[x, a, x2]
                kc += np.log(q_c[t, x, a] / pi[x, a])
                kd += np.log(q_d[t, x, a, x2] / mdp.P[x, a, x2])
                x = x2
            else:
                terms += prob * np.array([r, kc, kd])
    return terms


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_elbo_terms_match_brute_force(beta):
    mdp, H = random_mdp(4, 2, seed=7), 3
    env, guide = make(mdp, H)
    rng = np.random.default_rng(0)
    pyro.param("q.policy_delta", torch.tensor(rng.normal(size=(H, 4, 2))))
    pyro.param("q.dynamics_delta", torch.tensor(rng.normal(size=(H, 4, 2, 4))))
    q_c, q_d = guide.q_c().numpy(), guide.q_d().numpy()
    r, kc, kd = brute_force_elbo(mdp, mdp.uniform_policy(), q_c, q_d, H, 1 / beta)
    terms = OptimalityELBO().terms(trajectory_model, guide, env, H, beta=beta)
    assert terms["reward"] == pytest.approx(r, abs=1e-9)
    assert terms["kl_policy"] == pytest.approx(kc, abs=1e-9)
    assert terms["kl_dynamics"] == pytest.approx(kd, abs=1e-9)
    assert terms["elbo"] == pytest.approx(r - kc - kd, abs=1e-9)
    risk = RiskSensitiveELBO(beta).terms(trajectory_model, guide, env, H)
    assert risk["reward"] == pytest.approx(beta * r, abs=1e-8)  # E_q[sum r], unscaled
    assert risk["elbo"] == pytest.approx(beta * r - beta * (kc + kd), abs=1e-8)


def run_svi(elbo, guide, env, H, steps, lr=0.1, **kw):
    svi = SVI(trajectory_model, guide, pyro.optim.Adam({"lr": lr}), elbo)
    for _ in range(steps):
        svi.step(env, H, **kw)
    return elbo.terms(trajectory_model, guide, env, H, **kw)


def visited(q_c, q_d, p0, H):
    """State marginals under q at each step (to compare q only where it matters)."""
    d = [p0]
    for t in range(H - 1):
        d.append(np.einsum("s,sa,sak->k", d[-1], q_c[t], q_d[t]))
    return np.array(d)


@pytest.mark.parametrize("beta", [1.0, 3.0])
def test_svi_reaches_log_evidence_on_risky_arm(beta):
    """TOL: |ELBO - beta log p(O; beta)| < 1e-3 and |q - q*| < 1e-2 after 400 SVI steps."""
    mdp, H = risky_arm(), 2
    env, guide = make(mdp, H)
    exact = tb.soft_value_iteration(mdp, scale=1 / beta, horizon=H)
    terms = run_svi(RiskSensitiveELBO(beta), guide, env, H, steps=400)
    assert terms["elbo"] == pytest.approx(beta * exact.log_evidence(mdp.p0), abs=1e-3)
    q_c, q_d = guide.q_c().numpy(), guide.q_d().numpy()
    assert q_c[0, 0] == pytest.approx(exact.q_c[0, 0], abs=1e-2)  # the arm choice in S
    np.testing.assert_allclose(q_d[0, 0], exact.q_d[0, 0], atol=1e-2)  # optimistic branch


def test_svi_reaches_dp_optimum_on_random_mdp():
    """The ELBO's maximum is E_{p0}[V(x0)] (q keeps p0), which is log p(O) for a
    deterministic start and below it otherwise (Jensen).
    TOL: |ELBO - E_p0 V| < 2e-3; q_c, q_d within 2e-2 wherever q visits a state w.p. > 0.05."""
    mdp, H = random_mdp(4, 2, seed=11), 3
    env, guide = make(mdp, H)
    exact = tb.soft_value_iteration(mdp, scale=1.0, horizon=H)
    terms = run_svi(OptimalityELBO(), guide, env, H, steps=300, lr=0.1, eta=1.0)
    assert terms["elbo"] == pytest.approx(exact.elbo_optimum(mdp.p0), abs=2e-3)
    assert exact.elbo_optimum(mdp.p0) < exact.log_evidence(mdp.p0) - 1e-3
    q_c, q_d = guide.q_c().numpy(), guide.q_d().numpy()
    d = visited(q_c, q_d, mdp.p0, H)
    for t in range(H):
        for s in np.flatnonzero(d[t] > 0.05):
            np.testing.assert_allclose(q_c[t, s], exact.q_c[t, s], atol=2e-2)
            for a in range(2):
                if q_c[t, s, a] > 0.05:
                    np.testing.assert_allclose(q_d[t, s, a], exact.q_d[t, s, a], atol=2e-2)


@pytest.mark.parametrize("beta, steps", [(1.0, 800), (10.0, 500)])
def test_bootstrapped_elbo_on_cliff_gridworld(beta, steps):
    """Every state at once (a plate of start states), one step, bootstrapped with the
    exact soft value: the maximised ELBO is sum_x T[V](x) = sum_x V(x) (eqs. 6-7) and
    q_c, q_d are the closed forms (14)-(16). TOL: 1e-3 relative, 1e-2 on q_c, 2e-2 on q_d
    (small beta needs logits near -20, hence more steps)."""
    mdp = cliff_gridworld()
    exact = tb.soft_value_iteration(mdp, scale=1 / beta)
    starts = torch.arange(mdp.n_states)
    env, guide = make(mdp, 1, initial=starts, terminal_value=exact.V, time_varying=False)
    terms = run_svi(OptimalityELBO(), guide, env, 1, steps=steps, lr=0.1, beta=beta)
    assert terms["elbo"] == pytest.approx(exact.V.sum(), rel=1e-3)
    np.testing.assert_allclose(guide.q_c().numpy()[0], exact.q_c, atol=1e-2)
    relevant = exact.q_c > 0.05  # q_d matters (has gradient) where q_c takes the action
    np.testing.assert_allclose(guide.q_d().numpy()[0][relevant], exact.q_d[relevant], atol=2e-2)


def test_two_step_window_from_start_reaches_log_evidence_on_cliff():
    """A two-step window from the start state with the exact soft value at its end:
    the ELBO reaches log p(O=1) = V(start). TOL: 2e-3."""
    mdp = cliff_gridworld(rows=3, cols=4)
    exact = tb.soft_value_iteration(mdp, scale=1.0)
    env, guide = make(mdp, 2, terminal_value=exact.V)
    terms = run_svi(OptimalityELBO(), guide, env, 2, steps=600, lr=0.2, eta=1.0)
    assert terms["elbo"] == pytest.approx(exact.log_evidence(mdp.p0), abs=2e-3)


def test_pinned_dynamics_gives_maxent_objective():
    """With q_d = p (SAC's special case) the optimum is the MaxEnt soft value,
    log E_pi exp(r + V_maxent), which is below the VMBPO optimum."""
    mdp, H = random_mdp(4, 2, seed=11), 3
    P = torch.tensor(mdp.P)
    env, _ = make(mdp, H)
    guide = TabularGuide(P, torch.tensor(mdp.uniform_policy()), horizon=H, time_varying=True, learn_dynamics=False)
    terms = run_svi(OptimalityELBO(), guide, env, H, steps=300, eta=1.0)
    V = np.zeros(4)
    for _ in range(H):  # MaxEnt backup: Q = E_p[r + V], V = log E_pi exp Q
        Q = np.einsum("ijk,ijk->ij", mdp.P, mdp.R + V[None, None, :])
        V = tb.soft_v(Q, mdp.uniform_policy())
    assert abs(terms["kl_dynamics"]) < 1e-12  # q_d = p: zero up to float rounding
    assert terms["elbo"] == pytest.approx(float(mdp.p0 @ V), abs=2e-3)
    assert terms["elbo"] < tb.soft_value_iteration(mdp, horizon=H).elbo_optimum(mdp.p0) - 1e-2


def test_guide_parameters_move():
    mdp, H = risky_arm(), 2
    env, guide = make(mdp, H)
    run_svi(OptimalityELBO(), guide, env, H, steps=1, eta=1.0)
    assert pyro.param("q.policy_delta").abs().sum() > 0
    assert pyro.param("q.dynamics_delta").abs().sum() > 0


def test_site_mismatch_is_reported():
    mdp, H = risky_arm(), 2
    env, guide = make(mdp, H)

    def short_guide(env, horizon, **kw):
        guide(env, horizon - 1, **kw)

    with pytest.raises(ValueError, match=r"do not match.*(a_1.*x_2|x_2.*a_1)"):
        OptimalityELBO().loss(trajectory_model, short_guide, env, H, eta=1.0)


def test_elbo_bad_input():
    mdp, H = risky_arm(), 2
    env, guide = make(mdp, H)
    with pytest.raises(ValueError, match="beta"):
        RiskSensitiveELBO(0.0)
    with pytest.raises(ValueError, match="beta"):
        RiskSensitiveELBO(2.0).loss(trajectory_model, guide, env, H, beta=3.0)
    with pytest.raises(ValueError, match="horizon"):
        OptimalityELBO().loss(trajectory_model, guide, env, 0, eta=1.0)
    with pytest.raises(ValueError, match="eta"):
        OptimalityELBO().loss(trajectory_model, guide, env, H, eta=-1.0)
