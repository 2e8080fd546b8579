"""experiments/mountain_car_optimism.py, shrunk: it trains both agents, rolls their
policies out under the real env, q_d and p_theta, writes its files, and the optimism
it reports is the difference it claims."""

import json
import math

import pytest
from experiments_loader import load_experiment

TINY = ["learning_starts=100", "model_train_freq=100", "model_min_updates=0", "ensemble_size=3", "num_elites=2",
        "model_hidden=(16,16)", "hidden=(16,16)", "batch_size=32"]


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
        # the exact KL(q_d || p_theta) of the two ensembles, on the run's replay
        agent_kl = r["kl_exact"]
        assert math.isfinite(agent_kl) and res["mean"]["kl_exact"] == agent_kl
    out = capsys.readouterr().out
    assert "optimism" in out and "beta-vmbpo" in out
    # --merge: a second file's seed joins the first's; the mean and standard error are over both
    other = json.loads(json.dumps(saved))
    for res in other["results"].values():
        r = res["seeds"].pop("0")
        r["variational"]["mean_return"] += 10.0
        r["optimism_return"] += 10.0
        r["tilt_optimism_return"] += 10.0
        res["seeds"]["1"] = r
    (tmp_path / "a.json").write_text(json.dumps(saved))
    (tmp_path / "b.json").write_text(json.dumps(other))
    merged = mc.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")])
    assert merged["seeds"] == [0, 1] and (tmp_path / "m" / "mountain_car_optimism.png").stat().st_size > 0
    for algo, res in merged["results"].items():
        one = saved["results"][algo]["seeds"]["0"]
        assert list(res["seeds"]) == ["0", "1"]
        assert res["optimism_return"] == pytest.approx(one["optimism_return"] + 5.0)
        assert res["se"]["optimism_return"] == pytest.approx(5.0)  # two values 10 apart: sd 7.07, se 5
        assert res["se"]["tilt_optimism_return"] == pytest.approx(5.0)
    assert "± 5.0" in capsys.readouterr().out
    other["horizon"] = 99
    (tmp_path / "b.json").write_text(json.dumps(other))
    with pytest.raises(SystemExit, match="other settings.*horizon"):
        mc.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m")])


def test_mountain_car_optimism_resume(tmp_path, capsys):
    """--resume keeps the finished (algorithm, seed) results and continues an interrupted
    run from its checkpoint; the resumed run ends where an uninterrupted one does."""
    mc = load_experiment("mountain_car_optimism")
    args = ["--algos", "vmbpo", "--steps", "120", "--rollouts", "2", "--horizon", "10", "--checkpoint-every", "60",
            "--set", *TINY]
    whole = mc.main([*args, "--out", str(tmp_path / "whole")])
    # an interrupted call: the run stopped at its 60-step checkpoint, no JSON written yet
    mc.train_agent("vmbpo", 0, 60, TINY, tmp_path / "cut" / "runs" / "vmbpo-seed0", checkpoint_every=60)
    resumed = mc.main([*args, "--out", str(tmp_path / "cut"), "--resume"])
    a, b = whole["results"]["vmbpo"]["seeds"]["0"], resumed["results"]["vmbpo"]["seeds"]["0"]
    assert a["real"]["mean_return"] == b["real"]["mean_return"]
    assert a["variational"]["mean_position"] == b["variational"]["mean_position"]
    # a second --resume keeps the finished result and trains nothing
    capsys.readouterr()
    again = mc.main([*args, "--out", str(tmp_path / "cut"), "--resume"])
    assert again["results"]["vmbpo"]["seeds"]["0"] == b
    assert "1 finished runs kept, 0 to go" in capsys.readouterr().out
    # --reevaluate reads the finished run back and evaluates it again: the same rollouts and KL,
    # the training time kept
    again = mc.main([*args, "--out", str(tmp_path / "cut"), "--resume", "--reevaluate"])
    c = again["results"]["vmbpo"]["seeds"]["0"]
    assert c["real"]["mean_return"] == b["real"]["mean_return"] and c["kl_exact"] == b["kl_exact"]
    assert c["train_wall_s"] == b["train_wall_s"]
    with pytest.raises(SystemExit, match="--reevaluate needs --resume"):
        mc.main([*args, "--out", str(tmp_path / "cut"), "--reevaluate"])
    with pytest.raises(SystemExit, match="other settings.*horizon"):
        mc.main([*args[:-len(TINY) - 1], "--horizon", "11", "--set", *TINY, "--out", str(tmp_path / "cut"),
                 "--resume"])
