"""ELBOs of RL-as-inference, computed by Pyro from a model/guide pair, term by term.

Every ELBO here is a Pyro ELBO built the way Pyro builds its own: it subclasses
:class:`~pyro.infer.Trace_ELBO`, :class:`~pyro.infer.TraceEnum_ELBO` or
:class:`~pyro.infer.TraceMeanField_ELBO` and overrides the hooks ``_get_trace``
(site checks) and ``_differentiable_loss_particle`` (one particle's estimate, term by
term); the particle loop is :class:`~pyro.infer.Trace_ELBO`'s own. So each works
unchanged with ``pyro.infer.SVI(model, guide, optim, elbo)``, with
``elbo.differentiable_loss(model, guide, *args)`` and as ``elbo(model, guide)``, an
:class:`~pyro.infer.elbo.ELBOModule` for a torch optimiser.

**Terms.** Sites declare the term they contribute to (:mod:`models.sites`). After
each call, :attr:`last_terms` holds floats keyed by the terms that appeared: a term
of latent sites as a KL, E_q[log q - log p]; a term of observed sites and factors as
E_q[log p]; and ``elbo``, their sum with the KLs subtracted.

* :class:`OptimalityELBO` is VMBPO's J(q; pi) (000_…, eq. 4)::

      J(q; pi) = E_q[ sum_t eta r_t - log q_c(a_t|x_t)/pi(a_t|x_t) - log q_d(x_{t+1}|x_t,a_t)/p(x_{t+1}|x_t,a_t) ]

  with enumeration: guide sites marked for parallel enumeration are summed exactly
  (tabular guides), others sampled, as in TraceEnum_ELBO, whose Dice expectation is
  taken per term.
* :class:`RiskSensitiveELBO` is beta-VMBPO's bound (001_…, eq. 7)::

      E_q[sum_t r_t] - beta KL(q || p_pi) = beta * J(q; pi) with factors r / beta.

* :class:`ReparamOptimalityELBO`: the same terms for fully reparameterised guides by
  plain Monte Carlo (Trace_ELBO): the cheap choice for per-update actor losses.
* :class:`POMDPELBO`: Marino & Yue's bounds (003_…, eq. 8 generative, eq. 6
  discriminative) over windows, with analytic KLs (TraceMeanField_ELBO).
"""

from __future__ import annotations

import warnings

import torch
from pyro import poutine
from pyro.distributions.util import is_identically_zero, scale_and_mask
from pyro.infer import Trace_ELBO, TraceEnum_ELBO, TraceMeanField_ELBO
from pyro.infer import is_validation_enabled as infer_validation_enabled

# _find_ordinal (private): the plate ordinal of a site in a packed trace, which Dice
# needs to take a per-term expectation; TraceEnum_ELBO computes it the same way, and
# Pyro exposes no public equivalent.
from pyro.infer.traceenum_elbo import _find_ordinal
from pyro.infer.util import Dice, torch_item
from pyro.ops import packed
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from pyro.util import warn_if_nan
from torch.distributions import kl_divergence

from models.sites import term_of
from pplrl.tabular import check_positive

LATENT, OBSERVED = "latent", "observed"


def check_site_match(model_trace, guide_trace) -> None:
    """Raise if the model's latent sites and the guide's sites differ (by name)."""
    latent = {n for n, s in model_trace.nodes.items() if s["type"] == "sample" and not s["is_observed"]}
    guided = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
    if latent != guided:
        raise ValueError(
            "model and guide sample sites do not match: "
            f"in the model but not the guide {sorted(latent - guided)}, "
            f"in the guide but not the model {sorted(guided - latent)}")


def _mismatch(name: str, guided) -> ValueError:
    return ValueError(f"model and guide sample sites do not match: the model's latent site {name!r} "
                      f"is not in the guide (the guide's sites: {sorted(guided)})")


class _RequireGuided(Messenger):
    """Stops at the first latent model site that the guide does not sample, naming it (else the
    model would try to sample it itself: an improper prior cannot, and fails far from the cause)."""

    def __init__(self, guided: set[str]):
        super().__init__()
        self.guided = guided

    def _pyro_sample(self, msg):
        if not msg["is_observed"] and msg["name"] not in self.guided and not site_is_subsample(msg):
            raise _mismatch(msg["name"], self.guided)


def replay_model(model, guide_trace, *args, **kwargs):
    """The model's trace replayed against ``guide_trace``; a latent model site the guide lacks
    is a clear error naming both sides' sites."""
    guided = {n for n, s in guide_trace.nodes.items() if s["type"] == "sample" and not site_is_subsample(s)}
    with _RequireGuided(guided):
        return poutine.trace(poutine.replay(model, trace=guide_trace)).get_trace(*args, **kwargs)


