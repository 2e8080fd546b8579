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
import json
import sys
from pathlib import Path

import numpy as np

from pplrl.runfiles import read_records

# Exit codes (documented in the README and in ``pplrl --help``).
EXIT_OK, EXIT_INTERNAL, EXIT_BAD_INPUT, EXIT_NUMERICAL, EXIT_IO, EXIT_INTERRUPTED = 0, 1, 2, 3, 4, 130

#: what a run's ``config.json`` fixes; given with ``--resume`` it must equal the saved value
_FIXED_ON_RESUME = ("algo", "env", "seed", "set", "eval_every", "eval_episodes", "checkpoint_every",
                    "threads")


def _refuse_changes_on_resume(args, out: Path, saved: dict) -> None:
    """With ``--resume`` only ``--steps`` (extending the run), ``--plugin`` (a plugin that
    moved) and ``--quiet`` may be given; the other arguments must equal the saved run's or
    are refused naming them (they used to be ignored)."""
    config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
    run = saved.get("run") if isinstance(saved.get("run"), dict) else {}
    recorded = {"algo": saved.get("algo"), "env": config.get("env_id"), "seed": config.get("seed"),
                "eval_every": run.get("eval_every"), "eval_episodes": run.get("eval_episodes"),
                "checkpoint_every": run.get("checkpoint_every"), "threads": run.get("threads")}
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
    from pplrl.plugins import resolve
    from pplrl.runner import CONFIG, DEFAULT_STEPS, read_config, resolve_recorded, train
    from pplrl.sweep import SEEDS

    if args.seeds is not None:
        return _train_seeds(args)
    if args.resume and args.out is not None and Path(args.out).resolve() != Path(args.resume).resolve():
        raise ValueError(f"--out {args.out} cannot be given with --resume {args.resume}: a run continues in its "
                         f"own folder")
    if args.resume and not (Path(args.resume) / CONFIG).exists() and (Path(args.resume) / SEEDS).exists():
        return _resume_seeds(args)
    if args.jobs is not None:
        raise ValueError("--jobs runs several seeds at once: give --seeds too (or --resume a many-seed folder)")
    if args.backend != "local" or args.address is not None:
        raise ValueError("--backend and --address run several seeds: give --seeds too (or --resume a many-seed "
                         "folder)")
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
        algo, config = _new_config(args, args.seed if args.seed is not None else 0)
        out = Path(args.out or f"runs/{algo}-{config.env_id}-seed{config.seed}")
        steps = args.steps if args.steps is not None else DEFAULT_STEPS
    args.out_folder = out  # for the interruption message
    agent = train(algo, config, out, steps, eval_every=args.eval_every, eval_episodes=args.eval_episodes,
                  checkpoint_every=args.checkpoint_every, threads=args.threads, resume=bool(args.resume),
                  progress=not args.quiet, plugin=args.plugin, tensorboard=args.tensorboard)
    final = [r for r in read_records(out / "metrics.jsonl") if r["kind"] == "final"][-1]
    config = agent.config
    print(f"{agent.algo} on {config.env_id}, seed {config.seed}, {final['step']} steps: final evaluation return "
          f"{final['mean_return']:.1f} +- {final['std_return']:.1f} over {len(final['returns'])} episodes; "
          f"run folder {out}")
    return EXIT_OK


def _new_config(args, seed: int):
    """The algorithm's name and the config of a new run (ValueError for a bad name or override)."""
    from pplrl.algorithms import apply_overrides, default_config
    from pplrl.plugins import resolve
    from pplrl.runner import check_config

    if not args.algo:
        raise ValueError("name an algorithm (e.g. `pplrl train sac --env Pendulum-v1`) or --resume DIR")
    algo = resolve(args.algo, args.plugin).algo
    config = apply_overrides(default_config(algo, env_id=args.env or "Pendulum-v1", seed=seed), args.set or [])
    check_config(config)
    return algo, config


def _passed_on(args, names: tuple[str, ...]) -> list[str]:
    """The flags among ``names`` that were given, as command-line arguments again."""
    argv = []
    for name in names:
        value = getattr(args, name)
        if value is None or value is False:
            continue
        flag = f"--{name.replace('_', '-')}"
        if value is True:
            argv.append(flag)
        elif isinstance(value, list):
            argv += [flag, *value]
        else:
            argv += [flag, str(value)]
    return argv


def _check_sweep_args(args) -> None:
    if args.jobs is not None and args.jobs < 1:
        raise ValueError(f"--jobs must be a positive integer, got {args.jobs}")
    if args.address is not None and args.backend != "ray":
        raise ValueError("--address is the address of a Ray cluster: give --backend ray too")


