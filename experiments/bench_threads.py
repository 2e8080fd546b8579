"""Concurrent runs and torch threads: do two runs at once cost more than one?

Runs ``pplrl train sac`` (Pendulum-v1, ``--steps`` env steps, defaults otherwise) as
separate processes, in rounds: one run alone, then two at once, each with ``--threads 1``
(the default) and, for comparison, with ``--threads N`` (N = the machine's cores, torch's
own default). Reports each configuration's wall-clock seconds (the slowest run of the
round, process start included, and the training time the runs log as ``wall_s``) and the
ratio of two-at-once to alone. Target (the diagnostics issue): two concurrent runs with the
default threads take <= 1.2x the time of one.

    python experiments/bench_threads.py [--steps 2000] [--repeats 1] [--out runs/bench_threads.json]

Prints a table and writes JSON. Needs an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pplrl.runfiles import write_result


def run_round(n: int, threads: int, steps: int, root: Path) -> dict:
    """``n`` runs started together; the round's wall time and each run's logged training time."""
    folders = [root / f"r{time.perf_counter_ns()}-{i}" for i in range(n)]
    cmds = [[sys.executable, "-m", "pplrl.cli", "train", "sac", "--env", "Pendulum-v1", "--steps", str(steps),
             "--seed", str(i), "--threads", str(threads), "--eval-every", str(steps), "--eval-episodes", "1",
             "--checkpoint-every", str(steps), "--quiet", "--out", str(f)] for i, f in enumerate(folders)]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    t0 = time.perf_counter()
    procs = [subprocess.Popen(c, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for c in cmds]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise SystemExit(f"error: a benchmark run failed: {err.strip().splitlines()[-1] if err.strip() else ''}")
    wall = time.perf_counter() - t0
    trained = []
    for f in folders:
        finals = [json.loads(line) for line in (f / "metrics.jsonl").read_text().splitlines()
                  if '"kind": "final"' in line]
        trained.append(finals[-1]["wall_s"])
    return {"runs": n, "threads": threads, "wall_s": wall, "train_s": max(trained)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=1, help="rounds of each configuration (median)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_threads.json"))
    args = p.parse_args(argv)
    cores = os.cpu_count() or 1
    configs = [(1, 1), (2, 1), (1, cores), (2, cores)]
    rounds: dict[tuple[int, int], list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.repeats):  # interleaved
            for n, threads in configs:
                rounds[(n, threads)].append(run_round(n, threads, args.steps, Path(tmp)))
    rows = []
    for (n, threads), rs in rounds.items():
        rows.append({"runs": n, "threads": threads, "wall_s": statistics.median(r["wall_s"] for r in rs),
                     "train_s": statistics.median(r["train_s"] for r in rs)})
    by = {(r["runs"], r["threads"]): r for r in rows}
    ratios = {f"threads={t}": {"wall": by[(2, t)]["wall_s"] / by[(1, t)]["wall_s"],
                               "train": by[(2, t)]["train_s"] / by[(1, t)]["train_s"]} for t in sorted({1, cores})}
    print(f"SAC on Pendulum-v1, {args.steps} steps per run, {cores} cores, median of {args.repeats} round(s)")
    print("runs at once  threads/run  wall s (slowest, with start-up)  training s (slowest)")
    for r in rows:
        print(f"{r['runs']:>12}  {r['threads']:>11}  {r['wall_s']:>31.1f}  {r['train_s']:>20.1f}")
    for k, v in ratios.items():
        print(f"two at once / one alone, {k}: wall {v['wall']:.2f}x, training {v['train']:.2f}x   (target <= 1.2x "
              f"with the default, threads=1)")
    result = {"steps": args.steps, "cores": cores, "repeats": args.repeats, "rows": rows, "ratios": ratios}
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
