"""Estimators of the marginal log p(x_t, r_t | z_<t) and of the information gain in
Marino & Yue's eq. (8) and eq. (10) (003_…), written so that the bound stays a bound.

Eq. (8) per step is ``r_t + log p(x_t, r_t | z_<=t) - log p(x_t, r_t | z_<t) - KL_z - KL_a``.
With the exact marginal, ``info_gain - KL_z = E_q[log p(x|z)] - log p(x|z_<t) - KL(q || p(z|z_<t))
= -KL(q(z_t) || p(z_t | x_t, r_t, z_<t)) <= 0``. The marginal is subtracted, so a lower
bound on L needs an estimate that is *high* on average (E[U] >= log p(x | z_<t)). The plain
K-sample average over prior draws (:func:`prior_log_marginal`, Burda et al. 2016) is *low*
on average (Jensen), which made the logged eq. (8) exceed the exact value (issue 19: +6.7
nats per step at K = 8 where the truth is <= 0).

:func:`contrastive_log_marginal` puts the posterior sample z_0 among the K prior
proposals (Foster et al. 2019's prior contrastive estimate; the "one exact posterior
sample" upper bound of Grosse et al. 2015)::

    U_K = log (1/(K+1)) [ p(x | z_0) + sum_{k=1..K} p(x | z_k) ],  z_0 ~ posterior, z_k ~ p(z | z_<t)

E[U_K] >= log p(x | z_<t) for every K >= 0 when z_0 is an exact posterior sample (U_K's
expectation is log p(x) plus the KL between the symmetrised extended target and the
proposal), and it falls to log p(x | z_<t) as K grows; the information gain estimate
``log p(x | z_0) - U_K`` is then a lower bound on the true gain and never exceeds
log(K + 1). In learning, z_0 is the guide's sample: the guarantee is exact when q is the
model's posterior (tested against a Kalman filter, tests/test_infogain.py); for a
mode-seeking q (narrower than the posterior, the usual VI error) p(x | z_0) is larger
than under the posterior, which errs on the conservative side (measured there too).

:func:`pooled_info_gain` is the planner's belief-level version: P particles of the belief
and one observation drawn per particle; each particle's observation is scored against all
P particles, i.e. the same contrastive estimate with the other particles as proposals, a
lower bound on the mutual information between state and observation under the particle
belief (<= log P). It is large where the belief is spread (or the ensemble members
disagree) *and* the observation can tell the particles apart.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch.distributions import Distribution


def _check_K(K: int, minimum: int = 1) -> int:
    if isinstance(K, bool) or not isinstance(K, int) or K < minimum:
        raise ValueError(f"the number of importance samples K must be an integer >= {minimum}, got {K!r}")
    return K


def log_mean_exp(x: torch.Tensor, dim: int = 0) -> torch.Tensor:
    return torch.logsumexp(x, dim=dim) - math.log(x.shape[dim])


def _draw(prior: Distribution, K: int) -> torch.Tensor:
    return prior.rsample((K,)) if prior.has_rsample else prior.sample((K,))


def prior_log_marginal(prior: Distribution, log_lik: Callable[[torch.Tensor], torch.Tensor], K: int) -> torch.Tensor:
    """``log (1/K) sum_k p(x | z_k)``, z_k ~ prior: E <= log p(x) (a lower estimate; the
    estimator the bound used before issue 19). Shape: the prior's batch shape."""
    _check_K(K)
    return log_mean_exp(log_lik(_draw(prior, K)), 0)


def contrastive_log_marginal(prior: Distribution, log_lik: Callable[[torch.Tensor], torch.Tensor],
                             log_lik_post: torch.Tensor, K: int) -> torch.Tensor:
    """``U_K = log (1/(K+1)) [p(x | z_0) + sum_k p(x | z_k)]``, z_k ~ prior, given
    ``log_lik_post = log p(x | z_0)`` (z_0 the posterior sample, batch shape of the prior).
    E[U_K] >= log p(x) when z_0 is an exact posterior sample (module docstring). K = 0
    gives log p(x | z_0), the loosest upper estimate."""
    _check_K(K, minimum=0)
    if K == 0:
        return log_lik_post
    lp = torch.cat([log_lik_post[None], log_lik(_draw(prior, K))], 0)
    return log_mean_exp(lp, 0)


def pooled_info_gain(log_lik: torch.Tensor) -> torch.Tensor:
    """Belief-level information gain from ``log_lik[..., i, j] = log p(x_i | z_j)``, x_i drawn
    from particle i: ``mean_i [log p(x_i | z_i) - log (1/P) sum_j p(x_i | z_j)]`` over the
    last two dims (P x P). A lower bound on I(z; x) under the P-particle belief, at most log P."""
    P = log_lik.shape[-1]
    if log_lik.shape[-2] != P:
        raise ValueError(f"pooled_info_gain needs a square [..., P, P] matrix, got {tuple(log_lik.shape)}")
    own = torch.diagonal(log_lik, dim1=-2, dim2=-1)
    return (own - log_mean_exp(log_lik, -1)).mean(-1)


__all__ = ["contrastive_log_marginal", "log_mean_exp", "pooled_info_gain", "prior_log_marginal"]
