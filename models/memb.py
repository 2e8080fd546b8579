"""MEMB's model-embedded one-step model (Tan et al., 004_…, eqs. 8–9).

MEMB improves its policy on the soft Bellman equation with the *learned* dynamics
and reward models embedded in it (eq. 8)::

    V(s) = E_{eta, zeta}[ r_hat(s, a, zeta_r) - alpha log pi(a|s) + gamma V'(f(s, a, zeta_d)) ],
    a = kappa(s, eta; theta).

As a Pyro model: the action prior (improper uniform on the box, so the policy KL is
the negative entropy), the next state ``x_1`` sampled from the learned dynamics
``f(s, a, zeta)``, and an optimality factor ``r_hat(s, a) + gamma (1 - done) V'(x_1)``.
The guide (:func:`guides.memb.memb_guide`) samples the action from the policy and
``x_1`` from *the same learned dynamics* — the variational dynamics are pinned to the
model, so the dynamics KL is exactly 0, and because both samples are
reparameterised, the ELBO's gradient flows through ``f`` and ``r_hat`` into the
action: eq. (9), the SVG(1)-style path, on model samples rather than real ones.

The action sites carry ``poutine.scale(alpha)`` (the tempered form of
:mod:`models.virel`), so the ELBO Pyro computes *is* eq. (8)'s estimate of V(s),
summed over the batch, and ``alpha = 0`` (MEMB's unregularised ablation, App. B.1)
is the plain stochastic value gradient.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro import poutine

from models.trajectory import site_name
from models.virel import check_temperature


def memb_model(obs: torch.Tensor, prior_policy, dynamics: Callable, reward_fn: Callable, value_fn: Callable,
               gamma: float, alpha: float | torch.Tensor, termination_fn: Callable | None = None,
               policy=None) -> None:
    """``dynamics(obs, act)`` returns a reparameterisable distribution over next states
    (event dim 1); ``reward_fn(obs, act)`` a reparameterised reward sample r_hat(s, a, zeta);
    ``value_fn(next_obs)`` V'; ``termination_fn(obs, act, next_obs)`` (numpy, optional)
    marks terminal next states, whose value is not bootstrapped."""
    t = check_temperature(alpha)
    with pyro.plate("states", obs.shape[0], dim=-1):
        with poutine.scale(scale=t):
            a = pyro.sample(site_name("a", 0), prior_policy(obs))
        x1 = pyro.sample(site_name("x", 1), dynamics(obs, a))
        cont = 1.0
        if termination_fn is not None:
            done = termination_fn(obs.detach().numpy(), a.detach().numpy(), x1.detach().numpy())
            cont = 1.0 - torch.as_tensor(done, dtype=obs.dtype)
        pyro.factor(site_name("opt", 0), reward_fn(obs, a) + gamma * cont * value_fn(x1))
