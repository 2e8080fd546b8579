"""ELBOs of RL-as-inference, computed by Pyro from a model/guide pair.

:class:`OptimalityELBO` is VMBPO's J(q; pi) (000_…, eq. 4)::

    J(q; pi) = E_q[ sum_t eta r_t - log q_c(a_t|x_t)/pi(a_t|x_t) - log q_d(x_{t+1}|x_t,a_t)/p(x_{t+1}|x_t,a_t) ]

It is :class:`pyro.infer.TraceEnum_ELBO` with one change: the Dice expectation is
taken separately for each group of sites (rewards, actions, next states, bootstrap),
so every step reports its terms at no extra sampling cost. Guide sites marked for
parallel enumeration are summed exactly (tabular guides); other sites are sampled
(reparameterised where possible, score-function otherwise), as in TraceEnum_ELBO.

:class:`RiskSensitiveELBO` is the risk-sensitive bound of beta-VMBPO (001_…, eq. 7)::

    E_q[sum_t r_t] - beta KL(q || p_pi) = beta * J(q; pi) with factors r / beta,

i.e. the same model/guide pair run with ``beta`` (factor ``r / beta``) and the loss
multiplied by ``beta``. It passes ``beta`` to the model and guide itself.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict, defaultdict

import torch
from pyro.infer import TraceEnum_ELBO
from pyro.infer.traceenum_elbo import _find_ordinal
from pyro.infer.util import Dice
from pyro.ops import packed
from pyro.util import warn_if_nan

from models.trajectory import site_term
from pplrl.tabular import check_positive


def check_site_match(model_trace, guide_trace) -> None:
    """Raise if the model's latent sites and the guide's sites differ (by name)."""
    latent = {n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
    guided = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
    if latent != guided:
        raise ValueError(
            "model and guide sample sites do not match: "
            f"in the model but not the guide {sorted(latent - guided)}, "
            f"in the guide but not the model {sorted(guided - latent)}")


class OptimalityELBO(TraceEnum_ELBO):
    """VMBPO's ELBO (eq. 4) with per-term reporting.

    After every ``loss``, ``loss_and_grads`` or ``differentiable_loss`` call,
    :attr:`last_terms` holds floats:

    * ``reward``: E_q[sum_t scale * r_t] (scale = eta, or 1/beta),
    * ``kl_policy``: E_q[sum_t log q_c/pi], ``kl_dynamics``: E_q[sum_t log q_d/p],
    * ``bootstrap``: E_q[V(x_H)] when the model has a terminal value,
    * ``elbo``: reward + bootstrap - kl_policy - kl_dynamics (+ any other sites).
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1, **kwargs):
        kwargs.setdefault("strict_enumeration_warning", False)
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs)
        self.last_terms: dict[str, float] = {}

    def _get_trace(self, model, guide, args, kwargs):
        # Pyro's validation only warns about unmatched sites; here it is an error.
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="Found (non-auxiliary )?vars in", category=UserWarning)
            try:
                model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
            except UserWarning as w:
                raise ValueError(f"model and guide sample sites do not match: {w}") from None
        check_site_match(model_trace, guide_trace)
        return model_trace, guide_trace

    # -- the one piece of new machinery ---------------------------------------
    @staticmethod
    def particle_terms(model_trace, guide_trace) -> dict[str, torch.Tensor]:
        """Differentiable Dice expectation of each group of log-density terms."""
        ordering = {name: _find_ordinal(trace, site)
                    for trace in (model_trace, guide_trace)
                    for name, site in trace.nodes.items() if site["type"] == "sample"}
        costs: dict[str, OrderedDict] = defaultdict(OrderedDict)
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if name not in guide_trace.nodes and site["infer"].get("_enumerate_dim") is not None:
                raise NotImplementedError(
                    f"OptimalityELBO does not enumerate model site {name!r}; enumerate it in the guide")
            costs[site_term(name)].setdefault(ordering[name], []).append(site["packed"]["log_prob"])
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample":
                costs[site_term(name)].setdefault(ordering[name], []).append(packed.neg(site["packed"]["log_prob"]))
        dice = Dice(guide_trace, ordering)
        return {term: torch.as_tensor(dice.compute_expectation(c)) for term, c in costs.items()}

    def _terms(self, model, guide, args, kwargs) -> dict[str, torch.Tensor]:
        totals: dict[str, torch.Tensor] = defaultdict(float)
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            for term, value in self.particle_terms(model_trace, guide_trace).items():
                totals[term] = totals[term] + value / self.num_particles
        if not totals:
            raise ValueError("the model has no sample or factor sites")
        return dict(totals)

    def _record(self, terms: dict[str, torch.Tensor], factor: float = 1.0) -> torch.Tensor:
        elbo = sum(terms.values())
        terms = {k: float(v.detach()) for k, v in terms.items()}
        report = {
            "reward": factor * float(terms.get("reward", 0.0)),
            "kl_policy": -float(terms.get("policy", 0.0)),
            "kl_dynamics": -float(terms.get("dynamics", 0.0)),
        }
        if "bootstrap" in terms:
            report["bootstrap"] = factor * float(terms["bootstrap"])
        if "other" in terms:
            report["other"] = factor * float(terms["other"])
        report["elbo"] = factor * float(elbo.detach())
        self.last_terms = report
        return elbo

    # -- the ELBO interface ------------------------------------------------------
    def _prepare(self, kwargs):
        return kwargs

    def _factor(self) -> float:
        return 1.0

    def differentiable_loss(self, model, guide, *args, **kwargs) -> torch.Tensor:
        kwargs = self._prepare(kwargs)
        elbo = self._record(self._terms(model, guide, args, kwargs), self._factor())
        loss = -self._factor() * elbo
        warn_if_nan(loss, "loss")
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        with torch.no_grad():
            return float(self.differentiable_loss(model, guide, *args, **kwargs))

    def loss_and_grads(self, model, guide, *args, **kwargs) -> float:
        loss = self.differentiable_loss(model, guide, *args, **kwargs)
        if loss.requires_grad:
            loss.backward()
        return float(loss.detach())

    def terms(self, model, guide, *args, **kwargs) -> dict[str, float]:
        """The ELBO and its terms (floats), without gradients."""
        self.loss(model, guide, *args, **kwargs)
        return dict(self.last_terms)


