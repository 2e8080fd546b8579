"""The generative POMDP agent on velocity-hidden Pendulum (Marino & Yue, 003_…).

Variants (each trained by Active Variational EM through :func:`pplrl.runner.train`):

* ``generative``          eq. (8) bound, planning (eq. 10) with the information-gain term
* ``generative-no-ig``    the same agent planning without the information-gain term
* ``discriminative``      eq. (6) bound, no model: q(a_t) from the prior and the critic only

At every evaluation point each agent is evaluated twice, deterministically, on the same
seeds: acting by **planning** (its E-step) and by the **consolidated prior** p_a(a_t | z_t)
alone (the model-free habit, no planning). The bound's information-gain estimate
(``elbo_info_gain``) and the planner's (``plan_info_gain``) are read from the runs'
``metrics.jsonl`` over training.

Writes under ``--out``: one run folder per variant and seed (with ``curve.json``, rewritten
at every evaluation point), ``results.json`` (rewritten after every finished run),
``results.md`` (the table) and ``generative_agent.png``; prints the table.
``--jobs N`` runs the variant x seed runs in N worker processes (spawned, one torch
thread each); ``--budget-s S`` stops every run at its first evaluation point after S
seconds of its own wall time, counted from its start (the table then states the steps each run reached).
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
EXPERIMENT_DEFAULTS = {"candidates": "32", "elites": "4", "cem_iterations": "2", "particles": "2", "update_every": "1",
                       "learning_starts": "1000", "temperature": "0.1"}


def evaluate_both(agent, env_id: str, episodes: int, seed: int) -> dict[str, float]:
    """Mean deterministic returns acting by planning and by the prior alone."""
    out = {}
    saved = agent.config
    for mode, plan in (("plan", True), ("prior", False)):
        agent.config = dataclasses.replace(saved, plan=plan)
        out[mode] = float(np.mean(evaluate(agent, env_id, episodes, seed)))
    agent.config = saved
    return out


def read_metrics(folder: Path) -> list[dict]:
    return read_records(folder / "metrics.jsonl")


def run_one(name: str, seed: int, args, out: Path) -> dict:
    algo, overrides = VARIANTS[name]
    settings = {**EXPERIMENT_DEFAULTS, **overrides, **dict(s.split("=", 1) for s in (args.set or []))}
    if algo == "discriminative-agent":  # no model to roll out: it always plans with horizon 0
        settings.pop("horizon", None)
    config = apply_overrides(default_config(algo, env_id=args.env, seed=seed), settings)
    folder = out / f"{name}-seed{seed}"
    if folder.exists():
        shutil.rmtree(folder)
    points = list(range(args.eval_every, args.steps + 1, args.eval_every))
    if not points or points[-1] != args.steps:
        points.append(args.steps)
    curve, t0 = [], time.time()
    stopped_early = False
    for k, upto in enumerate(points):
        if k > 0 and args.budget_s is not None and time.time() - t0 > args.budget_s:
            stopped_early = True
            break
        agent = train(algo, config, folder, upto, resume=k > 0, eval_every=10 ** 9, checkpoint_every=args.eval_every,
                      progress=False)
        returns = evaluate_both(agent, args.env, args.eval_episodes, seed=10_000 + seed)
        curve.append({"step": upto, **returns})
        print(f"  {name} seed {seed} step {upto}: plan {returns['plan']:.1f}, prior {returns['prior']:.1f} "
              f"({time.time() - t0:.0f}s)", flush=True)
        (folder / "curve.json").write_text(json.dumps(curve))
    metrics = [m for m in read_metrics(folder) if m["kind"] == "train"]
    episodes = [m for m in read_metrics(folder) if m["kind"] == "episode"]
    return {"variant": name, "algo": algo, "seed": seed, "config": dataclasses.asdict(config), "curve": curve,
            "info_gain": [{"step": m["step"], "elbo_info_gain": m.get("elbo_info_gain"),
                           "plan_info_gain": m.get("plan_info_gain"), "elbo": m.get("elbo_elbo"),
                           "kl_a": m.get("elbo_kl_a")} for m in metrics],
            "train_episode_returns": [m["episode_return"] for m in episodes], "seconds": time.time() - t0,
            "stopped_early": stopped_early}


def _job(job) -> dict:
    """One run in a worker process (one torch thread); an exception becomes an error record."""
    name, seed, args, out = job
    torch.set_num_threads(1)
    try:
        return run_one(name, seed, args, out)
    except Exception as e:
        return {"variant": name, "seed": seed, "error": f"{type(e).__name__}: {e}"}


def table(results: list[dict]) -> str:
    lines = ["| variant | seeds | steps | final return, planning | final return, prior alone | "
             "info gain (bound, last) | KL(q(a) \\|\\| p(a)) (last) | last training episode |",
             "|---|---|---|---|---|---|---|---|"]
    for name in VARIANTS:
        rs = [r for r in results if r["variant"] == name and "error" not in r]
        if not rs:
            continue
        plan = [r["curve"][-1]["plan"] for r in rs]
        prior = [r["curve"][-1]["prior"] for r in rs]
        ig = [r["info_gain"][-1]["elbo_info_gain"] for r in rs if r["info_gain"]]
        kl = [r["info_gain"][-1]["kl_a"] for r in rs if r["info_gain"]]
        ep = [r["train_episode_returns"][-1] for r in rs if r["train_episode_returns"]]

        def fmt(v, d=1):
            v = [x for x in v if x is not None]
            if not v:
                return "-"
            return f"{np.mean(v):.{d}f} ± {np.std(v):.{d}f}" if len(v) > 1 else f"{v[0]:.{d}f}"

        steps = sorted({r["curve"][-1]["step"] for r in rs})
        steps = str(steps[0]) if len(steps) == 1 else "–".join(map(str, (steps[0], steps[-1])))
        lines.append(f"| {name} | {len(rs)} | {steps} | {fmt(plan)} | {fmt(prior)} | "
                     f"{fmt(ig, 3)} | {fmt(kl, 3)} | {fmt(ep)} |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    colors = dict(zip(VARIANTS, ("C0", "C1", "C2")))
    results = [r for r in results if "error" not in r]
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
    axes[0].set(xlabel="environment steps", ylabel="evaluation return", title="velocity-hidden Pendulum")
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
    p.add_argument("--env", default="pplrl/PendulumNoVel-v0")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--eval-every", type=int, default=1000, help="a multiple of the episode length (200) is best")
    p.add_argument("--eval-episodes", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--set", nargs="*", metavar="KEY=VALUE",
                   help="config overrides for every variant (horizon: generative variants only)")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (worker processes, 1 torch thread each)")
    p.add_argument("--budget-s", type=float, default=None,
                   help="stop each run at its first evaluation point after this many seconds")
    args = p.parse_args(argv)
    if args.steps <= 0 or args.eval_every <= 0 or args.eval_episodes <= 0 or args.jobs <= 0:
        p.error("--steps, --eval-every, --eval-episodes and --jobs must be > 0")
    if args.budget_s is not None and args.budget_s <= 0:
        p.error("--budget-s must be > 0")
    args.t_start = time.time()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(name, seed, args, out) for name in args.variants for seed in args.seeds]
    results: list[dict] = []

    def save() -> dict:
        order = {(n, s): i for i, (n, s, _, _) in enumerate(jobs)}
        results.sort(key=lambda r: order[(r["variant"], r["seed"])])
        md = table(results)
        summary = {"env": args.env, "steps": args.steps, "seeds": args.seeds, "jobs": args.jobs,
                   "wall_s": time.time() - args.t_start, "results": results, "table": md}
        (out / "results.json").write_text(json.dumps(summary, indent=1))
        return summary

    if args.jobs == 1:
        for job in jobs:
            results.append(run_one(*job))
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
    plot(results, out / "generative_agent.png")
    print(md)
    return summary


if __name__ == "__main__":
    main()
