"""A probabilistic dynamics ensemble p_theta(s', r | s, a), fit by maximum likelihood with SVI.

beta-VMBPO (001_…, Sec. 5, eq. 10) learns the prior dynamics from environment
transitions by minimising the cross-entropy::

    J(theta) = -E_{(s, a, s', r) ~ D_env}[ log p_theta(s', r | s, a) ]        (10)

with MBPO's model (App. C.1, Table 1): an ensemble of 7 probabilistic networks, each
an MLP with 4 hidden layers of 200 units (ReLU) whose outputs parameterise a diagonal
Gaussian over the target ``[s' - s, r]``; the networks are trained for five epochs
and the validation set is used only to pick the 5 elite members.

Here eq. (10) is a Pyro model: :meth:`GaussianEnsemble.model` observes the targets
under ``Normal(mean, std).to_event(1)`` inside a ``"members"`` and a ``"data"``
plate, so with the empty :meth:`GaussianEnsemble.guide` the ELBO is the
log-likelihood and ``SVI(model, guide, optim, Trace_ELBO())`` is maximum likelihood.
Each transition carries weight 1/B (the minibatch estimate of the expectation in
eq. 10), summed over members, as in mbrl-lib's ``GaussianMLP`` loss.

The pieces follow mbrl-lib's ``mbrl/models/gaussian_mlp.py``: one batched forward
pass over all members (:class:`EnsembleLinear`), the log-variance soft-clamped into
learned bounds (PETS, Chua et al. 2018, App. A.1) with a small penalty keeping the
bounds tight, inputs standardised by a :class:`Normalizer` fit on the training
inputs, elites chosen by hold-out MSE.

Pyro sees the parameters because every layer is a :class:`~pyro.nn.PyroModule`:
reading a parameter inside the module's ``forward`` (or a ``@pyro_method``) is a
``pyro.param`` statement named ``"<name>.<path>"``, so ``SVI`` collects and steps
exactly these tensors. Two ensembles that share a ``name`` would share parameter
names in Pyro's global param store; :meth:`GaussianEnsemble.fit` checks for that and
raises instead of training the wrong tensors (give each ensemble its own ``name``).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroModule, pyro_method
from pyro.optim import PyroOptim
from torch import nn

from models.sites import factor, sample
from pplrl.nets import adam, soft_clamp

#: Weight of mbrl-lib's penalty ``(sum max_logvar - sum min_logvar)`` on the loss.
LOGVAR_BOUND_PENALTY = 0.01

#: Hold-out inputs are evaluated in chunks of this many transitions (memory bound).
EVAL_CHUNK = 8192
#: mbrl-lib's initial bounds of the learned log-variance
MIN_LOGVAR, MAX_LOGVAR = -10.0, 0.5


# --------------------------------------------------------------------------- layers
class EnsembleLinear(PyroModule):
    """``E`` independent affine maps applied in one batched matmul.

    ``weight`` is ``[E, in, out]`` and ``bias`` ``[E, 1, out]``; ``forward(x)`` maps
    ``x`` of shape ``[E, B, in]`` to ``x @ weight + bias`` of shape ``[E, B, out]``
    with :func:`torch.baddbmm` (member ``e`` uses ``x[e]``). Weights are initialised
    as in mbrl-lib: truncated normal with std ``1 / (2 sqrt(in))``, biases zero.
    """

    def __init__(self, ensemble_size: int, in_features: int, out_features: int):
        super().__init__()
        self.ensemble_size, self.in_features, self.out_features = (
            int(ensemble_size), int(in_features), int(out_features))
        std = 1.0 / (2.0 * math.sqrt(self.in_features))
        weight = torch.empty(self.ensemble_size, self.in_features, self.out_features)
        nn.init.trunc_normal_(weight, std=std, a=-2.0 * std, b=2.0 * std)
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(torch.zeros(self.ensemble_size, 1, self.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[0] != self.ensemble_size or x.shape[-1] != self.in_features:
            raise ValueError(f"EnsembleLinear expects input [{self.ensemble_size}, B, {self.in_features}], "
                             f"got {list(x.shape)}")
        return torch.baddbmm(self.bias, x, self.weight)

    def extra_repr(self) -> str:
        return f"ensemble_size={self.ensemble_size}, in_features={self.in_features}, out_features={self.out_features}"


class Normalizer(PyroModule):
    """Running per-dimension mean and standard deviation of inputs (buffers, so they
    are saved in ``state_dict``). ``update(x)`` merges a batch ``[N, dim]`` into the
    statistics (Chan et al.'s parallel formula); ``normalize(x) = (x - mean) / std``,
    with ``std`` replaced by 1 in dimensions whose spread is below ``eps`` (constant
    inputs pass through centred, not blown up). Before any update it is the identity.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = int(dim), float(eps)
        self.register_buffer("mean", torch.zeros(self.dim))
        self.register_buffer("var", torch.ones(self.dim))
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))

    def reset(self) -> None:
        """Forget all statistics (back to the identity)."""
        self.mean.zero_()
        self.var.fill_(1.0)
        self.count.zero_()

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        """Merge the batch ``x`` of shape ``[N, dim]`` into the running statistics."""
        x = x.reshape(-1, self.dim).to(torch.float64)
        n_b = x.shape[0]
        if n_b == 0:
            return
        mean_b, var_b = x.mean(0), x.var(0, unbiased=False)
        n_a = float(self.count)
        if n_a == 0:
            mean, var = mean_b, var_b
        else:
            n = n_a + n_b
            delta = mean_b - self.mean.to(torch.float64)
            mean = self.mean.to(torch.float64) + delta * n_b / n
            var = (self.var.to(torch.float64) * n_a + var_b * n_b + delta.square() * n_a * n_b / n) / n
        self.mean.copy_(mean)
        self.var.copy_(var)
        self.count.add_(n_b)

    @property
    def std(self) -> torch.Tensor:
        std = self.var.sqrt()
        return torch.where(std < self.eps, torch.ones_like(std), std)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.normalize(x)


