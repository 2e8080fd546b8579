"""Networks shared by models, guides and agents.

* :class:`MLP`: the fully connected net of every model and guide, a
  :class:`~pyro.nn.PyroModule` whose layers are ``PyroModule[nn.Linear]``, so SVI sees
  its parameters; :func:`soft_clamp`, mbrl-lib's smooth bound on log-variances;
* critics: plain torch modules with plain losses (:func:`mlp`, :class:`TwinQ`,
  :class:`VNetwork`), and Polyak-averaged targets.
"""

from __future__ import annotations

import contextlib
import copy
from typing import Iterator, Sequence

import pyro
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from pyro.poutine.block_messenger import BlockMessenger
from pyro.poutine.broadcast_messenger import BroadcastMessenger
from pyro.poutine.infer_config_messenger import InferConfigMessenger
from pyro.poutine.mask_messenger import MaskMessenger
from pyro.poutine.replay_messenger import ReplayMessenger
from pyro.poutine.runtime import _PYRO_STACK
from pyro.poutine.scale_messenger import ScaleMessenger
from pyro.poutine.subsample_messenger import SubsampleMessenger
from pyro.poutine.trace_messenger import TraceMessenger
from torch import nn


class FusedAdam(torch.optim.Adam):
    """``torch.optim.Adam(fused=True)`` that marks its parameters as modified in place.

    The fused kernel writes the parameters without bumping their version counters (the
    foreach and for-loop kernels do), so neither autograd's check against stepping a
    tensor that a pending backward saved, nor a cache keyed on versions
    (:meth:`models.dynamics.GaussianEnsemble.elite_weights`), would see the step."""

    def __init__(self, params, lr: float, **kwargs):
        super().__init__(params, lr=lr, fused=True, **kwargs)

    def step(self, closure=None):
        loss = super().step(closure)
        torch.autograd.graph.increment_version([p for g in self.param_groups for p in g["params"]])
        return loss


