"""What one update of each agent costs, against a SAC update and stable-baselines3's.

Every agent gets the same replay: ``--transitions`` Pendulum-v1 transitions of a uniform
random policy (seed 0). Each agent first runs one update at a model-fit step, so that the
models are fitted (steady state), then, in one process, interleaved across agents,
median over ``--repeats`` rounds:

* ``step_ms``: one environment step's updates (``agent.update(step)`` at a step that fits
  no model): ``updates_per_step`` gradient steps;
* ``fit_ms``: the extra cost of an update at a model-fit step (p_theta's fit, q_d's fit,
  MBPO's rollouts), ``update(k * model_train_freq)`` minus ``step_ms``, measured
  ``--fit-repeats`` times;
* ``env_step_ms = step_ms + fit_ms / model_train_freq`` (the fit amortised over the steps
  between fits), ``update_ms = env_step_ms / updates_per_step`` and ``vs_sac`` =
  ``update_ms`` over SAC's;
* ``update_gflop`` and ``flops_vs_sac``: the matrix-multiply FLOPs of an update (forward and
  backward, torch's FlopCounterMode; elementwise ops not counted), the fit amortised the
  same way, counted after the timings (``--no-flops`` skips it). Where ``vs_sac`` is close
  to ``flops_vs_sac``, an agent costs what its arithmetic costs, not framework overhead.

stable-baselines3's SAC gradient step (``SAC.train(1, 256)``) is timed in the same rounds
when it is installed. Targets (the speed issue): VMBPO and beta-VMBPO <= 1.5x a SAC update,
MBPO and VMBPO-MFE <= 1.2x, pplrl SAC <= 1.0x stable-baselines3's step. MEMB's
``update_ms`` divides by its ``m`` policy updates per step; its model steps are in
``step_ms``. ``--variant ALGO:KEY=VALUE`` adds a row for ALGO with those overrides, timed
in the same rounds. One torch thread by default, subnormal floats flushed to zero as the
runner trains (``--keep-denormals`` keeps them; fresh models hold few, so it matters little
here and much in a long run: ``bench_denormals.py``). Prints a table, writes JSON (default
runs/bench_update.json).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import torch

from pplrl.device import flushing_denormals
from pplrl.runfiles import write_result

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_objective_api import sb3_step  # noqa: E402

ALGOS = ("sac", "virel", "mbpo", "memb", "vmbpo-mfe", "beta-vmbpo", "vmbpo")
TARGETS = {"vmbpo": 1.5, "beta-vmbpo": 1.5, "mbpo": 1.2, "vmbpo-mfe": 1.2}


def pendulum_transitions(n: int, seed: int = 0) -> list[tuple]:
    import gymnasium as gym

    env = gym.make("Pendulum-v1")
    obs, _ = env.reset(seed=seed)
    env.action_space.seed(seed)
    out = []
    for _ in range(n):
        act = env.action_space.sample()
        nxt, rew, term, trunc, _ = env.step(act)
        out.append((obs, act, float(rew), nxt, bool(term)))
        obs = env.reset()[0] if term or trunc else nxt
    return out


def make(algo: str, data: list[tuple], device: str = "cpu", overrides: list[str] = ()):
    """An agent of ``algo``'s Pendulum defaults (then ``overrides``, KEY=VALUE) holding
    ``data``, its models fitted."""
    import gymnasium as gym

    from pplrl.algorithms import apply_overrides, default_config, make_agent

    env = gym.make("Pendulum-v1")
    config = apply_overrides(default_config(algo, env_id="Pendulum-v1", seed=0), list(overrides))
    if hasattr(config, "device"):
        config = type(config)(**{**config.__dict__, "device": device})
    agent = make_agent(algo, config, env.observation_space.shape[0], env.action_space.shape[0])
    for obs, act, rew, nxt, term in data:
        agent.observe(obs, act / env.action_space.high, rew, nxt, term)
    # no fit to amortise where the agent fits no model (VMBPO-MFE's Algorithm 2 by default)
    freq = getattr(config, "model_train_freq", None) if getattr(config, "fit_dynamics", True) else None
    agent.update(freq or 1)  # first update: fits every model (steady state)
    return agent, freq


def times_ms(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def count_flops(fn) -> int:
    """Matrix-multiply FLOPs of one call of ``fn`` (forward and backward; torch's
    FlopCounterMode counts mm, addmm, bmm, baddbmm and the like, not elementwise ops)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


