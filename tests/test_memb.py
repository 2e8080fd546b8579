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


# -- the ablations: SVG variant, true model, value expansion (App. B.1, B.3, Sec. 3.2) -----------------
def test_true_model_step_equals_gymnasium_pendulum():
    """imagination='true' imagines with Pendulum-v1's own step: next observation and reward equal
    gymnasium's for random states, random actions, saturated actions and a clipped velocity."""
    from models.memb import pendulum_next_obs, pendulum_reward
    from pplrl.envs.continuous import make_continuous_env

    env = make_continuous_env("Pendulum-v1", seed=0)
    g = np.random.default_rng(0)
    obs_l, act_l, next_l, rew_l = [], [], [], []
    for i in range(40):
        obs, _ = env.reset(seed=i)
        if i % 4 == 0:  # velocity near the limit: the clip at 8 acts
            env.unwrapped.state = np.array([g.uniform(-np.pi, np.pi), 7.9 * np.sign(g.normal())])
            obs = env.unwrapped._get_obs()
        a = np.array([1.0 if i % 5 == 0 else -1.0 if i % 5 == 1 else g.uniform(-1, 1)], dtype=np.float32)
        nxt, r, *_ = env.step(a)
        obs_l.append(obs), act_l.append(a), next_l.append(nxt), rew_l.append(r)
    obs, act = torch.as_tensor(np.array(obs_l)), torch.as_tensor(np.array(act_l))
    torch.testing.assert_close(pendulum_next_obs(obs, act), torch.as_tensor(np.array(next_l)), atol=1e-5, rtol=0)
    torch.testing.assert_close(pendulum_reward(obs, act), torch.as_tensor(np.array(rew_l), dtype=torch.float32),
                               atol=1e-4, rtol=0)
    assert (np.abs(np.array(next_l)[:, 2]) >= 8.0 - 1e-6).any()  # the clip was exercised


def test_true_model_gradient_is_the_closed_form():
    """d thdot' / d a = 3 / (m l^2) dt * max_torque = 0.3 (unclipped), d r / d a = -0.002 * 4 a."""
    from models.memb import pendulum_next_obs, pendulum_reward

    obs = torch.tensor([[np.cos(0.3), np.sin(0.3), 1.0]], dtype=torch.float32)
    act = torch.tensor([[0.4]], requires_grad=True)
    (g,) = torch.autograd.grad(pendulum_next_obs(obs, act)[0, 2], act)
    assert float(g) == pytest.approx(0.3, rel=1e-5)
    (g,) = torch.autograd.grad(pendulum_reward(obs, act).sum(), act)
    assert float(g) == pytest.approx(-0.001 * 2 * 2.0 * 2.0 * 0.4, rel=1e-5)


def test_true_model_variant_uses_the_env_dynamics_in_the_policy_update():
    agent = MEMB(tiny(imagination="true"), 3, 1)
    (obs, _, dynamics, reward, *_), kw = agent.actor_args(torch.zeros(4, 3), None, torch.tensor(0.2))
    from models.memb import pendulum_next_obs

    s = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, -1.0]])
    a = torch.tensor([[0.2], [-0.7]])
    torch.testing.assert_close(dynamics(s, a).rsample(), pendulum_next_obs(s, a))
    with pytest.raises(ValueError, match="Pendulum-v1"):
        MEMB(tiny(imagination="true", env_id="HalfCheetah-v5"), 17, 6)


def _pendulum_batch(n=16, seed=0):
    """Real Pendulum-v1 transitions (deterministic s', reward), agent actions in [-1, 1]."""
    from models.memb import pendulum_next_obs, pendulum_reward

    g = np.random.default_rng(seed)
    th, thdot = g.uniform(-np.pi, np.pi, n), g.uniform(-4, 4, n)
    obs = torch.as_tensor(np.stack([np.cos(th), np.sin(th), thdot], 1), dtype=torch.float32)
    act = torch.as_tensor(g.uniform(-1, 1, (n, 1)), dtype=torch.float32)
    return Batch(obs, act, pendulum_reward(obs, act), pendulum_next_obs(obs, act), torch.zeros(n))


def _svg_actor_loss(agent, b, seed):
    agent._batch = b
    torch.manual_seed(seed)
    pyro.set_rng_seed(seed)
    return agent.actor_loss(b.obs, torch.tensor(0.2))[0]


