"""The README's main job, shrunk: it runs, writes its files, and finds the switch."""

import json
import math

import pytest
import torch
from experiments_loader import load_experiment


def test_risky_arm_experiment_runs(tmp_path):
    risky = load_experiment("risky_arm")
    results = risky.main(["--out", str(tmp_path), "--seeds", "2", "--steps", "500", "--svi-steps", "30"])
    assert abs(results["risky_arm"]["beta_switch_dp"] - 5 / math.log(9)) < 1e-6
    for name in ("risky_arm.png", "cliff.png", "svi_traces.png", "results.json", "svi_terms_seed0.jsonl"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert len(saved["cliff_learning"]["Q-learning"]["returns"]) == 2


def test_bench_overrides_per_algorithm():
    bench = load_experiment("bench_pendulum")
    items = ["mbpo:gradient_steps=5", "batch_size=64", "memb:m=3"]
    assert bench.overrides_for("mbpo", items) == ["gradient_steps=5", "batch_size=64"]
    assert bench.overrides_for("memb", items) == ["batch_size=64", "m=3"]
    assert bench.overrides_for("sac", items) == ["batch_size=64"]


def test_bench_time_limit_keeps_the_evaluations_so_far():
    bench = load_experiment("bench_pendulum")
    tiny = ["hidden=(8,8)", "batch_size=8", "learning_starts=10"]
    full = bench.run_pplrl("sac", "Pendulum-v1", 0, 40, 10, 1, tiny)
    assert full["steps"] == [10, 20, 30, 40] and "stopped_at_step" not in full
    cut = bench.run_pplrl("sac", "Pendulum-v1", 0, 40, 10, 1, tiny, time_limit=0.0)
    assert cut["stopped_at_step"] == 1 and cut["steps"] == []
    lines = bench.table([full, cut], [10, 20]).splitlines()
    assert lines[-1].startswith("* over fewer seeds")


def test_bench_keep_runs_keeps_the_run_directory(tmp_path):
    bench = load_experiment("bench_pendulum")
    tiny = ["hidden=(8,8)", "batch_size=8", "learning_starts=10"]
    res = bench.run_pplrl("sac", "Pendulum-v1", 0, 20, 10, 1, tiny, run_dir=str(tmp_path / "sac_seed0"))
    lines = (tmp_path / "sac_seed0" / "metrics.jsonl").read_text().splitlines()
    evals = [json.loads(x)["mean_return"] for x in lines if json.loads(x)["kind"] == "eval"]
    assert evals == res["returns"] and len(evals) == 2
    assert any((tmp_path / "sac_seed0").glob("checkpoint*"))


def test_bench_merge_prints_one_table(tmp_path, capsys):
    bench = load_experiment("bench_pendulum")
    def run(algo, steps, returns, wall_s):
        return {"algo": algo, "seed": 0, "steps": steps, "returns": returns, "wall_s": wall_s}

    a = {"env": "Pendulum-v1", "results": [run("sac", [1000], [-100.0], 5.0), run("sb3-sac", [1000], [-90.0], 2.0)]}
    b = {"env": "Pendulum-v1", "results": [run("mbpo", [1000, 2000], [-300.0, -150.0], 50.0)]}
    for name, data in (("a.json", a), ("b.json", b)):
        (tmp_path / name).write_text(json.dumps(data))
    out = bench.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m.json")])
    assert [r["algo"] for r in out["results"]] == ["sac", "sb3-sac", "mbpo"]
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.strip()}
    assert "2.50" in rows["sac"]  # wall-clock ratio to SB3 within one file
    assert "-150.0" in rows["mbpo"] and rows["mbpo"].rstrip().endswith("-")  # none across files
    # a later file's run of the same algorithm and seed replaces the earlier one
    c = {"env": "Pendulum-v1", "results": [run("sac", [1000], [-80.0], 4.0)]}
    (tmp_path / "c.json").write_text(json.dumps(c))
    out = bench.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "c.json"), "--out", str(tmp_path / "m.json")])
    assert [(r["algo"], r["returns"], r["source"]) for r in out["results"]] == [
        ("sac", [-80.0], str(tmp_path / "c.json")), ("sb3-sac", [-90.0], str(tmp_path / "a.json"))]
    assert "replaces" in capsys.readouterr().out
    b["env"] = "Hopper-v5"
    (tmp_path / "b.json").write_text(json.dumps(b))
    with pytest.raises(SystemExit, match="different envs"):
        bench.main(["--merge", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path / "m.json")])


