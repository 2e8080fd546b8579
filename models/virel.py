"""VIREL's Boltzmann-policy model (Fellows et al., 002_…, eqs. 3–5).

VIREL's model puts a prior on actions (here the improper uniform prior on the action
box, the paper's "uniform" h-distribution) and an optimality factor
``Q_omega(s, a) / eps_omega``, whose temperature ``eps_omega`` is the mean squared
Bellman residual of the critic (eq. 3). The posterior over actions is the Boltzmann
policy ``pi_omega(a|s) ∝ exp(Q_omega(s, a) / eps_omega)`` and the ELBO against a
variational policy ``pi_theta`` is eq. (4)::

    L(omega, theta) = E_s[ E_{a~pi_theta}[Q_omega(s, a) / eps_omega] + H(pi_theta(.|s)) ].

**Temperature.** The factor is ``(Q - b(s)) / eps`` (the convention of
:mod:`models.sites`), so the ELBO Pyro computes is eq. (4) itself::

    L = E_q[(Q - b(s)) / eps] - E_q[log pi_theta(a|s)]     (flat prior)

``b(s)`` is an optional state-dependent baseline (VIREL's value network V(s), App. H);
it does not change the gradient with respect to theta. As eps -> 0 (the critic becomes
exact) L diverges and the Boltzmann policy becomes greedy (Theorem 1); the paper
optimises ``eps * L`` instead (App. E.1, "to prevent ill-conditioning"), and so does
:class:`pplrl.algorithms.virel.VIREL`: eps * L stays finite, with the greedy limit
E_q[Q - b] (eps is floored at :data:`models.sites.MIN_TEMPERATURE`).

The guide is :func:`guides.virel.virel_guide`.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch

from models.sites import inverse_temperature, optimality, sample


def virel_model(obs: torch.Tensor, prior_policy, q_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                temperature: float | torch.Tensor, baseline: Callable[[torch.Tensor], torch.Tensor] | None = None,
                policy=None) -> None:
    """Action prior and the optimality factor ``(Q(s, a) - b(s)) / temperature`` on a
    batch of states ``obs`` [B, d]. ``policy`` is the guide's argument; the model ignores it."""
    scale = inverse_temperature(temperature)
    with pyro.plate("states", obs.shape[0], dim=-1):
        a = sample("a", 0, prior_policy(obs))
        value = q_fn(obs, a)
        if baseline is not None:
            value = value - baseline(obs)
        optimality(0, value, scale)
