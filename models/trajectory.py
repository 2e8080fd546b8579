"""The agent-environment-optimality graphical model as a Pyro model.

VMBPO (000_…, Sec. 3, eqs. 1-4) and beta-VMBPO (001_…, eqs. 5-7)::

    x_0 ~ p0,   a_t ~ pi(.|x_t),   x_{t+1} ~ p(.|x_t, a_t),
    p(O_t = 1 | x_t, a_t, x_{t+1}) = exp(scale * r(x_t, a_t, x_{t+1})),

with ``scale = eta`` (VMBPO) or ``scale = 1/beta`` (beta-VMBPO). The optimality
likelihoods enter as ``pyro.factor`` sites. Discounting is termination with
probability 1 - gamma inside the dynamics (VMBPO footnote 1; for tables see
:meth:`pplrl.tabular.TabularMDP.with_termination`). An optional bootstrap factor
``terminal_value(x_H)`` (a soft value, already in scaled units) truncates an
infinite-horizon problem to a window of ``horizon`` steps; with ``horizon = 1`` the
ELBO is the one-step Bellman operator of VMBPO eqs. (6)-(7).

Policies and dynamics are callables returning ``torch.distributions``-compatible
distributions, so the same model serves categorical tables and Gaussian networks.
The guide with the same signature lives in :mod:`guides.tabular` /
:mod:`guides.continuous`; site names and terms come from :mod:`models.sites`
(``a_t`` kl_policy, ``x_t`` kl_dynamics, ``x_0`` kl_initial, ``opt_t`` reward,
``bootstrap`` bootstrap).
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable

import pyro
import torch
from torch.distributions import Distribution

from models.sites import factor, optimality, sample
from pplrl.tabular import check_horizon, reward_scale

Policy = Callable[[torch.Tensor], Distribution]
Dynamics = Callable[[torch.Tensor, torch.Tensor], Distribution]
Reward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]

@dataclass
class AgentEnvironment:
    """What the model needs to know about the agent and its environment.

    ``initial`` is either the initial-state distribution p0 (the model samples
    ``x_0``) or a tensor of start states, one per element of a ``"starts"`` plate
    (the model conditions on them; useful to evaluate every state at once).
    ``state_event_dim`` is 0 for integer states and 1 for vector states.
    """

    prior_policy: Policy
    dynamics: Dynamics
    reward: Reward
    initial: Distribution | torch.Tensor
    terminal_value: Callable[[torch.Tensor], torch.Tensor] | None = None
    state_event_dim: int = 0

    def start_plate(self):
        """The plate over given start states (a no-op context when x_0 is sampled)."""
        if isinstance(self.initial, torch.Tensor):
            size = self.initial.shape[0] if self.initial.dim() > self.state_event_dim else 1
            return pyro.plate("starts", size, dim=-1)
        return nullcontext()

    def initial_state(self, infer: dict | None = None) -> torch.Tensor:
        """x_0: the given start states, or a sample from p0 (model and guide alike)."""
        if isinstance(self.initial, torch.Tensor):
            return self.initial
        return sample("x", 0, self.initial, infer=infer)


def trajectory_model(env: AgentEnvironment, horizon: int, *, eta: float | None = None,
                     beta: float | None = None) -> torch.Tensor:
    """Prior trajectory p_pi(xi) with optimality factors; returns the last state."""
    check_horizon(horizon)
    scale = reward_scale(eta, beta)
    with env.start_plate():
        x = env.initial_state()
        for t in pyro.markov(range(horizon)):
            a = sample("a", t, env.prior_policy(x))
            x_next = sample("x", t + 1, env.dynamics(x, a))
            optimality(t, env.reward(x, a, x_next), scale)
            x = x_next
        if env.terminal_value is not None:
            factor("bootstrap", None, env.terminal_value(x))
    return x


def tabular_environment(P: torch.Tensor, R: torch.Tensor, prior_policy: torch.Tensor,
                        initial: Distribution | torch.Tensor,
                        terminal_value: torch.Tensor | None = None) -> AgentEnvironment:
    """An :class:`AgentEnvironment` over categorical states and actions from tables
    ``P[s, a, s']``, ``R[s, a, s']`` and ``prior_policy[s, a]``.

    Zero probabilities are floored at 1e-30 inside the log so that exact enumeration
    never multiplies 0 by -inf; the error this introduces is below 1e-28.
    """
    logP = P.clamp_min(1e-30).log()
    log_pi = prior_policy.clamp_min(1e-30).log()
    V_end = None if terminal_value is None else (lambda x: terminal_value[x])
    return AgentEnvironment(
        prior_policy=lambda x: pyro.distributions.Categorical(logits=log_pi[x]),
        dynamics=lambda x, a: pyro.distributions.Categorical(logits=logP[x, a]),
        reward=lambda x, a, x2: R[x, a, x2],
        initial=initial,
        terminal_value=V_end,
    )
