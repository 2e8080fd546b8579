"""``pplrl`` command line: train, resume, evaluate and diagnose runs.

    pplrl train sac --env Pendulum-v1 --steps 10000 --seed 0 --out runs/sac0 [--set lr=1e-3 ...]
    pplrl train my-algo --plugin my_algos.py ...   # an algorithm defined outside pplrl (or --plugin pkg.module)
    pplrl train --resume runs/sac0
    pplrl eval runs/sac0 [--episodes 10]
    pplrl diagnose runs/            # every run folder below, seeds as chains

Every failure ends with one ``error: ...`` line on stderr (``--debug`` shows the traceback)
and an exit code: 2 bad input or an unusable run folder, 3 a numerical stop (NaN or inf;
the last checkpoint is kept), 4 a file that could not be written (disk full, permissions;
nothing already written is lost), 130 interrupted (Ctrl-C; the last checkpoint is kept),
1 an internal error (a bug: please report it with the ``--debug`` traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

# Exit codes (documented in the README and in ``pplrl --help``).
EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_NUMERICAL, EXIT_IO, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

#: what a run's ``config.json`` fixes; given with ``--resume`` it must equal the saved value
_FIXED_ON_RESUME = ("algo", "env", "seed", "set", "eval_every", "eval_episodes", "checkpoint_every")


def _refuse_changes_on_resume(args, out: Path, saved: dict) -> None:
    """With ``--resume`` only ``--steps`` (extending the run), ``--plugin`` (a plugin that
    moved) and ``--quiet`` may be given; the other arguments must equal the saved run's or
    are refused naming them (they used to be ignored)."""
    config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    run = saved.get("run") if isinstance(saved.get("run"), dict) else {}
    recorded = {"algo": saved.get("algo"), "env": config.get("env_id"), "seed": config.get("seed"),
                "eval_every": run.get("eval_every"), "eval_episodes": run.get("eval_episodes"),
                "checkpoint_every": run.get("checkpoint_every")}
    for name in _FIXED_ON_RESUME:
        value = getattr(args, name)
        if value is None:
            continue
        flag = "ALGO" if name == "algo" else f"--{name.replace('_', '-')}"
        if name == "set":
            raise ValueError(f"--set cannot be given with --resume: a run's config is fixed ({out / 'config.json'}); "
                             f"train into a new --out to change it")
        if value != recorded[name]:
            raise ValueError(f"{flag} {value} differs from the run in {out} ({recorded[name]!r}); --resume keeps a "
                             f"run's settings (only --steps may grow)")


def _train(args) -> int:
    from pplrl.algorithms import apply_overrides, default_config
    from pplrl.plugins import resolve
    from pplrl.runner import CONFIG, DEFAULT_STEPS, evaluate, read_config, resolve_recorded, train

    if args.resume:
        out = Path(args.resume)
        saved = read_config(out)
        if args.plugin is not None:  # the algorithm first: an unknown one is the error to report
            resolve(saved["algo"], args.plugin)
        else:
            resolve_recorded(saved["algo"], saved.get("plugin"), out / CONFIG)
        _refuse_changes_on_resume(args, out, saved)
        algo, config, steps = saved["algo"], None, args.steps
    else:
        if not args.algo:
            raise ValueError("name an algorithm (e.g. `pplrl train sac --env Pendulum-v1`) or --resume DIR")
        algo = resolve(args.algo, args.plugin).algo
        env, seed = args.env or "Pendulum-v1", args.seed if args.seed is not None else 0
        config = apply_overrides(default_config(algo, env_id=env, seed=seed), args.set or [])
        out = Path(args.out or f"runs/{algo}-{env}-seed{seed}")
        steps = args.steps if args.steps is not None else DEFAULT_STEPS
    args.out_folder = out  # for the interruption message
    agent = train(algo, config, out, steps, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                  checkpoint_every=args.checkpoint_every, resume=bool(args.resume), progress=not args.quiet,
                  plugin=args.plugin)
    saved = read_config(out)
    config, episodes, steps = agent.config, saved["run"]["eval_episodes"], saved["steps"]
    returns = evaluate(agent, config.env_id, episodes, seed=config.seed + 10_000)
    print(f"{agent.algo} on {config.env_id}, seed {config.seed}, {steps} steps: final evaluation return "
          f"{np.mean(returns):.1f} +- {np.std(returns):.1f} over {len(returns)} episodes; run folder {out}")
    return EXIT_OK


def _eval(args) -> int:
    from pplrl.runner import agent_from_checkpoint, evaluate

    agent, state = agent_from_checkpoint(Path(args.run), plugin=args.plugin)
    returns = evaluate(agent, agent.config.env_id, args.episodes, seed=args.seed)
    print(f"{state['algo']} at step {state['step']} on {agent.config.env_id}: mean return "
          f"{np.mean(returns):.1f} +- {np.std(returns):.1f} over {len(returns)} episodes")
    return EXIT_OK


def _diagnose(args) -> int:
    from pplrl.diagnose import diagnose

    print(diagnose(Path(args.folder), Path(args.plot) if args.plot else None))
    return EXIT_OK


def _error_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="pplrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an agent (or resume a run)")
    t.add_argument("algo", nargs="?", help="algorithm name, e.g. sac")
    t.add_argument("--env", default=None, help="gymnasium environment id (default Pendulum-v1)")
    t.add_argument("--steps", type=int, default=None,
                   help="total environment steps, a positive integer (default 10000; with --resume the saved "
                        "target, or a larger one to extend the run)")
    t.add_argument("--seed", type=int, default=None, help="random seed (default 0)")
    t.add_argument("--out", default=None, help="run folder (default runs/ALGO-ENV-seedS)")
    t.add_argument("--set", nargs="*", metavar="KEY=VALUE", help="config overrides")
    t.add_argument("--resume", metavar="DIR",
                   help="continue the run in DIR from its last checkpoint with its saved config and settings "
                        "(only --steps, to extend it, and --plugin, if it moved, may be given anew)")
    t.add_argument("--plugin", metavar="FILE_OR_MODULE", default=None,
                   help="a .py file or module that registers the algorithm (pplrl.plugins.register); the run "
                        "records it, so eval, --resume and diagnose load it again")
    t.add_argument("--eval-every", type=int, default=None, help="env steps between evaluations (default 1000)")
    t.add_argument("--eval-episodes", type=int, default=None, help="episodes per evaluation (default 5)")
    t.add_argument("--checkpoint-every", type=int, default=None,
                   help="env steps between checkpoints, taken at the next episode end (default 1000)")
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of a failure")
    t.set_defaults(func=_train)
    e = sub.add_parser("eval", help="evaluate a run's last checkpoint")
    e.add_argument("run")
    e.add_argument("--episodes", type=int, default=10)
    e.add_argument("--seed", type=int, default=123_456)
    e.add_argument("--plugin", metavar="FILE_OR_MODULE", default=None,
                   help="load this plugin instead of the one the run recorded (e.g. moved since)")
    e.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of a failure")
    e.set_defaults(func=_eval)
    d = sub.add_parser("diagnose", help="ArviZ summary and plots across the runs in a folder")
    d.add_argument("folder")
    d.add_argument("--plot", default=None, help="PNG path for the trace plots (default FOLDER/diagnostics.png)")
    d.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of a failure")
    d.set_defaults(func=_diagnose)
    args = p.parse_args(argv)
    from pplrl.diagnostics import NonFiniteError
    from pplrl.runfiles import RunIOError

    try:
        if args.command in ("train", "eval"):
            from pplrl.plugins import load_entry_points

            load_entry_points()  # installed packages' algorithms (group pplrl.algorithms), once
        return args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        out = getattr(args, "out_folder", None)
        kept = f"; the last checkpoint in {out} and its logs were kept (continue with `pplrl train --resume {out}`)" \
            if out is not None else ""
        print(f"error: interrupted{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except FloatingPointError as e:  # NonFiniteError: a loss or an estimate became NaN / infinite
        if args.debug:
            raise
        what = "numerical stop" if isinstance(e, NonFiniteError) else "floating-point error"
        print(f"error: {what}: {_error_line(e)}", file=sys.stderr)
        return EXIT_NUMERICAL
    except RunIOError as e:  # a run folder file that could not be written (disk full, permissions)
        if args.debug:
            raise
        print(f"error: {_error_line(e)}", file=sys.stderr)
        return EXIT_IO
    except OSError as e:
        if args.debug:
            raise
        where = f"{e.filename}: " if getattr(e, "filename", None) else ""
        print(f"error: {where}{e.strerror or _error_line(e)}", file=sys.stderr)
        return EXIT_IO
    except (ValueError, RuntimeError) as e:  # bad input, an unusable run folder (RunError), a plugin
        if args.debug:
            raise
        print(f"error: {_error_line(e)}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except Exception as e:  # a bug: still one line, the traceback on request
        if args.debug:
            raise
        print(f"error: internal error ({type(e).__name__}: {_error_line(e)}); run with --debug for the traceback",
              file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
