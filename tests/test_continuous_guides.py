"""Continuous guides: TanhNormal, Gaussian policy/dynamics networks, ContinuousGuide.

The pipeline check is a one-step linear-Gaussian problem with a closed-form optimum:
x' = x + a + N(0, 1), prior pi = N(0, 1), reward r = -x'^2, q_d pinned to p. Then
E_p[r | x, a] = -((x + a)^2 + 1) and the optimal q_c(a | x) is proportional to
N(a; 0, 1) exp(-eta (x + a)^2): a Gaussian with precision 1 + 2 eta and mean
-2 eta x / (1 + 2 eta). The optimal ELBO per start state is
log int N(a; 0, 1) exp(-eta ((x + a)^2 + 1)) da
    = -eta - log(1 + 2 eta) / 2 - eta x^2 / (1 + 2 eta).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule
from torch import nn

from guides.continuous import LOG_STD_MAX, LOG_STD_MIN, ContinuousGuide, GaussianDynamics, GaussianPolicy
from models.sites import site
from models.trajectory import AgentEnvironment, trajectory_model
from pplrl.distributions import TanhNormal, pre_squash
from pplrl.elbo import OptimalityELBO, ReparamOptimalityELBO
from pplrl.nets import MLP, soft_clamp


# ----------------------------------------------------------------------- TanhNormal
def reference_log_prob(u, loc, scale, low, high):
    """log N(u; loc, scale) - sum log|dy/du| for y = mid + half tanh(u), by hand."""
    half = (high - low) / 2
    log_det = torch.log(half) + math.log(4.0) - 2 * u.abs() - 2 * torch.log1p(torch.exp(-2 * u.abs()))
    return (torch.distributions.Normal(loc, scale).log_prob(u) - log_det).sum(-1)


def test_tanh_normal_change_of_variables_float64():
    loc = torch.tensor([0.4, -1.0], dtype=torch.float64)
    scale = torch.tensor([1.5, 0.7], dtype=torch.float64)
    low = torch.tensor([-2.0, 0.5], dtype=torch.float64)
    high = torch.tensor([1.0, 3.0], dtype=torch.float64)
    d = TanhNormal(loc, scale, low, high)
    u = torch.stack([torch.linspace(-6, 6, 401, dtype=torch.float64),
                     torch.linspace(5, -5, 401, dtype=torch.float64)], -1)
    y = (high + low) / 2 + (high - low) / 2 * torch.tanh(u)
    expected = reference_log_prob(u, loc, scale, low, high)
    # fresh tensor: no transform cache, log_prob inverts y through atanh
    torch.testing.assert_close(d.log_prob(y.clone()), expected, rtol=1e-9, atol=1e-9)

    # the Jacobian term by central finite differences of y(u)
    h = 1e-6
    u_small = u[(u.abs() < 4).all(-1)]
    f = lambda v: (high + low) / 2 + (high - low) / 2 * torch.tanh(v)  # noqa: E731
    dy_du = (f(u_small + h) - f(u_small - h)) / (2 * h)
    fd = (torch.distributions.Normal(loc, scale).log_prob(u_small) - dy_du.log()).sum(-1)
    y_small = f(u_small)
    torch.testing.assert_close(d.log_prob(y_small), fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("loc,scale,low,high", [(0.3, 0.8, -2.0, 3.0), (-1.2, 0.4, 0.0, 1.0), (0.0, 1.0, -1.0, 1.0)])
def test_tanh_normal_integrates_to_one(loc, scale, low, high):
    d = TanhNormal(torch.tensor([loc], dtype=torch.float64), torch.tensor([scale], dtype=torch.float64),
                   torch.tensor([low], dtype=torch.float64), torch.tensor([high], dtype=torch.float64))
    y = torch.linspace(low, high, 400_001, dtype=torch.float64)[1:-1]
    density = d.log_prob(y.unsqueeze(-1)).exp()
    assert torch.isfinite(density).all()
    assert abs(float(torch.trapezoid(density, y)) - 1.0) < 1e-6


def test_torch_tanh_transform_uses_stable_log_det():
    """log|d tanh(x)/dx| = 2 (log 2 - x - softplus(-2x)): finite for large |x|,
    where the naive log(1 - tanh(x)^2) is -inf in float32."""
    x = torch.tensor([-50.0, -20.0, -10.0, 0.0, 3.0, 10.0, 20.0, 50.0])
    t = dist.transforms.TanhTransform()
    lad = t.log_abs_det_jacobian(x, torch.tanh(x))
    x64 = x.double()
    exact = math.log(4.0) - 2 * x64.abs() - 2 * torch.log1p(torch.exp(-2 * x64.abs()))
    torch.testing.assert_close(lad.double(), exact, rtol=1e-6, atol=1e-6)
    assert torch.isinf(torch.log(1 - torch.tanh(x[x.abs() >= 10]) ** 2)).all()  # what it avoids


def test_tanh_normal_log_prob_finite_at_bounds():
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 0.5])
    loc = torch.tensor([[10.0, -10.0], [-10.0, 10.0]], requires_grad=True)
    d = TanhNormal(loc, torch.full((2, 2), 1e-3), low, high)
    y = d.rsample()
    # float32 tanh(+-10) is exactly +-1: the samples sit on the bounds
    assert torch.equal(y, torch.stack([torch.stack([high[0], low[1]]), torch.stack([low[0], high[1]])]))
    lp = d.log_prob(y)                       # clamped inverse: finite on the bounds
    assert torch.isfinite(lp).all()
    lp.sum().backward()
    assert torch.isfinite(loc.grad).all()
    # a sample is scored at its own pre-squash u (|u| ~ 10); the same value given from outside
    # reads back as atanh(1 - eps) = 8.3, finite but 2.8e6 nats lower at this scale
    u = pre_squash(y)
    assert u is not None and u.abs().min() > 9.9
    torch.testing.assert_close(lp.detach().double(), reference_log_prob(u.detach().double(), loc.detach().double(),
                                                                         torch.full((2, 2), 1e-3, dtype=torch.float64),
                                                                         low.double(), high.double()))
    outside = d.log_prob(y.detach().clone())
    assert torch.isfinite(outside).all() and (outside < lp - 1e6).all()
    assert torch.isfinite(d.log_prob(torch.stack([low, high]))).all()


def test_tanh_normal_scores_a_sample_at_its_own_pre_squash_value():
    """log_prob of a sample uses its exact pre-squash u, under the distribution that drew it and
    under any other TanhNormal with the same bounds (so log q/pi = 0 for pi = q: with torch's
    cached transforms it reached 1.7e4 nats for saturated samples); an action without one
    (a copy, from replay, changed in place, other bounds) is read back by atanh, which agrees
    where float32 can invert tanh."""
    torch.manual_seed(0)
    loc = torch.randn(4096, 3) * 4
    scale = torch.rand(4096, 3) * 0.5 + 0.05
    q = TanhNormal(loc, scale)
    a = q.rsample()
    lp = q.log_prob(a)
    u = pre_squash(a)
    assert u is not None and pre_squash(a.detach().clone()) is None and pre_squash(torch.zeros(3)) is None
    # against the float64 density at the exact u, saturated samples included
    assert (u.abs() > 8.4).any(-1).sum() > 100
    expected = reference_log_prob(u.double(), loc.double(), scale.double(), -torch.ones(3, dtype=torch.float64),
                                  torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(lp.double(), expected, rtol=1e-5, atol=1e-3)
    # another TanhNormal with the same parameters and bounds: the same numbers
    assert torch.equal(TanhNormal(loc.clone(), scale.clone()).log_prob(a), lp)
    # read back from the value alone: close where atanh is precise, far off where tanh saturates
    outside = TanhNormal(loc.clone(), scale.clone()).log_prob(a.detach().clone())
    precise = (a.abs() < 0.999).all(-1)
    torch.testing.assert_close(outside[precise], lp[precise], rtol=1e-4, atol=1e-2)
    assert (outside - lp).abs().max() > 10.0
    # changed in place since drawn, or scored under other bounds: read back by atanh
    b = q.rsample()
    b.mul_(0.5)
    assert pre_squash(b) is None
    torch.testing.assert_close(q.log_prob(b), q.log_prob(b.clone()))
    wide = TanhNormal(loc, scale, -2.0 * torch.ones(3), 2.0 * torch.ones(3))
    torch.testing.assert_close(wide.log_prob(a), wide.log_prob(a.clone()))


def test_tanh_normal_shapes_expand_and_mode():
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 2.0])
    d = TanhNormal(torch.zeros(3, 2), torch.ones(3, 2), low, high)
    assert d.batch_shape == (3,) and d.event_shape == (2,) and d.has_rsample
    e = d.expand((4, 3))
    assert isinstance(e, TanhNormal) and e.batch_shape == (4, 3) and e.rsample().shape == (4, 3, 2)
    torch.testing.assert_close(d.mode, torch.tensor([[0.0, 1.0]]).expand(3, 2))
    torch.testing.assert_close(d.mean_action, d.mode)
    with pytest.raises(ValueError):
        TanhNormal(torch.zeros(2), torch.ones(2), high, low)


# ------------------------------------------------------------------------- networks
def test_mlp_layers_are_pyro_modules():
    net = MLP(3, 2, hidden=(5, 7))
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 3 and all(isinstance(m, PyroModule) for m in linears)
    assert net(torch.randn(4, 3)).shape == (4, 2)


def test_rsample_gradients_reach_policy_parameters():
    policy = GaussianPolicy(3, 2, low=[-1.0, -2.0], high=[1.0, 0.5], hidden=(16, 16))
    a = policy(torch.randn(32, 3)).rsample()
    (a ** 2).sum().backward()
    for name, p in policy.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    last = policy.net.layers[-1].weight.grad
    assert last[:2].abs().sum() > 0 and last[2:].abs().sum() > 0  # mean and log-std heads


def test_gaussian_policy_respects_bounds():
    low, high = torch.tensor([-1.0, 0.0]), torch.tensor([2.0, 0.5])
    policy = GaussianPolicy(3, 2, low=low, high=high, hidden=(16,))
    obs = 100 * torch.randn(500, 3)
    d = policy(obs)
    assert isinstance(d, TanhNormal)
    for a in (d.sample(), d.rsample(), d.mode, policy.act(obs), policy.act(obs, deterministic=True)):
        assert a.shape == (500, 2)
        assert ((a >= low) & (a <= high)).all()
    assert torch.isfinite(d.log_prob(d.rsample())).all()

    unbounded = GaussianPolicy(3, 2, hidden=(16,))(obs)
    assert unbounded.event_shape == (2,) and unbounded.batch_shape == (500,)
    assert not isinstance(unbounded, TanhNormal)


@pytest.mark.parametrize("bounded", [True, False])
def test_gaussian_policy_log_std_is_clamped(bounded):
    kw = dict(low=[-1.0], high=[1.0]) if bounded else {}
    policy = GaussianPolicy(2, 1, hidden=(8,), **kw)
    last = policy.net.layers[-1]
    obs = torch.randn(5, 2)
    with torch.no_grad():
        last.weight.zero_()
        for bias, expected in ((100.0, LOG_STD_MAX), (-100.0, LOG_STD_MIN), (0.5, 0.5)):
            last.bias[1] = bias
            d = policy(obs)
            scale = d.scale if bounded else d.base_dist.scale
            torch.testing.assert_close(scale, torch.full((5, 1), math.exp(expected)))
    assert (LOG_STD_MIN, LOG_STD_MAX) == (-20.0, 2.0)


def test_gaussian_dynamics_mean_and_soft_clamped_log_std():
    dyn = GaussianDynamics(3, 2, hidden=(8,), min_log_std=-4.0, max_log_std=0.5)
    last = dyn.net.layers[-1]
    obs, act = torch.randn(6, 3), torch.randn(4, 6, 2)  # particle dim on actions only
    with torch.no_grad():
        last.weight.zero_()
        last.bias[:3] = torch.tensor([0.1, -0.2, 0.3])
        for raw in (50.0, -50.0, -1.0):
            last.bias[3:] = raw
            d = dyn(obs, act)
            assert d.batch_shape == (4, 6) and d.event_shape == (3,)
            torch.testing.assert_close(d.mean, (obs + torch.tensor([0.1, -0.2, 0.3])).expand(4, 6, 3))
            log_std = d.base_dist.scale.log()
            assert (log_std >= -4.0 - 1e-6).all() and (log_std <= 0.5 + math.log1p(math.exp(-4.5)) + 1e-6).all()
            torch.testing.assert_close(log_std, soft_clamp(torch.tensor(raw), -4.0, 0.5).expand(4, 6, 3))
    torch.testing.assert_close(soft_clamp(torch.tensor(-1.0), -4.0, 0.5), torch.tensor(-1.0), atol=0.25, rtol=0)
    learned = GaussianDynamics(3, 2, hidden=(8,), learn_log_std_bounds=True)
    assert {"min_log_std", "max_log_std"} <= {n for n, _ in learned.named_parameters()}
    assert learned.log_std_bounds_penalty() > 0 and dyn.log_std_bounds_penalty() == 0


# ----------------------------------------------------------------- guide and model
def bounded_env(initial, obs_dim=3, act_dim=2):
    low, high = -torch.ones(act_dim), torch.ones(act_dim)
    B = torch.linspace(0.5, 1.0, obs_dim * act_dim).reshape(obs_dim, act_dim)
    return AgentEnvironment(
        prior_policy=lambda x: dist.Uniform(low.expand(x.shape[:-1] + (act_dim,)),
                                            high.expand(x.shape[:-1] + (act_dim,))).to_event(1),
        dynamics=lambda x, a: dist.Normal(x + a @ B.T, 0.5).to_event(1),
        reward=lambda x, a, x2: -(x2 ** 2).sum(-1),
        initial=initial,
        state_event_dim=1,
    )


class PlainPolicy(nn.Module):
    """A policy written as an ordinary nn.Module (ContinuousGuide converts it)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 4)

    def forward(self, x):
        mean, log_std = self.lin(x).chunk(2, -1)
        return TanhNormal(mean, log_std.clamp(-5, 2).exp(), -torch.ones(2), torch.ones(2))


