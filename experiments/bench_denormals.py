"""What subnormal floats cost a trained agent's updates, and what flushing them saves.

Weights that weight decay pulls towards zero (a dead unit's), and Adam's moments of their
tiny gradients, end up subnormal (below 1.2e-38 in float32), and an x86 CPU multiplies
subnormal operands many times slower than normal ones. A fresh agent has none, so
``bench_update.py`` cannot see this; a long model-based run collects them in its ensembles.

For each run folder given, the agent of its checkpoint is loaded and:

* ``subnormal``: the count of subnormal floats in its state (networks and optimiser
  moments), per top-level part (``ensemble``, ``critic``, ...), and their share;
* ``step_ms``: one env step's updates (``agent.update(step)`` at a step that fits no model),
  mean over ``--updates`` consecutive steps;
* ``fit_ms``: an update at a model-fit step (the fits and rollouts included), for agents
  that fit models;

each timed on a fresh copy of the checkpoint's agent (flushing rewrites the subnormal
weights an update touches, so a copy is not reused), with the flag off and on
(:func:`pplrl.device.flushing_denormals`, which ``pplrl.runner.train`` uses), the two
interleaved, median of ``--repeats`` rounds, one torch thread. Prints a table, writes JSON
(default runs/bench_denormals.json).

    python experiments/bench_denormals.py runs/mujoco/mb_Hopper-v5/mbpo_seed0
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
from pathlib import Path

import numpy as np
import torch

from pplrl.device import flushing_denormals
from pplrl.runfiles import RunFileError, write_result
from pplrl.runner import agent_from_checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_update import times_ms  # noqa: E402

TINY = float(torch.finfo(torch.float32).tiny)


def subnormal_counts(state) -> tuple[int, int]:
    """(subnormal, all) floating-point entries in a nested state of tensors and arrays."""
    if isinstance(state, dict):
        parts = [subnormal_counts(v) for v in state.values()]
    elif isinstance(state, (list, tuple)):
        parts = [subnormal_counts(v) for v in state]
    elif isinstance(state, torch.Tensor) and state.is_floating_point():
        x = state.detach().abs()
        return int(((x > 0) & (x < TINY)).sum()), x.numel()
    elif isinstance(state, np.ndarray) and np.issubdtype(state.dtype, np.floating) and state.dtype.itemsize == 4:
        x = np.abs(state)
        return int(((x > 0) & (x < TINY)).sum()), x.size
    else:
        return 0, 0
    return sum(p[0] for p in parts), sum(p[1] for p in parts)


def measure(agent, step: int, freq: int | None, updates: int, repeats: int) -> dict:
    """Median over ``repeats`` rounds of the mean ms of ``updates`` non-fit updates and of
    one update at a fit step, each round on fresh copies, the flag off then on (on then off
    in odd rounds)."""
    free = [s for s in range(step + 1, step + 10 * updates + 2) if not freq or s % freq][:updates]
    fit_step = (step // freq + 1) * freq if freq else None
    times = {False: {"step": [], "fit": []}, True: {"step": [], "fit": []}}
    for r in range(repeats):
        for flush in ((False, True) if r % 2 == 0 else (True, False)):
            a = copy.deepcopy(agent)
            ctx = flushing_denormals() if flush else contextlib.nullcontext()
            with ctx:
                times[flush]["step"].append(times_ms(lambda: [a.update(s) for s in free], 1)[0] / len(free))
                if fit_step is not None:
                    times[flush]["fit"] += times_ms(lambda: a.update(fit_step), 1)
    out = {}
    for flush, key in ((False, "off"), (True, "on")):
        out[f"step_ms_{key}"] = statistics.median(times[flush]["step"])
        out[f"fit_ms_{key}"] = statistics.median(times[flush]["fit"]) if fit_step is not None else None
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", type=Path, help="run folders (each with a checkpoint)")
    p.add_argument("--updates", type=int, default=20, help="non-fit updates timed per round")
    p.add_argument("--repeats", type=int, default=3, help="interleaved rounds (each flag once per round)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=Path("runs/bench_denormals.json"))
    args = p.parse_args(argv)
    if args.updates < 1 or args.repeats < 1:
        raise SystemExit("error: --updates and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        try:
            agent, state = agent_from_checkpoint(run)
        except RunFileError as e:
            raise SystemExit(f"error: {e}") from None
        agent_state = agent.state_dict()
        parts = {k: subnormal_counts(v) for k, v in agent_state.items()}
        sub, total = (sum(c) for c in zip(*parts.values()))
        freq = getattr(agent.config, "model_train_freq", None)
        row = {"run": str(run), "algo": state["algo"], "env_id": state["config"]["env_id"], "step": state["step"],
               "subnormal": sub, "floats": total, "subnormal_share": sub / max(total, 1),
               "subnormal_by_part": {k: {"subnormal": s, "floats": n} for k, (s, n) in parts.items() if s},
               "model_train_freq": freq, **measure(agent, state["step"], freq, args.updates, args.repeats)}
        row["step_speedup"] = row["step_ms_off"] / row["step_ms_on"]
        row["fit_speedup"] = row["fit_ms_off"] / row["fit_ms_on"] if row["fit_ms_on"] else None
        rows.append(row)

    print(f"ms per update of each checkpoint's agent, subnormals kept (off) and flushed (on), {args.threads} "
          f"thread(s), median of {args.repeats} interleaved rounds ({args.updates} updates per round):")
    print(f"{'run':<44} {'algo':<11} {'step':>6} {'subnormal':>10} {'step off':>9} {'step on':>8} {'x':>5} "
          f"{'fit off':>9} {'fit on':>8} {'x':>5}")
    for r in rows:
        fit = (f"{r['fit_ms_off']:>9.0f} {r['fit_ms_on']:>8.0f} {r['fit_speedup']:>5.2f}" if r["fit_ms_on"]
               else f"{'-':>9} {'-':>8} {'-':>5}")
        print(f"{r['run'][-44:]:<44} {r['algo']:<11} {r['step']:>6} {100 * r['subnormal_share']:>9.2f}% "
              f"{r['step_ms_off']:>9.1f} {r['step_ms_on']:>8.1f} {r['step_speedup']:>5.2f} {fit}")
    return write_result(args.out, {"threads": args.threads, "updates": args.updates, "repeats": args.repeats,
                                   "rows": rows})


if __name__ == "__main__":
    main()