def test_bench_paired_difference_by_hand(tmp_path, capsys):
    bench = load_experiment("bench_pendulum")

    def run(algo, seed, returns):
        return {"algo": algo, "seed": seed, "steps": [1000, 2000][:len(returns)], "returns": returns, "wall_s": 1.0}

    results = [run("a", 0, [-100.0, -50.0]), run("a", 1, [-200.0, -60.0]), run("a", 2, [-300.0, -70.0]),
               run("b", 0, [-110.0, -40.0]), run("b", 1, [-230.0, -60.0]), run("b", 2, [-300.0]),
               run("b", 3, [-1.0, -1.0]), {"algo": "a", "seed": 4, "error": "boom"}]
    rows = bench.paired(results, "a", "b")
    # step 1000: diffs 10, 30, 0 over seeds 0-2 (seed 3 has no a run): mean 40/3, sd 15.275, se 8.819
    assert rows[0]["step"] == 1000 and rows[0]["seeds"] == 3 and rows[0]["a_at_least_b"] == 3
    assert rows[0]["mean_diff"] == pytest.approx(40 / 3)
    assert rows[0]["se"] == pytest.approx(math.sqrt(((10 - 40 / 3) ** 2 + (30 - 40 / 3) ** 2 + (40 / 3) ** 2) / 2 / 3))
    half = 4.302652729911275 * rows[0]["se"]  # t(0.975, 2)
    assert rows[0]["ci95"] == pytest.approx([40 / 3 - half, 40 / 3 + half])
    # step 2000: seed 2 of b stopped early, so diffs -10, 0 over 2 seeds
    assert rows[1]["seeds"] == 2 and rows[1]["mean_diff"] == pytest.approx(-5.0) and rows[1]["a_at_least_b"] == 1
    (tmp_path / "r.json").write_text(json.dumps({"env": "Pendulum-v1", "results": results}))
    out = bench.main(["--merge", str(tmp_path / "r.json"), "--out", str(tmp_path / "m.json"), "--paired", "a", "b",
                      "--per-seed"])
    assert out["paired"]["rows"] == rows and json.loads((tmp_path / "m.json").read_text())["paired"]["a"] == "a"
    printed = capsys.readouterr().out
    assert "paired difference a − b" in printed
    per_seed = {tuple(line.split()[:2]): line.split()[2:] for line in printed.splitlines()
                if line.split()[:1] in (["0"], ["1"], ["2"], ["3"])}
    assert per_seed[("1", "a")] == ["-200.0", "-60.0"] and per_seed[("2", "b")] == ["-300.0", "-"]
    assert ("4", "a") not in per_seed  # a failed run has no line
    # the whole curve: seed 2's b stopped after 1000, so only 1000 is shared by every pair
    curve = bench.paired_over_curve(results, "a", "b")
    assert curve["steps"] == [1000] and curve["seeds"] == 3 and curve["mean_diff"] == pytest.approx(40 / 3)
    assert out["paired"]["over_curve"] == curve and "  curve " in printed
    two = [run("a", 0, [0.0, 10.0]), run("b", 0, [0.0, 0.0]), run("a", 1, [-10.0, 0.0]), run("b", 1, [0.0, 0.0])]
    curve = bench.paired_over_curve(two, "a", "b")  # per-seed means +5 and -5
    assert curve["steps"] == [1000, 2000] and curve["mean_diff"] == 0.0 and curve["se"] == pytest.approx(5.0)
    assert curve["ci95"] == pytest.approx([-12.7062047 * 5, 12.7062047 * 5]) and curve["a_at_least_b"] == 1
    assert bench.paired_over_curve(two[:2], "a", "b") is None  # one seed: no interval
    curve = bench.paired_over_curve(two, "a", "b", start=2000)  # only 2000: per-seed +10 and 0
    assert curve["steps"] == [2000] and curve["mean_diff"] == 5.0 and curve["a_at_least_b"] == 2
    assert bench.paired_over_curve(two, "a", "b", start=3000) is None  # no checkpoint left
    (tmp_path / "two.json").write_text(json.dumps({"env": "Pendulum-v1", "results": two}))
    out = bench.main(["--merge", str(tmp_path / "two.json"), "--paired", "a", "b", "--curve-from", "2000",
                      "--out", str(tmp_path / "m.json")])
    assert out["paired"]["over_curve"]["steps"] == [2000]
    # a variant run under the same algorithm name, compared through --rename
    (tmp_path / "v.json").write_text(json.dumps({"env": "Pendulum-v1", "results": [run("b", 0, [-90.0, -30.0])]}))
    v = str(tmp_path / "v.json")
    out = bench.main(["--merge", str(tmp_path / "r.json"), v, "--rename", v, "b", "b2", "--paired", "b2", "b",
                      "--out", str(tmp_path / "m.json")])
    assert out["paired"]["rows"][0]["mean_diff"] == pytest.approx(20.0)  # -90 - (-110), seed 0 only
    with pytest.raises(SystemExit, match="has no runs of 'zz'"):
        bench.main(["--merge", str(tmp_path / "v.json"), "--rename", str(tmp_path / "v.json"), "zz", "y",
                    "--out", str(tmp_path / "m.json")])
    with pytest.raises(SystemExit, match="no finished runs of 'c'"):
        bench.paired(results, "a", "c")
    with pytest.raises(SystemExit):
        bench.main(["--algos", "sac", "--paired", "sac", "vmbpo", "--out", str(tmp_path / "x.json")])


