"""``pplrl`` command line: train, resume, evaluate and diagnose runs.

    pplrl train sac --env Pendulum-v1 --steps 10000 --seed 0 --out runs/sac0 [--set lr=1e-3 ...]
    pplrl train --resume runs/sac0
    pplrl eval runs/sac0 [--episodes 10]
    pplrl diagnose runs/            # every run folder below, seeds as chains
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def _train(args) -> int:
    from pplrl.algorithms import ALGORITHMS, apply_overrides, default_config
    from pplrl.runner import CONFIG, evaluate, train

    if args.resume:
        out = Path(args.resume)
        saved = json.loads((out / CONFIG).read_text()) if (out / CONFIG).exists() else None
        if saved is None:
            raise SystemExit(f"error: {out} holds no run to resume (no {CONFIG})")
        algo = saved["algo"]
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in saved["config"].items()}
        config = ALGORITHMS[algo].Config(**fields)
        steps = args.steps or saved["steps"]
    else:
        if not args.algo:
            raise SystemExit("error: name an algorithm (e.g. `pplrl train sac --env Pendulum-v1`) or --resume DIR")
        algo = args.algo
        if algo not in ALGORITHMS:
            raise SystemExit(f"error: unknown algorithm {algo!r}; known: {', '.join(sorted(ALGORITHMS))}")
        config = apply_overrides(default_config(algo, env_id=args.env, seed=args.seed), args.set or [])
        out = Path(args.out or f"runs/{algo}-{args.env}-seed{args.seed}")
        steps = args.steps or 10_000
    agent = train(algo, config, out, steps, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                  checkpoint_every=args.checkpoint_every, resume=bool(args.resume), progress=not args.quiet)
    returns = evaluate(agent, config.env_id, args.eval_episodes, seed=config.seed + 10_000)
    print(f"{algo} on {config.env_id}, seed {config.seed}, {steps} steps: final evaluation return "
          f"{np.mean(returns):.1f} +- {np.std(returns):.1f} over {len(returns)} episodes; run folder {out}")
    return 0


def _eval(args) -> int:
    from pplrl.runner import agent_from_checkpoint, evaluate

    agent, state = agent_from_checkpoint(Path(args.run))
    returns = evaluate(agent, agent.config.env_id, args.episodes, seed=args.seed)
    print(f"{state['algo']} at step {state['step']} on {agent.config.env_id}: mean return "
          f"{np.mean(returns):.1f} +- {np.std(returns):.1f} over {len(returns)} episodes")
    return 0


def _diagnose(args) -> int:
    from pplrl.diagnose import diagnose

    print(diagnose(Path(args.folder), Path(args.plot) if args.plot else None))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pplrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an agent (or resume a run)")
    t.add_argument("algo", nargs="?", help="algorithm name, e.g. sac")
    t.add_argument("--env", default="Pendulum-v1", help="gymnasium environment id")
    t.add_argument("--steps", type=int, default=None, help="total environment steps (default 10000)")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--out", default=None, help="run folder (default runs/ALGO-ENV-seedS)")
    t.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides")
    t.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its last checkpoint")
    t.add_argument("--eval-every", type=int, default=1000)
    t.add_argument("--eval-episodes", type=int, default=5)
    t.add_argument("--checkpoint-every", type=int, default=1000)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="evaluate a run's last checkpoint")
    e.add_argument("run")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--seed", type=int, default=123_456)
    e.set_defaults(func=_eval)
    d = sub.add_parser("diagnose", help="ArviZ summary and plots across the runs in a folder")
    d.add_argument("folder")
    d.add_argument("--plot", default=None, help="PNG path for the trace plots (default FOLDER/diagnostics.png)")
    d.set_defaults(func=_diagnose)
    args = p.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
