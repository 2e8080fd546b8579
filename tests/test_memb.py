"""MEMB: the model loss (eq. 4), the model-embedded ELBO (eq. 8) and its gradient
through the learned model (eq. 9) against finite differences, value expansion, model
fitting, bad input, runs and resume."""

import json

import numpy as np
import pyro
import pyro.distributions as dist
import pytest
import torch
from experiments_loader import interrupted_and_resumed, records

from guides.memb import memb_guide
from models.actor import flat_prior
from models.memb import memb_model
from pplrl.algorithms import MEMB, default_config
from pplrl.algorithms.memb import ReparamModel
from pplrl.elbo import ReparamOptimalityELBO
from pplrl.replay import Batch
from pplrl.runner import train

TINY = dict(hidden=(32, 32), batch_size=32, learning_starts=50, model_warmup_updates=20, m=2)


def tiny(**kw):
    return default_config("memb", **{**TINY, **kw})


def _batch(n=8, seed=0):
    g = np.random.default_rng(seed)
    return Batch.from_numpy(g.normal(size=(n, 3)), g.uniform(-1, 1, (n, 1)), g.normal(size=n),
                            g.normal(size=(n, 3)), (g.uniform(size=n) < 0.3).astype(float))


def test_model_loss_eq4_by_hand():
    model = ReparamModel(3, 1, (8,))
    b = _batch()
    torch.manual_seed(2)
    loss, info = model.loss(b)
    torch.manual_seed(2)
    d, r = model.dynamics(b.obs, b.act), model.reward_dist(b.obs, b.act)
    s1, r1 = d.rsample(), r.rsample()
    expected = 0.5 * (s1 - b.next_obs).pow(2).sum(-1).mean() + 0.5 * (r1 - b.rew).pow(2).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-6)
    mse = float((d.mean - b.next_obs).pow(2).sum(-1).mean().detach())
    assert info["model_state_mse"] == pytest.approx(mse, rel=1e-5)


class _Policy(torch.nn.Module):
    """A state-independent Gaussian policy with parameters (mean, log_std), float64."""

    def __init__(self):
        super().__init__()
        self.mean = torch.nn.Parameter(torch.tensor([0.2], dtype=torch.float64))
        self.log_std = torch.nn.Parameter(torch.tensor([-0.5], dtype=torch.float64))

    def forward(self, obs):
        return dist.Normal(self.mean.expand(obs.shape[0], 1), self.log_std.exp().expand(obs.shape[0], 1)).to_event(1)


def _tiny_world(obs, act):
    """A differentiable 'learned' model: s' = s + 0.5 a + 0.1 zeta, r = -(s + a)^2, V(s) = -s^2."""
    return dist.Normal(obs + 0.5 * act, 0.1 * torch.ones_like(obs)).to_event(1)


def _elbo_value(policy, obs, seed, alpha=0.3, gamma=0.9):
    elbo = ReparamOptimalityELBO()
    pyro.set_rng_seed(seed)
    # the ELBO is V(s) / alpha (models.sites' temperature convention): alpha times it is eq. (8)
    return -alpha * elbo.differentiable_loss(memb_model, memb_guide, obs, flat_prior(1, -10.0, 10.0), _tiny_world,
                                     lambda s, a: -(s + a).pow(2).sum(-1), lambda s: -s.pow(2).sum(-1), gamma,
                                     alpha, policy=policy), elbo.last_terms


def test_model_embedded_elbo_is_eq8_and_its_gradient_matches_finite_differences():
    """The ELBO is eq. (8)'s V(s) estimate (KL_d = 0: q_d is the model itself), and its
    gradient w.r.t. the policy parameters — which flows through the model's
    reparameterised sample (eq. 9) — equals central finite differences with common noise."""
    torch.set_default_dtype(torch.float64)
    try:
        policy = _Policy()
        obs = torch.linspace(-1, 1, 5)[:, None]
        value, terms = _elbo_value(policy, obs, seed=4)
        # by hand with the same noise: a = mean + std * e1, s' = s + 0.5 a + 0.1 e2
        pyro.set_rng_seed(4)
        d = policy(obs)
        a = d.rsample()
        s1 = _tiny_world(obs, a).rsample()
        by_hand = (-(obs + a).pow(2).sum(-1) + 0.9 * -(s1.pow(2).sum(-1)) - 0.3 * d.log_prob(a)).sum()
        assert float(value.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-10)
        assert terms["kl_dynamics"] == 0.0
        value.backward()
        grads = [p.grad.clone() for p in policy.parameters()]
        h = 1e-6
        for p, g in zip(policy.parameters(), grads):
            with torch.no_grad():
                p += h
            up, _ = _elbo_value(policy, obs, seed=4)
            with torch.no_grad():
                p -= 2 * h
            down, _ = _elbo_value(policy, obs, seed=4)
            with torch.no_grad():
                p += h
            fd = (float(up.detach()) - float(down.detach())) / (2 * h)
            assert float(g) == pytest.approx(fd, rel=1e-6, abs=1e-8)
        # a non-trivial gradient (the test would pass vacuously at 0)
        assert abs(float(grads[0])) > 0.1
    finally:
        torch.set_default_dtype(torch.float32)


