"""Which critic beta-VMBPO's eqs. 11 and 13 read, measured on trained agents (the papers'
claims issue, point 3: "eq. 11 uses the target Q' where the paper has Q_psi, eq. 13 the online
Q where it has Q'").

Paper: /work/shared/papers/001_… (beta-VMBPO) eqs. 11 and 13; 000_… (VMBPO) eqs. 19 and 25.
beta-VMBPO weights q_d's likelihood by exp((r + V'(s') - Q_psi(s, a)) / beta), the *online*
critic (eq. 11), and its actor maximises Q'_psi, the *target* critic (eq. 13). VMBPO has it the
other way round: eq. 19 weights by the target Q', eq. 25's actor reads the online Q. pplrl
implements the family once, with VMBPO's reading for all three agents. The two critics differ
only by the Polyak lag (tau = 0.005), so this script measures how much the reading changes
what the estimators compute, on finished beta-VMBPO runs (their last checkpoint, their own
critic, models and replay):

1. **q_d's weights** (eq. 11): scale * TD over the whole replay with Q' (pplrl) and with Q
   (the paper), each clamped at the agent's ``td_clamp``: their correlation, the mean absolute
   difference of the log-weights, the share at the clamp, and each one's ESS fraction and PSIS
   k-hat (:func:`pplrl.diagnostics.importance_weight_diagnostics`).
2. **the actor's gradient** (eq. 13): the gradient of the agent's actor loss with respect to
   q_c's parameters on ``--batches`` replay batches of 256 states, with the online Q (pplrl) and
   with the target Q' (the paper), the same reparameterisation noise for both: the cosine
   similarity of the two gradients and the norm of their difference relative to pplrl's.

Prints a table and writes JSON (default runs/beta_critic_roles.json).

    python experiments/beta_critic_roles.py runs/p3/runs/beta-vmbpo_seed1 runs/p3/runs/beta-vmbpo_seed2
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import numpy as np
import torch


def weight_effect(agent) -> dict:
    """Log-weights of q_d's fit over the whole replay with the target critic and the online one."""
    from pplrl.diagnostics import importance_weight_diagnostics

    data = agent.replay.all()
    target = agent.replay_log_weights(data)  # pplrl: Q' (VMBPO eq. 19)
    with torch.no_grad():
        soft_next = torch.cat([agent.soft_value_target(data.next_obs[i:i + 4096])
                               for i in range(0, len(data.obs), 4096)])
        q_online = torch.cat([agent.critic.min(data.obs[i:i + 4096], data.act[i:i + 4096])
                              for i in range(0, len(data.obs), 4096)])
        online = agent.scale * (data.rew + agent.config.gamma * (1 - data.done) * soft_next - q_online)
        if agent.config.td_clamp is not None:
            online = online.clamp(-agent.config.td_clamp, agent.config.td_clamp)
    clamp = agent.config.td_clamp if agent.config.td_clamp is not None else float("inf")
    out = {"transitions": len(data.obs),
           "correlation": float(np.corrcoef(target.numpy(), online.numpy())[0, 1]),
           "mean_abs_diff": float((target - online).abs().mean())}
    for name, logw in (("target", target), ("online", online)):
        diag = importance_weight_diagnostics(logw)
        out[f"{name}_ess_frac"], out[f"{name}_khat"] = diag["ess_frac"], diag["khat"]
        out[f"{name}_at_clamp"] = float((logw.abs() >= clamp - 1e-6).float().mean())
    return out


def actor_gradient_effect(agent, batches: int, seed: int) -> dict:
    """Cosine similarity of q_c's actor-loss gradient with the online and the target critic."""
    params = [p for p in agent.policy.parameters() if p.requires_grad]

    def grad(obs, noise_seed, critic):
        saved = agent.critic
        agent.critic = critic  # actor_loss reads self.critic (and freezes it)
        try:
            torch.manual_seed(noise_seed)
            loss, _ = agent.actor_loss(obs)
            return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])
        finally:
            agent.critic = saved

    rng = np.random.default_rng(seed)
    cos, rel = [], []
    for i in range(batches):
        obs = agent.replay.sample(256, rng).obs
        g_online, g_target = grad(obs, seed + i, agent.critic), grad(obs, seed + i, agent.critic_target)
        cos.append(float(torch.nn.functional.cosine_similarity(g_online, g_target, dim=0)))
        rel.append(float((g_online - g_target).norm() / g_online.norm()))
    return {"cosine": statistics.median(cos), "cosine_min": min(cos), "relative_diff": statistics.median(rel)}


def measure(folder: Path, batches: int) -> dict:
    from pplrl.runner import agent_from_checkpoint

    agent, state = agent_from_checkpoint(folder)
    if not getattr(agent.config, "use_beta", False):
        raise SystemExit(f"error: {folder} holds a {state['algo']} run, not beta-VMBPO")
    out = {"folder": str(folder), "step": state.get("step"), "beta": float(agent.beta)}
    out.update(weight_effect(agent))
    out.update(actor_gradient_effect(agent, batches, agent.config.seed))
    return out


def table(rows: list[dict]) -> str:
    lines = [f"{'run':>28} {'step':>6} {'beta':>6} | {'corr':>6} {'|dlogw|':>8} {'clamp Q`/Q':>11} "
             f"{'ESS Q`/Q':>11} {'khat Q`/Q':>11} | {'grad cos':>8} {'(min)':>6} {'rel diff':>8}"]
    for r in rows:
        lines.append(f"{Path(r['folder']).name:>28} {r['step']:>6} {r['beta']:6.1f} | {r['correlation']:6.3f} "
                     f"{r['mean_abs_diff']:8.3f} {r['target_at_clamp']:5.2f}/{r['online_at_clamp']:<5.2f} "
                     f"{r['target_ess_frac']:5.2f}/{r['online_ess_frac']:<5.2f} "
                     f"{r['target_khat']:5.2f}/{r['online_khat']:<5.2f} | {r['cosine']:8.3f} {r['cosine_min']:6.3f} "
                     f"{r['relative_diff']:8.3f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", type=Path, nargs="+", help="finished beta-VMBPO run folders")
    p.add_argument("--batches", type=int, default=20, help="replay batches for the actor-gradient comparison")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/beta_critic_roles.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    missing = [str(r) for r in args.runs if not (r / "checkpoint.pt").exists()]
    if missing:
        p.error(f"no checkpoint in {', '.join(missing)}")
    rows = [measure(r, args.batches) for r in args.runs]
    print("beta-VMBPO: q_d's weights (eq. 11) and the actor's gradient (eq. 13) with the target critic Q' "
          "(pplrl, VMBPO's eqs. 19/25 reading: Q' in the weights, Q in the actor) against the paper's reading")
    print(table(rows))
    summary = {k: float(np.mean([r[k] for r in rows])) for k in
               ("correlation", "mean_abs_diff", "target_ess_frac", "online_ess_frac", "cosine", "relative_diff")}
    print("mean over runs: " + ", ".join(f"{k} {v:.3f}" for k, v in summary.items()))
    result = {"runs": rows, "mean": summary}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
