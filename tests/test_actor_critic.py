"""The objective API (pplrl.algorithms.off_policy.ActorCritic): the critic target, actor
loss and dual are derived from one model/guide pair, so swapping a piece of the model
changes all of them together; SAC is its default."""

from __future__ import annotations

import numpy as np
import pyro
import pytest
import torch

from guides.actor import actor_guide
from guides.continuous import GaussianPolicy
from models.actor import actor_model, flat_prior
from models.sites import sample
from pplrl.algorithms import SAC, default_config
from pplrl.algorithms.off_policy import ActorCritic, ActorCriticConfig, Dual
from pplrl.distributions import TanhNormal
from pplrl.elbo import ReparamOptimalityELBO, soft_value
from pplrl.replay import Batch

TINY = dict(hidden=(16, 16), batch_size=16, learning_starts=20)


def fill(agent, n=40, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        o = rng.normal(size=agent.obs_dim).astype(np.float32)
        a = rng.uniform(-1, 1, agent.act_dim).astype(np.float32)
        agent.observe(o, a, float(-o @ o), (o + 0.1 * a.sum()).astype(np.float32), False)
    return agent


def batch(n=16, obs_dim=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, obs_dim, generator=g), torch.rand(n, 1, generator=g) * 2 - 1,
                 -torch.rand(n, generator=g), torch.randn(n, obs_dim, generator=g), torch.zeros(n))


def test_sac_soft_value_is_q_minus_alpha_log_q_from_the_pair():
    """V(x) read from actor_model/actor_guide equals the hand-written SAC target
    min Q'(x, a) - alpha log q(a|x) on the same sample, to the bit."""
    policy = GaussianPolicy(3, 1, -1.0, 1.0, (16,))
    q = lambda x, a: -(x.sum(-1) + a.sum(-1)) ** 2  # noqa: E731
    obs, alpha = torch.randn(32, 3), torch.tensor(0.3)
    with torch.no_grad():
        pyro.set_rng_seed(5)
        v = soft_value(actor_model, actor_guide, alpha, obs, flat_prior(1), q, 1.0 / alpha, policy=policy)
        pyro.set_rng_seed(5)
        d = policy(obs)
        a = d.rsample()
        by_hand = q(obs, a) - alpha * d.log_prob(a)
    assert torch.equal(v, by_hand)


def test_a_saturated_policy_at_its_log_std_floor_keeps_every_loss_finite():
    """A policy whose pre-squash mean is far past tanh's float32 range (loc 67) with its scale at
    the floor e^-20 (a HalfCheetah-v5 MBPO run reached both): each sample is scored at its own u,
    so -alpha log q stays ~alpha * 6 nats a dimension above 150 and the critic's target, its
    loss and the actor's loss are finite; read back from the action alone, log q was -4e20 and
    the target 5e18."""
    agent = fill(SAC(default_config("sac", **TINY), 3, 2))
    with torch.no_grad():
        last = agent.policy.net.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([67.0, -67.0, -25.0, -25.0]))  # mean, log-std (clamped to -20)
    b = batch(obs_dim=3)
    b = Batch(b.obs, b.act.expand(-1, 2).contiguous(), b.rew, b.next_obs, b.done)
    y = agent.critic_target_value(b)
    with torch.no_grad():
        q_next = agent.critic_target.min(b.next_obs, torch.tensor([[1.0, -1.0]]).expand(16, 2))
    # log q(a) = sum over 2 dims of log N(u; loc, e^-20) - log(1 - tanh(u)^2), u = loc + e^-20 eps:
    # (20 - log sqrt(2 pi) - eps^2 / 2) + (2 * 67 - 2 log 2) = 151.7 - eps^2 / 2 a dimension
    log_q = (q_next - (y - b.rew) / agent.config.gamma) / agent.alpha
    assert ((log_q > 2 * 151.7 - 12) & (log_q <= 2 * 151.7 + 0.01)).all()
    assert torch.isfinite(agent.critic_loss(b)) and torch.isfinite(agent.actor_loss(b.obs)[0])


def test_soft_value_with_a_prior_subtracts_the_log_ratio_and_is_the_per_state_elbo():
    """With a TanhNormal prior pi, V = Q' - alpha (log q - log pi); and the sum over states
    of V / alpha is the ELBO Pyro computes for the same sample (the critic target and the
    actor objective are one quantity)."""
    policy = GaussianPolicy(3, 1, -1.0, 1.0, (16,))
    prior = lambda x: TanhNormal(0.2 * x[..., :1], torch.full_like(x[..., :1], 0.7))  # noqa: E731
    q = lambda x, a: x.sum(-1) * a.sum(-1)  # noqa: E731
    obs, alpha = torch.randn(64, 3), torch.tensor(0.5)
    with torch.no_grad():
        pyro.set_rng_seed(2)
        v = soft_value(actor_model, actor_guide, alpha, obs, prior, q, 1.0 / alpha, policy=policy)
        pyro.set_rng_seed(2)
        d = policy(obs)
        a = d.rsample()
        by_hand = q(obs, a) - alpha * (d.log_prob(a) - prior(obs).log_prob(a))
        torch.testing.assert_close(v, by_hand)
        pyro.set_rng_seed(2)
        elbo = ReparamOptimalityELBO().terms(actor_model, actor_guide, obs, prior, q, 1.0 / alpha, policy=policy)
    assert float(v.sum() / alpha) == pytest.approx(elbo["elbo"], rel=1e-5)