# --------------------------------------------------------------------------- ensemble
class GaussianEnsemble(PyroModule):
    """Ensemble of ``E`` Gaussian MLPs over ``target = [next_obs - obs, reward]``.

    Member ``e`` maps ``normalize([obs, act])`` through ``len(hidden)`` hidden
    :class:`EnsembleLinear` layers to the mean and raw log-variance of the
    ``D = obs_dim + 1`` target dimensions; the log-variance is soft-clamped into the
    learned bounds ``(min_logvar, max_logvar)`` (mbrl-lib):
    ``logvar = max - softplus(max - x)``, then ``logvar = min + softplus(logvar - min)``.

    Defaults are beta-VMBPO's (001_…, App. C.2, Table 1): 7 members, 5 elites, 4
    hidden layers of 200 ReLU units. ``name`` prefixes the parameter names Pyro uses;
    give different ensembles (say prior and variational dynamics) different names.

    Shapes: every method takes ``obs [B, obs_dim]``, ``act [B, act_dim]`` (the same
    batch for every member) or ``[E, B, ...]`` (member ``e`` gets slice ``e``, e.g. a
    bootstrap resample); ``reward`` is ``[B]`` or ``[B, 1]`` (``[E, B]`` or
    ``[E, B, 1]``). Tensors are float32 on the module's device.
    """

    def __init__(self, obs_dim: int, act_dim: int, *, ensemble_size: int = 7, num_elites: int = 5,
                 hidden: Sequence[int] = (200, 200, 200, 200), activation: type[nn.Module] = nn.ReLU,
                 min_logvar: float = MIN_LOGVAR, max_logvar: float = MAX_LOGVAR, name: str = "dynamics"):
        super().__init__(name)
        if int(obs_dim) < 1 or int(act_dim) < 1:
            raise ValueError(f"obs_dim and act_dim must be >= 1, got {obs_dim}, {act_dim}")
        if int(ensemble_size) < 1 or not 1 <= int(num_elites) <= int(ensemble_size):
            raise ValueError(f"need 1 <= num_elites <= ensemble_size, got {num_elites}, {ensemble_size}")
        if len(hidden) == 0 or any(int(h) < 1 for h in hidden):
            raise ValueError(f"hidden must be a non-empty sequence of sizes >= 1, got {hidden}")
        if not min_logvar < max_logvar:
            raise ValueError(f"need min_logvar < max_logvar, got {min_logvar}, {max_logvar}")
        self.obs_dim, self.act_dim = int(obs_dim), int(act_dim)
        self.target_dim = self.obs_dim + 1
        self.ensemble_size, self.num_elites = int(ensemble_size), int(num_elites)

        self.normalizer = Normalizer(self.obs_dim + self.act_dim)
        dims = [self.obs_dim + self.act_dim, *map(int, hidden)]
        layers: list[nn.Module] = []
        for d_in, d_out in zip(dims[:-1], dims[1:]):
            layers += [EnsembleLinear(self.ensemble_size, d_in, d_out), activation()]
        layers.append(EnsembleLinear(self.ensemble_size, dims[-1], 2 * self.target_dim))
        self.net = PyroModule[nn.Sequential](*layers)
        self.max_logvar = nn.Parameter(torch.full((self.target_dim,), float(max_logvar)))
        self.min_logvar = nn.Parameter(torch.full((self.target_dim,), float(min_logvar)))
        self.register_buffer("elite_idx", torch.arange(self.num_elites))
        self._optim: tuple[tuple, PyroOptim | torch.optim.Optimizer] | None = None

    def copy_from(self, other: "GaussianEnsemble") -> None:
        """Take ``other``'s weights, normaliser, log-variance bounds and elites in place (the
        parameter tensors stay this module's, so SVI keeps stepping them) and reset the
        optimiser. A warm start: a fit that follows moves this ensemble away from ``other``
        only as far as its data or weights ask (VMBPO's q_d started from p_theta)."""
        if (other.obs_dim, other.act_dim, other.ensemble_size, other.num_elites) != (
                self.obs_dim, self.act_dim, self.ensemble_size, self.num_elites):
            raise ValueError("copy_from needs an ensemble of the same dimensions, size and elites")
        self.load_state_dict(other.state_dict())
        self._optim = None

    def optimizer_state(self):
        """The fit's optimiser state (None before the first fit), for checkpoints."""
        return None if self._optim is None else (self._optim[0], self._optim[1].state_dict())

    def load_optimizer_state(self, state) -> None:
        """Restore :meth:`optimizer_state` (creating the optimiser of that setting first)."""
        if state is None:
            self._optim = None
            return
        key, optim_state = state
        self._step_function(key[1], key[2])
        self._optim[1].load_state_dict(optim_state)

    # -- shapes -------------------------------------------------------------------
    def _per_member(self, x: torch.Tensor, dim: int, what: str) -> torch.Tensor:
        """``x`` as ``[E, B, dim]``: broadcast a ``[B, dim]`` batch to every member."""
        x = torch.as_tensor(x, dtype=self.max_logvar.dtype, device=self.max_logvar.device)
        if x.dim() == 2 and x.shape[-1] == dim:
            return x.expand(self.ensemble_size, *x.shape)
        if x.dim() == 3 and x.shape[0] == self.ensemble_size and x.shape[-1] == dim:
            return x
        raise ValueError(f"{what} must have shape [B, {dim}] or [{self.ensemble_size}, B, {dim}], "
                         f"got {list(x.shape)}")

    def target(self, obs: torch.Tensor, next_obs: torch.Tensor, reward: torch.Tensor) -> torch.Tensor:
        """The modelled quantity ``[next_obs - obs, reward]``, ``[E, B, obs_dim + 1]``."""
        reward = torch.as_tensor(reward, dtype=self.max_logvar.dtype, device=self.max_logvar.device)
        if reward.dim() == torch.as_tensor(obs).dim() - 1:
            reward = reward.unsqueeze(-1)
        obs = self._per_member(obs, self.obs_dim, "obs")
        next_obs = self._per_member(next_obs, self.obs_dim, "next_obs")
        reward = self._per_member(reward, 1, "reward")
        if not obs.shape[:-1] == next_obs.shape[:-1] == reward.shape[:-1]:
            raise ValueError(f"obs, next_obs and reward batches differ: {list(obs.shape)}, "
                             f"{list(next_obs.shape)}, {list(reward.shape)}")
        return torch.cat([next_obs - obs, reward], dim=-1)

    # -- the network ----------------------------------------------------------------
    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and soft-clamped log-variance of the target, each ``[E, B, obs_dim + 1]``."""
        obs = self._per_member(obs, self.obs_dim, "obs")
        act = self._per_member(act, self.act_dim, "act")
        if obs.shape[1] != act.shape[1]:
            raise ValueError(f"obs and act batches differ: {list(obs.shape)} vs {list(act.shape)}")
        x = self.normalizer(torch.cat([obs, act], dim=-1))
        mean, raw_logvar = self.net(x).chunk(2, dim=-1)
        return mean, soft_clamp(raw_logvar, self.min_logvar, self.max_logvar)

    def forward_members(self, x: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance ``[k, m, obs_dim + 1]`` of the members ``members`` (``[k]``) on
        their own normalised-input rows ``x`` (``[k, m, obs_dim + act_dim]``, row block ``j`` through
        member ``members[j]``): one batched matmul per layer over ``k`` members, not all ``E``."""
        return self._forward_weights(x, self._member_weights(members))

    def _forward_weights(self, x: torch.Tensor, weights: list) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`forward_members` with the members' gathered weights (:meth:`_member_weights`)."""
        for layer, w in zip(self.net, weights):
            x = layer(x) if w is None else torch.baddbmm(w[1], x, w[0])
        mean, raw_logvar = x.chunk(2, dim=-1)
        return mean, soft_clamp(raw_logvar, self.min_logvar, self.max_logvar)

    def _member_weights(self, members: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """``(weight[members], bias[members])`` of each EnsembleLinear of :attr:`net` (None for the
        activations), read straight from the modules' parameters (no Pyro param messages: for
        predictions and densities, not for the SVI fit, which goes through :meth:`forward`)."""
        return [tuple(layer._parameters[k].index_select(0, members) for k in ("weight", "bias"))
                if isinstance(layer, EnsembleLinear) else None for layer in self.net]

    @torch.no_grad()
    def elite_weights(self) -> list[tuple[torch.Tensor, torch.Tensor] | None]:
        """:meth:`_member_weights` of the elites, without gradients, cached until a parameter or
        :attr:`elite_idx` changes: the key holds every one's version counter and storage, which
        any in-place write bumps (optimiser steps, ``load_state_dict``, :meth:`copy_from`;
        :class:`pplrl.nets.FusedAdam` bumps them for the fused kernel, which does not) and a
        copy of the module does not share. Between two model fits every prediction and
        density reads the same elites, so the gather runs once per fit, not per batch."""
        tensors = [self.elite_idx, *(layer._parameters[k] for layer in self.net if isinstance(layer, EnsembleLinear)
                                     for k in ("weight", "bias"))]
        key = tuple((t._version, t.data_ptr()) for t in tensors)
        cache = self.__dict__.get("_elite_weight_cache")
        if cache is None or cache[0] != key:
            cache = (key, self._member_weights(self.elite_idx))
            self.__dict__["_elite_weight_cache"] = cache
        return cache[1]

    def elite_rows(self, obs: torch.Tensor, act: torch.Tensor, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Each row through one elite member, drawn uniformly: ``(mean, logvar, member)``, ``[B, D]``,
        ``[B, D]``, ``[B]``. The batch is split over the elites (mbrl-lib's random-model
        propagation): a random permutation puts row ``i`` in one of ``k * ceil(B / k)`` slots, slot
        block ``j`` goes through elite ``j``, so each row's member is uniform over the ``k`` elites
        (as :meth:`step_from`'s draw) and the network does ``1 / E`` of :meth:`forward`'s work.
        Rows are not independent of each other (the blocks are balanced), only each row's
        distribution matters to the estimators that use them."""
        obs = torch.as_tensor(obs, dtype=self.max_logvar.dtype, device=self.max_logvar.device)
        act = torch.as_tensor(act, dtype=self.max_logvar.dtype, device=self.max_logvar.device)
        for name, x, width in (("obs", obs, self.obs_dim), ("act", act, self.act_dim)):
            if x.dim() != 2 or x.shape[-1] != width:
                raise ValueError(f"{name} must have shape [B, {width}], got {list(x.shape)}")
        if obs.shape[0] != act.shape[0]:
            raise ValueError(f"obs and act batches differ: {list(obs.shape)} vs {list(act.shape)}")
        batch, k = obs.shape[0], self.num_elites
        per = -(-batch // k)
        slots = torch.randperm(k * per, generator=generator, device=obs.device)[:batch]
        x = self.normalizer(torch.cat([obs, act], dim=-1))
        padded = x.new_zeros(k * per, x.shape[-1])
        padded[slots] = x
        # the cached elite weights carry no gradient: with gradients on, gather them afresh
        weights = self._member_weights(self.elite_idx) if torch.is_grad_enabled() else self.elite_weights()
        mean, logvar = self._forward_weights(padded.view(k, per, x.shape[-1]), weights)
        mean, logvar = (t.reshape(k * per, self.target_dim)[slots] for t in (mean, logvar))
        return mean, logvar, self.elite_idx[torch.div(slots, per, rounding_mode="floor")]

    def sample_member_dist(self, obs: torch.Tensor, act: torch.Tensor) -> dist.Normal:
        """Every member's predictive ``Normal(mean, std)`` of the target, batch shape
        ``[E, B, obs_dim + 1]`` (not ``.to_event``; differentiable)."""
        mean, logvar = self(obs, act)
        return dist.Normal(mean, (0.5 * logvar).exp())

    def log_prob(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor,
                 reward: torch.Tensor) -> torch.Tensor:
        """Per-member ``log p_theta(s', r | s, a)``, shape ``[E, B]`` (differentiable).

        The density is of the target ``[s' - s, r]``, which equals the density of
        ``(s', r)`` (the shift by ``s`` has unit Jacobian)."""
        return self.sample_member_dist(obs, act).log_prob(self.target(obs, next_obs, reward)).sum(-1)

    @pyro_method
    def logvar_bound_penalty(self) -> torch.Tensor:
        """mbrl-lib's ``0.01 * (sum max_logvar - sum min_logvar)``: keeps the bounds tight."""
        return LOGVAR_BOUND_PENALTY * (self.max_logvar.sum() - self.min_logvar.sum())

    # -- eq. (10) as a Pyro model ---------------------------------------------------
    @pyro_method
    def model(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor,
              reward: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """log p_theta(target | s, a) for every member and transition, weighted 1/B.

        The log-joint is ``(1/B) sum_{e, b} w_eb log N(target_eb; mean_eb, std_eb)
        - logvar_bound_penalty()``, so ``Trace_ELBO`` with the empty guide gives the
        loss ``sum_e J_e(theta) + penalty``, J_e the minibatch estimate of eq. (10)
        (``w = 1``), or of a weighted likelihood: with ``w = exp(TD)`` this is the
        forward-KL fit of the variational dynamics (VMBPO eq. 19, beta-VMBPO eq. 11)."""
        mean, logvar = self(obs, act)
        target = self.target(obs, next_obs, reward).expand_as(mean)
        n_members, batch = mean.shape[:2]
        # weights that underflowed to 0 are floored at 1e-30 (poutine.scale needs > 0)
        scale = 1.0 / batch if weight is None else weight.expand(n_members, batch).clamp_min(1e-30) / batch
        with pyro.plate("members", n_members, dim=-2), pyro.plate("data", batch, dim=-1), \
                poutine.scale(scale=scale):
            sample("target", None, dist.Normal(mean, (0.5 * logvar).exp()).to_event(1), obs=target, term="log_lik")
        factor("logvar_bound_penalty", None, -self.logvar_bound_penalty())

    def guide(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor,
              reward: torch.Tensor, weight: torch.Tensor | None = None) -> None:
        """Empty: the model has no latent sites, so SVI is maximum likelihood."""

    # -- training ---------------------------------------------------------------------
    def check_transitions(self, obs, act, next_obs, reward) -> tuple[torch.Tensor, ...]:
        """Validate a data set of ``N`` transitions and return it as float32 tensors
        ``obs [N, obs_dim], act [N, act_dim], next_obs [N, obs_dim], reward [N]``.
        Raises ValueError on empty data, wrong shapes or non-finite values."""
        names = ("obs", "act", "next_obs", "reward")
        data = [torch.as_tensor(x, dtype=torch.float32, device=self.max_logvar.device)
                for x in (obs, act, next_obs, reward)]
        obs, act, next_obs, reward = data
        if reward.dim() == 2 and reward.shape[-1] == 1:
            reward = reward.squeeze(-1)
        expected = {"obs": (obs, 2, self.obs_dim), "act": (act, 2, self.act_dim),
                    "next_obs": (next_obs, 2, self.obs_dim), "reward": (reward, 1, None)}
        for name, (x, ndim, width) in expected.items():
            if x.dim() != ndim or (width is not None and x.shape[-1] != width):
                shape = "[N]" if width is None else f"[N, {width}]"
                raise ValueError(f"{name} must have shape {shape}, got {list(x.shape)}")
        sizes = {name: x.shape[0] for name, x in zip(names, (obs, act, next_obs, reward))}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"obs, act, next_obs and reward hold different numbers of transitions: {sizes}")
        if sizes["obs"] == 0:
            raise ValueError("no transitions (empty data)")
        for name, x in zip(names, (obs, act, next_obs, reward)):
            bad = int((~torch.isfinite(x)).sum())
            if bad:
                raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf)")
        return obs, act, next_obs, reward

    def _step_function(self, lr: float, weight_decay: float) -> Callable[..., float]:
        """One SVI step on eq. (10): Adam with (coupled) weight decay on all parameters,
        as mbrl-lib's model trainer. The optimiser is kept across :meth:`fit` calls (so
        repeated fits warm-start) unless ``lr`` or ``weight_decay`` change.

        With Pyro's global param store this is ``pyro.infer.SVI(model, guide,
        pyro.optim.Adam, Trace_ELBO())``. Under ``pyro.settings.set(module_local_params=True)``
        Pyro 1.9's ``SVI`` cannot step plain ``nn.Parameter`` sites (it calls
        ``.unconstrained()`` on them), so the same loss, ``Trace_ELBO().differentiable_loss``,
        is stepped by ``torch.optim.Adam`` over :meth:`parameters` (Pyro's own recipe
        for modules, ``ELBO.__call__``). ``JitTrace_ELBO`` is not used: it gave the same
        loss but no measurable speed-up (a step is dominated by the batched matmuls), and
        tracing raises TracerWarnings."""
        local = bool(pyro.settings.get("module_local_params"))
        key = (local, float(lr), float(weight_decay))
        if self._optim is None or self._optim[0] != key:
            if local:
                optim = adam(self.parameters(), lr=lr, weight_decay=weight_decay)
            else:
                optim = pyro.optim.Adam({"lr": lr, "weight_decay": weight_decay})
            self._optim = (key, optim)
        optim, elbo = self._optim[1], Trace_ELBO(max_plate_nesting=2)
        if not local:
            return SVI(self.model, self.guide, optim, elbo).step

        def step(*batch: torch.Tensor) -> float:
            optim.zero_grad()
            loss = elbo.differentiable_loss(self.model, self.guide, *batch)
            loss.backward()
            optim.step()
            return float(loss.detach())
        return step

    def _check_svi_sees_parameters(self, *batch: torch.Tensor) -> None:
        """Raise unless the model's ``param`` sites are exactly this module's parameters
        (what SVI will step). They differ when Pyro's global param store already holds
        other tensors under this module's names, e.g. from another ensemble with the
        same ``name`` or a deep copy of this one."""
        with torch.no_grad(), poutine.trace(param_only=True) as tr:
            self.model(*batch)
        seen = {id(getattr(site["value"], "unconstrained", lambda v=site["value"]: v)())
                for site in tr.trace.nodes.values() if site["type"] == "param"}
        own = {id(p) for p in self.parameters()}
        if seen != own:
            raise RuntimeError(
                f"Pyro's param store holds other tensors under the parameter names of {self._pyro_name!r} "
                "(another module with the same name, or a copy of this one?), so SVI would not train "
                "this ensemble. Give each ensemble its own name=..., or call pyro.clear_param_store().")

    def fit(self, obs, act, next_obs, reward, *, epochs: int = 5, batch_size: int = 256,
            holdout: float = 0.2, lr: float = 1e-3, weight_decay: float = 5e-5, bootstrap: bool = True,
            seed: int | None = None, weights=None, elite_score: str = "mse") -> dict:
        """Maximum-likelihood fit of eq. (10) by SVI, then elite selection on hold-out data.

        Shuffles the ``N`` transitions and keeps ``int(holdout * N)`` of them aside;
        re-fits the normaliser on the training inputs; draws for every member its own
        bootstrap resample of the training set (``bootstrap=False``: the training set
        itself); runs ``epochs`` passes of ``SVI.step`` over minibatches of
        ``batch_size`` (each step sees ``[E, batch, ...]``, member ``e`` its own
        resample); then ranks members by hold-out MSE of the mean target and keeps the
        ``num_elites`` best in :attr:`elite_idx` (on the training data when the
        hold-out set is empty). As in beta-VMBPO (App. C.1) there is no early stopping.

        Defaults: lr 1e-3, weight decay 5e-5, 20 % hold-out, batch 256 (mbrl-lib's MBPO
        configuration). ``seed`` fixes the split, bootstrap and minibatch order (not the
        network initialisation).

        ``weights`` (``[N]``, >= 0) weight each transition's log-likelihood (a weighted
        maximum-likelihood fit, see :meth:`model`); each minibatch's weights are
        divided by their mean, so the step size does not depend on their scale.
        ``elite_score``: ``"mse"`` ranks members by the hold-out MSE of the mean (mbrl-lib);
        ``"weighted_nll"`` by the hold-out negative log-likelihood weighted by ``weights``
        (unweighted without them), the criterion the fit optimises (so a fit to a tilted
        distribution keeps the members that fit the tilt, not the least-tilted ones).

        Returns ``{"train_loss": [mean SVI loss per epoch], "holdout_mse": [per member],
        "elites": [indices, best first], "num_train", "num_holdout", "steps"}``.
        """
        obs, act, next_obs, reward = self.check_transitions(obs, act, next_obs, reward)
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=obs.dtype, device=obs.device).reshape(-1)
            if weights.shape[0] != obs.shape[0] or not torch.all(torch.isfinite(weights)) or torch.any(weights < 0):
                raise ValueError("weights must be finite, >= 0 and one per transition")
        if int(epochs) < 1 or int(batch_size) < 1:
            raise ValueError(f"epochs and batch_size must be >= 1, got {epochs}, {batch_size}")
        if not 0.0 <= holdout < 1.0:
            raise ValueError(f"holdout must lie in [0, 1), got {holdout}")
        if elite_score not in ("mse", "weighted_nll"):
            raise ValueError(f"elite_score must be 'mse' or 'weighted_nll', got {elite_score!r}")
        gen = torch.Generator(device=obs.device)
        gen.manual_seed(int(seed) if seed is not None else int(torch.randint(2**62, ()).item()))

        n = obs.shape[0]
        perm = torch.randperm(n, generator=gen, device=obs.device)
        n_hold = int(holdout * n)
        hold, train = perm[:n_hold], perm[n_hold:]
        n_train = train.numel()
        self.normalizer.reset()
        self.normalizer.update(torch.cat([obs[train], act[train]], dim=-1))
        if bootstrap:
            members = train[torch.randint(n_train, (self.ensemble_size, n_train), generator=gen)]
        else:
            members = train.expand(self.ensemble_size, n_train)

        svi_step = self._step_function(lr, weight_decay)
        epoch_losses, steps = [], 0
        for epoch in range(int(epochs)):
            order = torch.randperm(n_train, generator=gen, device=obs.device)
            total = 0.0
            for start in range(0, n_train, int(batch_size)):
                idx = members[:, order[start:start + int(batch_size)]]
                batch = (obs[idx], act[idx], next_obs[idx], reward[idx])
                if weights is not None:
                    w = weights[idx]
                    batch = (*batch, w / w.mean(-1, keepdim=True).clamp_min(1e-12))
                if steps == 0:
                    self._check_svi_sees_parameters(*batch)
                total += svi_step(*batch) * idx.shape[1]
                steps += 1
            epoch_losses.append(total / n_train)

        eval_idx = hold if n_hold > 0 else train
        if elite_score == "weighted_nll":
            w = weights[eval_idx] if weights is not None else torch.ones(eval_idx.numel(), device=obs.device)
            self.select_elites_by_likelihood(obs[eval_idx], act[eval_idx], next_obs[eval_idx], reward[eval_idx], w)
        mse = self.select_elites(obs[eval_idx], act[eval_idx], next_obs[eval_idx], reward[eval_idx],
                                 keep=elite_score == "weighted_nll")
        return {"train_loss": epoch_losses, "holdout_mse": mse.tolist(), "elites": self.elite_idx.tolist(),
                "num_train": n_train, "num_holdout": n_hold, "steps": steps}

    # -- elites ---------------------------------------------------------------------
    @torch.no_grad()
    def member_mse(self, obs, act, next_obs, reward) -> torch.Tensor:
        """Per-member mean squared error of the predicted mean target, ``[E]``
        (averaged over transitions and target dimensions; mbrl-lib's ``eval_score``)."""
        obs, act, next_obs, reward = self.check_transitions(obs, act, next_obs, reward)
        total = torch.zeros(self.ensemble_size, dtype=torch.float64, device=obs.device)
        for start in range(0, obs.shape[0], EVAL_CHUNK):
            chunk = slice(start, start + EVAL_CHUNK)
            mean, _ = self(obs[chunk], act[chunk])
            err = (mean - self.target(obs[chunk], next_obs[chunk], reward[chunk])).square()
            total += err.sum((1, 2)).to(torch.float64)
        return (total / (obs.shape[0] * self.target_dim)).to(obs.dtype)

    @torch.no_grad()
    def select_elites(self, obs, act, next_obs, reward, keep: bool = False) -> torch.Tensor:
        """Set :attr:`elite_idx` to the ``num_elites`` members of lowest :meth:`member_mse`
        on the given (hold-out) transitions, best first; returns the MSE ``[E]``.
        Members with a non-finite MSE rank last. ``keep``: only compute the MSE."""
        mse = self.member_mse(obs, act, next_obs, reward)
        if not keep:
            ranked = torch.argsort(torch.nan_to_num(mse, nan=math.inf), stable=True)
            self.elite_idx.copy_(ranked[:self.num_elites])
        return mse

    @torch.no_grad()
    def member_weighted_nll(self, obs, act, next_obs, reward, weights) -> torch.Tensor:
        """Per-member ``-sum_i w_i log p_e(s'_i, r_i | s_i, a_i) / sum_i w_i``, ``[E]``: the
        weighted fit's objective on the given transitions."""
        obs, act, next_obs, reward = self.check_transitions(obs, act, next_obs, reward)
        w = torch.as_tensor(weights, dtype=torch.float64, device=obs.device).reshape(-1)
        total = torch.zeros(self.ensemble_size, dtype=torch.float64, device=obs.device)
        for start in range(0, obs.shape[0], EVAL_CHUNK):
            chunk = slice(start, start + EVAL_CHUNK)
            lp = self.log_prob(obs[chunk], act[chunk], next_obs[chunk], reward[chunk]).to(torch.float64)
            total -= (lp * w[chunk]).sum(-1)
        return total / w.sum().clamp_min(1e-300)

    @torch.no_grad()
    def select_elites_by_likelihood(self, obs, act, next_obs, reward, weights) -> torch.Tensor:
        """Set :attr:`elite_idx` to the ``num_elites`` members of lowest
        :meth:`member_weighted_nll`, best first (non-finite last); returns the scores ``[E]``."""
        nll = self.member_weighted_nll(obs, act, next_obs, reward, weights)
        ranked = torch.argsort(torch.nan_to_num(nll, nan=math.inf), stable=True)
        self.elite_idx.copy_(ranked[:self.num_elites])
        return nll

    # -- prediction -------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, obs: torch.Tensor, act: torch.Tensor, *, deterministic: bool = False,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """One model step for a batch ``obs [B, obs_dim]``, ``act [B, act_dim]``.

        Stochastic (default; PETS' TS1 / MBPO's rollouts): each transition draws an
        elite member uniformly and samples the target from that member's Gaussian; only
        that member runs on the row (the batch is split over the elites, :meth:`elite_rows`).
        ``deterministic=True``: the average of the elites' means, no noise.

        Returns ``next_obs [B, obs_dim]`` (= obs + delta), ``reward [B]`` and ``info``
        with ``mean`` and ``var`` of the target ``[delta, reward]`` ``[B, obs_dim + 1]``
        (the chosen member's; or, deterministic, the elite mixture's mean and total
        variance = mean of variances + variance of means) and ``member [B]`` (the chosen
        member, -1 when deterministic).
        """
        obs = torch.as_tensor(obs, dtype=self.max_logvar.dtype, device=self.max_logvar.device)
        if obs.dim() != 2:
            raise ValueError(f"predict expects obs of shape [B, {self.obs_dim}], got {list(obs.shape)}")
        if deterministic:
            return self.step_from(obs, *self(obs, act), deterministic=True)
        # stochastic: only the row's own member runs (elite_rows), 1 / E of the full pass
        mean, logvar, member = self.elite_rows(obs, act, generator)
        return self.sample_rows(obs, mean, logvar, member, generator)

    @torch.no_grad()
    def sample_rows(self, obs: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, member: torch.Tensor,
                    generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """:meth:`predict`'s stochastic step from one member's ``(mean, logvar)`` per row
        (:meth:`elite_rows`): target ~ N(mean, exp(logvar))."""
        var = logvar.exp()
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        sample = mean + var.sqrt() * noise
        return obs + sample[:, :self.obs_dim], sample[:, self.obs_dim], {"mean": mean, "var": var, "member": member}

    @torch.no_grad()
    def step_from(self, obs: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, *, deterministic: bool = False,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
        """:meth:`predict` from an already computed ``(mean, logvar) = self(obs, act)``, so that
        a caller that also needs densities runs the network once."""
        var = logvar.exp()
        batch = obs.shape[0]
        if deterministic:
            elite_mean, elite_var = mean[self.elite_idx], var[self.elite_idx]
            m = elite_mean.mean(0)
            v = elite_var.mean(0) + elite_mean.var(0, unbiased=False)
            sample = m
            member = torch.full((batch,), -1, dtype=torch.long, device=obs.device)
        else:
            pick = torch.randint(self.num_elites, (batch,), generator=generator, device=obs.device)
            member = self.elite_idx[pick]
            rows = torch.arange(batch, device=obs.device)
            m, v = mean[member, rows], var[member, rows]
            noise = torch.randn(m.shape, generator=generator, dtype=m.dtype, device=m.device)
            sample = m + v.sqrt() * noise
        next_obs = obs + sample[:, :self.obs_dim]
        reward = sample[:, self.obs_dim]
        return next_obs, reward, {"mean": m, "var": v, "member": member}

    @torch.no_grad()
    def elite_mixture_log_density(self, obs: torch.Tensor, act: torch.Tensor, next_obs: torch.Tensor) -> torch.Tensor:
        """:meth:`elite_log_density` at ``(obs, act)``, running the elite members only."""
        obs = torch.as_tensor(obs, dtype=self.max_logvar.dtype, device=self.max_logvar.device)
        x = self.normalizer(torch.cat([obs, torch.as_tensor(act, dtype=obs.dtype, device=obs.device)], dim=-1))
        return self._mixture_log_density(obs, next_obs, *self._forward_weights(x.expand(self.num_elites, *x.shape),
                                                                              self.elite_weights()))

    @torch.no_grad()
    def elite_log_density(self, obs: torch.Tensor, next_obs: torch.Tensor, mean: torch.Tensor,
                          logvar: torch.Tensor) -> torch.Tensor:
        """``log (1/|elites|) sum_{e in elites} N(next_obs - obs; mean_e, var_e)`` over the state
        dimensions (reward marginalised), ``[B]``, from ``(mean, logvar) = self(obs, act)``."""
        return self._mixture_log_density(obs, next_obs, mean[self.elite_idx], logvar[self.elite_idx])

    def _mixture_log_density(self, obs, next_obs, mean, logvar) -> torch.Tensor:
        """log of the equal-weight mixture of the ``k`` members' Gaussians ``(mean, logvar)``
        (``[k, B, obs_dim + 1]``) at ``next_obs - obs``, state dimensions only, ``[B]``."""
        d = dist.Normal(mean[..., :self.obs_dim], (0.5 * logvar[..., :self.obs_dim]).exp())
        lp = d.log_prob((next_obs - obs).expand(mean.shape[0], *obs.shape)).sum(-1)
        return torch.logsumexp(lp, 0) - math.log(mean.shape[0])
