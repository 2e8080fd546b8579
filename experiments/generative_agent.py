"""The generative POMDP agent on pplrl/LightDark-v0 and velocity-hidden Pendulum (Marino & Yue, 003_…; issue 19).

Variants (each trained by Active Variational EM through :func:`pplrl.runner.train`):

* ``generative``          eq. (8) bound (learning loss: eq. 8 + log p(x, r | z_<t), marginal_weight 0),
                          planning (eq. 10) with the belief-level information gain
* ``generative-no-ig``    the same agent planning without the information-gain term
* ``discriminative``      eq. (6) bound, no model: q(a_t) from the prior and the critic only

At every evaluation point each agent is evaluated twice, deterministically, on the same
seeds: acting by **planning** (its E-step) and by the **consolidated prior** p_a(a_t | z_t)
alone. On LightDark the evaluation episodes' positions are kept: the share of episodes
that reach the light (``light``: max x >= 3.4, where the noise std is < 0.25) and, for the
final agents, the share of the episodes starting in the dark that reach it (the detours) and
a figure of the trajectories (``trajectories.png``: does the agent detour to the light?).
The table gives means over seeds with 95% percentile-bootstrap intervals, and per env the
paired per-seed difference of the final planning return, generative − generative-no-ig
(``paired`` in the JSON). ``experiments/light_dark_model_probe.py`` reads the trained
LightDark agents: does their model know where the light is, and which plan does its
information gain prefer?

Writes under ``--out``: one run folder per env, variant and seed (``curve.json`` rewritten at
every evaluation point, ``result.json`` when the run is done), ``results.json`` (rewritten
after every finished run), ``results.md`` and the figures; prints the table. Runs go seed by
seed (every variant of seed 0 first), so a partial result compares the variants.
``--resume`` keeps finished runs and continues unfinished ones from their last evaluation
point (Ctrl-C safe). ``--jobs N``: N worker processes (spawned, one torch thread each);
``--budget-s S`` stops every run at its first evaluation point after S seconds of its own
wall time (the table then states the steps each run reached).
A smoke run: ``--steps 400 --seeds 0 --eval-every 200 --eval-episodes 1``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch

from pplrl.algorithms import apply_overrides, default_config
from pplrl.envs import make_continuous_env
from pplrl.runfiles import read_records
from pplrl.runner import evaluate, train

VARIANTS = {
    "generative": ("generative-agent", {"critic": "false"}),
    "generative-no-ig": ("generative-agent", {"critic": "false", "plan_info_gain": "false"}),
    "discriminative": ("discriminative-agent", {"temperature": "1.0"}),
}
"""The generative variants plan over the model horizon without a learned critic (PlaNet's
setting): on the checkpoints measured (without action repeat), the SARSA critic at the horizon
made the planner worse (its value of a poor behaviour policy dominated the 12-step reward); the
discriminative agent has no model, so its critic is all it plans with. It keeps temperature 1: at 0.1 its ranking
log p_a(a | z) + Q / temperature became a greedy argmax of an immature critic (-1647 at 2,000
steps, seed 0, against about -900 to -1000 at temperature 1)."""
#: lighter than the agents' defaults so that a CPU run of a few thousand steps is feasible. The
#: agents' defaults carry the choices that made the generative agent learn (action repeat 4,
#: horizon 6 decisions, lr 3e-3, 4 updates per decision; see GenerativeAgentConfig); with the
#: true Pendulum dynamics as the model this planner swings up at that horizon
#: (tests/test_pomdp_planning.py). 1,000 warm-up steps of held random torques (the model's first
#: data), temperature 0.1 (the planner ranks by reward; the action prior's log-density is a
#: tie-breaker), one learning step per decision.
EXPERIMENT_DEFAULTS = {"candidates": "32", "elites": "4", "cem_iterations": "2", "particles": "16", "update_every": "1",
                       "learning_starts": "1000", "temperature": "0.1"}
#: per-env settings over EXPERIMENT_DEFAULTS. LightDark: one decision per step (30-step episodes),
#: horizon 8 (to the light is ~4 steps, from there to the goal ~8), learned state-dependent
#: observation noise (x_scale 0) and reward noise, an ensemble of 3 transition heads, 300 warm-up steps
#: (10 episodes) of random moves held for 2 steps, one update per step (the CPU budget).
ENV_DEFAULTS = {
    "pplrl/LightDark-v0": {"action_repeat": "1", "horizon": "8", "x_scale": "0", "r_scale": "0", "ensemble": "3",
                           "learning_starts": "300", "warmup_hold": "2", "gradient_steps": "1"},
}
LIGHT_X = 3.4  # an episode "reaches the light" when its x exceeds this (noise std < 0.25)


def rollouts(agent, env_id: str, episodes: int, seed: int) -> tuple[list[float], list[list[list[float]]]]:
    """Deterministic returns and the true positions (``info['position']``) of each episode."""
    env = make_continuous_env(env_id)
    returns, paths = [], []
    for i in range(episodes):
        obs, info = env.reset(seed=seed + i)
        path, total, done = [info["position"].tolist()], 0.0, False
        while not done:
            obs, r, term, trunc, info = env.step(agent.act(obs, deterministic=True))
            total += float(r)
            path.append(info["position"].tolist())
            done = term or trunc
        returns.append(total)
        paths.append(path)
    env.close()
    return returns, paths


def evaluate_both(agent, env_id: str, episodes: int, seed: int, keep_paths: bool = False) -> dict:
    """Mean deterministic returns acting by planning and by the prior alone (on LightDark
    also the share of episodes reaching the light, and the planning paths if asked)."""
    out = {}
    saved = agent.config
    for mode, plan in (("plan", True), ("prior", False)):
        agent.config = dataclasses.replace(saved, plan=plan)
        if env_id == "pplrl/LightDark-v0":
            rets, paths = rollouts(agent, env_id, episodes, seed)
            out[f"{mode}_light"] = float(np.mean([max(p[0] for p in path) >= LIGHT_X for path in paths]))
            if keep_paths and mode == "plan":
                out["paths"] = paths
        else:
            rets = evaluate(agent, env_id, episodes, seed)
        out[mode] = float(np.mean(rets))
    agent.config = saved
    return out


def read_metrics(folder: Path) -> list[dict]:
    return read_records(folder / "metrics.jsonl")


def run_folder(out: Path, env: str, name: str, seed: int) -> Path:
    return out / f"{env.split('/')[-1]}-{name}-seed{seed}"


def run_one(name: str, seed: int, args, out: Path, env: str | None = None) -> dict:
    env = env or args.env
    algo, overrides = VARIANTS[name]
    per_env = [kv.split(":", 1)[1] for kv in (getattr(args, "set_env", None) or []) if kv.split(":", 1)[0] == env]
    settings = {**EXPERIMENT_DEFAULTS, **ENV_DEFAULTS.get(env, {}), **overrides,
                **dict(s.split("=", 1) for s in (args.set or [])), **dict(s.split("=", 1) for s in per_env)}
    if algo == "discriminative-agent":  # no model to roll out: it always plans with horizon 0
        for key in ("horizon", "ensemble", "x_scale", "r_scale"):
            settings.pop(key, None)
    config = apply_overrides(default_config(algo, env_id=env, seed=seed), settings)
    folder = run_folder(out, env, name, seed)
    resume = getattr(args, "resume", False)
    if resume and (folder / "result.json").exists():
        return json.loads((folder / "result.json").read_text())
    curve: list[dict] = []
    if resume and (folder / "curve.json").exists() and (folder / "checkpoint.pt").exists():
        curve = json.loads((folder / "curve.json").read_text())
    elif folder.exists():
        shutil.rmtree(folder)
    points = list(range(args.eval_every, args.steps + 1, args.eval_every))
    if not points or points[-1] != args.steps:
        points.append(args.steps)
    t0 = time.time() - (curve[-1].get("seconds", 0.0) if curve else 0.0)
    stopped_early = False
    for k, upto in enumerate(points):
        if curve and upto <= curve[-1]["step"]:
            continue
        if curve and args.budget_s is not None and time.time() - t0 > args.budget_s:
            stopped_early = True
            break
        agent = train(algo, config, folder, upto, resume=bool(curve), eval_every=10 ** 9,
                      checkpoint_every=args.eval_every, progress=False)
        last = upto == points[-1] or (args.budget_s is not None and time.time() - t0 > args.budget_s)
        returns = evaluate_both(agent, env, args.eval_episodes, seed=10_000 + seed, keep_paths=last)
        curve.append({"step": upto, "seconds": time.time() - t0, **returns})
        print(f"  {env} {name} seed {seed} step {upto}: plan {returns['plan']:.1f}, prior {returns['prior']:.1f} "
              f"({time.time() - t0:.0f}s)", flush=True)
        (folder / "curve.json").write_text(json.dumps(curve))
    stopped_early = stopped_early or curve[-1]["step"] < points[-1]
    metrics = [m for m in read_metrics(folder) if m["kind"] == "train"]
    episodes = [m for m in read_metrics(folder) if m["kind"] == "episode"]
    result = {"env": env, "variant": name, "algo": algo, "seed": seed, "config": dataclasses.asdict(config),
              "curve": curve,
            "info_gain": [{"step": m["step"], "elbo_info_gain": m.get("elbo_info_gain"),
                           "plan_info_gain": m.get("plan_info_gain"), "elbo": m.get("elbo_elbo"),
                           "kl_a": m.get("elbo_kl_a")} for m in metrics],
              "train_episode_returns": [m["episode_return"] for m in episodes], "seconds": time.time() - t0,
              "stopped_early": stopped_early}
    (folder / "result.json").write_text(json.dumps(result))
    return result


def _job(job) -> dict:
    """One run in a worker process (one torch thread); an exception becomes an error record."""
    env, name, seed, args, out = job
    torch.set_num_threads(1)
    try:
        return run_one(name, seed, args, out, env)
    except Exception as e:
        return {"env": env, "variant": name, "seed": seed, "error": f"{type(e).__name__}: {e}"}


def interval(v: list[float], d: int = 1, n_boot: int = 2000) -> str:
    """mean [95% percentile-bootstrap interval over seeds]."""
    v = [x for x in v if x is not None]
    if not v:
        return "-"
    if len(v) == 1:
        return f"{v[0]:.{d}f}"
    boot = np.random.default_rng(0).choice(v, size=(n_boot, len(v))).mean(1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return f"{np.mean(v):.{d}f} [{lo:.{d}f}, {hi:.{d}f}]"


def light_from_the_dark(paths: list) -> float | None:
    """The share of the episodes that start in the dark (x < LIGHT_X) and reach the light: the
    detours (an episode starting in the light is there without one); None if none starts dark."""
    dark = [path for path in paths if path[0][0] < LIGHT_X]
    return float(np.mean([max(q[0] for q in path) >= LIGHT_X for path in dark])) if dark else None


def paired_rows(results: list[dict], a: str = "generative", b: str = "generative-no-ig",
                n_boot: int = 2000) -> list[dict]:
    """Per env, the per-seed difference a − b of the final planning return (seeds with both
    runs finished at the same step): mean, 95% percentile-bootstrap interval, seeds with a ≥ b."""
    rows = []
    for env in dict.fromkeys(r.get("env", "") for r in results):
        last = {(r["variant"], r["seed"]): r["curve"][-1] for r in results
                if r.get("env", "") == env and "error" not in r and r.get("curve")}
        seeds = sorted(s for (v, s) in last
                       if v == a and (b, s) in last and last[(a, s)]["step"] == last[(b, s)]["step"])
        if not seeds:
            continue
        d = np.array([last[(a, s)]["plan"] - last[(b, s)]["plan"] for s in seeds])
        boot = np.random.default_rng(0).choice(d, size=(n_boot, len(d))).mean(1) if len(d) > 1 else d
        rows.append({"env": env, "a": a, "b": b, "seeds": seeds, "diffs": d.tolist(), "mean": float(d.mean()),
                     "ci95": [float(x) for x in np.percentile(boot, [2.5, 97.5])], "a_at_least_b": int((d >= 0).sum())})
    return rows


def table(results: list[dict]) -> str:
    lines = ["| env | variant | seeds | steps | return, planning | return, prior alone | reaches the light "
             "(planning) | of the starts in the dark | info gain (bound, last) | last training episode |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    envs = list(dict.fromkeys(r.get("env", "") for r in results))
    for env in envs:
        for name in VARIANTS:
            rs = [r for r in results if r.get("env", "") == env and r["variant"] == name and "error" not in r]
            if not rs:
                continue
            plan = [r["curve"][-1]["plan"] for r in rs]
            prior = [r["curve"][-1]["prior"] for r in rs]
            light = [r["curve"][-1].get("plan_light") for r in rs]
            dark = [light_from_the_dark(r["curve"][-1]["paths"]) if r["curve"][-1].get("paths") else None for r in rs]
            ig = [r["info_gain"][-1]["elbo_info_gain"] for r in rs if r["info_gain"]]
            ep = [r["train_episode_returns"][-1] for r in rs if r["train_episode_returns"]]
            steps = sorted({r["curve"][-1]["step"] for r in rs})
            steps = str(steps[0]) if len(steps) == 1 else "–".join(map(str, (steps[0], steps[-1])))
            lines.append(f"| {env.split('/')[-1]} | {name} | {len(rs)} | {steps} | {interval(plan)} | "
                         f"{interval(prior)} | {interval(light, 2)} | {interval(dark, 2)} | {interval(ig, 3)} | "
                         f"{interval(ep)} |")
    for row in paired_rows(results):
        lines.append(f"\n{row['env'].split('/')[-1]}: {row['a']} − {row['b']}, final planning return, paired by seed: "
                     f"{row['mean']:+.1f} [{row['ci95'][0]:+.1f}, {row['ci95'][1]:+.1f}] (95% bootstrap), "
                     f"{row['a']} ≥ {row['b']} on {row['a_at_least_b']} of {len(row['seeds'])} seeds")
    return "\n".join(lines)


def plot_trajectories(results: list[dict], path: Path) -> bool:
    """LightDark: the final agents' evaluation paths per variant (planning), the light shaded."""
    rs = [r for r in results if r.get("env") == "pplrl/LightDark-v0" and "error" not in r and r["curve"]
          and r["curve"][-1].get("paths")]
    if not rs:
        return False
    fig, axes = plt.subplots(1, len(VARIANTS), figsize=(5 * len(VARIANTS), 4.5), sharex=True, sharey=True)
    for ax, name in zip(np.atleast_1d(axes), VARIANTS):
        ax.axvspan(LIGHT_X, 4.6, color="gold", alpha=0.3, label="light (noise std < 0.25)")
        ax.add_patch(plt.Circle((0, 0), 0.3, color="green", alpha=0.4))
        for r in (r for r in rs if r["variant"] == name):
            for episode in r["curve"][-1]["paths"]:
                p = np.array(episode)
                ax.plot(p[:, 0], p[:, 1], "-", color=f"C{r['seed'] % 10}", alpha=0.6, lw=1)
                ax.plot(p[0, 0], p[0, 1], "o", color=f"C{r['seed'] % 10}", ms=3)
        ax.set(title=f"{name} (colour: seed)", xlabel="x", xlim=(-2, 6), ylim=(-2, 5))
    np.atleast_1d(axes)[0].set_ylabel("y")
    np.atleast_1d(axes)[0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot(results: list[dict], path: Path, env: str) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(VARIANTS, ("C0", "C1", "C2")))
    results = [r for r in results if "error" not in r and r.get("env", env) == env]
    for r in results:
        steps = [p["step"] for p in r["curve"]]
        c = colors[r["variant"]]
        label = r["variant"] if r["seed"] == min(x["seed"] for x in results if x["variant"] == r["variant"]) else None
        axes[0].plot(steps, [p["plan"] for p in r["curve"]], "-o", color=c, label=label and f"{label} (planning)")
        axes[0].plot(steps, [p["prior"] for p in r["curve"]], "--x", color=c, label=label and f"{label} (prior alone)")
        ig = [(m["step"], m["elbo_info_gain"]) for m in r["info_gain"] if m["elbo_info_gain"] is not None]
        if ig and r["algo"] == "generative-agent":
            axes[1].plot(*zip(*ig), color=c, label=label and f"{label}: bound")
        pig = [(m["step"], m["plan_info_gain"]) for m in r["info_gain"] if m.get("plan_info_gain") is not None]
        if pig and r["variant"] == "generative":
            axes[1].plot(*zip(*pig), ":", color=c, label=label and f"{label}: planner (elites, sum over horizon)")
    axes[0].set(xlabel="environment steps", ylabel="evaluation return", title=env)
    axes[1].set(xlabel="environment steps", ylabel="nats", title="information gain estimate (bound: per step)")
    for ax in axes:
        if ax.get_legend_handles_labels()[0]:  # a run too short to log training metrics has no curve here
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/generative_agent")
    p.add_argument("--env", default="pplrl/PendulumNoVel-v0", help="one env (see --envs)")
    p.add_argument("--envs", nargs="+", default=None,
                   help="several envs, e.g. pplrl/LightDark-v0 pplrl/PendulumNoVel-v0")
    p.add_argument("--resume", action="store_true", help="keep finished runs under --out, continue unfinished ones")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-every", type=int, default=1000, help="a multiple of the episode length (200) is best")
    p.add_argument("--eval-episodes", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every variant (horizon: generative variants only)")
    p.add_argument("--set-env", nargs="*", metavar="ENV:KEY=VALUE", help="overrides for one env's runs")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (worker processes, 1 torch thread each)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop each run at its first evaluation point after this many seconds")
    args = p.parse_args(argv)
    if args.steps <= 0 or args.eval_every <= 0 or args.eval_episodes <= 0 or args.jobs <= 0:
        p.error("--steps, --eval-every, --eval-episodes and --jobs must be > 0")
    if any(":" not in kv or "=" not in kv for kv in (args.set_env or [])):
        p.error("--set-env takes ENV:KEY=VALUE")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    args.t_start = time.time()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    envs = args.envs or [args.env]
    jobs = [(env, name, seed, args, out) for seed in args.seeds for env in envs for name in args.variants]
    results: list[dict] = []

    def save() -> dict:
        order = {(e, n, s): i for i, (e, n, s, _, _) in enumerate(jobs)}
        results.sort(key=lambda r: order[(r.get("env", envs[0]), r["variant"], r["seed"])])
        md = table(results)
        summary = {"env": envs[0], "envs": envs, "steps": args.steps, "seeds": args.seeds, "jobs": args.jobs,
                   "wall_s": time.time() - args.t_start,  # this invocation's (a --resume reuses finished runs)
                   "run_seconds": sum(r.get("seconds", 0.0) for r in results), "results": results, "table": md,
                   "paired": paired_rows(results)}
        (out / "results.json").write_text(json.dumps(summary, indent=1))
        return summary

    if args.jobs == 1:
        for job in jobs:
            env, name, seed, _, _ = job
            results.append(run_one(name, seed, args, out, env))
            save()
    else:
        with mp.get_context("spawn").Pool(min(args.jobs, len(jobs))) as pool:
            for r in pool.imap_unordered(_job, jobs):
                results.append(r)
                print(f"  done {r['variant']} seed {r['seed']}: " + (r.get("error") or f"{r['seconds']:.0f} s"),
                      flush=True)
                save()
    summary = save()
    md = summary["table"]
    (out / "results.md").write_text(md + "\n")
    for i, env in enumerate(envs):
        plot(results, out / ("generative_agent.png" if i == 0 else f"generative_agent_{env.split('/')[-1]}.png"), env)
    plot_trajectories(results, out / "trajectories.png")
    print(md)
    return summary


if __name__ == "__main__":
    main()
