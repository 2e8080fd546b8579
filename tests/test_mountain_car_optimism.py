"""experiments/mountain_car_optimism.py, shrunk: it trains both agents, rolls their
policies out under the real env, q_d and p_theta, writes its files, and the optimism
it reports is the difference it claims."""

import json
import math

from experiments_loader import load_experiment

TINY = ["learning_starts=100", "model_train_freq=100", "model_min_updates=0", "ensemble_size=3", "num_elites=2",
        "model_hidden=(16,16)", "hidden=(16,16)", "batch_size=32", "rollout_batch_size=32"]


def test_mountain_car_optimism_runs(tmp_path, capsys):
    mc = load_experiment("mountain_car_optimism")
    saved = mc.main(["--steps", "120", "--rollouts", "2", "--horizon", "15", "--out", str(tmp_path), "--set", *TINY])
    for name in ("mountain_car_optimism.png", "mountain_car_optimism.json"):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "mountain_car_optimism.json").read_text()) == json.loads(json.dumps(saved))
    assert set(saved["results"]) == {"vmbpo", "beta-vmbpo"}
    for algo, res in saved["results"].items():
        r = res["seeds"]["0"]
        for dyn in ("real", "variational", "prior"):
            assert len(r[dyn]["mean_position"]) == 16
            assert all(math.isfinite(r[dyn][k]) for k in ("mean_return", "final_position", "goal_rate"))
        assert r["optimism_return"] == r["variational"]["mean_return"] - r["real"]["mean_return"]
        assert r["optimism_final_position"] == r["variational"]["final_position"] - r["real"]["final_position"]
        assert r["tilt_optimism_return"] == r["variational"]["mean_return"] - r["prior"]["mean_return"]
        assert res["optimism_return"] == res["mean"]["variational"]["mean_return"] - res["mean"]["real"]["mean_return"]
        assert math.isfinite(r["beta"]) and r["beta"] > 0
    out = capsys.readouterr().out
    assert "optimism" in out and "beta-vmbpo" in out
