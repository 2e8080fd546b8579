"""Optimism of the variational dynamics on Mountain Car (beta-VMBPO paper, Sec. 6.2, Fig. 4).

Paper: /work/shared/papers/001_… (beta-VMBPO), Sec. 6.2 "Optimism in deterministic
continuous environments" and Fig. 4: VMBPO (beta = 1) learns variational dynamics q_d
in which the under-powered car drives straight up the hill; the policy learned with
them gets stuck in the real environment. beta-VMBPO's dual on beta keeps q_d close
to the prior dynamics, so its trajectories under q_d look like the real ones.

What this script does, per algorithm (``vmbpo``, ``beta-vmbpo``) and seed:

1. trains the agent on ``MountainCarContinuous-v0`` for ``--steps`` env steps through
   :func:`pplrl.runner.train` (run folder ``OUT/runs/ALGO-seedS``);
2. rolls out its learned policy (the prior policy pi, deterministic -- the policy that
   acts) for ``--horizon`` steps from ``--rollouts`` start states drawn by the real
   environment's reset (seeds ``10_000 + i``, the same for every algorithm and
   dynamics) under three dynamics: the **real** environment, the agent's
   **variational** dynamics q_d and its **prior** model p_theta (beta eq. 10). Model
   steps sample an elite member and its Gaussian noise (seeded), as the agents' own
   model samples do, and are clipped to the observation box (position [-1.2, 0.6],
   velocity [-0.07, 0.07]) as the real environment clips its state. Rewards are Mountain Car's own reward function
   applied to each
   transition (``100 * [goal] - 0.1 a^2``), an episode ends at the goal
   (the same termination function the agents use), and after it the position is held;
3. reports per dynamics the mean return, final position, maximum position and share
   of rollouts reaching the goal, and the **optimism** = (mean return under q_d) -
   (mean return under the real env) for the same policy and start states; likewise
   the gap of the final position. The return gap of p_theta to the real env is the
   prior model's own error; q_d minus p_theta is the optimism the variational tilt adds
   on top of it (beta-VMBPO's dual is meant to keep that part small).

Writes ``OUT/mountain_car_optimism.png`` (mean position over time with a band of one
standard deviation, one panel per algorithm, a line per dynamics) and
``OUT/mountain_car_optimism.json``; prints the table.

    python experiments/mountain_car_optimism.py                       # about 7 minutes on 2 cores
    python experiments/mountain_car_optimism.py --seeds 0 1 2 --jobs 2 --out runs/mc_3seeds
    python experiments/mountain_car_optimism.py --merge runs/mc_3seeds/mountain_car_optimism.json \
        runs/mc_more/mountain_car_optimism.json --out runs/mc_all     # seeds run in parts: one table

The JSON is rewritten after every finished run, so an interrupted call keeps what it
finished. The summary line gives each gap's mean ± standard error over seeds.

The short default budget rarely solves the task in the real environment (the paper
trains far longer); the optimism number measures what the learned q_d promises against
what the real dynamics deliver, whatever the policy's quality.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from pplrl.diagnostics import standard_error

ENV_ID = "MountainCarContinuous-v0"
GOAL_POSITION = 0.45
OBS_LOW, OBS_HIGH = np.array([-1.2, -0.07], dtype=np.float32), np.array([0.6, 0.07], dtype=np.float32)
ALGOS = ("vmbpo", "beta-vmbpo")
DYNAMICS = ("real", "variational", "prior")
# a CPU budget: one update per step, smaller models, faster fits (override with --set)
# warm-up: 2,000 uniform random actions, each held 30 steps -- i.i.d. ones never reach the goal
# in 5,000 steps, held ones about once per episode (seed 0: 12 times), so the replay holds the
# goal reward the variational dynamics can tilt towards. model_min_logvar=-20: with mbrl-lib's
# -10 the models' std floor (6.7e-3) exceeds a step's velocity change (~1.7e-3), and the fitted
# p_theta's velocity change was biased by +2.4e-3 (correlation with the true one 0.35-0.5 on
# seed 0's run); with -20, -0.7e-3 (correlation 0.7-0.85)
DEFAULT_SET = ["gradient_steps=1", "learning_starts=2000", "warmup_hold=30", "model_min_updates=200",
               "model_hidden=(200,200)", "model_min_logvar=-20"]


def mountain_car_reward(act: np.ndarray, done: np.ndarray) -> np.ndarray:
    """MountainCarContinuous-v0's reward: 100 on reaching the goal, minus 0.1 force^2."""
    force = np.clip(act[:, 0], -1.0, 1.0)
    return 100.0 * done - 0.1 * force ** 2


