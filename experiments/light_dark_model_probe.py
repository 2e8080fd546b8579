"""Why does (or doesn't) a learned generative agent detour to the light on pplrl/LightDark-v0?
(issue 19, point 6: reading the trained agents of ``experiments/generative_agent.py``.)

For every finished generative run of LightDark under ``--runs`` (run folders
``LightDark-v0-<variant>-seed<S>`` with their final checkpoint), two probes of the agent's
learned model, against the true light-dark model:

* **noise**: the agent's filter follows a sweep through the light and back (``--sweeps``
  episodes: full speed right for 8 steps, then left for the rest); at every step the
  learned emitter's x standard deviation at the filter's state (mean over x's dimensions)
  is paired with the true noise std at the true position. Reported: the mean learned std
  where the true one is < 0.25 (in the light) and > 1 (in the dark), their ratio, and the
  Spearman rank correlation. A model that "knows the light" has a ratio well below 1.
* **plans**: from the filter's belief after the first observation (``particles`` samples),
  agent's planner (its settings, the gain switched on and weighted 1 for every variant)
  scores two action sequences of its horizon with common random numbers: *to the light*
  (right until x >= 4 from the start, then stay) and *to the goal* (straight at it).
  Reported: each plan's information-gain and reward terms. The true model
  (``light_dark_known_model.TrueModel``, belief N(start, I)) scores the same plans. The
  belief-level gain is at most log(particles) per step, so it saturates where every
  observation separates the particles.
* **acting** (``--temperatures``): the agent plans (its own gain setting) at other planning
  temperatures on the held-out episodes: mean return and the share of the dark starts that
  reach the light.

Prints a table and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from light_dark_known_model import TrueModel  # noqa: E402

ENV_ID = "pplrl/LightDark-v0"
LIGHT_STD, DARK_STD = 0.25, 1.0


def spearman(a, b) -> float:
    ra, rb = (np.argsort(np.argsort(v)).astype(float) for v in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1]) if len(a) > 2 and ra.std() > 0 and rb.std() > 0 else float("nan")


def learned_x_std(agent, state: torch.Tensor) -> float:
    px, _ = agent.model.emitter(state)
    return float(px.base_dist.scale.mean()) if hasattr(px, "base_dist") else float(px.stddev.mean())


def noise_probe(agent, episodes: int, seed: int) -> dict:
    """Learned x std at the filter's state against the true noise std, along sweeps."""
    from pplrl.algorithms.generative_agent import FilterStream
    from pplrl.envs import make_continuous_env
    from pplrl.envs.pomdp import split_view

    env = make_continuous_env(ENV_ID)
    true_env = env.unwrapped
    learned, true = [], []
    for i in range(episodes):
        obs, info = env.reset(seed=seed + i)
        stream, done, t = FilterStream().begin_episode(agent.act_dim), False, 0
        while not done:
            x, r, _ = split_view(obs)
            with torch.no_grad():
                agent.filter_step(stream, x, r, deterministic=True)
                learned.append(learned_x_std(agent, stream.state))
            true.append(float(true_env.sigma(np.asarray(info["position"]))))
            a = np.array([1.0, 0.0] if t < 8 else [-1.0, 0.0], dtype=np.float32)
            stream.a_prev = torch.as_tensor(a)
            obs, _, term, trunc, info = env.step(a)
            done, t = term or trunc, t + 1
    env.close()
    learned, true = np.array(learned), np.array(true)
    light, dark = learned[true < LIGHT_STD], learned[true > DARK_STD]
    out = {"steps": len(true), "light_steps": int(light.size), "dark_steps": int(dark.size),
           "learned_std_light": float(light.mean()) if light.size else None,
           "learned_std_dark": float(dark.mean()) if dark.size else None,
           "true_std_light": float(true[true < LIGHT_STD].mean()) if light.size else None,
           "true_std_dark": float(true[true > DARK_STD].mean()) if dark.size else None,
           "spearman": spearman(learned, true)}
    out["ratio_light_dark"] = (out["learned_std_light"] / out["learned_std_dark"]
                               if light.size and dark.size else None)
    return out