class _SiteRecorder(Messenger):
    """The sample sites of one run of a model or guide (name -> message, plates' subsample
    sites left out), without building Pyro's trace graph: what :func:`soft_value` needs, at a
    fraction of ``poutine.trace`` + ``poutine.replay``'s cost (it runs in every critic update).
    With ``replay`` (a guide's sites) it replays them as :class:`pyro.poutine.ReplayMessenger`
    does, and a latent site the guide lacks is the site-mismatch error."""

    ignores_params = True  # param sites pass through untouched (pplrl.nets.params_unobserved)

    def __init__(self, replay: dict | None = None):
        super().__init__()
        self.replay, self.sites = replay, {}

    def _pyro_sample(self, msg):
        if self.replay is None or msg["is_observed"] or site_is_subsample(msg):
            return
        guide_msg = self.replay.get(msg["name"])
        if guide_msg is None:
            raise _mismatch(msg["name"], self.replay)
        msg["value"], msg["infer"], msg["done"] = guide_msg["value"], guide_msg["infer"], True

    def _pyro_post_sample(self, msg):
        if not site_is_subsample(msg):
            self.sites[msg["name"]] = msg


def _explain_mismatch(model, guide, args, kwargs) -> None:
    """After a failure inside an ELBO's traces: raise the site mismatch if that was the cause
    (and nothing else: any other failure of this second look leaves the original error)."""
    try:
        guide_trace = poutine.trace(guide).get_trace(*args, **kwargs)
        model_trace = replay_model(model, guide_trace, *args, **kwargs)
        check_site_match(model_trace, guide_trace)
    except ValueError as e:
        if "do not match" in str(e):
            raise
    except Exception:  # noqa: BLE001 - the caller re-raises its own error
        pass


def site_terms(model_trace) -> dict[str, tuple[str, str]]:
    """name -> (term, 'latent' | 'observed') for the model's sample sites; a term that
    mixes latent and observed sites is an error (its sign in the report would be ambiguous)."""
    out, kinds = {}, {}
    for name, msg in model_trace.nodes.items():
        if msg["type"] != "sample":
            continue
        term, kind = term_of(name, msg), OBSERVED if msg["is_observed"] else LATENT
        if kinds.setdefault(term, (kind, name))[0] != kind:
            raise ValueError(f"term {term!r} mixes latent site {name if kind == LATENT else kinds[term][1]!r} and "
                             f"observed site {kinds[term][1] if kind == LATENT else name!r}; give them different terms")
        out[name] = (term, kind)
    return out


