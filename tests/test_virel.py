"""VIREL (virel and beta): the ELBO (eq. 4) from the Pyro model/guide, the E-step
against the closed-form Boltzmann policy, the M-step losses, the eps -> 0 limit,
bad input, runs and resume."""

import math

import numpy as np
import pyro
import pytest
import torch
from experiments_loader import interrupted_and_resumed, records

from guides.continuous import GaussianPolicy
from guides.virel import virel_guide
from models.actor import flat_prior
from models.sites import MIN_TEMPERATURE
from models.virel import virel_model
from pplrl.algorithms import VIREL, VIRELBeta, default_config
from pplrl.elbo import ReparamOptimalityELBO
from pplrl.replay import Batch
from pplrl.runner import train

TINY = dict(hidden=(32, 32), batch_size=32, learning_starts=50)


def tiny(algo="virel", **kw):
    return default_config(algo, **{**TINY, **kw})


def test_virel_elbo_by_hand():
    """Pyro's ELBO of virel_model/virel_guide = eq. (4), E_q[(Q - b)/eps] + H(q), on the same
    reparameterised sample, and the agent's loss is -eps times its batch mean (App. E.1)."""
    agent = VIREL(tiny(alpha=0.3), 3, 1)
    obs = torch.randn(16, 3)
    eps = torch.tensor(0.3)
    pyro.set_rng_seed(7)
    loss, terms = agent.actor_loss(obs, eps)
    pyro.set_rng_seed(7)
    d = agent.policy(obs)
    a = d.rsample()
    q, b, log_q = agent.critic.min(obs, a), agent.value_target(obs), d.log_prob(a)
    eq4 = ((q - b) / 0.3 - log_q).mean()  # eq. (4) with baseline, per state
    assert float(loss.detach()) == pytest.approx(-0.3 * float(eq4.detach()), rel=1e-5)
    assert terms["elbo"] / 16 == pytest.approx(float(eq4.detach()), rel=1e-5)
    assert terms["kl_policy"] / 16 == pytest.approx(float(log_q.mean().detach()), rel=1e-5)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.policy.parameters())


def _boltzmann_log_normaliser(q_fn, eps, n=200_001):
    a = torch.linspace(-1.0, 1.0, n, dtype=torch.float64)
    return float(torch.logsumexp(q_fn(a) / eps, 0) + math.log(2.0 / (n - 1)))


def _best_tanh_normal_kl(q_fn, eps, log_z):
    """min over TanhNormal(m, s) of KL(q || exp(Q/eps)/Z), by Gauss-Hermite quadrature
    in the pre-tanh variable and a grid over (m, s)."""
    x, w = np.polynomial.hermite_e.hermegauss(80)
    x, w = torch.tensor(x), torch.tensor(w / w.sum())
    m = torch.linspace(0.0, 0.8, 161, dtype=torch.float64)[:, None, None]
    s = torch.linspace(0.05, 0.6, 111, dtype=torch.float64)[None, :, None]
    a = torch.tanh(m + s * x)
    log_q = -0.5 * x**2 - torch.log(s) - 0.5 * math.log(2 * math.pi) - torch.log1p(-a**2)
    return float(((log_q - q_fn(a) / eps) * w).sum(-1).min() + log_z)


def test_e_step_reaches_the_boltzmann_policy():
    """With a fixed critic Q(a) = -4 (a - 0.3)^2 on [-1, 1] and eps = 0.5, maximising the
    ELBO for theta drives pi_theta towards exp(Q/eps)/Z (Theorem 3): KL(pi_theta || pi_omega)
    = log Z - L (log Z by quadrature) reaches the smallest KL the tanh-Gaussian family
    can attain (0.0214 nats, found by quadrature over the family) within 0.005."""
    torch.manual_seed(0)
    pyro.set_rng_seed(0)
    eps = 0.5

    def q_fn(a):
        return -4.0 * (a - 0.3).pow(2)

    log_z = _boltzmann_log_normaliser(q_fn, eps)
    obs = torch.zeros(256, 1)
    elbo = ReparamOptimalityELBO()
    prior = flat_prior(1)
    def critic(o, a):
        return q_fn(a[..., 0])
    with pyro.settings.context(module_local_params=True):
        policy = GaussianPolicy(1, 1, low=-1.0, high=1.0, hidden=(16,))
        opt = torch.optim.Adam(policy.parameters(), lr=1e-2)
        for _ in range(1500):
            loss = eps * elbo.differentiable_loss(virel_model, virel_guide, obs, prior, critic, eps, policy=policy)
            opt.zero_grad()
            loss.backward()
            opt.step()
        big = torch.zeros(20_000, 1)
        with torch.no_grad():
            L = -elbo.differentiable_loss(virel_model, virel_guide, big, prior, critic, eps, policy=policy)
    L = float(L) / 20_000
    kl = log_z - L
    kl_min = _best_tanh_normal_kl(q_fn, eps, log_z)
    assert kl_min == pytest.approx(0.0214, abs=1e-3)  # the tanh-Gaussian family cannot reach 0
    assert kl_min - 0.002 < kl < kl_min + 0.005, (log_z, L, kl_min)
    # and the mean action matches the Boltzmann mean
    a = torch.linspace(-1, 1, 20001, dtype=torch.float64)
    w = torch.softmax(q_fn(a) / eps, 0)
    boltzmann_mean = float((w * a).sum())
    with torch.no_grad():
        policy_mean = float(policy(big).sample().mean())
    assert policy_mean == pytest.approx(boltzmann_mean, abs=0.02)


