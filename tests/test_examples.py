"""examples/behaviour_prior.py, a user's objective as a plugin: trained, resumed, evaluated
and diagnosed through the CLI; its own term (kl_behaviour) appears under its name."""

import json
from pathlib import Path

from pplrl.algorithms import ALGORITHMS
from pplrl.cli import main

EXAMPLE = str(Path(__file__).resolve().parents[1] / "examples" / "behaviour_prior.py")
TINY = ["learning_starts=100", "batch_size=32", "hidden=(32,32)"]


def test_behaviour_prior_plugin_trains_resumes_evaluates_and_diagnoses(tmp_path, capsys):
    out = str(tmp_path / "bp")
    assert main(["train", "behaviour-prior", "--plugin", EXAMPLE, "--env", "Pendulum-v1", "--steps", "300",
                 "--eval-every", "200", "--eval-episodes", "1", "--checkpoint-every", "100", "--out", out,
                 "--quiet", "--set", *TINY]) == 0
    ALGORITHMS.pop("behaviour-prior", None)  # as a new process would start
    assert main(["train", "--resume", out, "--steps", "400", "--quiet"]) == 0
    ALGORITHMS.pop("behaviour-prior", None)
    assert main(["eval", out, "--episodes", "1"]) == 0
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert train_rows and {"elbo_kl_behaviour", "prior_loss", "alpha"} <= set(train_rows[-1])
    assert max(r["step"] for r in rows) == 400
    ALGORITHMS.pop("behaviour-prior", None)
    capsys.readouterr()
    assert main(["diagnose", out]) == 0
    assert "elbo_kl_behaviour" in capsys.readouterr().out
    ALGORITHMS.pop("behaviour-prior", None)  # leave the registry as the other tests expect it
