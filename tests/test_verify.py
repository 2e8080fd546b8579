"""pplrl.verify: SVI on a user's model/guide against exact DP (VMBPO eqs. 4, 14-16;
beta-VMBPO eqs. 5-7). The shipped objective passes; objectives with a deliberate bug
fail, and the report names what disagrees.

SVI budget: 200 steps at lr 0.1 (test_elbo_agreement.py converges with 300-400); here
the ELBO reaches the optimum to ~1e-9 and q to ~1e-5, far inside the tolerances
(2e-3 on the ELBO, 2e-2 on q)."""

import subprocess
import sys

import numpy as np
import pyro
import pytest
import torch

from guides.tabular import TabularGuide
from models.sites import optimality, sample
from models.trajectory import trajectory_model
from pplrl import tabular as tb
from pplrl.envs import random_mdp, risky_arm
from pplrl.verification import VerificationReport

STEPS = 200


def guide_for(mdp, H, **kw):
    return TabularGuide(torch.tensor(mdp.P), torch.tensor(mdp.uniform_policy()), horizon=H, time_varying=True, **kw)


def buggy_model(reward_sign=1.0, ignore_temperature=False, prior=None):
    """A copy of trajectory_model with a bug: the factor's sign flipped, the inverse
    temperature forgotten (r instead of r / beta), or a prior policy of its own."""

    def model(env, horizon, *, eta=None, beta=None):
        scale = 1.0 if ignore_temperature else tb.reward_scale(eta, beta)
        with env.start_plate():
            x = env.initial_state()
            for t in pyro.markov(range(horizon)):
                a = sample("a", t, env.prior_policy(x) if prior is None else pyro.distributions.Categorical(prior[x]))
                x_next = sample("x", t + 1, env.dynamics(x, a))
                optimality(t, reward_sign * env.reward(x, a, x_next), scale)
                x = x_next
        return x

    return model


def verify(*args, **kw):
    from pplrl import verify  # the lazy attribute, as users import it

    return verify(*args, **kw)


# -- the shipped objective passes ------------------------------------------------------

def test_shipped_objective_passes_on_risky_arm_with_beta():
    mdp, H, beta = risky_arm(), 2, 3.0
    report = verify(trajectory_model, guide_for(mdp, H), mdp, horizon=H, beta=beta, steps=STEPS)
    assert isinstance(report, VerificationReport)
    assert [r.quantity for r in report.rows] == ["elbo optimum", "q_c", "q_d"]
    assert report.passed, str(report)
    # the DP column is beta log p(O; beta) (eq. 6): a point-mass start makes the bound tight
    exact = tb.soft_value_iteration(mdp, scale=1 / beta, horizon=H)
    assert report.rows[0].dp == pytest.approx(beta * exact.log_evidence(mdp.p0), abs=1e-12)
    assert report.rows[0].diff < 1e-4 and report.rows[1].diff < 1e-3 and report.rows[2].diff < 1e-3
    text = str(report)
    assert text.splitlines()[-1] == "PASS: elbo optimum, q_c, q_d agree with the DP solution"
    assert "RiskSensitiveELBO(beta=3)" in text and "RiskyArm" in text
    assert report.assert_passed() is report


def test_shipped_objective_passes_on_random_mdp_with_eta():
    mdp, H = random_mdp(4, 2, seed=11), 3
    report = verify(trajectory_model, guide_for(mdp, H), mdp, horizon=H, eta=1.0, steps=STEPS, seed=1)
    assert report.passed, str(report)
    exact = tb.soft_value_iteration(mdp, scale=1.0, horizon=H)
    assert report.rows[0].dp == pytest.approx(exact.elbo_optimum(mdp.p0), abs=1e-12)
    assert report.rows[0].svi == pytest.approx(report.terms["elbo"], abs=0)
    assert len(report.losses) == STEPS and report.losses[-1] < report.losses[0]


def test_guide_without_tables_and_start_states():
    """A plain-function guide is compared on the ELBO only (and says so); with start
    states the optimum is the sum of V_0 over them."""
    mdp, H = risky_arm(), 2
    tabular = guide_for(mdp, H)

    def guide(env, horizon, **kw):
        tabular(env, horizon, **kw)

    starts = torch.arange(mdp.n_states)
    report = verify(trajectory_model, guide, mdp, horizon=H, beta=3.0, steps=STEPS, initial=starts)
    assert [r.quantity for r in report.rows] == ["elbo optimum"]
    assert report.passed, str(report)
    assert report.rows[0].diff < 1e-4
    V0 = tb.soft_value_iteration(mdp, scale=1 / 3.0, horizon=H).V[0]
    assert report.rows[0].dp == pytest.approx(3.0 * V0.sum(), abs=1e-12)
    text = str(report)
    assert "q_c and q_d not compared" in text and "particle" not in text  # enumerated: the ELBO is exact
    assert text.splitlines()[-1] == "PASS: elbo optimum agrees with the DP solution"


