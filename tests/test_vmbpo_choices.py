"""experiments/vmbpo_choices.py, shrunk: it trains VMBPO, measures the TD clamp's and nu's
reference's effects, and what it reports is what it computed (the clamp cannot widen the
weights' range; the exact KL is a KL of the agent's own ensembles)."""

import json
import math

from experiments_loader import load_experiment

TINY = ["learning_starts=100", "model_train_freq=100", "model_min_updates=0", "ensemble_size=3", "num_elites=2",
        "model_hidden=(16,16)", "hidden=(16,16)", "batch_size=32", "q_d_min_updates=5"]


def test_vmbpo_choices_runs_and_resumes(tmp_path, capsys):
    vc = load_experiment("vmbpo_choices")
    args = ["--seeds", "0", "--steps", "150", "--nu-steps", "20", "--out", str(tmp_path), "--set", *TINY]
    saved = vc.main(args)
    assert json.loads((tmp_path / "vmbpo_choices.json").read_text()) == json.loads(json.dumps(saved))
    r = saved["results"]["0"]
    t, n = r["td_clamp"], r["nu_reference"]
    assert 0.0 <= t["beyond_clamp"] <= 1.0 and t["raw_min"] <= t["raw_max"]
    for name in ("clamped", "unclamped"):
        assert 0.0 < t[name]["ess_frac"] <= 1.0 and math.isfinite(t[name]["kl_q_d_p"])
    if t["beyond_clamp"] == 0.0:  # nothing clamped: the same weights
        assert t["clamped"]["ess_frac"] == t["unclamped"]["ess_frac"]
    assert math.isfinite(n["exact_kl"]) and n["exact_kl"] > -0.05  # a KL, up to Monte Carlo error
    for ref in ("agent", "model", "real", "model_policy", "real_policy"):
        assert n[ref]["rmse"] >= 0 and -1 <= n[ref]["corr"] <= 1 and 0 <= n[ref]["at_bound"] <= 1
    assert "fresh, 'model', a ~ q_c" in capsys.readouterr().out
    again = vc.main(args)  # the finished run is read back, not retrained
    assert again["results"]["0"]["return"] == r["return"]
