"""Many seeds in one command: pplrl train ALGO --seeds ... --jobs N, resume of the set, diagnose."""

import os
import signal
import subprocess
import sys
import time

import pytest
from experiments_loader import records

from pplrl.cli import main as cli
from pplrl.runfiles import RunLock, read_records
from pplrl.sweep import parse_seeds

TINY = ["--quiet", "--eval-every", "100", "--eval-episodes", "1", "--checkpoint-every", "100",
        "--set", "hidden=16,16", "batch_size=16", "learning_starts=50"]


def test_parse_seeds():
    assert parse_seeds("0-3") == [0, 1, 2, 3]
    assert parse_seeds("5,1,1,2-3") == [1, 2, 3, 5]
    for bad in ("a", "3-1", "", "-2", "1,,2"):
        with pytest.raises(ValueError, match="--seeds"):
            parse_seeds(bad)


def test_seeds_run_in_their_folders_resume_together_and_equal_single_runs(tmp_path, capsys):
    out = tmp_path / "set"
    assert cli(["train", "sac", "--seeds", "0-1", "--jobs", "2", "--steps", "200", "--out", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "seed 0: final return" in text and "seed 1: final return" in text and "over 2 finished run(s)" in text
    assert sorted(p.name for p in out.iterdir()) == ["seed0", "seed1", "seeds.json"]
    # each seed is the run `pplrl train --seed k` would have made
    assert cli(["train", "sac", "--seed", "1", "--steps", "200", "--out", str(tmp_path / "single"), *TINY]) == 0
    assert records(out / "seed1" / "metrics.jsonl") == records(tmp_path / "single" / "metrics.jsonl")
    # one command continues all of them
    assert cli(["train", "--resume", str(out), "--steps", "300", "--jobs", "2"]) == 0
    for seed in (0, 1):
        finals = [r for r in read_records(out / f"seed{seed}" / "metrics.jsonl") if r["kind"] == "final"]
        assert [r["step"] for r in finals] == [300]
    capsys.readouterr()
    assert cli(["diagnose", str(out)]) == 0
    assert "2 runs" in capsys.readouterr().out


def test_many_seed_bad_input_is_one_line_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "set"
    cases = [
        (["train", "sac", "--seeds", "0-1", "--seed", "3"], "either --seed"),
        (["train", "sac", "--seeds", "x"], "--seeds 'x'"),
        (["train", "sac", "--jobs", "2"], "--jobs runs several seeds"),
        (["train", "sac", "--seeds", "0-1", "--jobs", "0"], "--jobs must be a positive integer"),
        (["train", "sac", "--seeds", "0-1", "--set", "lr=-1"], "lr must be > 0"),
        (["train", "nope", "--seeds", "0-1"], "unknown algorithm 'nope'"),
        (["train", "sac", "--seeds", "0-1", "--steps", "0"], "steps must be a positive integer"),
    ]
    for argv, message in cases:
        assert cli([*argv, "--out", str(out), "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err
        assert not out.exists()
    assert cli(["train", "sac", "--seeds", "0", "--steps", "100", "--out", str(out), *TINY]) == 0
    assert cli(["train", "sac", "--seeds", "0-1", "--steps", "100", "--out", str(out), *TINY]) == 2
    assert "already holds a many-seed set (runs of seeds ['seed0'])" in capsys.readouterr().err


def test_ctrl_c_stops_every_seed_at_its_checkpoint(tmp_path):
    out = tmp_path / "set"
    cmd = [sys.executable, "-m", "pplrl.cli", "train", "sac", "--seeds", "0-1", "--jobs", "2", "--steps", "20000",
           "--out", str(out), *TINY]
    # SIGINT's default disposition restored in the child: a test run started in the background
    # (`cmd &`, nohup) inherits SIGINT ignored, and Python then installs no KeyboardInterrupt
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while time.time() < deadline and not all((out / f"seed{s}" / "checkpoint.pt").exists() for s in (0, 1)):
        time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal sends: the whole group
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "continue with `pplrl train --resume" in stderr and "Traceback" not in stderr + stdout
    assert "seed 0: failed (exit 130): error: interrupted" in stdout  # each child stopped as Ctrl-C stops one run
    for seed in (0, 1):
        RunLock(out / f"seed{seed}").acquire().release()  # released
        assert (out / f"seed{seed}" / "checkpoint.pt").exists()
        assert not list((out / f"seed{seed}").glob("*.tmp"))


def test_resuming_a_set_starts_the_seeds_that_never_ran(tmp_path, capsys):
    out = tmp_path / "set"
    assert cli(["train", "sac", "--seeds", "0,2", "--jobs", "2", "--steps", "200", "--out", str(out), *TINY]) == 0
    import shutil

    shutil.rmtree(out / "seed2")  # as if Ctrl-C had come before seed 2 started
    assert cli(["train", "--resume", str(out), "--jobs", "2"]) == 0
    assert "seed 2: final return" in capsys.readouterr().out
    assert cli(["train", "sac", "--seed", "2", "--steps", "200", "--out", str(tmp_path / "single"), *TINY]) == 0
    assert records(out / "seed2" / "metrics.jsonl") == records(tmp_path / "single" / "metrics.jsonl")


@pytest.fixture
def local_ray():
    ray = pytest.importorskip("ray", reason="Ray is the optional extra pplrl[ray] (installed by the test extra)")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_the_ray_backend_gives_the_local_backends_folders_and_results(tmp_path, capsys, local_ray):
    args = ["--seeds", "0-1", "--steps", "200", *TINY]
    assert cli(["train", "sac", *args, "--backend", "ray", "--out", str(tmp_path / "ray")]) == 0
    text = capsys.readouterr().out
    assert "as Ray tasks on a local Ray instance" in text and "over 2 finished run(s)" in text
    assert cli(["train", "sac", *args, "--jobs", "2", "--out", str(tmp_path / "local")]) == 0
    for seed in (0, 1):
        ray_run, local_run = tmp_path / "ray" / f"seed{seed}", tmp_path / "local" / f"seed{seed}"
        assert records(ray_run / "metrics.jsonl") == records(local_run / "metrics.jsonl")
    assert cli(["train", "--resume", str(tmp_path / "ray"), "--steps", "300", "--backend", "ray"]) == 0
    assert [r["step"] for r in read_records(tmp_path / "ray" / "seed1" / "metrics.jsonl") if r["kind"] == "final"] \
        == [300]


def test_backend_options_need_seeds(tmp_path, capsys):
    assert cli(["train", "sac", "--backend", "ray", "--out", str(tmp_path / "x"), "--quiet"]) == 2
    assert "give --seeds too" in capsys.readouterr().err
    assert cli(["train", "sac", "--seeds", "0", "--address", "1.2.3.4:6379", "--out", str(tmp_path / "x")]) == 2
    assert "give --backend ray too" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
