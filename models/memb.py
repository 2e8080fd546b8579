"""MEMB's beliefs (Tan et al., 004_…): the reparameterised dynamics and reward models
(eq. 4) and the model-embedded one-step model of the policy update (eqs. 8–9).

MEMB improves its policy on the soft Bellman equation with the *learned* dynamics
and reward models embedded in it (eq. 8)::

    V(s) = E_{eta, zeta}[ r_hat(s, a, zeta_r) - alpha log pi(a|s) + gamma V'(f(s, a, zeta_d)) ],
    a = kappa(s, eta; theta).

As a Pyro model (:func:`memb_model`): the action prior (improper uniform on the box,
so the policy KL is the negative entropy), the next state ``x_1`` sampled from the
learned dynamics ``f(s, a, zeta)``, and the optimality factor
``(1/alpha) (r_hat(s, a) + gamma (1 - done) V'(x_1))`` (the temperature convention of
:mod:`models.sites`). The guide (:func:`guides.memb.memb_guide`) samples the action
from the policy and ``x_1`` from *the same learned dynamics*: the variational dynamics
are pinned to the model, so the dynamics KL is exactly 0, and because both samples are
reparameterised, the ELBO's gradient flows through ``f`` and ``r_hat`` into the
action: eq. (9), the SVG(1)-style path, on model samples rather than real ones.

The ELBO Pyro computes is eq. (8)'s estimate of V(s) / alpha, summed over the batch;
alpha times it is V(s) in reward units, and ``alpha = 0`` (MEMB's unregularised
ablation, App. B.1) is the plain stochastic value gradient (the temperature is floored
at :data:`models.sites.MIN_TEMPERATURE`).

The ablations of App. B.1 and B.3 keep this pair and change only what is passed in as
``dynamics``, ``reward_fn`` and the guide's ``policy``:

* **SVG variant** (App. B.1, "when we just utilize the real trajectory in the policy
  update, MEMB reduces to the SVG"; SVG(1), Heess et al. 2015, and eq. 1 of 004_…): the
  model noise is *inferred* from a real transition (s, a_k, r, s') instead of drawn:
  :func:`inferred_dynamics` / :func:`inferred_reward` give ``s'(a) = s' + mu_f(s, a) -
  mu_f(s, a_k)`` and ``r(a) = r + mu_r(s, a) - mu_r(s, a_k)`` (additive noise inferred
  from the real s' and r), so the value is taken at the real s' moved by the model's
  Jacobian for the action change, and at ``a = a_k`` the sample *is* the real s'.
  Deviation from SVG(1)-ER: the policy noise is drawn fresh, not inferred from a_k, and
  there is no importance weight pi_theta(a_k|s) / pi_behaviour(a_k|s) (the replay buffer
  keeps no behaviour probabilities). Measured: with eta inferred from a_k and no weight,
  the gradient on the policy's log-scale is G (1 - a^2) (atanh a_k - loc), which at a
  locally optimal mean points down for every replayed action and does not vanish as the
  scale does; the policy's scale fell to 0.0045 and V's loss reached 7e5 within 600 steps
  (seed 0, the tests' small networks).
* **true-model variant** (App. B.3): :func:`true_model_for` gives the environment's own
  dynamics and reward as differentiable torch functions (Pendulum-v1's closed form).

Deterministic next states enter as :class:`Pinned` samples: rsample returns the given
(differentiable) value, and model and guide hold the same one, so KL_d stays exactly 0.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints
from pyro.distributions.torch_distribution import TorchDistribution
from torch import nn

from models.sites import inverse_temperature, optimality, sample
from pplrl.nets import mlp, soft_clamp
from pplrl.replay import Batch

LOG_STD_MIN, LOG_STD_MAX = -10.0, 0.5


class ReparamModel(nn.Module):
    """MEMB's reparameterised dynamics f(s, a, zeta) and reward r_hat(s, a, zeta): two
    independent MLPs with the same input (Sec. 3.1), each giving a mean and a log-std."""

    def __init__(self, obs_dim: int, act_dim: int, hidden=(32, 16)):
        super().__init__()
        self.obs_dim = obs_dim
        self.dyn = mlp(obs_dim + act_dim, 2 * obs_dim, hidden)
        self.rew = mlp(obs_dim + act_dim, 2, hidden)
        self.register_buffer("in_mean", torch.zeros(obs_dim + act_dim))
        self.register_buffer("in_std", torch.ones(obs_dim + act_dim))

    def set_normaliser(self, obs: torch.Tensor, act: torch.Tensor) -> None:
        x = torch.cat([obs, act], -1)
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(x.std(0).clamp_min(1e-3))

    def _inputs(self, obs, act):
        return (torch.cat([obs, act], -1) - self.in_mean) / self.in_std

    def dynamics(self, obs: torch.Tensor, act: torch.Tensor) -> dist.Distribution:
        """p_hat(s'|s, a) = Normal(s + mu, sigma): rsample() is f(s, a, zeta)."""
        mu, log_std = self.dyn(self._inputs(obs, act)).chunk(2, -1)
        log_std = soft_clamp(log_std, LOG_STD_MIN, LOG_STD_MAX)
        return dist.Normal(obs + mu, log_std.exp()).to_event(1)

    def reward_dist(self, obs: torch.Tensor, act: torch.Tensor) -> dist.Distribution:
        mu, log_std = self.rew(self._inputs(obs, act)).unbind(-1)
        return dist.Normal(mu, soft_clamp(log_std, LOG_STD_MIN, LOG_STD_MAX).exp())

    def reward(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        """r_hat(s, a, zeta): a reparameterised sample."""
        return self.reward_dist(obs, act).rsample()

    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Eq. (4): 1/2 E[(f(s, a, zeta) - s')^2] + 1/2 E[(r_hat(s, a, zeta) - r)^2], squared
        errors summed over state dimensions, averaged over the batch; also the MSE of
        the means (the model error MEMB App. B.2 tracks)."""
        d = self.dynamics(batch.obs, batch.act)
        r = self.reward_dist(batch.obs, batch.act)
        dyn_loss = 0.5 * (d.rsample() - batch.next_obs).pow(2).sum(-1).mean()
        rew_loss = 0.5 * (r.rsample() - batch.rew).pow(2).mean()
        with torch.no_grad():
            info = {"model_state_mse": float((d.mean - batch.next_obs).pow(2).sum(-1).mean()),
                    "model_reward_mse": float((r.mean - batch.rew).pow(2).mean())}
        return dyn_loss + rew_loss, info


def memb_model(obs: torch.Tensor, prior_policy, dynamics: Callable, reward_fn: Callable, value_fn: Callable,
               gamma: float, alpha: float | torch.Tensor, termination_fn: Callable | None = None,
               policy=None) -> None:
    """``dynamics(obs, act)`` returns a reparameterisable distribution over next states
    (event dim 1); ``reward_fn(obs, act)`` a reparameterised reward sample r_hat(s, a, zeta);
    ``value_fn(next_obs)`` V'; ``termination_fn(obs, act, next_obs)`` (numpy, optional)
    marks terminal next states, whose value is not bootstrapped. (``policy`` is the
    guide's; the model ignores it.)"""
    scale = inverse_temperature(alpha)
    with pyro.plate("states", obs.shape[0], dim=-1):
        a = sample("a", 0, prior_policy(obs))
        x1 = sample("x", 1, dynamics(obs, a))
        cont = 1.0
        if termination_fn is not None:
            done = termination_fn(*(t.detach().cpu().numpy() for t in (obs, a, x1)))
            cont = 1.0 - torch.as_tensor(done, dtype=obs.dtype)
        optimality(0, reward_fn(obs, a) + gamma * cont * value_fn(x1), scale)


class Pinned(TorchDistribution):
    """A next state fixed in advance as a differentiable function of the action: ``rsample()``
    returns ``value`` (its gradient included) and ``log_prob`` is 0. Model and guide hold the
    same one, so the dynamics KL is exactly 0, as for MEMB's own model samples."""

    arg_constraints: dict = {}
    has_rsample = True

    def __init__(self, value: torch.Tensor, event_dim: int = 1):
        self.value = value
        shape = value.shape
        super().__init__(shape[:len(shape) - event_dim], shape[len(shape) - event_dim:], validate_args=False)

    @property
    def support(self):
        return constraints.independent(constraints.real, len(self.event_shape))

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        if len(sample_shape):
            raise ValueError("a Pinned sample has no sample_shape")
        return self.value

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        return torch.zeros(self.batch_shape, dtype=value.dtype)


def inferred_dynamics(model: ReparamModel, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> Callable:
    """SVG(1)'s next state: ``s'(a) = mu_f(s, a) + zeta_hat``, ``zeta_hat = s' - mu_f(s, a_k)``
    (additive noise inferred from the real transition, detached), as ``dynamics(obs, a)``:
    the real s' at a = a_k, and d s'/d a = d mu_f / d a."""
    zeta = (next_obs - model.dynamics(obs, act).mean).detach()
    return lambda o, a: Pinned(model.dynamics(o, a).mean + zeta, 1)


def inferred_reward(model: ReparamModel, obs: torch.Tensor, act: torch.Tensor, rew: torch.Tensor) -> Callable:
    """SVG(1)'s reward: ``r(a) = mu_r(s, a) + (r - mu_r(s, a_k))``, as ``reward_fn(obs, a)``."""
    zeta = (rew - model.reward_dist(obs, act).mean).detach()
    return lambda o, a: model.reward_dist(o, a).mean + zeta


# -- the true model (App. B.3) ---------------------------------------------------------------
PENDULUM = dict(g=10.0, m=1.0, l=1.0, dt=0.05, max_speed=8.0, max_torque=2.0)


def _pendulum_state(obs: torch.Tensor, act: torch.Tensor):
    p = PENDULUM
    th = torch.atan2(obs[..., 1], obs[..., 0])  # angle_normalize(th) for free
    u = (act[..., 0] * p["max_torque"]).clamp(-p["max_torque"], p["max_torque"])  # agent's [-1, 1] -> torque
    return th, obs[..., 2], u


def pendulum_reward(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Pendulum-v1's reward ``-(th^2 + 0.1 thdot^2 + 0.001 u^2)`` (gymnasium PendulumEnv.step),
    th in [-pi, pi] from (cos, sin), u = 2 a the torque of the agent's action in [-1, 1]."""
    th, thdot, u = _pendulum_state(obs, act)
    return -(th.square() + 0.1 * thdot.square() + 0.001 * u.square())


def pendulum_next_obs(obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
    """Pendulum-v1's step in torch, batched: ``thdot' = clip(thdot + (3g/(2l) sin th + 3/(m l^2) u) dt,
    -8, 8)``, ``th' = th + thdot' dt``, observation (cos th', sin th', thdot')."""
    p = PENDULUM
    th, thdot, u = _pendulum_state(obs, act)
    thdot = thdot + (3 * p["g"] / (2 * p["l"]) * torch.sin(th) + 3.0 / (p["m"] * p["l"] ** 2) * u) * p["dt"]
    thdot = thdot.clamp(-p["max_speed"], p["max_speed"])
    th = th + thdot * p["dt"]
    return torch.stack([torch.cos(th), torch.sin(th), thdot], -1)


def true_model_for(env_id: str) -> tuple[Callable, Callable]:
    """``(dynamics, reward_fn)`` of the environment itself, for MEMB App. B.3's true-model
    variant: ``dynamics(obs, act)`` a :class:`Pinned` next state, ``reward_fn(obs, act)`` the
    reward, both differentiable in the action. Only Pendulum-v1 (as in App. B.3)."""
    name = env_id.split(":")[-1].split("/")[-1]
    if name != "Pendulum-v1":
        raise ValueError(f"the true-model variant knows only Pendulum-v1's dynamics (App. B.3), not {env_id!r}")
    return (lambda obs, act: Pinned(pendulum_next_obs(obs, act), 1)), pendulum_reward


__all__ = ["LOG_STD_MAX", "LOG_STD_MIN", "PENDULUM", "Pinned", "ReparamModel", "inferred_dynamics", "inferred_reward",
           "memb_model", "pendulum_next_obs", "pendulum_reward", "true_model_for"]
