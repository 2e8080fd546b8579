"""Site names and ELBO terms: the one vocabulary of every model and guide.

**Names.** :func:`site` builds every site name: ``site("a", 3) == "a_3"``,
``site("bootstrap") == "bootstrap"``. A model and its guide call it with the same
arguments, so their sites line up (as ``"z_%d" % t`` does in Pyro's DMM example).

**Terms.** Each site contributes to one named term of the ELBO, and every ELBO in
:mod:`pplrl.elbo` reports its estimate term by term under these names. A site
declares its term with ``infer={"term": "<name>"}``, any name the author chooses;
:func:`sample` and :func:`factor` write that for you. The kinds the shipped models
use have documented defaults (:data:`DEFAULT_TERMS`)::

    kind        site         term          what the ELBO reports under the term
    "a"         a_t          kl_policy     E_q[log q_c(a_t|x_t) / pi(a_t|x_t)]
    "x"         x_t          kl_dynamics   E_q[log q_d(x_t|..) / p(x_t|..)]  (x_0: kl_initial)
    "opt"       opt_t        reward        E_q[scale * r_t]  (the optimality log-likelihood)
    "bootstrap" bootstrap    bootstrap     E_q[V(x_H)]

A site with **no declared term** (a plain ``pyro.sample`` or ``pyro.factor``) is its
own term: its name without a trailing ``_<step>`` index (``"behaviour"`` ->
``behaviour``, ``"cost_4"`` -> ``cost``, ``"a_replay"`` -> ``a_replay``). It is never
given a default term by accident: only the helpers below map a kind to a default.

The sign convention of a report: a term made of the model's **latent** sites is
reported as a KL, E_q[log q - log p] >= 0, which the ELBO subtracts; a term made of
**observed** sites and factors is reported as E_q[log p], which the ELBO adds. One
term cannot mix the two. A latent site's log p and log q enter the same term, the one
the *guide* declares: Pyro's ``replay`` hands the guide's ``infer`` dict to the model's
site. The helpers give model and guide the same default; a latent site with a term of
its own declares it in both (the guide's is the one that counts).

**Temperature.** Every model writes its temperature one way: the optimality factor
is ``scale * value`` with ``scale`` the *inverse* temperature (VMBPO's eta,
beta-VMBPO's 1/beta, SAC's 1/alpha, VIREL's 1/eps, Marino-Yue's 1/temperature), as
the papers write exp(eta r) and exp(r / beta). The ELBO is then in scaled units;
multiply it by the temperature for reward units (``RiskSensitiveELBO`` does this for
beta-VMBPO; the agents do it for their losses).
"""

from __future__ import annotations

import math
import re

import pyro
import pyro.distributions as dist
import torch

#: the smallest temperature a model uses (an eps -> 0 or alpha = 0 limit): at 1e-8 the
#: temperature-weighted ELBO equals its greedy limit to float precision
MIN_TEMPERATURE = 1e-8

#: the documented default term of each kind of site the shipped models use
DEFAULT_TERMS = {"a": "kl_policy", "x": "kl_dynamics", "opt": "reward", "bootstrap": "bootstrap"}

_STEP = re.compile(r"_\d+$")
_KIND = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


def site(kind: str, t: int | None = None) -> str:
    """The name of a site: ``kind_t``, or ``kind`` for a site outside time (``t`` None)."""
    if not isinstance(kind, str) or not _KIND.match(kind) or _STEP.search(kind):
        raise ValueError(f"a site kind is an identifier without a trailing _<number>, got {kind!r}")
    if t is None:
        return kind
    if isinstance(t, bool) or not isinstance(t, int) or t < 0:
        raise ValueError(f"the step of site {kind!r} must be an integer >= 0, got {t!r}")
    return f"{kind}_{t}"


def undeclared_term(name: str) -> str:
    """The term of a site that declares none: its name without a trailing ``_<step>``."""
    return _STEP.sub("", name)


def term_of(name: str, msg: dict) -> str:
    """The term of the site ``name`` whose trace entry is ``msg``."""
    term = (msg.get("infer") or {}).get("term")
    if term is None:
        return undeclared_term(name)
    if not isinstance(term, str) or not term:
        raise ValueError(f"site {name!r} declares term {term!r}; a term is a non-empty string")
    return term


def default_term(kind: str, t: int | None = None) -> str:
    """The term :func:`sample` and :func:`factor` give a site of ``kind`` that names none:
    :data:`DEFAULT_TERMS` (``x_0``, the initial state, is ``kl_initial``), else the kind."""
    if kind == "x" and t == 0:
        return "kl_initial"
    return DEFAULT_TERMS.get(kind, kind)


def sample(kind: str, t: int | None, fn, *, term: str | None = None, obs=None, infer: dict | None = None):
    """``pyro.sample(site(kind, t), fn, obs=obs)`` declaring its ELBO term
    (``term``, or :func:`default_term`). Other ``infer`` keys pass through."""
    infer = dict(infer or {})
    infer["term"] = term or default_term(kind, t)
    return pyro.sample(site(kind, t), fn, obs=obs, infer=infer)


def factor(kind: str, t: int | None, log_factor: torch.Tensor, *, term: str | None = None,
           infer: dict | None = None) -> None:
    """``pyro.factor(site(kind, t), log_factor)`` declaring its ELBO term (``pyro.factor``
    itself takes no ``infer``): an observed :class:`pyro.distributions.Unit` site, as
    ``pyro.factor`` writes it, with the term added."""
    unit = dist.Unit(log_factor)
    pyro.sample(site(kind, t), unit, obs=unit.sample(),
                infer={**(infer or {}), "is_auxiliary": True, "term": term or default_term(kind, t)})


def check_temperature(temperature: float | torch.Tensor) -> torch.Tensor:
    """A temperature as a tensor: finite and >= 0 (else ValueError), floored at :data:`MIN_TEMPERATURE`."""
    if not torch.is_tensor(temperature):  # a number is checked as a number (no device round trip)
        return torch.as_tensor(temperature_value(temperature), dtype=torch.get_default_dtype())
    t = torch.as_tensor(temperature, dtype=torch.get_default_dtype())
    if not torch.isfinite(t).all() or (t < 0).any():
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    return t.clamp_min(MIN_TEMPERATURE)


def temperature_value(temperature: float) -> float:
    """:func:`check_temperature` of a number, as a float."""
    t = float(temperature)
    if not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be finite and >= 0, got {temperature}")
    return max(t, MIN_TEMPERATURE)


def inverse_temperature(temperature: float | torch.Tensor) -> torch.Tensor:
    """The factor scale ``1 / temperature`` of :func:`optimality`, after :func:`check_temperature`."""
    return 1.0 / check_temperature(temperature)


def optimality(t: int | None, value: torch.Tensor, scale: float | torch.Tensor = 1.0, *,
               kind: str = "opt", term: str = "reward") -> None:
    """The optimality factor log p(O_t = 1 | ...) = ``scale * value``, ``scale`` the inverse
    temperature (see the module docstring): the one way every model writes it. The site
    also keeps ``value`` itself (``infer["value"]``, reward units), from which
    :func:`pplrl.elbo.soft_value` reads the per-state ELBO in reward units."""
    factor(kind, t, scale * value, term=term, infer={"value": value})


__all__ = ["DEFAULT_TERMS", "MIN_TEMPERATURE", "check_temperature", "inverse_temperature", "default_term", "factor",
           "optimality", "sample", "site", "term_of", "undeclared_term"]
