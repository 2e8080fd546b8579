"""VIREL's counterexample to MaxEnt RL (Fellows et al., 002_…, Sec. 2.2, Fig. 1).

In the MDP of Fig. 1 (:func:`pplrl.envs.virel_counterexample`) action a2 in s0 earns
reward 1 and a1 earns 0 but leads to k1 equally worthless choices. The MERL-optimal
probability of the suboptimal action is (Sec. 2.2)::

    p1* = 1 / (k1^-gamma exp(1/c) + 1),

which exceeds 1/2 — the MaxEnt MAP action is the wrong one — whenever
c > 1 / (gamma ln k1). This script

1. checks the closed form against a discounted MaxEnt soft value iteration of the
   same MDP (:func:`pplrl.tabular.maxent_value_iteration`) over a grid of c and k1;
2. computes VIREL's Boltzmann policy at temperature epsilon — the fixed point of
   Q = T^{pi_eps} Q with pi_eps ∝ exp(Q / eps), no entropy bonus
   (:func:`pplrl.tabular.boltzmann_fixed_point`) — and shows pi_eps(a1|s0) < 1/2 for
   every eps and -> 0 as eps -> 0 (Theorem 1: the greedy, optimal action);
3. runs VIREL's own EM (:func:`pplrl.tabular.virel_em`), where the temperature is not
   chosen but set by the critic: epsilon = lambda * the mean squared Bellman residual,
   recomputed every iteration as the critic moves toward its target; reports, per
   lambda, epsilon at the start and end, the largest pi(a1|s0) along the way and at the
   fixed point, beside MERL's p1* at the same k1;
4. writes ``virel_counterexample.png`` and ``results.json`` under ``--out`` and prints
   the tables.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np

from pplrl import tabular as tb
from pplrl.envs import virel_counterexample


def p1_closed_form(c: float, k1: int, gamma: float) -> float:
    return 1.0 / (k1 ** (-gamma) * math.exp(1.0 / c) + 1.0)


def merl_sweep(cs, k1s, gamma: float, k2: int) -> list[dict]:
    rows = []
    for k1 in k1s:
        mdp = virel_counterexample(k1, k2)
        mask = mdp.meta["action_mask"]
        for c in cs:
            _, _, pi = tb.maxent_value_iteration(mdp, c, gamma, action_mask=mask)
            rows.append({"k1": int(k1), "c": float(c), "p1_soft_vi": float(pi[0, 0]),
                         "p1_closed_form": p1_closed_form(c, k1, gamma)})
    return rows


def virel_sweep(epsilons, k1: int, gamma: float, k2: int) -> list[dict]:
    mdp = virel_counterexample(k1, k2)
    rows = []
    for eps in epsilons:
        Q, pi = tb.boltzmann_fixed_point(mdp, eps, gamma, action_mask=mdp.meta["action_mask"])
        rows.append({"epsilon": float(eps), "p1_virel": float(pi[0, 0]), "Q_a1": float(Q[0, 0]),
                     "Q_a2": float(Q[0, 1])})
    return rows


def virel_em_sweep(lams, k1: int, gamma: float, k2: int, iters: int = 2000, lr: float = 0.5) -> list[dict]:
    """VIREL's EM with epsilon = lambda * MSBE, one row per lambda."""
    mdp = virel_counterexample(k1, k2)
    rows = []
    for lam in lams:
        em = tb.virel_em(mdp, gamma, lam, lr=lr, iters=iters, action_mask=mdp.meta["action_mask"])
        p1 = em["pi"][:, 0, 0]
        rows.append({"lambda": float(lam), "epsilon_first": float(em["epsilon"][0]),
                     "epsilon_last": float(em["epsilon"][-1]), "p1_max": float(p1.max()), "p1_final": float(p1[-1]),
                     "iterations": iters, "lr": lr})
    return rows