def start_states(n: int) -> np.ndarray:
    from pplrl.envs.continuous import make_continuous_env

    env = make_continuous_env(ENV_ID)
    starts = np.stack([env.reset(seed=10_000 + i)[0] for i in range(n)]).astype(np.float32)
    env.close()
    return starts


def policy_actions(agent, obs: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return agent.prior_policy.act(torch.as_tensor(obs, dtype=torch.float32), True).numpy()


def rollout_real(agent, n: int, horizon: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions ``[n, horizon + 1]``, returns ``[n]``, reached-goal ``[n]`` in the real env."""
    from pplrl.envs.continuous import make_continuous_env

    env = make_continuous_env(ENV_ID)
    pos, ret, goal = np.zeros((n, horizon + 1)), np.zeros(n), np.zeros(n, dtype=bool)
    for i in range(n):
        obs, _ = env.reset(seed=10_000 + i)
        pos[i, 0] = obs[0]
        done = False
        for t in range(horizon):
            if not done:
                obs, r, term, trunc, _ = env.step(policy_actions(agent, obs[None])[0])
                ret[i] += float(r)
                goal[i] |= bool(term)
                done = term or trunc
            pos[i, t + 1] = obs[0]
    env.close()
    return pos, ret, goal


def rollout_model(agent, ensemble, starts: np.ndarray, horizon: int, seed: int):
    """The same, with next states sampled from a learned ensemble (q_d or p_theta)."""
    from pplrl.envs.continuous import termination_fn_for

    term_fn = termination_fn_for(ENV_ID)
    gen = torch.Generator().manual_seed(seed)
    n = starts.shape[0]
    obs = starts.copy()
    pos, ret = np.zeros((n, horizon + 1)), np.zeros(n)
    alive = np.ones(n, dtype=bool)
    goal = np.zeros(n, dtype=bool)
    pos[:, 0] = obs[:, 0]
    for t in range(horizon):
        act = policy_actions(agent, obs)
        nxt, _, _ = ensemble.predict(torch.as_tensor(obs), torch.as_tensor(act), generator=gen)
        nxt = np.clip(nxt.numpy(), OBS_LOW, OBS_HIGH)  # the real env clips its state to this box too
        done = np.asarray(term_fn(obs, act, nxt), dtype=bool).reshape(-1)
        ret += np.where(alive, mountain_car_reward(act, done.astype(np.float64)), 0.0)
        goal |= alive & done
        obs = np.where(alive[:, None], nxt, obs)
        alive &= ~done
        pos[:, t + 1] = obs[:, 0]
    return pos, ret, goal


def summarise(pos: np.ndarray, ret: np.ndarray, goal: np.ndarray) -> dict:
    return {"mean_return": float(ret.mean()), "std_return": float(ret.std()),
            "final_position": float(pos[:, -1].mean()), "max_position": float(pos.max(1).mean()),
            "goal_rate": float(goal.mean()), "mean_position": pos.mean(0).tolist(), "std_position": pos.std(0).tolist()}


def exact_kl(agent, seed: int, batches: int = 8, batch_size: int = 256) -> float:
    """KL(q_d || p_theta) of the agent's two ensembles (their elite mixtures' log-densities, exact
    for the models it holds) at x ~ D_env, a ~ q_c, x' ~ q_d, over ``batches`` replay batches:
    the same number for both agents, whatever their own log-ratio estimator (VMBPO's nu
    estimates about 0; docs/notes.md)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)  # q_c's and q_d's samples
    kls = []
    with torch.no_grad():
        for _ in range(batches):
            obs = agent.replay.sample(batch_size, rng).obs
            kls.append(agent.batch_kl(obs, agent.policy(obs).sample(), ensembles=True))
    return float(np.mean(kls))


def evaluate_dynamics(agent, rollouts: int, horizon: int, seed: int) -> dict:
    starts = start_states(rollouts)
    out = {"real": summarise(*rollout_real(agent, rollouts, horizon)),
           "variational": summarise(*rollout_model(agent, agent.q_dynamics, starts, horizon, seed)),
           "prior": summarise(*rollout_model(agent, agent.ensemble, starts, horizon, seed))}
    out["prior_gap_return"] = out["prior"]["mean_return"] - out["real"]["mean_return"]
    out["kl_exact"] = exact_kl(agent, seed)
    return add_gaps(out)