def plans(mean_xy: np.ndarray, horizon: int, goal=(0.0, 0.0), light_x: float = 4.0, speed: float = 0.5
          ) -> torch.Tensor:
    """[2, horizon + 1, 2]: to the light (right until x >= light_x, then stay), to the goal."""
    to_light, to_goal = [], []
    x, pos = float(mean_xy[0]), np.array(mean_xy, dtype=float)
    for _ in range(horizon + 1):
        step = min(1.0, max(0.0, (light_x - x) / speed))
        to_light.append([step, 0.0])
        x += speed * step
        d = np.asarray(goal) - pos
        n = np.linalg.norm(d)
        a = d / n * min(1.0, n / speed) if n > 1e-6 else np.zeros(2)
        to_goal.append(a.tolist())
        pos = pos + speed * a
    return torch.tensor([to_light, to_goal], dtype=torch.float32)


def plan_probe(agent, episodes: int, seed: int, horizon: int | None = None, particles: int | None = None) -> dict:
    """Information-gain and reward terms of the two plans (to the light, to the goal), by the
    agent's model from its filter's belief and by the true model from N(start, start_std^2 I)."""
    from pplrl.algorithms.generative_agent import FilterStream
    from pplrl.envs import make_continuous_env
    from pplrl.envs.pomdp import split_view
    from pplrl.pomdp_planning import CEMPlanner, CommonNoise

    env = make_continuous_env(ENV_ID)
    true_env = env.unwrapped
    P = particles or agent.config.particles
    acts = plans(true_env.start, horizon or agent.config.horizon, true_env.goal, true_env.light_x, true_env.speed)
    # the gain is scored for every agent, also one trained to plan without it (generative-no-ig)
    planner = CEMPlanner(dataclasses.replace(agent.planner.config, info_gain=True, info_gain_weight=1.0))
    truth = TrueModel(true_env, transition_std=0.01)
    terms = {"agent": [], "true": []}
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        stream = FilterStream().begin_episode(agent.act_dim)
        x, r, _ = split_view(obs)
        gen = torch.Generator().manual_seed(seed + i)
        with torch.no_grad():
            qz, _ = agent.filter_step(stream, x, r, deterministic=True)
            eps = torch.randn((P, *qz.batch_shape, *qz.event_shape), generator=gen)
            z0 = qz.mean + qz.stddev * eps  # samples of the filter's belief (a diagonal Gaussian)
            belief = (torch.as_tensor(true_env.start, dtype=torch.float32)
                      + true_env.start_std * torch.randn(P, 2, generator=gen))
            terms["agent"].append(planner.score(agent.model, z0, acts, None, CommonNoise())[1])
            terms["true"].append(planner.score(truth, belief, acts, None, CommonNoise())[1])
    env.close()
    return {model: {key: torch.stack([t[key] for t in ts]).mean(0).tolist() for key in ("info_gain", "reward")}
            for model, ts in terms.items()}


def acting_probe(agent, temperatures: list[float], episodes: int, seed: int) -> dict:
    """The agent planning at other temperatures (its own gain setting): mean return and the
    share of the dark starts that reach the light, on held-out episodes."""
    from generative_agent import light_from_the_dark, rollouts

    from pplrl.pomdp_planning import CEMPlanner

    saved, saved_planner, out = agent.config, agent.planner, {}
    try:
        for temperature in temperatures:
            agent.config = dataclasses.replace(saved, temperature=temperature)
            agent.planner = CEMPlanner(agent.config.planner_config())
            torch.manual_seed(seed)
            returns, paths = rollouts(agent, ENV_ID, episodes, seed)
            out[str(temperature)] = {"return": float(np.mean(returns)), "detours": light_from_the_dark(paths)}
    finally:
        agent.config, agent.planner = saved, saved_planner
    return out


