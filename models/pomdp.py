"""The agent-environment-optimality POMDP model of Marino & Yue (003_…, Sec. 3, eqs. 2-3, 6-8).

Generative agent, over a window of T steps (``pyro.markov``), for a batch of windows::

    s_t = [h_t, z_t],  h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]),  z_t ~ p_a(z_t | h_t)  (learned transition)
    x_t, r_t ~ p_a(x_t | s_t) p_a(r_t | s_t)                           (emitter; observed)
    factor  log p(O_t = 1 | r_t) = r_t / temperature                   (eq. 3 with a temperature)
    factor  -log p_a(x_t, r_t | s_<t)   (eq. 8's marginal: the guide's s_t among K prior samples,
                                         pplrl.infogain.contrastive_log_marginal, an upper estimate)
    a_t ~ p_a(a_t | s_t)                                               (action prior; latent)

with s_{-1} = the acting filter's stored state before the window (``Window.s0``; 0 at an
episode start, where the first z has the learned prior p_a(z | GRU(0, [0, a_{-1}]))).

**The internal state is recurrent-state-space (RSSM, PlaNet: Hafner et al. 2019), not in
the paper.** The paper's transition p_a(z_t | z_{t-1}, a_{t-1}) is Markov in a stochastic
z; here the agent's state is s_t = [h_t, z_t] with a deterministic part h_t. This is still
a Markov transition p_a(s_t | s_{t-1}, a_{t-1}) (h_t is a deterministic function of its
parents), so eqs. (6)-(10) apply unchanged with z := s; the ``z_t`` sites carry the whole
state s_t (:class:`StateDist`: a point mass on h_t times a Gaussian on z_t). Why: with a
purely stochastic z trained one step at a time, the learned model's open-loop predictions
barely depended on the actions on velocity-hidden Pendulum, so planning could not help; a
deterministic path carries the action's effect over many steps (PlaNet's motivation;
measurements: docs/notes.md, 'POMDP model: RSSM state').
Densities and KLs of ``z_t`` sites are those of the stochastic part: model and guide
compute the same h_t from the same s_{t-1} (the guide replays the model's recurrent path,
:meth:`POMDPModel.deter`), so the point masses cancel.

The discriminative agent (eq. 6) replaces the prior head and emitter by a direct mapping
p_a(z_t | h_t, x_t, r_t) (same recurrent h_t) and has no likelihood or marginal sites.

The executed actions a_{t-1} are data (the covariates of the transition); the site
``a_t`` is the latent action whose variational posterior q(a_t) (the planner's) the
guide supplies, so the bound's ``-log q(a_t) / p_a(a_t | s_t)`` term is
KL(q(a_t) || p_a(a_t | s_t)): learning it moves the prior toward the planner
(consolidation, Sec. 3.3).

:func:`pomdp_model` pairs with :func:`guides.pomdp.pomdp_guide` (same signature);
site names and terms come from :mod:`models.sites`: ``z_t`` kl_z, ``x_t`` log_lik_x,
``r_t`` log_lik_r, ``opt_t`` reward, ``marginal_t`` neg_log_marginal, ``a_t`` kl_a.
:func:`tiger_filter_model` is the tabular Tiger filtering step used to check the amortised
filter against exact beliefs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from pyro.nn import PyroModule
from torch import nn
from torch.distributions import Distribution, constraints, kl_divergence, register_kl

from models.sites import factor, optimality, sample
from pplrl.infogain import contrastive_log_marginal
from pplrl.nets import MLP

MIN_SCALE = 1e-2
#: lower bound of the action prior's scale: keeps planning from locking onto the habit
MIN_ACTION_SCALE = 0.1


def check_samples(K: int) -> int:
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"the number of importance samples K must be an integer >= 1, got {K!r}")
    return K


def log_marginal_estimate(prior: Distribution, log_lik: Callable[[torch.Tensor], torch.Tensor], K: int) -> torch.Tensor:
    """``log (1/K) sum_k p(x | z_k)``, ``z_k ~ prior`` (reparameterised when the prior
    allows it): the importance-sampling estimate of ``log p(x | z_<t) = log E_prior p(x | z)``.

    ``prior`` has batch shape ``B`` (any) and the latent's event shape; ``log_lik`` maps
    latents of shape ``(K, *B, *event)`` to log-densities ``(K, *B)``. Returns shape ``B``.

    Bias. The average of the K likelihood weights is unbiased for p(x | z_<t), but its
    log is not: by Jensen, E[estimate] <= log p(x | z_<t), so the marginal is
    under-estimated and the information gain ``log p(x | z_t) - estimate`` is
    over-estimated. The gap is ``Var(w) / (2 K E[w]^2) + O(K^-2)`` (delta method, w the
    likelihood weight), i.e. it falls as 1/K; it is the gap of an importance-weighted
    bound (Burda et al. 2016), so E[estimate] rises monotonically in K towards the true
    value. With K = 1 the estimate is E_prior[log p(x | z)], the full Jensen gap. The
    prior is a poor proposal when (x, r) is informative: the relative variance of w grows
    roughly like exp(KL(posterior || prior)), so small K is most biased exactly where the
    information gain is large.
    """
    K = check_samples(K)
    z = prior.rsample((K,)) if prior.has_rsample else prior.sample((K,))
    lp = log_lik(z)
    return torch.logsumexp(lp, dim=0) - math.log(K)


def _detach_stochastic(pz, z: torch.Tensor) -> torch.Tensor:
    """z with its stochastic part detached (for a :class:`StateDist`, the deterministic h
    keeps its graph)."""
    if isinstance(pz, StateDist):
        return torch.cat([z[..., : pz.h_dim], z[..., pz.h_dim:].detach()], -1)
    return z.detach()


def check_window(T: int) -> int:
    if isinstance(T, bool) or not isinstance(T, int) or T < 1:
        raise ValueError(f"the window length T must be an integer >= 1, got {T!r}")
    return T


def _gaussian(h: torch.Tensor, min_scale: float = MIN_SCALE, residual: torch.Tensor | None = None):
    loc, raw = h.chunk(2, dim=-1)
    if residual is not None:
        loc = residual + loc
    return dist.Normal(loc, F.softplus(raw) + min_scale).to_event(1)


class StateDist(TorchDistribution):
    """Distribution of the agent's state s = [h, z]: a point mass on the deterministic
    ``h [*batch, h_dim]`` times ``base``, a distribution over z with event shape ``(z_dim,)``.
    ``log_prob`` is the base density of the z part (density w.r.t. the point mass on h
    times Lebesgue measure on z); the KL between two of them is the KL of the bases
    (valid when both carry the same h, as model and guide do)."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, h: torch.Tensor, base: dist.Distribution):
        self.h, self.base = h, base
        super().__init__(base.batch_shape, torch.Size([h.shape[-1] + base.event_shape[-1]]), validate_args=False)

    @property
    def h_dim(self) -> int:
        return self.h.shape[-1]

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        return StateDist(self.h.expand(*batch_shape, self.h_dim), self.base.expand(batch_shape))

    def rsample(self, sample_shape=torch.Size()):
        z = self.base.rsample(sample_shape)
        return torch.cat([self.h.expand(*z.shape[:-1], self.h_dim), z], -1)

    def sample(self, sample_shape=torch.Size()):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return self.base.log_prob(value[..., self.h_dim:])

    @property
    def mean(self) -> torch.Tensor:
        return torch.cat([self.h, self.base.mean], -1)

    @property
    def stddev(self) -> torch.Tensor:
        return torch.cat([torch.zeros_like(self.h), self.base.stddev], -1)

    @property
    def variance(self) -> torch.Tensor:
        return self.stddev ** 2


