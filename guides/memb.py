"""The guide of :func:`models.memb.memb_model`: the policy, and the learned dynamics
themselves as the variational dynamics (q_d pinned to the model, so KL_d = 0 and the
reparameterised gradient flows through the model)."""

from __future__ import annotations

import pyro

from models.trajectory import site_name
from models.virel import check_temperature


def memb_guide(obs, prior_policy, dynamics, reward_fn, value_fn, gamma, alpha, termination_fn=None,
               policy=None) -> None:
    if policy is None:
        raise ValueError("memb_guide needs the policy module (policy=...)")
    t = check_temperature(alpha)
    with pyro.plate("states", obs.shape[0], dim=-1):
        with pyro.poutine.scale(scale=t):
            a = pyro.sample(site_name("a", 0), policy(obs))
        pyro.sample(site_name("x", 1), dynamics(obs, a))
