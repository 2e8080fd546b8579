"""Import a script under experiments/ (not a package) by name."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_experiment(name: str):
    spec = importlib.util.spec_from_file_location(f"experiments_{name}", ROOT / "experiments" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def interrupted_and_resumed(algo: str, config, folder: Path, steps: int = 600, cut_at: int = 450, **train_kw):
    """Train into ``folder`` with a KeyboardInterrupt at ``cut_at``, then resume to ``steps``;
    returns (checkpoint step seen after the interruption, resumed agent)."""
    import pytest

    from pplrl.runner import load_checkpoint, train

    def interrupt(step, metrics):
        if step == cut_at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(algo, config, folder, steps, callback=interrupt, **train_kw)
    kept = load_checkpoint(folder, algo)["step"]
    return kept, train(algo, config, folder, steps, resume=True, **train_kw)


TIMING = ("wall_s", "steps_per_s")


def records(path) -> list[dict]:
    """A run's metrics.jsonl records without the wall-clock fields, which differ between two
    runs that are otherwise identical bit for bit."""
    from pplrl.runfiles import read_records

    return [{k: v for k, v in r.items() if k not in TIMING} for r in read_records(path)]