# -- wrong objectives fail, naming what disagrees -------------------------------------

def test_forgotten_inverse_temperature_fails():
    mdp, H = risky_arm(), 2
    report = verify(buggy_model(ignore_temperature=True), guide_for(mdp, H), mdp, horizon=H, beta=3.0, steps=STEPS)
    assert not report.passed
    assert {"elbo optimum", "q_c"} <= set(report.failed)
    last = str(report).splitlines()[-1]
    assert last.startswith("FAIL: elbo optimum, q_c") and last.endswith("disagree with the DP solution")
    with pytest.raises(AssertionError, match="FAIL: elbo optimum, q_c"):
        report.assert_passed()
    with pytest.raises(AssertionError, match="FAIL"):
        report.raise_on_failure()


def test_wrong_sign_reward_fails():
    mdp, H = random_mdp(4, 2, seed=11), 3
    report = verify(buggy_model(reward_sign=-1.0), guide_for(mdp, H), mdp, horizon=H, eta=1.0, steps=STEPS)
    assert {"elbo optimum", "q_c"} <= set(report.failed), str(report)
    assert not report.passed


def test_other_prior_policy_fails_on_elbo_and_q_c_only():
    """The model's prior (0.8 left) is not the uniform one DP assumes: q_c* and the
    optimum move, while q_d* at (S, right) depends only on V_1 at A and B (one
    effective action there), so q_d still agrees."""
    mdp, H = risky_arm(), 2
    prior = torch.tensor([[0.8, 0.2]] * mdp.n_states, dtype=torch.float64)
    report = verify(buggy_model(prior=prior), guide_for(mdp, H), mdp, horizon=H, beta=3.0, steps=STEPS)
    assert report.failed == ["elbo optimum", "q_c"], str(report)
    assert str(report).splitlines()[-1] == "FAIL: elbo optimum, q_c disagree with the DP solution"
    # ... and passes when verify is told the model's prior
    report = verify(buggy_model(prior=prior), guide_for(mdp, H), mdp, horizon=H, beta=3.0, steps=STEPS,
                    prior_policy=prior)
    assert report.passed, str(report)


def test_pinned_dynamics_is_not_the_vmbpo_optimum():
    """q_d = p (SAC's special case) cannot reach the optimistic q_d* of eq. 14."""
    mdp, H = risky_arm(), 2
    report = verify(trajectory_model, guide_for(mdp, H, learn_dynamics=False), mdp, horizon=H, beta=1.0, steps=STEPS)
    assert {"elbo optimum", "q_d"} <= set(report.failed), str(report)
    qd = report.rows[2]
    assert "s=S a=right" in qd.where and qd.diff > 0.1


# -- bad input -------------------------------------------------------------------------

def test_bad_input():
    mdp, H = risky_arm(), 2
    guide = guide_for(mdp, H)

    def one_line(err):
        assert "\n" not in str(err.value) and str(err.value).startswith("verify: ")

    cases = [
        (dict(eta=1.0, beta=2.0), "exactly one of eta"),
        (dict(), "exactly one of eta"),
        (dict(eta=-1.0), "eta must be"),
        (dict(eta=1.0, horizon=0), "horizon must be an integer >= 1"),
        (dict(eta=1.0, horizon=1.5), "horizon must be an integer >= 1"),
        (dict(eta=1.0, steps=0), "steps"),
        (dict(eta=1.0, lr=0.0), "lr"),
        (dict(eta=1.0, tol={"elbow": 1.0}), "unknown keys"),
        (dict(eta=1.0, prior_policy=np.ones((2, 2))), "prior_policy"),
        (dict(eta=1.0, initial=np.ones(6)), "initial"),
        (dict(eta=1.0, horizon=H + 1), "guide has tables for 2 steps, model asked for step 2$"),  # Pyro's shapes cut
    ]
    for kw, match in cases:
        kw = {"horizon": H, "steps": 1, **kw}
        with pytest.raises(ValueError, match=match) as err:
            verify(trajectory_model, guide, mdp, **kw)
        one_line(err)
    with pytest.raises(ValueError, match="must be a pplrl.tabular.TabularMDP, got dict") as err:
        verify(trajectory_model, guide, {"P": mdp.P}, horizon=H, eta=1.0)
    one_line(err)

    def short_guide(env, horizon, **kw):
        guide(env, horizon - 1, **kw)

    with pytest.raises(ValueError, match=r"do not match.*(a_1.*x_2|x_2.*a_1)") as err:
        verify(trajectory_model, short_guide, mdp, horizon=H, eta=1.0, steps=1)
    one_line(err)


def test_import_pplrl_stays_cheap():
    code = ("import sys, pplrl; assert 'pplrl.verification' not in sys.modules and 'torch' not in sys.modules; "
            "from pplrl import verify; assert 'pplrl.verification' in sys.modules and callable(verify)")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
    with pytest.raises(AttributeError, match="no attribute 'verifyy'"):
        import pplrl

        pplrl.verifyy
