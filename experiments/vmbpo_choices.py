"""Two of VMBPO's estimator choices, measured on trained agents (the papers' claims issue,
point 2): the TD clamp in q_d's weights and the reference samples of nu's dual.

Paper: /work/shared/papers/000_… (VMBPO) eqs. 19 and 21; 001_… (beta-VMBPO) App. C.1.
pplrl applies beta-VMBPO's clamp of the scaled TD error, |scale * TD| <= 4 (App. C.1), to
VMBPO's q_d weights exp(scale * TD) too (``td_clamp``; VMBPO's eq. 19 has none), and fits
VMBPO's log-ratio network nu by eq. 21 with the p side sampled from the prior model p_theta
(``nu_reference='model'``) where the paper uses the real next states of D (``'real'``).

Per seed this script trains ``pplrl train vmbpo`` on ``--env`` (default Pendulum-v1) for
``--steps`` env steps (``gradient_steps=2`` as the README's benchmark; run folder
``OUT/runs/vmbpo-seedS``, resumed if an earlier call left it unfinished, read back if
finished), then, at the trained agent's critic, models and replay:

1. **TD clamp.** The q_d weights' log-weights scale * TD over the whole replay with and
   without the clamp: the share of transitions beyond the clamp, PSIS k-hat and ESS
   fraction of the weights (``pplrl.diagnostics.importance_weight_diagnostics``; k-hat >
   0.7: the weighted fit rests on a few transitions), and, after a q_d fit with each (the
   agent's own step-1 fit, warm-started from p_theta refitted just before, as a training
   update does), KL(q_d || p_theta)
   by the two ensembles' elite mixtures on a batch of replay states with a ~ q_c.
2. **nu's reference and actions.** The nu network the run trained, and a fresh one (same
   architecture and seed for each) fitted by eq. 21 for ``--nu-steps`` steps (batch 256, the
   agent's learning rate) with the p side from p_theta ('model') or from D's real next states
   ('real'), each at the real batch's actions (``nu_actions='replay'``) or at the critic's
   model samples, a ~ q_c (``'policy'``, eq. 21's E), then evaluated on a fresh
   batch of (x ~ D, a ~ q_c, x' ~ q_d), the samples the critic's target uses it on: against
   log q_d/p_theta from the two ensembles' mixture densities (exact for the models the
   agent holds), the mean (the KL estimate), the RMSE, the correlation, and the share of
   nu values within 5 % of the soft bound ``nu_clip``.

Prints a table per seed and the mean over seeds; writes ``OUT/vmbpo_choices.json``.

    python experiments/vmbpo_choices.py                         # 3 seeds x 2k steps, ~10 min on 1 core
    python experiments/vmbpo_choices.py --seeds 0 --steps 1500 --out runs/vc_quick
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_SET = ["gradient_steps=2"]


def train_agent(env_id: str, seed: int, steps: int, overrides: list[str], folder: Path):
    """Train (or resume, or read back) one VMBPO run in ``folder``."""
    from pplrl.algorithms import apply_overrides, default_config
    from pplrl.runner import train_or_resume

    config = apply_overrides(default_config("vmbpo", env_id=env_id, seed=seed), [*DEFAULT_SET, *overrides])
    t0 = time.perf_counter()
    agent = train_or_resume("vmbpo", config, folder, steps, eval_every=steps, eval_episodes=5,
                            checkpoint_every=min(steps, 500), progress=False)
    return agent, time.perf_counter() - t0


def td_clamp_effect(agent, step: int, clamp: float) -> dict:
    """Weights, k-hat, ESS and the fitted q_d's KL to p_theta with and without the clamp."""
    from pplrl.diagnostics import importance_weight_diagnostics
    base = agent.config
    agent.fit_model()  # as a training update does before q_d's fit: q_d starts from this p_theta
    agent.config = dataclasses.replace(base, td_clamp=None)
    try:
        raw = agent.replay_log_weights()
    finally:
        agent.config = base
    saved = copy.deepcopy(agent.q_dynamics.state_dict())
    out = {"beyond_clamp": float((raw.abs() > clamp).float().mean()), "raw_min": float(raw.min()),
           "raw_max": float(raw.max())}
    for name, value in (("clamped", clamp), ("unclamped", None)):
        log_w = raw if value is None else raw.clamp(-value, value)
        diag = importance_weight_diagnostics(log_w)
        agent.config = dataclasses.replace(base, td_clamp=value)
        try:
            torch.manual_seed(step)
            info = agent.fit_variational_dynamics(step)
        finally:
            agent.config = base
            agent.q_dynamics.load_state_dict(saved)
        out[name] = {"khat": diag["khat"], "ess_frac": diag["ess_frac"], "kl_q_d_p": info["kl_dynamics_ensembles"]}
    return out


