"""Distributions shared by models and guides: the tanh-squashed Gaussian of bounded
actions, and its deterministic action."""

from __future__ import annotations

import math

import pyro.distributions as dist
import torch
import torch.nn.functional as F
from torch.distributions.transforms import TanhTransform as _TorchTanhTransform
from torch.distributions.utils import _standard_normal

_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)
#: attribute of a TanhNormal sample: (u, low, high, the sample's version when drawn)
_PRE_SQUASH = "_pplrl_pre_squash"


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


class TanhNormal(dist.TorchDistribution):
    """``y = mid + half * tanh(u)``, ``u ~ Normal(loc, scale).to_event(1)``: a Gaussian
    squashed into the box [low, high] (per dimension; ``mid, half = (high + low) / 2,
    (high - low) / 2``). Reparameterised (``rsample``); the event is the action vector.

    ``log_prob(y) = sum_i [log N(u_i; loc_i, scale_i) - log half_i - log(1 - tanh(u_i)^2)]``.
    For a sample of any TanhNormal with the same bounds, ``u`` is the sample's exact pre-squash
    value, kept on the sample tensor (:func:`pre_squash`); for any other action (from replay, a
    copy, a sample changed in place) it is ``atanh((y - mid) / half)``, with ``(y - mid) / half``
    clamped into [-1 + eps, 1 - eps] so that an action on the bounds has a finite density.
    ``log(1 - tanh(u)^2)`` is computed as ``2 (log 2 - u - softplus(-2u))``, finite for any ``u``
    (torch's TanhTransform's form).

    Why the exact ``u``: float32 cannot invert tanh where it saturates (every ``|u|`` above about
    8.3 reads back as 8.3), and a policy whose scale has reached the log-std floor (e^-20) prices the
    recomputed ``u``'s error at ``(du / scale)^2 / 2`` nats: a HalfCheetah-v5 MBPO run with
    ``loc = 67`` found log q(a) = -4e20 and stopped with an infinite critic loss
    (docs/notes.md, 'distributions: TanhNormal cache'). SAC's reference code, stable-baselines3
    and CleanRL all score a sample at its own ``u``. Why on the sample rather than in the
    distribution (torch's transform cache): log q(a) of q's sample and log pi(a) of the same
    action under another policy pi must use the same ``u``, or q = pi gives log q/pi of 1e4
    nats instead of 0 (VMBPO's ratio).

    Written out rather than as a ``TransformedDistribution`` of two transforms: the same
    numbers (tests/test_continuous_guides.py checks them against the hand formula), at
    about a third of the cost per construction and per ``log_prob`` (every actor, critic
    target and value step builds several). :attr:`mode` (= :attr:`mean_action`) is the
    deterministic action ``mid + half * tanh(loc)``, the usual SAC evaluation action (not
    the true mode or mean of the squashed density).
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
        # an argument check, so skipped like torch's own when validation is off (a sync per build)
        validate = torch.distributions.Distribution._validate_args if validate_args is None else validate_args
        if validate and torch.any(high <= low):
            raise ValueError("TanhNormal needs low < high in every dimension")
        self.loc, self.scale, self.low, self.high = loc, scale, low, high
        self._mid = self._half = None
        super().__init__(loc.shape[:-1], loc.shape[-1:], validate_args=validate_args)

    def _mid_half(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(high + low) / 2`` and ``(high - low) / 2``, computed once per instance."""
        if self._mid is None:
            self._mid, self._half = (self.high + self.low) / 2, (self.high - self.low) / 2
        return self._mid, self._half

    @property
    def support(self):
        return dist.constraints.independent(dist.constraints.interval(self.low, self.high), 1)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(TanhNormal, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.scale = self.scale.expand(batch_shape + self.event_shape)
        new.low, new.high = self.low, self.high
        new._mid = new._half = None
        super(TanhNormal, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        eps = _standard_normal(self._extended_shape(sample_shape), dtype=self.loc.dtype, device=self.loc.device)
        mid, half = self._mid_half()
        u = self.loc + eps * self.scale
        y = mid + half * torch.tanh(u)
        setattr(y, _PRE_SQUASH, (u, self.low, self.high, y._version))
        return y

    def sample(self, sample_shape=torch.Size()) -> torch.Tensor:
        with torch.no_grad():
            return self.rsample(sample_shape)

    def _same_bounds(self, low: torch.Tensor, high: torch.Tensor) -> bool:
        """The same bound tensors (one policy's), or equal ones (a copy's: a host sync)."""
        if low is self.low and high is self.high:
            return True
        try:
            torch.broadcast_shapes(low.shape, self.low.shape, high.shape, self.high.shape)
        except RuntimeError:
            return False
        return low.device == self.low.device and bool(torch.all(low == self.low) & torch.all(high == self.high))

    def _pre_squash(self, value: torch.Tensor) -> torch.Tensor:
        """``u`` with ``value = mid + half tanh(u)``: the sample's own (:func:`pre_squash`) where
        it was drawn under these bounds, else recomputed by a clamped atanh."""
        kept = _kept(value)
        if kept is not None and self._same_bounds(kept[1], kept[2]):
            return kept[0]
        mid, half = self._mid_half()
        eps = torch.finfo(value.dtype).eps
        return torch.atanh(((value - mid) / half).clamp(-1.0 + eps, 1.0 - eps))

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        mid, half = self._mid_half()
        u = self._pre_squash(value)
        normal = -((u - self.loc) ** 2) / (2 * self.scale ** 2) - self.scale.log() - _LOG_SQRT_2PI
        log_dtanh = 2.0 * (math.log(2.0) - u - F.softplus(-2.0 * u))
        return (normal - log_dtanh - half.log()).sum(-1)

    @property
    def mode(self) -> torch.Tensor:
        return (self.high + self.low) / 2 + (self.high - self.low) / 2 * torch.tanh(self.loc)

    @property
    def mean_action(self) -> torch.Tensor:
        """The deterministic action ``mid + half * tanh(loc)`` (same as :attr:`mode`)."""
        return self.mode


def _kept(value: torch.Tensor) -> tuple | None:
    """A sample's (u, low, high, version) while it is unchanged since drawn, else None."""
    kept = getattr(value, _PRE_SQUASH, None)
    if kept is None or kept[3] != value._version or kept[0].shape != value.shape:
        return None
    return kept


def pre_squash(value: torch.Tensor) -> torch.Tensor | None:
    """The exact pre-squash ``u`` of a :class:`TanhNormal` sample, or None for any other tensor
    (or a sample changed in place since it was drawn; copies and ``detach()`` do not keep it)."""
    kept = _kept(value)
    return None if kept is None else kept[0]


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


__all__ = ["ClampedTanhTransform", "TanhNormal", "detached", "gaussian_mode", "pre_squash"]