def soft_value(model, guide, temperature: float | torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """The per-state ELBO of a model/guide pair in reward units, one sample per state::

        V(x) = sum_opt value_opt(x, a) - temperature * sum_latent [log q(z) - log p(z)],   z ~ q

    for a model over a batch of states in one plate: the optimality sites
    (:func:`models.sites.optimality`, whose factor is ``value / temperature``) contribute
    their value, every latent site its log-ratio; observed data sites (e.g. a behaviour
    likelihood) are not part of a state's value. This is the soft value a critic target
    needs (for SAC's flat prior: Q'(x, a) - alpha log q(a|x)), read from the same pair the
    actor maximises, so the two cannot drift apart. At temperature 0 it is the expected
    optimality value alone (no log-ratio is computed). Returns the batch-shaped tensor."""
    with _SiteRecorder() as guide_run:
        guide(*args, **kwargs)
    with _SiteRecorder(replay=guide_run.sites) as model_run:
        model(*args, **kwargs)
    latent = [name for name, site in model_run.sites.items() if not site["is_observed"]]
    if len(latent) != len(guide_run.sites):
        unmatched = sorted(set(guide_run.sites) - set(latent))
        raise ValueError(f"model and guide sample sites do not match: in the guide but not the model {unmatched}")
    value = log_ratio = None
    for name, site in model_run.sites.items():
        if site["is_observed"]:
            v = site["infer"].get("value")
            if v is not None:
                value = v if value is None else value + v
            continue
        if _is_zero(temperature):
            continue
        g = guide_run.sites[name]
        r = g["fn"].log_prob(g["value"]) - site["fn"].log_prob(site["value"])
        log_ratio = r if log_ratio is None else log_ratio + r
    if value is None:
        raise ValueError("the model has no optimality site (models.sites.optimality) to take a soft value from")
    return value if log_ratio is None else value - temperature * log_ratio


def _is_zero(temperature) -> bool:
    return not torch.is_tensor(temperature) and temperature == 0


class _NamedTerms:
    """What the ELBOs below share: the site checks, the per-term report and Pyro's
    particle loop. A subclass supplies :meth:`_term_estimates` (one particle's
    differentiable estimate of each term's contribution to the ELBO)."""

    #: the report's factor: the ELBO in the model's units times this (beta for RiskSensitiveELBO)
    factor: float = 1.0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.last_terms: dict[str, float] = {}

    # -- Pyro's hooks --------------------------------------------------------------
    def _get_trace(self, model, guide, args, kwargs):
        # Pyro's validation only warns about unmatched sites; here it is an error.
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message="Found (non-auxiliary )?vars in", category=UserWarning)
            try:
                model_trace, guide_trace = super()._get_trace(model, guide, args, kwargs)
            except UserWarning as w:
                raise ValueError(f"model and guide sample sites do not match: {w}") from None
            except NotImplementedError:  # e.g. a model site the guide lacks, with a prior that cannot sample
                _explain_mismatch(model, guide, args, kwargs)  # raises if the sites differ
                raise
        check_site_match(model_trace, guide_trace)
        return model_trace, guide_trace

    def _get_traces(self, model, guide, args, kwargs):
        kwargs = self._model_kwargs(kwargs)
        self._sums: dict[str, torch.Tensor] = {}
        self._kinds: dict[str, str] = {}
        yield from super()._get_traces(model, guide, args, kwargs)
        if not self._sums:
            raise ValueError("the model has no sample or factor sites")
        self.last_terms = self._report({k: float(v) for k, v in self._sums.items()})

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        estimates = self._term_estimates(model_trace, guide_trace)
        self._accumulate(estimates)
        surrogate = -self.factor * sum(estimates.values())
        return torch_item(surrogate), surrogate

    # Pyro's particle loop: Trace_ELBO's, driven by the hook above. (TraceEnum_ELBO has
    # its own loop without a per-particle hook; its enumeration lives in _get_traces.)
    loss_and_grads = Trace_ELBO.loss_and_grads

    def differentiable_loss(self, model, guide, *args, **kwargs):
        """Trace_ELBO's ``differentiable_loss``. With Pyro's validation off (pplrl's agents after
        their first update, ``pyro_validation``) the same loop without its NaN warning (a
        backward hook and a sync, which Pyro adds whatever the validation setting) and without
        re-adding the float loss to the surrogate, whose value it already is: the same value
        and gradient, ~0.2 ms less per actor update (the agents check their losses themselves)."""
        if infer_validation_enabled():
            return Trace_ELBO.differentiable_loss(self, model, guide, *args, **kwargs)
        loss = 0.0
        for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
            loss = loss + self._differentiable_loss_particle(model_trace, guide_trace)[1] / self.num_particles
        return loss

    def loss(self, model, guide, *args, **kwargs) -> float:
        """The loss (-factor * ELBO) as a float, without building a graph."""
        loss = 0.0
        with torch.no_grad():
            for model_trace, guide_trace in self._get_traces(model, guide, args, kwargs):
                loss += self._differentiable_loss_particle(model_trace, guide_trace)[0] / self.num_particles
        warn_if_nan(loss, "loss")
        return loss

    def terms(self, model, guide, *args, **kwargs) -> dict[str, float]:
        """The ELBO and its terms (floats), without gradients."""
        self.loss(model, guide, *args, **kwargs)
        return dict(self.last_terms)

    # -- the report ----------------------------------------------------------------
    def _model_kwargs(self, kwargs: dict) -> dict:
        """The keyword arguments model and guide receive (hook; RiskSensitiveELBO adds beta)."""
        return kwargs

    def _accumulate(self, estimates: dict[str, torch.Tensor], kinds: dict[str, str] | None = None) -> None:
        for term, value in estimates.items():
            self._sums[term] = self._sums.get(term, 0.0) + value.detach() / self.num_particles
        self._kinds.update(kinds or self._particle_kinds)

    def _report(self, sums: dict[str, float]) -> dict[str, float]:
        """Observed terms times :attr:`factor`, latent terms as KLs, and ``elbo``."""
        report = {term: -v if self._kinds[term] == LATENT else self.factor * v for term, v in sums.items()}
        report["elbo"] = self.factor * sum(sums.values())
        return report