def test_bench_update_table_and_json(tmp_path, capsys):
    """bench_update.py: one row per agent, its update cost per env step and per update, the
    ratio to SAC (1 for SAC itself), JSON written."""
    bench = load_experiment("bench_update")
    out = tmp_path / "u.json"
    result = bench.main(["--algos", "sac", "virel", "--transitions", "1100", "--repeats", "1", "--out", str(out)])
    rows = {r["algo"]: r for r in result["rows"]}
    assert rows["sac"]["vs_sac"] == 1.0 and rows["virel"]["vs_sac"] > 0
    assert rows["sac"]["update_ms"] == rows["sac"]["env_step_ms"] > 0 and rows["sac"]["fit_ms"] is None
    assert json.loads(out.read_text())["rows"][1]["algo"] == "virel"
    assert "| sac | 1 |" in capsys.readouterr().out
    # matmul FLOPs per update: SAC's is the ratio's unit; VIREL adds a value network's step
    assert rows["sac"]["flops_vs_sac"] == 1.0 and rows["virel"]["update_gflop"] > rows["sac"]["update_gflop"] > 0
    x, w = torch.randn(8, 5), torch.randn(3, 5)
    assert bench.count_flops(lambda: torch.nn.functional.linear(x, w)) == 2 * 8 * 5 * 3
    with pytest.raises(SystemExit, match="--variant 'vmbpo': expected ALGO:KEY=VALUE"):
        bench.main(["--variant", "vmbpo", "--out", str(tmp_path / "bad.json")])
    assert not (tmp_path / "bad.json").exists()


def test_bench_update_flushes_subnormals_as_the_runner_does_and_restores_the_flag(tmp_path):
    from pplrl.device import denormals_flushed

    bench = load_experiment("bench_update")
    argv = ["--algos", "sac", "--transitions", "300", "--repeats", "1", "--no-flops", "--out", str(tmp_path / "u.json")]
    assert bench.main(argv)["denormals"] == "flushed" and not denormals_flushed()
    assert bench.main([*argv, "--keep-denormals"])["denormals"] == "kept"


def test_bench_denormals_counts_subnormals_and_times_a_checkpoint_both_ways(tmp_path, capsys):
    import numpy as np

    from pplrl.runner import train

    bench = load_experiment("bench_denormals")
    tiny = torch.finfo(torch.float32).tiny
    state = {"w": torch.tensor([tiny / 8, 0.0, 1.0, -tiny / 2]), "opt": [np.array([tiny / 4, 2.0], np.float32)],
             "d": np.array([1e-310]), "step": 3}  # float64's subnormals are not float32's: not counted
    assert bench.subnormal_counts(state) == (3, 6)

    from pplrl.algorithms import default_config

    config = default_config("mbpo", hidden=(8, 8), batch_size=8, learning_starts=20, model_hidden=(8,),
                            ensemble_size=3, num_elites=2, model_train_freq=25, model_min_updates=5,
                            rollout_batch_size=16, gradient_steps=1)
    train("mbpo", config, tmp_path / "run", 60, eval_every=60, eval_episodes=1, checkpoint_every=60, progress=False)
    out = tmp_path / "d.json"
    result = bench.main([str(tmp_path / "run"), "--updates", "2", "--repeats", "1", "--out", str(out)])
    (row,) = result["rows"]
    assert row["algo"] == "mbpo" and row["step"] == 60 and row["floats"] > 0 and row["model_train_freq"] == 25
    assert row["step_ms_off"] > 0 and row["step_ms_on"] > 0 and row["fit_ms_off"] > 0 and row["fit_ms_on"] > 0
    assert json.loads(out.read_text())["rows"][0]["run"] == str(tmp_path / "run")
    assert "mbpo" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main([str(tmp_path / "run"), "--repeats", "0"])
    with pytest.raises(SystemExit, match="no checkpoint at"):
        bench.main([str(tmp_path / "nowhere")])


