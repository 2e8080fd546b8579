"""The one site vocabulary (models/sites.py): names, declared and undeclared terms, and
every ELBO's report keyed by whatever terms the model uses."""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from models.sites import DEFAULT_TERMS, default_term, factor, optimality, sample, site, undeclared_term
from pplrl.elbo import OptimalityELBO, ReparamOptimalityELBO, RiskSensitiveELBO

ELBOS = [ReparamOptimalityELBO, OptimalityELBO]


def test_site_names_and_their_errors():
    assert site("a", 3) == "a_3" and site("bootstrap") == "bootstrap" and site("behaviour", 0) == "behaviour_0"
    for bad in ("", "a_3", "3a", "a b", None):
        with pytest.raises(ValueError, match="site kind"):
            site(bad, 0)
    for bad_t in (-1, 1.5, True):
        with pytest.raises(ValueError, match="step"):
            site("a", bad_t)


def test_default_and_undeclared_terms():
    assert default_term("a", 2) == DEFAULT_TERMS["a"] == "kl_policy"
    assert default_term("x", 0) == "kl_initial" and default_term("x", 1) == "kl_dynamics"
    assert default_term("behaviour") == "behaviour"
    # a site that declares nothing is its own term: never a default by accident
    assert undeclared_term("a_replay") == "a_replay" and undeclared_term("x_prior") == "x_prior"
    assert undeclared_term("cost_4") == "cost" and undeclared_term("behaviour") == "behaviour"


def user_model(obs, loc):
    """A user's objective: an action with the default term, a latent of their own (declared),
    one undeclared latent, an observed behaviour site (undeclared) and two factors."""
    with pyro.plate("states", obs.shape[0]):
        a = sample("a", 0, dist.Normal(0.0, 1.0).expand([obs.shape[0]]))
        sample("skill", 0, dist.Normal(0.0, 2.0).expand([obs.shape[0]]), term="kl_skill")
        pyro.sample("a_replay", dist.Normal(0.0, 1.0).expand([obs.shape[0]]))
        pyro.sample("behaviour", dist.Normal(a, 1.0), obs=obs)
        optimality(0, -a ** 2, 0.5)
        factor("cost", 0, -0.1 * a.abs(), term="penalty")


def user_guide(obs, loc):
    with pyro.plate("states", obs.shape[0]):
        sample("a", 0, dist.Normal(loc, 0.5).expand([obs.shape[0]]))
        sample("skill", 0, dist.Normal(loc, 1.0).expand([obs.shape[0]]), term="kl_skill")
        pyro.sample("a_replay", dist.Normal(-loc, 1.0).expand([obs.shape[0]]))


def normal_kl(m1, s1, m2, s2):
    return math.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5


@pytest.mark.parametrize("elbo_cls", ELBOS)
def test_report_is_keyed_by_the_models_terms_with_closed_form_kls(elbo_cls):
    obs, loc = torch.zeros(4), torch.tensor(0.3)
    elbo = elbo_cls(num_particles=20_000, vectorize_particles=True, max_plate_nesting=1)
    terms = elbo.terms(user_model, user_guide, obs, loc)
    assert set(terms) == {"kl_policy", "kl_skill", "a_replay", "behaviour", "reward", "penalty", "elbo"}
    n = obs.shape[0]
    assert terms["kl_policy"] == pytest.approx(n * normal_kl(0.3, 0.5, 0.0, 1.0), rel=0.03)
    assert terms["kl_skill"] == pytest.approx(n * normal_kl(0.3, 1.0, 0.0, 2.0), rel=0.03)
    assert terms["a_replay"] == pytest.approx(n * normal_kl(-0.3, 1.0, 0.0, 1.0), rel=0.05)  # not kl_policy
    # E_q[log N(0; a, 1)] with a ~ N(0.3, 0.5): -0.5 log 2 pi - (0.3^2 + 0.25) / 2
    assert terms["behaviour"] == pytest.approx(n * (-0.5 * math.log(2 * math.pi) - 0.17), rel=0.01)
    assert terms["reward"] == pytest.approx(n * 0.5 * -(0.09 + 0.25), rel=0.02)
    kls = terms["kl_policy"] + terms["kl_skill"] + terms["a_replay"]
    assert terms["elbo"] == pytest.approx(terms["behaviour"] + terms["reward"] + terms["penalty"] - kls, rel=1e-4)


def test_a_term_that_mixes_latent_and_observed_sites_is_an_error():
    def model():
        sample("a", 0, dist.Normal(0.0, 1.0), term="mixed")
        sample("y", 0, dist.Normal(0.0, 1.0), obs=torch.tensor(0.5), term="mixed")

    def guide():
        sample("a", 0, dist.Normal(0.0, 1.0), term="mixed")

    with pytest.raises(ValueError, match="term 'mixed' mixes latent site 'a_0' and observed site 'y_0'"):
        ReparamOptimalityELBO().loss(model, guide)


def test_risk_sensitive_report_scales_observed_terms_only():
    """beta * J: observed terms and the elbo in reward units, KLs unscaled."""
    def model(beta=None):
        a = sample("a", 0, dist.Categorical(probs=torch.tensor([0.5, 0.5])))
        optimality(0, torch.tensor([1.0, 3.0])[a], 1.0 / beta)

    def guide(beta=None):
        sample("a", 0, dist.Categorical(probs=torch.tensor([0.2, 0.8])), infer={"enumerate": "parallel"})

    beta = 2.0
    terms = RiskSensitiveELBO(beta, max_plate_nesting=0).terms(model, guide)
    kl = 0.2 * math.log(0.4) + 0.8 * math.log(1.6)
    assert terms["reward"] == pytest.approx(0.2 * 1.0 + 0.8 * 3.0, abs=1e-6)
    assert terms["kl_policy"] == pytest.approx(kl, abs=1e-6)
    assert terms["elbo"] == pytest.approx(2.6 - beta * kl, abs=1e-6)