def update_flops(agent, freq: int | None) -> dict[str, int]:
    """``step``: FLOPs of one env step's updates at a step that fits no model; ``fit``: the
    extra FLOPs of a model-fit step (0 where the agent fits no model)."""
    step = count_flops(lambda: agent.update(7 * (freq or 1) + 1))
    fit = max(count_flops(lambda: agent.update(freq * 5000)) - step, 0) if freq else 0
    return {"step": step, "fit": fit}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--transitions", type=int, default=5000)
    p.add_argument("--repeats", type=int, default=7, help="interleaved rounds of one env step's updates")
    p.add_argument("--fit-repeats", type=int, default=2, help="updates at a model-fit step per model-based agent")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--device", default="cpu", help="the agents' device config field (cpu, cuda, auto)")
    p.add_argument("--variant", nargs="*", default=[], metavar="ALGO:KEY=VALUE[,KEY=VALUE]",
                   help="extra rows: ALGO with these overrides, timed in the same rounds (vmbpo:nu_actions=policy)")
    p.add_argument("--no-flops", action="store_true", help="skip counting each update's matmul FLOPs")
    p.add_argument("--keep-denormals", action="store_true",
                   help="time with subnormal floats kept (the runner flushes them; bench_denormals.py)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_update.json"))
    return p.parse_args(argv)


def variant_rows(specs: list[str]) -> dict[str, tuple[str, list[str]]]:
    """``--variant`` entries as {label: (algo, overrides)}; a malformed one is one error line."""
    variants = {}
    for v in specs:
        algo, _, sets = v.partition(":")
        if algo not in ALGOS or not sets:
            raise SystemExit(f"error: --variant {v!r}: expected ALGO:KEY=VALUE with ALGO one of {', '.join(ALGOS)}")
        variants[f"{algo} ({sets})"] = (algo, sets.split(","))
    return variants


