"""Continuous variational policy q_c and variational dynamics q_d as a Pyro guide.

:class:`ContinuousGuide` is the guide of :func:`models.trajectory.trajectory_model`
for vector states (``AgentEnvironment(state_event_dim=1)``) and vector actions::

    q(xi) = p0(x_0) prod_t q_c(a_t | x_t) q_d(x_{t+1} | x_t, a_t)      (VMBPO Sec. 4)

with q_c a Gaussian (or tanh-squashed Gaussian, for bounded actions) policy network
(:class:`GaussianPolicy`) and q_d a Gaussian network over next states
(:class:`GaussianDynamics`). Without q_d the guide samples next states from the
model's own dynamics ``env.dynamics``, so the KL(q_d || p) term is zero and the ELBO
is the MaxEnt-RL (SAC) objective.

All networks are :class:`pyro.nn.PyroModule` s made of ``PyroModule[nn.Linear]``
layers, so their parameters reach Pyro's optimiser (``pyro.infer.SVI``) through the
global param store, or ``ELBO(...)(model, guide).parameters()`` under
``pyro.settings.set(module_local_params=True)``. Nothing here relies on global
parameter names, and nothing changes Pyro's settings on import. (A plain
``nn.Module`` inside a PyroModule - e.g. ``PyroModule[nn.Sequential](nn.Linear(...))``
- is invisible to SVI; :class:`ContinuousGuide` converts such modules with
:func:`pyro.nn.module.to_pyro_module_`.)
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import nn

from models.sites import sample
from models.trajectory import AgentEnvironment
from pplrl.distributions import TanhNormal, gaussian_mode
from pplrl.nets import MLP, soft_clamp
from pplrl.tabular import check_horizon

#: SAC's clamp of the policy log-std (Haarnoja et al. 2018, reference implementation).
LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


# ------------------------------------------------------------------------- networks
class GaussianPolicy(PyroModule):
    """Variational policy q_c(a | x): an MLP giving mean and log-std of a diagonal
    Gaussian over actions.

    ``forward(obs)`` returns ``TanhNormal(mean, std, low, high)`` when bounds were given,
    else ``Normal(mean, std).to_event(1)``. The log-std is hard-clamped to
    [``LOG_STD_MIN``, ``LOG_STD_MAX``] = [-20, 2], the SAC convention.
    """

    def __init__(self, obs_dim: int, act_dim: int, low=None, high=None,
                 hidden: Sequence[int] = (256, 256)):
        super().__init__()
        if (low is None) != (high is None):
            raise ValueError("give both action bounds (low and high) or neither")
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.net = MLP(obs_dim, 2 * act_dim, hidden)
        self.bounded = low is not None
        if self.bounded:
            low, high = (np.broadcast_to(np.asarray(b, dtype=np.float64), (self.act_dim,)) for b in (low, high))
            if np.any(high <= low):  # checked in host memory, before the bounds go to the device
                raise ValueError("action bounds need low < high in every dimension")
            low, high = (torch.as_tensor(b.copy(), dtype=torch.get_default_dtype()) for b in (low, high))
            self.register_buffer("low", low)
            self.register_buffer("high", high)

    def mean_log_std(self, obs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pre-squashing mean and clamped log-std, each ``[..., act_dim]``."""
        mean, log_std = self.net(obs).chunk(2, dim=-1)
        return mean, log_std.clamp(LOG_STD_MIN, LOG_STD_MAX)

    def forward(self, obs: torch.Tensor):
        mean, log_std = self.mean_log_std(obs)
        if self.bounded:
            return TanhNormal(mean, log_std.exp(), self.low, self.high)
        return dist.Normal(mean, log_std.exp()).to_event(1)

    def act(self, obs: torch.Tensor, deterministic: bool = False) -> torch.Tensor:
        """An action for ``obs`` without gradients: a sample, or the deterministic one."""
        with torch.no_grad():
            d = self(obs)
            return gaussian_mode(d) if deterministic else d.sample()


