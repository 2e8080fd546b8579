"""The variational policy q_c(a|x) as the guide of :func:`models.actor.actor_model`."""

from __future__ import annotations

import pyro

from models.trajectory import site_name


def actor_guide(obs, prior_policy, q_fn, scale, policy=None) -> None:
    """Samples ``a_0`` from ``policy(obs)`` (e.g. a :class:`guides.continuous.GaussianPolicy`),
    reparameterised, on the same plate as the model."""
    if policy is None:
        raise ValueError("actor_guide needs the variational policy module (policy=...)")
    with pyro.plate("states", obs.shape[0], dim=-1):
        pyro.sample(site_name("a", 0), policy(obs))
