"""Many seeds in one command: one run folder per seed under one folder.

    pplrl train sac --env Pendulum-v1 --seeds 0-9 --jobs 2 --out runs/sac10
    pplrl train --resume runs/sac10          # continues every seed's run
    pplrl diagnose runs/sac10                # reads the whole set

Each seed is an ordinary ``pplrl train`` run in ``OUT/seed<k>`` (its own config, metrics,
checkpoint and lock), started as a separate process with one torch thread unless
``--threads`` says otherwise, at most ``--jobs`` at a time. ``OUT/seeds.json`` lists the
set (algorithm, seeds, the arguments each run starts with) before any run starts. A line
is printed per finished seed and a table at the end. Ctrl-C stops every seed at its last
checkpoint; ``pplrl train --resume OUT`` continues the seeds that ran and starts those
that never did.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pplrl.runfiles import read_records

CONFIG = "config.json"
METRICS = "metrics.jsonl"
SEEDS = "seeds.json"  # the set: algorithm, seeds and the arguments each seed's run starts with


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"0,3,7"`` or ``"0-4,10"`` as a sorted list of distinct non-negative seeds."""
    seeds: set[int] = set()
    for part in str(text).split(","):
        part = part.strip()
        try:
            if "-" in part:
                low, high = (int(x) for x in part.split("-", 1))
                if low > high:
                    raise ValueError
                seeds.update(range(low, high + 1))
            else:
                seeds.add(int(part))
        except ValueError:
            raise ValueError(f"--seeds {text!r}: expected a range like 0-9 or a list like 0,3,7 of "
                             f"non-negative integers") from None
    if not seeds or min(seeds) < 0:
        raise ValueError(f"--seeds {text!r}: expected non-negative integers")
    return sorted(seeds)


def seed_folder(out: Path, seed: int) -> Path:
    return Path(out) / f"seed{seed}"


@dataclass
class SeedResult:
    name: str
    returncode: int
    message: str  # the run's last output line (its result or its error)
    wall_s: float
    final: dict | None  # the run's "final" record, if it finished


def _last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def _final_record(folder: Path) -> dict | None:
    finals = [r for r in read_records(folder / METRICS, warn_torn=False) if r["kind"] == "final"]
    return finals[-1] if finals else None