def nu_reference_effect(agent, steps: int, seed: int) -> dict:
    """A fresh nu fitted by eq. 21 against p_theta's samples or the real next states, scored
    against the ensembles' log q_d/p_theta on the critic's samples."""
    from pplrl.nets import adam, mlp

    c = agent.config
    saved_nu, saved_opt = agent.nu, agent.nu_opt
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        test = agent.replay.sample(1024, np.random.default_rng(seed + 1))
        act = agent.policy(test.obs).sample()
        x_next, _, _ = agent.q_dynamics.predict(test.obs, act, generator=g)
        exact = (agent.q_dynamics.elite_mixture_log_density(test.obs, act, x_next)
                 - agent.ensemble.elite_mixture_log_density(test.obs, act, x_next))
    out = {"exact_kl": float(exact.mean())}

    def score(nu_net) -> dict:
        agent.nu = nu_net
        with torch.no_grad():
            nu = agent.nu_value(test.obs, act, x_next)
        err = nu - exact
        return {"kl_estimate": float(nu.mean()), "rmse": float(err.pow(2).mean().sqrt()),
                "corr": float(np.corrcoef(nu.numpy(), exact.numpy())[0, 1]),
                "at_bound": float((nu.abs() > 0.95 * c.nu_clip).float().mean()) if c.nu_clip else 0.0}

    saved_actions = c.nu_actions
    try:
        if saved_nu is not None:  # the nu the run trained (nu_reference as configured); none with log_ratio='ensembles'
            out["agent"] = score(saved_nu)
        for actions, ref in NU_VARIANTS:
            torch.manual_seed(seed)
            c.nu_actions = actions
            agent.nu = mlp(2 * agent.obs_dim + agent.act_dim, 1, c.hidden)
            agent.nu_opt = adam(agent.nu.parameters(), lr=c.lr)
            rng = np.random.default_rng(seed)
            for _ in range(steps):
                agent.nu_update(agent.replay.sample(c.batch_size, rng), 0, reference=ref)
            out[ref if actions == "replay" else f"{ref}_policy"] = score(agent.nu)
    finally:
        agent.nu, agent.nu_opt, c.nu_actions = saved_nu, saved_opt, saved_actions
    return out


#: the fresh nu fits: (nu_actions, nu_reference); keys 'model', 'real', 'model_policy', 'real_policy'
NU_VARIANTS = (("replay", "model"), ("replay", "real"), ("policy", "model"), ("policy", "real"))
NU_KEYS = ("agent", "model", "real", "model_policy", "real_policy")


def _mean(results: dict) -> dict:
    """The per-seed results averaged key by key (nested dicts of numbers)."""
    first = next(iter(results.values()))

    def avg(path):
        vals = []
        for r in results.values():
            v = r
            for k in path:
                v = v[k]
            vals.append(v)
        return float(np.mean(vals))

    def walk(node, path):
        return {k: walk(v, (*path, k)) if isinstance(v, dict) else avg((*path, k)) for k, v in node.items()}

    return walk(first, ())


def table(results: dict) -> str:
    head = ("seed | return | beyond clamp | k-hat clamped / raw | ESS frac clamped / raw | KL(q_d||p) clamped / raw"
            " | exact KL | nu: KL, RMSE, corr, at bound: the run's | fresh, 'model' | fresh, 'real'"
            " | fresh, 'model', a ~ q_c | fresh, 'real', a ~ q_c")
    lines = [head]
    rows = dict(results)
    if len(results) > 1:
        rows["mean"] = _mean(results)
    for seed, r in rows.items():
        t, n = r["td_clamp"], r["nu_reference"]
        lines.append(
            f"{seed} | {r['return']:.1f} | {t['beyond_clamp']:.3f} | {t['clamped']['khat']:.2f} / "
            f"{t['unclamped']['khat']:.2f} | {t['clamped']['ess_frac']:.3f} / {t['unclamped']['ess_frac']:.3f} | "
            f"{t['clamped']['kl_q_d_p']:.3f} / {t['unclamped']['kl_q_d_p']:.3f} | {n['exact_kl']:.3f} | "
            + " | ".join(f"{n[ref]['kl_estimate']:.3f}, {n[ref]['rmse']:.3f}, {n[ref]['corr']:.2f}, "
                         f"{n[ref]['at_bound']:.3f}" for ref in NU_KEYS if ref in n))
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=2000, help="env steps of training per seed")
    p.add_argument("--nu-steps", type=int, default=2000, help="SVI-free gradient steps of each fresh nu")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                   help=f"vmbpo overrides after the script's own ({' '.join(DEFAULT_SET)})")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/vmbpo_choices"))
    args = p.parse_args(argv)
    if min(args.steps, args.nu_steps) <= 0:
        raise SystemExit("error: --steps and --nu-steps must be > 0")
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    saved = {"env": args.env, "steps": args.steps, "nu_steps": args.nu_steps, "overrides": [*DEFAULT_SET, *args.set],
             "results": {}}
    from pplrl.runfiles import read_records

    for seed in args.seeds:
        folder = args.out / "runs" / f"vmbpo-seed{seed}"
        agent, wall = train_agent(args.env, seed, args.steps, args.set, folder)
        evals = [r for r in read_records(folder / "metrics.jsonl") if r.get("kind") == "eval"]
        clamp = agent.config.td_clamp or 4.0
        # nu first, on the models the run trained it against; then p_theta is refitted for q_d's fits
        nu = nu_reference_effect(agent, args.nu_steps, seed)
        r = {"return": float(evals[-1]["mean_return"]) if evals else float("nan"), "train_wall_s": wall,
             "td_clamp": td_clamp_effect(agent, args.steps, clamp), "nu_reference": nu}
        saved["results"][str(seed)] = r
        (args.out / "vmbpo_choices.json").write_text(json.dumps(saved, indent=1))
        print(f"seed {seed} done ({wall:.0f} s training)", flush=True)
    print(f"\n{args.env}, VMBPO after {args.steps} steps ({' '.join(saved['overrides'])}); q_d weights over the "
          f"replay, nu fitted {args.nu_steps} steps and scored on (x ~ D, a ~ q_c, x' ~ q_d)")
    print(table(saved["results"]))
    print(f"wrote {args.out / 'vmbpo_choices.json'}")
    return saved


if __name__ == "__main__":
    main()
