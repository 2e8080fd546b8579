"""MEMB: model-embedding model-based RL (Tan et al., 004_…, Sec. 3, Algorithm 1,
App. B–C).

Per environment step (Algorithm 1):

1. **model** (eq. 4): one gradient step each on the reparameterised dynamics
   ``f(s, a, zeta) = s + mu(s, a) + sigma(s, a) zeta`` and reward model
   ``r_hat(s, a, zeta) = mu_r + sigma_r zeta`` (two independent MLPs, :class:`ReparamModel`),
   by ``1/2 E_{D, zeta}[(f(s, a, zeta) - s')^2]`` and ``1/2 E[(r_hat - r)^2]``. (The loss is
   the paper's: a squared error of a *sample*, so it drives sigma towards 0, which
   the log-std lower bound stops at ``exp(-10)``.)
2. **interact**, store in D.
3. **m times**: Q on real transitions by eq. (6), ``Q(s, a) -> r + gamma V_bar(s')``
   (twin Q, both on the same target); V by eq. (5), ``V(s) -> E_a[min Q(s, a) - alpha log pi]``;
   the policy by the **model-embedded ELBO** of :func:`models.memb.memb_model` /
   :func:`guides.memb.memb_guide`: ``E[r_hat(s, a) + gamma V_bar(f(s, a, zeta))] - alpha E[log pi]``,
   eq. (8), whose reparameterised gradient is eq. (9) (through the learned model,
   SVG(1)-style, on states s ~ D); V_bar Polyak-averaged.

Options: value expansion ``horizon`` H (App. B.1: the Q target follows the model
for H - 1 more steps, ``r + sum_k gamma^k (r_hat_k - alpha log pi_k) + gamma^H V_bar(s_H)``;
H = 1, the default, is eq. 6 on real data, the paper's recommendation) and alpha.
Defaults are App. C Table 2's Pendulum column (alpha 0.2, m 5, model 32x16,
learning rates 3e-4, networks 256x256); :data:`TABLE2` holds the other columns and
:func:`pplrl.algorithms.default_config` applies them by environment id. Our additions: ``model_warmup_updates``
model steps once learning starts (one step per environment step from a random
initialisation leaves the model useless for hundreds of steps), and a fixed input
normaliser refreshed every ``normalise_every`` steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from guides.memb import memb_guide
from models.memb import ReparamModel, memb_model
from models.sites import check_temperature
from pplrl.algorithms.off_policy import OffPolicyActorCritic, OffPolicyConfig
from pplrl.elbo import ReparamOptimalityELBO
from pplrl.envs.continuous import termination_fn_for
from pplrl.nets import TwinQ, VNetwork, polyak_update, target_copy
from pplrl.replay import Batch

#: App. C, Table 2, by environment name (the table's empty cells read as "same as the
#: cell to the left", the layout of a merged cell): value lr, model lr, alpha, model
#: network, m. Policy lr is 3e-4 and networks 256x256 everywhere.
TABLE2 = {
    "Pendulum": dict(value_lr=3e-4, model_lr=3e-4, alpha=0.2, model_hidden=(32, 16), m=5),
    "InvertedPendulum": dict(value_lr=3e-4, model_lr=3e-4, alpha=0.1, model_hidden=(32, 16), m=1),
    "HalfCheetah": dict(value_lr=1e-3, model_lr=3e-4, alpha=0.4, model_hidden=(256, 128), m=5),
    "Hopper": dict(value_lr=1e-3, model_lr=3e-4, alpha=0.4, model_hidden=(256, 128), m=5),
    "Walker2d": dict(value_lr=3e-4, model_lr=1e-4, alpha=0.4, model_hidden=(256, 256), m=3),
    "Swimmer": dict(value_lr=3e-4, model_lr=1e-4, alpha=0.2, model_hidden=(256, 128), m=5),
    "Reacher": dict(value_lr=3e-4, model_lr=1e-4, alpha=0.2, model_hidden=(256, 128), m=5),
}


@dataclass
class MEMBConfig(OffPolicyConfig):
    """Shared fields from :class:`pplrl.algorithms.sac.OffPolicyConfig`; ``lr`` is the
    policy learning rate (Table 2: 3e-4)."""

    value_lr: float = 3e-4
    model_lr: float = 3e-4
    model_hidden: tuple[int, ...] = (32, 16)
    alpha: float = 0.2
    """entropy weight (Table 2: 0.2 on Pendulum; 0 = MEMB's unregularised ablation)"""
    m: int = 5
    """actor-critic updates per environment step (Table 2: 5 on Pendulum)"""
    horizon: int = 1
    """value expansion H (App. B.1); 1 = Q from real data only (eq. 6)"""
    model_updates_per_step: int = 1
    model_warmup_updates: int = 1000
    normalise_every: int = 1000

    positive = ("value_lr", "model_lr", "normalise_every")

    @staticmethod
    def env_defaults(env_id: str) -> dict:
        """Table 2's settings for ``env_id`` (matched by name, any version), else {}."""
        name = env_id.split(":")[-1].split("/")[-1].split("-v")[0]
        return dict(TABLE2.get(name, {}))

    def validate(self) -> None:
        super().validate()
        if self.alpha < 0:
            raise ValueError(f"alpha must be >= 0, got {self.alpha}")
        if self.m <= 0:
            raise ValueError(f"m (actor-critic updates per step) must be > 0, got {self.m}")
        if self.horizon <= 0:
            raise ValueError(f"value-expansion horizon H must be > 0, got {self.horizon}")
        if self.model_updates_per_step < 0 or self.model_warmup_updates < 0:
            raise ValueError("model_updates_per_step and model_warmup_updates must be >= 0")


class MEMB(OffPolicyActorCritic):
    algo = "memb"
    Config = MEMBConfig

    def __init__(self, config: MEMBConfig, obs_dim: int, act_dim: int):
        super().__init__(config, obs_dim, act_dim)
        self.model = ReparamModel(obs_dim, act_dim, config.model_hidden)
        self.critic = TwinQ(obs_dim, act_dim, config.hidden)
        self.value = VNetwork(obs_dim, config.hidden)
        self.value_target = target_copy(self.value)
        self.actor_opt = torch.optim.Adam(self.policy.parameters(), lr=config.lr)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=config.value_lr)
        self.value_opt = torch.optim.Adam(self.value.parameters(), lr=config.value_lr)
        self.model_opt = torch.optim.Adam(self.model.parameters(), lr=config.model_lr)
        self.termination_fn = termination_fn_for(config.env_id)
        self.elbo = ReparamOptimalityELBO()
        self.model_updates = 0

    # -- the pieces --------------------------------------------------------------------
    def model_step(self, batch: Batch, step: int) -> dict[str, float]:
        loss, info = self.model.loss(batch)
        out = self.checked(step, model_loss=loss)
        self.gradient_step(self.model_opt, loss)
        self.model_updates += 1
        return {**out, **info}

    def _not_done(self, obs, act, next_obs) -> torch.Tensor:
        if self.termination_fn is None:
            return torch.ones(obs.shape[0])
        done = self.termination_fn(obs.numpy(), act.numpy(), next_obs.numpy())
        return 1.0 - torch.as_tensor(done, dtype=torch.float32)

    def critic_target(self, batch: Batch) -> torch.Tensor:
        """Eq. (6) target r + gamma (1 - d) V_bar(s'); with H > 1 the value expansion along
        the model: + sum_{k=1}^{H-1} gamma^k (r_hat_k - alpha log pi_k) + gamma^H V_bar(s_H)."""
        c = self.config
        with torch.no_grad():
            target = batch.rew.clone()
            cont = 1.0 - batch.done
            s, discount = batch.next_obs, c.gamma
            for _ in range(c.horizon - 1):
                d = self.policy(s)
                a = d.sample()
                r = self.model.reward_dist(s, a).sample() - c.alpha * d.log_prob(a)
                s_next = self.model.dynamics(s, a).sample()
                target = target + discount * cont * r
                cont = cont * self._not_done(s, a, s_next)
                s, discount = s_next, discount * c.gamma
            return target + discount * cont * self.value_target(s)

    def critic_loss(self, batch: Batch) -> torch.Tensor:
        y = self.critic_target(batch)
        q1, q2 = self.critic(batch.obs, batch.act)
        return 0.5 * (F.mse_loss(q1, y) + F.mse_loss(q2, y))

    def value_loss(self, obs: torch.Tensor) -> torch.Tensor:
        """Eq. (5): 1/2 (V(s) - E_{a~pi}[min Q(s, a) - alpha log pi(a|s)])^2."""
        with torch.no_grad():
            d = self.policy(obs)
            a = d.sample()
            target = self.critic.min(obs, a) - self.config.alpha * d.log_prob(a)
        return 0.5 * F.mse_loss(self.value(obs), target)

    def actor_loss(self, obs: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """-alpha ELBO / B of the model-embedded model/guide pair = -(eq. 8's V(s)), averaged
        (the ELBO is V(s) / alpha, the temperature convention of :mod:`models.sites`)."""
        loss = self.elbo.differentiable_loss(memb_model, memb_guide, obs, self.prior, self.model.dynamics,
                                             self.model.reward, self.value_target, self.config.gamma,
                                             self.config.alpha, termination_fn=self.termination_fn,
                                             policy=self.policy)
        return self.temperature * loss / obs.shape[0], self.elbo.last_terms

    @property
    def temperature(self) -> float:
        """alpha, floored at MIN_TEMPERATURE as the model floors it."""
        return float(check_temperature(self.config.alpha))

    # -- the loop ------------------------------------------------------------------------
    def update(self, step: int) -> dict[str, float]:
        c = self.config
        if not self.ready():
            return {}
        if self.model_updates == 0 or step % c.normalise_every == 0:
            data = self.replay.all()
            self.model.set_normaliser(data.obs, data.act)
        out: dict[str, float] = {}
        n_model = c.model_updates_per_step + (c.model_warmup_updates if self.model_updates == 0 else 0)
        for _ in range(n_model):
            out = self.model_step(self.sample_batch(), step)
        for _ in range(c.m):
            out.update(self.actor_critic_step(self.sample_batch(), step))
        return out

    def actor_critic_step(self, batch: Batch, step: int) -> dict[str, float]:
        critic_loss = self.critic_loss(batch)
        value_loss = self.value_loss(batch.obs)
        out = self.checked(step, critic_loss=critic_loss, value_loss=value_loss)
        self.gradient_step(self.critic_opt, critic_loss)
        self.gradient_step(self.value_opt, value_loss)

        actor_loss, terms = self.actor_loss(batch.obs)
        out.update(self.checked(step, actor_loss=actor_loss))
        self.gradient_step(self.actor_opt, actor_loss)
        polyak_update(self.value, self.value_target, self.config.tau)

        B = batch.obs.shape[0]  # soft_value: alpha * ELBO, eq. (8)'s V(s) in reward units
        out.update({"soft_value": self.temperature * terms["elbo"] / B, **self.elbo_metrics(terms, B)})
        return out

    def _modules(self) -> dict:
        return {"model": self.model, "critic": self.critic, "value": self.value, "value_target": self.value_target,
                "actor_opt": self.actor_opt, "critic_opt": self.critic_opt, "value_opt": self.value_opt,
                "model_opt": self.model_opt}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "model_updates": self.model_updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.model_updates = state["model_updates"]
