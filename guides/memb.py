"""The guide of :func:`models.memb.memb_model`: the policy, and the learned dynamics
themselves as the variational dynamics (q_d pinned to the model, so KL_d = 0 and the
reparameterised gradient flows through the model)."""

from __future__ import annotations

import pyro

from models.sites import sample


def memb_guide(obs, prior_policy, dynamics, reward_fn, value_fn, gamma, alpha, termination_fn=None,
               policy=None) -> None:
    if policy is None:
        raise ValueError("memb_guide needs the policy module (policy=...)")
    with pyro.plate("states", obs.shape[0], dim=-1):
        a = sample("a", 0, policy(obs))
        sample("x", 1, dynamics(obs, a))