class OptimalityELBO(_NamedTerms, TraceEnum_ELBO):
    """VMBPO's ELBO (eq. 4) with per-term reporting; enumerated guide sites are summed
    exactly, the rest sampled (TraceEnum_ELBO's Dice estimator, taken per term).

    With the trajectory model's default terms, :attr:`last_terms` holds ``reward``
    (E_q[sum_t scale * r_t], scale = eta or 1/beta), ``kl_policy``, ``kl_dynamics``,
    ``kl_initial`` (0: model and guide share p0), ``bootstrap`` when the model has a
    terminal value, and ``elbo``.
    """

    def __init__(self, num_particles: int = 1, max_plate_nesting: int = 1, **kwargs):
        kwargs.setdefault("strict_enumeration_warning", False)
        super().__init__(num_particles=num_particles, max_plate_nesting=max_plate_nesting, **kwargs)

    def _term_estimates(self, model_trace, guide_trace) -> dict[str, torch.Tensor]:
        """Differentiable Dice expectation of each term's log-density costs."""
        terms = site_terms(model_trace)
        self._particle_kinds = dict(terms.values())
        ordering = {name: _find_ordinal(trace, site)
                    for trace in (model_trace, guide_trace)
                    for name, site in trace.nodes.items() if site["type"] == "sample"}
        costs: dict[str, dict] = {}
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            if name not in guide_trace.nodes and site["infer"].get("_enumerate_dim") is not None:
                raise NotImplementedError(
                    f"OptimalityELBO does not enumerate model site {name!r}; enumerate it in the guide")
            costs.setdefault(terms[name][0], {}).setdefault(ordering[name], []).append(site["packed"]["log_prob"])
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample":
                costs[terms[name][0]].setdefault(ordering[name], []).append(packed.neg(site["packed"]["log_prob"]))
        dice = Dice(guide_trace, ordering)
        return {term: torch.as_tensor(dice.compute_expectation(c)) for term, c in costs.items()}


class RiskSensitiveELBO(OptimalityELBO):
    """beta-VMBPO's risk-sensitive ELBO (eq. 7): E_q[sum r] - beta KL(q || p_pi).

    It runs the model with ``beta`` (factors ``r / beta``) and multiplies by beta:
    reported ``reward`` = E_q[sum r] (unscaled), KLs unscaled, ``elbo`` =
    reward - beta (kl_policy + kl_dynamics); the loss is -elbo.
    """

    def __init__(self, beta: float, **kwargs):
        check_positive("beta", beta)
        super().__init__(**kwargs)
        self.beta = self.factor = float(beta)

    def _model_kwargs(self, kwargs):
        if kwargs.get("eta") is not None:
            raise ValueError("RiskSensitiveELBO scales rewards by 1/beta; do not pass eta")
        if kwargs.get("beta", self.beta) != self.beta:
            raise ValueError(f"RiskSensitiveELBO has beta={self.beta} but the call passed beta={kwargs['beta']}")
        return {**kwargs, "beta": self.beta}


class ReparamOptimalityELBO(_NamedTerms, Trace_ELBO):
    """The same terms for models whose latent sites are all reparameterised
    (continuous actions and states), by plain Monte Carlo: no enumeration and no
    score-function terms. A guide site without ``rsample`` raises, since its gradient
    would be missing."""

    def _term_estimates(self, model_trace, guide_trace) -> dict[str, torch.Tensor]:
        terms = site_terms(model_trace)
        self._particle_kinds = dict(terms.values())
        out: dict[str, torch.Tensor] = {}
        for name, site in model_trace.nodes.items():
            if site["type"] == "sample":
                term = terms[name][0]
                out[term] = out.get(term, 0.0) + site["log_prob_sum"]
        for name, site in guide_trace.nodes.items():
            if site["type"] == "sample":
                if not site["fn"].has_rsample:
                    raise ValueError(f"guide site {name!r} is not reparameterisable; use OptimalityELBO")
                term = terms[name][0]
                out[term] = out[term] - site["log_prob_sum"]
        return out