class GaussianDynamics(PyroModule):
    """Variational dynamics q_d(x' | x, a) = Normal(x + delta(x, a), std(x, a)).to_event(1).

    An MLP on ``[x, a]`` gives the state change and the log-std; the log-std is soft-
    clamped into (``min_log_std``, ``max_log_std``) as in mbrl-lib (:func:`soft_clamp`).
    With ``learn_log_std_bounds=True`` the bounds are per-dimension parameters (mbrl-lib
    then adds :meth:`log_std_bounds_penalty` to its loss to keep them tight); otherwise
    they are fixed buffers.
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256),
                 min_log_std: float = -5.0, max_log_std: float = 0.5,
                 learn_log_std_bounds: bool = False):
        super().__init__()
        if not min_log_std < max_log_std:
            raise ValueError(f"need min_log_std < max_log_std, got {min_log_std}, {max_log_std}")
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.net = MLP(obs_dim + act_dim, 2 * obs_dim, hidden)
        lo = torch.full((self.obs_dim,), float(min_log_std))
        hi = torch.full((self.obs_dim,), float(max_log_std))
        if learn_log_std_bounds:
            self.min_log_std = nn.Parameter(lo)
            self.max_log_std = nn.Parameter(hi)
        else:
            self.register_buffer("min_log_std", lo)
            self.register_buffer("max_log_std", hi)

    def mean_log_std(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean of the next state and soft-clamped log-std, each ``[..., obs_dim]``."""
        batch = torch.broadcast_shapes(obs.shape[:-1], act.shape[:-1])
        obs = obs.expand(batch + obs.shape[-1:])
        act = act.expand(batch + act.shape[-1:])
        delta, log_std = self.net(torch.cat([obs, act], dim=-1)).chunk(2, dim=-1)
        return obs + delta, soft_clamp(log_std, self.min_log_std, self.max_log_std)

    def forward(self, obs: torch.Tensor, act: torch.Tensor):
        mean, log_std = self.mean_log_std(obs, act)
        return dist.Normal(mean, log_std.exp()).to_event(1)

    def log_std_bounds_penalty(self, weight: float = 0.01) -> torch.Tensor:
        """mbrl-lib's ``weight * (sum max_log_std - sum min_log_std)`` (0 if fixed)."""
        if not isinstance(self.max_log_std, nn.Parameter):
            return torch.zeros(())
        return weight * (self.max_log_std.sum() - self.min_log_std.sum())


# ---------------------------------------------------------------------------- guide
class ContinuousGuide(PyroModule):
    """The guide of :func:`models.trajectory.trajectory_model` for vector states.

    ``policy`` is q_c: any module mapping states ``[..., obs_dim]`` to a distribution
    over actions with event shape ``[act_dim]`` (usually a :class:`GaussianPolicy`).
    ``dynamics`` is q_d, a module ``(x, a) -> distribution over x'`` (usually a
    :class:`GaussianDynamics`), or ``None`` to pin q_d to the model's ``env.dynamics``
    (MaxEnt RL / SAC: KL(q_d || p) = 0). Plain ``nn.Module`` s are converted in place
    to PyroModules so that SVI sees their parameters.

    Sites, plates and x_0 match the model exactly (:func:`models.sites.site`,
    ``env.start_plate()``, ``env.initial_state()``); a_t and x_{t+1} are
    reparameterised samples, so gradients are pathwise.
    """

    def __init__(self, policy: nn.Module, dynamics: nn.Module | None = None, name: str = ""):
        super().__init__(name)
        for m in (policy, dynamics):
            if m is not None and not isinstance(m, PyroModule):
                to_pyro_module_(m)
        self.policy = policy
        self.dynamics = dynamics

    @classmethod
    def build(cls, obs_dim: int, act_dim: int, *, low=None, high=None, learn_dynamics: bool = True,
              hidden: Sequence[int] = (256, 256), name: str = "", **dynamics_kwargs) -> "ContinuousGuide":
        """A guide with a :class:`GaussianPolicy` and (if ``learn_dynamics``) a
        :class:`GaussianDynamics`, both with the given hidden sizes."""
        policy = GaussianPolicy(obs_dim, act_dim, low, high, hidden)
        dynamics = GaussianDynamics(obs_dim, act_dim, hidden, **dynamics_kwargs) if learn_dynamics else None
        return cls(policy, dynamics, name=name)

    @property
    def learn_dynamics(self) -> bool:
        return self.dynamics is not None

    def q_c(self, x: torch.Tensor):
        """Distribution of a_t given x_t under the guide."""
        return self.policy(x)

    def q_d(self, env: AgentEnvironment, x: torch.Tensor, a: torch.Tensor):
        """Distribution of x_{t+1} given (x_t, a_t) under the guide (``env.dynamics`` if pinned)."""
        return env.dynamics(x, a) if self.dynamics is None else self.dynamics(x, a)

    def forward(self, env: AgentEnvironment, horizon: int, *, eta: float | None = None,
                beta: float | None = None) -> torch.Tensor:
        check_horizon(horizon)
        if env.state_event_dim != 1:
            raise ValueError("ContinuousGuide needs vector states: AgentEnvironment(state_event_dim=1)")
        with env.start_plate():
            x = env.initial_state()
            for t in pyro.markov(range(horizon)):
                a = sample("a", t, self.q_c(x))
                x = sample("x", t + 1, self.q_d(env, x, a))
        return x
