"""Tabular variational policy q_c and variational dynamics q_d as a Pyro guide.

The guide mirrors :func:`models.trajectory.trajectory_model` site by site, with the
same signature. Its parameters are categorical logits, initialised at the prior
(log pi and log p), so that q starts equal to p_pi and the KL terms start at 0.
Dynamics logits are ``log p + delta``: q_d can only put mass where p does, as the
ELBO requires (KL(q_d || p) is infinite otherwise). Sites are marked for parallel
enumeration, so :class:`pplrl.elbo.OptimalityELBO` computes the ELBO exactly.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch

from models.sites import sample
from models.trajectory import AgentEnvironment
from pplrl.tabular import check_horizon

ENUM = {"enumerate": "parallel"}


class TabularGuide:
    """q(xi) = p0(x_0) prod_t q_c(a_t | x_t) q_d(x_{t+1} | x_t, a_t)  (VMBPO Sec. 4).

    ``time_varying=True`` gives separate tables per step (the finite-horizon optimum
    is time dependent); ``learn_dynamics=False`` pins q_d to p, which turns the ELBO
    into the MaxEnt-RL objective (SAC's special case).
    """

    def __init__(self, P: torch.Tensor, prior_policy: torch.Tensor, *, name: str = "q",
                 horizon: int | None = None, time_varying: bool = False,
                 learn_dynamics: bool = True):
        if time_varying:
            check_horizon(horizon)
        self.name = name
        self.T = horizon if time_varying else 1
        self.time_varying = time_varying
        self.learn_dynamics = learn_dynamics
        self.logP = P.clamp_min(1e-30).log()
        self.log_pi = prior_policy.clamp_min(1e-30).log()

    def _t(self, t: int) -> int:
        if self.time_varying and t >= self.T:
            raise ValueError(f"guide has tables for {self.T} steps, model asked for step {t}")
        return t if self.time_varying else 0

    def policy_logits(self) -> torch.Tensor:
        """[T, S, A] logits of q_c (T = 1 when stationary)."""
        delta = pyro.param(f"{self.name}.policy_delta", lambda: torch.zeros((self.T,) + self.log_pi.shape,
                                                                            dtype=self.log_pi.dtype))
        return self.log_pi + delta

    def dynamics_logits(self) -> torch.Tensor:
        """[T, S, A, S] logits of q_d."""
        if not self.learn_dynamics:
            return self.logP.expand((self.T,) + self.logP.shape)
        delta = pyro.param(f"{self.name}.dynamics_delta", lambda: torch.zeros((self.T,) + self.logP.shape,
                                                                              dtype=self.logP.dtype))
        return self.logP + delta

    def q_c(self) -> torch.Tensor:
        """Variational policy probabilities [T, S, A]."""
        return torch.softmax(self.policy_logits(), -1).detach()

    def q_d(self) -> torch.Tensor:
        """Variational dynamics probabilities [T, S, A, S]."""
        return torch.softmax(self.dynamics_logits(), -1).detach()

    def __call__(self, env: AgentEnvironment, horizon: int, *, eta: float | None = None,
                 beta: float | None = None) -> None:
        check_horizon(horizon)
        qc, qd = self.policy_logits(), self.dynamics_logits()
        with env.start_plate():
            x = env.initial_state(infer=ENUM)
            # no pyro.markov here: Dice needs a distinct enumeration dim per guide site
            for t in range(horizon):
                k = self._t(t)
                a = sample("a", t, dist.Categorical(logits=qc[k][x]), infer=ENUM)
                x = sample("x", t + 1, dist.Categorical(logits=qd[k][x, a]), infer=ENUM)
