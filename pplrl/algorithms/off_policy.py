"""Write an objective, get an agent: the off-policy actor-critic derived from one
model/guide pair over a batch of states.

A user supplies (as class attributes or methods of an :class:`ActorCritic` subclass):

* ``model(obs, prior, critic, scale, policy=None, **kw)`` and a ``guide`` of the same
  signature, written with :mod:`models.sites`: action sites sampled from the prior (model)
  and the policy (guide), one optimality factor ``scale * critic(obs, a)``
  (:func:`models.sites.optimality`), any other sites and terms by name;
* :meth:`ActorCritic.make_prior`: the prior policy, a callable or a module (a module with
  parameters is learnable: it is trained by the same -ELBO, plus :meth:`ActorCritic.prior_loss`);
* :meth:`ActorCritic.temperature`: a constant, or a :class:`Dual` on any named term of
  the model against a target (SAC's automatic alpha is a dual on ``kl_policy``).

The library derives and runs the rest, each piece from the same pair:

* actor (and learnable prior): ``temperature * -ELBO / B`` through Pyro
  (:class:`pplrl.elbo.ReparamOptimalityELBO`; scale = 1 / temperature);
* critics: twin Q on ``r + gamma (1 - d) V'(x')``, ``V'`` the per-state ELBO under the target
  critic in reward units (:func:`pplrl.elbo.soft_value`): for SAC's flat prior
  E_q[Q'(x', a) - alpha log q(a|x')], for a prior pi E_q[Q' - alpha log q/pi];
* the dual: ``log_temperature * (target - term / B)`` by gradient descent, so the
  temperature rises while the term exceeds its target;
* one optimiser per module group (policy, critic, prior, dual), Polyak targets, and the
  checkpoint from these declared pieces (bit-for-bit resume).

:class:`OffPolicyActorCritic` is the shared base (policy, replay, warm-up, checkpoints of
policy and replay) of every off-policy agent here, including VIREL and MEMB.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from guides.actor import actor_guide
from guides.continuous import GaussianPolicy
from models.actor import actor_model, flat_prior
from pplrl.algorithms.base import Agent
from pplrl.elbo import ReparamOptimalityELBO, soft_value
from pplrl.nets import TwinQ, polyak_update, target_copy
from pplrl.replay import Batch, ReplayBuffer


@dataclass
class OffPolicyConfig:
    """Settings every off-policy actor-critic here shares (SAC, VIREL, MEMB)."""

    env_id: str = "Pendulum-v1"
    """gymnasium id of a continuous-action environment"""
    seed: int = 0
    gamma: float = 0.99
    tau: float = 0.005
    """Polyak factor of the target networks"""
    lr: float = 3e-4
    batch_size: int = 256
    buffer_size: int = 1_000_000
    learning_starts: int = 1000
    """environment steps with uniform random actions before learning"""
    warmup_hold: int = 1
    """each uniform random warm-up action is held for this many env steps (1: a fresh draw
    every step); held actions reach states that i.i.d. ones do not, e.g. Mountain Car's goal
    (measurements: docs/notes.md, 'off-policy agents: warmup_hold')"""
    hidden: tuple[int, ...] = (256, 256)

    #: further fields that must be > 0 (subclasses extend)
    positive: ClassVar[tuple[str, ...]] = ()

    def validate(self) -> None:
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"gamma must lie in (0, 1], got {self.gamma}")
        if not 0.0 < self.tau <= 1.0:
            raise ValueError(f"tau must lie in (0, 1], got {self.tau}")
        for name in ("lr", "batch_size", "buffer_size", *self.positive):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.learning_starts < 0:
            raise ValueError("learning_starts must be >= 0")
        if isinstance(self.warmup_hold, bool) or not isinstance(self.warmup_hold, int) or self.warmup_hold < 1:
            raise ValueError(f"warmup_hold must be an integer >= 1, got {self.warmup_hold!r}")


class OffPolicyActorCritic(Agent):
    """What SAC, VIREL and MEMB share: a tanh-Gaussian policy on [-1, 1]^d, a real
    replay buffer, uniform random actions for the first ``learning_starts`` steps
    (each held ``warmup_hold`` steps),
    the agent's own numpy RNG for batches, and checkpoints of those pieces
    (subclasses add their networks through :meth:`_modules` / :meth:`_optimisers`)."""

    def __init__(self, config, obs_dim: int, act_dim: int):
        config.validate()
        self.config, self.obs_dim, self.act_dim = config, obs_dim, act_dim
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        self.policy = GaussianPolicy(obs_dim, act_dim, low=-1.0, high=1.0, hidden=config.hidden)
        self.replay = ReplayBuffer(obs_dim, act_dim, config.buffer_size)
        self.prior = flat_prior(act_dim)
        self.steps_seen = 0
        self.warmup_action: np.ndarray | None = None

    # -- acting ---------------------------------------------------------------------
    def random_warmup_action(self) -> np.ndarray:
        """A uniform action on [-1, 1]^d, redrawn every ``warmup_hold`` env steps."""
        return self.held_uniform_action(self.steps_seen, self.config.warmup_hold)

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        if not deterministic and self.steps_seen < self.config.learning_starts:
            return self.random_warmup_action()
        with torch.no_grad():
            a = self.policy.act(torch.as_tensor(obs, dtype=torch.float32)[None], deterministic)
        return a[0].numpy()

    def observe(self, obs, act, rew, next_obs, terminated: bool) -> None:
        self.replay.add(obs, act, rew, next_obs, terminated)
        self.steps_seen += 1

    def sample_batch(self) -> Batch:
        return self.replay.sample(self.config.batch_size, self.rng)

    def ready(self) -> bool:
        return self.steps_seen >= max(self.config.learning_starts, 1) and len(self.replay) >= self.config.batch_size

    # -- checkpoints ------------------------------------------------------------------
    def _modules(self) -> dict:
        """name -> nn.Module or torch.optim.Optimizer to checkpoint (besides policy and replay)."""
        return {}

    def state_dict(self) -> dict:
        state = {name: obj.state_dict() for name, obj in self._modules().items()}
        state.update({"policy": self.policy.state_dict(), "replay": self.replay.state_dict(),
                      "rng": self.rng.bit_generator.state, "steps_seen": self.steps_seen,
                      "warmup_action": self.warmup_action})
        return state

    def load_state_dict(self, state: dict) -> None:
        for name, obj in self._modules().items():
            obj.load_state_dict(state[name])
        self.policy.load_state_dict(state["policy"])
        self.replay.load_state_dict(state["replay"])
        self.rng.bit_generator.state = state["rng"]
        self.steps_seen = state["steps_seen"]
        self.warmup_action = state.get("warmup_action")  # absent in checkpoints older than warmup_hold


@dataclass
class ActorCriticConfig(OffPolicyConfig):
    """Settings of an :class:`ActorCritic`."""

    gradient_steps: int = 1
    """updates per environment step"""
    init_alpha: float = 1.0
    """initial temperature (the optimality factor is Q / temperature)"""
    autotune_alpha: bool = True
    """tune the temperature by its dual (:meth:`ActorCritic.temperature`); False keeps it fixed"""

    positive = ("gradient_steps", "init_alpha")


@dataclass(frozen=True)
class Dual:
    """A temperature tuned so that the ELBO term ``term`` (per state) meets ``target``:
    gradient descent on ``log_temperature * (target - term)``, which raises the temperature
    while the term is above its target and lowers it below. With the flat prior,
    ``Dual("kl_policy", -target_entropy)`` is SAC's automatic entropy tuning."""

    term: str
    target: float