def test_svg_variant_takes_the_policy_gradient_through_the_real_next_state():
    """imagination='real': at the replayed action the imagined s' and r *are* the real ones,
    d s'/d a is the model's Jacobian there, and the actor's loss is, with the same policy noise,
    -E[r(a) + gamma V_bar(s' + mu_f(s, a) - mu_f(s, a_k)) - alpha log pi(a)]; moving the real s'
    moves the SVG actor's loss and gradient, and leaves MEMB's (model-sampled s') unchanged."""
    b = _pendulum_batch()
    agent = MEMB(tiny(imagination="real", gamma=0.9), 3, 1)
    agent._batch = b
    (_, _, dynamics, reward, value_fn, *_), kw = agent.actor_args(b.obs, None, torch.tensor(0.2))
    torch.testing.assert_close(dynamics(b.obs, b.act).rsample(), b.next_obs)
    torch.testing.assert_close(reward(b.obs, b.act), b.rew)
    a = b.act.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(dynamics(b.obs, a).rsample()[:, 2].sum(), a)
    a2 = b.act.clone().requires_grad_(True)
    (g_model,) = torch.autograd.grad(agent.world_model.dynamics(b.obs, a2).mean[:, 2].sum(), a2)
    torch.testing.assert_close(g, g_model)
    assert g.abs().sum() > 0

    loss = _svg_actor_loss(agent, b, seed=3)
    torch.manual_seed(3)
    pyro.set_rng_seed(3)
    d = agent.policy(b.obs)
    act = d.rsample()
    wm = agent.world_model
    s1 = b.next_obs + wm.dynamics(b.obs, act).mean - wm.dynamics(b.obs, b.act).mean
    r = b.rew + wm.reward_dist(b.obs, act).mean - wm.reward_dist(b.obs, b.act).mean
    by_hand = -(r + 0.9 * agent.value_target(s1) - 0.2 * d.log_prob(act)).mean()
    assert float(loss.detach()) == pytest.approx(float(by_hand.detach()), rel=1e-5)

    moved = Batch(b.obs, b.act, b.rew, b.next_obs + torch.tensor([0.0, 0.0, 1.0]), b.done)
    grad = torch.autograd.grad(_svg_actor_loss(agent, b, 3), list(agent.policy.parameters()))
    grad_moved = torch.autograd.grad(_svg_actor_loss(agent, moved, 3), list(agent.policy.parameters()))
    assert float(_svg_actor_loss(agent, moved, 3).detach()) != pytest.approx(float(loss.detach()), rel=1e-4)
    assert any(not torch.allclose(x, y) for x, y in zip(grad, grad_moved))
    memb = MEMB(tiny(gamma=0.9), 3, 1)
    memb.load_state_dict(agent.state_dict())
    assert float(_svg_actor_loss(memb, b, 3).detach()) == float(_svg_actor_loss(memb, moved, 3).detach())


def test_svg_variant_needs_the_batch():
    agent = MEMB(tiny(imagination="real"), 3, 1)
    with pytest.raises(RuntimeError, match="batch"):
        agent.actor_args(torch.zeros(4, 3), None, torch.tensor(0.2))


def test_value_expansion_averages_q_loss_over_the_h_imagined_tuples():
    """H = 3, expansion_states='all' (Sec. 3.2): the critic loss is 1/H sum_t 1/2 sum_heads
    mean_B (Q(s_t, a_t) - y_t)^2 over the rollout from the real tuple, with y_t recomputed by
    hand from the same draws; 'first' is the t = 0 term alone, which is eq. 6's H = 1 loss
    with the expanded target."""
    b = _batch(16)
    agent = MEMB(tiny(gamma=0.9, horizon=3, alpha=0.3), 3, 1)
    torch.manual_seed(7)
    got = agent.critic_loss(b)
    torch.manual_seed(7)
    wm, pol = agent.world_model, agent.policy
    with torch.no_grad():
        s, states, acts, rews, logps = b.next_obs, [b.obs], [b.act], [b.rew], [None]
        for _ in range(2):
            d = pol(s)
            a = d.sample()
            r = wm.reward_dist(s, a).sample()
            s_next = wm.dynamics(s, a).sample()
            states.append(s), acts.append(a), rews.append(r), logps.append(d.log_prob(a))
            s = s_next
        v = agent.value_target(s)
        y2 = rews[2] + 0.9 * v
        y1 = rews[1] + 0.9 * (y2 - 0.3 * logps[2])
        y0 = b.rew + 0.9 * (1 - b.done) * (y1 - 0.3 * logps[1])
        per_t = []
        for t, (st, at, yt) in enumerate(zip(states, acts, (y0, y1, y2))):
            q1, q2 = agent.critic(st, at)
            alive = 1.0 if t == 0 else 1 - b.done  # imagined tuples after a real termination weigh 0
            per_t.append(0.5 * (alive * ((q1 - yt).pow(2) + (q2 - yt).pow(2))).mean())
    assert b.done.sum() > 0
    assert float(got.detach()) == pytest.approx(float(sum(per_t) / 3), rel=1e-5)
    # the target of the real tuple is y_0, as before
    torch.manual_seed(7)
    torch.testing.assert_close(agent.critic_target_value(b), y0)
    first = MEMB(tiny(gamma=0.9, horizon=3, alpha=0.3, expansion_states="first"), 3, 1)
    first.load_state_dict(agent.state_dict())
    torch.manual_seed(7)
    assert float(first.critic_loss(b).detach()) == pytest.approx(float(per_t[0]), rel=1e-5)
    assert abs(float(per_t[0]) - float(sum(per_t) / 3)) > 1e-3  # the two options differ here


@pytest.mark.parametrize("kw, match", [(dict(imagination="dream"), "imagination"),
                                       (dict(expansion_states="last"), "expansion_states")])
def test_bad_ablation_options(kw, match):
    with pytest.raises(ValueError, match=match):
        MEMB(tiny(**kw), 3, 1)