def add_gaps(out: dict) -> dict:
    """The optimism (q_d minus real: return and final position) and q_d minus p_theta."""
    out["optimism_return"] = out["variational"]["mean_return"] - out["real"]["mean_return"]
    out["optimism_final_position"] = out["variational"]["final_position"] - out["real"]["final_position"]
    out["tilt_optimism_return"] = out["variational"]["mean_return"] - out["prior"]["mean_return"]
    return out


def train_agent(algo: str, seed: int, steps: int, overrides: list[str], folder: Path, *, resume: bool = False,
                checkpoint_every: int | None = None):
    """Train one agent into ``folder``; ``resume=True`` continues a run left there by an
    interrupted call (from its last checkpoint, every ``checkpoint_every`` steps)."""
    from pplrl.algorithms import apply_overrides, default_config
    from pplrl.runner import train_or_resume

    config = apply_overrides(default_config(algo, env_id=ENV_ID, seed=seed), [*DEFAULT_SET, *overrides])
    if folder.exists() and not resume:
        shutil.rmtree(folder)  # this script's own output from an earlier call
    t0 = time.perf_counter()
    agent = train_or_resume(algo, config, folder, steps, eval_every=steps, eval_episodes=1,
                            checkpoint_every=checkpoint_every or steps, progress=False)
    return agent, time.perf_counter() - t0


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    algos = list(results)
    fig, axes = plt.subplots(1, len(algos), figsize=(5.5 * len(algos), 4), sharey=True, squeeze=False)
    colours = {"real": "black", "variational": "tab:red", "prior": "tab:blue"}
    for ax, algo in zip(axes[0], algos):
        for dyn in DYNAMICS:
            mean = np.mean([r[dyn]["mean_position"] for r in results[algo]["seeds"].values()], 0)
            std = np.mean([r[dyn]["std_position"] for r in results[algo]["seeds"].values()], 0)
            t = np.arange(len(mean))
            label = {"real": "real env", "variational": "variational q_d", "prior": "prior model p_theta"}[dyn]
            ax.plot(t, mean, color=colours[dyn], label=label)
            ax.fill_between(t, mean - std, mean + std, color=colours[dyn], alpha=0.15)
        ax.axhline(GOAL_POSITION, color="green", ls="--", lw=1, label="goal")
        ax.set_ylim(OBS_LOW[0] - 0.05, OBS_HIGH[0] + 0.05)
        summary = results[algo]["mean"]
        ax.set_title(f"{algo}: return gap q_d - real {summary['optimism_return']:+.1f}, "
                     f"q_d - prior {summary['tilt_optimism_return']:+.1f}", fontsize=10)
        ax.set_xlabel("time step")
    axes[0][0].set_ylabel("car position (mean over rollouts and seeds)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    lines = [f"{'algorithm':>11} {'seed':>4} {'beta':>8} | {'return real':>11} {'q_d':>8} {'prior':>8} | "
             f"{'final pos real':>14} {'q_d':>6} | {'goal real':>9} {'q_d':>5} | "
             f"{'optimism (return)':>17} {'(final pos)':>11} "
             f"{'q_d - prior':>11} {'KL(q_d||p)':>10}"]
    for algo, res in results.items():
        rows = list(res["seeds"].items()) + [("mean", res["mean"])]
        for seed, r in rows:
            lines.append(f"{algo:>11} {seed:>4} {r['beta']:8.3g} | {r['real']['mean_return']:11.2f} "
                         f"{r['variational']['mean_return']:8.2f} {r['prior']['mean_return']:8.2f} | "
                         f"{r['real']['final_position']:14.3f} {r['variational']['final_position']:6.3f} | "
                         f"{r['real']['goal_rate']:9.2f} {r['variational']['goal_rate']:5.2f} | "
                         f"{r['optimism_return']:17.2f} {r['optimism_final_position']:11.3f} "
                         f"{r['tilt_optimism_return']:11.2f} "
                         + (f"{r['kl_exact']:10.3f}" if "kl_exact" in r else f"{'-':>10}"))
    return "\n".join(lines)


