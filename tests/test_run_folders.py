"""Run folders that never lose or mix data, safe checkpoint loading, one error line per failure.

Each test is named after the failure it guards against (the numbered points of the issue
"Run folders that never lose or mix data"); each fails on the runner that had them."""

import errno
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from experiments_loader import records

from pplrl.algorithms import SAC, default_config
from pplrl.cli import main as cli
from pplrl.runfiles import RunFileError, RunLock, atomic_write_bytes, pack_checkpoint, read_records
from pplrl.runner import RunError, agent_from_checkpoint, evaluate, load_checkpoint, train

TINY = dict(hidden=(16, 16), batch_size=16, learning_starts=50)
RUN = dict(eval_every=100, eval_episodes=1, checkpoint_every=100, progress=False)
CLI_TINY = ["--quiet", "--eval-every", "100", "--eval-episodes", "1", "--checkpoint-every", "100",
            "--set", "hidden=16,16", "batch_size=16", "learning_starts=50"]


def tiny(algo="sac", **kw):
    return default_config(algo, **{**TINY, **kw})


def same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.policy.parameters(), b.policy.parameters())) and \
        all(torch.equal(p, q) for p, q in zip(a.critic.parameters(), b.critic.parameters()))


def error_lines(err: str) -> list[str]:
    """The lines a failure printed, warnings aside; a traceback would show up here too."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("warning:")]


def fail_writes(monkeypatch, fragment: str, exc: BaseException):
    """Make ``os.write`` raise ``exc`` on any file whose path contains ``fragment``."""
    real = os.write

    def write(fd, data):
        try:
            name = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            name = ""
        if fragment in name:
            raise exc
        return real(fd, data)

    monkeypatch.setattr(os, "write", write)


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


# 1. atomic replacement ---------------------------------------------------------------------
def test_a_kill_while_resume_rewrites_metrics_leaves_the_file_whole(tmp_path, monkeypatch):
    """The old runner cut metrics.jsonl back with write_text: a kill in the write left it empty."""
    with pytest.raises(KeyboardInterrupt):
        train("sac", tiny(), tmp_path, 400, callback=_interrupt_at(350), **RUN)
    before = (tmp_path / "metrics.jsonl").read_bytes()
    assert any(r["step"] > 200 for r in read_records(tmp_path / "metrics.jsonl"))  # records past the checkpoint
    with monkeypatch.context() as m:
        fail_writes(m, ".metrics.jsonl.", KeyboardInterrupt())
        with pytest.raises(KeyboardInterrupt):
            train("sac", None, tmp_path, None, resume=True, progress=False)
    assert (tmp_path / "metrics.jsonl").read_bytes() == before and no_temporary_files(tmp_path)
    # and the run still resumes to what an uninterrupted one gives
    resumed = train("sac", None, tmp_path, None, resume=True, progress=False)
    full = train("sac", tiny(), tmp_path / "full", 400, **RUN)
    assert same_weights(resumed, full)
    assert records(tmp_path / "metrics.jsonl") == records(tmp_path / "full" / "metrics.jsonl")


def test_atomic_write_keeps_the_old_content_on_any_failure(tmp_path, monkeypatch):
    f = tmp_path / "x.json"
    atomic_write_bytes(f, b"old")
    fail_writes(monkeypatch, ".x.json.", OSError(errno.EIO, "Input/output error"))
    with pytest.raises(RunFileError, match=r"cannot write .*x\.json.*previous file was kept"):
        atomic_write_bytes(f, b"new" * 1000)
    assert f.read_bytes() == b"old" and no_temporary_files(tmp_path)


def _interrupt_at(step_to_stop):
    def callback(step, metrics):
        if step == step_to_stop:
            raise KeyboardInterrupt

    return callback


# 2. one process per folder ---------------------------------------------------------------------
def _hold_lock(folder: Path) -> subprocess.Popen:
    code = ("import sys, time; from pplrl.runfiles import RunLock; RunLock(sys.argv[1]).acquire(); "
            "print('locked', flush=True); time.sleep(120)")
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_naming_the_pid_and_a_dead_ones_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "sac", "--out", str(run), "--steps", "200", *CLI_TINY]) == 0
    metrics = (run / "metrics.jsonl").read_bytes()
    holder = _hold_lock(run)
    try:
        capsys.readouterr()
        assert cli(["train", "--resume", str(run), "--steps", "300", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert f"in use by PID {holder.pid}" in err and len(error_lines(err)) == 1
        assert cli(["train", "sac", "--out", str(run), "--steps", "200", *CLI_TINY]) == 2
        assert f"in use by PID {holder.pid}" in capsys.readouterr().err
        with pytest.raises(RunFileError, match="in use"):  # a second lock in this process too
            RunLock(run).acquire()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert (run / "metrics.jsonl").read_bytes() == metrics  # nothing was mixed in
    assert cli(["train", "--resume", str(run), "--steps", "300", "--quiet"]) == 0
    assert f"took over the stale lock of PID {holder.pid}" in capsys.readouterr().err
    assert (run / "run.lock").read_text() == ""  # released on exit


def test_a_lock_is_released_on_every_exit(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        train("sac", tiny(), tmp_path, 300, callback=_interrupt_at(250), **RUN)
    RunLock(tmp_path).acquire().release()  # not left held by the interrupted run
    with pytest.raises(ValueError, match="steps"):
        train("sac", None, tmp_path, 100, resume=True, progress=False)  # below the checkpoint's step
    RunLock(tmp_path).acquire().release()


# 3. torn last line ---------------------------------------------------------------------------
def test_a_torn_last_line_is_dropped_with_a_warning_and_nothing_else_is_lost(tmp_path, capsys):
    run = tmp_path / "run"
    train("sac", tiny(), run, 200, **RUN)
    whole = read_records(run / "metrics.jsonl")
    with open(run / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 201, "kind": "tr')  # a full disk in the middle of an append
    n = len((run / "metrics.jsonl").read_bytes().splitlines())
    assert read_records(run / "metrics.jsonl") == whole
    assert f"metrics.jsonl: line {n} is torn" in capsys.readouterr().err
    assert cli(["diagnose", str(tmp_path)]) == 0
    assert f"line {n} is torn" in capsys.readouterr().err
    assert cli(["eval", str(run), "--episodes", "1"]) == 0
    resumed = train("sac", None, run, 400, resume=True, progress=False)
    full = train("sac", tiny(), tmp_path / "full", 400, **RUN)
    assert same_weights(resumed, full)
    assert records(run / "metrics.jsonl") == records(tmp_path / "full" / "metrics.jsonl")
    # a bad line that is not the last is an error naming the file and the line
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(RunFileError, match=r"metrics\.jsonl: line 2 is not a metrics record"):
        read_records(run / "metrics.jsonl")


# 4. no code runs from a checkpoint --------------------------------------------------------
class _Touch:
    """Unpickling this creates a file: what a crafted checkpoint would do."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (Path.touch, (Path(self.path),))


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    train("sac", tiny(), run, 200, **RUN)
    marker = tmp_path / "pwned"
    state = load_checkpoint(run)
    state["agent"] = {"payload": _Touch(marker)}
    import io

    buf = io.BytesIO()
    torch.save(state, buf)
    (run / "checkpoint.pt").write_bytes(pack_checkpoint(buf.getvalue()))  # a valid checksum: only the pickle is bad
    assert cli(["eval", str(run), "--episodes", "1"]) == 2
    err = capsys.readouterr().err
    assert "unsafe to load" in err and len(error_lines(err)) == 1
    assert cli(["train", "--resume", str(run), "--steps", "300", "--quiet"]) == 2
    assert not marker.exists()
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False)  # what the old loader did: the file appears
    assert marker.exists()


