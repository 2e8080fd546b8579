"""Guides of :mod:`models.pomdp`: the amortised filtering posterior over the agent's
internal state and the variational action posterior (003_…, eq. 5).

:class:`FilteringGuide` is q(s_t | s_{t-1}, a_{t-1}, x_t, r_t) on the model's recurrent
state (PlaNet's "posterior"): h_t = GRU(h_{t-1}, [z_{t-1}, a_{t-1}]) is computed by the
*model's* recurrent path (:meth:`models.pomdp.POMDPModel.deter`; a deterministic function
of the previous sample, so model and guide agree on it) and an MLP maps (h_t, x_t, r_t)
to a Gaussian over z_t. h_t summarises the history a_<t, z_<t, as the DMM example's
guide RNN summarises x (here it runs forwards, since the agent filters online, and it is
shared with the model rather than separate, as in PlaNet). :meth:`FilteringGuide.step`
is the one-step update the agent calls while acting; :func:`pomdp_guide` runs it over a
window from its stored s_{-1} (``Window.s0``; 0 at an episode start).

q(a_t) is the planner's Gaussian (:mod:`pplrl.pomdp_planning`), stored with each step;
planning starts from the amortised :class:`ActionPosterior` q(a_t | z_t) and refines it;
in the bound it is data for the guide (no parameters), so its KL to the prior trains
only the prior (consolidation) and, through z_t, the filter.

:class:`BeliefFilter` is the tabular counterpart for Tiger: the belief b_t =
q(z_t | a_<t, x_<=t) computed recursively from (b_{t-1}, a_{t-1}, x_t).
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule

from models.pomdp import MIN_SCALE, POMDPModel, StateDist, Window, check_window
from models.sites import sample
from pplrl.nets import MLP


class FilteringGuide(PyroModule):
    """q(s_t) = delta(h_t) N(z_t; mu, sigma), (mu, sigma) = MLP([h_t, x_t, r_t]),
    h_t = model.deter(s_{t-1}, a_{t-1}). ``h_dim`` must equal the model's."""

    def __init__(self, x_dim: int, a_dim: int, z_dim: int = 8, h_dim: int = 64, hidden: int = 64):
        super().__init__()
        self.x_dim, self.a_dim, self.z_dim, self.h_dim = x_dim, a_dim, z_dim, h_dim
        self.posterior = MLP(h_dim + x_dim + 1, 2 * z_dim, (hidden, hidden))

    def initial_state(self, batch_shape) -> torch.Tensor:
        """s_{-1} before the first step of a window: zeros."""
        return torch.zeros(*batch_shape, self.h_dim + self.z_dim)

    def step(self, model: POMDPModel, s_prev, a_prev, x, r) -> StateDist:
        """One filtering step: q(s_t) from the previous state sample, a_{t-1} and (x_t, r_t)."""
        if model.h_dim != self.h_dim or model.z_dim != self.z_dim:
            raise ValueError(f"guide (h_dim {self.h_dim}, z_dim {self.z_dim}) and model (h_dim {model.h_dim}, "
                             f"z_dim {model.z_dim}) disagree")
        h = model.deter(s_prev, a_prev)
        loc, raw = self.posterior(torch.cat([h, x, r[..., None]], -1)).chunk(2, -1)
        return StateDist(h, dist.Normal(loc, F.softplus(raw) + MIN_SCALE).to_event(1))

    def filter(self, model: POMDPModel, window: Window, sample: bool = True) -> torch.Tensor:
        """s_t for every step of a window ``[B, T, h_dim + z_dim]`` (samples, or the means)."""
        B, T = window.shape
        s = self.initial_state((B,)) if window.s0 is None else window.s0
        out = []
        for t in range(T):
            qs = self.step(model, s, window.a_prev[:, t], window.x[:, t], window.r[:, t])
            s = qs.rsample() if sample else qs.mean
            out.append(s)
        return torch.stack(out, 1)


class ActionPosterior(PyroModule):
    """Amortised q(a_t | s_t): the planner's starting point, which planning refines
    (iterative amortised inference, Marino et al. 2018b); trained toward the planner's
    refined q(a_t) by KL(q_plan || q_amortised)."""

    def __init__(self, z_dim: int, a_dim: int, hidden: int = 64):
        super().__init__()
        self.net = MLP(z_dim, 2 * a_dim, (hidden, hidden))

    def forward(self, z: torch.Tensor):
        loc, raw = self.net(z).chunk(2, -1)
        return dist.Normal(torch.tanh(loc), F.softplus(raw) + MIN_SCALE).to_event(1)


def pomdp_guide(model: POMDPModel, guide: FilteringGuide, window: Window, temperature: float = 1.0, K: int = 8) -> None:
    """The guide of :func:`models.pomdp.pomdp_model` (same signature)."""
    B, T = window.shape
    check_window(T)
    s = guide.initial_state((B,)) if window.s0 is None else window.s0
    with pyro.plate("windows", B):
        for t in pyro.markov(range(T)):
            s = sample("z", t, guide.step(model, s, window.a_prev[:, t], window.x[:, t], window.r[:, t]), term="kl_z")
            sample("a", t, dist.Normal(window.qa_loc[:, t], window.qa_scale[:, t]).to_event(1), term="kl_a")


# ------------------------------------------------------------------------ Tiger (tabular)
class BeliefFilter(PyroModule):
    """Amortised Tiger filter: logits of b_t = log b_{t-1} + MLP([log b_{t-1}, a_{t-1}, x_t])
    (one-hot action and observation)."""

    def __init__(self, n_states: int = 2, n_actions: int = 3, n_obs: int = 2, hidden: int = 32):
        super().__init__()
        self.n_states, self.n_actions, self.n_obs = n_states, n_actions, n_obs
        self.net = MLP(n_states + n_actions + n_obs, n_states, (hidden, hidden))

    def forward(self, belief: torch.Tensor, a_prev: torch.Tensor, obs: torch.Tensor) -> torch.Tensor:
        log_b = belief.clamp_min(1e-12).log()
        inp = torch.cat([log_b, F.one_hot(a_prev, self.n_actions).float(), F.one_hot(obs, self.n_obs).float()], -1)
        return torch.softmax(log_b + self.net(inp), -1)

    @torch.no_grad()
    def beliefs(self, a_prev: torch.Tensor, obs: torch.Tensor, belief0: torch.Tensor | None = None):
        """(beliefs before each step ``[B, T, S]``, beliefs after each step ``[B, T, S]``)."""
        B, T = obs.shape
        b = torch.full((B, self.n_states), 1.0 / self.n_states) if belief0 is None else belief0
        before, after = [], []
        for t in range(T):
            before.append(b)
            b = self(b, a_prev[:, t], obs[:, t])
            after.append(b)
        return torch.stack(before, 1), torch.stack(after, 1)


def tiger_filter_guide(filt: BeliefFilter, tables, a_prev, obs, prev_belief) -> None:
    """Guide of :func:`models.pomdp.tiger_filter_model`: z_t ~ Categorical(b_t), b_t the
    filter's update of the (given) previous belief; enumerated exactly."""
    B, T = obs.shape
    with pyro.plate("sequences", B):
        for t in pyro.markov(range(T)):
            probs = filt(prev_belief[:, t], a_prev[:, t], obs[:, t])
            sample("z", t, dist.Categorical(probs=probs), term="kl_z", infer={"enumerate": "parallel"})


__all__ = ["ActionPosterior", "BeliefFilter", "FilteringGuide", "pomdp_guide", "tiger_filter_guide"]