@register_kl(StateDist, StateDist)
def _kl_state(p: StateDist, q: StateDist) -> torch.Tensor:
    return kl_divergence(p.base, q.base)


class Recurrent(PyroModule):
    """h_t = GRU(h_{t-1}, ELU(W [z_{t-1}, a_{t-1}])): the deterministic path (PlaNet's RSSM).
    The GRU is written out (Cho et al. 2014 gates) so that it takes any batch shape."""

    def __init__(self, z_dim: int, a_dim: int, h_dim: int, hidden: int = 64):
        super().__init__()
        self.z_dim, self.h_dim = z_dim, h_dim
        self.embed = PyroModule[nn.Linear](z_dim + a_dim, hidden)
        self.gates = PyroModule[nn.Linear](hidden + h_dim, 2 * h_dim)
        self.cand = PyroModule[nn.Linear](hidden + h_dim, h_dim)

    def forward(self, s_prev: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
        h, z = s_prev[..., : self.h_dim], s_prev[..., self.h_dim:]
        e = F.elu(self.embed(torch.cat([z, a_prev], -1)))
        reset, update = torch.sigmoid(self.gates(torch.cat([e, h], -1))).chunk(2, -1)
        c = torch.tanh(self.cand(torch.cat([e, reset * h], -1)))
        return update * h + (1 - update) * c


class Transition(PyroModule):
    """p_a(s_t | s_{t-1}, a_{t-1}): h_t = :class:`Recurrent`, z_t ~ N(mu(h_t), sigma(h_t)).

    ``ensemble`` = M > 1 (not in the paper; the model's epistemic uncertainty, as PETS'
    ensembles): M independently initialised heads (mu, sigma)(h_t); ``member`` (an integer
    tensor broadcasting against the batch) picks each row's head. In learning each window
    draws one member (models.pomdp.pomdp_model), so members see different data; the
    planner spreads its particles over the members, so where they disagree the belief-level
    information gain is large (pplrl.pomdp_planning)."""

    def __init__(self, z_dim: int, a_dim: int, h_dim: int = 64, hidden: int = 64, ensemble: int = 1):
        super().__init__()
        if isinstance(ensemble, bool) or not isinstance(ensemble, int) or ensemble < 1:
            raise ValueError(f"ensemble must be an integer >= 1, got {ensemble!r}")
        self.ensemble = ensemble
        self.recurrent = Recurrent(z_dim, a_dim, h_dim, hidden)
        if ensemble == 1:
            self.prior = MLP(h_dim, 2 * z_dim, (hidden,))
        else:
            self.heads = PyroModule[nn.ModuleList]([MLP(h_dim, 2 * z_dim, (hidden,)) for _ in range(ensemble)])

    def forward(self, s: torch.Tensor, a: torch.Tensor, member: torch.Tensor | None = None) -> StateDist:
        h = self.recurrent(s, a)
        if self.ensemble == 1:
            return StateDist(h, _gaussian(self.prior(h)))
        out = torch.stack([head(h) for head in self.heads], -2)  # [..., M, 2 z_dim]
        member = torch.zeros((), dtype=torch.long) if member is None else member
        pick = F.one_hot(member, self.ensemble).to(out.dtype)
        return StateDist(h, _gaussian((out * pick[..., None]).sum(-2)))


class Emitter(PyroModule):
    """p_a(x_t | s_t) p_a(r_t | s_t): diagonal Gaussians. ``x_scale`` / ``r_scale``: None
    learns the standard deviation (at least ``MIN_SCALE``); a number fixes it (as PlaNet's
    unit-variance decoders). A fixed small x scale keeps the reconstruction term strong:
    with a learned one the filter stayed on the prior (measurements: docs/notes.md, 'POMDP
    model: Emitter x_scale')."""

    def __init__(self, s_dim: int, x_dim: int, hidden: int = 64, x_scale: float | None = None,
                 r_scale: float | None = None):
        super().__init__()
        for name, v in (("x_scale", x_scale), ("r_scale", r_scale)):
            if v is not None and v <= 0:
                raise ValueError(f"{name} must be > 0 or None (learned), got {v}")
        self.x_dim, self.x_scale, self.r_scale = x_dim, x_scale, r_scale
        self.net = MLP(s_dim, (x_dim if x_scale else 2 * x_dim) + (1 if r_scale else 2), (hidden, hidden))

    def forward(self, s: torch.Tensor):
        h = self.net(s)
        nx = self.x_dim if self.x_scale else 2 * self.x_dim
        hx, hr = h[..., :nx], h[..., nx:]
        px = dist.Normal(hx, self.x_scale).to_event(1) if self.x_scale else _gaussian(hx)
        pr = (dist.Normal(hr[..., 0], self.r_scale) if self.r_scale
              else dist.Normal(hr[..., 0], F.softplus(hr[..., 1]) + MIN_SCALE))
        return px, pr

    def log_prob(self, s: torch.Tensor, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        px, pr = self(s)
        return px.log_prob(x) + pr.log_prob(r)


class ActionPrior(PyroModule):
    """p_a(a_t | s_t): the model-free habit, a diagonal Gaussian over [-1, 1]-scaled
    actions (executed clipped)."""

    def __init__(self, s_dim: int, a_dim: int, hidden: int = 64):
        super().__init__()
        self.net = MLP(s_dim, 2 * a_dim, (hidden, hidden))

    def forward(self, s: torch.Tensor):
        loc, raw = self.net(s).chunk(2, -1)
        return dist.Normal(torch.tanh(loc), F.softplus(raw) + MIN_ACTION_SCALE).to_event(1)


class DiscriminativePrior(PyroModule):
    """p_a(s_t | s_{t-1}, a_{t-1}, x_t, r_t): the discriminative agent's direct mapping
    (eq. 6): h_t = :class:`Recurrent`, z_t ~ N(mu(h_t, x_t, r_t), sigma(h_t, x_t, r_t))."""

    def __init__(self, z_dim: int, a_dim: int, x_dim: int, h_dim: int = 64, hidden: int = 64):
        super().__init__()
        self.recurrent = Recurrent(z_dim, a_dim, h_dim, hidden)
        self.net = MLP(h_dim + x_dim + 1, 2 * z_dim, (hidden,))

    def forward(self, s, a, x, r) -> StateDist:
        h = self.recurrent(s, a)
        return StateDist(h, _gaussian(self.net(torch.cat([h, x, r[..., None]], -1))))


class POMDPModel(PyroModule):
    """The agent's distributions p_a: transition + emitter (generative) or the direct
    mapping (discriminative), and the action prior, on states s = [h (h_dim), z (z_dim)].
    One optimiser (the M-step) owns these parameters; the guide's are separate."""

    def __init__(self, x_dim: int, a_dim: int, z_dim: int = 8, hidden: int = 64, generative: bool = True,
                 h_dim: int = 64, x_scale: float | None = None, r_scale: float | None = None, ensemble: int = 1):
        super().__init__()
        self.x_dim, self.a_dim, self.z_dim, self.h_dim, self.generative = x_dim, a_dim, z_dim, h_dim, generative
        self.s_dim = h_dim + z_dim
        self.ensemble = ensemble if generative else 1
        if generative:
            self.transition = Transition(z_dim, a_dim, h_dim, hidden, ensemble)
            self.emitter = Emitter(self.s_dim, x_dim, hidden, x_scale, r_scale)
        else:
            self.discriminative = DiscriminativePrior(z_dim, a_dim, x_dim, h_dim, hidden)
        self.action_prior = ActionPrior(self.s_dim, a_dim, hidden)

    def initial_state(self, batch_shape) -> torch.Tensor:
        """s_{-1} at a window start: zeros."""
        return torch.zeros(*batch_shape, self.s_dim)

    def deter(self, s_prev: torch.Tensor, a_prev: torch.Tensor) -> torch.Tensor:
        """h_t from (s_{t-1}, a_{t-1}): the recurrent path, which the guide shares."""
        return (self.transition if self.generative else self.discriminative).recurrent(s_prev, a_prev)

    def z_prior(self, t: int, s_prev, a_prev, x, r, member: torch.Tensor | None = None) -> StateDist:
        """p_a(s_t | ...), from s_{-1} = 0 at a window start (``s_prev`` None); ``member``:
        the ensemble member per row (None: member 0)."""
        if s_prev is None:
            s_prev = self.initial_state(x.shape[:-1])
        if not self.generative:
            return self.discriminative(s_prev, a_prev, x, r)
        return self.transition(s_prev, a_prev, member)


@dataclass
class Window:
    """A batch of B windows of T steps: ``x [B, T, x_dim]``, ``r [B, T]`` (the reward
    that arrived with x_t), ``a_prev [B, T, a_dim]`` (the executed action before x_t;
    zero at an episode start), ``qa_loc, qa_scale [B, T, a_dim]`` (the planner's q(a_t)),
    ``act [B, T, a_dim]`` (the executed a_t), ``rew [B, T]`` (the reward after a_t) and
    ``done [B, T]`` (1 when a_t ended the episode by termination); ``s0 [B, s_dim]`` the
    acting filter's state s_{-1} before the window's first step (stored with the step, so a
    window continues the episode's filter; None: zeros, as at an episode start)."""

    x: torch.Tensor
    r: torch.Tensor
    a_prev: torch.Tensor
    qa_loc: torch.Tensor
    qa_scale: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    done: torch.Tensor
    s0: torch.Tensor | None = None

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
    # an ensemble's member per window (the bound of a randomly drawn member: each member fits its share)
    M = getattr(model, "ensemble", 1)
    member = {} if M == 1 else {"member": torch.randint(M, (B,))}
    with pyro.plate("windows", B):
        z = window.s0
        for t in pyro.markov(range(T)):
            x_t, r_t = window.x[:, t], window.r[:, t]
            pz = model.z_prior(t, z, window.a_prev[:, t], x_t, r_t, **member)
            z = sample("z", t, pz, term="kl_z")
            if model.generative:
                px, pr = model.emitter(z)
                sample("x", t, px, obs=x_t, term="log_lik_x")
                sample("r", t, pr, obs=r_t, term="log_lik_r")
                # eq. (8)'s -log p(x_t, r_t | z_<t): the guide's z_t among the K prior proposals
                # (pplrl.infogain): an upper estimate of the marginal, so the logged eq. (8) stays
                # a lower bound. z_t's stochastic part is detached here, so the filter is trained
                # by the exact gradient of -KL(q || posterior) (the marginal does not depend on q).
                z0 = _detach_stochastic(pz, z)
                log_marg = contrastive_log_marginal(pz, lambda zk: model.emitter.log_prob(zk, x_t, r_t),
                                                    model.emitter.log_prob(z0, x_t, r_t), K)
                factor("marginal", t, -log_marg, term="neg_log_marginal")
            optimality(t, r_t, 1.0 / temperature)
            sample("a", t, model.action_prior(z), term="kl_a")


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
            z = sample("z", t, dist.Categorical(probs=pred), term="kl_z")
            sample("x", t, dist.Categorical(probs=O_tab[a_prev[:, t], z]), obs=obs[:, t], term="log_lik_x")


__all__ = ["ActionPrior", "DiscriminativePrior", "Emitter", "POMDPModel", "Recurrent", "StateDist", "Transition",
           "Window",
           "check_samples", "check_window", "log_marginal_estimate", "pomdp_model", "tiger_filter_model"]
