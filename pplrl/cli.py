"""``pplrl`` command line: train, resume, evaluate and diagnose runs.

    pplrl train sac --env Pendulum-v1 --steps 10000 --seed 0 --out runs/sac0 [--set lr=1e-3 ...]
    pplrl train my-algo --plugin my_algos.py ...   # an algorithm defined outside pplrl (or --plugin pkg.module)
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
    from pplrl.algorithms import apply_overrides, default_config
    from pplrl.plugins import resolve
    from pplrl.runner import CONFIG, config_from_dict, evaluate, resolve_recorded, train

    if args.resume:
        out = Path(args.resume)
        saved = json.loads((out / CONFIG).read_text()) if (out / CONFIG).exists() else None
        if saved is None:
            raise SystemExit(f"error: {out} holds no run to resume (no {CONFIG})")
        if not isinstance(saved, dict) or "algo" not in saved or "config" not in saved:
            raise SystemExit(f"error: {out / CONFIG} is not a pplrl run config (no algo or config)")
        if args.plugin is not None:
            cls = resolve(saved["algo"], args.plugin)
        else:
            cls = resolve_recorded(saved["algo"], saved.get("plugin"), out / CONFIG)
        algo = cls.algo
        config = config_from_dict(cls, saved["config"])
        steps = args.steps or saved["steps"]
    else:
        if not args.algo:
            raise SystemExit("error: name an algorithm (e.g. `pplrl train sac --env Pendulum-v1`) or --resume DIR")
        algo = resolve(args.algo, args.plugin).algo
        config = apply_overrides(default_config(algo, env_id=args.env, seed=args.seed), args.set or [])
        out = Path(args.out or f"runs/{algo}-{args.env}-seed{args.seed}")
        steps = args.steps or 10_000
    agent = train(algo, config, out, steps, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                  checkpoint_every=args.checkpoint_every, resume=bool(args.resume), progress=not args.quiet,
                  plugin=args.plugin)
    returns = evaluate(agent, config.env_id, args.eval_episodes, seed=config.seed + 10_000)
    print(f"{algo} on {config.env_id}, seed {config.seed}, {steps} steps: final evaluation return "
          f"{np.mean(returns):.1f} +- {np.std(returns):.1f} over {len(returns)} episodes; run folder {out}")
    return 0


def _eval(args) -> int:
    from pplrl.runner import agent_from_checkpoint, evaluate

    agent, state = agent_from_checkpoint(Path(args.run), plugin=args.plugin)
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
    t.add_argument("--plugin", metavar="FILE_OR_MODULE", default=None,
                   help="a .py file or module that registers the algorithm (pplrl.plugins.register); the run "
                        "records it, so eval, --resume and diagnose load it again")
    t.add_argument("--eval-every", type=int, default=1000)
    t.add_argument("--eval-episodes", type=int, default=5)
    t.add_argument("--checkpoint-every", type=int, default=1000)
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="evaluate a run's last checkpoint")
    e.add_argument("run")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--seed", type=int, default=123_456)
    e.add_argument("--plugin", metavar="FILE_OR_MODULE", default=None,
                   help="load this plugin instead of the one the run recorded (e.g. moved since)")
    e.set_defaults(func=_eval)
    d = sub.add_parser("diagnose", help="ArviZ summary and plots across the runs in a folder")
    d.add_argument("folder")
    d.add_argument("--plot", default=None, help="PNG path for the trace plots (default FOLDER/diagnostics.png)")
    d.set_defaults(func=_diagnose)
    args = p.parse_args(argv)
    try:
        if args.command in ("train", "eval"):
            from pplrl.plugins import load_entry_points

            load_entry_points()  # installed packages' algorithms (group pplrl.algorithms), once
        return args.func(args)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
