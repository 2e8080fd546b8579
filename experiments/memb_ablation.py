"""MEMB's ablations (Tan et al., 004_…, App. B.1 and B.3) on Pendulum-v1.

Paper: /work/shared/papers/004_… (MEMB). App. B.1 asks how much imaginary data to use:

* **policy** (Fig. 2a): MEMB's policy gradient goes through s' *sampled from the learned
  model* (eq. 8-9), where SVG(1) takes it along the real transition; "using imaginary data
  in policy update improves the learning with a wide margin";
* **value function** (Fig. 2b, Pendulum): Q fitted by value expansion over H imagined
  steps (Sec. 3.2) instead of real data only (H = 1); "when we increase the value of H, the
  performance decreases";

and App. B.3 plugs the true model in ("MEMB with true model should have better performance").
Together: "imaginary data helps the policy, and hurts the value function".

Variants (``pplrl train memb`` config, everything else Table 2's Pendulum column, m = 5):

=============  ==============================================================================
memb           imagination='model', horizon=1: MEMB as published
svg            imagination='real': the policy's s' is the real s' moved by the model's Jacobian
               (noise inferred from the real transition; :mod:`models.memb`), App. B.1's SVG
true-model     imagination='true': Pendulum-v1's closed-form dynamics and reward (App. B.3)
memb-H2        horizon=2, Q's loss averaged over the 2 tuples (Sec. 3.2, expansion_states='all')
memb-H5        horizon=5, likewise (Fig. 2b's other H; not run by default)
memb-H2-first  horizon=2, Q fitted on the first (real) tuple only (pplrl before; not run by default)
=============  ==============================================================================

Deviation from App. B.1: the SVG variant keeps MEMB's m = 5 updates per env step and its
alpha, so the two differ only in where the policy's s' comes from (the paper's SVG also
used each real transition once and alpha = 0 in Fig. 2a).

Per variant and seed: ``pplrl.runner.train`` into ``OUT/runs/VARIANT/seedS`` (a finished run
is read back, an unfinished one resumed), evaluation every ``--eval-every`` steps
(``--eval-episodes`` deterministic episodes). Prints per variant the mean evaluation return
at each checkpoint with a 95 % stratified-bootstrap interval across seeds (rliable's, via
:func:`pplrl.diagnostics.mean_and_iqm`), the mean over checkpoints (area under the curve) and
the paired difference to ``memb`` per seed (95 % t-interval; ``bench_pendulum.paired``), then
the verdict on the claim. Writes ``OUT/memb_ablation.json`` after every run.

    python experiments/memb_ablation.py                                  # 5 seeds x 4 variants, 4k steps
    python experiments/memb_ablation.py --variants memb svg --seeds 0 1 --steps 2000 --out runs/memb_small
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_pendulum import paired  # noqa: E402

VARIANTS: dict[str, list[str]] = {
    "memb": [],
    "svg": ["imagination=real"],
    "true-model": ["imagination=true"],
    "memb-H2": ["horizon=2", "expansion_states=all"],
    "memb-H5": ["horizon=5", "expansion_states=all"],
    "memb-H2-first": ["horizon=2", "expansion_states=first"],
}
DEFAULT_VARIANTS = ["memb", "svg", "true-model", "memb-H2"]


def train_seed(algo: str, overrides: list[str], env_id: str, seed: int, steps: int, folder: Path,
               eval_every: int, eval_episodes: int) -> dict:
    """Train (or resume, or read back a finished) run in ``folder``; its evaluation curve and
    end-of-run training record. One torch thread."""
    import torch

    torch.set_num_threads(1)
    from pplrl.algorithms import apply_overrides, default_config
    from pplrl.runfiles import read_records
    from pplrl.runner import train

    metrics = folder / "metrics.jsonl"
    rows = read_records(metrics) if metrics.exists() else []
    t0 = time.perf_counter()
    if not any(r["kind"] == "final" and r["step"] >= steps for r in rows):
        config = apply_overrides(default_config(algo, env_id=env_id, seed=seed), overrides)
        resume = (folder / "config.json").exists()
        settings = {} if resume else dict(eval_every=eval_every, eval_episodes=eval_episodes,
                                          checkpoint_every=eval_every)
        train(algo, None if resume else config, folder, steps, resume=resume, progress=False, **settings)
        rows = read_records(metrics)
    evals = [r for r in rows if r["kind"] == "eval" and r["step"] <= steps]
    trains = [r for r in rows if r["kind"] == "train"]
    return {"seed": seed, "overrides": overrides, "steps": [r["step"] for r in evals],
            "returns": [r["mean_return"] for r in evals], "last_train": trains[-1] if trains else {},
            "wall_s": (trains[-1]["wall_s"] if trains else time.perf_counter() - t0)}


def summarise(results: list[dict], names: list[str], reference: str | None) -> dict:
    """Per name: seeds, checkpoints, mean and 95 % interval of the return at each checkpoint
    and of the mean over the checkpoints all names share (area under the curve); paired
    differences to ``reference``."""
    from pplrl.diagnostics import mean_and_iqm

    out = {}
    results = [r for r in results if "error" not in r and r["algo"] in names]
    if not results:
        return out
    common = sorted(set.intersection(*(set(r["steps"]) for r in results)))  # the area's checkpoints
    for name in names:
        runs = [r for r in results if r["algo"] == name]
        if not runs:
            continue
        steps = sorted(set.intersection(*(set(r["steps"]) for r in runs)))
        at = {s: [r["returns"][r["steps"].index(s)] for r in runs] for s in steps}
        auc = [float(np.mean([r["returns"][r["steps"].index(s)] for s in common])) for r in runs]
        row = {"seeds": [r["seed"] for r in runs], "steps": steps,
               "mean_ci": {s: mean_and_iqm(v)["mean"] for s, v in at.items()},
               "auc_steps": common, "auc_mean_ci": mean_and_iqm(auc)["mean"] if common else None}
        if reference and name != reference and any(r["algo"] == reference for r in results):
            row["paired_vs_" + reference] = paired(results, name, reference)
        out[name] = row
    return out


def _cell(ci) -> str:
    m, lo, hi = ci
    return f"{m:7.1f} [{lo:7.1f},{hi:7.1f}]" if np.isfinite(lo) else f"{m:7.1f} {'(1 seed)':>17}"


def print_table(summary: dict, title: str, reference: str | None) -> None:
    print(title)
    steps = sorted({s for row in summary.values() for s in row["steps"]})
    print(f"{'variant':>14} {'seeds':>5} " + " ".join(f"{'step ' + str(s):>25}" for s in steps)
          + f" {'mean over shared ckpts':>25}")
    for name, row in summary.items():
        cells = [(_cell(row["mean_ci"][s]) if s in row["mean_ci"] else "-").rjust(25) for s in steps]
        print(f"{name:>14} {len(row['seeds']):>5} " + " ".join(cells) + f" {_cell(row['auc_mean_ci']):>25}")
    if reference:
        print(f"paired difference VARIANT - {reference} at the last checkpoint (mean, 95% t-interval over seeds, "
              f"seeds with VARIANT >= {reference})")
        for name, row in summary.items():
            rows = row.get("paired_vs_" + reference)
            if rows:
                r = rows[-1]
                lo, hi = r["ci95"]
                print(f"{name:>14} step {r['step']:>6}: {r['mean_diff']:8.1f} [{lo:8.1f}, {hi:8.1f}]"
                      f"  {r['a_at_least_b']}/{r['seeds']}")


def verdict(summary: dict) -> dict:
    """The claim, read off the paired differences at the last checkpoint: imaginary data helps
    the policy (memb - svg > 0) and hurts the value function (memb-H - memb < 0). 'yes'/'no'
    when the 95 % interval excludes 0, else 'not distinguishable'."""

    def sign(name: str, flip: bool = False) -> str | None:
        rows = summary.get(name, {}).get("paired_vs_memb")
        if not rows:
            return None
        lo, hi = rows[-1]["ci95"]
        lo, hi = (-hi, -lo) if flip else (lo, hi)
        return "yes" if lo > 0 else "no" if hi < 0 else "not distinguishable"

    out = {"imaginary data helps the policy (memb > svg)": sign("svg", flip=True)}
    for name in summary:
        if name.startswith("memb-H"):
            out[f"imaginary data hurts the value function (memb > {name})"] = sign(name, flip=True)
    out["the true model helps (true-model > memb)"] = sign("true-model")
    return {k: v for k, v in out.items() if v is not None}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--env", default="Pendulum-v1")
    p.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--eval-every", type=int, default=1000)
    p.add_argument("--eval-episodes", type=int, default=5)
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every variant")
    p.add_argument("--out", type=Path, default=Path("runs/memb_ablation"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    from pplrl.algorithms import apply_overrides, default_config

    c = apply_overrides(default_config("memb", env_id=args.env), args.set)
    budget = (f"{args.steps} env steps ({c.learning_starts} uniform random first), m = {c.m} actor-critic updates "
              f"per env step, {c.model_updates_per_step} model step per env step (+{c.model_warmup_updates} at first)")
    results: list[dict] = []
    t0 = time.time()

    def save() -> dict:
        names = [v for v in args.variants if any(r["algo"] == v and "error" not in r for r in results)]
        summary = summarise(results, names, "memb")
        out = {"env": args.env, "steps": args.steps, "seeds": args.seeds, "eval_every": args.eval_every,
               "eval_episodes": args.eval_episodes, "variants": {v: VARIANTS[v] + args.set for v in args.variants},
               "budget": budget,
               "results": results, "summary": summary, "verdict": verdict(summary),
               "total_wall_s": time.time() - t0}
        (args.out / "memb_ablation.json").write_text(json.dumps(out, indent=1))
        return out

    for seed in args.seeds:  # seed-major: an early stop leaves every variant with the same seeds
        for v in args.variants:
            try:
                r = train_seed("memb", VARIANTS[v] + args.set, args.env, seed, args.steps,
                               args.out / "runs" / v / f"seed{seed}", args.eval_every, args.eval_episodes)
            except Exception as e:  # one failed run is reported, the others go on
                results.append({"algo": v, "seed": seed, "error": f"{type(e).__name__}: {e}"})
                print(f"  {v} seed {seed}: failed: {results[-1]['error']}", flush=True)
                continue
            results.append({"algo": v, **r})
            print(f"  {v} seed {seed}: final {r['returns'][-1]:.1f}, {r['wall_s']:.0f} s", flush=True)
            save()
    out = save()
    print_table(out["summary"], f"\n{args.env}: MEMB ablations, evaluation return (mean [95% stratified-bootstrap "
                f"interval] over seeds {args.seeds}, {args.eval_episodes} episodes each); {out['budget']}", "memb")
    for claim, answer in out["verdict"].items():
        print(f"{claim}: {answer}")
    print(f"wrote {args.out / 'memb_ablation.json'}")
    return out


if __name__ == "__main__":
    main()