class ActorCritic(OffPolicyActorCritic):
    """An off-policy actor-critic derived from one model/guide pair (see the module
    docstring). The defaults are SAC: :func:`models.actor.actor_model` with the flat prior,
    :func:`guides.actor.actor_guide`, and a dual on ``kl_policy`` with target ``act_dim``
    (entropy -act_dim). Subclasses override the class attributes ``model`` / ``guide`` and
    the methods :meth:`make_prior`, :meth:`temperature`, :meth:`prior_loss`,
    :meth:`model_kwargs`."""

    Config = ActorCriticConfig
    model: ClassVar[Callable] = staticmethod(actor_model)
    guide: ClassVar[Callable] = staticmethod(actor_guide)

    def __init__(self, config, obs_dim: int, act_dim: int):
        super().__init__(config, obs_dim, act_dim)
        self.prior = self.make_prior()
        self.critic = TwinQ(obs_dim, act_dim, config.hidden)
        self.critic_target = target_copy(self.critic)
        self.log_alpha = torch.tensor(float(np.log(config.init_alpha)), requires_grad=True)
        self.dual = self.temperature()
        self.actor_opt = torch.optim.Adam(self.policy.parameters(), lr=config.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=config.lr)
        prior_params = [p for p in self.prior.parameters() if p.requires_grad] if isinstance(
            self.prior, nn.Module) else []
        self.prior_opt = torch.optim.Adam(prior_params, lr=config.lr) if prior_params else None
        self.actor_elbo = ReparamOptimalityELBO()

    # -- what a subclass declares ------------------------------------------------------
    def make_prior(self):
        """The prior policy pi(a|x): a callable returning a distribution over actions, or a
        module (learnable if it has parameters). Default: the improper uniform prior (MaxEnt)."""
        return flat_prior(self.act_dim)

    def temperature(self) -> Dual | None:
        """The dual that tunes the temperature (None: fixed at ``init_alpha``). Default: SAC's,
        a dual on ``kl_policy`` (flat prior: E[log q]) with target ``act_dim`` (entropy -act_dim)."""
        return Dual("kl_policy", float(self.act_dim)) if self.config.autotune_alpha else None

    def prior_loss(self, batch: Batch) -> torch.Tensor | None:
        """A learnable prior's own loss, added to its -ELBO (e.g. behaviour cloning on replay actions)."""
        return None

    def model_kwargs(self) -> dict:
        """Further keyword arguments of ``model`` and ``guide`` (besides ``policy``)."""
        return {}

    # -- what the library derives ----------------------------------------------------------
    @property
    def alpha(self) -> torch.Tensor:
        """The temperature (the optimality factor's scale is its inverse)."""
        return self.log_alpha.exp().detach()

    def _pair_args(self, obs: torch.Tensor, q_fn, alpha: torch.Tensor) -> tuple[tuple, dict]:
        return (obs, self.prior, q_fn, 1.0 / alpha), {"policy": self.policy, **self.model_kwargs()}

    def critic_target_value(self, batch: Batch) -> torch.Tensor:
        """y = r + gamma (1 - d) V'(x'), V' the pair's per-state ELBO under the target critic
        in reward units (:func:`pplrl.elbo.soft_value`)."""
        with torch.no_grad():
            alpha = self.alpha
            args, kwargs = self._pair_args(batch.next_obs, self.critic_target.min, alpha)
            v = soft_value(self.model, self.guide, alpha, *args, **kwargs)
            return batch.rew + self.config.gamma * (1.0 - batch.done) * v

    def actor_loss(self, obs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """-temperature * ELBO / B of the pair (for SAC: E[alpha log q - Q])."""
        alpha = self.alpha
        args, kwargs = self._pair_args(obs, self.critic.min, alpha)
        loss = self.actor_elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)
        return alpha * loss / obs.shape[0], self.actor_elbo.last_terms

    def dual_loss(self, terms: dict[str, float], batch_size: int) -> torch.Tensor:
        """log_temperature * (target - term / B) (0 without a dual)."""
        if self.dual is None:
            return torch.zeros(())
        if self.dual.term not in terms:
            raise ValueError(f"the temperature's dual is on term {self.dual.term!r}, which the model does not have; "
                             f"its terms: {sorted(k for k in terms if k != 'elbo')}")
        return self.log_alpha * (self.dual.target - terms[self.dual.term] / batch_size)

    def update(self, step: int) -> dict[str, float]:
        if not self.ready():
            return {}
        metrics: dict[str, float] = {}
        for _ in range(self.config.gradient_steps):
            metrics = self.train_step(self.sample_batch(), step)
        return metrics

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        """One update: critic, actor (and learnable prior), dual, targets."""
        y = self.critic_target_value(batch)
        q1, q2 = self.critic(batch.obs, batch.act)
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        out = self.checked(step, critic_loss=critic_loss)  # stop before stepping on garbage
        self.gradient_step(self.critic_opt, critic_loss)

        actor_loss, terms = self.actor_loss(batch.obs)
        out.update(self.checked(step, actor_loss=actor_loss))
        if self.prior_opt is None:
            self.gradient_step(self.actor_opt, actor_loss)
        else:  # the prior's gradient of the same -ELBO, plus its own loss
            extra = self.prior_loss(batch)
            loss = actor_loss if extra is None else actor_loss + extra
            if extra is not None:
                out.update(self.checked(step, prior_loss=extra))
            self.actor_opt.zero_grad()
            self.prior_opt.zero_grad()
            loss.backward()
            self.actor_opt.step()
            self.prior_opt.step()
        B = batch.obs.shape[0]
        alpha_loss = self.dual_loss(terms, B)
        if self.dual is not None:
            self.gradient_step(self.alpha_opt, alpha_loss)
        polyak_update(self.critic, self.critic_target, self.config.tau)
        out.update(self.checked(step, alpha_loss=alpha_loss))
        out.update({"alpha": float(self.alpha), **self.elbo_metrics(terms, B)})
        return out

    # -- checkpoints: the declared pieces ------------------------------------------------
    def _modules(self) -> dict:
        mods = {"critic": self.critic, "critic_target": self.critic_target, "actor_opt": self.actor_opt,
                "critic_opt": self.critic_opt, "alpha_opt": self.alpha_opt}
        if self.prior_opt is not None:
            mods.update({"prior": self.prior, "prior_opt": self.prior_opt})
        return mods

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_alpha": self.log_alpha.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])


__all__ = ["ActorCritic", "ActorCriticConfig", "Dual", "OffPolicyActorCritic", "OffPolicyConfig"]
