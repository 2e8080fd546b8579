"""VMBPO, VMBPO-MFE, beta-VMBPO: each step's loss against a hand computation, the
weighted q_d fit against the closed form (14), the dual on beta, and beta = 1."""

import copy
import dataclasses

import numpy as np
import pyro
import pytest
import torch

from models.dynamics import GaussianEnsemble
from pplrl.algorithms import VMBPO, VMBPOMFE, BetaVMBPO, default_config
from pplrl.algorithms.vmbpo import VMBPOConfig
from pplrl.diagnostics import NonFiniteError
from pplrl.replay import Batch
from pplrl.runner import train

TINY = dict(hidden=(16, 16), batch_size=32, learning_starts=100, gradient_steps=1, model_train_freq=100,
            model_epochs=1, model_min_updates=0, ensemble_size=3, num_elites=2, model_hidden=(16, 16))


def agent(cls=VMBPO, **kw):
    torch.manual_seed(0)
    a = cls(cls.Config(**{**TINY, **kw}), 3, 1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        o = rng.normal(size=3).astype(np.float32)
        act = rng.uniform(-1, 1, 1).astype(np.float32)
        a.observe(o, act, float(-o @ o), o + 0.1 * act.sum(), False)
    if a.ensemble is not None:  # VMBPO-MFE holds no models by default
        a.fit_model()
        a.fit_variational_dynamics(0)
    return a


def batch(n=8, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(torch.randn(n, 3, generator=g), torch.rand(n, 1, generator=g) * 2 - 1, -torch.rand(n, generator=g),
                 torch.randn(n, 3, generator=g), (torch.rand(n, generator=g) < 0.2).float())


def test_step1_weights_by_hand():
    a, b = agent(VMBPO, eta=0.5), batch()
    v = a.value_target(b.next_obs)
    expected = torch.exp(0.5 * (b.rew + 0.99 * (1 - b.done) * v - a.critic_target.min(b.obs, b.act)))
    torch.testing.assert_close(a.dynamics_weights(b, 0), expected)
    beta = agent(BetaVMBPO, beta_init=0.05)  # large 1/beta: the clamp (-4, 4) of App. C.1 bites
    torch.manual_seed(3)
    w = beta.dynamics_weights(b, 0)
    torch.manual_seed(3)
    d = beta.policy(b.next_obs)
    a2 = d.rsample()
    log_q = d.log_prob(a2)
    soft_v = beta.critic_target.min(b.next_obs, a2) - (log_q - beta.prior_policy(b.next_obs).log_prob(a2)) / 20.0
    soft_v = soft_v - beta.alpha * log_q  # App. C.1's entropy regulariser (on by default)
    td = 20.0 * (b.rew + 0.99 * (1 - b.done) * soft_v - beta.critic_target.min(b.obs, b.act))
    torch.testing.assert_close(w, td.clamp(-4, 4).exp())
    assert w.max() <= np.exp(4) + 1e-4 and w.min() >= np.exp(-4) - 1e-6


def test_step2_nu_loss_by_hand():
    a, b = agent(VMBPO, nu_clip=None), batch()
    model_next = b.next_obs + 0.3
    nu_q = a.nu(torch.cat([b.obs, b.act, model_next], -1)).squeeze(-1)
    nu_p = a.nu(torch.cat([b.obs, b.act, b.next_obs], -1)).squeeze(-1)
    torch.testing.assert_close(a.nu_loss((b.obs, b.act, model_next), (b.obs, b.act, b.next_obs), 0),
                               -(nu_q.mean() - nu_p.exp().mean()))
    # the p side from the prior model's samples (nu_reference='model'), nu softly bounded by 0.5
    c = agent(VMBPO, nu_clip=0.5)
    prior_next = b.next_obs - 0.2
    raw_q = c.nu(torch.cat([b.obs, b.act, model_next], -1)).squeeze(-1)
    raw_p = c.nu(torch.cat([b.obs, b.act, prior_next], -1)).squeeze(-1)
    nu_q, nu_p = 0.5 * torch.tanh(raw_q / 0.5), 0.5 * torch.tanh(raw_p / 0.5)
    torch.testing.assert_close(c.nu_loss((b.obs, b.act, model_next), (b.obs, b.act, prior_next), 0),
                               -(nu_q.mean() - nu_p.exp().mean()))
    torch.testing.assert_close(c.log_ratio(b.obs, b.act, model_next), nu_q)


def test_nu_actions_policy_fits_nu_on_the_critics_model_samples(monkeypatch):
    """nu_actions='policy' (eq. 21's E): nu's q side is the critic's own model rows (x, a ~ q_c,
    x' ~ q_d), its p side p_theta's x' from the same pass as the critic's reward, and the update
    runs no model pass beyond the critic's two; 'replay' runs two more, at the real (x, a)."""
    calls = []
    for nu_actions, extra in (("policy", 0), ("replay", 2)):
        a = agent(VMBPO, nu_actions=nu_actions, real_ratio=0.25)
        for ens in (a.q_dynamics, a.ensemble):
            original = ens.predict
            monkeypatch.setattr(ens, "predict", lambda *args, _f=original, **kw: calls.append(1) or _f(*args, **kw))
        calls.clear()
        a.e_step_update(0)
        assert len(calls) == 2 + extra, nu_actions
    c, b = agent(VMBPO, nu_actions="policy", real_ratio=0.25), batch(8)
    mb, prior_next = c.model_samples(b)
    (qx, qa, qn), (px, pa, pn) = c.nu_samples(b, "model", (mb, prior_next))
    for t, ref in ((qx, mb.obs[2:]), (qa, mb.act[2:]), (qn, mb.next_obs[2:]), (px, mb.obs[2:]), (pa, mb.act[2:]),
                   (pn, prior_next)):
        torch.testing.assert_close(t, ref)
    assert prior_next.shape == (6, b.obs.shape[1]) and not torch.equal(prior_next, mb.next_obs[2:])
    _, (px, pa, pn) = c.nu_samples(b, "real", (mb, prior_next))  # the paper's D on the p side
    for t, ref in ((px, b.obs), (pa, b.act), (pn, b.next_obs)):
        torch.testing.assert_close(t, ref)
    with pytest.raises(ValueError, match="nu_actions must be 'replay' or 'policy'"):
        agent(VMBPO, nu_actions="both")
    with pytest.raises(ValueError, match="real_ratio=1 leaves none"):
        agent(VMBPO, nu_actions="policy", real_ratio=1.0)


def test_nu_clip_bounds_the_log_ratio():
    """nu = c tanh(raw / c): |nu| < c whatever the network says, gradient never zero."""
    a, b = agent(VMBPO, nu_clip=8.0), batch()
    with torch.no_grad():
        for p in a.nu.parameters():
            p.mul_(50.0)
        r = a.log_ratio(b.obs, b.act, b.next_obs)
        raw = a.nu(torch.cat([b.obs, b.act, b.next_obs], -1)).squeeze(-1)
    assert float(raw.abs().max()) > 8.0  # the network alone would exceed the bound
    assert float(r.abs().max()) <= 8.0 and torch.all(torch.isfinite(r))
    assert VMBPO.Config().nu_clip == 2 * VMBPO.Config().td_clamp  # log q_d/p of the clamped q_d


def test_exp_td_loss_by_hand():
    """(e^u - 1)^2 inside the clamp; its tangent outside (value and slope by hand)."""
    from pplrl.algorithms.vmbpo import exp_td_loss

    u = torch.tensor([-6.0, -1.0, 0.0, 0.5, 4.0, 7.0], requires_grad=True)
    loss = exp_td_loss(u, 4.0)
    f = lambda x: (np.exp(x) - 1) ** 2  # noqa: E731
    df = lambda x: 2 * (np.exp(x) - 1) * np.exp(x)  # noqa: E731
    expected = [f(-4) + df(-4) * (-2), f(-1), 0.0, f(0.5), f(4), f(4) + df(4) * 3]
    np.testing.assert_allclose(loss.detach().numpy(), expected, rtol=1e-5)
    loss.sum().backward()
    np.testing.assert_allclose(u.grad.numpy(), [df(-4), df(-1), 0.0, df(0.5), df(4), df(4)], rtol=1e-5)
    torch.testing.assert_close(exp_td_loss(u.detach(), None), torch.expm1(u.detach()).square())


def test_step3_critic_and_value_losses_by_hand():
    a, b = agent(VMBPO, eta=2.0, entropy_regularizer=False), batch()
    ratio = torch.linspace(-1, 1, 8)
    y = b.rew + 0.99 * (1 - b.done) * a.value_target(b.next_obs) - ratio / 2.0
    q1, q2 = a.critic(b.obs, b.act)
    expected = ((q1 - y) ** 2).mean() + ((q2 - y) ** 2).mean()
    torch.testing.assert_close(a.critic_loss(b, ratio, 0), expected)
    torch.manual_seed(4)
    vl = a.value_loss(b.obs)
    torch.manual_seed(4)
    d = a.policy(b.obs)
    act = d.sample()
    target = a.critic.min(b.obs, act) - (d.log_prob(act) - a.prior_policy(b.obs).log_prob(act)) / 2.0
    torch.testing.assert_close(vl, ((a.value(b.obs) - target) ** 2).mean())
    # with the entropy regulariser (the default): the target also has - alpha log q_c(a|x)
    e = agent(VMBPO, eta=2.0, init_alpha=0.3)
    torch.manual_seed(4)
    vl = e.value_loss(b.obs)
    torch.manual_seed(4)
    d = e.policy(b.obs)
    act = d.sample()
    log_q = d.log_prob(act)
    target = e.critic.min(b.obs, act) - (log_q - e.prior_policy(b.obs).log_prob(act)) / 2.0 - 0.3 * log_q
    torch.testing.assert_close(vl, ((e.value(b.obs) - target) ** 2).mean())


def test_mfe_exponential_td_critic_by_hand():
    # eq. (39) as printed: temperature 1 (the preset's default is 0.01, below)
    a, b = agent(VMBPOMFE, eta=0.5, td_clamp=None, exp_td_temperature=1.0), batch()
    y = b.rew + 0.99 * (1 - b.done) * a.value_target(b.next_obs)
    q1, q2 = a.critic(b.obs, b.act)
    expected = torch.expm1(0.5 * (q1 - y)).square().mean() + torch.expm1(0.5 * (q2 - y)).square().mean()
    torch.testing.assert_close(a.critic_loss(b, None, 0), expected)
    # with the clamp (the default, 4): a reward 40 below Q gives u = 0.5 * 40 = 20 > 4: tangent
    c = agent(VMBPOMFE, eta=0.5, exp_td_temperature=1.0)
    far = Batch(b.obs, b.act, b.rew - 40.0, b.next_obs, b.done)
    y = far.rew + 0.99 * (1 - far.done) * c.value_target(far.next_obs)
    q1, q2 = c.critic(far.obs, far.act)

    def tangent(u):
        inside = u.clamp(-4, 4)
        return torch.expm1(inside) ** 2 + 2 * torch.expm1(inside) * inside.exp() * (u - inside)
    expected = tangent(0.5 * (q1 - y)).mean() + tangent(0.5 * (q2 - y)).mean()
    torch.testing.assert_close(c.critic_loss(far, None, 0), expected)
    assert float(expected.detach()) < 1e6  # linear in u: ~2e5 here; the plain loss would be ~exp(40) = 2e17
    # temperature tau: (exp(tau u) - 1)^2 / tau^2; small tau approaches the squared TD error
    t = agent(VMBPOMFE, eta=0.5, td_clamp=None, exp_td_temperature=0.1)
    y = b.rew + 0.99 * (1 - b.done) * t.value_target(b.next_obs)
    q1, q2 = t.critic(b.obs, b.act)
    expected = sum(torch.expm1(0.05 * (q - y)).square().mean() / 0.01 for q in (q1, q2))
    torch.testing.assert_close(t.critic_loss(b, None, 0), expected)
    s = agent(VMBPOMFE, eta=0.5, td_clamp=None, exp_td_temperature=1e-4)
    mse = sum(((0.5 * (q - y)) ** 2).mean() for q in s.critic(b.obs, b.act))
    torch.testing.assert_close(s.critic_loss(b, None, 0), mse, rtol=1e-3, atol=1e-6)
    # exp_td_form='linex': (exp(-tau u) + tau u - 1) / tau^2 per head
    lx = agent(VMBPOMFE, eta=0.5, td_clamp=None, exp_td_temperature=1.0, exp_td_form="linex")
    y = b.rew + 0.99 * (1 - b.done) * lx.value_target(b.next_obs)
    expected = sum((torch.expm1(-0.5 * (q - y)) + 0.5 * (q - y)).mean() for q in lx.critic(b.obs, b.act))
    torch.testing.assert_close(lx.critic_loss(b, None, 0), expected)
    with pytest.raises(ValueError, match="exp_td_form must be 'eq39' or 'linex'"):
        VMBPOMFE.Config(exp_td_form="huber").validate()
    assert VMBPOMFE.Config().exp_td_temperature == 0.01 and VMBPO.Config().exp_td_temperature == 1.0
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="exp_td_temperature"):
            VMBPOMFE.Config(exp_td_temperature=bad).validate()


def test_policy_log_ratio_is_exact_for_a_sharp_policy():
    """pi = q_c gives log q_c/pi = 0 exactly, even for a nearly deterministic policy whose
    samples sit at the tanh bounds (the cached pre-squash u made it up to 1e4 nats)."""
    a, b = agent(VMBPO, entropy_regularizer=False), batch(256)
    with torch.no_grad():
        last = a.policy.net.layers[-1]
        last.weight.zero_()
        last.bias.copy_(torch.tensor([6.0, -9.0]))  # mean 6 (tanh = 1 - 1e-5), log std -9
    a.m_step(b.obs)
    act, ratio, log_q = a.policy_log_ratio(b.obs)
    assert torch.equal(ratio, torch.zeros_like(ratio))
    assert torch.all(torch.isfinite(log_q))
    torch.manual_seed(4)
    vl = a.value_loss(b.obs)
    torch.manual_seed(4)
    act = a.policy(b.obs).sample()
    torch.testing.assert_close(vl, ((a.value(b.obs) - a.critic.min(b.obs, act)) ** 2).mean())


def test_exploration_noise_schedule():
    """VMBPO paper Table 4: N(0, sigma) on pi's action, sigma = 1 decayed 0.999 per step, floor 0.025."""
    a = agent(VMBPO, exploration_noise=1.0, learning_starts=100)  # agent() observed 200 steps
    assert a.exploration_std() == pytest.approx(0.999 ** 100)
    a.steps_seen = 10_000
    assert a.exploration_std() == 0.025
    obs = np.zeros(3, dtype=np.float32)
    assert np.array_equal(a.act(obs, deterministic=True), a.prior_policy.act(torch.zeros(1, 3), True)[0].numpy())
    assert agent(VMBPO).exploration_std() == 0.0


def test_step4_actor_elbo_by_hand():
    a, b = agent(VMBPO, eta=2.0, entropy_regularizer=False), batch()
    pyro.set_rng_seed(7)
    loss, terms = a.actor_loss(b.obs)
    pyro.set_rng_seed(7)
    d = a.policy(b.obs)
    act = d.rsample()
    expected = ((d.log_prob(act) - a.prior_policy(b.obs).log_prob(act)) / 2.0 - a.critic.min(b.obs, act)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert terms["reward"] == pytest.approx(float(2.0 * a.critic.min(b.obs, act).sum().detach()), rel=1e-5)


def test_actor_critic_reads_the_online_or_the_target_critic():
    """actor_critic='online' (default, VMBPO eq. 25) reads Q, 'target' (beta-VMBPO eq. 13) Q'; both
    train only q_c; anything else is refused."""
    a, b = agent(BetaVMBPO, entropy_regularizer=False), batch()
    with torch.no_grad():  # make Q' differ from Q
        for p in a.critic_target.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for reading, critic in (("online", a.critic), ("target", a.critic_target)):
        a.config = dataclasses.replace(a.config, actor_critic=reading)
        pyro.set_rng_seed(3)
        loss, terms = a.actor_loss(b.obs)
        pyro.set_rng_seed(3)
        act = a.policy(b.obs).rsample()
        assert terms["reward"] == pytest.approx(float(a.scale * critic.min(b.obs, act).sum().detach()), rel=1e-5)
        loss.backward()
        assert all(p.grad is None for p in [*a.critic.parameters(), *a.critic_target.parameters()])
        assert all(p.requires_grad for p in a.critic.parameters())
    with pytest.raises(ValueError, match="actor_critic must be 'online' or 'target'"):
        default_config("beta-vmbpo", actor_critic="Q'").validate()


def test_dual_descent_on_beta():
    a = agent(BetaVMBPO, beta_init=1.0, epsilon_kl=0.5, beta_lr=0.1)
    a.update_beta(kl=2.0)  # KL above epsilon: beta goes up
    assert a.beta > 1.0
    b = agent(BetaVMBPO, beta_init=1.0, epsilon_kl=0.5, beta_lr=0.1)
    b.update_beta(kl=0.1)  # below: beta goes down
    assert b.beta < 1.0
    for update, lr in (("adam_log", 1.0), ("algorithm1", 1e3)):
        c = agent(BetaVMBPO, beta_init=9.9e6, beta_lr=lr, beta_update=update)
        for _ in range(5):
            c.update_beta(kl=1e3)
        assert c.beta == pytest.approx(1e7, rel=1e-5)  # clamped, App. C.4
    torch.testing.assert_close(a.dual_beta_loss(0.2), a.log_beta.exp() * (0.5 - 0.2))
    d = agent(BetaVMBPO, beta_init=100.0, epsilon_kl=10.0, beta_lr=3e-4)  # Algorithm 1: a plain step on beta
    d.update_beta(kl=1.0)
    assert d.beta == pytest.approx(100.0 - 3e-4 * (10.0 - 1.0), rel=1e-12)


def test_beta_follows_algorithm_1s_schedule_once_per_env_step(monkeypatch):
    """beta-VMBPO Algorithm 1: K E-step updates, then one step of the dual on beta on a KL
    estimate; beta-VMBPO's critic has no log term, so the updates compute no log-ratio and the
    KL is estimated once per env step (kl_estimate); 'adam_log' keeps the old per-update Adam
    step on each update's own estimate."""
    kls = iter([1.0, 2.0, 6.0] * 4)
    calls = []

    def fake_e_step(self, step):
        calls.append("e")
        if self.critic_needs_log_ratio:  # adam_log: the update's own KL
            self.last_kl = next(kls)
            self.update_beta(self.last_kl)
            return {"kl_dynamics": self.last_kl}
        return {}

    def fake_kl(self):
        calls.append("kl")
        return 3.0

    monkeypatch.setattr(BetaVMBPO, "e_step_update", fake_e_step)
    monkeypatch.setattr(BetaVMBPO, "kl_estimate", fake_kl)
    a = agent(BetaVMBPO, beta_init=100.0, epsilon_kl=10.0, beta_lr=0.01, gradient_steps=3)
    a.q_dynamics_fitted = True
    out = a.update(step=1)  # not a model-fitting step
    assert calls == ["e", "e", "e", "kl"]
    assert a.beta == pytest.approx(100.0 - 0.01 * (10.0 - 3.0), rel=1e-12)
    assert out["beta"] == a.beta and out["epsilon_kl"] == 10.0 and out["kl_dynamics"] == 3.0
    calls.clear()
    b = agent(BetaVMBPO, beta_init=100.0, epsilon_kl=10.0, beta_lr=0.01, gradient_steps=3, beta_update="adam_log")
    b.q_dynamics_fitted = True
    b.update(step=1)
    assert calls == ["e", "e", "e"]
    assert b.beta == pytest.approx(100.0 * np.exp(-0.03), rel=1e-3)  # three Adam steps of ~lr on log beta
    with pytest.raises(ValueError, match="beta_update"):
        BetaVMBPO(BetaVMBPO.Config(**{**TINY, "beta_update": "sgd"}), 3, 1)


def test_the_two_beta_schedules_over_10k_env_steps():
    """The issue's simulation, at the Pendulum bench's settings (epsilon 10, 2 updates per env
    step, lr 3e-4, a steady KL of 1 nat): Algorithm 1's schedule leaves beta near 73; Adam on
    log beta at every update drives it to ~1.6, VMBPO's regime."""
    a = agent(BetaVMBPO, beta_init=100.0, epsilon_kl=10.0)
    for _ in range(10_000):
        a.update_beta(kl=1.0)
    assert a.beta == pytest.approx(100.0 - 10_000 * 3e-4 * 9.0, rel=1e-9)  # 73
    b = agent(BetaVMBPO, beta_init=100.0, epsilon_kl=10.0, beta_update="adam_log")
    for _ in range(20_000):
        b.update_beta(kl=1.0)
    assert b.beta < 3.0


def test_beta_one_fixed_reproduces_vmbpo_losses():
    """beta-VMBPO's code with beta = 1 fixed (and VMBPO's estimator choices) computes
    exactly VMBPO's losses with eta = 1: one implementation, scale = eta = 1/beta."""
    shared = dict(log_ratio="nu", critic_log_ratio=True, value_network=True, td_clamp=None,
                  entropy_regularizer=False)
    v = agent(VMBPO, eta=1.0, **shared)
    bv = agent(BetaVMBPO, beta_init=1.0, learn_beta=False, **shared)
    for p1, p2 in zip(v.critic.parameters(), bv.critic.parameters()):
        assert torch.equal(p1, p2)
    b, ratio = batch(), torch.linspace(-1, 1, 8)
    assert v.scale == bv.scale == 1.0
    torch.testing.assert_close(v.dynamics_weights(b, 0), bv.dynamics_weights(b, 0))
    torch.testing.assert_close(v.critic_loss(b, ratio, 0), bv.critic_loss(b, ratio, 0))
    pyro.set_rng_seed(2)
    l1 = v.actor_loss(b.obs)[0]
    pyro.set_rng_seed(2)
    l2 = bv.actor_loss(b.obs)[0]
    torch.testing.assert_close(l1, l2)


def test_weighted_q_d_fit_matches_closed_form():
    """p(x'|x,a) = N(x + a, 0.5^2) and V(x') = k x' give q_d* = N(x + a + k 0.25, 0.5^2)
    (eq. 14: exponential tilting of a Gaussian); the weighted likelihood of step 1 recovers it.
    TOL: mean shift within 0.05 of 0.25, std within 15 % of 0.5."""
    torch.manual_seed(0)
    n, k = 6000, 1.0
    obs, act = torch.randn(n, 1), torch.rand(n, 1) * 2 - 1
    nxt = obs + act + 0.5 * torch.randn(n, 1)
    w = torch.exp(k * (nxt - obs - act)).squeeze(-1)  # exp(V(x') - Q(x,a)) up to a per-(x,a) constant
    with pyro.settings.context(module_local_params=True):
        ens = GaussianEnsemble(1, 1, ensemble_size=2, num_elites=2, hidden=(32, 32), name="test_qd")
        ens.fit(obs, act, nxt, torch.zeros(n), epochs=40, weights=w, seed=0, lr=3e-3)
        x, a = torch.zeros(200, 1), torch.linspace(-0.8, 0.8, 200)[:, None]
        _, _, info = ens.predict(x, a, deterministic=True)
    shift = info["mean"][:, 0] - a[:, 0]
    assert float(shift.mean()) == pytest.approx(k * 0.25, abs=0.05)
    assert float(info["var"][:, 0].sqrt().mean()) == pytest.approx(0.5, rel=0.15)


def test_diverging_exponent_is_named():
    a = agent(VMBPO, max_log_weight=1e-3)
    b = batch()
    b = Batch(b.obs, b.act, b.rew + 100.0, b.next_obs, b.done)
    with pytest.raises(NonFiniteError, match=r"q_d weight exp\(TD\).*step 17"):
        a.dynamics_weights(b, 17)


@pytest.mark.parametrize("kw, match", [(dict(beta_init=0.0), "beta init"), (dict(epsilon_kl=-1.0), "epsilon"),
                                       (dict(eta=0.0), "eta"), (dict(model_train_freq=0), "model_train_freq"),
                                       (dict(log_ratio="x"), "log_ratio"),
                                       (dict(q_d_min_updates=-1), "q_d_min_updates")])
def test_bad_input(kw, match):
    with pytest.raises(ValueError, match=match):
        VMBPOConfig(**kw).validate()


@pytest.mark.parametrize("algo", ["vmbpo", "vmbpo-mfe", "beta-vmbpo"])
def test_short_runs_log_every_term(algo, tmp_path):
    import json

    # VMBPO-MFE has no model samples in its E-step and fits no model by default (Algorithm 2);
    # with fit_dynamics=True its KL is logged at the fits
    cfg = default_config(algo, **TINY, **({"fit_dynamics": True} if algo == "vmbpo-mfe" else {}))
    train(algo, cfg, tmp_path, 300, eval_every=300, eval_episodes=1, checkpoint_every=300, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    kl = "kl_dynamics_ensembles" if algo == "vmbpo-mfe" else "kl_dynamics"
    assert train_rows and all(k in train_rows[-1] for k in ("elbo", "elbo_kl_policy", kl, "beta",
                                                             "critic_loss", "actor_loss"))
    assert all(np.isfinite(r[kl]) for r in train_rows if kl in r)
    assert any(r["kind"] == "eval" for r in rows)


def test_vmbpo_mfe_fits_no_dynamics_by_default(tmp_path):
    """Algorithm 2 has no model: VMBPO-MFE holds no ensembles, logs no model term and
    checkpoints none; with fit_dynamics=True it holds and fits both; a model-based E-step
    refuses fit_dynamics=False."""
    import json

    from pplrl.runner import agent_from_checkpoint

    train("vmbpo-mfe", default_config("vmbpo-mfe", **TINY), tmp_path, 300, eval_every=300, eval_episodes=1,
          checkpoint_every=300, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert train_rows and all(np.isfinite(r["critic_loss"]) for r in train_rows)
    assert not any(k.startswith(("kl_dynamics", "model_holdout", "q_d_")) for r in train_rows for k in r)
    restored, ckpt = agent_from_checkpoint(tmp_path)
    assert restored.ensemble is None and restored.q_dynamics is None
    assert not {"ensemble", "q_dynamics"} & set(ckpt["agent"])
    a = agent(VMBPOMFE)
    assert a.ensemble is None and a.q_dynamics is None
    fitted = agent(VMBPOMFE, fit_dynamics=True)
    before = [p.clone() for p in fitted.q_dynamics.parameters()]
    fitted.steps_seen = 10_000
    fitted.update(fitted.config.model_train_freq)
    assert not all(torch.equal(p, q) for p, q in zip(before, fitted.q_dynamics.parameters()))
    with pytest.raises(ValueError, match="fit_dynamics=False needs e_step='model_free'"):
        VMBPOConfig(fit_dynamics=False).validate()


def test_only_vmbpo_holds_nu_and_older_checkpoints_with_nu_still_load():
    """nu (eq. 21) exists where it is the log-ratio: VMBPO's, not beta-VMBPO's (the ensembles'
    ratio) or VMBPO-MFE's (no q_d). Checkpoints written before held an untrained nu in those
    agents; loading one drops it and restores everything else."""
    assert agent(VMBPO).nu is not None and {"nu", "nu_opt"} <= set(agent(VMBPO).state_dict())
    assert agent(VMBPO, log_ratio="ensembles").nu is None
    for cls in (BetaVMBPO, VMBPOMFE):
        a = agent(cls)
        assert a.nu is None and a.nu_opt is None and not {"nu", "nu_opt"} & set(a.state_dict())
        old = copy.deepcopy(a.state_dict())
        stale = torch.nn.Linear(7, 1)
        old["nu"], old["nu_opt"] = stale.state_dict(), torch.optim.Adam(stale.parameters()).state_dict()
        b = cls(dataclasses.replace(a.config, seed=1), 3, 1)  # other initial weights
        assert not torch.equal(next(b.value.parameters()), next(a.value.parameters()))
        b.load_state_dict(old)
        assert b.nu is None
        for net in ("value", "critic", "policy"):
            for p, q in zip(getattr(a, net).parameters(), getattr(b, net).parameters()):
                assert torch.equal(p, q)
    a = agent(VMBPO)
    missing = {k: v for k, v in a.state_dict().items() if k != "nu"}
    with pytest.raises(KeyError, match="nu"):
        VMBPO(a.config, 3, 1).load_state_dict(missing)


def test_sticking_the_landing_keeps_the_value_and_drops_the_score_noise():
    """Same ELBO value; with pi = q_c the KL gradient is exactly zero under STL."""
    a, b = agent(VMBPO, eta=0.01, sticking_the_landing=True, entropy_regularizer=False), batch(64)
    a.prior_policy.load_state_dict(a.policy.state_dict())
    critic_min = a.critic.min
    a.critic.min = lambda o, act: torch.zeros(o.shape[0])  # only the KL term remains
    try:
        pyro.set_rng_seed(0)
        loss, _ = a.actor_loss(b.obs)
        loss.backward()
        assert abs(float(loss.detach())) < 1e-5
        assert all(float(p.grad.abs().max()) < 1e-4 for p in a.policy.parameters())
        a.policy.zero_grad()
        plain = agent(VMBPO, eta=0.01, sticking_the_landing=False, entropy_regularizer=False)
        plain.prior_policy.load_state_dict(plain.policy.state_dict())
        plain.critic.min = lambda o, act: torch.zeros(o.shape[0])
        pyro.set_rng_seed(0)
        loss2, _ = plain.actor_loss(b.obs)
        loss2.backward()
        assert abs(float(loss2.detach())) < 1e-5
        assert max(float(p.grad.abs().max()) for p in plain.policy.parameters()) > 1e-2  # score noise
    finally:
        a.critic.min = critic_min


def test_q_d_fit_survives_underflowing_weights():
    """exp(TD) spanning thousands of nats: normalised in log space, no crash, no NaN."""
    a = agent(VMBPO, eta=1000.0)  # agent() already fitted once; fit again with extreme weights
    info = a.fit_variational_dynamics(5)
    assert np.isfinite(info["q_d_train_loss"]) and info["q_d_weight_max"] == 1.0


def test_q_d_fit_logs_psis_khat_and_ess_of_its_weights():
    """Each q_d fit reports ArviZ's Pareto k-hat and the ESS of its weights exp(scale TD) over
    the replay (the numbers importance_weight_diagnostics gives for the same log-weights); a
    near-flat tilt (eta -> 0) keeps nearly every transition, the default's fewer."""
    from pplrl.diagnostics import importance_weight_diagnostics

    a = agent(VMBPO)
    info = a.fit_variational_dynamics(1)
    data = a.replay.all()
    expected = importance_weight_diagnostics(a.dynamics_log_weights(data))
    assert info["q_d_weight_khat"] == pytest.approx(expected["khat"])
    assert info["q_d_weight_ess_frac"] == pytest.approx(expected["ess_frac"])
    flat = agent(VMBPO, eta=1e-4).fit_variational_dynamics(1)
    assert info["q_d_weight_ess_frac"] < 0.9 < flat["q_d_weight_ess_frac"] <= 1.0


def test_model_batch_log_ratio_and_real_ratio():
    """The model batch's log q_d/p (the elites-only pass) equals the mixture densities of the full
    pass computed by hand, and real_ratio keeps that share of real transitions (real a, r, x',
    done) at the front. beta-VMBPO's own critic has no log term: no log-ratio is computed."""
    a, b = agent(BetaVMBPO, real_ratio=0.25), batch(8)
    assert a.batch_log_ratio(a.model_samples(b)[0]) is None
    a.config.critic_log_ratio = True
    torch.manual_seed(5)
    mb = a.model_samples(b)[0]
    log_ratio = a.batch_log_ratio(mb)
    for k in ("act", "rew", "next_obs", "done"):
        torch.testing.assert_close(getattr(mb, k)[:2], getattr(b, k)[:2])
    assert not torch.equal(mb.next_obs[2:], b.next_obs[2:])

    def mixture(ens):
        d = ens.sample_member_dist(mb.obs, mb.act)
        lp = d.log_prob(ens.target(mb.obs, mb.next_obs, mb.rew))[..., :3].sum(-1)[ens.elite_idx]
        return torch.logsumexp(lp, 0) - np.log(len(ens.elite_idx))

    with torch.no_grad():
        torch.testing.assert_close(log_ratio, mixture(a.q_dynamics) - mixture(a.ensemble))


def test_q_d_warm_start_stays_near_the_prior_under_flat_weights():
    """With flat weights (huge beta) a warm-started q_d (p's weights, split and bootstrap) stays
    close to p_theta on this small model: the batch KL(q_d || p) is far below that of a q_d
    fitted from its own initialisation, on each of two seeds (a single seed's warm KL ranges
    0.02 to 0.5 nats with float rounding, the cold one stays above ~1)."""
    for seed in (1, 2):
        kls = {}
        for warm in (True, False):
            a = agent(BetaVMBPO, beta_init=1e6, q_d_warm_start=warm, q_d_min_updates=100, model_min_updates=200,
                      seed=seed)
            a.fit_model()
            info = a.fit_variational_dynamics(1)
            kls[warm] = info["kl_dynamics_ensembles"]
            if warm:  # p's weights were copied, not shared: q_d's own tensors moved during the fit
                assert all(p is not q for p, q in zip(a.q_dynamics.parameters(), a.ensemble.parameters()))
        assert abs(kls[True]) < 0.25 * abs(kls[False]), (seed, kls)


def test_copy_from_takes_weights_in_place_and_checks_shapes():
    e1 = GaussianEnsemble(3, 1, ensemble_size=3, num_elites=2, hidden=(8,), name="cp1")
    e2 = GaussianEnsemble(3, 1, ensemble_size=3, num_elites=2, hidden=(8,), name="cp2")
    ids = [id(p) for p in e2.parameters()]
    e2.copy_from(e1)
    assert [id(p) for p in e2.parameters()] == ids
    for p, q in zip(e1.parameters(), e2.parameters()):
        torch.testing.assert_close(p, q)
    with pytest.raises(ValueError, match="same dimensions"):
        e2.copy_from(GaussianEnsemble(3, 1, ensemble_size=4, num_elites=2, hidden=(8,), name="cp3"))


@pytest.mark.parametrize("algo", ["vmbpo", "beta-vmbpo", "vmbpo-mfe"])
def test_paper_preset_sets_the_papers_schedule_and_other_overrides_win(algo):
    """``--set preset=paper``: 20 updates per env step, 5,000 warm-up steps, model lr 3e-4 and
    VMBPO's Table 4 exploration noise, applied before the other overrides wherever it stands;
    VMBPO's Table 4 mini-batch 64 and 200-unit networks for VMBPO and VMBPO-MFE (beta-VMBPO's
    App. C.2 keeps 256 units); ``preset=default`` puts the class's own values back; the fits use
    the model lr."""
    from pplrl.algorithms import apply_overrides

    base = default_config(algo)
    paper = apply_overrides(base, ["gradient_steps=7", "preset=paper"])
    assert (paper.preset, paper.gradient_steps, paper.learning_starts, paper.model_lr) == ("paper", 7, 5000, 3e-4)
    assert (paper.exploration_noise, paper.exploration_decay, paper.exploration_min) == (1.0, 0.999, 0.025)
    assert paper.beta_init == base.beta_init and paper.e_step == base.e_step  # the variant is kept
    table_4 = algo != "beta-vmbpo"
    assert (paper.batch_size, paper.hidden) == ((64, (200, 200)) if table_4 else (256, (256, 256)))
    assert (base.batch_size, base.hidden) == (256, (256, 256))
    if table_4:  # every actor-critic network takes the preset's width
        a = {"vmbpo": VMBPO, "vmbpo-mfe": VMBPOMFE}[algo](paper, 3, 1)
        nets = [n for n in (a.policy, a.critic, a.value, a.nu) if n is not None]  # VMBPO-MFE holds no nu
        widths = {m.out_features for net in nets for m in net.modules()
                  if isinstance(m, torch.nn.Linear) and m.out_features > 6}
        assert widths == {200}
    back = apply_overrides(paper, ["preset=default"])
    assert back == dataclasses.replace(base, gradient_steps=base.gradient_steps)
    assert default_config(algo, preset="paper", learning_starts=10).learning_starts == 10
    with pytest.raises(ValueError, match="unknown preset 'fast'.*known: default, paper"):
        apply_overrides(base, ["preset=fast"])
    a = agent({"vmbpo": VMBPO, "beta-vmbpo": BetaVMBPO, "vmbpo-mfe": VMBPOMFE}[algo], model_lr=3e-4,
              fit_dynamics=True)  # VMBPO-MFE holds models only with fit_dynamics
    assert a.ensemble.optimizer_state()[0][1] == 3e-4  # (local, lr, weight decay) of p_theta's fit
    # beta-VMBPO's paper schedule also samples its critic from Algorithm 1's model buffer
    assert paper.model_samples == ("buffer" if algo == "beta-vmbpo" else "fresh") == \
        apply_overrides(base, ["preset=paper"]).model_samples
    assert back.model_samples == "fresh"
    assert paper.actor_critic == ("target" if algo == "beta-vmbpo" else "online")  # beta eq. 13's Q'
    assert back.actor_critic == "online"


def test_model_buffer_holds_algorithm_1s_rollouts_and_feeds_the_critic(monkeypatch):
    """model_samples='buffer' (beta Algorithm 1): each fit adds model_rollouts one-step rollouts
    x ~ D_env, a ~ q_c, x' ~ q_d, r ~ p_theta to a FIFO buffer of model_buffer_size, and the
    E-step's critic batch is the real_ratio rows of the real batch, then buffer rows; 'fresh'
    holds no buffer."""
    assert agent(BetaVMBPO).model_buffer is None
    a = agent(BetaVMBPO, model_samples="buffer", model_rollouts=150, model_buffer_size=400, real_ratio=0.25)
    assert a.model_buffer is not None and len(a.model_buffer) == 0  # agent() fits, filling is update's job
    # q_d's x' = x + 1 and p_theta's r = 7 (each distinguishable from the other's)
    monkeypatch.setattr(a.q_dynamics, "predict", lambda obs, act, **kw: (obs + 1.0, torch.zeros(len(obs)), {}))
    monkeypatch.setattr(a.ensemble, "predict", lambda obs, act, **kw: (obs - 1.0, torch.full((len(obs),), 7.0), {}))
    assert a.fill_model_buffer() == 150 and len(a.model_buffer) == 150
    data = a.model_buffer.all()
    torch.testing.assert_close(data.next_obs, data.obs + 1.0)
    assert torch.all(data.rew == 7.0) and torch.all(data.act.abs() <= 1.0) and torch.all(data.done == 0)
    real_obs = a.replay.all().obs
    assert all(torch.any(torch.all(real_obs == x, -1)) for x in data.obs[:20])  # x from D_env
    for _ in range(3):  # FIFO: the newest model_buffer_size rows stay
        a.fill_model_buffer()
    assert len(a.model_buffer) == 400
    seen = []
    original = a.critic_loss
    monkeypatch.setattr(a, "critic_loss", lambda b, lr, step: seen.append(b) or original(b, lr, step))
    real = a.replay.sample(32, a.rng)
    monkeypatch.setattr(a.replay, "sample", lambda n, rng: Batch(*(t[:n] for t in (
        real.obs, real.act, real.rew, real.next_obs, real.done))))
    a.e_step_update(0)
    (b,) = seen
    torch.testing.assert_close(b.obs[:8], real.obs[:8])
    torch.testing.assert_close(b.rew[:8], real.rew[:8])
    assert torch.all(b.rew[8:] == 7.0)  # the model rows come from the buffer
    torch.testing.assert_close(b.next_obs[8:], b.obs[8:] + 1.0)


def test_model_buffer_fills_at_each_fit_checkpoints_and_resumes(tmp_path):
    """update() refills the buffer after each model fit and logs the rollouts; the buffer is in
    the checkpoint, so a resumed buffer run equals an uninterrupted one."""
    from experiments_loader import interrupted_and_resumed, records

    a = agent(VMBPO, model_samples="buffer", model_rollouts=120, model_buffer_size=300)
    out = a.update(100)
    assert out["model_rollouts"] == 120 and len(a.model_buffer) == 120
    b = VMBPO(a.config, 3, 1)
    b.load_state_dict(a.state_dict())
    torch.testing.assert_close(b.model_buffer.all().next_obs, a.model_buffer.all().next_obs)
    cfg = default_config("beta-vmbpo", **{**TINY, "model_samples": "buffer", "model_rollouts": 200})
    kw = dict(eval_every=300, eval_episodes=1, checkpoint_every=150, progress=False)
    full = train("beta-vmbpo", cfg, tmp_path / "full", 300, **kw)
    kept, resumed = interrupted_and_resumed("beta-vmbpo", cfg, tmp_path / "cut", 300, cut_at=250, **kw)
    assert kept < 250 and len(resumed.model_buffer) == len(full.model_buffer) >= 400  # two fits or more
    for p1, p2 in zip(full.critic.parameters(), resumed.critic.parameters()):
        assert torch.equal(p1, p2)
    assert records(tmp_path / "full" / "metrics.jsonl") == records(tmp_path / "cut" / "metrics.jsonl")
    with pytest.raises(ValueError, match="earlier fits' q_d: use nu_actions='replay'"):
        agent(VMBPO, model_samples="buffer", nu_actions="policy")
    with pytest.raises(ValueError, match="model_samples must be 'fresh' or 'buffer'"):
        agent(VMBPO, model_samples="stale")
    with pytest.raises(ValueError, match="model_rollouts must be > 0"):
        agent(BetaVMBPO, model_samples="buffer", model_rollouts=0)
