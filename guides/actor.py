"""The variational policy q_c(a|x) as the guide of :func:`models.actor.actor_model`."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from models.sites import sample
from pplrl.distributions import detached


class StickingTheLanding(dist.TorchDistribution):
    """``rsample`` from ``base``; ``log_prob`` with ``base``'s parameters detached.

    The "sticking the landing" gradient estimator (Roeder, Wu and Duvenaud 2017):
    it drops the score term E_q[grad_theta log q_theta(a)] of the reparameterised
    ELBO gradient, which has expectation zero but, multiplied by a large KL weight
    (beta-VMBPO's 1/scale = beta, ~100), swamps the critic's gradient. Unbiased; the
    ELBO's value is unchanged.
    """

    has_rsample = True

    def __init__(self, base, detached):
        self.base, self.detached = base, detached
        super().__init__(base.batch_shape, base.event_shape, validate_args=False)

    @property
    def support(self):
        return self.base.support

    def rsample(self, sample_shape=torch.Size()):
        return self.base.rsample(sample_shape)

    def log_prob(self, value):
        return self.detached.log_prob(value)


def actor_guide(obs, prior_policy, q_fn, scale, policy=None, sticking_the_landing: bool = False) -> None:
    """Samples ``a_0`` from ``policy(obs)`` (e.g. a :class:`guides.continuous.GaussianPolicy`),
    reparameterised, on the same plate as the model; optionally with the
    :class:`StickingTheLanding` gradient estimator."""
    if policy is None:
        raise ValueError("actor_guide needs the variational policy module (policy=...)")
    with pyro.plate("states", obs.shape[0], dim=-1):
        d = policy(obs)
        if sticking_the_landing:
            d = StickingTheLanding(d, detached(d))
        sample("a", 0, d)
