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

On the objective API (:class:`pplrl.algorithms.off_policy.ActorCritic`): the actor's pair is
the model-embedded one (:func:`models.memb.memb_model`); the critic's soft value (eq. 5) is the
flat-prior actor pair's (:func:`models.actor.actor_model`) under the online Q, learnt by a
state-value network (``state_value``); the temperature is the fixed alpha; the model fits run
in :meth:`MEMB.before_updates`. The learned model is ``world_model`` (checkpoint key ``model``).

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

from guides.actor import actor_guide
from guides.memb import memb_guide
from models.actor import actor_model
from models.memb import ReparamModel, memb_model
from pplrl.algorithms.off_policy import ActorCritic, OffPolicyConfig
from pplrl.envs.continuous import termination_fn_for
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


class MEMB(ActorCritic):
    algo = "memb"
    Config = MEMBConfig
    # the policy step: eq. (8)'s model-embedded pair (through the learned model)
    model = staticmethod(memb_model)
    guide = staticmethod(memb_guide)
    # V's target, eq. (5): E_a[min Q(s, a) - alpha log pi(a|s)], the flat-prior pair's soft value
    critic_model = staticmethod(actor_model)
    critic_guide = staticmethod(actor_guide)
    state_value = True
    critic_loss_weight = 0.5  # eq. (6): 1/2 (Q(s, a) - r - gamma V_bar(s'))^2 per head

    def __init__(self, config: MEMBConfig, obs_dim: int, act_dim: int):
        super().__init__(config, obs_dim, act_dim)
        self.world_model = ReparamModel(obs_dim, act_dim, config.model_hidden)
        self.model_opt = torch.optim.Adam(self.world_model.parameters(), lr=config.model_lr)
        self.termination_fn = termination_fn_for(config.env_id)
        self.model_updates = 0

    # -- the objective's pieces (what MEMB declares) -------------------------------------
    def temperature(self):
        return None  # alpha is fixed (Table 2)

    def initial_temperature(self) -> float:
        return self.config.alpha

    def learning_rate(self, group: str) -> float:
        return self.config.value_lr if group in ("critic", "value") else self.config.lr

    def updates_per_step(self) -> int:
        return self.config.m

    def actor_args(self, obs, critic, temperature):
        """memb_model(obs, prior, f, r_hat, V_bar, gamma, alpha, termination_fn=..., policy=...):
        the policy's value goes through the learned model and V_bar, not through Q."""
        return ((obs, self.prior, self.world_model.dynamics, self.world_model.reward, self.value_target,
                 self.config.gamma, temperature), {"termination_fn": self.termination_fn, "policy": self.policy})

    def extra_metrics(self, terms, batch_size, temperature, critic_loss):
        """soft_value: alpha * ELBO per state, eq. (8)'s V(s) in reward units."""
        return {"soft_value": float(temperature) * terms["elbo"] / batch_size}

    # -- the learned model ------------------------------------------------------------------
    def model_step(self, batch: Batch, step: int) -> dict[str, float]:
        loss, info = self.world_model.loss(batch)
        out = self.checked(step, model_loss=loss)
        self.gradient_step(self.model_opt, loss)
        self.model_updates += 1
        return {**out, **info}

    def before_updates(self, step: int) -> dict[str, float]:
        """Algorithm 1, step 1: the normaliser (refreshed every normalise_every steps) and
        the model's gradient steps (plus model_warmup_updates on the first call)."""
        c = self.config
        if self.model_updates == 0 or step % c.normalise_every == 0:
            data = self.replay.all()
            self.world_model.set_normaliser(data.obs, data.act)
        out: dict[str, float] = {}
        n_model = c.model_updates_per_step + (c.model_warmup_updates if self.model_updates == 0 else 0)
        for _ in range(n_model):
            out = self.model_step(self.sample_batch(), step)
        return out

    def _not_done(self, obs, act, next_obs) -> torch.Tensor:
        if self.termination_fn is None:
            return torch.ones(obs.shape[0])
        done = self.termination_fn(obs.numpy(), act.numpy(), next_obs.numpy())
        return 1.0 - torch.as_tensor(done, dtype=torch.float32)

    def critic_target_value(self, batch: Batch) -> torch.Tensor:
        """Eq. (6) target r + gamma (1 - d) V_bar(s') (H = 1, the API's); with H > 1 the value
        expansion along the model: + sum_{k=1}^{H-1} gamma^k (r_hat_k - alpha log pi_k) + gamma^H V_bar(s_H)."""
        c = self.config
        if c.horizon == 1:
            return super().critic_target_value(batch)
        with torch.no_grad():
            target = batch.rew.clone()
            cont = 1.0 - batch.done
            s, discount = batch.next_obs, c.gamma
            for _ in range(c.horizon - 1):
                d = self.policy(s)
                a = d.sample()
                r = self.world_model.reward_dist(s, a).sample() - c.alpha * d.log_prob(a)
                s_next = self.world_model.dynamics(s, a).sample()
                target = target + discount * cont * r
                cont = cont * self._not_done(s, a, s_next)
                s, discount = s_next, discount * c.gamma
            return target + discount * cont * self.value_target(s)

    # -- checkpoints ------------------------------------------------------------------------
    def _modules(self) -> dict:
        return {**super()._modules(), "model": self.world_model, "model_opt": self.model_opt}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "model_updates": self.model_updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.model_updates = state["model_updates"]
