"""Risk and beta in RL-as-inference: beta-VMBPO paper (001_…) Fig. 1 and Sec. 6.1.

1. Risky arm (Fig. 1): soft Q of both arms and the posterior probability of the
   bad branch against beta, by exact DP; the beta at which the preferred arm
   changes, found by root finding on the DP values (and the closed form 5/ln 9).
2. The same problem solved by inference: SVI on the risk-sensitive ELBO (eq. 7) from
   the Pyro model/guide pair, 3 seeds, every ELBO term recorded and summarised with
   ArviZ (seeds as chains), checked against DP.
3. Cliff gridworld (Sec. 6.1, Figs. 2-3): paths of the EM fixed point under small and
   large fixed beta, and learning curves of tabular beta-VMBPO (dual beta), VMBPO
   (beta = 1) and Q-learning over 5 seeds.

Writes ``risky_arm.png``, ``cliff.png``, ``svi_traces.png``, ``results.json`` and
``svi_terms_seed*.jsonl`` under ``--out``; prints the tables.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from scipy.optimize import brentq
from tqdm import tqdm

from guides.tabular import TabularGuide
from models.trajectory import tabular_environment, trajectory_model
from pplrl import diagnostics
from pplrl import tabular as tb
from pplrl.elbo import RiskSensitiveELBO
from pplrl.envs import TabularEnv, cliff_gridworld, risky_arm
from pplrl.tabular_learning import q_learning, tabular_vmbpo


def beta_sweep(betas: np.ndarray) -> dict:
    mdp = risky_arm()
    rows = []
    for beta in betas:
        sol = tb.soft_value_iteration(mdp, scale=1 / beta, horizon=2)
        rows.append({"beta": float(beta), "Q_left": float(sol.Q[0, 0, 0]), "Q_right": float(sol.Q[0, 0, 1]),
                     "q_c_right": float(sol.q_c[0, 0, 1]), "q_d_bad_branch": float(sol.q_d[0, 0, 1, 1])})

    def gap(beta):
        Q = tb.soft_value_iteration(mdp, scale=1 / beta, horizon=2).Q[0, 0]
        return Q[1] - Q[0]

    beta_switch = brentq(gap, 0.5, 20.0, xtol=1e-12)
    return {"rows": rows, "beta_switch_dp": beta_switch, "beta_switch_closed_form": 5 / math.log(9)}


def svi_risky_arm(beta: float, seeds: list[int], steps: int, out: Path) -> dict:
    """Maximise the risk-sensitive ELBO by SVI from random guide initialisations."""
    mdp, H = risky_arm(), 2
    P, R, pi = torch.tensor(mdp.P), torch.tensor(mdp.R), torch.tensor(mdp.uniform_policy())
    env = tabular_environment(P, R, pi, dist.Categorical(probs=torch.tensor(mdp.p0)))
    exact = tb.soft_value_iteration(mdp, scale=1 / beta, horizon=H)
    runs, finals = [], []
    for seed in seeds:
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        guide = TabularGuide(P, pi, horizon=H, time_varying=True)
        pyro.param("q.policy_delta", torch.randn(H, 6, 2, dtype=torch.float64))
        pyro.param("q.dynamics_delta", torch.randn(H, 6, 2, 6, dtype=torch.float64))
        elbo = RiskSensitiveELBO(beta)
        svi = SVI(trajectory_model, guide, pyro.optim.Adam({"lr": 0.1}), elbo)
        rec = diagnostics.TermRecorder()
        for step in range(steps):
            svi.step(env, H)
            diagnostics.check_finite("elbo", elbo.last_terms["elbo"], step)
            rec.record(step, **elbo.last_terms)
        rec.save_jsonl(out / f"svi_terms_seed{seed}.jsonl")
        runs.append(rec.as_arrays())
        finals.append({"seed": seed, **elbo.last_terms, "q_c_right": float(guide.q_c()[0, 0, 1])})
    dt = diagnostics.runs_to_datatree(runs, seeds=seeds)
    summary = diagnostics.summarize(dt.isel(draw=slice(steps // 2, None)) if hasattr(dt, "isel") else dt,
                                    var_names=["elbo", "reward", "kl_policy", "kl_dynamics"])
    diagnostics.plot_traces(dt, out / "svi_traces.png", var_names=["elbo", "reward", "kl_policy", "kl_dynamics"])
    return {"beta": beta, "exact_risk_elbo": beta * exact.log_evidence(mdp.p0),
            "exact_q_c_right": float(exact.q_c[0, 0, 1]), "finals": finals,
            "summary_text": diagnostics.format_summary(summary)}


def cliff_paths(betas=(1.0, 50.0)) -> dict:
    mdp = cliff_gridworld()
    out = {}
    for beta in betas:
        _, Q = tb.risk_sensitive_value_iteration(mdp, scale=1 / beta)
        policy = np.eye(mdp.n_actions)[Q.argmax(-1)]
        sol = tb.soft_value_iteration(mdp, policy * 0.98 + 0.005, 1 / beta)  # E-step around that policy
        out[beta] = {"path_policy_real_dynamics": tb.greedy_path(mdp, policy),
                     "path_posterior_dynamics": tb.greedy_path(mdp, policy, sol.q_d),
                     "expected_return": float(mdp.p0 @ tb.policy_evaluation(mdp, policy, horizon=100))}
    V_star, _ = tb.value_iteration(mdp)
    out["risk_neutral_optimum"] = float(mdp.p0 @ V_star)
    return out


def cliff_learning(seeds: list[int], steps: int) -> dict:
    mdp = cliff_gridworld()
    algos = {
        "beta-VMBPO": lambda s: tabular_vmbpo(TabularEnv(mdp), steps, beta=1.0, learn_beta=True, seed=s),
        "VMBPO (beta=1)": lambda s: tabular_vmbpo(TabularEnv(mdp), steps, beta=1.0, seed=s),
        "Q-learning": lambda s: q_learning(TabularEnv(mdp), steps, seed=s),
    }
    results = {}
    for name, fn in algos.items():
        curves = [fn(s) for s in tqdm(seeds, desc=name, leave=False)]
        results[name] = {"steps": curves[0].steps, "returns": [c.returns for c in curves],
                         "beta": [c.extras.get("beta") for c in curves]}
    return results


def plot_risky_arm(sweep: dict, path: Path) -> None:
    rows = sweep["rows"]
    b = np.array([r["beta"] for r in rows])
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
    ax[0].plot(b, [r["beta"] * r["Q_left"] for r in rows], label="left (safe, -5)")
    ax[0].plot(b, [r["beta"] * r["Q_right"] for r in rows], label="right (risky, E = -9)")
    for a in ax:
        a.axvline(sweep["beta_switch_dp"], color="k", ls=":", label=f"switch beta = {sweep['beta_switch_dp']:.3f}")
        a.set_xscale("log")
        a.set_xlabel("beta")
    ax[0].set_ylabel("beta * soft Q(S, a)")
    ax[0].legend()
    ax[1].plot(b, [r["q_d_bad_branch"] for r in rows], label="posterior q_d(A | S, right)")
    ax[1].axhline(0.9, color="gray", ls="--", label="true p(A | S, right) = 0.9")
    ax[1].plot(b, [r["q_c_right"] for r in rows], label="posterior q_c(right | S)")
    ax[1].legend()
    fig.suptitle("Risky arm (beta-VMBPO Fig. 1), exact soft backups")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_cliff(paths: dict, learning: dict, path: Path) -> None:
    mdp = cliff_gridworld()
    rows, cols = mdp.meta["rows"], mdp.meta["cols"]
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    grid = np.zeros((rows, cols))
    for c in mdp.meta["cliff"]:
        grid[divmod(c, cols)] = -1
    ax[0].imshow(grid, cmap="Reds_r", alpha=0.4)
    for (beta, style) in zip([k for k in paths if k != "risk_neutral_optimum"], ["r-o", "g-s"]):
        rc = np.array([divmod(s, cols) for s in paths[beta]["path_policy_real_dynamics"]])
        ax[0].plot(rc[:, 1], rc[:, 0], style, label=f"beta = {beta:g}: return {paths[beta]['expected_return']:.1f}")
    ax[0].set_title("greedy paths of the EM fixed point (cliff shaded)")
    ax[0].legend(fontsize=8, loc="upper left")
    for name, res in learning.items():
        R = np.array(res["returns"])
        m, s = R.mean(0), R.std(0)
        ax[1].plot(res["steps"], m, label=name)
        ax[1].fill_between(res["steps"], m - s, m + s, alpha=0.2)
    ax[1].axhline(paths["risk_neutral_optimum"], color="k", ls=":", label="risk-neutral optimum")
    ax[1].set_ylim(-80, 0)
    ax[1].set_xlabel("environment steps")
    ax[1].set_ylabel("expected return of greedy policy")
    ax[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/risky_arm"))
    p.add_argument("--seeds", type=int, default=5, help="seeds for the cliff learning curves")
    p.add_argument("--steps", type=int, default=5000, help="environment steps per cliff learning run")
    p.add_argument("--svi-steps", type=int, default=300)
    args = p.parse_args(argv)
    if args.seeds < 1 or args.steps < 1 or args.svi_steps < 1:
        p.error("--seeds, --steps and --svi-steps must be positive")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    sweep = beta_sweep(np.geomspace(0.3, 30, 61))
    print("Risky arm (beta-VMBPO Fig. 1), exact soft backups")
    print(f"{'beta':>7} {'beta*Q(left)':>13} {'beta*Q(right)':>14} {'q_c(right|S)':>13} {'q_d(A|S,right)':>15}")
    for r in sweep["rows"][::6]:
        print(f"{r['beta']:7.3f} {r['beta'] * r['Q_left']:13.3f} {r['beta'] * r['Q_right']:14.3f} "
              f"{r['q_c_right']:13.3f} {r['q_d_bad_branch']:15.3f}")
    print(f"preferred arm switches from right (risky) to left (safe) at beta = {sweep['beta_switch_dp']:.6f} "
          f"(DP root); closed form 5/ln 9 = {sweep['beta_switch_closed_form']:.6f}; the paper reads ~2.5 off Fig. 1")
    plot_risky_arm(sweep, args.out / "risky_arm.png")

    svi = svi_risky_arm(1.0, seeds=[0, 1, 2], steps=args.svi_steps, out=args.out)
    print(f"\nSVI on the risk-sensitive ELBO (beta = 1), 3 seeds, {args.svi_steps} steps; "
          f"exact beta*log p(O) = {svi['exact_risk_elbo']:.5f}, exact q_c(right|S) = {svi['exact_q_c_right']:.4f}")
    for f in svi["finals"]:
        print(f"  seed {f['seed']}: ELBO {f['elbo']:.5f}  reward {f['reward']:.4f}  KL_c {f['kl_policy']:.4f}  "
              f"KL_d {f['kl_dynamics']:.4f}  q_c(right|S) {f['q_c_right']:.4f}")
    print(svi["summary_text"])

    paths = cliff_paths()
    print("\nCliff gridworld (Sec. 6.1): EM fixed point under fixed beta")
    for beta in (1.0, 50.0):
        d = paths[beta]
        print(f"  beta = {beta:g}: path {d['path_policy_real_dynamics']}, posterior-dynamics path "
              f"{d['path_posterior_dynamics']}, expected return {d['expected_return']:.2f}")
    print(f"  risk-neutral optimum {paths['risk_neutral_optimum']:.2f}")

    seeds = list(range(args.seeds))
    learning = cliff_learning(seeds, args.steps)
    checkpoints = [i for i, s in enumerate(learning["Q-learning"]["steps"])
                   if s in (500, 1000, 2000, 3000, 5000) or s == args.steps]
    print(f"\nCliff gridworld learning, {len(seeds)} seeds: mean (sd) expected return of the greedy policy")
    print(f"{'algorithm':>16} " + " ".join(f"{learning['Q-learning']['steps'][i]:>14d}" for i in checkpoints))
    for name, res in learning.items():
        R = np.array(res["returns"])
        print(f"{name:>16} " + " ".join(f"{R[:, i].mean():8.2f} ({R[:, i].std():4.1f})" for i in checkpoints))
    betas_final = [b[-1] for b in learning["beta-VMBPO"]["beta"]]
    print(f"beta-VMBPO final beta per seed: {np.round(betas_final, 2).tolist()}")
    plot_cliff(paths, learning, args.out / "cliff.png")

    results = {"risky_arm": sweep, "svi": {k: v for k, v in svi.items() if k != "summary_text"},
               "cliff_paths": {str(k): v for k, v in paths.items()}, "cliff_learning": learning,
               "seconds": time.time() - t0}
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    print(f"\nwrote {args.out}/risky_arm.png, cliff.png, svi_traces.png, results.json ({time.time() - t0:.0f} s)")
    return results


if __name__ == "__main__":
    main()
