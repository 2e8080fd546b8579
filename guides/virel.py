"""The variational policy pi_theta as the guide of :func:`models.virel.virel_model`."""

from __future__ import annotations

import pyro

from models.trajectory import site_name
from models.virel import check_temperature


def virel_guide(obs, prior_policy, q_fn, temperature, baseline=None, policy=None) -> None:
    """Samples ``a_0`` from ``policy(obs)`` (reparameterised) under the same
    temperature scale as the model's action site, so the ELBO is temperature * eq. (4)."""
    if policy is None:
        raise ValueError("virel_guide needs the variational policy module (policy=...)")
    t = check_temperature(temperature)
    with pyro.plate("states", obs.shape[0], dim=-1):
        with pyro.poutine.scale(scale=t):
            pyro.sample(site_name("a", 0), policy(obs))
