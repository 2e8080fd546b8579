"""The one-step actor model: prior policy and an optimality factor from a critic.

Every actor update in pplrl (SAC, VMBPO step 4 / eq. 25, beta-VMBPO eq. 13) is the
ELBO of this model against a policy guide, on a batch of states::

    a ~ pi(.|x),   p(O = 1 | x, a) = exp(scale * Q(x, a)),

    ELBO = E_{q_c}[scale * Q(x, a)] - KL(q_c(.|x) || pi(.|x)).

With the improper uniform prior (:func:`flat_prior`) the KL is the negative entropy
and ``-ELBO / scale`` is SAC's actor loss E[alpha log q_c - Q] with alpha = 1/scale
(the MaxEnt special case: variational dynamics pinned to the real ones, so the
critic carries the future). The sites ``a_0`` / ``opt_0`` have the default terms of
:mod:`models.sites`, so the term report reads ``reward`` (the scaled critic term) and
``kl_policy``. The guide is :func:`guides.actor.actor_guide`.
"""

from __future__ import annotations

from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions import constraints

from models.sites import optimality, sample


def flat_prior(act_dim: int, low: float = -1.0, high: float = 1.0) -> Callable[[torch.Tensor], dist.Distribution]:
    """Improper uniform prior over the action box (log-density 0): the MaxEnt prior."""

    def prior(obs: torch.Tensor) -> dist.Distribution:
        return dist.ImproperUniform(constraints.interval(low, high), obs.shape[:-1], (act_dim,))

    return prior


def actor_model(obs: torch.Tensor, prior_policy, q_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                scale: float | torch.Tensor, policy=None, sticking_the_landing: bool = False) -> None:
    """Prior policy and critic optimality factor on a batch of states ``obs`` [B, d].
    (``policy`` and ``sticking_the_landing`` are the guide's; the model ignores them.)"""
    with pyro.plate("states", obs.shape[0], dim=-1):
        a = sample("a", 0, prior_policy(obs))
        optimality(0, q_fn(obs, a), scale)
