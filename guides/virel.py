"""The variational policy pi_theta as the guide of :func:`models.virel.virel_model`."""

from __future__ import annotations

import pyro

from models.sites import sample


def virel_guide(obs, prior_policy, q_fn, temperature, baseline=None, policy=None) -> None:
    """Samples ``a_0`` from ``policy(obs)`` (reparameterised), on the model's plate."""
    if policy is None:
        raise ValueError("virel_guide needs the variational policy module (policy=...)")
    with pyro.plate("states", obs.shape[0], dim=-1):
        sample("a", 0, policy(obs))