class POMDPELBO(_NamedTerms, TraceMeanField_ELBO):
    """Marino & Yue's bound over a batch of windows (003_…): eq. (8) with the model of
    :func:`models.pomdp.pomdp_model` (``generative=True``) or eq. (6) with the
    discriminative one, per step t::

        L_t = r_t + log p(x_t, r_t | z_<=t) - log p(x_t, r_t | z_<t)
                  - log q(z_t | ...) / p(z_t | z_<t, a_<t) - log q(a_t | ...) / p(a_t | z_t)

    Latent sites contribute analytic KLs KL(q || p) at the guide's sample of their
    parents (TraceMeanField_ELBO's Rao-Blackwellised estimator; Monte Carlo log q - log p
    where no closed form exists), under the sites' scale and mask. Terms are per-window
    means: ``reward``, ``log_lik_x``, ``log_lik_r``, ``neg_log_marginal`` (the factor
    -log p(x_t, r_t | z_<t)), ``kl_z``, ``kl_a``; the report adds ``log_lik``,
    ``log_marginal``, ``info_gain`` (= log_lik - log_marginal), ``model_evidence``
    (log_lik - kl_z, the sequential-VAE bound on log p(x, r)) and ``elbo``.

    The marginal log p(x_t, r_t | z_<t) comes from the model's estimate (the guide's z_t among K
    prior proposals, :mod:`pplrl.infogain`), which is high on average, so ``neg_log_marginal``
    is low and the reported ``elbo`` is a lower bound on eq. (8)'s value (tests/test_infogain.py
    checks it against a Kalman filter).

    ``marginal_weight`` scales the marginal term in the *loss* only (the reported
    ``elbo`` is always the paper's): 1 is exactly -eq. (8); 0 gives eq. (8) plus
    log p(x, r | z_<t), the usual model-learning bound, which (unlike eq. 8 alone)
    rewards a model that predicts x and r (the paper notes eq. 8's marginal "may pose
    challenges" to optimise, Sec. 4).

    ``free_nats`` (not in the paper; PlaNet's free nats, Hafner et al. 2019) replaces each
    step's batch-mean KL(q(z_t) || p(z_t | ...)) by max(KL_t, free_nats) in the *loss*
    only: below that many nats per step the KL has no gradient; without it the amortised
    filter collapsed onto the prior on velocity-hidden Pendulum. 0 is exactly the bound.

    :attr:`last_latents` holds the guide's samples (with their graph) of the last call.
    """

    def __init__(self, generative: bool = True, marginal_weight: float = 1.0, max_plate_nesting: int = 1,
                 free_nats: float = 0.0, **kwargs):
        if free_nats < 0:
            raise ValueError(f"free_nats must be >= 0, got {free_nats}")
        super().__init__(max_plate_nesting=max_plate_nesting, **kwargs)
        self.generative = bool(generative)
        self.free_nats = float(free_nats)
        self.marginal_weight = float(marginal_weight)
        self.last_latents: dict[str, torch.Tensor] = {}

    def _differentiable_loss_particle(self, model_trace, guide_trace):
        terms = site_terms(model_trace)
        self.last_latents = {n: s["value"] for n, s in guide_trace.nodes.items() if s["type"] == "sample"}
        out: dict[str, torch.Tensor] = {}
        free_kl = torch.zeros(())  # sum over steps of max(batch-mean KL_t, free_nats) - KL_t
        batch = None
        for name, site in model_trace.nodes.items():
            if site["type"] != "sample":
                continue
            term, kind = terms[name]
            if kind == OBSERVED:
                value = site["log_prob_sum"]
            else:
                g = guide_trace.nodes[name]
                try:
                    kl = scale_and_mask(kl_divergence(g["fn"], site["fn"]), scale=g["scale"], mask=g["mask"])
                except NotImplementedError:
                    kl = scale_and_mask(g["fn"].log_prob(g["value"]) - site["fn"].log_prob(g["value"]),
                                        scale=g["scale"], mask=g["mask"])
                if is_identically_zero(kl):
                    kl = torch.zeros(())
                value = -kl.sum()
                if term == "kl_z" and self.free_nats > 0:
                    free_kl = free_kl + kl.mean().clamp_min(self.free_nats) - kl.mean()
            out[term] = out.get(term, 0.0) + value
            if batch is None and site["fn"].batch_shape:
                batch = site["fn"].batch_shape[0]
        B = batch or 1
        estimates = {k: v / B for k, v in out.items()}
        self._accumulate(estimates, dict(terms.values()))
        surrogate = sum(estimates.values())
        if "neg_log_marginal" in estimates:
            surrogate = surrogate + (self.marginal_weight - 1.0) * estimates["neg_log_marginal"]
        surrogate = -(surrogate - free_kl)
        return torch_item(surrogate), surrogate

    def _report(self, sums):
        report = super()._report(sums)
        if self.generative:
            for k in ("reward", "log_lik_x", "log_lik_r", "neg_log_marginal", "kl_z", "kl_a"):
                report.setdefault(k, 0.0)
            report["log_lik"] = report["log_lik_x"] + report["log_lik_r"]
            report["log_marginal"] = -report["neg_log_marginal"]
            report["info_gain"] = report["log_lik"] - report["log_marginal"]
            report["model_evidence"] = report["log_lik"] - report["kl_z"]
        return report


__all__ = ["OptimalityELBO", "POMDPELBO", "ReparamOptimalityELBO", "RiskSensitiveELBO", "check_site_match",
           "site_terms", "soft_value"]