class GaussianPriorSAC(ActorCritic):
    """SAC with the prior swapped for a fixed Gaussian: nothing else written."""

    def make_prior(self):
        return lambda x: TanhNormal(torch.zeros(x.shape[0], 1), torch.full((x.shape[0], 1), 0.3))


def test_swapping_the_prior_changes_the_critic_target_with_the_actor():
    cfg = ActorCriticConfig(**TINY)
    sac, other = SAC(default_config("sac", **TINY), 3, 1), GaussianPriorSAC(cfg, 3, 1)
    other.load_state_dict(sac.state_dict())  # same networks
    b = batch()
    pyro.set_rng_seed(0)
    y_sac = sac.critic_target_value(b)
    pyro.set_rng_seed(0)
    y_other = other.critic_target_value(b)
    pyro.set_rng_seed(0)
    with torch.no_grad():
        d = other.policy(b.next_obs)
        a = d.rsample()
        log_pi = other.prior(b.next_obs).log_prob(a)
        expected = b.rew + 0.99 * (other.critic_target.min(b.next_obs, a) - other.alpha * (d.log_prob(a) - log_pi))
    torch.testing.assert_close(y_other, expected)
    assert not torch.allclose(y_sac, y_other)
    _, terms = other.actor_loss(b.obs)
    assert terms["kl_policy"] != pytest.approx(0.0)  # the actor sees the same prior


def test_dual_on_a_term_the_model_does_not_have_is_a_clear_error():
    class Wrong(ActorCritic):
        def temperature(self):
            return Dual("kl_behaviour", 1.0)

    agent = fill(Wrong(ActorCriticConfig(**TINY), 3, 1))
    with pytest.raises(ValueError, match=r"dual is on term 'kl_behaviour', which the model does not have; "
                                         r"its terms: \['kl_policy', 'reward'\]"):
        agent.update(40)


def test_model_and_guide_with_different_sites_is_a_clear_error_naming_them():
    """A guide that samples the action under another name: the first thing the update derives
    (the critic target's soft value) stops, naming the sites on each side; so does the actor."""
    def guide(obs, prior, critic, scale, policy=None):
        with pyro.plate("states", obs.shape[0]):
            sample("a", 1, policy(obs))

    class Mismatched(ActorCritic):
        pass

    Mismatched.guide = staticmethod(guide)
    agent = fill(Mismatched(ActorCriticConfig(**TINY), 3, 1))
    match = r"do not match: the model's latent site 'a_0' is not in the guide \(the guide's sites: \['a_1'\]\)"
    with pytest.raises(ValueError, match=match):
        agent.update(40)
    with pytest.raises(ValueError, match=match):
        agent.actor_loss(torch.zeros(4, 3))


def test_sac_dual_is_the_entropy_target():
    """alpha's loss log_alpha * (target - KL): with the flat prior KL = E[log q], target = -H_target."""
    agent = fill(SAC(default_config("sac", init_alpha=2.0, **TINY), 3, 1))
    assert agent.dual == Dual("kl_policy", 1.0)
    terms = {"kl_policy": 16 * 0.4, "reward": 0.0, "elbo": 0.0}
    loss = agent.dual_loss(terms, 16)
    assert float(loss.detach()) == pytest.approx(np.log(2.0) * (1.0 - 0.4))
    loss.backward()  # descent lowers log alpha while the KL (0.4) is below its target (1.0)
    assert float(agent.log_alpha.grad) == pytest.approx(0.6)
    fixed = SAC(default_config("sac", autotune_alpha=False, **TINY), 3, 1)
    assert fixed.dual is None and float(fixed.dual_loss(terms, 16)) == 0.0


class LearnedPrior(ActorCritic):
    def make_prior(self):
        return GaussianPolicy(self.obs_dim, self.act_dim, -1.0, 1.0, (16,))

    def prior_loss(self, batch):
        return -self.prior(batch.obs).log_prob(batch.act).mean()


def test_a_learnable_prior_gets_its_own_optimiser_and_checkpoint():
    agent = fill(LearnedPrior(ActorCriticConfig(**TINY), 3, 1))
    before = {n: p.detach().clone() for n, p in agent.prior.named_parameters()}
    out = agent.update(40)
    assert "prior_loss" in out and np.isfinite(out["prior_loss"]) and "elbo_kl_policy" in out
    assert all(not torch.equal(p, before[n]) for n, p in agent.prior.named_parameters())
    state = agent.state_dict()
    assert {"prior", "prior_opt", "critic", "log_alpha"} <= set(state)
    copy = LearnedPrior(ActorCriticConfig(**TINY), 3, 1)
    copy.load_state_dict(state)
    for (n, p), (_, p2) in zip(agent.prior.named_parameters(), copy.prior.named_parameters()):
        assert torch.equal(p, p2), n