def _run_seeds(jobs: list, args, out: Path) -> int:
    from pplrl.sweep import exit_code, run_local, run_ray, table

    _check_sweep_args(args)
    threads, report = args.threads or 1, (lambda line: print(line, flush=True))
    if args.backend == "ray":
        jobs = [(name, folder.resolve(), [a if a != str(folder) else str(folder.resolve()) for a in argv])
                for name, folder, argv in jobs]  # every node must see the same absolute folders
        where = f"the Ray cluster at {args.address}" if args.address else "a local Ray instance"
        print(f"{len(jobs)} run(s) under {out} as Ray tasks on {where}, {threads} torch thread(s) each", flush=True)
        results, interrupted = run_ray(jobs, args.jobs, threads, args.address, report=report)
    else:
        max_jobs = args.jobs if args.jobs is not None else 1
        print(f"{len(jobs)} run(s) under {out}, {max_jobs} at a time, {threads} torch thread(s) each", flush=True)
        results, interrupted = run_local(jobs, max_jobs, threads, report=report)
    print(table(results))
    if interrupted:
        print(f"error: interrupted; every run kept its last checkpoint (continue with `pplrl train --resume {out}`)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    failed = [r for r in results if r.returncode != 0]
    if failed:
        print(f"error: {len(failed)} of {len(results)} run(s) failed: " +
              "; ".join(f"{r.name} (exit {exit_code(r.returncode)})" for r in failed), file=sys.stderr)
        return exit_code(failed[0].returncode)
    return EXIT_OK


def _train_seeds(args) -> int:
    """``pplrl train ALGO --seeds 0-9 [--jobs N] --out DIR``: one run folder per seed under DIR,
    listed first in ``DIR/seeds.json`` so that ``--resume DIR`` starts the seeds that never did."""
    from pplrl.plugins import record_spec
    from pplrl.runfiles import atomic_write_json
    from pplrl.runner import DEFAULT_STEPS, positive_int
    from pplrl.sweep import SEEDS, parse_seeds, seed_folder

    if args.resume:
        raise ValueError("--seeds cannot be given with --resume: `pplrl train --resume DIR` continues every "
                         "seed's run in DIR")
    _check_sweep_args(args)
    if args.seed is not None:
        raise ValueError("give either --seed (one run) or --seeds (one run per seed), not both")
    seeds = parse_seeds(args.seeds)
    algo, config = _new_config(args, seeds[0])  # every error that a seed's run would hit, said once, up front
    steps = args.steps if args.steps is not None else DEFAULT_STEPS
    positive_int("steps", steps)
    for name in ("eval_every", "eval_episodes", "checkpoint_every", "threads"):
        if getattr(args, name) is not None:
            positive_int(name, getattr(args, name))
    out = Path(args.out or f"runs/{algo}-{config.env_id}-seeds{args.seeds}")
    taken = [seed_folder(out, s) for s in seeds if (seed_folder(out, s) / "config.json").exists()]
    if taken or (out / SEEDS).exists():
        held = f" (runs of seeds {[p.name for p in taken]})" if taken else ""
        raise ValueError(f"{out} already holds a many-seed set{held}; continue it with `pplrl train --resume {out}` "
                         f"or choose another --out")
    if args.plugin is not None:
        args.plugin = record_spec(args.plugin)  # an absolute path: every process (and Ray node) finds the file
    shared = ["--env", config.env_id, "--steps", str(steps), "--quiet",
              *_passed_on(args, ("eval_every", "eval_episodes", "checkpoint_every", "threads", "plugin", "set",
                                 "tensorboard"))]
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / SEEDS, {"algo": algo, "seeds": seeds, "args": shared})
    return _run_seeds(_seed_jobs(out, algo, seeds, shared, args), args, out)


def _seed_jobs(out: Path, algo: str, seeds: list[int], shared: list[str], args) -> list:
    """One ``pplrl train`` command per seed: ``--resume`` where the seed's run exists, else the
    new run the set describes (with ``--steps`` of this command, if given)."""
    from pplrl.sweep import seed_folder

    passed = _passed_on(args, ("steps", "env", "seed", "set", "eval_every", "eval_episodes", "checkpoint_every",
                               "threads", "plugin", "tensorboard"))
    if args.steps is not None and "--steps" in shared:
        shared = list(shared)
        shared[shared.index("--steps") + 1] = str(args.steps)
    jobs = []
    for s in seeds:
        folder = seed_folder(out, s)
        if (folder / "config.json").exists():
            argv = ["train", *([args.algo] if args.algo else []), "--resume", str(folder), "--quiet", *passed]
        else:
            argv = ["train", algo, "--seed", str(s), "--out", str(folder), *shared]
        jobs.append((f"seed {s}", folder, argv))
    return jobs