def test_checkpoints_hold_numpy_state_and_load_weights_only(tmp_path):
    """Replay buffers and RNG states are numpy: they round-trip through weights-only loading."""
    agent = train("sac", tiny(), tmp_path, 200, **RUN)
    raw = (tmp_path / "checkpoint.pt").read_bytes().partition(b"\n")[2]
    import io

    torch.load(io.BytesIO(raw), weights_only=True)  # no allow-list needed
    loaded, state = agent_from_checkpoint(tmp_path)
    assert isinstance(state["numpy_rng"][1], np.ndarray) and state["numpy_rng"][1].dtype == np.uint32
    np.testing.assert_array_equal(loaded.replay.obs[:200], agent.replay.obs[:200])
    with pytest.raises(pickle.UnpicklingError):  # while a function reference is refused
        torch.load(io.BytesIO(_pickled_function()), weights_only=True)


def _pickled_function() -> bytes:
    import io

    buf = io.BytesIO()
    torch.save({"f": os.getcwd}, buf)
    return buf.getvalue()


# 5. killed before the first checkpoint ----------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_restarts_from_step_0(tmp_path, capsys):
    run = tmp_path / "run"
    settings = dict(eval_every=100, eval_episodes=1, checkpoint_every=1000, progress=False)
    with pytest.raises(KeyboardInterrupt):
        train("sac", tiny(), run, 300, callback=_interrupt_at(120), **settings)
    assert not (run / "checkpoint.pt").exists() and (run / "config.json").exists()
    with pytest.raises(RunError, match="never reached a checkpoint; use --resume to restart it from step 0"):
        train("sac", tiny(), run, 300, **settings)
    capsys.readouterr()
    resumed = train("sac", None, run, None, resume=True, progress=False)
    err = capsys.readouterr().err
    assert "has no checkpoint" in err and "restarting it from step 0" in err
    full = train("sac", tiny(), tmp_path / "full", 300, **settings)
    assert same_weights(resumed, full)
    assert records(run / "metrics.jsonl") == records(tmp_path / "full" / "metrics.jsonl")