def adam(params, lr: float, **kwargs) -> torch.optim.Adam:
    """``torch.optim.Adam`` with PyTorch's fused kernel where the parameters allow it (floating
    tensors on the CPU or a GPU; :class:`FusedAdam`): the same update up to float rounding
    (1 ulp), one kernel over all tensors instead of a dozen passes per tensor. On this
    machine a dynamics fit's Adam step fell from 6.6 to 1.7 ms (7 x 4 x 200 x 200 weights,
    one thread)."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if bool(tensors) and all(p.dtype.is_floating_point and p.device.type in ("cpu", "cuda") for p in tensors):
        return FusedAdam(params, lr=lr, **kwargs)
    return torch.optim.Adam(params, lr=lr, **kwargs)


# handlers that do nothing with a param site of a module weight (no event_dim): they pass it on
_PARAM_NEUTRAL = (BroadcastMessenger, SubsampleMessenger, ScaleMessenger, MaskMessenger, BlockMessenger,
                  ReplayMessenger, InferConfigMessenger)


def params_unobserved() -> bool:
    """Whether no active Pyro handler reads or changes ``param`` sites: every handler on the
    stack is one of Pyro's that pass them on unchanged (plates, broadcast, scale, mask,
    block, replay, infer_config), a trace that records samples only in effect (not
    ``param_only``: SVI's parameter capture is one), or declares ``ignores_params = True``
    (:class:`pplrl.elbo._SiteRecorder`). Any other handler (substitute, lift, a user's own)
    makes this False."""
    for m in _PYRO_STACK:
        if isinstance(m, TraceMessenger):
            if m.param_only:
                return False
        elif not (isinstance(m, _PARAM_NEUTRAL) or getattr(m, "ignores_params", False)):
            return False
    return True


class MLP(PyroModule):
    """Fully connected network ``in_dim -> hidden... -> out_dim`` with ReLU activations
    (none after the output layer). Every layer is a ``PyroModule[nn.Linear]``."""

    def __init__(self, in_dim: int, out_dim: int, hidden: Sequence[int] = (256, 256),
                 activation: type[nn.Module] = nn.ReLU):
        super().__init__()
        dims = [int(in_dim), *map(int, hidden), int(out_dim)]
        layers: list[nn.Module] = []
        for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
            layers.append(PyroModule[nn.Linear](d_in, d_out))
            if i < len(dims) - 2:
                layers.append(activation())
        self.in_dim, self.out_dim = dims[0], dims[-1]
        self.layers = PyroModule[nn.Sequential](*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Where no active Pyro handler reads ``param`` sites (:func:`params_unobserved`), with
        module-local parameters and no Pyro prior on a weight, the same layers run as plain
        ``F.linear`` calls on the same parameters (:meth:`_plain_forward`): the PyroModule
        machinery (a param message per weight, a scope per layer) is pure overhead there,
        about 0.13 ms of a 0.44 ms policy forward on a batch of 256. Under SVI (whose
        ``param_only`` trace collects the parameters it steps) or any handler not known to
        ignore params, the PyroModule path runs, so SVI sees every parameter."""
        if params_unobserved() and self._plain_ok():
            return self._plain_forward(x)
        return super().__call__(x)

    def _plain_ok(self) -> bool:
        if not pyro.settings.get("module_local_params"):
            return False  # the global param store may hold other values than the modules
        return not any(m.__dict__.get("_pyro_samples") or m.__dict__.get("_pyro_params") for m in self.modules())

    def _plain_forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self._modules["layers"]._modules.values():
            if isinstance(layer, nn.Linear):
                x = F.linear(x, layer._parameters["weight"], layer._parameters["bias"])
            else:
                x = layer(x)
        return x


def soft_clamp(x: torch.Tensor, low: torch.Tensor | float, high: torch.Tensor | float) -> torch.Tensor:
    """Smooth clamp of ``x`` into (low, high), as mbrl-lib's Gaussian MLP does for its
    log-variance: ``high - softplus(high - x)``, then ``low + softplus(x - low)``.
    Close to the identity well inside the interval; gradients never vanish. The result
    lies in (low, high + log1p(exp(low - high))): the second step can overshoot ``high``
    by at most softplus(low - high) (0.011 for the defaults -5, 0.5), as in mbrl-lib."""
    x = high - F.softplus(high - x)
    return low + F.softplus(x - low)


def mlp(in_dim: int, out_dim: int, hidden: Sequence[int] = (256, 256)) -> nn.Sequential:
    """A plain ``nn.Sequential`` MLP (ReLU) for critics, which torch losses train, not SVI."""
    layers: list[nn.Module] = []
    d = in_dim
    for h in hidden:
        layers += [nn.Linear(d, h), nn.ReLU()]
        d = h
    layers.append(nn.Linear(d, out_dim))
    return nn.Sequential(*layers)


class TwinQ(nn.Module):
    """Two Q networks Q_1, Q_2(x, a); ``forward`` returns both, ``min`` their minimum."""

    def __init__(self, obs_dim: int, act_dim: int, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        self.q1 = mlp(obs_dim + act_dim, 1, hidden)
        self.q2 = mlp(obs_dim + act_dim, 1, hidden)

    def forward(self, obs: torch.Tensor, act: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.cat([obs, act], -1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def min(self, obs: torch.Tensor, act: torch.Tensor) -> torch.Tensor:
        return torch.minimum(*self(obs, act))


class VNetwork(nn.Module):
    def __init__(self, obs_dim: int, hidden: Sequence[int] = (256, 256)):
        super().__init__()
        self.v = mlp(obs_dim, 1, hidden)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        return self.v(obs).squeeze(-1)


@contextlib.contextmanager
def frozen(*modules: nn.Module) -> Iterator[None]:
    """Inside the block, the parameters of ``modules`` do not require gradients, so a graph
    built there has no gradient for them; they require them again after (the graph keeps
    what it recorded). For a loss that trains other parameters through these modules: the
    actor's loss through the critic. Without it the actor's backward also computes the
    critic's weight gradients, which the critic's next ``zero_grad`` throws away: 11 % of an
    SAC update's matmul FLOPs (``experiments/bench_update.py``), which stable-baselines3's
    SAC computes too."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def target_copy(net: nn.Module) -> nn.Module:
    """A frozen copy to serve as a Polyak-averaged target network."""
    target = copy.deepcopy(net)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


@torch.no_grad()
def polyak_update(net: nn.Module, target: nn.Module, tau: float) -> None:
    """target <- (1 - tau) target + tau net."""
    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must lie in (0, 1], got {tau}")
    for p, tp in zip(net.parameters(), target.parameters()):
        tp.lerp_(p, tau)
