"""Benchmark on Pendulum-v1 (or any continuous env): pplrl agents beside
stable-baselines3 SAC.

Every run: evaluation every ``--eval-every`` env steps (deterministic policy,
``--eval-episodes`` episodes on a separately seeded env, the same seeds for every
algorithm), wall-clock of the whole run. Runs go to a pool of ``--jobs`` worker
processes with one torch thread each, so all algorithms are timed under the same
load. Prints a table (mean and median over seeds of the evaluation return at each
checkpoint, median wall-clock, ratios to SB3) and writes JSON.

    python experiments/bench_pendulum.py                       # sac, mbpo, sb3-sac; 3 seeds; 10k steps
    python experiments/bench_pendulum.py --algos sac --steps 150000 --env Hopper-v5
    python experiments/bench_pendulum.py --algos sac virel virel-beta memb --set mbpo:gradient_steps=5 \
        --algo-steps memb=5000
    python experiments/bench_pendulum.py --merge A.json B.json --paired beta-vmbpo vmbpo
    python experiments/bench_pendulum.py --plugin examples/behaviour_prior.py --algos behaviour-prior sac \
        --steps 5000 --paired behaviour-prior sac        # a user's objective beside SAC

``--paired A B`` adds the per-seed paired difference A − B at each checkpoint (mean,
standard error, 95% t-interval, seeds with A ≥ B): the way to say whether one
algorithm is ahead of another beyond seed noise.

``--set KEY=VALUE`` applies to every pplrl agent, ``--set ALGO:KEY=VALUE`` to one;
``--algo-steps ALGO=N`` gives one algorithm its own step budget. The JSON is rewritten
after every finished run, so an interrupted benchmark keeps what it finished.

stable-baselines3 is optional (``pip install stable-baselines3``); without it the
SB3 rows are skipped with a note.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


class _TimeUp(Exception):
    """Raised by the training callback when a run passes ``--time-limit``."""


def run_pplrl(algo: str, env_id: str, seed: int, steps: int, eval_every: int, eval_episodes: int,
              overrides: list[str], time_limit: float | None = None, run_dir: str | None = None,
              plugins: tuple[str, ...] = (), checkpoint_every: int | None = None, resume: bool = False) -> dict:
    """One pplrl run, checkpointed every ``checkpoint_every`` steps (default: at its end).
    ``resume`` with ``run_dir``: a run an earlier call left there (same config) continues from
    its last checkpoint."""
    import torch

    torch.set_num_threads(1)
    from pplrl.algorithms import apply_overrides, default_config
    from pplrl.plugins import load_plugin
    from pplrl.runfiles import read_records
    from pplrl.runner import CONFIG, train, train_or_resume

    for plugin in plugins:  # each worker is a fresh process: load the user's algorithms there
        load_plugin(plugin)
    config = apply_overrides(default_config(algo, env_id=env_id, seed=seed), overrides)
    t0 = time.perf_counter()

    def stop_when_time_is_up(step, metrics):
        if time_limit is not None and time.perf_counter() - t0 > time_limit:
            raise _TimeUp(step)

    truncated = None
    resumed = resume and bool(run_dir) and (Path(run_dir) / CONFIG).exists()
    with contextlib.nullcontext(run_dir) if run_dir else tempfile.TemporaryDirectory() as out:
        try:
            (train_or_resume if resume else train)(
                algo, config, out, steps, eval_every=eval_every, eval_episodes=eval_episodes,
                checkpoint_every=checkpoint_every or steps, progress=False, callback=stop_when_time_is_up)
        except _TimeUp as e:
            truncated = int(e.args[0])
        wall = time.perf_counter() - t0
        records = read_records(Path(out) / "metrics.jsonl")
    evals = [r for r in records if r["kind"] == "eval"]
    out = {"algo": algo, "seed": seed, "steps": [r["step"] for r in evals],
           "returns": [r["mean_return"] for r in evals], "wall_s": wall}
    if resumed:  # this call's wall-clock is only the rest: take the run's training time over all its calls
        out["resumed"] = True
        out["wall_s"] = next(r["wall_s"] for r in reversed(records) if "wall_s" in r)
    if truncated is not None:
        out["stopped_at_step"] = truncated  # --time-limit: the curve ends early
    return out


def run_sb3(env_id: str, seed: int, steps: int, eval_every: int, eval_episodes: int) -> dict:
    import torch

    torch.set_num_threads(1)
    from stable_baselines3 import SAC as SB3SAC
    from stable_baselines3.common.callbacks import BaseCallback

    from pplrl.envs.continuous import make_continuous_env

    class Evaluator(BaseCallback):
        def __init__(self):
            super().__init__()
            self.steps, self.returns = [], []

        def _on_step(self) -> bool:
            if self.num_timesteps % eval_every == 0:
                env = make_continuous_env(env_id)
                rets = []
                for i in range(eval_episodes):
                    obs, _ = env.reset(seed=seed + 10_000 + i)
                    done, total = False, 0.0
                    while not done:
                        act, _ = self.model.predict(obs, deterministic=True)
                        obs, r, term, trunc, _ = env.step(act)
                        total += float(r)
                        done = term or trunc
                    rets.append(total)
                self.steps.append(self.num_timesteps)
                self.returns.append(float(np.mean(rets)))
            return True

    env = make_continuous_env(env_id)
    cb = Evaluator()
    t0 = time.perf_counter()
    model = SB3SAC("MlpPolicy", env, seed=seed, learning_starts=1000, verbose=0, device="cpu")
    model.learn(steps, callback=cb)
    return {"algo": "sb3-sac", "seed": seed, "steps": cb.steps, "returns": cb.returns,
            "wall_s": time.perf_counter() - t0}


def _job(args):
    kind, kwargs = args
    try:
        return run_sb3(**kwargs) if kind == "sb3" else run_pplrl(**kwargs)
    except Exception as e:
        return {"algo": kwargs.get("algo", "sb3-sac"), "seed": kwargs["seed"], "error": f"{type(e).__name__}: {e}"}


def overrides_for(algo: str, items: list[str]) -> list[str]:
    """``KEY=VALUE`` items for every agent plus ``ALGO:KEY=VALUE`` items for ``algo``."""
    out = []
    for item in items:
        head, _, rest = item.partition("=")
        if ":" in head:
            target, key = head.split(":", 1)
            if target == algo:
                out.append(f"{key}={rest}")
        else:
            out.append(item)
    return out


def table(results: list[dict], checkpoints: list[int]) -> str:
    algos = list(dict.fromkeys(r["algo"] for r in results))
    lines = [f"{'algorithm':>12} {'seeds':>5} " + " ".join(f"{c:>14d}" for c in checkpoints)
             + f" {'wall s (med)':>13} {'wall/sb3':>9}"]
    sb3_wall = [r["wall_s"] for r in results if r["algo"] == "sb3-sac" and "error" not in r]
    for algo in algos:
        runs = [r for r in results if r["algo"] == algo and "error" not in r]
        if not runs:
            lines.append(f"{algo:>12} failed: {[r['error'] for r in results if r['algo'] == algo][0]}")
            continue
        cells = []
        for c in checkpoints:
            vals = [r["returns"][r["steps"].index(c)] for r in runs if c in r["steps"]]
            partial = "*" if 0 < len(vals) < len(runs) else " "  # some seeds stopped by --time-limit
            cells.append(f"{np.mean(vals):7.1f}/{np.median(vals):5.1f}{partial}" if vals else f"{'-':>14}")
        wall = statistics.median(r["wall_s"] for r in runs)
        same_machine = {r.get("source") for r in runs} == {r.get("source") for r in results if r["algo"] == "sb3-sac"}
        ratio = f"{wall / statistics.median(sb3_wall):9.2f}" if sb3_wall and same_machine else f"{'-':>9}"
        lines.append(f"{algo:>12} {len(runs):>5} " + " ".join(cells) + f" {wall:13.0f} {ratio}")
    if any("stopped_at_step" in r for r in results):
        lines.append("* over fewer seeds: some runs were stopped by --time-limit before this checkpoint")
    return "\n".join(lines)


def seed_table(results: list[dict], checkpoints: list[int]) -> str:
    """Every run's evaluation return at each checkpoint, one line per seed and algorithm
    (``-`` where a run has no evaluation at that checkpoint, e.g. one still going)."""
    lines = [f"{'seed':>5} {'algorithm':>12} " + " ".join(f"{c:>9d}" for c in checkpoints)]
    for r in sorted((r for r in results if "error" not in r), key=lambda r: (r["seed"], r["algo"])):
        curve = dict(zip(r["steps"], r["returns"]))
        lines.append(f"{r['seed']:>5} {r['algo']:>12} "
                     + " ".join(f"{curve[c]:9.1f}" if c in curve else f"{'-':>9}" for c in checkpoints))
    return "\n".join(lines)


def paired_curves(results: list[dict], a: str, b: str) -> dict[int, tuple[dict, dict]]:
    """``{seed: (a's curve, b's curve)}`` over the seeds both finished, each curve ``{step:
    return}``; a SystemExit naming the algorithm that has no finished run."""
    curves = {algo: {r["seed"]: dict(zip(r["steps"], r["returns"])) for r in results
                     if r["algo"] == algo and "error" not in r} for algo in (a, b)}
    for algo in (a, b):
        if not curves[algo]:
            have = sorted({r['algo'] for r in results})
            raise SystemExit(f"error: --paired: no finished runs of {algo!r} (have {have})")
    return {seed: (curves[a][seed], curves[b][seed]) for seed in sorted(curves[a].keys() & curves[b].keys())}


def difference_summary(diffs) -> dict:
    """Mean of per-seed differences a − b, its standard error, a 95% Student-t interval (NaN
    for one seed) and how many seeds have a ≥ b."""
    from scipy import stats

    from pplrl.diagnostics import standard_error

    diffs = np.asarray(diffs, dtype=float)
    n, mean, se = len(diffs), float(diffs.mean()), standard_error(diffs)
    half = float(stats.t.ppf(0.975, n - 1) * se) if n > 1 else float("nan")
    return {"seeds": n, "mean_diff": mean, "se": se, "ci95": [mean - half, mean + half],
            "a_at_least_b": int((diffs >= 0).sum())}


def paired(results: list[dict], a: str, b: str) -> list[dict]:
    """Paired comparison of algorithm ``a`` against ``b`` over the seeds both ran: at each
    checkpoint the mean of the per-seed differences (a − b) of the evaluation return, its
    standard error, a 95% Student-t interval, and how many seeds have a ≥ b. Pairing by
    seed removes what the seed shares across algorithms (the evaluation start states)."""
    pairs = list(paired_curves(results, a, b).values())
    rows = []
    for step in sorted({s for ca, _ in pairs for s in ca}):
        diffs = [ca[step] - cb[step] for ca, cb in pairs if step in ca and step in cb]
        if diffs:
            rows.append({"step": step, **difference_summary(diffs)})
    return rows


def paired_over_curve(results: list[dict], a: str, b: str, start: int = 0) -> dict | None:
    """One paired comparison of the whole learning curve: per seed, the mean of a − b over the
    checkpoints from ``start`` on that every pair has, then :func:`difference_summary` over
    seeds. A single test, so no correction for looking at several checkpoints is needed (the
    area between the curves, up to the checkpoint spacing). ``start``: leave out checkpoints
    before it, e.g. those inside a warm-up that evaluate untrained policies. None when fewer
    than two seeds pair."""
    pairs = paired_curves(results, a, b)
    steps = sorted(t for t in set.intersection(*(set(ca) & set(cb) for ca, cb in pairs.values()))
                   if t >= start) if pairs else []
    if len(pairs) < 2 or not steps:
        return None
    return {"steps": steps, **difference_summary([np.mean([ca[t] - cb[t] for t in steps])
                                                  for ca, cb in pairs.values()])}


def add_paired(out: dict, compare: list[str] | None, curve_from: int = 0) -> None:
    """``out["paired"]`` for ``--paired A B`` (if given), and print its table; the whole-curve
    test from checkpoint ``curve_from`` on."""
    if compare:
        curve = paired_over_curve(out["results"], *compare, start=curve_from)
        out["paired"] = {"a": compare[0], "b": compare[1], "rows": paired(out["results"], *compare),
                         "over_curve": curve}
        print(paired_table(out["paired"]["rows"], *compare, curve))


def paired_table(rows: list[dict], a: str, b: str, curve: dict | None = None) -> str:
    lines = [f"paired difference {a} − {b} over seeds (mean ± standard error, 95% t-interval, seeds with {a} ≥ {b})",
             f"{'step':>7} {'seeds':>5} {'mean ± se':>17} {'95% interval':>20} {'a ≥ b':>6}"]
    for r in [*rows, *([dict(curve, step="curve")] if curve else [])]:
        lo, hi = r["ci95"]
        lines.append(f"{r['step']:>7} {r['seeds']:>5d} {r['mean_diff']:>8.1f} ± {r['se']:<6.1f} "
                     f"[{lo:>8.1f}, {hi:>8.1f}] {r['a_at_least_b']:>3d}/{r['seeds']}")
    if curve:
        lines.append(f"(curve: each seed's mean over the checkpoints {curve['steps'][0]}…{curve['steps'][-1]} that "
                     "every pair has, one test for the whole curve)")
    return "\n".join(lines)


def merge(paths: list[Path], out_path: Path, compare: list[str] | None = None, per_seed: bool = False,
          rename: list[list[str]] | None = None, curve_from: int = 0) -> dict:
    """One table of several benchmark files' runs (e.g. the same script run in parts, on
    different machines: compare their returns, not their wall-clock). A run of the same
    algorithm and seed in a later file replaces the earlier one (a rerun after a change).
    ``rename``: [FILE, ALGO, NAME] triples, the runs of ALGO in FILE listed as NAME (a variant
    run under the same algorithm, e.g. with other --set overrides, to compare with --paired)."""
    files = [json.loads(Path(f).read_text()) for f in paths]
    for file, algo, name in rename or []:
        matches = [i for i, f in enumerate(paths) if Path(f) == Path(file)]
        if not matches:
            raise SystemExit(f"error: --rename {file}: not among the --merge files")
        for i in matches:
            if not any(r["algo"] == algo for r in files[i]["results"]):
                raise SystemExit(f"error: --rename: {file} has no runs of {algo!r}")
            files[i]["results"] = [dict(r, algo=name) if r["algo"] == algo else r for r in files[i]["results"]]
    if len({f["env"] for f in files}) != 1:
        raise SystemExit(f"error: the files benchmark different envs: {sorted({f['env'] for f in files})}")
    runs: dict[tuple[str, int], dict] = {}
    for f, data in zip(paths, files):
        for r in data["results"]:
            key = (r["algo"], r["seed"])
            if key in runs:
                print(f"{r['algo']} seed {r['seed']}: the run from {f} replaces the one from {runs[key]['source']}")
            runs[key] = dict(r, source=str(f))
    results = list(runs.values())
    steps = sorted({s for r in results for s in r.get("steps", [])})
    print(f"{files[0]['env']}: evaluation return mean/median over seeds, merged from {', '.join(map(str, paths))} "
          "(wall-clock comparable only within one file)")
    print(table(results, steps))
    if per_seed:
        print(seed_table(results, steps))
    out = {"env": files[0]["env"], "merged_from": [str(f) for f in paths], "results": results}
    add_paired(out, compare, curve_from)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(out, indent=1))
    print(f"wrote {out_path}")
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--algos", nargs="+", default=["sac", "mbpo", "sb3-sac"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for the pplrl agents")
    p.add_argument("--algo-steps", nargs="*", default=[], metavar="ALGO=N",
                   help="per-algorithm step budgets (default --steps)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop a pplrl run after this wall-clock time and keep its evaluations so far")
    p.add_argument("--keep-runs", type=Path, default=None, metavar="DIR",
                   help="train each pplrl run in DIR/ALGO_seedN and keep it (metrics.jsonl grows while it "
                        "runs; checkpoint and logs for `pplrl diagnose`); default: a temporary directory")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="with --keep-runs: checkpoint each pplrl run every N env steps (default: at its end)")
    p.add_argument("--resume", action="store_true",
                   help="keep the runs already finished in --out (same settings) and, with --keep-runs, continue "
                        "the pplrl runs an interrupted call left there from their last checkpoint")
    p.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE",
                   help="a plugin that registers algorithms named in --algos (as `pplrl train --plugin`); repeatable")
    p.add_argument("--out", type=Path, default=Path("runs/bench_pendulum.json"))
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="run nothing: print one table of these benchmark files' runs (and write it to --out)")
    p.add_argument("--paired", nargs=2, default=None, metavar=("A", "B"),
                   help="also print the per-seed paired difference A − B at each checkpoint (mean, standard "
                        "error, 95%% interval, seeds with A ≥ B) and over the whole curve (each seed's mean over "
                        "the checkpoints: one test, no correction for many checkpoints needed)")
    p.add_argument("--curve-from", type=int, default=0, metavar="STEP",
                   help="with --paired: the whole-curve test over the checkpoints from STEP on (e.g. the end of "
                        "a warm-up, before which both agents' policies are untrained)")
    p.add_argument("--per-seed", action="store_true",
                   help="also print every run's evaluation return at each checkpoint, one line per seed and algorithm")
    p.add_argument("--rename", nargs=3, action="append", default=None, metavar=("JSON", "ALGO", "NAME"),
                   help="with --merge: list the runs of ALGO in JSON as NAME (a variant run under the same "
                        "algorithm); repeatable")
    args = p.parse_args(argv)
    if args.rename and not args.merge:
        p.error("--rename needs --merge")
    if args.merge:
        return merge(args.merge, args.out, args.paired, args.per_seed, args.rename, args.curve_from)
    if args.plugin:  # fail here, in one line, rather than in every worker
        from pplrl.plugins import PluginError, load_plugin
        try:
            for plugin in args.plugin:
                load_plugin(plugin)
        except PluginError as e:
            p.error(str(e))
    if args.paired and not set(args.paired) <= set(args.algos):
        p.error(f"--paired {' '.join(args.paired)}: both must be among --algos {args.algos}")
    algo_steps = {k: int(v) for k, v in (item.split("=", 1) for item in args.algo_steps)}
    if args.checkpoint_every is not None and args.checkpoint_every <= 0:
        p.error("--checkpoint-every must be > 0")
    algos = list(args.algos)
    if "sb3-sac" in algos:
        try:
            import stable_baselines3  # noqa: F401
        except ImportError:
            print("stable-baselines3 is not installed: skipping sb3-sac (pip install stable-baselines3)")
            algos.remove("sb3-sac")
    settings = {"env": args.env, "steps": args.steps, "algo_steps": algo_steps, "eval_every": args.eval_every,
                "eval_episodes": args.eval_episodes, "overrides": args.set, "plugins": args.plugin}
    results = []
    if args.resume and args.out.exists():
        earlier = json.loads(args.out.read_text())
        differing = [k for k in settings if earlier.get(k) != settings[k]]
        if differing:
            p.error(f"cannot resume {args.out}: it was run with other settings ("
                    + ", ".join(f"{k} {earlier.get(k)!r} vs {settings[k]!r}" for k in differing) + ")")
        results = [r for r in earlier["results"] if r["algo"] in algos and r["seed"] in args.seeds
                   and "error" not in r and "stopped_at_step" not in r]
    finished = {(r["algo"], r["seed"]) for r in results}
    jobs = []
    for seed in args.seeds:  # seed-major: an interrupted call leaves whole pairs for --paired
        for algo in algos:
            if (algo, seed) in finished:
                continue
            common = dict(env_id=args.env, seed=seed, steps=algo_steps.get(algo, args.steps),
                          eval_every=args.eval_every, eval_episodes=args.eval_episodes)
            if algo == "sb3-sac":
                jobs.append(("sb3", common))
            else:
                jobs.append(("pplrl", dict(algo=algo, overrides=overrides_for(algo, args.set),
                                           time_limit=args.time_limit, plugins=tuple(args.plugin), **common,
                                           run_dir=None if args.keep_runs is None
                                           else str(args.keep_runs / f"{algo}_seed{seed}"),
                                           checkpoint_every=args.checkpoint_every, resume=args.resume)))
    if results:
        print(f"resuming: {len(results)} finished runs kept, {len(jobs)} to go", flush=True)
    t0 = time.time()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    def save(results):
        out = {**settings, "seeds": args.seeds, "jobs": args.jobs, "results": results,
               "total_wall_s": time.time() - t0}
        args.out.write_text(json.dumps(out, indent=1))
        return out

    with contextlib.ExitStack() as stack:  # one job at a time runs here; more go to worker processes
        done = (stack.enter_context(mp.get_context("spawn").Pool(args.jobs)).imap_unordered(_job, jobs)
                if args.jobs > 1 else map(_job, jobs))
        for r in done:
            results.append(r)
            status = r.get("error") or (f"final {r['returns'][-1]:.1f}, {r['wall_s']:.0f} s" if r["returns"]
                                        else f"no evaluation, {r['wall_s']:.0f} s")
            if "stopped_at_step" in r:
                status += f" (time limit: stopped at step {r['stopped_at_step']})"
            print(f"  done {r['algo']} seed {r['seed']}: {status}", flush=True)
            save(results)
    results.sort(key=lambda r: (args.algos.index(r["algo"]) if r["algo"] in args.algos else 99, r["seed"]))
    checkpoints = list(range(args.eval_every, max([args.steps, *algo_steps.values()]) + 1, args.eval_every))
    print(f"\n{args.env}: evaluation return mean/median over seeds {args.seeds} ({args.eval_episodes} episodes "
          f"each) at env steps; {args.jobs} runs in parallel, 1 torch thread each")
    print(table(results, checkpoints))
    if args.per_seed:
        print(seed_table(results, checkpoints))
    out = save(results)
    if args.paired:
        add_paired(out, args.paired, args.curve_from)
        args.out.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")
    return out


if __name__ == "__main__":
    main()
