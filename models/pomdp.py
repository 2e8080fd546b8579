"""The agent-environment-optimality POMDP model of Marino & Yue (003_…, Sec. 3, eqs. 2-3, 6-8).

Generative agent, over a window of T steps (``pyro.markov``), for a batch of windows::

    z_0 ~ N(0, I),   z_t ~ p_a(z_t | z_{t-1}, a_{t-1})                 (learned transition)
    x_t, r_t ~ p_a(x_t | z_t) p_a(r_t | z_t)                           (emitter; observed)
    factor  log p(O_t = 1 | r_t) = r_t / temperature                   (eq. 3 with a temperature)
    factor  -log p_a(x_t, r_t | z_<t)   (K prior samples, pplrl.infogain) (eq. 8's marginal)
    a_t ~ p_a(a_t | z_t)                                               (action prior; latent)

The discriminative agent (eq. 6) replaces transition and emitter by a direct mapping
p_a(z_t | z_{t-1}, a_{t-1}, x_t, r_t) and has no likelihood or marginal sites.

The executed actions a_{t-1} are data (the covariates of the transition); the site
``a_t`` is the latent action whose variational posterior q(a_t) (the planner's) the
guide supplies, so the bound's ``-log q(a_t) / p_a(a_t | z_t)`` term is
KL(q(a_t) || p_a(a_t | z_t)): learning it moves the prior toward the planner
(consolidation, Sec. 3.3).

:func:`pomdp_model` pairs with :func:`guides.pomdp.pomdp_guide` (same signature);
site names come from :func:`site`. :func:`tiger_filter_model` is the tabular Tiger
filtering step used to check the amortised filter against exact beliefs.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

from guides.continuous import MLP
from pplrl.infogain import check_samples, log_marginal_estimate

MIN_SCALE = 1e-2
#: lower bound of the action prior's scale: keeps planning from locking onto the habit
MIN_ACTION_SCALE = 0.1


def site(kind: str, t: int) -> str:
    """Site names: ``z_t``, ``x_t``, ``r_t``, ``a_t``, ``optimality_t``, ``marginal_t``."""
    if kind not in ("z", "x", "r", "a", "optimality", "marginal"):
        raise ValueError(f"unknown site kind {kind!r}")
    return f"{kind}_{t}"


def check_window(T: int) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"the window length T must be an integer >= 1, got {T!r}")
    return T


def _gaussian(h: torch.Tensor, min_scale: float = MIN_SCALE, residual: torch.Tensor | None = None):
    loc, raw = h.chunk(2, dim=-1)
    if residual is not None:
        loc = residual + loc
    return dist.Normal(loc, F.softplus(raw) + min_scale).to_event(1)


class Transition(PyroModule):
    """p_a(z_t | z_{t-1}, a_{t-1}): Gaussian, residual mean (as DMM's gated transition
    starts near the identity)."""

    def __init__(self, z_dim: int, a_dim: int, hidden: int = 64):
        super().__init__()
        self.net = MLP(z_dim + a_dim, 2 * z_dim, (hidden, hidden))

    def forward(self, z: torch.Tensor, a: torch.Tensor):
        return _gaussian(self.net(torch.cat([z, a], -1)), residual=z)


class Emitter(PyroModule):
    """p_a(x_t | z_t) p_a(r_t | z_t): diagonal Gaussians."""

    def __init__(self, z_dim: int, x_dim: int, hidden: int = 64):
        super().__init__()
        self.x_dim = x_dim
        self.net = MLP(z_dim, 2 * (x_dim + 1), (hidden, hidden))

    def forward(self, z: torch.Tensor):
        h = self.net(z)
        hx, hr = h[..., : 2 * self.x_dim], h[..., 2 * self.x_dim:]
        px = _gaussian(hx)
        pr = dist.Normal(hr[..., 0], F.softplus(hr[..., 1]) + MIN_SCALE)
        return px, pr

    def log_prob(self, z: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        px, pr = self(z)
        return px.log_prob(x) + pr.log_prob(r)


class ActionPrior(PyroModule):
    """p_a(a_t | z_t): the model-free habit, a diagonal Gaussian over [-1, 1]-scaled
    actions (executed clipped)."""

    def __init__(self, z_dim: int, a_dim: int, hidden: int = 64):
        super().__init__()
        self.net = MLP(z_dim, 2 * a_dim, (hidden, hidden))

    def forward(self, z: torch.Tensor):
        loc, raw = self.net(z).chunk(2, -1)
        return dist.Normal(torch.tanh(loc), F.softplus(raw) + MIN_ACTION_SCALE).to_event(1)


class DiscriminativePrior(PyroModule):
    """p_a(z_t | z_{t-1}, a_{t-1}, x_t, r_t): the discriminative agent's direct mapping (eq. 6)."""

    def __init__(self, z_dim: int, a_dim: int, x_dim: int, hidden: int = 64):
        super().__init__()
        self.net = MLP(z_dim + a_dim + x_dim + 1, 2 * z_dim, (hidden, hidden))

    def forward(self, z, a, x, r):
        return _gaussian(self.net(torch.cat([z, a, x, r[..., None]], -1)), residual=z)