def run(out: Path, gamma: float = 0.9, k1s=(2, 4, 16, 64), k2: int = 10, n_c: int = 41) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    cs = np.logspace(-1.5, 1.5, n_c)
    epsilons = np.logspace(-3, 1, 25)
    merl = merl_sweep(cs, k1s, gamma, k2)
    virel = virel_sweep(epsilons, max(k1s), gamma, k2)
    em = virel_em_sweep((0.1, 1.0, 10.0, 100.0, 1000.0), max(k1s), gamma, k2)
    max_err = max(abs(r["p1_soft_vi"] - r["p1_closed_form"]) for r in merl)
    critical = {int(k1): 1.0 / (gamma * math.log(k1)) for k1 in k1s}
    results = {"gamma": gamma, "k2": k2, "merl": merl, "virel": virel,
               "max_abs_error_closed_form_vs_soft_vi": max_err, "critical_c": critical,
               "virel_max_p1": max(r["p1_virel"] for r in virel), "virel_em": em,
               "merl_p1_same_k1": {str(c): p1_closed_form(c, max(k1s), gamma) for c in (0.1, 1.0, 10.0)}}

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for k1 in k1s:
        rows = [r for r in merl if r["k1"] == k1]
        line, = axes[0].plot([r["c"] for r in rows], [r["p1_closed_form"] for r in rows], label=f"k1={k1}")
        axes[0].plot([r["c"] for r in rows][::4], [r["p1_soft_vi"] for r in rows][::4], "o", color=line.get_color(),
                     ms=4)
    axes[0].axhline(0.5, color="k", lw=0.8, ls="--")
    axes[0].set(xscale="log", xlabel="MERL temperature c", ylabel="p1* = pi_merl(a1 | s0)",
                title=f"MERL optimum (lines: closed form, dots: soft VI), gamma={gamma}")
    axes[0].legend()
    axes[1].plot([r["epsilon"] for r in virel], [r["p1_virel"] for r in virel], "o-")
    axes[1].axhline(0.5, color="k", lw=0.8, ls="--")
    axes[1].set(xscale="log", ylim=(0, 0.55), xlabel="VIREL temperature epsilon", ylabel="pi_eps(a1 | s0)",
                title=f"VIREL Boltzmann policy, k1={max(k1s)}")
    fig.tight_layout()
    fig.savefig(out / "virel_counterexample.png", dpi=120)
    plt.close(fig)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    return results


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path("runs/virel_counterexample"))
    ap.add_argument("--gamma", type=float, default=0.9)
    ap.add_argument("--k1", type=int, nargs="+", default=[2, 4, 16, 64])
    args = ap.parse_args(argv)
    res = run(args.out, args.gamma, tuple(args.k1))
    gap = res["max_abs_error_closed_form_vs_soft_vi"]
    print(f"closed form vs soft value iteration: max |p1* difference| = {gap:.2e}")
    print("| k1 | critical c = 1/(gamma ln k1) | p1* at c=0.1 | p1* at c=1 | p1* at c=10 |")
    print("|---|---|---|---|---|")
    for k1 in args.k1:
        vals = [p1_closed_form(c, k1, args.gamma) for c in (0.1, 1.0, 10.0)]
        print(f"| {k1} | {res['critical_c'][k1]:.3f} | " + " | ".join(f"{v:.4f}" for v in vals) + " |")
    print("| VIREL epsilon | pi_eps(a1|s0) |")
    print("|---|---|")
    for r in res["virel"][::6]:
        print(f"| {r['epsilon']:.3g} | {r['p1_virel']:.3g} |")
    k1 = max(args.k1)
    merl = ", ".join(f"c={c}: {v:.3f}" for c, v in res["merl_p1_same_k1"].items())
    print(f"VIREL's EM, epsilon = lambda * MSBE (k1={k1}; MERL's p1* at the same k1: {merl})")
    print("| lambda | epsilon, first iteration | epsilon, last | max pi(a1|s0) over the EM | pi(a1|s0) at the end |")
    print("|---|---|---|---|---|")
    for r in res["virel_em"]:
        print(f"| {r['lambda']:g} | {r['epsilon_first']:.3g} | {r['epsilon_last']:.3g} | {r['p1_max']:.3g} | "
              f"{r['p1_final']:.3g} |")
    print(f"wrote {args.out / 'virel_counterexample.png'} and {args.out / 'results.json'}")


if __name__ == "__main__":
    main()