# 6. settings are saved; resume applies or refuses, never ignores ----------------------------
def test_resume_keeps_every_setting_and_extends_the_step_target(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "sac", "--out", str(run), "--steps", "200", *CLI_TINY]) == 0
    capsys.readouterr()
    assert cli(["train", "--resume", str(run), "--steps", "400", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "400 steps" in out and "over 1 episodes" in out  # the saved eval_episodes, not the default 5
    saved = json.loads((run / "config.json").read_text())
    assert saved["steps"] == 400 and saved["run"] == {"eval_every": 100, "eval_episodes": 1, "checkpoint_every": 100,
                                                      "threads": 1, "steps": 400}
    evals = [r["step"] for r in read_records(run / "metrics.jsonl") if r["kind"] == "eval"]
    assert evals == [100, 200, 300, 400]  # the saved cadence (the default 1000 gave none)
    assert load_checkpoint(run)["step"] == 400


@pytest.mark.parametrize("given, named", [
    (["--seed", "1"], "--seed"), (["--env", "MountainCarContinuous-v0"], "--env"), (["--set", "lr=1e-3"], "--set"),
    (["--eval-every", "50"], "--eval-every"), (["--eval-episodes", "3"], "--eval-episodes"),
    (["--checkpoint-every", "500"], "--checkpoint-every"), (["--threads", "2"], "--threads"),
    (["--steps", "100"], "steps can only grow"),
])
def test_arguments_given_with_resume_are_refused_naming_them(tmp_path, capsys, given, named):
    run = tmp_path / "run"
    assert cli(["train", "sac", "--out", str(run), "--steps", "200", *CLI_TINY]) == 0
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.name != "run.lock"}
    capsys.readouterr()
    assert cli(["train", "--resume", str(run), "--quiet", *given]) == 2
    err = capsys.readouterr().err
    assert named in err and len(error_lines(err)) == 1
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.name != "run.lock"} == before
    assert cli(["train", "mbpo", "--resume", str(run), "--quiet"]) == 2
    assert "ALGO mbpo differs" in capsys.readouterr().err
    assert cli(["train", "sac", "--resume", str(run), "--quiet", "--seed", "0"]) == 0  # equal values are fine