class RiskSensitiveELBO(OptimalityELBO):
    """beta-VMBPO's risk-sensitive ELBO (eq. 7): E_q[sum r] - beta KL(q || p_pi).

    Reported terms: ``reward`` = E_q[sum r] (unscaled), ``kl_policy``,
    ``kl_dynamics`` (unscaled KLs), ``elbo`` = reward - beta (kl_policy + kl_dynamics).
    """

    def __init__(self, beta: float, **kwargs):
        check_positive("beta", beta)
        super().__init__(**kwargs)
        self.beta = float(beta)

    def _prepare(self, kwargs):
        if kwargs.get("eta") is not None:
            raise ValueError("RiskSensitiveELBO scales rewards by 1/beta; do not pass eta")
        if kwargs.get("beta", self.beta) != self.beta:
            raise ValueError(f"RiskSensitiveELBO has beta={self.beta} but the call passed beta={kwargs['beta']}")
        return {**kwargs, "beta": self.beta}

    def _factor(self) -> float:
        return self.beta


class ReparamOptimalityELBO(OptimalityELBO):
    """The same ELBO and term report for models whose latent sites are all
    reparameterised (continuous actions and states), via plain Monte Carlo.

    It skips TraceEnum's Dice bookkeeping (nothing is enumerated, no score-function
    terms are needed), which makes it the cheap choice for per-update actor losses.
    A guide site without ``rsample`` raises, since its gradient would be missing.
    """

    def _get_trace(self, model, guide, args, kwargs):
        from pyro.infer.enum import get_importance_trace

        model_trace, guide_trace = get_importance_trace("flat", self.max_plate_nesting, model, guide, args, kwargs)
        check_site_match(model_trace, guide_trace)
        return model_trace, guide_trace

    def _get_traces(self, model, guide, args, kwargs):
        if self.vectorize_particles:
            guide = self._vectorized_num_particles(guide)
            model = self._vectorized_num_particles(model)
        for _ in range(1 if self.vectorize_particles else self.num_particles):
            yield self._get_trace(model, guide, args, kwargs)

    def _terms(self, model, guide, args, kwargs) -> dict[str, torch.Tensor]:
        totals: dict[str, torch.Tensor] = defaultdict(float)
        n = 1 if self.vectorize_particles else self.num_particles
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            for name, site in model_trace.nodes.items():
                if site["type"] == "sample":
                    totals[site_term(name)] = totals[site_term(name)] + site["log_prob_sum"] / n
            for name, site in guide_trace.nodes.items():
                if site["type"] == "sample":
                    if not site["fn"].has_rsample:
                        raise ValueError(f"guide site {name!r} is not reparameterisable; use OptimalityELBO")
                    totals[site_term(name)] = totals[site_term(name)] - site["log_prob_sum"] / n
        if self.vectorize_particles:
            totals = {k: v / self.num_particles for k, v in totals.items()}
        return dict(totals)
