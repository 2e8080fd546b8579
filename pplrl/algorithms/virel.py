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

On the objective API (:class:`pplrl.algorithms.off_policy.ActorCritic`): the actor's pair is
VIREL's; the critic's value is the flat-prior actor pair's (:func:`models.actor.actor_model`)
with no KL term (``soft_critic = False``) learnt by a state-value network (``state_value``);
the temperature is :meth:`VIREL.current_temperature`; no dual.

Choices the paper leaves open, and ours: twin Q networks (both regressed on the
same target, V's target uses their minimum) as in the rlkit SAC code VIREL builds
on; 256x256 networks and batch 256 (App. I.1 gives 300 units, batch 128 for MuJoCo)
so that it runs beside pplrl's SAC with equal capacity; alpha = 0.2 for *virel*.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from guides.actor import actor_guide
from guides.virel import virel_guide
from models.actor import actor_model
from models.sites import MIN_TEMPERATURE
from models.virel import virel_model
from pplrl.algorithms.off_policy import ActorCritic, OffPolicyConfig
from pplrl.replay import Batch


@dataclass
class VIRELConfig(OffPolicyConfig):
    """Shared fields (env, seed, gamma, tau, lr, batch, buffer, learning_starts, hidden)
    come from :class:`pplrl.algorithms.off_policy.OffPolicyConfig`; lr is used for policy, Q
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


class VIREL(ActorCritic):
    algo = "virel"
    Config = VIRELConfig
    # E-step: VIREL's Boltzmann-policy pair (eq. 4), with the baseline V_bar(s)
    model = staticmethod(virel_model)
    guide = staticmethod(virel_guide)
    # M-step: J^V's target E_{a~pi}[min Q(s, a)], the flat-prior pair's value with no entropy
    critic_model = staticmethod(actor_model)
    critic_guide = staticmethod(actor_guide)
    soft_critic = False
    state_value = True
    critic_loss_weight: ClassVar[float] = 0.5  # J^Q = 1/2 (r + gamma V_bar(s') - Q(s, a))^2 per head

    # -- the objective's pieces (what VIREL declares) -----------------------------------
    def temperature(self):
        return None  # no dual: current_temperature is alpha or lambda * eps_hat

    def initial_temperature(self) -> float:
        return self.config.alpha

    def actor_args(self, obs, critic, temperature):
        """virel_model(obs, prior, Q, eps, baseline=V_bar, policy=...)."""
        return (obs, self.prior, critic, temperature), {"baseline": self.value_target, "policy": self.policy}

    def reward(self, batch: Batch) -> torch.Tensor:
        """r scaled by reward_scale (App. I.1)."""
        return self.config.reward_scale * batch.rew

    def lam(self) -> float:
        if self.config.lam is not None:
            return self.config.lam
        r_avg = float(np.abs(self.replay.rew[:len(self.replay)]).mean()) * self.config.reward_scale
        return (1.0 - self.config.gamma) / max(r_avg, 1e-6)

    def current_temperature(self, critic_loss: torch.Tensor) -> torch.Tensor:
        """alpha (virel) or lambda * eps_hat (beta), floored at MIN_TEMPERATURE; eps_hat is the
        batch's mean squared Bellman residual, i.e. the critic loss (its 1/2 per head makes it
        the mean over heads), N_eps = batch size."""
        if self.config.temperature == "constant":
            t = torch.tensor(float(self.config.alpha))
        else:
            t = self.lam() * critic_loss
        return t.clamp_min(MIN_TEMPERATURE)

    def residual(self, batch: Batch) -> torch.Tensor:
        """eps_hat: the mean squared Bellman residual on the batch (both Q heads)."""
        with torch.no_grad():
            return self.critic_loss(batch)

    def extra_metrics(self, terms, batch_size, temperature, critic_loss):
        """eps_hat, and eps * L per state (the tempered ELBO, reward units); the temperature
        itself is logged as ``alpha``, the entropy is -``elbo_kl_policy`` (flat prior)."""
        return {"epsilon_omega": float(critic_loss), "elbo_tempered": float(temperature) * terms["elbo"] / batch_size}


class VIRELBeta(VIREL):
    algo = "virel-beta"
    Config = VIRELBetaConfig
