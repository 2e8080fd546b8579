"""experiments/generative_agent.py, shrunk: it runs every variant and writes its files."""

import json
import math
import subprocess
import sys

import numpy as np
import pytest
from experiments_loader import ROOT, load_experiment

TINY = ["learning_starts=120", "horizon=1", "candidates=8", "elites=2", "cem_iterations=1", "particles=2", "hidden=16",
        "h_dim=16", "batch_size=4", "window=4", "info_gain_samples=2", "plan_info_gain_samples=2", "update_every=1"]


def test_generative_agent_experiment_smoke(tmp_path):
    exp = load_experiment("generative_agent")
    summary = exp.main(["--out", str(tmp_path), "--steps", "200", "--seeds", "0", "--eval-every", "200",
                        "--eval-episodes", "1", "--set", *TINY])
    for name in ("results.json", "results.md", "generative_agent.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["variant"] for r in saved["results"]} == {"generative", "generative-no-ig", "discriminative"}
    assert all({"plan", "prior"} <= set(r["curve"][-1]) for r in saved["results"])
    assert "| generative |" in summary["table"]
    # --resume keeps the finished runs (no run folder is touched)
    stamps = {f: f.stat().st_mtime_ns for f in tmp_path.glob("*/result.json")}
    assert len(stamps) == 3
    again = exp.main(["--out", str(tmp_path), "--steps", "200", "--seeds", "0", "--eval-every", "200",
                      "--eval-episodes", "1", "--resume", "--set", *TINY])
    assert {f: f.stat().st_mtime_ns for f in tmp_path.glob("*/result.json")} == stamps
    assert again["table"] == summary["table"]


def test_light_dark_experiment_keeps_paths_and_draws_trajectories(tmp_path):
    exp = load_experiment("generative_agent")
    summary = exp.main(["--out", str(tmp_path), "--env", "pplrl/LightDark-v0", "--steps", "60", "--seeds", "0",
                        "--eval-every", "60", "--eval-episodes", "1", "--variants", "generative",
                        "--set", *TINY, "learning_starts=30"])
    last = summary["results"][0]["curve"][-1]
    assert len(last["paths"]) == 1 and len(last["paths"][0]) == 31 and 0.0 <= last["plan_light"] <= 1.0
    assert (tmp_path / "trajectories.png").stat().st_size > 0
    assert "| LightDark-v0 | generative |" in summary["table"]


@pytest.mark.slow
def test_generative_agent_experiment_in_parallel_workers_with_a_budget(tmp_path):
    """--jobs 2 (spawned workers) and --budget-s: every run stops at its first evaluation
    point after the budget, and the table says which step it reached."""
    out = tmp_path / "par"
    subprocess.run([sys.executable, str(ROOT / "experiments" / "generative_agent.py"), "--out", str(out), "--steps",
                    "400", "--seeds", "0", "1", "--variants", "generative", "discriminative", "--eval-every", "200",
                    "--eval-episodes", "1", "--jobs", "2", "--budget-s", "0.001", "--set", *TINY],
                   check=True, cwd=ROOT, capture_output=True, text=True)
    saved = json.loads((out / "results.json").read_text())
    assert len(saved["results"]) == 4 and not any("error" in r for r in saved["results"])
    assert all(r["stopped_early"] and r["curve"][-1]["step"] == 200 for r in saved["results"])
    assert (out / "generative_agent.png").stat().st_size > 0 and "| 200 |" in saved["table"]


def test_detours_and_paired_difference_by_hand():
    exp = load_experiment("generative_agent")
    lit, dark_stays, dark_detours = [[4.0, 1.0], [3.0, 0.0]], [[1.0, 1.0], [0.5, 0.5]], [[1.0, 1.0], [3.5, 1.0]]
    assert exp.light_from_the_dark([lit, dark_stays, dark_detours]) == 0.5  # the start in the light is not counted
    assert exp.light_from_the_dark([lit]) is None

    def run(variant, seed, plan, step=100):
        return {"env": "pplrl/LightDark-v0", "variant": variant, "seed": seed, "curve": [{"step": step, "plan": plan}]}

    results = [run("generative", 0, -1.0), run("generative-no-ig", 0, -3.0), run("generative", 1, -5.0),
               run("generative-no-ig", 1, -4.0), run("generative", 2, 0.0), run("generative-no-ig", 2, 9.0, step=50),
               {"env": "pplrl/LightDark-v0", "variant": "generative-no-ig", "seed": 3, "error": "boom"},
               run("generative", 3, 7.0)]
    (row,) = exp.paired_rows(results)
    assert row["seeds"] == [0, 1] and row["diffs"] == [2.0, -1.0]  # seed 2 stopped at other steps, seed 3 failed
    assert row["mean"] == 0.5 and row["a_at_least_b"] == 1
    assert -1.0 <= row["ci95"][0] <= row["ci95"][1] <= 2.0


def test_light_dark_model_probe_on_a_trained_agent(tmp_path):
    """The probe script reads a finished LightDark run: learned vs true noise along sweeps,
    and both plans scored by the agent's model and the true one (the true model's gain is
    larger for the plan to the light); the plans by hand."""
    exp = load_experiment("generative_agent")
    exp.main(["--out", str(tmp_path), "--env", "pplrl/LightDark-v0", "--steps", "60", "--seeds", "0",
              "--eval-every", "60", "--eval-episodes", "1", "--variants", "generative", "--set", *TINY,
              "learning_starts=30"])
    probe = load_experiment("light_dark_model_probe")
    (row,) = probe.main(["--runs", str(tmp_path), "--sweeps", "2", "--horizon", "8", "--particles", "16",
                         "--temperatures", "0.3"])
    acting = row["acting"]["0.3"]
    assert math.isfinite(acting["return"]) and (acting["detours"] is None or 0.0 <= acting["detours"] <= 1.0)
    n, plans = row["noise"], row["plans"]
    assert n["steps"] == 60 and n["light_steps"] > 0 and n["dark_steps"] > 0
    assert 0.0 < n["true_std_light"] < 0.25 < 1.0 < n["true_std_dark"]
    assert len(plans["agent"]["info_gain"]) == 2 and all(math.isfinite(v) for v in plans["agent"]["info_gain"])
    assert plans["true"]["info_gain"][0] > plans["true"]["info_gain"][1]  # the light informs, the direct path not
    assert json.loads((tmp_path / "model_probe.json").read_text())["rows"][0]["run"] == row["run"]
    acts = probe.plans(np.array([2.0, 2.0]), 4).numpy()
    np.testing.assert_allclose(acts[0], [[1, 0]] * 4 + [[0, 0]])  # x 2 -> 4 in four full steps, then stay
    np.testing.assert_allclose(acts[1][:4], [[-0.5 ** 0.5, -0.5 ** 0.5]] * 4, rtol=1e-6)
    assert probe.spearman([1, 2, 3], [10, 30, 20]) == 0.5
    with pytest.raises(SystemExit):
        probe.main(["--runs", str(tmp_path / "none")])
