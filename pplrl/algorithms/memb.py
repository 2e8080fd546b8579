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

Options: value expansion ``horizon`` H (Sec. 3.2 and App. B.1: Q is fitted on a rollout of
the model from a real tuple; H = 1, the default, is eq. 6 on real data, the paper's
recommendation), ``expansion_states`` (Q's loss averaged over the H imagined tuples, the
paper's, or on the first tuple only), alpha, and ``imagination``, the ablations of App. B.1
and B.3: the policy's s' from the learned model (MEMB), the real s' (the SVG variant) or the
true dynamics (the true-model variant); see :mod:`models.memb`.
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

from guides.actor import actor_guide
from guides.memb import memb_guide
from models.actor import actor_model
from models.memb import ReparamModel, inferred_dynamics, inferred_reward, memb_model, true_model_for
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
    expansion_states: str = "all"
    """H > 1: 'all', Q's loss averaged over the H tuples of the rollout (Sec. 3.2's J(phi), the
    paper's); 'first', only the first, real one (pplrl before)"""
    imagination: str = "model"
    """s' of the policy update (eq. 8): 'model', sampled from the learned model (MEMB); 'real',
    the real s' with inferred noise (App. B.1's SVG variant); 'true', the env's own dynamics
    and reward (App. B.3, Pendulum-v1 only)"""
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
        if self.expansion_states not in ("all", "first"):
            raise ValueError(f"expansion_states must be 'all' or 'first', got {self.expansion_states!r}")
        if self.imagination not in ("model", "real", "true"):
            raise ValueError(f"imagination must be 'model', 'real' or 'true', got {self.imagination!r}")
        if self.imagination == "true":
            true_model_for(self.env_id)  # raises for an env whose dynamics we do not have


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
        self.true_model = true_model_for(config.env_id) if config.imagination == "true" else None
        self._batch: Batch | None = None  # the update's batch (the SVG variant's real s')

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
        the policy's value goes through the model and V_bar, not through Q. The model is the
        learned one (eq. 8), the true one (App. B.3), or, for the SVG variant (App. B.1), the
        learned one with its noise inferred from the batch's real transitions, so that the value
        is taken at the real s' moved by the model's Jacobian (:func:`models.memb.inferred_dynamics`)."""
        c = self.config
        if c.imagination == "real":
            b = self._batch
            if b is None or b.obs is not obs:
                raise RuntimeError("the SVG variant's actor needs the update's batch (train_step sets it)")
            wm = self.world_model
            cont = 1.0 - b.done
            return ((obs, self.prior, inferred_dynamics(wm, b.obs, b.act, b.next_obs),
                     inferred_reward(wm, b.obs, b.act, b.rew), lambda x: cont * self.value_target(x), c.gamma,
                     temperature), {"termination_fn": None, "policy": self.policy})
        dynamics, reward = self.true_model or (self.world_model.dynamics, self.world_model.reward)
        return ((obs, self.prior, dynamics, reward, self.value_target, c.gamma, temperature),
                {"termination_fn": self.termination_fn, "policy": self.policy})

    def actor_frozen_modules(self) -> list:
        """The critic and the learned model: the actor's value goes through the model, which
        its own loss trains (eq. 8 fits the model on real transitions only)."""
        return [self.critic, self.world_model]

    def train_step(self, batch: Batch, step: int) -> dict[str, float]:
        self._batch = batch
        try:
            return super().train_step(batch, step)
        finally:
            self._batch = None

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
        done = self.termination_fn(*(t.detach().cpu().numpy() for t in (obs, act, next_obs)))
        return 1.0 - torch.as_tensor(done, dtype=torch.float32)

    def imagine(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One imagined step (reward, next state), sampled: the learned model's, or the true
        model's with ``imagination='true'``."""
        if self.true_model is not None:
            dynamics, reward = self.true_model
            return reward(obs, act), dynamics(obs, act).rsample()
        return self.world_model.reward_dist(obs, act).sample(), self.world_model.dynamics(obs, act).sample()

    def expansion(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The value-expansion rollout of Sec. 3.2 from the real tuple tau_0 = (s_0, a_0, r_0, s_1):
        a_k ~ pi(.|s_k), r_k, s_{k+1} from the model for k = 1..H-1. Returns the H states
        ``(H, B, obs_dim)``, actions, the Q targets ``(H, B)`` and the weights ``(H, B)`` (1 while
        the rollout has not terminated), with

            y_t = r_t + gamma (1 - d_t) W_{t+1},  W_k = r_k - alpha log pi(a_k|s_k) + gamma (1 - d_k) W_{k+1},
            W_H = V_bar(s_H),

        i.e. y_t = sum_{k=t}^{H-1} gamma^{k-t} r_k + gamma^{H-t} V_bar(s_H) as printed, plus the
        entropy of the imagined actions after a_t (the soft value of eq. 5, which Sec. 3.2's
        formula omits with alpha, "to ease the exposition")."""
        c = self.config
        with torch.no_grad():
            states, actions, rewards, logps, conts = [batch.obs], [batch.act], [batch.rew], [None], [1.0 - batch.done]
            s = batch.next_obs
            for _ in range(c.horizon - 1):
                d = self.policy(s)
                a = d.sample()
                r, s_next = self.imagine(s, a)
                states.append(s), actions.append(a), rewards.append(r), logps.append(d.log_prob(a))
                conts.append(self._not_done(s, a, s_next))
                s = s_next
            w = self.value_target(s)
            targets = [None] * c.horizon
            for t in reversed(range(c.horizon)):
                targets[t] = rewards[t] + c.gamma * conts[t] * w
                if t > 0:
                    w = targets[t] - c.alpha * logps[t]
            alive = torch.cumprod(torch.stack([torch.ones_like(batch.rew), *conts[:-1]]), 0)
            return torch.stack(states), torch.stack(actions), torch.stack(targets), alive

    def critic_loss(self, batch: Batch) -> torch.Tensor:
        """Eq. (6), 1/2 (Q(s, a) - r - gamma (1 - d) V_bar(s'))^2 per head, for H = 1 (the API's).
        H > 1, value expansion (Sec. 3.2):

            J(phi) = 1/H sum_{t=0}^{H-1} 1/2 (Q(s_t, a_t) - y_t)^2

        over the rollout of :meth:`expansion` (``expansion_states='all'``, the paper's; terms
        after a termination weigh 0), or on the first, real tuple alone (``'first'``)."""
        c = self.config
        if c.horizon == 1:
            return super().critic_loss(batch)
        states, actions, targets, alive = self.expansion(batch)
        if c.expansion_states == "first":
            states, actions, targets, alive = states[:1], actions[:1], targets[:1], alive[:1]
        H, B = targets.shape
        q1, q2 = self.critic(states.reshape(H * B, -1), actions.reshape(H * B, -1))
        per = sum(F.mse_loss(q.reshape(H, B), targets, reduction="none") for q in (q1, q2))
        return self.critic_loss_weight * (alive * per).mean(1).mean(0)

    def critic_target_value(self, batch: Batch) -> torch.Tensor:
        """The Q target of the batch's real tuples: eq. (6)'s ``r + gamma (1 - d) V_bar(s')`` for
        H = 1, y_0 of :meth:`expansion` for H > 1."""
        if self.config.horizon == 1:
            return super().critic_target_value(batch)
        return self.expansion(batch)[2][0]

    # -- checkpoints ------------------------------------------------------------------------
    def _modules(self) -> dict:
        return {**super()._modules(), "model": self.world_model, "model_opt": self.model_opt}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "model_updates": self.model_updates}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.model_updates = state["model_updates"]