@pytest.mark.parametrize("edit, named", [
    (lambda c: c["config"].update(lr=1e-3), "lr"),
    (lambda c: c["config"].update(lr="abc"), "lr"),
    (lambda c: c["config"].update(lrr=1.0), "lrr"),
    (lambda c: c["run"].update(eval_every=7), "eval_every"),
])
def test_a_hand_edited_config_json_is_refused_naming_the_keys(tmp_path, capsys, edit, named):
    run = tmp_path / "run"
    train("sac", tiny(), run, 200, **RUN)
    saved = json.loads((run / "config.json").read_text())
    edit(saved)
    (run / "config.json").write_text(json.dumps(saved))
    metrics = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert cli(["train", "--resume", str(run), "--steps", "300", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert named in err and "Traceback" not in err and len(error_lines(err)) == 1
    assert (run / "metrics.jsonl").read_bytes() == metrics and load_checkpoint(run)["step"] == 200


# 7. every argument checked before training ---------------------------------------------------
@pytest.mark.parametrize("args, message", [
    (["sac", "--steps", "0"], "steps must be a positive integer, got 0"),
    (["sac", "--steps", "-5"], "steps must be a positive integer"),
    (["sac", "--eval-episodes", "0"], "eval_episodes must be a positive integer"),
    (["sac", "--eval-every", "0"], "eval_every must be a positive integer"),
    (["sac", "--set", "lr=inf"], "lr must be finite"),
    (["sac", "--set", "lr=nan"], "lr must be finite"),
    (["beta-vmbpo", "--set", "beta_init=1e-4"], "beta_init = 0.0001 is below beta_min"),
])
def test_bad_settings_are_refused_before_anything_is_written(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    t0 = time.perf_counter()
    assert cli(["train", *args, "--out", str(out), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists() and time.perf_counter() - t0 < 30  # refused up front, not after training


# 8. disk full ---------------------------------------------------------------------------------
def test_a_full_disk_while_checkpointing_names_the_file_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    run = tmp_path / "run"
    train("sac", tiny(), run, 200, **RUN)
    with monkeypatch.context() as m:
        fail_writes(m, ".checkpoint.pt.", OSError(errno.ENOSPC, "No space left on device"))
        assert cli(["train", "--resume", str(run), "--steps", "400", "--quiet"]) == 4
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1
    assert f"no space left on device while writing {run / 'checkpoint.pt'}" in err
    assert no_temporary_files(run) and load_checkpoint(run)["step"] == 200
    assert cli(["train", "--resume", str(run), "--quiet"]) == 0  # space again: it goes on from the kept checkpoint
    full = train("sac", tiny(), tmp_path / "full", 400, **RUN)
    assert same_weights(agent_from_checkpoint(run)[0], full)
    assert records(run / "metrics.jsonl") == records(tmp_path / "full" / "metrics.jsonl")


# 9. checksums ---------------------------------------------------------------------------------
def test_a_corrupted_checkpoint_is_refused_before_anything_changes(tmp_path, capsys):
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        train("sac", tiny(), run, 400, callback=_interrupt_at(350), **RUN)
    data = bytearray((run / "checkpoint.pt").read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit in the payload
    (run / "checkpoint.pt").write_bytes(bytes(data))
    metrics = (run / "metrics.jsonl").read_bytes()
    assert cli(["eval", str(run), "--episodes", "1"]) == 2
    assert "sha256 does not match" in capsys.readouterr().err
    assert cli(["train", "--resume", str(run), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "corrupt" in err and len(error_lines(err)) == 1
    assert (run / "metrics.jsonl").read_bytes() == metrics  # not cut back
    (run / "bad").mkdir()
    (run / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="no checksum header"):
        load_checkpoint(run / "bad")


# 10. extending a run that ended mid-episode ---------------------------------------------------
@pytest.mark.parametrize("algo, extra", [
    ("sac", {}),
    ("mbpo", dict(gradient_steps=1, model_train_freq=100, model_epochs=1, model_min_updates=0, ensemble_size=3,
                  num_elites=2, model_hidden=(16, 16), rollout_batch_size=32, model_buffer_size=1000)),
])
def test_extending_a_run_that_ended_mid_episode_equals_the_longer_run(tmp_path, algo, extra):
    short = train(algo, tiny(algo, **extra), tmp_path / "cut", 290, **RUN)  # Pendulum episodes are 200 steps
    assert load_checkpoint(tmp_path / "cut")["episode_state"]["ep_len"] == 90
    assert short.steps_seen == 290
    extended = train(algo, None, tmp_path / "cut", 450, resume=True, progress=False)
    full = train(algo, tiny(algo, **extra), tmp_path / "full", 450, **RUN)
    assert same_weights(extended, full)
    if algo == "mbpo":
        assert all(torch.equal(p, q) for p, q in zip(extended.ensemble.parameters(), full.ensemble.parameters()))
    assert records(tmp_path / "cut" / "metrics.jsonl") == records(tmp_path / "full" / "metrics.jsonl")
    episodes = [r for r in read_records(tmp_path / "cut" / "metrics.jsonl") if r["kind"] == "episode"]
    assert [r["step"] for r in episodes] == [200, 400]


# 11. one error line and an exit code for every failure -------------------------------------
def test_a_nan_stop_is_one_line_with_exit_code_3(tmp_path, capsys, monkeypatch):
    original = SAC.critic_target_value

    def poisoned(self, batch):
        y = original(self, batch)
        return y * float("nan") if self.steps_seen >= 250 else y

    monkeypatch.setattr(SAC, "critic_target_value", poisoned)
    assert cli(["train", "sac", "--out", str(tmp_path / "run"), "--steps", "300", *CLI_TINY]) == 3
    err = capsys.readouterr().err
    assert len(error_lines(err)) == 1 and err.startswith("error: numerical stop: ") and "step 250" in err
    assert load_checkpoint(tmp_path / "run")["step"] == 200  # checkpoints come at episode ends


def test_ctrl_c_is_one_line_with_exit_code_130(tmp_path, capsys, monkeypatch):
    original = SAC.observe

    def observe(self, *args):
        if self.steps_seen == 150:
            raise KeyboardInterrupt
        return original(self, *args)

    monkeypatch.setattr(SAC, "observe", observe)
    run = tmp_path / "run"
    assert cli(["train", "sac", "--out", str(run), "--steps", "300", *CLI_TINY]) == 130
    err = capsys.readouterr().err
    assert error_lines(err) == [f"error: interrupted; the last checkpoint in {run} and its logs were kept "
                                f"(continue with `pplrl train --resume {run}`)"]


def test_unusable_out_folders_are_one_line(tmp_path, capsys, monkeypatch):
    (tmp_path / "file").write_text("x")
    cases = [(tmp_path / "file", "is a file, not a folder"), (tmp_path / "file" / "run", "which is a file")]
    for out, message in cases:
        assert cli(["train", "sac", "--out", str(out), "--steps", "100", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert message in err and len(error_lines(err)) == 1
    assert (tmp_path / "file").read_text() == "x"

    def no_permission(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", no_permission)
    assert cli(["train", "sac", "--out", str(tmp_path / "ro" / "run"), "--steps", "100", "--quiet"]) == 2
    assert error_lines(capsys.readouterr().err) == [f"error: cannot create run folder {tmp_path / 'ro' / 'run'}: "
                                                    f"Permission denied"]


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        cli(["--debug", "train", "sac", "--steps", "0", "--out", str(tmp_path / "x")])


# the random-kill experiment -----------------------------------------------------------------
@pytest.mark.slow
def test_random_sigkills_and_resumes_end_where_an_uninterrupted_run_ends(tmp_path):
    """Start, SIGKILL at a random moment, resume, ... until a run finishes: the final metrics
    and parameters equal an uninterrupted run's, bit for bit."""
    args = ["--steps", "1000", *CLI_TINY]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    pplrl = [sys.executable, "-m", "pplrl.cli"]
    subprocess.run([*pplrl, "train", "sac", "--out", str(tmp_path / "full"), *args], check=True, env=env,
                   capture_output=True)
    rng = np.random.default_rng(0)
    cut, kills = tmp_path / "cut", 0
    for _ in range(60):
        cmd = [*pplrl, "train", "--resume", str(cut), "--quiet"] if (cut / "config.json").exists() else \
            [*pplrl, "train", "sac", "--out", str(cut), *args]
        with open(tmp_path / "stderr.txt", "w") as log:
            proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)
            try:
                proc.wait(timeout=float(rng.uniform(1.0, 8.0)))
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                kills += 1
                continue
        assert proc.returncode == 0, (tmp_path / "stderr.txt").read_text()
        break
    else:
        pytest.fail("the run never finished")
    assert kills >= 3 and no_temporary_files(cut)
    assert records(cut / "metrics.jsonl") == records(tmp_path / "full" / "metrics.jsonl")
    assert same_weights(agent_from_checkpoint(cut)[0], agent_from_checkpoint(tmp_path / "full")[0])


# logging: means, clocks, the final evaluation, threads --------------------------------------
def test_train_records_are_means_over_the_updates_since_the_last_record(tmp_path):
    seen = {}

    def collect(step, metrics):
        if metrics:
            seen[step] = metrics

    train("sac", tiny(), tmp_path, 300, callback=collect, **RUN)
    train_records = [r for r in read_records(tmp_path / "metrics.jsonl") if r["kind"] == "train"]
    assert [r["step"] for r in train_records] == [100, 200, 300]  # updates start after learning_starts=50
    for record in train_records:
        window = [m for step, m in seen.items() if record["step"] - 100 < step <= record["step"]]
        assert len(window) == (51 if record["step"] == 100 else 100)  # updates from step 50 on
        for key in ("critic_loss", "actor_loss", "alpha", "elbo_kl_policy"):
            assert record[key] == pytest.approx(np.mean([m[key] for m in window]), rel=1e-12)
        assert record["critic_loss"] != window[-1]["critic_loss"]  # not the last minibatch's value
    walls = [r["wall_s"] for r in train_records]
    assert walls == sorted(walls) and walls[0] > 0 and all(r["steps_per_s"] > 0 for r in train_records)


def test_the_final_evaluation_is_a_record_and_is_what_the_cli_prints(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli(["train", "sac", "--out", str(run), "--steps", "200", *CLI_TINY]) == 0
    finals = [r for r in read_records(run / "metrics.jsonl") if r["kind"] == "final"]
    assert len(finals) == 1 and finals[0]["step"] == 200 and len(finals[0]["returns"]) == 1
    assert f"final evaluation return {finals[0]['mean_return']:.1f} +- 0.0 over 1 episodes" in capsys.readouterr().out
    assert finals[0]["returns"] == evaluate(agent_from_checkpoint(run)[0], "Pendulum-v1", 1, seed=10_000)
    assert cli(["train", "--resume", str(run), "--steps", "300", "--quiet"]) == 0  # extended: one final, at the end
    assert [r["step"] for r in read_records(run / "metrics.jsonl") if r["kind"] == "final"] == [300]


def test_threads_are_set_for_the_run_saved_and_restored(tmp_path):
    before = torch.get_num_threads()
    during = []
    train("sac", tiny(), tmp_path, 120, threads=2, callback=lambda step, m: during.append(torch.get_num_threads()),
          **RUN)
    assert set(during) == {2} and torch.get_num_threads() == before
    assert json.loads((tmp_path / "config.json").read_text())["run"]["threads"] == 2
    with pytest.raises(ValueError, match="threads = 1"):
        train("sac", None, tmp_path, 200, threads=1, resume=True, progress=False)
    during.clear()
    train("sac", None, tmp_path, 240, resume=True, progress=False,
          callback=lambda step, m: during.append(torch.get_num_threads()))
    assert set(during) == {2}


def test_a_run_trains_with_subnormals_flushed_and_restores_the_flag(tmp_path):
    from pplrl.device import denormals_flushed

    assert not denormals_flushed()
    during = []
    train("sac", tiny(), tmp_path, 120, callback=lambda step, m: during.append(denormals_flushed()), **RUN)
    assert during and all(during) and not denormals_flushed()


def test_tensorboard_mirrors_the_records_or_says_what_to_install(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(ValueError, match=r"pip install 'pplrl\[tensorboard\]'"):
            train("sac", tiny(), tmp_path / "run", 200, tensorboard=True, **RUN)
        assert not (tmp_path / "run").exists()
        return
    train("sac", tiny(), tmp_path / "run", 200, tensorboard=True, **RUN)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    tags = events.Tags()["scalars"]
    assert "train/critic_loss" in tags and "eval/mean_return" in tags and "final/mean_return" in tags
    evals = [r["mean_return"] for r in read_records(tmp_path / "run" / "metrics.jsonl") if r["kind"] == "eval"]
    assert [e.value for e in events.Scalars("eval/mean_return")] == pytest.approx(evals)


# review follow-ups ---------------------------------------------------------------------------
def test_temporaries_of_a_killed_process_are_removed_and_files_keep_the_usual_mode(tmp_path):
    train("sac", tiny(), tmp_path, 200, **RUN)
    stale = tmp_path / ".checkpoint.pt.abc123.tmp"  # what a SIGKILL mid-checkpoint leaves
    stale.write_bytes(b"x" * 1000)
    train("sac", None, tmp_path, 300, resume=True, progress=False)
    assert not stale.exists() and no_temporary_files(tmp_path)
    mask = os.umask(0)
    os.umask(mask)
    for name in ("config.json", "metrics.jsonl", "checkpoint.pt"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o666 & ~mask, name


def test_a_resume_that_fails_while_restoring_changes_no_file(tmp_path, monkeypatch):
    train("sac", tiny(), tmp_path, 290, **RUN)  # ends mid-episode: resuming replays the episode
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "run.lock"}

    def diverges(*args, **kwargs):
        raise RunError("the unfinished episode did not replay exactly")

    monkeypatch.setattr("pplrl.runner._replay_episode", diverges)
    with pytest.raises(RunError, match="did not replay"):
        train("sac", None, tmp_path, 400, resume=True, progress=False)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != "run.lock"} == before


def test_an_agent_state_no_checkpoint_can_hold_is_refused_before_training(tmp_path):
    import collections

    class Unsaveable(SAC):
        algo = "unsaveable-sac-test"

        def state_dict(self):
            return {**super().state_dict(), "history": collections.deque([1, 2])}

    with pytest.raises(RunError, match=r"\['history'\] holds a collections.deque"):
        train(Unsaveable, tiny(), tmp_path / "run", 200, **RUN)
    assert not (tmp_path / "run").exists()
    from pplrl.algorithms import ALGORITHMS

    ALGORITHMS.pop("unsaveable-sac-test", None)


def test_out_with_resume_and_missing_paths_are_bad_input(tmp_path, capsys):
    train("sac", tiny(), tmp_path / "run", 200, **RUN)
    assert cli(["train", "--resume", str(tmp_path / "run"), "--out", str(tmp_path / "other"), "--quiet"]) == 2
    assert "cannot be given with --resume" in capsys.readouterr().err
    assert cli(["diagnose", str(tmp_path / "nowhere")]) == 2
    assert cli(["eval", str(tmp_path / "nowhere")]) == 2
