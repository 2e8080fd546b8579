"""Planning as inference for the generative POMDP agent (003_…, Sec. 3.3, eq. 10, App. C).

At time t the action posterior q(a_t) maximises the bound's current and future terms
with the environment and future posteriors replaced by the agent's own model::

    J(a_t:t+H) = E_{p_a}[ sum_{tau < H} gamma^tau ( log p_a(a_tau | z_tau)
                         + r_{tau+1} / temperature + IG_{tau+1} )
                         + gamma^H ( log p_a(a_H | z_H) + Q(z_H, a_H) / temperature ) ]

with z_0 ~ q(z_t) (``particles`` samples), z_{tau+1} ~ p_a(z | z_tau, a_tau), the
predicted reward E[r | z_{tau+1}], and the information gain IG_{tau+1}, switchable with
``info_gain`` so its effect can be measured. The -log q(a) part of the bound is the
entropy of the search distribution, the same for every candidate, so it does not enter
the ranking. Q is an optional learned bootstrap beyond the horizon; with
``horizon = 0`` the planner maximises log p_a(a | z) + Q(z, a) / temperature only (the
discriminative agent, which has no model to roll out).

**Information gain** (``info_gain_mode``; issue 19 point 3). ``"belief"`` (default): the
mutual information between the state and the next (x, r) under the *belief*, the P
particles of q(z_t) rolled forward together (each on its ensemble member, particle i on
member i mod M): one (x, r) drawn per particle and scored against every particle,
:func:`pplrl.infogain.pooled_info_gain` (a lower bound on the particle belief's I(z; x, r),
at most log P). It is large where the particles (the belief, and the ensemble members'
disagreement: epistemic uncertainty) are spread and the learned, state-dependent
observation noise can tell them apart, which is the paper's argument (Sec. 3.3: "bias
planning toward states with lower epistemic uncertainty"). ``"transition"``: the per-particle
gain of the earlier planner, conditioned on each particle's z_tau, with K prior draws
around its posterior sample (pplrl.infogain.contrastive_log_marginal); it sees only
one-step transition noise (kept for comparison).

**Common random numbers.** One set of standard-normal draws (transition, x, r per particle
and step) is made per call of :meth:`CEMPlanner.plan` and shared by every candidate and
every CEM iteration, so candidates are compared on the same futures; the ranking's noise is
then the noise of the particles, not of each candidate's own draws (repeatability: tests).

The optimiser is the cross-entropy method over open-loop action sequences; in its first
iteration a fraction of the candidates are sampled by rolling out the action prior in the
model (the prior as roll-out policy, Sec. 3.3). q(a_t) is the Gaussian of the final elite
set's first actions.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.distributions import Independent, Normal

from models.pomdp import check_samples
from pplrl.infogain import contrastive_log_marginal, pooled_info_gain

ValueFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


class CommonNoise:
    """Standard-normal draws cached by key: the same tensor for the same key, so every
    candidate (and CEM iteration) of one planning call sees the same futures. Drawn from the
    global torch stream on first use (so a seeded run stays reproducible)."""

    def __init__(self):
        self.cache: dict = {}

    def get(self, key, shape) -> torch.Tensor:
        if key not in self.cache:
            self.cache[key] = torch.randn(*shape)
        return self.cache[key]


def _normal(d):
    """The Normal under a distribution (Independent, or a StateDist's base)."""
    if hasattr(d, "base") and hasattr(d, "h"):
        d = d.base
    return d.base_dist if isinstance(d, Independent) else d


def _event(d, P: int) -> tuple:
    """Shape of one set of draws for P particles of ``d`` (batch ``[N, P]``): ``(P, *event)``."""
    return (P, *_normal(d).loc.shape[2:])


def rsample_with(d, eps: torch.Tensor) -> torch.Tensor:
    """``loc + scale * eps`` for a (StateDist over an) Independent Normal or a Normal;
    ``eps [P, ...]`` broadcasts over the leading (candidate) dimension."""
    base = _normal(d)
    z = base.loc + base.scale * eps
    if hasattr(d, "h") and hasattr(d, "base"):
        return torch.cat([d.h.expand(*z.shape[:-1], d.h.shape[-1]), z], -1)
    return z


def _pairwise_log_lik(px, pr, x: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """``[N, P, P]``: log p(x_i, r_i | z_j) from emitter outputs with batch ``[N, P]``."""
    bx, br = _normal(px), _normal(pr)
    lx = Normal(bx.loc[:, None], bx.scale[:, None]).log_prob(x[:, :, None])
    lx = lx.sum(-1) if isinstance(px, Independent) else lx
    return lx + Normal(br.loc[:, None], br.scale[:, None]).log_prob(r[:, :, None])


@dataclass
class PlannerConfig:
    horizon: int = 8
    """model steps rolled out (0: no model, only the bootstrap Q(z_t, a_t))"""
    candidates: int = 64
    elites: int = 8
    iterations: int = 3
    particles: int = 16
    """samples of z_t from q(z_t) each candidate is scored on (the belief; >= 2 for the belief-level gain)"""
    info_gain: bool = True
    """include the information-gain (mutual information) term of eq. (10)"""
    info_gain_mode: str = "belief"
    """'belief': pooled over the particles (module docstring); 'transition': per particle, K prior draws"""
    info_gain_samples: int = 4
    """K, prior draws per particle in the 'transition' mode"""
    info_gain_weight: float = 1.0
    """scale of the information gain in the score (1: eq. 10)"""
    temperature: float = 1.0
    gamma: float = 0.99
    prior_rollout_fraction: float = 0.5
    """share of the first iteration's candidates drawn by rolling out the action prior"""
    init_std: float = 0.6
    min_std: float = 0.05
    action_hold: int = 1
    """CEM noise is drawn once per block of this many steps and held (piecewise-constant
    perturbations; not in the paper). On Pendulum one step of torque barely moves the
    state, and i.i.d. per-step noise averages out in the elite mean (docs/notes.md, 'CEM
    planner: action_hold')"""

    def validate(self) -> None:
        if not isinstance(self.horizon, int) or self.horizon < 0:
            raise ValueError(f"planning horizon must be an integer >= 0, got {self.horizon!r}")
        for name in ("candidates", "elites", "iterations", "particles"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        if self.elites > self.candidates:
            raise ValueError(f"elites ({self.elites}) cannot exceed candidates ({self.candidates})")
        check_samples(self.info_gain_samples)
        if self.info_gain_mode not in ("belief", "transition"):
            raise ValueError(f"info_gain_mode must be 'belief' or 'transition', got {self.info_gain_mode!r}")
        if self.info_gain and self.info_gain_mode == "belief" and self.particles < 2:
            raise ValueError("the belief-level information gain needs particles >= 2")
        if self.info_gain_weight < 0:
            raise ValueError(f"info_gain_weight must be >= 0, got {self.info_gain_weight}")
        if self.temperature <= 0 or not 0 < self.gamma <= 1:
            raise ValueError("temperature must be > 0 and gamma in (0, 1]")
        if not isinstance(self.action_hold, int) or self.action_hold < 1:
            raise ValueError(f"action_hold must be an integer >= 1, got {self.action_hold!r}")
        if not 0 <= self.prior_rollout_fraction <= 1 or self.init_std <= 0 or self.min_std <= 0:
            raise ValueError("prior_rollout_fraction must lie in [0, 1]; init_std and min_std must be > 0")


class CEMPlanner:
    """Cross-entropy planning on a model with ``transition(z, a)``, ``emitter(z) ->
    (p(x|z), p(r|z))``, ``emitter.log_prob(z, x, r)`` and ``action_prior(z)`` (any object
    with these, e.g. :class:`models.pomdp.POMDPModel`). Actions live in [-1, 1]."""

    def __init__(self, config: PlannerConfig):
        config.validate()
        self.config = config

    @torch.no_grad()
    def score(self, model, z0: torch.Tensor, actions: torch.Tensor, value_fn: ValueFn | None = None,
              noise: CommonNoise | None = None):
        """Scores ``[N]`` of action sequences ``[N, H+1, a_dim]`` from particles
        ``z0 [P, z_dim]`` and the mean terms ``{"reward", "info_gain", "prior", "value"}`` ``[N]``.
        ``noise``: the common random numbers (a fresh set when None)."""
        c = self.config
        noise = CommonNoise() if noise is None else noise
        N, L, _ = actions.shape
        H = L - 1
        P = z0.shape[0]
        M = getattr(model, "ensemble", 1)
        member = {} if M == 1 else {"member": torch.arange(P) % M}
        z = z0[None].expand(N, P, z0.shape[-1])
        acts = actions[:, None].expand(N, P, L, actions.shape[-1])
        zero = torch.zeros(N, P)
        reward, prior, value = zero.clone(), zero.clone(), zero.clone()
        info = torch.zeros(N)
        for tau in range(H):
            a = acts[:, :, tau]
            disc = c.gamma ** tau
            prior = prior + disc * model.action_prior(z).log_prob(a)
            pz = model.transition(z, a, **member)
            z = rsample_with(pz, noise.get(("z", tau), _event(pz, P)))
            px, pr = model.emitter(z)
            reward = reward + disc * pr.mean / c.temperature
            if c.info_gain:
                x = rsample_with(px, noise.get(("x", tau), _event(px, P)))
                r = rsample_with(pr, noise.get(("r", tau), (P,)))
                if c.info_gain_mode == "belief":
                    info = info + disc * pooled_info_gain(_pairwise_log_lik(px, pr, x, r))
                else:
                    ll = model.emitter.log_prob(z, x, r)
                    lm = contrastive_log_marginal(pz, lambda zk: model.emitter.log_prob(zk, x, r), ll,
                                                  c.info_gain_samples)
                    info = info + disc * (ll - lm).mean(1)
        a = acts[:, :, H]
        disc = c.gamma ** H
        if value_fn is not None or H == 0:
            prior = prior + disc * model.action_prior(z).log_prob(a)
        if value_fn is not None:
            value = value + disc * value_fn(z, a) / c.temperature
        info = c.info_gain_weight * info
        total = (reward + prior + value).mean(1) + info
        terms = {"reward": reward.mean(1), "info_gain": info, "prior": prior.mean(1), "value": value.mean(1)}
        return total, terms

    @torch.no_grad()
    def prior_rollouts(self, model, z: torch.Tensor, n: int, length: int) -> torch.Tensor:
        """``n`` action sequences sampled closed-loop from the action prior in the model,
        starting from the particle ``z [z_dim]``."""
        z = z[None].expand(n, z.shape[-1])
        out = []
        for tau in range(length):
            a = model.action_prior(z).sample().clamp(-1, 1)
            out.append(a)
            if tau < length - 1:
                z = model.transition(z, a).sample()
        return torch.stack(out, 1)

    @torch.no_grad()
    def plan(self, model, z_particles: torch.Tensor, value_fn: ValueFn | None = None,
             init: tuple[torch.Tensor, torch.Tensor] | None = None):
        """q(a_t) as ``(loc [a_dim], scale [a_dim])`` and a dict of the elite terms.
        ``init`` (loc, scale) is the starting q(a_t) for the first action (default: the
        action prior's mean at the particles' mean, with ``init_std``)."""
        c = self.config
        H = c.horizon
        if H > 0 and not getattr(model, "generative", True):
            raise ValueError("planning with horizon > 0 needs a generative model (the discriminative agent has none)")
        a_dim = model.action_prior(z_particles[:1]).event_shape[-1]
        z_mean = z_particles.mean(0)
        mean = torch.zeros(H + 1, a_dim)
        std = torch.full((H + 1, a_dim), c.init_std)
        if init is None:
            mean[0] = model.action_prior(z_mean).mean.clamp(-1, 1)
        else:
            mean[0], std[0] = init[0].clamp(-1, 1), init[1].clamp_min(c.min_std)
        elite_actions = None
        noise = CommonNoise()  # one set of futures for every candidate and iteration
        for it in range(c.iterations):
            blocks = -(-(H + 1) // c.action_hold)
            eps = torch.randn(c.candidates, blocks, a_dim).repeat_interleave(c.action_hold, dim=1)[:, : H + 1]
            cand = (mean + std * eps).clamp(-1, 1)
            if it == 0:
                n_prior = int(round(c.prior_rollout_fraction * c.candidates))
                if n_prior:
                    cand[:n_prior] = self.prior_rollouts(model, z_mean, n_prior, H + 1)
            elif elite_actions is not None:
                cand[: c.elites] = elite_actions
            scores, terms = self.score(model, z_particles, cand, value_fn, noise)
            idx = scores.topk(c.elites).indices
            elite_actions = cand[idx]
            mean = elite_actions.mean(0)
            std = (elite_actions.std(0, unbiased=False).clamp_min(c.min_std) if c.elites > 1
                   else torch.full_like(mean, c.min_std))
        info = {k: float(v[idx].mean()) for k, v in terms.items()}
        info["score"] = float(scores[idx].mean())
        return mean[0], std[0], info


__all__ = ["CEMPlanner", "CommonNoise", "PlannerConfig", "rsample_with"]