def _resume_seeds(args) -> int:
    """``pplrl train --resume DIR`` on a many-seed folder: every seed of DIR/seeds.json goes on
    (or starts, if it never did)."""
    from pplrl.runfiles import RunFileError
    from pplrl.sweep import SEEDS

    out = Path(args.resume)
    try:
        manifest = json.loads((out / SEEDS).read_text())
        algo, seeds, shared = manifest["algo"], [int(s) for s in manifest["seeds"]], list(manifest["args"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise RunFileError(f"{out / SEEDS} is not a readable many-seed list ({_error_line(e)})") from None
    return _run_seeds(_seed_jobs(out, algo, seeds, shared, args), args, out)


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


def _config_help(train_parser, argv: list[str]) -> None:
    """``pplrl train ALGO --help``: list ALGO's config fields (the ``--set`` keys) with their
    defaults and docstrings under the usual help."""
    if "train" not in argv or not {"-h", "--help"} & set(argv):
        return
    rest = argv[argv.index("train") + 1:]
    switches = {"--quiet", "--tensorboard", "--debug", "-h", "--help"}  # flags that take no value
    names = [a for i, a in enumerate(rest)
             if not a.startswith("-") and (i == 0 or not rest[i - 1].startswith("-") or rest[i - 1] in switches)]
    plugin = rest[rest.index("--plugin") + 1] if "--plugin" in rest[:-1] else None
    if not names:
        train_parser.epilog = "`pplrl train ALGO --help` lists ALGO's config fields (the --set keys)."
        return
    try:
        from pplrl.algorithms import default_config
        from pplrl.algorithms.base import describe_config
        from pplrl.plugins import load_entry_points, resolve

        load_entry_points()
        algo = resolve(names[0], plugin).algo
        train_parser.epilog = (f"config of {algo} (--set KEY=VALUE; tuples as 256,256; none for an optional value):\n"
                               + describe_config(default_config(algo)))
    except (ValueError, RuntimeError) as e:
        train_parser.epilog = f"(no config listing: {_error_line(e)})"


def _error_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__


def _parser(argv: list[str]) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pplrl", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train an agent (or resume a run)",
                       formatter_class=argparse.RawDescriptionHelpFormatter)
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
    t.add_argument("--threads", type=int, default=None,
                   help="torch threads for the run (default 1, so that concurrent runs never oversubscribe the "
                        "cores; saved with the run)")
    t.add_argument("--seeds", default=None, metavar="SEEDS",
                   help="one run per seed, e.g. 0-9 or 0,3,7, in OUT/seed<k> (see --jobs); `pplrl train --resume "
                        "OUT` continues them all")
    t.add_argument("--jobs", type=int, default=None, help="runs at a time with --seeds (default 1)")
    t.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="with --seeds: run the seeds as local processes (default) or as Ray tasks "
                        "(pip install 'pplrl[ray]'; the run folders must be on a filesystem every node sees)")
    t.add_argument("--address", default=None,
                   help="with --backend ray: the address of an existing Ray cluster (default: start a local one)")
    t.add_argument("--tensorboard", action="store_true",
                   help="also write TensorBoard logs to OUT/tensorboard (pip install 'pplrl[tensorboard]')")
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
    _config_help(t, argv)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug, args = "--debug" in argv, None
    try:
        args = _parser(argv).parse_args(argv)
        if args.command in ("train", "eval"):
            from pplrl.plugins import load_entry_points

            load_entry_points()  # installed packages' algorithms (group pplrl.algorithms), once
        return args.func(args)
    except KeyboardInterrupt:
        if debug:
            raise
        out = getattr(args, "out_folder", None)
        kept = f"; the last checkpoint in {out} and its logs were kept (continue with `pplrl train --resume {out}`)" \
            if out is not None else ""
        print(f"error: interrupted{kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as e:
        if debug:
            raise
        code, line = _failure(e)
        print(f"error: {line}", file=sys.stderr)
        return code


def _failure(e: Exception) -> tuple[int, str]:
    """The exit code and the error line of a failure (the module docstring lists the codes)."""
    from pplrl.runfiles import RunFileError, RunIOError

    text = _error_line(e)
    if isinstance(e, FloatingPointError):  # NonFiniteError: a loss or an estimate became NaN / infinite
        from pplrl.diagnostics import NonFiniteError

        what = "numerical stop" if isinstance(e, NonFiniteError) else "floating-point error"
        return EXIT_NUMERICAL, f"{what}: {text}"
    if isinstance(e, ValueError) and "invalid values" in text:  # a distribution's parameters became NaN
        return EXIT_NUMERICAL, f"numerical stop: {text}"
    if isinstance(e, RunIOError):  # a run folder file that could not be written (disk full, permissions)
        return EXIT_IO, text
    if isinstance(e, FileNotFoundError):  # a path given that does not exist
        return EXIT_BAD_INPUT, f"{e.filename + ': ' if e.filename else ''}{e.strerror or text}"
    if isinstance(e, OSError):
        return EXIT_IO, f"{e.filename + ': ' if e.filename else ''}{e.strerror or text}"
    if isinstance(e, ImportError):  # e.g. an environment whose package is not installed
        return EXIT_BAD_INPUT, f"a package is missing: {text}"
    if isinstance(e, (ValueError, RunFileError)):  # bad input, an unusable run folder, a plugin
        return EXIT_BAD_INPUT, text
    return EXIT_INTERNAL, f"internal error ({type(e).__name__}: {text}); run with --debug for the traceback"


if __name__ == "__main__":
    sys.exit(main())
