"""The README's main job, shrunk: it runs, writes its files, and finds the switch."""

import json
import math

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
