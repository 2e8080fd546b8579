"""What the objective API costs: time per SAC update and lines of user code.

* SAC's update on the API (``ActorCritic.train_step``: critic target from
  :func:`pplrl.elbo.soft_value`, actor from the Pyro ELBO, dual on ``kl_policy``) against
  the hand-written update it replaced (``reference_update`` below, a verbatim copy of the
  pre-API ``SAC.sac_update``), on the same agent and batch, interleaved, median of repeats;
* the same update against stable-baselines3's SAC gradient step (``SAC.train(1, 256)``), in
  the same process, if stable-baselines3 is installed (``pip install stable-baselines3``);
* lines of ``examples/behaviour_prior.py`` (the user's whole objective, imports included).

Targets (the objective-API issue): API / reference <= 1.05, API / SB3 <= 1.0, example <= 60
lines. One torch thread by default (``--threads``). Prints a table, writes JSON
(default runs/bench_objective_api.json).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pplrl.runfiles import write_result

ROOT = Path(__file__).resolve().parents[1]


def reference_update(agent, batch, step):
    """The pre-API SAC update, written by hand (critic target, actor ELBO, alpha)."""
    from guides.actor import actor_guide
    from models.actor import actor_model
    from pplrl.nets import polyak_update

    with torch.no_grad():
        d = agent.policy(batch.next_obs)
        a2 = d.rsample()
        soft_v = agent.critic_target.min(batch.next_obs, a2) - agent.alpha * d.log_prob(a2)
        y = batch.rew + agent.config.gamma * (1.0 - batch.done) * soft_v
    q1, q2 = agent.critic(batch.obs, batch.act)
    critic_loss = F.mse_loss(q1, y) + F.mse_loss(q2, y)
    out = agent.checked(step, critic_loss=critic_loss)
    agent.gradient_step(agent.critic_opt, critic_loss)
    alpha = agent.alpha
    loss = agent.actor_elbo.differentiable_loss(actor_model, actor_guide, batch.obs, agent.prior, agent.critic.min,
                                                1.0 / alpha, policy=agent.policy)
    actor_loss, terms = alpha * loss / batch.obs.shape[0], agent.actor_elbo.last_terms
    out.update(agent.checked(step, actor_loss=actor_loss))
    agent.gradient_step(agent.actor_opt, actor_loss)
    log_q = terms["kl_policy"] / batch.obs.shape[0]
    alpha_loss = -agent.log_alpha * (log_q + agent.target_entropy)
    agent.gradient_step(agent.alpha_opt, alpha_loss)
    polyak_update(agent.critic, agent.critic_target, agent.config.tau)
    return out


def timed(fn, inner: int) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t) / inner * 1e3


def interleaved(fns: dict, repeats: int, inner: int) -> dict[str, float]:
    for fn in fns.values():  # warm-up
        for _ in range(3):
            fn()
    times = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(timed(fn, inner))
    return {k: statistics.median(v) for k, v in times.items()}


def sac_agent(batch_size: int):
    from pplrl.algorithms import SAC, default_config

    agent = SAC(default_config("sac", batch_size=batch_size), 3, 1)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        agent.observe(rng.normal(size=3).astype(np.float32), rng.uniform(-1, 1, 1).astype(np.float32),
                      float(rng.normal()), rng.normal(size=3).astype(np.float32), False)
    return agent, agent.sample_batch()


def sb3_step(batch_size: int):
    """stable-baselines3 SAC's gradient step on Pendulum-v1 (None if it is not installed)."""
    try:
        import gymnasium as gym
        from stable_baselines3 import SAC as SB3SAC
        from stable_baselines3.common.logger import configure
    except ImportError:
        return None
    env = gym.make("Pendulum-v1")
    model = SB3SAC("MlpPolicy", env, batch_size=batch_size, learning_starts=0, verbose=0, device="cpu", seed=0)
    model.set_logger(configure(None, []))
    rng = np.random.default_rng(0)
    for _ in range(2000):
        o = rng.normal(size=(1, 3)).astype(np.float32)
        model.replay_buffer.add(o, o, rng.uniform(-2, 2, (1, 1)).astype(np.float32), np.array([rng.normal()]),
                                np.array([False]), [{}])
    return lambda: model.train(gradient_steps=1, batch_size=batch_size)


def user_lines(path: Path) -> dict:
    lines = path.read_text().splitlines()
    code = [ln for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    return {"file": str(path.relative_to(ROOT)), "lines": len(lines), "non_blank_lines": len(code)}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--out", type=Path, default=Path("runs/bench_objective_api.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    agent, batch = sac_agent(args.batch_size)
    fns = {"api": lambda: agent.train_step(batch, 0), "reference": lambda: reference_update(agent, batch, 0)}
    sb3 = sb3_step(args.batch_size)
    if sb3 is not None:
        fns["sb3"] = sb3
    ms = interleaved(fns, args.repeats, args.inner)
    result = {"threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats, "inner": args.inner,
              "update_ms": ms, "api_over_reference": ms["api"] / ms["reference"],
              "api_over_sb3": ms["api"] / ms["sb3"] if "sb3" in ms else None,
              "user_code": user_lines(ROOT / "examples" / "behaviour_prior.py")}
    print(f"SAC update, {args.threads} thread(s), batch {args.batch_size}, median of {args.repeats} x {args.inner}:")
    for k, v in ms.items():
        print(f"  {k:>10}: {v:7.2f} ms")
    print(f"  api / reference = {result['api_over_reference']:.3f}   (target <= 1.05)")
    if result["api_over_sb3"] is not None:
        print(f"  api / sb3       = {result['api_over_sb3']:.3f}   (target <= 1.0)")
    else:
        print("  stable-baselines3 not installed: no SB3 row")
    u = result["user_code"]
    print(f"user code: {u['file']} {u['lines']} lines ({u['non_blank_lines']} non-blank)   (target <= 60)")
    return write_result(args.out, result)


if __name__ == "__main__":
    main()
