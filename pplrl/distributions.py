"""Distributions shared by models and guides: the tanh-squashed Gaussian of bounded
actions, and its deterministic action."""

from __future__ import annotations

import pyro.distributions as dist
import torch
from torch.distributions.transforms import AffineTransform
from torch.distributions.transforms import TanhTransform as _TorchTanhTransform


class ClampedTanhTransform(_TorchTanhTransform):
    """``y = tanh(x)``, whose inverse clamps ``y`` into [-1 + eps, 1 - eps] first.

    torch's :class:`~torch.distributions.transforms.TanhTransform` already uses the
    stable ``log|dy/dx| = 2 (log 2 - x - softplus(-2x))`` (finite for any x) but
    returns ``atanh(+-1) = +-inf`` for values on the boundary; here they get a finite
    log-density instead of NaN.
    """

    def _inverse(self, y: torch.Tensor) -> torch.Tensor:
        eps = torch.finfo(y.dtype).eps
        return torch.atanh(y.clamp(-1.0 + eps, 1.0 - eps))


class TanhNormal(dist.TransformedDistribution):
    """``y = mid + half * tanh(u)``, ``u ~ Normal(loc, scale).to_event(1)``: a Gaussian
    squashed into the box [low, high] (per dimension; ``mid, half = (high + low) / 2,
    (high - low) / 2``). Reparameterised (``rsample``); the event is the action vector.

    ``log_prob(y) = log N(u; loc, scale) - sum_i [log half_i + log(1 - tanh(u_i)^2)]``
    with ``u = atanh((y - mid) / half)`` recomputed from ``y`` for *every* value, its own
    samples included. The transforms keep no cache: torch's default (``cache_size=1``)
    hands back the exact pre-squash ``u`` of the last sample, so log q(a) of a sample and
    log pi(a) of the same action under another TanhNormal (which re-inverts tanh in float
    precision) disagreed badly for a saturated sample (docs/notes.md, 'distributions:
    TanhNormal cache'). Without the cache a density is a function of the action alone.
    :attr:`mode` (= :attr:`mean_action`) is the deterministic action ``mid + half *
    tanh(loc)``, the usual SAC evaluation action (not the true mode or mean of the squashed
    density).
    """

    arg_constraints = {"loc": dist.constraints.real, "scale": dist.constraints.positive}
    has_rsample = True

    def __init__(self, loc: torch.Tensor, scale: torch.Tensor,
                 low: torch.Tensor | float = -1.0, high: torch.Tensor | float = 1.0,
                 validate_args: bool | None = None):
        loc, scale = torch.broadcast_tensors(torch.as_tensor(loc), torch.as_tensor(scale))
        if loc.dim() < 1:
            raise ValueError("TanhNormal needs at least one event dimension (the action vector)")
        low = torch.as_tensor(low, dtype=loc.dtype, device=loc.device)
        high = torch.as_tensor(high, dtype=loc.dtype, device=loc.device)
        if torch.any(high <= low):
            raise ValueError("TanhNormal needs low < high in every dimension")
        self.low, self.high = low, high
        base = dist.Normal(loc, scale, validate_args=validate_args).to_event(1)
        transforms = [ClampedTanhTransform(cache_size=0),
                      AffineTransform((high + low) / 2, (high - low) / 2, event_dim=1, cache_size=0)]
        super().__init__(base, transforms, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TanhNormal, _instance)
        new.low, new.high = self.low, self.high
        return super().expand(batch_shape, _instance=new)

    @property
    def loc(self) -> torch.Tensor:
        """Location of the Gaussian before squashing."""
        return self.base_dist.base_dist.loc

    @property
    def scale(self) -> torch.Tensor:
        """Scale of the Gaussian before squashing."""
        return self.base_dist.base_dist.scale

    @property
    def mode(self) -> torch.Tensor:
        return (self.high + self.low) / 2 + (self.high - self.low) / 2 * torch.tanh(self.loc)

    @property
    def mean_action(self) -> torch.Tensor:
        """The deterministic action ``mid + half * tanh(loc)`` (same as :attr:`mode`)."""
        return self.mode


def gaussian_mode(d) -> torch.Tensor:
    """Deterministic action of a Gaussian policy's distribution: ``TanhNormal.mode``,
    or the mean of a (possibly ``.to_event``) Normal."""
    if isinstance(d, TanhNormal):
        return d.mode
    return d.mean


def detached(d):
    """A copy of a policy distribution (TanhNormal or Normal.to_event(1)) with detached parameters."""
    if isinstance(d, TanhNormal):
        return TanhNormal(d.loc.detach(), d.scale.detach(), d.low, d.high)
    if isinstance(d, dist.Independent) and isinstance(d.base_dist, dist.Normal):
        return dist.Normal(d.base_dist.loc.detach(), d.base_dist.scale.detach()).to_event(d.reinterpreted_batch_ndims)
    raise TypeError(f"no detached copy for {type(d).__name__}")


__all__ = ["ClampedTanhTransform", "TanhNormal", "detached", "gaussian_mode"]