def probe_run(folder: Path, sweeps: int, seed: int, horizon: int | None = None, particles: int | None = None,
              temperatures: list[float] = ()) -> dict:
    from pplrl.runner import agent_from_checkpoint

    agent, _ = agent_from_checkpoint(folder)
    torch.manual_seed(seed)
    row = {"run": folder.name, "noise": noise_probe(agent, sweeps, seed),
           "plans": plan_probe(agent, sweeps, seed, horizon, particles)}
    if temperatures:
        row["acting"] = acting_probe(agent, list(temperatures), sweeps, seed)
    return row


def fmt(v, d=2) -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{d}f}"


def table(rows: list[dict]) -> str:
    lines = ["| run | learned x std: light / dark (ratio) | true std: light / dark | Spearman vs true std | "
             "info gain, agent's model: light / goal plan | reward: light / goal | info gain, true model: "
             "light / goal |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        n, pa, pt = row["noise"], row["plans"]["agent"], row["plans"]["true"]
        lines.append(f"| {row['run']} | {fmt(n['learned_std_light'])} / {fmt(n['learned_std_dark'])} "
                     f"({fmt(n['ratio_light_dark'])}) | {fmt(n['true_std_light'])} / {fmt(n['true_std_dark'])} | "
                     f"{fmt(n['spearman'])} | {fmt(pa['info_gain'][0])} / "
                     f"{fmt(pa['info_gain'][1])} | {fmt(pa['reward'][0])} / {fmt(pa['reward'][1])} | "
                     f"{fmt(pt['info_gain'][0])} / {fmt(pt['info_gain'][1])} |")
    temps = list(dict.fromkeys(t for row in rows for t in row.get("acting", {})))
    if temps:
        lines += ["", "| run | " + " | ".join(f"temperature {t}: return (detours)" for t in temps) + " |",
                  "|---|" + "---|" * len(temps)]
        for row in rows:
            cells = [row["acting"].get(t) for t in temps]
            lines.append(f"| {row['run']} | " + " | ".join(
                "-" if c is None else f"{c['return']:.1f} ({fmt(c['detours'])})" for c in cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=Path("runs/generative_agent"),
                   help="the --out folder of experiments/generative_agent.py")
    p.add_argument("--variants", nargs="+", default=["generative", "generative-no-ig"])
    p.add_argument("--sweeps", type=int, default=8, help="episodes per probe")
    p.add_argument("--seed", type=int, default=1000, help="first episode seed (held out from training and evaluation)")
    p.add_argument("--horizon", type=int, default=None, help="steps of the two plans (default: the agent's horizon)")
    p.add_argument("--particles", type=int, default=None, help="belief samples (default: the agent's particles)")
    p.add_argument("--temperatures", type=float, nargs="*", default=[],
                   help="also act (plan) at these temperatures on --sweeps held-out episodes: return, detours")
    p.add_argument("--out", type=Path, default=None, help="JSON (default RUNS/model_probe.json)")
    args = p.parse_args(argv)
    if min(args.sweeps, args.horizon or 1, args.particles or 1, *args.temperatures) <= 0:
        p.error("--sweeps, --horizon, --particles and --temperatures must be > 0")
    torch.set_num_threads(1)
    folders = sorted(f for v in args.variants for f in args.runs.glob(f"LightDark-v0-{v}-seed*")
                     if (f / "result.json").exists() and (f / "checkpoint.pt").exists())
    if not folders:
        p.error(f"no finished LightDark runs of {args.variants} under {args.runs}")
    rows = []
    for folder in folders:
        rows.append(probe_run(folder, args.sweeps, args.seed, args.horizon, args.particles, args.temperatures))
        print(f"  probed {folder.name}", flush=True)
    md = table(rows)
    print(md)
    out = args.out or args.runs / "model_probe.json"
    out.write_text(json.dumps({"sweeps": args.sweeps, "seed": args.seed, "horizon": args.horizon,
                               "particles": args.particles, "temperatures": args.temperatures, "rows": rows,
                               "table": md}, indent=1))
    print(f"wrote {out}")
    return rows


if __name__ == "__main__":
    main()