def _mean_over_seeds(per_seed: dict) -> dict:
    keys = ("mean_return", "final_position", "max_position", "goal_rate")
    out = {dyn: {k: float(np.mean([r[dyn][k] for r in per_seed.values()])) for k in keys} for dyn in DYNAMICS}
    out["beta"] = float(np.mean([r["beta"] for r in per_seed.values()]))
    if all("kl_exact" in r for r in per_seed.values()):  # (results written before it have none)
        out["kl_exact"] = float(np.mean([r["kl_exact"] for r in per_seed.values()]))
    # means of differences = differences of means: the optimism is exactly q_d minus real
    return add_gaps(out)


def _job(job) -> tuple[str, int, dict]:
    """Train one (algorithm, seed) and roll its policy out under the three dynamics."""
    algo, seed, steps, overrides, folder, rollouts, horizon, threads, resume, checkpoint_every = job
    torch.set_num_threads(threads)
    agent, wall = train_agent(algo, seed, steps, overrides, folder, resume=resume, checkpoint_every=checkpoint_every)
    r = evaluate_dynamics(agent, rollouts, horizon, seed)
    r.update(beta=agent.beta if agent.config.use_beta else 1.0 / agent.config.eta, train_wall_s=wall)
    print(f"  {algo} seed {seed}: trained {steps} steps in {wall:.0f} s; optimism "
          f"{r['optimism_return']:+.2f} (return), {r['optimism_final_position']:+.3f} (final position)", flush=True)
    return algo, seed, r


def summarize(per_algo: dict[str, dict[str, dict]]) -> dict:
    """``{algo: {seed: result}}`` -> ``{algo: {"seeds", "mean", "se", "optimism_return"}}``;
    ``se`` is the standard error over seeds of the two return gaps."""
    results: dict = {}
    for algo, per_seed in per_algo.items():
        if not per_seed:
            continue
        per_seed = dict(sorted(per_seed.items(), key=lambda kv: int(kv[0])))
        se = {k: standard_error([r[k] for r in per_seed.values()]) for k in ("optimism_return", "tilt_optimism_return")}
        results[algo] = {"seeds": per_seed, "mean": _mean_over_seeds(per_seed), "se": se}
        results[algo]["optimism_return"] = results[algo]["mean"]["optimism_return"]
    return results


def report(saved: dict, out: Path) -> None:
    """Print the table and the gaps' standard errors, write the plot and the JSON."""
    results = saved["results"]
    print(f"\n{ENV_ID}: learned prior policy (deterministic) from {saved['rollouts']} start states, "
          f"{saved['horizon']} steps, under the real env, the variational q_d and the prior model p_theta; "
          f"{saved['steps']} training steps, seeds {saved['seeds']}")
    print(table(results))
    print("optimism = mean return under q_d - mean return under the real env (same policy, same start states); "
          "q_d - prior = the part the variational tilt adds to the prior model's own error")
    for algo, res in results.items():
        print(f"  {algo} over {len(res['seeds'])} seeds: optimism {res['mean']['optimism_return']:+.1f} "
              f"± {res['se']['optimism_return']:.1f}, q_d - prior {res['mean']['tilt_optimism_return']:+.1f} "
              f"± {res['se']['tilt_optimism_return']:.1f} (mean ± standard error)")
    plot(results, out / "mountain_car_optimism.png")
    (out / "mountain_car_optimism.json").write_text(json.dumps(saved, indent=1))
    print(f"wrote {out / 'mountain_car_optimism.png'} and {out / 'mountain_car_optimism.json'}")