def test_critic_target_h1_is_real_data_and_h2_expands_through_the_model():
    b = _batch()
    agent = MEMB(tiny(gamma=0.9), 3, 1)
    with torch.no_grad():
        y1 = agent.critic_target_value(b)
        torch.testing.assert_close(y1, b.rew + 0.9 * (1 - b.done) * agent.value_target(b.next_obs))
        agent2 = MEMB(tiny(gamma=0.9, horizon=2), 3, 1)
        torch.manual_seed(5)
        y2 = agent2.critic_target_value(b)
        torch.manual_seed(5)
        d = agent2.policy(b.next_obs)
        a = d.sample()
        r = agent2.world_model.reward_dist(b.next_obs, a).sample() - 0.2 * d.log_prob(a)
        s2 = agent2.world_model.dynamics(b.next_obs, a).sample()
        expected = b.rew + 0.9 * (1 - b.done) * r + 0.81 * (1 - b.done) * agent2.value_target(s2)
        torch.testing.assert_close(y2, expected)


def test_value_loss_eq5_by_hand():
    agent = MEMB(tiny(alpha=0.4), 3, 1)
    b = _batch()
    with torch.no_grad():
        torch.manual_seed(1)
        got = agent.value_loss(b.obs)
        torch.manual_seed(1)
        d = agent.policy(b.obs)
        a = d.sample()
        target = agent.critic.min(b.obs, a) - 0.4 * d.log_prob(a)
        assert float(got) == pytest.approx(float(0.5 * (agent.value(b.obs) - target).pow(2).mean()), rel=1e-5)


def test_model_learns_a_linear_system():
    """eq. (4) on s' = s + 0.3 a, r = -s_0^2: the mean prediction error falls below 1e-3."""
    torch.manual_seed(0)
    g = np.random.default_rng(0)
    obs, act = g.normal(size=(2000, 2)), g.uniform(-1, 1, (2000, 1))
    data = Batch.from_numpy(obs, act, -obs[:, 0] ** 2, obs + 0.3 * act, np.zeros(2000))
    model = ReparamModel(2, 1, (64, 64))
    model.set_normaliser(data.obs, data.act)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for i in range(1500):
        idx = torch.as_tensor(g.integers(0, 2000, 128))
        loss, info = model.loss(Batch(*(x[idx] for x in (data.obs, data.act, data.rew, data.next_obs, data.done))))
        opt.zero_grad()
        loss.backward()
        opt.step()
    _, info = model.loss(data)
    assert info["model_state_mse"] < 1e-3
    assert info["model_reward_mse"] < 5e-2


@pytest.mark.parametrize("kw, match", [(dict(alpha=-0.1), "alpha"), (dict(m=0), "m "), (dict(horizon=0), "horizon")])
def test_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        MEMB(tiny(**kw), 3, 1)


def test_short_run_logs_model_errors_and_resumes(tmp_path):
    full = train("memb", tiny(), tmp_path / "full", 600, eval_every=200, eval_episodes=1, checkpoint_every=200,
                 progress=False)
    rows = [json.loads(x) for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    logged = {k for r in rows for k in r}
    assert {"model_loss", "model_state_mse", "model_reward_mse", "elbo", "elbo_kl_dynamics"} <= logged
    kept, resumed = interrupted_and_resumed("memb", tiny(), tmp_path / "cut", 600, eval_every=200,
                                            eval_episodes=1, checkpoint_every=200, progress=False)
    assert kept == 400
    for p1, p2 in zip(full.world_model.parameters(), resumed.world_model.parameters()):
        assert torch.equal(p1, p2)
    assert records(tmp_path / "full" / "metrics.jsonl") == records(tmp_path / "cut" / "metrics.jsonl")


def test_table2_defaults_by_environment():
    assert default_config("memb", env_id="HalfCheetah-v5").alpha == 0.4
    assert default_config("memb", env_id="HalfCheetah-v5").model_hidden == (256, 128)
    assert default_config("memb", env_id="Walker2d-v5").m == 3
    assert default_config("memb", env_id="Pendulum-v1").model_hidden == (32, 16)
    assert default_config("memb", env_id="HalfCheetah-v5", alpha=0.1).alpha == 0.1  # overrides win
    assert default_config("memb", env_id="MountainCarContinuous-v0").alpha == 0.2  # not in the table
