"""The information-gain term of the generative agent's bound and the bound itself.

Marino & Yue (003_…) eq. (8), per step t::

    L_t = r_t + log p(x_t, r_t | z_<=t) - log p(x_t, r_t | z_<t)
              - log q(z_t | ...) / p(z_t | z_<t, a_<t) - log q(a_t | ...) / p(a_t | z_t)

The first log-likelihood is the emitter's density at the filtered sample z_t; the
second is a marginal over the prior transition, estimated by :func:`log_marginal_estimate`.
Their difference is the agent's *information gain* in (x_t, r_t).
The discriminative agent's bound is eq. (6): the same without the likelihood terms,
with p(z_t | z_<t, a_<t, x_<=t, r_<=t) a direct mapping.

:class:`POMDPELBO` computes either bound from the model/guide pair of
:mod:`models.pomdp` / :mod:`guides.pomdp` and reports every term.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Callable

import torch
from pyro.distributions.util import sum_rightmost
from pyro.infer.enum import get_importance_trace
from pyro.util import warn_if_nan
from torch.distributions import Distribution, kl_divergence


def check_samples(K: int) -> int:
    if isinstance(K, bool) or not isinstance(K, int) or K < 1:
        raise ValueError(f"the number of importance samples K must be an integer >= 1, got {K!r}")
    return K


def log_marginal_estimate(prior: Distribution, log_lik: Callable[[torch.Tensor], torch.Tensor], K: int) -> torch.Tensor:
    """``log (1/K) sum_k p(x | z_k)``, ``z_k ~ prior`` (reparameterised when the prior
    allows it): the importance-sampling estimate of ``log p(x | z_<t) = log E_prior p(x | z)``.

    ``prior`` has batch shape ``B`` (any) and the latent's event shape; ``log_lik`` maps
    latents of shape ``(K, *B, *event)`` to log-densities ``(K, *B)``. Returns shape ``B``.

    Bias. The average of the K likelihood weights is unbiased for p(x | z_<t), but its
    log is not: by Jensen, E[estimate] <= log p(x | z_<t), so the marginal is
    under-estimated and the information gain ``log p(x | z_t) - estimate`` is
    over-estimated. The gap is ``Var(w) / (2 K E[w]^2) + O(K^-2)`` (delta method, w the
    likelihood weight), i.e. it falls as 1/K; it is the gap of an importance-weighted
    bound (Burda et al. 2016), so E[estimate] rises monotonically in K towards the true
    value. With K = 1 the estimate is E_prior[log p(x | z)], the full Jensen gap. The
    prior is a poor proposal when (x, r) is informative: the relative variance of w grows
    roughly like exp(KL(posterior || prior)), so small K is most biased exactly where the
    information gain is large.
    """
    K = check_samples(K)
    z = prior.rsample((K,)) if prior.has_rsample else prior.sample((K,))
    lp = log_lik(z)
    return torch.logsumexp(lp, dim=0) - math.log(K)


#: which bound term each site prefix contributes to
SITE_TERMS = {"z": "kl_z", "a": "kl_a", "x": "log_lik_x", "r": "log_lik_r", "optimality": "reward",
              "marginal": "log_marginal"}


def site_term(name: str) -> str:
    prefix = name.rsplit("_", 1)[0]
    if prefix not in SITE_TERMS:
        raise ValueError(f"site {name!r} is not a site of the POMDP model (prefixes {sorted(SITE_TERMS)})")
    return SITE_TERMS[prefix]


class POMDPELBO:
    """Eq. (8) (``generative=True``) or eq. (6) of 003_… as a Pyro ELBO over a batch of
    windows, with per-term reporting.

    Latent sites (``z_t``, ``a_t``) contribute analytic KLs ``KL(q || p)`` at the guide's
    sample of the parents (the Rao-Blackwellised estimator TraceMeanField_ELBO uses;
    Monte Carlo ``log q - log p`` where no closed form exists); observed sites
    (``x_t``, ``r_t``) their log-likelihood; factors ``optimality_t`` the optimality
    log-likelihood r_t / temperature and ``marginal_t`` the negated marginal estimate
    ``-log p(x_t, r_t | z_<t)``.

    After each call :attr:`last_terms` holds per-window means (floats): ``reward``,
    ``log_lik`` (= ``log_lik_x + log_lik_r``), ``log_marginal``, ``info_gain``
    (= log_lik - log_marginal), ``kl_z``, ``kl_a``, ``elbo`` and ``model_evidence``
    (log_lik - kl_z, the sequential-VAE bound on log p(x, r)); the discriminative bound
    (eq. 6) reports only ``reward``, ``kl_z``, ``kl_a`` and ``elbo``.

    ``marginal_weight`` scales the marginal term in the *loss* only (the reported
    ``elbo`` is always the paper's): 1 is exactly -eq. (8); 0 gives
    -(reward + log_lik - kl_z - kl_a), eq. (8) plus log p(x, r | z_<t), i.e. the usual
    model-learning bound, which (unlike eq. 8 alone) rewards a model that predicts x and
    r. The paper notes eq. (8)'s marginal "may pose challenges" to optimise (Sec. 4).

    ``free_nats`` (not in the paper; PlaNet's "free nats", Hafner et al. 2019) replaces each
    step's batch-mean KL(q(z_t) || p(z_t | ...)) by max(KL_t, free_nats) in the *loss* only
    (the reported ``kl_z`` and ``elbo`` stay exact): below that many nats per step the KL
    has no gradient. Without it the amortised filter collapsed onto the prior on
    velocity-hidden Pendulum (q(z_t) = p(z_t), reconstruction error of (cos, sin) ~0.6 after
    thousands of updates: the model encoded |theta| for the reward but not the sign of
    theta, and so ignored the actions). 0 is exactly the bound.
    """

    def __init__(self, generative: bool = True, marginal_weight: float = 1.0, max_plate_nesting: int = 1,
                 free_nats: float = 0.0):
        if free_nats < 0:
            raise ValueError(f"free_nats must be >= 0, got {free_nats}")
        self.generative = bool(generative)
        self.free_nats = float(free_nats)
        self.marginal_weight = float(marginal_weight)
        self.max_plate_nesting = max_plate_nesting
        self.last_terms: dict[str, float] = {}
        self.last_latents: dict[str, torch.Tensor] = {}

    def term_tensors(self, model, guide, *args, **kwargs) -> dict[str, torch.Tensor]:
        """Differentiable per-window means of each term (one particle)."""
        return self._terms_and_kl_z_loss(model, guide, *args, **kwargs)[0]

    def _terms_and_kl_z_loss(self, model, guide, *args, **kwargs) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """:meth:`term_tensors` and the KL the loss uses: sum over steps of max(batch-mean
        KL_t, free_nats), which is ``kl_z`` itself when ``free_nats`` is 0."""
        model_trace, guide_trace = get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)
        latent = {n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
        guided = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
        if latent != guided:
            raise ValueError(f"model and guide sample sites do not match: model only {sorted(latent - guided)}, "
                             f"guide only {sorted(guided - latent)}")
        #: the guide's samples (with their graph), e.g. for a critic on the filtered states
        self.last_latents = {n: s["value"] for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
        terms: dict[str, torch.Tensor] = defaultdict(lambda: torch.zeros(()))
        kl_z_loss = torch.zeros(())  # sum over steps of max(batch-mean KL_t, free_nats)
        batch = None
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            term = site_term(name)
            if site["is_observed"]:
                lp = site["log_prob"]
                if term == "log_marginal":
                    lp = -lp  # the factor carries -log p(x, r | z_<t)
                terms[term] = terms[term] + lp.sum()
            else:
                g = guide_trace.nodes[name]
                try:
                    kl = kl_divergence(g["fn"], site["fn"])
                except NotImplementedError:
                    kl = g["fn"].log_prob(g["value"]) - site["fn"].log_prob(g["value"])
                kl = sum_rightmost(kl, kl.dim() - len(site["fn"].batch_shape)) if kl.dim() > len(site["fn"].batch_shape) else kl
                terms[term] = terms[term] + kl.sum()
                if term == "kl_z":
                    kl_z_loss = kl_z_loss + kl.mean().clamp_min(self.free_nats)
            if batch is None and site["fn"].batch_shape:
                batch = site["fn"].batch_shape[0]
        B = batch or 1
        out = {k: v / B for k, v in terms.items()}
        for k in ("reward", "log_lik_x", "log_lik_r", "log_marginal", "kl_z", "kl_a"):
            out.setdefault(k, torch.zeros(()))
        out["log_lik"] = out["log_lik_x"] + out["log_lik_r"]
        out["info_gain"] = out["log_lik"] - out["log_marginal"] if self.generative else torch.zeros(())
        out["elbo"] = out["reward"] + out["info_gain"] - out["kl_z"] - out["kl_a"]
        if self.generative:
            out["model_evidence"] = out["log_lik"] - out["kl_z"]
        else:  # eq. (6) has no likelihood terms
            for k in ("log_lik_x", "log_lik_r", "log_lik", "log_marginal", "info_gain"):
                out.pop(k)
        return out, kl_z_loss

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        t, kl_z_loss = self._terms_and_kl_z_loss(model, guide, *args, **kwargs)
        kl_z = t["kl_z"] if self.free_nats == 0 else kl_z_loss
        if self.generative:
            loss = -(t["reward"] + t["log_lik"] - self.marginal_weight * t["log_marginal"] - kl_z - t["kl_a"])
        else:
            loss = -(t["reward"] - kl_z - t["kl_a"])
        warn_if_nan(loss, "loss")
        self.last_terms = {k: float(v.detach()) for k, v in t.items()}
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))


__all__ = ["POMDPELBO", "SITE_TERMS", "check_samples", "log_marginal_estimate", "site_term"]