def run_local(jobs: list[tuple[str, Path, list[str]]], max_jobs: int, threads: int,
              report=print) -> tuple[list[SeedResult], bool]:
    """Run each ``(name, folder, argv)`` as ``python -m pplrl.cli ARGV`` in its own process,
    ``max_jobs`` at a time, each with ``threads`` OpenMP/MKL threads. Returns the results in
    the order given and whether the user interrupted (Ctrl-C). The children run in their own
    sessions, so a terminal's Ctrl-C reaches this process only, which sends each running
    child one SIGINT (it stops at its last checkpoint) and starts no more; a second Ctrl-C
    kills them (SIGKILL is safe for a run folder, too)."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    running: dict[str, subprocess.Popen] = {}
    lock = threading.Lock()
    stop = threading.Event()
    results: dict[str, SeedResult] = {}

    def one(name: str, folder: Path, argv: list[str]) -> None:
        t0 = time.perf_counter()
        with lock:  # checked and registered together: a child started after Ctrl-C is never missed
            if stop.is_set():
                return
            proc = subprocess.Popen([sys.executable, "-m", "pplrl.cli", *argv], env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, start_new_session=True)
            running[name] = proc
        out, err = proc.communicate()
        with lock:
            running.pop(name, None)
        message = _last_line(err) if proc.returncode != 0 else _last_line(out)
        result = SeedResult(name, proc.returncode, message, time.perf_counter() - t0,
                            _final_record(folder) if proc.returncode == 0 else None)
        results[name] = result
        report(f"{name}: " + (_summary(result) if proc.returncode == 0 else
                              f"failed (exit {exit_code(proc.returncode)}): {message}"))

    def signal_all(sig) -> None:
        with lock:
            for proc in running.values():
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    interrupted = False
    pool = ThreadPoolExecutor(max_workers=max_jobs)
    futures = [pool.submit(one, *job) for job in jobs]
    try:
        for f in futures:
            while not f.done():
                time.sleep(0.2)
    except KeyboardInterrupt:
        interrupted = True
        with lock:
            stop.set()
        signal_all(signal.SIGINT)
        try:
            for f in futures:
                while not f.done():
                    time.sleep(0.2)
        except KeyboardInterrupt:  # a second Ctrl-C: no more waiting
            signal_all(signal.SIGKILL)
    pool.shutdown(wait=True, cancel_futures=True)
    for f in futures:
        if f.done() and not f.cancelled() and f.exception() is not None:
            raise f.exception()
    return [results[name] for name, _, _ in jobs if name in results], interrupted


def exit_code(returncode: int) -> int:
    """A child's exit status as a shell reports it (a signal N as 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def _ray_task(argv: list[str], folder: str, threads: int) -> tuple[int, str, str, dict | None]:
    """One seed's ``pplrl train`` on a Ray worker: the same command the local backend runs,
    with the worker's own Python, so folders and results are the local backend's."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run([sys.executable, "-m", "pplrl.cli", *argv], env=env, capture_output=True, text=True)
    final = _final_record(Path(folder)) if done.returncode == 0 else None
    return done.returncode, done.stdout, done.stderr, final


def run_ray(jobs: list[tuple[str, Path, list[str]]], max_jobs: int | None, threads: int, address: str | None = None,
            report=print) -> tuple[list[SeedResult], bool]:
    """:func:`run_local` with each run a Ray task (``num_cpus=threads``): on a local Ray
    instance (started here and shut down after, unless this process already has one) or on
    the cluster at ``address``. The run folders must be paths every node sees (a shared
    filesystem); they are passed as absolute paths. ``max_jobs`` caps the tasks in flight
    (None: as many as Ray schedules). Ctrl-C cancels the tasks; each run keeps its last
    checkpoint."""
    try:
        import ray
    except ImportError:
        raise ValueError("--backend ray needs Ray: pip install 'pplrl[ray]'") from None
    started = False
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
        started = True
    task = ray.remote(num_cpus=threads, max_retries=0)(_ray_task)
    results: dict[str, SeedResult] = {}
    pending = list(jobs)
    in_flight: dict = {}
    interrupted = False
    try:
        while pending or in_flight:
            while pending and (max_jobs is None or len(in_flight) < max_jobs):
                name, folder, argv = pending.pop(0)
                in_flight[task.remote(argv, str(folder), threads)] = (name, time.perf_counter())
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            name, t0 = in_flight.pop(ready[0])
            try:
                code, out, err, final = ray.get(ready[0])
            except Exception as e:  # the task itself failed (a worker crash, out of memory): this seed failed
                code, out, err, final = 1, "", f"the Ray task failed: {type(e).__name__}: {e}", None
            message = _last_line(err) if code != 0 else _last_line(out)
            result = SeedResult(name, code, message, time.perf_counter() - t0, final)
            results[name] = result
            report(f"{name}: " + (_summary(result) if code == 0 else f"failed (exit {exit_code(code)}): {message}"))
    except KeyboardInterrupt:
        interrupted = True
        for ref in in_flight:
            ray.cancel(ref)  # the task's pplrl train is killed: its folder keeps the last checkpoint
        ray.wait(list(in_flight), num_returns=len(in_flight), timeout=30)
    finally:
        if started:
            ray.shutdown()
    return [results[name] for name, _, _ in jobs if name in results], interrupted


def _summary(result: SeedResult) -> str:
    f = result.final
    if f is None:
        return result.message
    return (f"final return {f['mean_return']:.1f} +- {f.get('std_return', float('nan')):.1f} over "
            f"{len(f['returns'])} episodes at {f['step']} steps ({result.wall_s:.0f} s)")


def table(results: list[SeedResult]) -> str:
    """One line per seed and the mean, median and standard error of the final returns."""
    rows = ["run        exit  final return   wall s", "---------  ----  ------------  -------"]
    finals = []
    for r in results:
        value = f"{r.final['mean_return']:12.1f}" if r.final else f"{'—':>12}"
        if r.final:
            finals.append(r.final["mean_return"])
        rows.append(f"{r.name:<9}  {exit_code(r.returncode):>4}  {value}  {r.wall_s:7.0f}")
    if finals:
        x = np.asarray(finals)
        se = x.std(ddof=1) / np.sqrt(len(x)) if len(x) > 1 else float("nan")
        rows.append(f"over {len(x)} finished run(s): mean {x.mean():.1f}, median {np.median(x):.1f}, "
                    f"standard error {se:.1f}")
    return "\n".join(rows)
