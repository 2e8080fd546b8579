"""experiments/generative_agent.py, shrunk: it runs every variant and writes its files."""

import json

from experiments_loader import load_experiment


def test_generative_agent_experiment_smoke(tmp_path):
    exp = load_experiment("generative_agent")
    summary = exp.main(["--out", str(tmp_path), "--steps", "200", "--seeds", "0", "--eval-every", "200",
                        "--eval-episodes", "1", "--set", "learning_starts=120", "horizon=1", "candidates=8",
                        "elites=2", "cem_iterations=1", "particles=1", "hidden=16", "h_dim=16", "batch_size=4",
                        "window=4", "info_gain_samples=2", "plan_info_gain_samples=2", "update_every=4"])
    for name in ("results.json", "results.md", "generative_agent.png"):
        assert (tmp_path / name).stat().st_size > 0
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {r["variant"] for r in saved["results"]} == {"generative", "generative-no-ig", "discriminative"}
    assert all({"plan", "prior"} <= set(r["curve"][-1]) for r in saved["results"])
    assert "| generative |" in summary["table"]
