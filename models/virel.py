"""VIREL's Boltzmann-policy model (Fellows et al., 002_…, eqs. 3–5).

VIREL's model puts a prior on actions (here the improper uniform prior on the action
box, the paper's "uniform" h-distribution) and an optimality factor
``Q_omega(s, a) / eps_omega``, whose temperature ``eps_omega`` is the mean squared
Bellman residual of the critic (eq. 3). The posterior over actions is the Boltzmann
policy ``pi_omega(a|s) ∝ exp(Q_omega(s, a) / eps_omega)`` and the ELBO against a
variational policy ``pi_theta`` is eq. (4)::

    L(omega, theta) = E_s[ E_{a~pi_theta}[Q_omega(s, a) / eps_omega] + H(pi_theta(.|s)) ].

**Tempered form.** As eps_omega -> 0 (the critic becomes exact) L diverges and the
Boltzmann policy becomes greedy (Theorem 1). The paper optimises ``eps * L`` instead
(App. E.1, "to prevent ill-conditioning"); this model writes that product directly:
the action sites carry ``poutine.scale(temperature)`` and the factor is unscaled, so
the ELBO Pyro computes is::

    temperature * L = E_q[Q - b(s)] - temperature * E_q[log pi_theta(a|s)]   (flat prior)

which stays finite at temperature -> 0, where it is the greedy limit E_q[Q]. ``b(s)``
is an optional state-dependent baseline (VIREL's value network V(s), App. H); it
does not change the gradient with respect to theta. Divide the ELBO by the
temperature to read eq. (4) itself.

The guide is :func:`guides.virel.virel_guide`.
"""

from __future__ import annotations

from collections.abc import Callable

import pyro
import torch
from pyro import poutine

from models.trajectory import site_name

#: the smallest temperature used: ``poutine.scale`` needs a positive scale, and at
#: 1e-8 the tempered ELBO equals its eps -> 0 (greedy) limit to float precision.
MIN_TEMPERATURE = 1e-8


def check_temperature(temperature: float | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(temperature, dtype=torch.get_default_dtype())
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    return t.clamp_min(MIN_TEMPERATURE)


def virel_model(obs: torch.Tensor, prior_policy, q_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                temperature: float | torch.Tensor, baseline: Callable[[torch.Tensor], torch.Tensor] | None = None,
                policy=None) -> None:
    """Action prior and the optimality factor ``Q(s, a) - b(s)`` on a batch of states
    ``obs`` [B, d], with the action sites scaled by ``temperature`` (tempered ELBO).
    ``policy`` is the guide's argument; the model ignores it."""
    t = check_temperature(temperature)
    with pyro.plate("states", obs.shape[0], dim=-1):
        with poutine.scale(scale=t):
            a = pyro.sample(site_name("a", 0), prior_policy(obs))
        value = q_fn(obs, a)
        if baseline is not None:
            value = value - baseline(obs)
        pyro.factor(site_name("opt", 0), value)
