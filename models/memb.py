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
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import pyro.distributions as dist
import torch
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
            done = termination_fn(obs.detach().numpy(), a.detach().numpy(), x1.detach().numpy())
            cont = 1.0 - torch.as_tensor(done, dtype=obs.dtype)
        optimality(0, reward_fn(obs, a) + gamma * cont * value_fn(x1), scale)


__all__ = ["LOG_STD_MAX", "LOG_STD_MIN", "ReparamModel", "memb_model"]