def test_bench_resumed_run_matches_an_uninterrupted_one(tmp_path):
    bench = load_experiment("bench_pendulum")
    tiny = ["hidden=(8,8)", "batch_size=8", "learning_starts=10"]
    full = bench.run_pplrl("sac", "Pendulum-v1", 0, 40, 10, 1, tiny)
    folder = str(tmp_path / "sac_seed0")
    bench.run_pplrl("sac", "Pendulum-v1", 0, 20, 10, 1, tiny, run_dir=folder, checkpoint_every=10)
    rest = bench.run_pplrl("sac", "Pendulum-v1", 0, 40, 10, 1, tiny, run_dir=folder, checkpoint_every=10,
                           resume=True)
    assert rest["steps"] == full["steps"] and rest["returns"] == full["returns"]
    assert rest["resumed"] and rest["wall_s"] > 0
    with pytest.raises(Exception, match="already holds a run"):  # without resume a kept run is not overwritten
        bench.run_pplrl("sac", "Pendulum-v1", 0, 40, 10, 1, tiny, run_dir=folder)


def test_bench_resume_keeps_finished_runs_and_reruns_the_rest(tmp_path, monkeypatch, capsys):
    bench = load_experiment("bench_pendulum")
    calls = []

    def fake_job(job):
        kind, kw = job
        calls.append((kw.get("algo", "sb3-sac"), kw["seed"], kw.get("resume")))
        return {"algo": kw["algo"], "seed": kw["seed"], "steps": [10], "returns": [-float(len(calls))], "wall_s": 1.0}

    monkeypatch.setattr(bench, "_job", fake_job)
    out = tmp_path / "b.json"
    argv = ["--algos", "sac", "mbpo", "--seeds", "0", "1", "--steps", "10", "--eval-every", "10", "--jobs", "1",
            "--out", str(out)]
    bench.main(argv)
    assert [c[:2] for c in calls] == [("sac", 0), ("mbpo", 0), ("sac", 1), ("mbpo", 1)]  # seed-major
    data = json.loads(out.read_text())
    data["results"][1] = {"algo": "mbpo", "seed": 0, "error": "killed"}  # a failed run is run again
    data["results"][2]["stopped_at_step"] = 5  # so is one cut by --time-limit
    out.write_text(json.dumps(data))
    calls.clear()
    res = bench.main([*argv, "--resume"])
    assert calls == [("mbpo", 0, True), ("sac", 1, True)]
    assert "2 finished runs kept, 2 to go" in capsys.readouterr().out
    kept = {(r["algo"], r["seed"]): r["returns"] for r in res["results"]}
    assert kept[("sac", 0)] == [-1.0] and kept[("mbpo", 1)] == [-4.0] and len(kept) == 4
    with pytest.raises(SystemExit):  # other settings: refused, the file untouched
        bench.main([*argv[:-2], "--set", "batch_size=8", "--out", str(out), "--resume"])
    assert json.loads(out.read_text())["results"] == res["results"]


def test_beta_critic_roles_on_a_tiny_run(tmp_path, capsys):
    """experiments/beta_critic_roles.py on a short beta-VMBPO run: the two readings of q_d's
    weights and of the actor's critic are compared on the run's own replay (a correlation and a
    cosine, each within [-1, 1], the same number of transitions as the replay); a SAC run is refused."""
    bench, roles = load_experiment("bench_pendulum"), load_experiment("beta_critic_roles")
    tiny = ["hidden=(8,8)", "batch_size=8", "learning_starts=10", "model_hidden=(8,)", "model_train_freq=20",
            "gradient_steps=1", "model_min_updates=5", "model_epochs=1"]
    bench.run_pplrl("beta-vmbpo", "Pendulum-v1", 0, 40, 40, 1, tiny, run_dir=str(tmp_path / "b"))
    out = roles.main([str(tmp_path / "b"), "--batches", "2", "--out", str(tmp_path / "r.json")])
    (row,) = out["runs"]
    assert row["transitions"] == 40 and row["step"] == 40
    assert -1 <= row["correlation"] <= 1 and -1 <= row["cosine"] <= 1 and row["relative_diff"] >= 0
    assert json.loads((tmp_path / "r.json").read_text())["mean"]["cosine"] == row["cosine"]
    bench.run_pplrl("sac", "Pendulum-v1", 0, 20, 20, 1, tiny[:3], run_dir=str(tmp_path / "s"))
    with pytest.raises(SystemExit, match="not beta-VMBPO"):
        roles.main([str(tmp_path / "s"), "--out", str(tmp_path / "r2.json")])