def measure(args: argparse.Namespace) -> dict:
    """Every timing, FLOP count and ratio of one benchmark (``args`` from :func:`parse_args`;
    a malformed ``--variant`` stops it before any agent is built); the caller sets threads and
    the subnormal-float mode."""
    variants = variant_rows(args.variant)
    torch.manual_seed(0)

    data = pendulum_transitions(args.transitions)
    agents = {a: make(a, data, args.device) for a in args.algos}
    agents.update({label: make(algo, data, args.device, sets) for label, (algo, sets) in variants.items()})
    step = {a: 1 for a in agents}

    def one_step(a):
        def fn():
            freq = agents[a][1]
            step[a] += 1
            if freq and step[a] % freq == 0:
                step[a] += 1
            agents[a][0].update(step[a])
        return fn

    fns = {a: one_step(a) for a in agents}
    sb3 = sb3_step(256)
    if sb3 is not None:
        fns["sb3"] = sb3
    inner = {}
    for k, fn in fns.items():  # warm-up; each round times >= ~0.3 s of each agent's steps
        inner[k] = max(1, round(300.0 / max(statistics.median(times_ms(fn, 2)), 1e-3)))
    times = {k: [] for k in fns}
    for _ in range(args.repeats):
        for k, fn in fns.items():
            times[k].append(sum(times_ms(fn, inner[k])) / inner[k])
    step_ms = {k: statistics.median(v) for k, v in times.items()}

    fit_ms = {}
    for a, (agent, freq) in agents.items():
        if not freq:
            continue
        costs = []
        for i in range(args.fit_repeats):
            s = freq * (1000 + i)
            costs += times_ms(lambda: agent.update(s), 1)
        fit_ms[a] = max(statistics.median(costs) - step_ms[a], 0.0)

    # after the timings (counting runs updates through a dispatch mode, which is slow)
    flops = {} if args.no_flops else {a: update_flops(agent, freq) for a, (agent, freq) in agents.items()}
    if flops and sb3 is not None:
        flops["sb3"] = {"step": count_flops(sb3), "fit": 0}

    rows = []
    for a, (agent, freq) in agents.items():
        n = agent.updates_per_step()
        env_step = step_ms[a] + (fit_ms[a] / freq if a in fit_ms else 0.0)
        row = {"algo": a, "updates_per_step": n, "step_ms": step_ms[a], "fit_ms": fit_ms.get(a),
               "model_train_freq": freq, "env_step_ms": env_step, "update_ms": env_step / n}
        if a in flops:  # matmul GFLOP per update, the fit amortised as its time is
            f = flops[a]
            row.update(step_gflop=f["step"] / 1e9, fit_gflop=f["fit"] / 1e9,
                       update_gflop=(f["step"] + (f["fit"] / freq if freq else 0)) / n / 1e9)
        rows.append(row)
    sac = next((r["update_ms"] for r in rows if r["algo"] == "sac"), None)
    sac_gflop = next((r.get("update_gflop") for r in rows if r["algo"] == "sac"), None)
    for r in rows:
        r["vs_sac"] = r["update_ms"] / sac if sac else None
        r["flops_vs_sac"] = r["update_gflop"] / sac_gflop if sac_gflop and "update_gflop" in r else None
        r["target_vs_sac"] = TARGETS.get(r["algo"].split(" (")[0])
    result = {"threads": args.threads, "device": args.device, "transitions": args.transitions,
              "denormals": "kept" if args.keep_denormals else "flushed",
              "repeats": args.repeats, "fit_repeats": args.fit_repeats, "rows": rows,
              "sb3_update_ms": step_ms.get("sb3"),
              "sac_over_sb3": sac / step_ms["sb3"] if sac and "sb3" in step_ms else None,
              "sb3_update_gflop": flops["sb3"]["step"] / 1e9 if "sb3" in flops else None}
    return result


def report(result: dict) -> None:
    """Print :func:`measure`'s table."""
    res = result
    print(f"ms per update, {res['threads']} thread(s), device {res['device']}, {res['transitions']} Pendulum-v1 "
          f"transitions, median of {res['repeats']} interleaved rounds ({res['fit_repeats']} per fit):")
    print("| algorithm | updates / step | ms / env step | fit ms (every N steps) | ms / update | vs SAC | target "
          "| GFLOP / update | FLOPs vs SAC |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        fit = f"{r['fit_ms']:.0f} ({r['model_train_freq']})" if r["fit_ms"] is not None else "-"
        vs = f"{r['vs_sac']:.2f}" if r["vs_sac"] is not None else "-"
        target = f"<= {r['target_vs_sac']}" if r["target_vs_sac"] else "-"
        gflop = f"{r['update_gflop']:.3f}" if "update_gflop" in r else "-"
        fvs = f"{r['flops_vs_sac']:.2f}" if r["flops_vs_sac"] is not None else "-"
        print(f"| {r['algo']} | {r['updates_per_step']} | {r['env_step_ms']:.1f} | {fit} | {r['update_ms']:.1f} "
              f"| {vs} | {target} | {gflop} | {fvs} |")
    if result["sb3_update_ms"] is not None:
        print(f"stable-baselines3 SAC gradient step: {result['sb3_update_ms']:.1f} ms; "
              f"pplrl SAC / SB3 = {result['sac_over_sb3']:.2f} (target <= 1.0)"
              + (f"; matmul GFLOP {result['sb3_update_gflop']:.3f}" if result["sb3_update_gflop"] else ""))
    else:
        print("stable-baselines3 not installed: no SB3 row (pip install stable-baselines3)")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    # as pplrl.runner.train runs (subnormal floats flushed), unless --keep-denormals
    with contextlib.nullcontext() if args.keep_denormals else flushing_denormals():
        result = measure(args)
    report(result)
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