class POMDPModel(PyroModule):
    """The agent's distributions p_a: transition + emitter (generative) or the direct
    mapping (discriminative), and the action prior. One optimiser (the M-step) owns
    these parameters; the guide's are separate."""

    def __init__(self, x_dim: int, a_dim: int, z_dim: int = 8, hidden: int = 64, generative: bool = True):
        super().__init__()
        self.x_dim, self.a_dim, self.z_dim, self.generative = x_dim, a_dim, z_dim, generative
        if generative:
            self.transition = Transition(z_dim, a_dim, hidden)
            self.emitter = Emitter(z_dim, x_dim, hidden)
        else:
            self.discriminative = DiscriminativePrior(z_dim, a_dim, x_dim, hidden)
        self.action_prior = ActionPrior(z_dim, a_dim, hidden)

    def initial(self, batch_shape) -> dist.Distribution:
        zeros = torch.zeros(*batch_shape, self.z_dim)
        return dist.Normal(zeros, torch.ones_like(zeros)).to_event(1)

    def z_prior(self, t: int, z_prev, a_prev, x, r) -> dist.Distribution:
        """p_a(z_t | ...): N(0, I) at a window start for the generative agent."""
        if not self.generative:
            z_prev = torch.zeros(*x.shape[:-1], self.z_dim) if z_prev is None else z_prev
            return self.discriminative(z_prev, a_prev, x, r)
        if z_prev is None:
            return self.initial(x.shape[:-1])
        return self.transition(z_prev, a_prev)


@dataclass
class Window:
    """A batch of B windows of T steps: ``x [B, T, x_dim]``, ``r [B, T]`` (the reward
    that arrived with x_t), ``a_prev [B, T, a_dim]`` (the executed action before x_t;
    zero at an episode start), ``qa_loc, qa_scale [B, T, a_dim]`` (the planner's q(a_t)),
    ``act [B, T, a_dim]`` (the executed a_t), ``rew [B, T]`` (the reward after a_t) and
    ``done [B, T]`` (1 when a_t ended the episode by termination)."""

    x: torch.Tensor
    r: torch.Tensor
    a_prev: torch.Tensor
    qa_loc: torch.Tensor
    qa_scale: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    done: torch.Tensor

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.x.shape[:2])


def pomdp_model(model: POMDPModel, guide, window: Window, temperature: float = 1.0, K: int = 8) -> None:
    """The POMDP model over ``window`` (see the module docstring). ``guide`` is unused
    here (model and guide share one signature)."""
    check_samples(K)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T = window.shape
    check_window(T)
    with pyro.plate("windows", B):
        z = None
        for t in pyro.markov(range(T)):
            x_t, r_t = window.x[:, t], window.r[:, t]
            pz = model.z_prior(t, z, window.a_prev[:, t], x_t, r_t)
            if model.generative:
                pyro.factor(site("marginal", t),
                            -log_marginal_estimate(pz, lambda zk: model.emitter.log_prob(zk, x_t, r_t), K))
            z = pyro.sample(site("z", t), pz)
            if model.generative:
                px, pr = model.emitter(z)
                pyro.sample(site("x", t), px, obs=x_t)
                pyro.sample(site("r", t), pr, obs=r_t)
            pyro.factor(site("optimality", t), r_t / temperature)
            pyro.sample(site("a", t), model.action_prior(z))


# ------------------------------------------------------------------------ Tiger (tabular)
def tiger_filter_model(filt, tables, a_prev: torch.Tensor, obs: torch.Tensor, prev_belief: torch.Tensor) -> None:
    """One filtering step per (sequence, t), for B sequences of T steps.

    ``tables = (T[a, s, s'], O[a, s', o])`` torch tensors; ``a_prev [B, T]`` the action
    before each observation, ``obs [B, T]`` the observations, ``prev_belief [B, T, 2]``
    the filter's own belief before each step (data: computed by the filter, without
    gradient). The prior on z_t is the predictive ``sum_s b_{t-1}(s) T[a, s, .]``, the
    agent's p_a(z_t | a_<t, z_<t, x_<t) with z_<t integrated out under its belief; the
    per-step bound's optimum is then the exact Bayes update of that belief (Algorithm 1's
    state inference, one step at a time), so a trained filter reproduces the exact
    belief sequence.
    """
    T_tab, O_tab = tables
    B, T = obs.shape
    with pyro.plate("sequences", B):
        for t in pyro.markov(range(T)):
            pred = (prev_belief[:, t, :, None] * T_tab[a_prev[:, t]]).sum(-2)
            z = pyro.sample(site("z", t), dist.Categorical(probs=pred))
            pyro.sample(site("x", t), dist.Categorical(probs=O_tab[a_prev[:, t], z]), obs=obs[:, t])


__all__ = ["ActionPrior", "DiscriminativePrior", "Emitter", "POMDPModel", "Transition", "Window",
           "check_window", "pomdp_model", "site", "tiger_filter_model"]
