"""Soft actor-critic as the MaxEnt special case of the RL-as-inference ELBO.

The actor update maximises the ELBO of :func:`models.actor.actor_model` (improper
uniform prior policy, optimality factor Q(x, a)/alpha from the critic) against the
policy guide :func:`guides.actor.actor_guide`, computed by Pyro
(:class:`pplrl.elbo.ReparamOptimalityELBO`): -alpha * ELBO / B = E[alpha log q - Q],
SAC's actor loss (Haarnoja et al. 2018). The variational dynamics are pinned to the
real dynamics (the critic is trained on real transitions), which is what makes this
MaxEnt RL rather than VMBPO (beta-VMBPO paper, Sec. 3.1). Critic and temperature
use plain torch losses; alpha is tuned towards the target entropy -|A|.

Loop shape and defaults follow CleanRL's ``sac_continuous_action.py`` and
stable-baselines3's SAC (lr 3e-4, batch 256, tau 0.005, gamma 0.99, 256x256 MLPs).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from guides.actor import actor_guide
from guides.continuous import GaussianPolicy
from models.actor import actor_model, flat_prior
from pplrl.algorithms.base import Agent
from pplrl.elbo import ReparamOptimalityELBO
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


@dataclass
class SACConfig(OffPolicyConfig):
    gradient_steps: int = 1
    """updates per environment step"""
    init_alpha: float = 1.0
    target_entropy: float | None = None
    """None means -action_dim"""
    autotune_alpha: bool = True

    positive = ("gradient_steps", "init_alpha")


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


class SAC(OffPolicyActorCritic):
    algo = "sac"
    Config = SACConfig

    def __init__(self, config: SACConfig, obs_dim: int, act_dim: int):
        super().__init__(config, obs_dim, act_dim)
        self.critic = TwinQ(obs_dim, act_dim, config.hidden)
        self.critic_target = target_copy(self.critic)
        self.log_alpha = torch.tensor(float(np.log(config.init_alpha)), requires_grad=True)
        self.target_entropy = -float(act_dim) if config.target_entropy is None else config.target_entropy
        self.actor_opt = torch.optim.Adam(self.policy.parameters(), lr=config.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.lr)
        self.alpha_opt = torch.optim.Adam([self.log_alpha], lr=config.lr)
        self.actor_elbo = ReparamOptimalityELBO()

    # -- learning ---------------------------------------------------------------------
    @property
    def alpha(self) -> torch.Tensor:
        return self.log_alpha.exp().detach()

    def update(self, step: int) -> dict[str, float]:
        if not self.ready():
            return {}
        metrics: dict[str, float] = {}
        for _ in range(self.config.gradient_steps):
            metrics = self.sac_update(self.sample_batch(), step)
        return metrics

    def critic_target_value(self, batch: Batch) -> torch.Tensor:
        """y = r + gamma (1 - d) (min Q'(x', a') - alpha log q(a'|x')), a' ~ q(.|x')."""
        with torch.no_grad():
            d = self.policy(batch.next_obs)
            a2 = d.rsample()
            soft_v = self.critic_target.min(batch.next_obs, a2) - self.alpha * d.log_prob(a2)
            return batch.rew + self.config.gamma * (1.0 - batch.done) * soft_v

    def actor_loss(self, obs: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
        """-alpha ELBO / B of the actor model/guide pair = E[alpha log q - Q]."""
        alpha = self.alpha
        loss = self.actor_elbo.differentiable_loss(actor_model, actor_guide, obs, self.prior, self.critic.min,
                                                   1.0 / alpha, policy=self.policy)
        return alpha * loss / obs.shape[0], self.actor_elbo.last_terms

    def sac_update(self, batch: Batch, step: int) -> dict[str, float]:
        y = self.critic_target_value(batch)
        q1, q2 = self.critic(batch.obs, batch.act)
        critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
        out = self.checked(step, critic_loss=critic_loss)  # stop before stepping on garbage
        self.gradient_step(self.critic_opt, critic_loss)

        actor_loss, terms = self.actor_loss(batch.obs)
        out.update(self.checked(step, actor_loss=actor_loss))
        self.gradient_step(self.actor_opt, actor_loss)
        log_q = terms["kl_policy"] / batch.obs.shape[0]  # flat prior: KL = E[log q]
        alpha_loss = torch.zeros(())
        if self.config.autotune_alpha:
            alpha_loss = -self.log_alpha * (log_q + self.target_entropy)
            self.gradient_step(self.alpha_opt, alpha_loss)
        polyak_update(self.critic, self.critic_target, self.config.tau)
        B = batch.obs.shape[0]
        out.update(self.checked(step, alpha_loss=alpha_loss))
        out.update({"alpha": float(self.alpha), "entropy": -log_q, **self.elbo_metrics(terms, B)})
        return out

    # -- checkpoints ------------------------------------------------------------------
    def _modules(self) -> dict:
        return {"critic": self.critic, "critic_target": self.critic_target, "actor_opt": self.actor_opt,
                "critic_opt": self.critic_opt, "alpha_opt": self.alpha_opt}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "log_alpha": self.log_alpha.detach().clone()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        with torch.no_grad():
            self.log_alpha.copy_(state["log_alpha"])
