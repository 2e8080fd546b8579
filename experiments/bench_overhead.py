"""Pyro overhead per update: each Pyro-computed objective against a plain-torch
function computing the same loss on the same batch (forward + backward + optimiser
step), timed in the same process, interleaved, median over repeats.

Objectives:
* SAC actor ELBO (models.actor / guides.actor through ReparamOptimalityELBO) vs
  ``mean(alpha * log q(a|x) - min Q(x, a))``;
* the full SAC update using that ELBO vs the same update with the plain actor loss;
* the dynamics-ensemble likelihood through SVI with an empty guide vs the same
  Gaussian negative log-likelihood in plain torch (if models.dynamics is available).

Each pair runs twice: with Pyro's validation on (Pyro's default; it also turns on torch's
distribution argument checks, for the plain-torch side too) and off (how pplrl's agents
run every update after their first, config ``pyro_validation='first'``).

Prints a table and writes JSON (default runs/bench_overhead.json).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np
import pyro
import torch


def timed(fn, repeats: int, inner: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        out.append((time.perf_counter() - t) / inner * 1e3)
    return out


def bench_pair(name: str, pyro_fn, torch_fn, repeats: int, inner: int) -> list[dict]:
    """One row per validation setting, both sides under the same setting."""
    rows = []
    for validation in (True, False):
        with pyro.validation_enabled(validation):
            for _ in range(5):  # warm-up
                pyro_fn(), torch_fn()
            py, pt = [], []
            for _ in range(repeats):  # interleave so load changes hit both alike
                py += timed(pyro_fn, 1, inner)
                pt += timed(torch_fn, 1, inner)
        mp, mt = statistics.median(py), statistics.median(pt)
        rows.append({"objective": name, "validation": validation, "pyro_ms": mp, "torch_ms": mt,
                     "ratio": mp / mt, "repeats": repeats, "inner": inner})
    return rows


def sac_rows(repeats: int, inner: int, batch_size: int) -> list[dict]:
    from pplrl.algorithms import SAC, default_config
    from pplrl.nets import frozen

    agent = SAC(default_config("sac", batch_size=batch_size), 3, 1)
    rng = np.random.default_rng(0)
    for _ in range(2000):
        agent.observe(rng.normal(size=3).astype(np.float32), rng.uniform(-1, 1, 1).astype(np.float32),
                      float(rng.normal()), rng.normal(size=3).astype(np.float32), False)
    batch = agent.sample_batch()

    def plain_actor_loss(obs, temperature=None):
        """The same arithmetic as the agent's: the critic read frozen (pplrl.nets.frozen)."""
        alpha = agent.alpha if temperature is None else temperature
        d = agent.policy(obs)
        a = d.rsample()
        with frozen(agent.critic):
            log_q, q = d.log_prob(a), agent.critic.min(obs, a)
        return (alpha * log_q - q).mean(), log_q, q

    def step(loss):
        agent.actor_opt.zero_grad()
        loss.backward()
        agent.actor_opt.step()

    rows = bench_pair("SAC actor ELBO (fwd+bwd+step)", lambda: step(agent.actor_loss(batch.obs)[0]),
                      lambda: step(plain_actor_loss(batch.obs)[0]), repeats, inner)

    original = SAC.actor_loss

    def plain_with_terms(self, obs, temperature=None):
        """The plain loss and the same floats the ELBO reports (its terms, summed over the batch)."""
        loss, log_q, q = plain_actor_loss(obs, temperature)
        kl, reward = float(log_q.detach().sum()), float(q.detach().sum())
        return loss, {"kl_policy": kl, "reward": reward, "elbo": reward - kl}

    def plain_update():
        SAC.actor_loss = plain_with_terms
        try:
            agent.train_step(batch, 0)
        finally:
            SAC.actor_loss = original

    rows += bench_pair("full SAC update (critic+actor+alpha)", lambda: agent.train_step(batch, 0), plain_update,
                       repeats, max(1, inner // 2))
    return rows


def actor_breakdown(repeats: int, batch_size: int) -> dict:
    """Where the actor ELBO's forward spends its extra time, validation off, medians over
    ``repeats`` interleaved calls (microseconds): Pyro's steps of ``get_importance_trace``
    (the guide's trace, the model's trace replayed against it, pruning the plates' subsample
    sites, the model's log-probs, the guide's score parts) beside the plain loss's steps
    (policy forward and sample, critic forward, log q)."""
    from pyro import poutine
    from pyro.poutine.util import prune_subsample_sites

    from pplrl.algorithms import SAC, default_config

    agent = SAC(default_config("sac", batch_size=batch_size), 3, 1)
    obs = torch.randn(batch_size, 3)
    args, kwargs = agent.actor_args(obs, agent.critic.min, agent.alpha)
    times: dict[str, list[float]] = {}

    def lap(marks):
        for (name, t0), (_, t1) in zip(marks[:-1], marks[1:]):
            times.setdefault(name, []).append((t1 - t0) * 1e6)

    with pyro.validation_enabled(False), pyro.settings.context(module_local_params=True):
        for i in range(repeats + 20):
            m = [("pyro: guide trace", time.perf_counter())]
            g = poutine.trace(agent.guide).get_trace(*args, **kwargs)
            m.append(("pyro: model trace (replayed)", time.perf_counter()))
            mt = poutine.trace(poutine.replay(agent.model, trace=g)).get_trace(*args, **kwargs)
            m.append(("pyro: prune subsample sites", time.perf_counter()))
            g, mt = prune_subsample_sites(g), prune_subsample_sites(mt)
            m.append(("pyro: model log-probs", time.perf_counter()))
            mt.compute_log_prob()
            m.append(("pyro: guide score parts", time.perf_counter()))
            g.compute_score_parts()
            m.append(("plain: policy forward + sample", time.perf_counter()))
            d = agent.policy(obs)
            a = d.rsample()
            m.append(("plain: critic forward", time.perf_counter()))
            agent.critic.min(obs, a)
            m.append(("plain: log q", time.perf_counter()))
            d.log_prob(a)
            m.append(("end", time.perf_counter()))
            if i >= 20:  # warm-up
                lap(m)
    return {k: statistics.median(v) for k, v in times.items()}


def ensemble_rows(repeats: int, inner: int, batch_size: int) -> list[dict]:
    try:
        from models.dynamics import GaussianEnsemble
    except ImportError:
        return []

    model = GaussianEnsemble(3, 1)
    obs, act = torch.randn(batch_size, 3), torch.randn(batch_size, 1)
    nxt, rew = obs + 0.1 * torch.randn(batch_size, 3), torch.randn(batch_size)
    model.normalizer.update(torch.cat([obs, act], -1)) if hasattr(model, "normalizer") else None
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 1e-3}), pyro.infer.Trace_ELBO())
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    svi.step(obs, act, nxt, rew)

    def plain():
        d = model.sample_member_dist(obs, act)
        target = torch.cat([nxt - obs, rew[:, None]], -1)
        loss = -d.log_prob(target).sum() + 0.01 * (model.max_logvar.sum() - model.min_logvar.sum())
        opt.zero_grad()
        loss.backward()
        opt.step()

    return bench_pair("dynamics ensemble likelihood (SVI step)", lambda: svi.step(obs, act, nxt, rew), plain,
                      repeats, inner)


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--inner", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--threads", type=int, default=1, help="torch threads (one, as bench_update; 0: torch's choice)")
    p.add_argument("--out", type=Path, default=Path("runs/bench_overhead.json"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = (sac_rows(args.repeats, args.inner, args.batch_size)
            + ensemble_rows(args.repeats, args.inner, args.batch_size))
    print(f"Pyro overhead per update, batch {args.batch_size}, median of {args.repeats} x {args.inner}, "
          f"{torch.get_num_threads()} torch threads")
    print(f"{'objective':42s} {'validation':>10s} {'pyro ms':>9s} {'torch ms':>9s} {'ratio':>7s}")
    for r in rows:
        print(f"{r['objective']:42s} {'on' if r['validation'] else 'off':>10s} {r['pyro_ms']:9.3f} "
              f"{r['torch_ms']:9.3f} {r['ratio']:7.2f}")
    breakdown = actor_breakdown(20 * args.repeats, args.batch_size)
    print("actor ELBO forward, piece by piece (validation off; microseconds, median):")
    for k, v in breakdown.items():
        print(f"  {k:36s} {v:8.1f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"threads": torch.get_num_threads(), "rows": rows, "actor_breakdown": breakdown},
                                   indent=1))
    return rows


if __name__ == "__main__":
    main()