def merge(paths: list[Path], out: Path) -> dict:
    """One table and plot over several runs of this script with the same settings (seeds
    run in parts, e.g. on different machines); a later file's (algorithm, seed) replaces
    an earlier one."""
    files = [json.loads(Path(f).read_text()) for f in paths]
    keys = ("steps", "rollouts", "horizon", "overrides")
    for f, data in zip(paths[1:], files[1:]):
        differing = [k for k in keys if data[k] != files[0][k]]
        if differing:
            raise SystemExit(f"error: {f} was run with other settings than {paths[0]}: "
                             + ", ".join(f"{k} {data[k]!r} vs {files[0][k]!r}" for k in differing))
    per_algo: dict[str, dict[str, dict]] = {}
    for data in files:
        for algo, res in data["results"].items():
            per_algo.setdefault(algo, {}).update(res["seeds"])
    results = summarize(per_algo)
    seeds = sorted({int(s) for res in results.values() for s in res["seeds"]})
    saved = {**{k: files[0][k] for k in ("env", *keys)}, "seeds": seeds, "merged_from": [str(f) for f in paths],
             "results": results}
    out.mkdir(parents=True, exist_ok=True)
    report(saved, out)
    return saved


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=5000, help="env steps of training per agent")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--rollouts", type=int, default=10, help="start states (rollouts per dynamics)")
    p.add_argument("--horizon", type=int, default=300, help="steps per rollout")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"config overrides after the script's own ({' '.join(DEFAULT_SET)})")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs (algorithm, seed) in parallel worker processes")
    p.add_argument("--out", type=Path, default=Path("runs/mountain_car_optimism"))
    p.add_argument("--checkpoint-every", type=int, default=1000, help="env steps between a run's checkpoints")
    p.add_argument("--resume", action="store_true",
                   help="keep the (algorithm, seed) results already in OUT's JSON (same settings) and continue "
                        "the runs an interrupted call left in OUT/runs from their last checkpoint")
    p.add_argument("--reevaluate", action="store_true",
                   help="with --resume: evaluate every run again from its folder in OUT/runs (finished runs are "
                        "read back, not retrained), e.g. after this script learned to report something new")
    p.add_argument("--merge", type=Path, nargs="+", default=None, metavar="JSON",
                   help="run nothing: one table and plot of these files' seeds, written to --out")
    args = p.parse_args(argv)
    if args.merge:
        return merge(args.merge, args.out)
    if args.reevaluate and not args.resume:
        raise SystemExit("error: --reevaluate needs --resume (it reads the runs back from OUT/runs)")
    if min(args.steps, args.rollouts, args.horizon, args.jobs, args.checkpoint_every) <= 0:
        raise SystemExit("error: --steps, --rollouts, --horizon, --jobs and --checkpoint-every must be > 0")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    per_algo: dict[str, dict[str, dict]] = {algo: {} for algo in args.algos}
    saved = {"env": ENV_ID, "steps": args.steps, "seeds": args.seeds, "rollouts": args.rollouts,
             "horizon": args.horizon, "overrides": [*DEFAULT_SET, *args.set]}
    earlier = args.out / "mountain_car_optimism.json"
    trained_wall: dict[tuple[str, str], float] = {}  # --reevaluate keeps the training times
    if args.resume and earlier.exists():
        data = json.loads(earlier.read_text())
        differing = [k for k in ("steps", "rollouts", "horizon", "overrides") if data.get(k) != saved[k]]
        if differing:
            raise SystemExit(f"error: cannot resume {earlier}: it was run with other settings ("
                             + ", ".join(f"{k} {data.get(k)!r} vs {saved[k]!r}" for k in differing) + ")")
        for algo, res in data.get("results", {}).items():
            if algo in per_algo:
                kept = {s: r for s, r in res["seeds"].items() if int(s) in args.seeds}
                if args.reevaluate:
                    trained_wall.update({(algo, s): r["train_wall_s"] for s, r in kept.items()})
                else:
                    per_algo[algo].update(kept)
    jobs = [(algo, seed, args.steps, args.set, args.out / "runs" / f"{algo}-seed{seed}", args.rollouts, args.horizon,
             args.threads, args.resume, args.checkpoint_every)
            for seed in args.seeds for algo in args.algos if str(seed) not in per_algo[algo]]  # seed-major: pairs first
    if per_algo and any(per_algo.values()):
        print(f"resuming: {sum(map(len, per_algo.values()))} finished runs kept, {len(jobs)} to go", flush=True)
    saved["results"] = summarize(per_algo)
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:
            done = stack.enter_context(mp.get_context("spawn").Pool(args.jobs)).imap_unordered(_job, jobs)
        else:
            done = map(_job, jobs)
        for algo, seed, r in done:
            if (algo, str(seed)) in trained_wall:  # read back, not trained: keep the training time
                r["train_wall_s"] = trained_wall[(algo, str(seed))]
            per_algo[algo][str(seed)] = r
            # after every finished run: an interrupted call keeps the runs it finished (--merge them later)
            saved["results"] = summarize(per_algo)
            (args.out / "mountain_car_optimism.json").write_text(json.dumps(saved, indent=1))
    report(saved, args.out)
    return saved


if __name__ == "__main__":
    main()