def _batch(n=8, seed=0):
    g = np.random.default_rng(seed)
    return Batch.from_numpy(g.normal(size=(n, 3)), g.uniform(-1, 1, (n, 1)), g.normal(size=n),
                            g.normal(size=(n, 3)), (g.uniform(size=n) < 0.3).astype(float))


def test_m_step_losses_and_residual_by_hand():
    agent = VIREL(tiny(gamma=0.9), 3, 1)
    b = _batch()
    with torch.no_grad():
        y = b.rew + 0.9 * (1 - b.done) * agent.value_target(b.next_obs)
        q1, q2 = agent.critic(b.obs, b.act)
        expected_q = 0.5 * ((q1 - y).pow(2).mean() + (q2 - y).pow(2).mean())
        assert float(agent.critic_loss(b)) == pytest.approx(float(expected_q), rel=1e-5)
        assert float(agent.residual(b)) == pytest.approx(float(expected_q), rel=1e-5)
        # J^V: V(s) -> E_a[min Q(s, a)], no entropy term (VIREL's value is not soft)
        torch.manual_seed(3)
        got = agent.value_loss(b.obs)
        torch.manual_seed(3)
        a = agent.policy(b.obs).sample()
        expected_v = 0.5 * (agent.value(b.obs) - agent.critic.min(b.obs, a)).pow(2).mean()
        assert float(got) == pytest.approx(float(expected_v), rel=1e-5)


def test_beta_temperature_is_lambda_times_residual():
    agent = VIRELBeta(tiny("virel-beta", gamma=0.99), 3, 1)
    for r in (-2.0, -4.0, 2.0):
        agent.observe(np.zeros(3), np.zeros(1), r, np.zeros(3), False)
    assert agent.lam() == pytest.approx(0.01 / (8.0 / 3.0))
    assert float(agent.current_temperature(torch.tensor(5.0))) == pytest.approx(5.0 * 0.01 / (8.0 / 3.0))
    fixed = VIRELBeta(tiny("virel-beta", lam=4e-3), 3, 1)
    assert float(fixed.current_temperature(torch.tensor(5.0))) == pytest.approx(0.02)
    assert float(VIREL(tiny(alpha=0.25), 3, 1).current_temperature(torch.tensor(5.0))) == pytest.approx(0.25)


def test_vanishing_residual_is_the_greedy_limit_not_nan():
    """eps_hat = 0 (a critic that satisfies its Bellman equation): the temperature is
    floored, the tempered ELBO stays finite and equals E_q[Q - V] up to the floor, so the
    E-step is the deterministic policy gradient of Q (Theorem 1's greedy limit)."""
    agent = VIRELBeta(tiny("virel-beta", lam=1.0), 3, 1)
    t = agent.current_temperature(torch.tensor(0.0))
    assert float(t) == pytest.approx(MIN_TEMPERATURE)
    obs = torch.randn(32, 3)
    pyro.set_rng_seed(1)
    loss, _ = agent.actor_loss(obs, t)
    pyro.set_rng_seed(1)
    a = agent.policy(obs).rsample()
    greedy = -(agent.critic.min(obs, a) - agent.value_target(obs)).mean().detach()
    assert torch.isfinite(loss)
    assert float(loss.detach()) == pytest.approx(float(greedy), abs=1e-4)


@pytest.mark.parametrize("kw, match", [(dict(alpha=-0.1), "alpha"), (dict(lam=0.0), "lambda"),
                                       (dict(lam=-1.0), "lambda"), (dict(temperature="hot"), "temperature")])
def test_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        VIREL(tiny(**kw), 3, 1)


@pytest.mark.parametrize("algo", ["virel", "virel-beta"])
def test_short_run_logs_terms_and_resumes(algo, tmp_path):
    full = train(algo, tiny(algo), tmp_path / "full", 600, eval_every=200, eval_episodes=1, checkpoint_every=200,
                 progress=False)
    rows = [__import__("json").loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows for k in r}
    assert {"epsilon_omega", "alpha", "elbo", "elbo_tempered", "elbo_reward", "elbo_kl_policy"} <= logged
    kept, resumed = interrupted_and_resumed(algo, tiny(algo), tmp_path / "cut", 600, eval_every=200,
                                            eval_episodes=1, checkpoint_every=200, progress=False)
    assert kept == 400
    for p1, p2 in zip(full.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(p1, p2)
    assert records(tmp_path / "full" / "metrics.jsonl") == records(tmp_path / "cut" / "metrics.jsonl")
