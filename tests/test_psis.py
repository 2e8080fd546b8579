"""PSIS diagnostics of importance weights (Pareto k-hat, ESS): on weights with known tails,
in VMBPO's q_d fit, and in `pplrl diagnose`'s report."""

import json

import numpy as np
import pytest

from pplrl.diagnose import diagnose
from pplrl.diagnostics import KHAT_UNRELIABLE, importance_weight_diagnostics


def test_khat_grows_with_the_tail_of_log_normal_weights():
    """log w ~ N(0, s^2): the weights' tail gets heavier with s, and k-hat follows (mean over 4
    draws of 4,000); s = 0.5 is reliable, s = 3 is not. ESS is n for equal weights, 1 for one
    dominant weight, and exp(-s^2) n for log-normal weights (its large-n limit)."""
    g = np.random.default_rng(0)
    sigmas = (0.5, 1.0, 2.0, 3.0)
    khat = [np.mean([importance_weight_diagnostics(g.normal(0, s, 4000))["khat"] for _ in range(4)])
            for s in sigmas]
    assert all(a < b for a, b in zip(khat, khat[1:])), khat
    assert khat[0] < 0.5 and khat[-1] > KHAT_UNRELIABLE
    assert importance_weight_diagnostics(np.zeros(100))["ess"] == pytest.approx(100.0)
    assert importance_weight_diagnostics(np.r_[50.0, np.zeros(99)])["ess"] == pytest.approx(1.0, abs=1e-9)
    d = importance_weight_diagnostics(g.normal(0, 0.5, 200_000))
    assert d["ess_frac"] == pytest.approx(np.exp(-0.25), rel=0.02)


def test_too_few_weights_for_a_tail_give_nan_khat_and_an_ess():
    """Under 25 weights PSIS has no tail to fit (a tiny replay's first q_d fit): k-hat is NaN,
    the ESS is still computed."""
    d = importance_weight_diagnostics(np.zeros(8))
    assert np.isnan(d["khat"]) and d["ess"] == pytest.approx(8.0)
    assert np.isfinite(importance_weight_diagnostics(np.random.default_rng(0).normal(size=25))["khat"])


def test_bad_log_weights_are_refused():
    with pytest.raises(ValueError, match="2 finite log-weights.*1 not finite"):
        importance_weight_diagnostics([0.0, np.nan, 1.0])
    with pytest.raises(ValueError, match="at least 2"):
        importance_weight_diagnostics([0.0])


def test_diagnose_flags_unreliable_weights(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"algo": "vmbpo", "plugin": None, "config": {}}))
    rows = [{"kind": "train", "step": s, "q_d_weight_khat": k, "loss": 1.0}
            for s, k in ((100, 0.2), (200, 0.9), (300, 1.4))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = diagnose(tmp_path, plot=tmp_path / "d.png")
    assert (f"warning: {run}: q_d_weight_khat > 0.7 (unreliable importance weights) in 2 of 3 records; "
            "max 1.40 at step 300") in report