@pytest.mark.parametrize("variant", ["learned_dynamics", "pinned_dynamics", "plain_module"])
@pytest.mark.parametrize("sampled_x0", [False, True])
def test_one_svi_step_moves_every_guide_parameter(variant, sampled_x0):
    initial = dist.Normal(torch.zeros(3), 1.0).to_event(1) if sampled_x0 else torch.randn(5, 3)
    env = bounded_env(initial)
    if variant == "plain_module":
        guide = ContinuousGuide(PlainPolicy(), GaussianDynamics(3, 2, hidden=(16,)), name="q")
        assert isinstance(guide.policy.lin, PyroModule)
    else:
        guide = ContinuousGuide.build(3, 2, low=-torch.ones(2), high=torch.ones(2), hidden=(16, 16),
                                      learn_dynamics=variant == "learned_dynamics", name="q")
    elbo = OptimalityELBO(num_particles=4, vectorize_particles=True)
    svi = pyro.infer.SVI(trajectory_model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    before = {n: p.detach().clone() for n, p in guide.named_parameters()}
    loss = svi.step(env, 3, eta=0.5)
    assert math.isfinite(loss)
    assert set(pyro.get_param_store().keys()) == {f"q.{n}" for n in before}
    for n, p in guide.named_parameters():
        assert not torch.equal(p.detach(), before[n]), f"{n} did not move"
    if variant == "pinned_dynamics":
        assert abs(elbo.last_terms["kl_dynamics"]) < 1e-5  # same log-density twice, up to rounding
    else:
        assert abs(elbo.last_terms["kl_dynamics"]) > 1e-3


def test_guide_sites_mirror_the_model():
    env = bounded_env(dist.Normal(torch.zeros(3), 1.0).to_event(1))
    guide = ContinuousGuide.build(3, 2, low=-torch.ones(2), high=torch.ones(2), hidden=(8,))
    gtr = pyro.poutine.trace(guide).get_trace(env, 4)
    mtr = pyro.poutine.trace(pyro.poutine.replay(trajectory_model, trace=gtr)).get_trace(env, 4)
    guide_sites = {n for n, s in gtr.nodes.items() if s["type"] == "sample"}
    model_latents = {n for n, s in mtr.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
    expected = {site("x", 0)} | {site(k, t) for t in range(4) for k in ("a",)} \
        | {site("x", t + 1) for t in range(4)}
    assert guide_sites == model_latents == expected
    with pytest.raises(ValueError, match="state_event_dim"):
        guide(AgentEnvironment(env.prior_policy, env.dynamics, env.reward, env.initial), 1)


def test_module_local_params():
    env = bounded_env(torch.randn(5, 3))
    with pyro.settings.context(module_local_params=True):
        guide = ContinuousGuide.build(3, 2, low=-torch.ones(2), high=torch.ones(2), hidden=(8,))
        loss_fn = OptimalityELBO(num_particles=2, vectorize_particles=True)(trajectory_model, guide)
        params = list(loss_fn.parameters())
        assert len(params) == len(list(guide.parameters())) > 0
        before = [p.detach().clone() for p in params]
        opt = torch.optim.Adam(params, lr=1e-2)
        opt.zero_grad()
        loss_fn(env, 2, eta=1.0).backward()
        opt.step()
        assert all(not torch.equal(p.detach(), b) for p, b in zip(params, before))
    assert len(pyro.get_param_store()) == 0


# ------------------------------------------------------- linear-Gaussian closed form
class LinearGaussianPolicy(PyroModule):
    """q_c(a | x) = N(w x + b, exp(log_std)^2), the family containing the optimum."""

    def __init__(self):
        super().__init__()
        self.mean = PyroModule[nn.Linear](1, 1)
        self.log_std = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        m = self.mean(x)
        return dist.Normal(m, self.log_std.exp().expand_as(m)).to_event(1)


ETA = 1.0
X0 = torch.linspace(-2.0, 2.0, 9).unsqueeze(-1)
SLOPE, STD = -2 * ETA / (1 + 2 * ETA), (1 + 2 * ETA) ** -0.5
OPTIMAL_ELBO = float((-ETA - 0.5 * math.log(1 + 2 * ETA) - ETA * X0.squeeze(-1) ** 2 / (1 + 2 * ETA)).sum())


def linear_gaussian_env():
    return AgentEnvironment(
        prior_policy=lambda x: dist.Normal(torch.zeros_like(x), 1.0).to_event(1),
        dynamics=lambda x, a: dist.Normal(x + a, 1.0).to_event(1),
        reward=lambda x, a, x2: -(x2 ** 2).sum(-1),
        initial=X0,
        state_event_dim=1,
    )


def test_linear_gaussian_optimum_closed_form():
    env, guide = linear_gaussian_env(), ContinuousGuide(LinearGaussianPolicy())
    elbo = OptimalityELBO(num_particles=64, vectorize_particles=True)
    svi = pyro.infer.SVI(trajectory_model, guide, pyro.optim.ClippedAdam({"lr": 0.05, "lrd": 0.995}), elbo)
    for _ in range(600):
        svi.step(env, 1, eta=ETA)
    w, b = guide.policy.mean.weight.item(), guide.policy.mean.bias.item()
    s = guide.policy.log_std.exp().item()
    # measured over seeds 0-5: |w - SLOPE| <= 0.008, |b| <= 0.013, |s - STD| <= 0.005
    assert abs(w - SLOPE) < 0.03, (w, SLOPE)
    assert abs(b) < 0.03, b
    assert abs(s - STD) < 0.02, (s, STD)

    # ELBO: Monte-Carlo sd of a 20000-particle estimate is ~0.04 here
    terms = OptimalityELBO(num_particles=20_000, vectorize_particles=True).terms(
        trajectory_model, guide, env, 1, eta=ETA)
    assert abs(terms["kl_dynamics"]) < 1e-5
    assert abs(terms["elbo"] - OPTIMAL_ELBO) < 0.2, (terms, OPTIMAL_ELBO)

    # ... and exactly at the closed-form optimum
    with torch.no_grad():
        guide.policy.mean.weight.fill_(SLOPE)
        guide.policy.mean.bias.zero_()
        guide.policy.log_std.fill_(math.log(STD))
    terms = OptimalityELBO(num_particles=20_000, vectorize_particles=True).terms(
        trajectory_model, guide, env, 1, eta=ETA)
    kl_exact = float(0.5 * (STD ** 2 + (SLOPE * X0) ** 2 - 1 - math.log(STD ** 2)).sum())
    assert abs(terms["kl_policy"] - kl_exact) < 0.1, (terms, kl_exact)
    assert abs(terms["elbo"] - OPTIMAL_ELBO) < 0.2, (terms, OPTIMAL_ELBO)


def test_mlp_plain_path_outside_pyro_handlers():
    """Where no handler reads params an MLP runs as plain F.linear calls: the same output and
    gradients as the PyroModule path; under SVI's param_only trace, or a handler that may
    change params (substitute), its parameters are param sites; a PyroSample prior on a
    weight still samples (the plain path is not taken)."""
    import pyro.poutine as poutine
    from pyro.nn import PyroSample

    from pplrl.nets import params_unobserved

    with pyro.settings.context(module_local_params=True):
        torch.manual_seed(0)
        net = MLP(3, 2, (8, 8))
        x = torch.randn(5, 3)
        assert net._plain_ok()
        plain = net(x)
        with poutine.trace() as tr, pyro.plate("rows", 5), poutine.scale(scale=2.0):
            assert params_unobserved()
        with poutine.trace(param_only=True) as tr:
            assert not params_unobserved()
            traced = net(x)
        torch.testing.assert_close(plain, traced, rtol=0, atol=0)
        assert {n for n, s in tr.trace.nodes.items() if s["type"] == "param"} == {
            n for n, _ in net.named_parameters()}
        with poutine.substitute(data={}):
            assert not params_unobserved()
        g_plain = torch.autograd.grad(net(x).sum(), list(net.parameters()))
        with poutine.trace(param_only=True):
            g_traced = torch.autograd.grad(net(x).sum(), list(net.parameters()))
        for a, b in zip(g_plain, g_traced):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        net.layers[0].weight = PyroSample(dist.Normal(0.0, 1.0).expand([8, 3]).to_event(2))
        assert not net._plain_ok()
        assert not torch.equal(net(x), net(x))  # a fresh weight draw per call


@pytest.mark.parametrize("elbo_class", [OptimalityELBO, ReparamOptimalityELBO])
def test_differentiable_loss_is_the_same_with_validation_off(elbo_class):
    """Without Pyro's validation the ELBOs' lean particle loop (no NaN hook, no float re-add)
    gives the same value and gradients as Trace_ELBO's own loop (4 vectorised particles)."""
    env = bounded_env(dist.Normal(torch.zeros(3), 1.0).to_event(1))
    torch.manual_seed(0)
    guide = ContinuousGuide.build(3, 2, low=-torch.ones(2), high=torch.ones(2), hidden=(8,), name="q")
    results = []
    for validation in (True, False):
        torch.manual_seed(1)
        guide.zero_grad()
        with pyro.validation_enabled(validation):
            loss = elbo_class(num_particles=4, vectorize_particles=True).differentiable_loss(
                trajectory_model, guide, env, 3, eta=0.5)
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in guide.parameters()]))
    (l1, g1), (l2, g2) = results
    torch.testing.assert_close(l1, l2)
    assert len(g1) == len(g2) > 0
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
