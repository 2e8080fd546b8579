"""VIREL's variational actor-critic: *virel* and *beta* (Fellows et al., 002_…,
Sec. 3–5, App. H, Algorithms 1–2).

The objective is the ELBO of :func:`models.virel.virel_model` (action prior, factor
``Q_omega(s, a) / eps``) against the variational policy guide
:func:`guides.virel.virel_guide`, eq. (4), in its tempered form ``eps * L`` (App. E.1);
Pyro computes it (:class:`pplrl.elbo.ReparamOptimalityELBO`). One gradient step of
Algorithm 1/2:

* **M-step, V** (J^V): ``V_phi(s) -> E_{a~pi_theta}[Q_omega(s, a)]`` — VIREL's value is
  not soft: the Bellman operator is that of the (Boltzmann) policy, with no entropy.
* **M-step, Q** (J^Q): ``Q_omega(s, a) -> r + gamma (1 - d) V_phi_bar(s')`` on real
  transitions, V_phi_bar a Polyak-averaged target.
* **E-step, actor** (J^pi): maximise ``eps * L = E_q[Q - V_phi_bar(s)] - eps E_q[log pi]``
  by the reparameterisation trick (the paper's implementation). The temperature
  ``eps`` is the constant ``alpha`` (*virel*) or ``lambda * eps_hat`` (*beta*), where
  ``eps_hat`` is the mean squared Bellman residual ``E_D[(r + gamma V_bar(s') - Q(s, a))^2]``
  on the batch (N_eps = batch size) and ``lambda ~ (1 - gamma) / r_avg`` balances its
  magnitude against the critic's (App. I.1: 4e-3 on MuJoCo); ``lam=None`` sets lambda
  from the replay's mean |reward| at every step.

eps_hat -> 0 is the paper's limit (Theorem 1: the Boltzmann policy becomes greedy):
the tempered ELBO stays finite and its gradient becomes the deterministic policy
gradient of E_q[Q]; the temperature is floored at
:data:`models.virel.MIN_TEMPERATURE`, never divided by.

Choices the paper leaves open, and ours: twin Q networks (both regressed on the
same target, V's target uses their minimum) as in the rlkit SAC code VIREL builds
on; 256x256 networks and batch 256 (App. I.1 gives 300 units, batch 128 for MuJoCo)
so that it runs beside pplrl's SAC with equal capacity; alpha = 0.2 for *virel*.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from guides.virel import virel_guide
from models.sites import MIN_TEMPERATURE
from models.virel import virel_model
from pplrl.algorithms.off_policy import OffPolicyActorCritic, OffPolicyConfig
from pplrl.elbo import ReparamOptimalityELBO
from pplrl.nets import TwinQ, VNetwork, polyak_update, target_copy
from pplrl.replay import Batch


@dataclass
class VIRELConfig(OffPolicyConfig):
    """Shared fields (env, seed, gamma, tau, lr, batch, buffer, learning_starts, hidden)
    come from :class:`pplrl.algorithms.sac.OffPolicyConfig`; lr is used for policy, Q
    and V (App. I.1: 3e-4)."""

    gradient_steps: int = 1
    temperature: str = "constant"
    """'constant' (virel: alpha) or 'residual' (beta: lambda * eps_hat)"""
    alpha: float = 0.2
    """the constant temperature of *virel*"""
    lam: float | None = None
    """lambda of *beta*; None: (1 - gamma) / mean |r| of the replay"""
    reward_scale: float = 1.0
    """App. I.1 scales rewards instead of the temperature (5 for Hopper/HalfCheetah)"""

    positive = ("gradient_steps", "reward_scale")

    def validate(self) -> None:
        super().validate()
        if self.temperature not in ("constant", "residual"):
            raise ValueError(f"temperature must be 'constant' (virel) or 'residual' (beta), got {self.temperature!r}")
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0 (0 = the greedy limit), got {self.alpha}")
        if self.lam is not None and self.lam <= 0:
            raise ValueError(f"lambda (lam) must be > 0, got {self.lam}")


@dataclass
class VIRELBetaConfig(VIRELConfig):
    temperature: str = "residual"


class VIREL(OffPolicyActorCritic):
    algo = "virel"
    Config = VIRELConfig

    def __init__(self, config: VIRELConfig, obs_dim: int, act_dim: int):
        super().__init__(config, obs_dim, act_dim)
        self.critic = TwinQ(obs_dim, act_dim, config.hidden)
        self.value = VNetwork(obs_dim, config.hidden)
        self.value_target = target_copy(self.value)
        self.actor_opt = torch.optim.Adam(self.policy.parameters(), lr=config.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=config.lr)
        self.elbo = ReparamOptimalityELBO()

    # -- the pieces of one gradient step ----------------------------------------------
    def bellman_target(self, batch: Batch) -> torch.Tensor:
        """r + gamma (1 - d) V_bar(s'), rewards scaled by reward_scale."""
        with torch.no_grad():
            return self.config.reward_scale * batch.rew + self.config.gamma * (1.0 - batch.done) * self.value_target(
                batch.next_obs)

    def residual(self, batch: Batch) -> torch.Tensor:
        """eps_hat: the mean squared Bellman residual on the batch (both Q heads) — the
        value of :meth:`critic_loss`, whose 1/2 per head makes it the mean over heads."""
        with torch.no_grad():
            return self.critic_loss(batch)

    def lam(self) -> float:
        if self.config.lam is not None:
            return self.config.lam
        r_avg = float(np.abs(self.replay.rew[:len(self.replay)]).mean()) * self.config.reward_scale
        return (1.0 - self.config.gamma) / max(r_avg, 1e-6)

    def temperature(self, eps_hat: torch.Tensor) -> torch.Tensor:
        """alpha (virel) or lambda * eps_hat (beta), floored at MIN_TEMPERATURE."""
        if self.config.temperature == "constant":
            t = torch.tensor(float(self.config.alpha))
        else:
            t = self.lam() * eps_hat
        return t.clamp_min(MIN_TEMPERATURE)

    def value_loss(self, obs: torch.Tensor) -> torch.Tensor:
        """J^V = E[1/2 (V(s) - E_{a~pi}[min Q(s, a)])^2] (one action sample)."""
        with torch.no_grad():
            a = self.policy(obs).sample()
            target = self.critic.min(obs, a)
        return 0.5 * F.mse_loss(self.value(obs), target)

    def critic_loss(self, batch: Batch) -> torch.Tensor:
        """J^Q for both heads: 1/2 (r + gamma V_bar(s') - Q(s, a))^2."""
        y = self.bellman_target(batch)
        q1, q2 = self.critic(batch.obs, batch.act)
        return 0.5 * (F.mse_loss(q1, y) + F.mse_loss(q2, y))

    def actor_loss(self, obs: torch.Tensor, temperature: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """-(eps * ELBO) / B = E[eps log pi(a|s) - (min Q(s, a) - V_bar(s))], from Pyro (the
        ELBO is eq. 4, L; the paper optimises eps L, App. E.1)."""
        loss = self.elbo.differentiable_loss(virel_model, virel_guide, obs, self.prior, self.critic.min,
                                             temperature, baseline=self.value_target, policy=self.policy)
        return temperature * loss / obs.shape[0], self.elbo.last_terms

    def update(self, step: int) -> dict[str, float]:
        if not self.ready():
            return {}
        metrics: dict[str, float] = {}
        for _ in range(self.config.gradient_steps):
            metrics = self.virel_update(self.sample_batch(), step)
        return metrics

    def virel_update(self, batch: Batch, step: int) -> dict[str, float]:
        value_loss = self.value_loss(batch.obs)
        critic_loss = self.critic_loss(batch)
        eps_hat = critic_loss.detach()  # = self.residual(batch), without a second forward pass
        temperature = self.temperature(eps_hat)
        out = self.checked(step, value_loss=value_loss, critic_loss=critic_loss, epsilon_omega=eps_hat)
        self.gradient_step(self.value_opt, value_loss)
        self.gradient_step(self.critic_opt, critic_loss)

        actor_loss, terms = self.actor_loss(batch.obs, temperature)
        out.update(self.checked(step, actor_loss=actor_loss))
        self.gradient_step(self.actor_opt, actor_loss)
        polyak_update(self.value, self.value_target, self.config.tau)

        B = batch.obs.shape[0]
        t = float(temperature)
        log_q = terms["kl_policy"] / B  # flat prior: KL = E[log pi]
        out.update({"temperature": t, "entropy": -log_q, "elbo_tempered": t * terms["elbo"] / B,
                    **self.elbo_metrics(terms, B)})
        return out

    def _modules(self) -> dict:
        return {"critic": self.critic, "value": self.value, "value_target": self.value_target,
                "actor_opt": self.actor_opt, "critic_opt": self.critic_opt, "value_opt": self.value_opt}


class VIRELBeta(VIREL):
    algo = "virel-beta"
    Config = VIRELBetaConfig
