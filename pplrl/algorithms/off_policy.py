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
* one optimiser per module group (policy, critic, value, prior, dual), Polyak targets, and
  the checkpoint from these declared pieces (bit-for-bit resume).

Objectives that are not SAC-shaped change a few declared pieces rather than the update:
VIREL (:mod:`pplrl.algorithms.virel`) has its own pair with a baseline, a non-soft critic
learnt through a state-value network and a temperature from the critic's residual; MEMB
(:mod:`pplrl.algorithms.memb`) has a pair through a learned model, fitted in
:meth:`ActorCritic.before_updates`. Both run this class's update unchanged (bit-identical
to their hand-written updates from the same state).

:class:`OffPolicyActorCritic` is the shared base (policy, replay, warm-up, checkpoints of
policy and replay) of every off-policy agent here.
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
from models.sites import inverse_temperature, temperature_value
from pplrl.algorithms.base import Agent, check_pyro_validation
from pplrl.device import resolve_device
from pplrl.elbo import ReparamOptimalityELBO, soft_value
from pplrl.nets import TwinQ, VNetwork, adam, frozen, polyak_update, target_copy
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
    device: str = "cpu"
    """where the agent's networks and batches live: 'cpu', 'cuda' (or 'cuda:N'), or 'auto'
    (CUDA when a GPU is present); the replay stays in host memory (pplrl.device)"""
    pyro_validation: str = "first"
    """Pyro's and torch's checks (distribution arguments and supports, NaN warnings) in
    ``update``: 'first' (on for the first update that trains, then off: Pyro's advice for
    mature models; about 0.3 ms of a 14 ms SAC update), 'always', 'never'. pplrl's own site-match and
    finite-loss checks always run (pplrl.algorithms.base.validated_update)"""

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
        resolve_device(self.device)
        check_pyro_validation(self.pyro_validation)


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
        return a[0].cpu().numpy()

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
    (entropy -act_dim).

    **What a subclass declares** (each optional): the class attributes ``model`` / ``guide``;
    the methods :meth:`make_prior`, :meth:`temperature`, :meth:`prior_loss`,
    :meth:`model_kwargs`. **What it may change** when its objective is not SAC-shaped (VIREL
    and MEMB use these): :meth:`actor_args` (a pair with its own signature), ``critic_model`` /
    ``critic_guide`` (the pair the critic's soft value comes from, when the actor's is not
    it), ``soft_critic``, ``state_value``, ``critic_loss_weight``, :meth:`initial_temperature`,
    :meth:`current_temperature`, :meth:`reward`, :meth:`learning_rate`,
    :meth:`updates_per_step`, :meth:`before_updates`, :meth:`extra_metrics`."""

    Config = ActorCriticConfig
    model: ClassVar[Callable] = staticmethod(actor_model)
    guide: ClassVar[Callable] = staticmethod(actor_guide)
    critic_model: ClassVar[Callable | None] = None
    """the pair whose per-state ELBO under a critic is the soft value (None: ``model`` /
    ``guide``), called as ``(obs, prior, critic, scale, policy=..., **model_kwargs())``"""
    critic_guide: ClassVar[Callable | None] = None
    soft_critic: ClassVar[bool] = True
    """False: the critic's value is the pair's expected optimality value with no KL term
    (soft_value at temperature 0: VIREL's value is that of the Boltzmann policy, no entropy)"""
    state_value: ClassVar[bool] = False
    """True: a state-value network V learns the soft value under the online critic and Q learns
    ``r + gamma (1 - d) V_bar(x')``, V_bar Polyak-averaged (SAC v1, VIREL, MEMB); False: Q
    learns ``r + gamma (1 - d) V'(x')`` with V' the soft value under the target critic (SAC v2)"""
    critic_loss_weight: ClassVar[float] = 1.0
    """the factor of the summed per-head squared TD errors (VIREL and MEMB write J^Q = 1/2 (.)^2)"""

    def __init__(self, config, obs_dim: int, act_dim: int):
        super().__init__(config, obs_dim, act_dim)
        self.prior = self.make_prior()
        self.critic = TwinQ(obs_dim, act_dim, config.hidden)
        if self.state_value:
            self.critic_target = None
            self.value = VNetwork(obs_dim, config.hidden)
            self.value_target = target_copy(self.value)
            self.value_opt = adam(self.value.parameters(), lr=self.learning_rate("value"))
        else:
            self.critic_target = target_copy(self.critic)
            self.value = self.value_target = self.value_opt = None
        self.dual = self.temperature()
        initial = self.initial_temperature()
        initial = temperature_value(initial.item() if torch.is_tensor(initial) else initial)
        if self.dual is None:  # fixed: kept exactly as given (floored at MIN_TEMPERATURE)
            self.log_alpha = self.alpha_opt = None
            self._fixed_alpha = torch.tensor(initial)
        else:
            self.log_alpha = torch.tensor(float(np.log(initial)), requires_grad=True)
            self.alpha_opt = adam([self.log_alpha], lr=self.learning_rate("dual"))
        self.actor_opt = adam(self.policy.parameters(), lr=self.learning_rate("policy"))
        self.critic_opt = adam(self.critic.parameters(), lr=self.learning_rate("critic"))
        prior_params = [p for p in self.prior.parameters() if p.requires_grad] if isinstance(
            self.prior, nn.Module) else []
        self.prior_opt = adam(prior_params, lr=self.learning_rate("prior")) if prior_params else None
        self.actor_elbo = ReparamOptimalityELBO()

    # -- what a subclass declares ------------------------------------------------------
    def make_prior(self):
        """The prior policy pi(a|x): a callable returning a distribution over actions, or a
        module (learnable if it has parameters). Default: the improper uniform prior (MaxEnt)."""
        return flat_prior(self.act_dim)

    def temperature(self) -> Dual | None:
        """The dual that tunes the temperature (None: fixed at :meth:`initial_temperature`).
        Default: SAC's, a dual on ``kl_policy`` (flat prior: E[log q]) with target ``act_dim``
        (entropy -act_dim)."""
        return Dual("kl_policy", float(self.act_dim)) if self.config.autotune_alpha else None

    def prior_loss(self, batch: Batch) -> torch.Tensor | None:
        """A learnable prior's own loss, added to its -ELBO (e.g. behaviour cloning on replay actions)."""
        return None

    def model_kwargs(self) -> dict:
        """Further keyword arguments of ``model`` and ``guide`` (besides ``policy``)."""
        return {}

    # -- what a subclass may change ------------------------------------------------------
    def actor_args(self, obs: torch.Tensor, critic, temperature: torch.Tensor) -> tuple[tuple, dict]:
        """How ``model`` / ``guide`` are called on a batch of states with a critic and the
        temperature. Default: ``(obs, prior, critic, 1 / temperature)``, ``policy=...`` and
        :meth:`model_kwargs`."""
        return (obs, self.prior, critic, 1.0 / temperature), {"policy": self.policy, **self.model_kwargs()}

    def critic_args(self, obs: torch.Tensor, critic, temperature: torch.Tensor) -> tuple[tuple, dict]:
        """How the critic's pair is called: :meth:`actor_args` when it is the actor's pair,
        else the standard signature."""
        if self.critic_model is None:
            return self.actor_args(obs, critic, temperature)
        return (obs, self.prior, critic, inverse_temperature(temperature)), {"policy": self.policy,
                                                                              **self.model_kwargs()}

    def initial_temperature(self) -> float:
        """The temperature before any dual step (or always, without a dual): ``init_alpha``."""
        return self.config.init_alpha

    def current_temperature(self, critic_loss: torch.Tensor) -> torch.Tensor:
        """The temperature of this update, given the batch's (detached) critic loss: the dual's
        or the fixed one. (VIREL's is lambda times the critic's Bellman residual.)"""
        return self.alpha

    def reward(self, batch: Batch) -> torch.Tensor:
        """The reward the critic learns (VIREL scales it)."""
        return batch.rew

    def learning_rate(self, group: str) -> float:
        """The learning rate of one optimiser group: ``policy``, ``critic``, ``value``, ``prior``,
        ``dual``. Default: ``config.lr`` for all."""
        return self.config.lr

    def updates_per_step(self) -> int:
        """Gradient steps per environment step: ``gradient_steps``."""
        return self.config.gradient_steps

    def before_updates(self, step: int) -> dict[str, float]:
        """Runs once per environment step before the gradient steps (e.g. fit a learned model)."""
        return {}

    def extra_metrics(self, terms: dict[str, float], batch_size: int, temperature: torch.Tensor,
                      critic_loss: torch.Tensor) -> dict[str, float]:
        """Further values to log per update (besides losses, temperature and the ELBO's terms)."""
        return {}

    # -- what the library derives ----------------------------------------------------------
    @property
    def alpha(self) -> torch.Tensor:
        """The temperature (the optimality factor's scale is its inverse)."""
        return self._fixed_alpha if self.log_alpha is None else self.log_alpha.exp().detach()

    def _critic_pair(self) -> tuple[Callable, Callable]:
        if self.critic_model is None:
            return self.model, self.guide
        return self.critic_model, self.critic_guide

    def soft_value(self, obs: torch.Tensor, critic, temperature: torch.Tensor) -> torch.Tensor:
        """The critic pair's per-state ELBO under ``critic`` in reward units
        (:func:`pplrl.elbo.soft_value`; at temperature 0 when not ``soft_critic``)."""
        model, guide = self._critic_pair()
        args, kwargs = self.critic_args(obs, critic, temperature)
        return soft_value(model, guide, temperature if self.soft_critic else 0.0, *args, **kwargs)

    def critic_target_value(self, batch: Batch) -> torch.Tensor:
        """y = r + gamma (1 - d) V'(x'): V' the pair's soft value under the target critic, or
        the target value network with ``state_value``."""
        with torch.no_grad():
            if self.state_value:
                v = self.value_target(batch.next_obs)
            else:
                v = self.soft_value(batch.next_obs, self.critic_target.min, self.alpha)
            return self.reward(batch) + self.config.gamma * (1.0 - batch.done) * v

    def critic_loss(self, batch: Batch) -> torch.Tensor:
        """Both heads' squared error to :meth:`critic_target_value`, times ``critic_loss_weight``."""
        y = self.critic_target_value(batch)
        q1, q2 = self.critic(batch.obs, batch.act)
        return self.critic_loss_weight * (F.mse_loss(q1, y) + F.mse_loss(q2, y))

    def value_loss(self, obs: torch.Tensor) -> torch.Tensor:
        """``state_value`` only: 1/2 (V(x) - soft value under the online critic)^2."""
        with torch.no_grad():
            target = self.soft_value(obs, self.critic.min, self.alpha)
        return 0.5 * F.mse_loss(self.value(obs), target)

    def actor_loss(self, obs: torch.Tensor, temperature: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, dict[str, float]]:
        """-temperature * ELBO / B of the pair (for SAC: E[alpha log q - Q])."""
        alpha = self.alpha if temperature is None else temperature
        with frozen(*self.actor_frozen_modules()):
            args, kwargs = self.actor_args(obs, self.critic.min, alpha)
            loss = self.actor_elbo.differentiable_loss(self.model, self.guide, *args, **kwargs)
        return alpha * loss / obs.shape[0], self.actor_elbo.last_terms

    def actor_frozen_modules(self) -> list[nn.Module]:
        """The modules the actor's loss reads but does not train (:func:`pplrl.nets.frozen`):
        its backward computes no gradient for their parameters. The critic; an agent whose
        actor reads a learned model adds it."""
        return [self.critic]

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
        metrics = self.before_updates(step)
        for _ in range(self.updates_per_step()):
            metrics.update(self.train_step(self.sample_batch(), step))
        return metrics

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        """One update: (value,) critic, actor (and learnable prior), dual, targets."""
        critic_loss = self.critic_loss(batch)
        value_loss = self.value_loss(batch.obs) if self.state_value else None
        temperature = self.current_temperature(critic_loss.detach())
        out = self.checked(step, critic_loss=critic_loss)  # stop before stepping on garbage
        if value_loss is not None:
            out.update(self.checked(step, value_loss=value_loss))
            self.gradient_step(self.value_opt, value_loss)
        self.gradient_step(self.critic_opt, critic_loss)

        actor_loss, terms = self.actor_loss(batch.obs, temperature)
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
        if self.dual is not None:
            alpha_loss = self.dual_loss(terms, B)
            self.gradient_step(self.alpha_opt, alpha_loss)
            out.update(self.checked(step, alpha_loss=alpha_loss))
        if self.state_value:
            polyak_update(self.value, self.value_target, self.config.tau)
        else:
            polyak_update(self.critic, self.critic_target, self.config.tau)
        alpha = self.alpha if self.dual is not None else temperature  # the temperature after this update
        out.update({"alpha": float(alpha), **self.elbo_metrics(terms, B),
                    **self.extra_metrics(terms, B, temperature, critic_loss.detach())})
        return out

    # -- checkpoints: the declared pieces ------------------------------------------------
    def _modules(self) -> dict:
        mods = {"critic": self.critic, "actor_opt": self.actor_opt, "critic_opt": self.critic_opt}
        if self.state_value:
            mods.update({"value": self.value, "value_target": self.value_target, "value_opt": self.value_opt})
        else:
            mods["critic_target"] = self.critic_target
        if self.dual is not None:
            mods["alpha_opt"] = self.alpha_opt
        if self.prior_opt is not None:
            mods.update({"prior": self.prior, "prior_opt": self.prior_opt})
        return mods

    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.log_alpha is not None:
            state["log_alpha"] = self.log_alpha.detach().clone()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.log_alpha is not None:
            with torch.no_grad():
                self.log_alpha.copy_(state["log_alpha"])


__all__ = ["ActorCritic", "ActorCriticConfig", "Dual", "OffPolicyActorCritic", "OffPolicyConfig"]
