"""Every shipped model/guide pair, in the manner of Pyro's tests/infer/test_valid_models.py:
it runs with validation on through Pyro's model/guide site checks (warnings are
errors, see pyproject.toml), ``pyro.infer.SVI`` drives its ELBO, one SVI step moves
every parameter the pair trains, and ``elbo(model, guide)`` (an ELBOModule) gives the
same loss as ``elbo.differentiable_loss``."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from conftest import as_torch
from pyro.infer import SVI, Trace_ELBO, TraceEnum_ELBO

from guides.actor import actor_guide
from guides.continuous import ContinuousGuide, GaussianPolicy
from guides.memb import memb_guide
from guides.pomdp import BeliefFilter, FilteringGuide, pomdp_guide, tiger_filter_guide
from guides.tabular import TabularGuide
from guides.virel import virel_guide
from models.actor import actor_model, flat_prior
from models.dynamics import GaussianEnsemble
from models.memb import ReparamModel, memb_model
from models.pomdp import POMDPModel, Window, pomdp_model, tiger_filter_model
from models.trajectory import AgentEnvironment, tabular_environment, trajectory_model
from models.virel import virel_model
from pplrl.distributions import TanhNormal
from pplrl.elbo import POMDPELBO, OptimalityELBO, ReparamOptimalityELBO, RiskSensitiveELBO
from pplrl.envs import risky_arm
from pplrl.envs.pomdp import TigerPOMDP
from pplrl.nets import TwinQ


def _critic(obs_dim=3, act_dim=2):
    q = TwinQ(obs_dim, act_dim, (8,))
    return q.min


def _window(B=4, T=3, x_dim=2, a_dim=1):
    g = torch.Generator().manual_seed(0)
    return Window(x=torch.randn(B, T, x_dim, generator=g), r=-torch.rand(B, T, generator=g),
                  a_prev=torch.rand(B, T, a_dim, generator=g) * 2 - 1, qa_loc=torch.zeros(B, T, a_dim),
                  qa_scale=torch.full((B, T, a_dim), 0.5), act=torch.zeros(B, T, a_dim), rew=torch.zeros(B, T),
                  done=torch.zeros(B, T))


# Each case: () -> (model, guide, args, kwargs, elbo, trained modules or None for the param store)
def tabular(elbo_cls):
    def make():
        P, R, pi = as_torch(risky_arm())
        env = tabular_environment(P, R, pi, dist.Categorical(probs=torch.tensor(risky_arm().p0)))
        guide = TabularGuide(P, pi, horizon=2, time_varying=True)
        if elbo_cls is RiskSensitiveELBO:
            return trajectory_model, guide, (env, 2), {}, RiskSensitiveELBO(2.0), None
        return trajectory_model, guide, (env, 2), {"eta": 1.0}, elbo_cls(), None
    return make


def continuous(elbo_cls):
    def make():
        low, high = -torch.ones(2), torch.ones(2)
        B = torch.linspace(0.5, 1.0, 6).reshape(3, 2)
        env = AgentEnvironment(
            prior_policy=lambda x: dist.Uniform(low.expand(x.shape[:-1] + (2,)), high.expand(x.shape[:-1] + (2,))
                                                ).to_event(1),
            dynamics=lambda x, a: dist.Normal(x + a @ B.T, 0.5).to_event(1),
            reward=lambda x, a, x2: -(x2 ** 2).sum(-1), initial=torch.randn(5, 3), state_event_dim=1)
        guide = ContinuousGuide.build(3, 2, low=low, high=high, hidden=(8,), name="q")
        return trajectory_model, guide, (env, 2), {"eta": 0.5}, elbo_cls(), [guide]
    return make


def actor():
    policy = GaussianPolicy(3, 2, low=-1.0, high=1.0, hidden=(8,))
    return (actor_model, actor_guide, (torch.randn(6, 3), flat_prior(2), _critic(), 2.0), {"policy": policy},
            ReparamOptimalityELBO(), [policy])


def virel():
    policy = GaussianPolicy(3, 2, low=-1.0, high=1.0, hidden=(8,))
    return (virel_model, virel_guide, (torch.randn(6, 3), flat_prior(2), _critic(), 0.5),
            {"baseline": lambda x: x.sum(-1), "policy": policy}, ReparamOptimalityELBO(), [policy])


def memb():
    policy = GaussianPolicy(3, 2, low=-1.0, high=1.0, hidden=(8,))
    model = ReparamModel(3, 2, (8,))
    return (memb_model, memb_guide, (torch.randn(6, 3), flat_prior(2), model.dynamics, model.reward,
                                     lambda x: -(x ** 2).sum(-1), 0.99, 0.2), {"policy": policy},
            ReparamOptimalityELBO(), [policy])


def pomdp(generative):
    def make():
        model = POMDPModel(2, 1, z_dim=3, hidden=8, h_dim=4, generative=generative)
        guide = FilteringGuide(2, 1, z_dim=3, h_dim=4, hidden=8)
        return (pomdp_model, pomdp_guide, (model, guide, _window()), {"K": 4}, POMDPELBO(generative=generative),
                [model, guide] if generative else [model])
    return make


def tiger():
    pom = TigerPOMDP()
    tables = (torch.tensor(pom.transition(), dtype=torch.float32), torch.tensor(pom.emission(), dtype=torch.float32))
    filt = BeliefFilter(hidden=8)
    a_prev = torch.zeros(3, 4, dtype=torch.long)
    obs = torch.randint(0, 2, (3, 4))
    before = torch.full((3, 4, 2), 0.5)
    return (tiger_filter_model, tiger_filter_guide, (filt, tables, a_prev, obs, before), {},
            TraceEnum_ELBO(max_plate_nesting=1), [filt])


def ensemble():
    ens = GaussianEnsemble(3, 2, ensemble_size=3, num_elites=2, hidden=(8,), name="p_theta")
    g = torch.Generator().manual_seed(0)
    obs, act = torch.randn(16, 3, generator=g), torch.rand(16, 2, generator=g) * 2 - 1
    data = (obs, act, obs + 0.1 * torch.randn(16, 3, generator=g), torch.randn(16, generator=g))
    ens.normalizer.update(torch.cat([obs, act], -1))
    return ens.model, ens.guide, data, {}, Trace_ELBO(), [ens]


PAIRS = {
    "trajectory-tabular-OptimalityELBO": tabular(OptimalityELBO),
    "trajectory-tabular-RiskSensitiveELBO": tabular(RiskSensitiveELBO),
    "trajectory-continuous-OptimalityELBO": continuous(OptimalityELBO),
    "trajectory-continuous-ReparamOptimalityELBO": continuous(ReparamOptimalityELBO),
    "actor": actor,
    "virel": virel,
    "memb": memb,
    "pomdp-generative": pomdp(True),
    "pomdp-discriminative": pomdp(False),
    "tiger-filter": tiger,
    "dynamics-ensemble": ensemble,
}


def _parameters(modules):
    if modules is None:
        return dict(pyro.get_param_store().named_parameters())
    return {f"{i}.{n}": p for i, m in enumerate(modules) for n, p in m.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_one_svi_step_with_validation_moves_every_parameter(name):
    model, guide, args, kwargs, elbo, modules = PAIRS[name]()
    if modules is None:  # pyro.param sites: created by a first evaluation
        elbo.loss(model, guide, *args, **kwargs)
    before = {n: p.detach().clone() for n, p in _parameters(modules).items()}
    assert before, "the pair has no parameters"
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 1e-2}), elbo)
    loss = svi.step(*args, **kwargs)
    assert math.isfinite(loss)
    after = _parameters(modules)
    frozen = [n for n, p in after.items() if torch.equal(p.detach(), before[n])]
    assert not frozen, f"SVI did not move {frozen}"


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_elbo_module_is_the_differentiable_loss(name):
    model, guide, args, kwargs, elbo, modules = PAIRS[name]()
    if modules is None:  # pyro.param sites: created by a first evaluation
        elbo.loss(model, guide, *args, **kwargs)
    pyro.set_rng_seed(3)
    direct = elbo.differentiable_loss(model, guide, *args, **kwargs)
    pyro.set_rng_seed(3)
    module = elbo(model, guide)
    assert isinstance(module, torch.nn.Module)
    via_module = module(*args, **kwargs)
    torch.testing.assert_close(via_module, direct)
    via_module.backward()
    grads = [p.grad for p in _parameters(modules).values() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_tanh_normal_prior_in_the_actor_model_gives_zero_kl_to_itself():
    """q = pi, both TanhNormal: log q(a) of q's own sample and log pi(a) of the same action
    through another TanhNormal agree, so KL(q || q) is 0 (with torch's cached transforms
    it was not: up to 1.7e4 nats for saturated samples)."""
    policy = GaussianPolicy(3, 2, low=-1.0, high=1.0, hidden=(8,))
    with torch.no_grad():
        policy.net.layers[-1].bias.copy_(torch.tensor([6.0, -6.0, -3.0, -3.0]))  # near-saturated means
    obs = torch.randn(512, 3)

    def prior(x):
        d = policy(x)
        return TanhNormal(d.loc.detach().clone(), d.scale.detach().clone())

    terms = ReparamOptimalityELBO().terms(actor_model, actor_guide, obs, prior, lambda x, a: torch.zeros(x.shape[0]),
                                          1.0, policy=policy)
    assert terms["kl_policy"] == pytest.approx(0.0, abs=1e-6 * obs.shape[0])
    assert terms["reward"] == 0.0
