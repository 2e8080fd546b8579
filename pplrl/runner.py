"""Runs: training with progress bar, periodic deterministic evaluation, metrics in a
line-per-record file, the resolved config, checkpoints and resume.

Layout of a run folder::

    config.json       algorithm, plugin (or None), resolved config, and the run settings
                      {"steps", "eval_every", "eval_episodes", "checkpoint_every"}
    metrics.jsonl     one JSON record per line: {"step", "kind": "train"|"eval"|"episode", ...}
    checkpoint.pt     everything needed to continue, behind a sha256 header line
    run.lock          the folder lock (holds the PID of the process training into it)

Every file is replaced atomically (:mod:`pplrl.runfiles`); ``metrics.jsonl`` is appended
to, and cut back to the checkpoint's step on resume by an atomic replace, so a kill
never empties or truncates a file that held data. A torn last line (a kill or a full
disk in the middle of an append) is dropped with a warning by every reader. One
process at a time trains into a folder (the lock); the lock of a dead process is taken
over.

Checkpoints are written at episode boundaries (the first one after every
``checkpoint_every`` steps), so resuming restarts a fresh episode exactly as the
uninterrupted run did: same seed and config give the same evaluation returns, and a
run interrupted (Ctrl-C, a crash, NaN) and resumed ends where an uninterrupted one
ends. A run that reaches its step target mid-episode checkpoints the unfinished
episode too (its actions since the reset, return and length), and extending it replays
those actions on a fresh env from the reset's RNG state, so it ends where the
uninterrupted longer run ends. On interruption the last checkpoint and the logs up to it
are kept; a run stopped before its first checkpoint restarts from step 0 on resume.

Checkpoints load with ``torch.load(weights_only=True)``: numpy arrays and scalars in the
agent's state (replay buffers, RNG states) are stored as tagged tensors and plain
containers and converted back on load; the sha256 in the header is checked before the
payload is unpickled and before anything in the folder changes.

Resuming restores the config and every run setting from the folder. With ``resume=True``
only the step target may change (extending the run, recorded in ``config.json``), and a
plugin path (a plugin that moved); any other setting given must equal the saved one, or
a ValueError names it. A ``config.json`` whose config or settings differ from the
checkpoint's (hand-edited) is refused naming the keys.

Algorithms defined outside pplrl (:mod:`pplrl.plugins`) are named by a plugin file or
module; the run records it, and resuming or loading the checkpoint loads it again.
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import math
import os
import random
import time
import types
import typing
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from tqdm import tqdm

from pplrl.algorithms import make_agent
from pplrl.algorithms.base import Agent
from pplrl.device import flushing_denormals
from pplrl.diagnostics import NonFiniteError
from pplrl.envs.continuous import make_continuous_env
from pplrl.plugins import PluginError, plugin_of, record_spec, resolve
from pplrl.runfiles import (
    LOCK,
    RunFileError,
    RunLock,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    encode_records,
    os_error,
    pack_checkpoint,
    read_records,
    remove_stale_temporaries,
    unpack_checkpoint,
    warn,
)

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
FORMAT_VERSION = 2
DEFAULT_STEPS = 10_000
DEFAULT_SETTINGS = {"eval_every": 1000, "eval_episodes": 5, "checkpoint_every": 1000, "threads": 1}
LOG_EVERY = 100  # env steps per "train" record (the mean over the updates since the last one)

__all__ = ["CHECKPOINT", "CONFIG", "LOCK", "METRICS", "RunError", "agent_from_checkpoint", "config_from_dict",
           "check_config", "evaluate", "load_checkpoint", "read_config", "save_checkpoint", "train",
           "train_or_resume", "write_checkpoint"]


class RunError(RunFileError):
    """A run folder or checkpoint that cannot be used."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate(agent: Agent, env_id: str, episodes: int, seed: int) -> list[float]:
    """Deterministic-policy returns on a separate environment, seeded ``seed + i``."""
    if isinstance(episodes, bool) or not isinstance(episodes, int) or episodes <= 0:
        raise ValueError(f"episodes must be a positive integer, got {episodes!r}")
    env = make_continuous_env(env_id)
    returns = []
    for i in range(episodes):
        obs, _ = env.reset(seed=seed + i)
        done, total = False, 0.0
        while not done:
            obs, r, term, trunc, _ = env.step(agent.act(obs, deterministic=True))
            total += float(r)
            done = term or trunc
        returns.append(total)
    env.close()
    return returns


# -- checkpoints: weights-only safe encoding, checksum ------------------------------------------
_NDARRAY, _NPSCALAR = "__pplrl_ndarray__", "__pplrl_npscalar__"
_SAFE_LEAVES = (torch.Tensor, int, float, bool, str, bytes, complex, type(None), torch.Size, torch.dtype, torch.device)


def _safe_array(arr: np.ndarray, where: str) -> np.ndarray:
    """The array a checkpoint stores for ``arr`` (unsigned integers wider than a byte as int64),
    or the RunError for a dtype it cannot hold (object, string, non-native byte order)."""
    dtype = arr.dtype
    if dtype.kind == "u" and dtype.itemsize > 1:
        return arr.astype(np.int64) if dtype.itemsize < 8 else arr.view(np.int64)
    if dtype.kind in "fiub" and dtype.byteorder in "=|":
        return arr
    raise RunError(f"{where} is a numpy array of dtype {dtype}, which a checkpoint cannot hold")


def _unsafe(obj, where: str) -> RunError:
    return RunError(f"{where} holds a {type(obj).__module__}.{type(obj).__qualname__}, which a weights-only "
                    f"checkpoint cannot hold; store it as a tensor, a number or a plain container")


def to_safe(obj, where: str = "state"):
    """``obj`` with numpy arrays and scalars replaced by tagged tensors / Python numbers, so
    that ``torch.load(weights_only=True)`` can read it back; containers that need no change
    are returned as they are (module state dicts keep their metadata). Anything else is a
    RunError naming where it sits."""
    if isinstance(obj, np.ndarray):
        data = _safe_array(obj, where)
        return {_NDARRAY: torch.from_numpy(np.ascontiguousarray(data).copy()), "dtype": obj.dtype.str}
    if isinstance(obj, np.generic):
        return {_NPSCALAR: obj.item(), "dtype": obj.dtype.str}
    if isinstance(obj, dict):
        changed = {k: to_safe(v, f"{where}[{k!r}]") for k, v in obj.items()}
        if all(changed[k] is obj[k] for k in obj):
            return obj
        out = type(obj)(changed) if type(obj) in (dict, collections.OrderedDict) else dict(changed)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        items = [to_safe(v, f"{where}[{i}]") for i, v in enumerate(obj)]
        if all(a is b for a, b in zip(items, obj)):
            return obj
        return type(obj)(items) if type(obj) in (list, tuple) else items
    if isinstance(obj, _SAFE_LEAVES):
        return obj
    raise _unsafe(obj, where)


def check_safe(obj, where: str = "state") -> None:
    """The RunError :func:`to_safe` would raise for ``obj``, without copying anything: run
    before training, so that an agent whose state a checkpoint cannot hold fails at once,
    not at its first checkpoint."""
    if isinstance(obj, np.ndarray):
        if not (obj.dtype.kind == "u" and obj.dtype.itemsize > 1):  # those convert by copying: skip
            _safe_array(obj, where)
    elif isinstance(obj, dict):
        for k, v in obj.items():
            check_safe(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            check_safe(v, f"{where}[{i}]")
    elif not isinstance(obj, (np.generic, *_SAFE_LEAVES)):
        raise _unsafe(obj, where)


def from_safe(obj):
    """The inverse of :func:`to_safe`."""
    if isinstance(obj, dict):
        if _NDARRAY in obj:
            dtype = np.dtype(obj["dtype"])
            data = obj[_NDARRAY].numpy()
            if dtype.kind == "u" and dtype.itemsize == 8:
                return data.view(dtype).copy()
            return data.astype(dtype, copy=True)
        if _NPSCALAR in obj:
            return np.dtype(obj["dtype"]).type(obj[_NPSCALAR])
        changed = {k: from_safe(v) for k, v in obj.items()}
        if all(changed[k] is obj[k] for k in obj):
            return obj
        out = type(obj)(changed)
        if hasattr(obj, "_metadata"):
            out._metadata = obj._metadata
        return out
    if isinstance(obj, (list, tuple)):
        items = [from_safe(v) for v in obj]
        return obj if all(a is b for a, b in zip(items, obj)) else type(obj)(items)
    return obj


def write_checkpoint(path: Path | str, state: dict) -> None:
    """Write the checkpoint ``state`` (as :func:`load_checkpoint` returns it) to ``path`` (a run
    folder or the file): safe types, sha256 header, atomic replace."""
    path = Path(path)
    file = path / CHECKPOINT if path.is_dir() else path
    buf = io.BytesIO()
    torch.save(to_safe(state), buf)
    atomic_write_bytes(file, pack_checkpoint(buf.getvalue()))


def save_checkpoint(out: Path, agent: Agent, step: int, env_rng_state, episode: int, plugin: str | None = None, *,
                    run: dict | None = None, episode_state: dict | None = None, log_state: dict | None = None) -> None:
    """Checkpoint ``agent`` at ``step`` into the run folder ``out``. ``episode_state`` is the
    unfinished episode of a run that stopped mid-episode (None at an episode boundary);
    ``log_state`` the logger's running sums and clocks, so that resumed records are the
    uninterrupted run's."""
    state = {"format": FORMAT_VERSION, "algo": agent.algo, "plugin": plugin, "config": dataclasses.asdict(agent.config),
             "run": run, "obs_dim": agent.obs_dim, "act_dim": agent.act_dim, "step": step, "episode": episode,
             "agent": agent.state_dict(), "env_rng": env_rng_state, "episode_state": episode_state,
             "log_state": log_state,
             "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # a GPU agent's sampling streams
        state["cuda_rng"] = torch.cuda.get_rng_state_all()
    write_checkpoint(out, state)


def load_checkpoint(path: Path, expected_algo: str | None = None) -> dict:
    """The checkpoint in ``path`` (a run folder or the file), its sha256 checked first and its
    payload read with ``torch.load(weights_only=True)``; numpy arrays come back as arrays."""
    path = Path(path)
    file = path / CHECKPOINT if path.is_dir() else path
    if not file.exists():
        raise RunError(f"no checkpoint at {file}")
    try:
        payload = unpack_checkpoint(file.read_bytes(), file)
    except OSError as e:
        raise RunError(f"cannot read checkpoint {file}: {e.strerror or e}") from None
    except RunFileError as e:  # no header, or a checksum that does not match
        raise RunError(str(e)) from None
    try:
        state = torch.load(io.BytesIO(payload), weights_only=True)
    except Exception as e:  # weights-only unpickling refuses code; a bad payload fails here too
        raise RunError(f"checkpoint {file} is corrupt or unsafe to load (weights_only): "
                       f"{type(e).__name__}: {' '.join(str(e).split())[:300]}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "algo" not in state:
        raise RunError(f"checkpoint {file} is not a pplrl checkpoint of format {FORMAT_VERSION}")
    if expected_algo is not None and state["algo"] != expected_algo:
        raise RunError(f"checkpoint {file} was written by algorithm {state['algo']!r}, not {expected_algo!r}")
    return from_safe(state)


# -- configs ----------------------------------------------------------------------------------
def _type_error(value, hint) -> str | None:
    """Why ``value`` (from JSON) does not fit the type ``hint``, or None if it does."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        reasons = [_type_error(value, a) for a in args if a is not type(None)]
        return None if any(r is None for r in reasons) else reasons[0]
    if hint is bool:
        return None if isinstance(value, bool) else "a boolean"
    if hint is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if hint is float:
        return None if isinstance(value, (int, float)) and not isinstance(value, bool) else "a number"
    if hint is str:
        return None if isinstance(value, str) else "a string"
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            return "a list"
        inner = args[0] if args else Any
        if inner is Any:
            return None
        bad = [v for v in value if _type_error(v, inner) is not None]
        return f"a list of {getattr(inner, '__name__', inner)}" if bad else None
    return None


def config_from_dict(cls: type[Agent], fields: dict, where: str = "the saved config"):
    """``cls.Config`` from a saved (JSON) config: lists back to tuples; unknown or missing
    keys and values of the wrong type are a RunError naming them."""
    if not isinstance(fields, dict):
        raise RunError(f"{where} is not a JSON object")
    hints = typing.get_type_hints(cls.Config)
    names = {f.name for f in dataclasses.fields(cls.Config)}
    unknown = sorted(set(fields) - names)
    if unknown:
        raise RunError(f"{where} has keys that {cls.__name__}.Config of algorithm {cls.algo!r} does not: {unknown}")
    for key, value in fields.items():
        why = _type_error(value, hints.get(key, Any))
        if why is not None:
            raise RunError(f"{where}: {key} must be {why}, got {value!r}")
    try:
        return cls.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except TypeError as e:
        raise RunError(f"{where} does not fit {cls.__name__}.Config of algorithm {cls.algo!r}: {e}") from None


def check_config(config) -> None:
    """ValueError for a config the run cannot use: its own ``validate()``, a non-finite number
    (where the default is finite), and ``X_init`` outside ``[X_min, X_max]``."""
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    fields = {f.name: f for f in dataclasses.fields(config)}
    for name, f in fields.items():
        value = getattr(config, name)
        default = f.default if f.default is not dataclasses.MISSING else None
        if isinstance(value, float) and not math.isfinite(value):
            if not (isinstance(default, float) and not math.isfinite(default)):
                raise ValueError(f"config {name} must be finite, got {value}")
    for name in fields:
        if not name.endswith("_init"):
            continue
        base, value = name[: -len("_init")], getattr(config, name)
        low, high = getattr(config, base + "_min", None), getattr(config, base + "_max", None)
        if isinstance(value, (int, float)) and isinstance(low, (int, float)) and value < low:
            raise ValueError(f"config {name} = {value} is below {base}_min = {low}")
        if isinstance(value, (int, float)) and isinstance(high, (int, float)) and value > high:
            raise ValueError(f"config {name} = {value} is above {base}_max = {high}")


def _as_json(obj):
    return json.loads(json.dumps(obj))


def _differences(a: dict, b: dict, a_name: str, b_name: str) -> str | None:
    """``"key: A value, B value, ..."`` for the keys whose values differ, or None."""
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k, "<absent>") != b.get(k, "<absent>"))
    return ", ".join(f"{k}: {a_name} {a.get(k)!r}, {b_name} {b.get(k)!r}" for k in keys) or None


def resolve_recorded(algo, plugin: str | None, where) -> type[Agent]:
    """The class of ``algo``, loading the ``plugin`` a run recorded in ``where`` (a file) first;
    a recorded plugin that no longer loads says where it was recorded."""
    try:
        return resolve(algo, plugin)
    except PluginError as e:
        raise PluginError(f"{e} (the plugin recorded in {where}; pass --plugin to point at it)") from None


def agent_from_checkpoint(path: Path, expected_algo: str | None = None, *,
                          plugin: str | None = None) -> tuple[Agent, dict]:
    """The agent saved in the checkpoint at ``path`` (a run folder or the file), and the checkpoint.
    The plugin the checkpoint records is loaded first, or ``plugin`` if given (e.g. moved since)."""
    state = load_checkpoint(path, expected_algo)
    if plugin is not None:
        Agent_ = resolve(state["algo"], plugin)
    else:
        file = Path(path) / CHECKPOINT if Path(path).is_dir() else Path(path)
        Agent_ = resolve_recorded(state["algo"], state.get("plugin"), file)
    config = config_from_dict(Agent_, state["config"], f"the config in {path}")
    agent = Agent_(config, state["obs_dim"], state["act_dim"])
    agent.load_state_dict(state["agent"])
    return agent, state


def read_config(out: Path | str) -> dict:
    """The run folder's ``config.json`` (RunError if it is missing or not a pplrl run config)."""
    file = Path(out) / CONFIG
    if not file.is_file():
        raise RunError(f"{out} holds no run to resume (no {CONFIG})")
    try:
        saved = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise RunError(f"{file} is unreadable: {e}") from None
    if not isinstance(saved, dict) or not isinstance(saved.get("algo"), str) or "config" not in saved:
        raise RunError(f"{file} is not a pplrl run config (no algo or config)")
    return saved


def positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _make_folder(out: Path) -> None:
    """Create ``out`` (and its parents) as a writable folder, or a RunError saying why not."""
    if out.exists() and not out.is_dir():
        raise RunError(f"run folder {out} is a file, not a folder; choose another --out")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise RunError(f"run folder {out} lies under {parent}, which is a file; choose another --out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create run folder {out}: {e.strerror or e}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise RunError(f"run folder {out} is not writable")


def _holds_run(out: Path) -> bool:
    return any((out / name).exists() for name in (CONFIG, CHECKPOINT, METRICS))


def train(algo: str | type[Agent], config, out: Path | str, total_steps: int | None, *, eval_every: int | None = None,
          eval_episodes: int | None = None, checkpoint_every: int | None = None, threads: int | None = None,
          resume: bool = False, progress: bool = True, callback: Callable[[int, dict], None] | None = None,
          plugin: str | None = None, tensorboard: bool = False) -> Agent:
    """Train ``algo`` with ``config`` for ``total_steps`` environment steps into ``out``.

    ``algo`` is a registered name or an Agent class (registered under its ``algo`` if it is
    not yet); ``plugin`` (a ``.py`` file or a module name) is loaded first and recorded in the
    run, so that resuming and :func:`agent_from_checkpoint` load it again. Without ``plugin``
    the run records the plugin file or module that defines the class, if any. Unset run
    settings take the defaults (``DEFAULT_SETTINGS``) in a new run.

    ``resume=True`` continues the run in ``out`` from its checkpoint (from step 0 if it never
    reached one) with the config and run settings saved there; ``config`` must then equal
    the saved one (or be None), and each of ``eval_every``, ``eval_episodes``,
    ``checkpoint_every`` be None or the saved value, else a ValueError names what differs.
    ``total_steps`` None continues to the saved target; a larger one extends the run. It
    loads the plugin the run recorded unless ``plugin`` is given.

    ``threads`` (default 1, saved with the run) is torch's intra-op thread count while the run
    trains (restored afterwards): one per run keeps concurrent runs from oversubscribing the
    cores, and a run resumes with the count it began with (float sums depend on it). The run
    trains with subnormal floats flushed to zero (:func:`pplrl.device.flushing_denormals`:
    model-based runs collect subnormal weights, which an x86 CPU multiplies many times slower).

    ``metrics.jsonl`` gets a "train" record every ``LOG_EVERY`` env steps (the mean of each
    logged value over the updates since the previous record, with ``wall_s``, the training
    wall-clock seconds so far, and ``steps_per_s`` since the previous record), the "eval" and
    "episode" records, and at the end a "final" record: the evaluation of the last policy
    over ``eval_episodes`` episodes (seeds ``seed + 10000 + i``), which ``pplrl train`` prints.
    ``tensorboard=True`` mirrors the records to TensorBoard in ``out/tensorboard`` (needs the
    ``tensorboard`` package: ``pip install pplrl[tensorboard]``); ``metrics.jsonl`` stays the
    source of truth."""
    out = Path(out)
    if total_steps is not None or not resume:
        positive_int("steps", total_steps)
    given = {"eval_every": eval_every, "eval_episodes": eval_episodes, "checkpoint_every": checkpoint_every,
             "threads": threads}
    for name, value in given.items():
        if value is not None:
            positive_int(name, value)
    if config is not None:
        check_config(config)
    if tensorboard:
        _tensorboard_writer_class()  # missing package: said before anything is written
    recorded = read_config(out) if resume else {}
    if plugin is not None:
        cls, plugin = resolve(algo, plugin), record_spec(plugin)
    elif recorded.get("plugin") is not None:  # resuming a plugin's run: load it again (a class needs no loading)
        cls = resolve(algo) if isinstance(algo, type) else resolve_recorded(algo, recorded["plugin"], out / CONFIG)
        plugin = recorded["plugin"]
    else:
        cls = resolve(algo)
        plugin = plugin_of(cls)
    algo = cls.algo
    if resume and recorded["algo"] != algo:
        raise ValueError(f"cannot resume {out} as {algo!r}: the run is of algorithm {recorded['algo']!r}")

    lock = None
    state = None
    try:
        if resume:
            lock = RunLock(out).acquire()
            recorded = read_config(out)  # again, under the lock
            state = load_checkpoint(out, algo) if (out / CHECKPOINT).exists() else None  # checksum first
            saved = _as_json(recorded["config"])
            where = f"the config in {out / CONFIG}"
            # loaded through the class, so fields added since the run was made take their defaults
            # (a new field defaults to the behaviour before it: older run folders resume)
            recorded_config = config_from_dict(cls, saved, where)
            recorded_fields = _as_json(dataclasses.asdict(recorded_config))
            if state is not None:
                # compared as the class reads them: a checkpoint written by a later version than
                # config.json (a resumed run) records fields config.json lacks, at their defaults
                checkpointed = config_from_dict(cls, _as_json(state["config"]), f"the checkpoint's config in {out}")
                details = _differences(recorded_fields, _as_json(dataclasses.asdict(checkpointed)),
                                       CONFIG, "checkpoint")
                if details:
                    raise RunError(f"{out / CONFIG} differs from the checkpoint's config ({details}); a run's "
                                   f"config cannot change (restore {CONFIG}, or train into a new folder)")
            if config is not None:
                details = _differences(recorded_fields, _as_json(dataclasses.asdict(config)), "saved", "given")
                if details:
                    raise ValueError(f"cannot resume {out} with a different config ({details}); pass the saved "
                                     f"config (or None) to resume, or train into a new folder")
            config = recorded_config
            check_config(config)
            settings = {**DEFAULT_SETTINGS, **(recorded.get("run") or {})}
            if state is not None and state.get("run") is not None:
                details = _differences({k: settings[k] for k in DEFAULT_SETTINGS},
                                       {k: state["run"].get(k) for k in DEFAULT_SETTINGS}, CONFIG, "checkpoint")
                if details:
                    raise RunError(f"{out / CONFIG} differs from the checkpoint's run settings ({details}); "
                                   f"restore {CONFIG}, or train into a new folder")
            for name, value in given.items():
                if value is not None and value != settings[name]:
                    raise ValueError(f"cannot resume {out} with {name} = {value} (--{name.replace('_', '-')}): "
                                     f"the run was trained with {settings[name]}; resuming keeps a run's "
                                     f"settings (only the step target may grow)")
            for name in DEFAULT_SETTINGS:
                positive_int(f"{CONFIG} {name}", settings[name])
            target = recorded.get("steps", (recorded.get("run") or {}).get("steps"))
            total_steps = total_steps if total_steps is not None else target
            positive_int("steps", total_steps)
            reached = state["step"] if state is not None else 0
            if total_steps < reached:
                raise ValueError(f"cannot resume {out} to {total_steps} steps: its checkpoint is at step {reached} "
                                 f"(steps can only grow)")
        else:
            settings = {k: v if v is not None else DEFAULT_SETTINGS[k] for k, v in given.items()}
            if config is None:
                raise ValueError("a new run needs a config")
        settings["steps"] = total_steps

        env = make_continuous_env(config.env_id)
        obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
        seed_everything(config.seed)
        agent = make_agent(cls, config, obs_dim, act_dim)  # validates what only the agent knows, before any file
        check_safe(agent.state_dict(), f"the state of {algo}")  # a checkpoint could not hold it: say so now

        if not resume:
            _make_folder(out)
            lock = RunLock(out).acquire()
            if _holds_run(out):  # checked under the lock: creating a run is check-and-create
                if (out / CHECKPOINT).exists():
                    raise RunError(f"{out} already holds a run; use --resume to continue it or choose another --out")
                raise RunError(f"{out} already holds a run that never reached a checkpoint; use --resume to "
                               f"restart it from step 0 with its saved config, or choose another --out")
            remove_stale_temporaries(out)
            atomic_write_json(out / CONFIG, {"algo": algo, "plugin": plugin, "config": dataclasses.asdict(config),
                                             "steps": total_steps, "run": settings})
            atomic_write_text(out / METRICS, "")
            commit = None
        else:
            remove_stale_temporaries(out)

            def commit() -> None:
                """Called by the loop once the checkpoint's state is restored and its unfinished
                episode replayed: only then may the folder change."""
                kept = [r for r in read_records(out / METRICS)  # a finished segment's "final" is evaluated anew
                        if state is not None and r["step"] <= state["step"] and r["kind"] != "final"]
                atomic_write_text(out / METRICS, encode_records(kept))
                updated = {**recorded, "plugin": plugin, "steps": total_steps, "run": settings}
                if updated != recorded:
                    atomic_write_json(out / CONFIG, updated)
                if state is None:
                    warn(f"{out} has no checkpoint (the run stopped before its first one); restarting it from step "
                         f"0 with its saved config")
        threads_before = torch.get_num_threads()
        torch.set_num_threads(settings["threads"])
        try:
            with flushing_denormals():
                return _loop(agent, env, config, out, algo, plugin, settings, state, progress, callback, tensorboard,
                             commit)
        finally:
            torch.set_num_threads(threads_before)
    finally:
        if lock is not None:
            lock.release()


def train_or_resume(algo: str | type[Agent], config, out: Path | str, total_steps: int | None, *,
                    eval_every: int | None = None, eval_episodes: int | None = None,
                    checkpoint_every: int | None = None, threads: int | None = None, **kwargs) -> Agent:
    """:func:`train` for scripts that are run again after an interruption: continue the run
    in ``out`` if it holds one, else start it there.

    A run found in ``out`` must have ``config`` (a ValueError names what differs) and keeps
    the run settings it was started with: ``eval_every``, ``eval_episodes``,
    ``checkpoint_every`` and ``threads`` apply to a new run only. ``kwargs`` (``progress``,
    ``callback``, ...) go to :func:`train` either way."""
    out = Path(out)
    if (out / CONFIG).exists():
        return train(algo, config, out, total_steps, resume=True, **kwargs)
    return train(algo, config, out, total_steps, eval_every=eval_every, eval_episodes=eval_episodes,
                 checkpoint_every=checkpoint_every, threads=threads, **kwargs)


def _replay_episode(env, episode_state: dict, seed: int, out: Path):
    """Bring a fresh ``env`` to the saved unfinished episode: reset it as the run did and step
    the saved actions; the observation and return must come out bit for bit."""
    if episode_state["reset_rng"] is not None:
        env.unwrapped.np_random.bit_generator.state = episode_state["reset_rng"]
        obs, _ = env.reset()
    else:
        obs, _ = env.reset(seed=seed)
    total = 0.0
    for act in episode_state["actions"]:
        obs, r, term, trunc, _ = env.step(act)
        total += float(r)
        if term or trunc:
            break
    if not np.array_equal(obs, episode_state["obs"]) or total != episode_state["ep_return"]:
        raise RunError(f"the unfinished episode saved in {out / CHECKPOINT} did not replay exactly on "
                       f"{env.spec.id if env.spec else 'the environment'} (a non-deterministic environment?)")
    return obs


class _TrainLog:
    """The running means of the values the agent's updates return, and the clocks, between
    two "train" records; its state goes into every checkpoint."""

    def __init__(self, state: dict | None = None):
        state = state or {}
        self.sums: dict[str, float] = dict(state.get("sums", {}))
        self.counts: dict[str, int] = dict(state.get("counts", {}))
        self.wall_before = float(state.get("wall_s", 0.0))  # seconds trained before this process
        self.last_wall, self.last_step = float(state.get("last_wall_s", 0.0)), state.get("last_step")
        self.t0 = time.perf_counter()

    def wall(self) -> float:
        return self.wall_before + time.perf_counter() - self.t0

    def add(self, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.sums[k] = self.sums.get(k, 0.0) + float(v)
                self.counts[k] = self.counts.get(k, 0) + 1

    def record(self, step: int, start: int) -> dict | None:
        """The record for ``step`` (None if no update ran since the last one), and a reset."""
        if not self.sums:
            return None
        wall = self.wall()
        since = step - (self.last_step if self.last_step is not None else start)
        record = {k: self.sums[k] / self.counts[k] for k in self.sums}
        record.update(wall_s=round(wall, 3), steps_per_s=round(since / max(wall - self.last_wall, 1e-9), 1))
        self.sums, self.counts, self.last_wall, self.last_step = {}, {}, wall, step
        return record

    def state(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts), "wall_s": self.wall(),
                "last_wall_s": self.last_wall, "last_step": self.last_step}


def _tensorboard_writer_class():
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("--tensorboard needs the tensorboard package: pip install 'pplrl[tensorboard]' "
                         "(or pip install tensorboard)") from None
    return SummaryWriter


def _loop(agent: Agent, env, config, out: Path, algo: str, plugin, settings: dict, state: dict | None,
          progress: bool, callback, tensorboard: bool = False, commit: Callable[[], None] | None = None) -> Agent:
    total_steps, eval_every = settings["steps"], settings["eval_every"]
    eval_episodes, checkpoint_every = settings["eval_episodes"], settings["checkpoint_every"]
    start, episode = 0, 0
    ep_return, ep_len, actions, due_checkpoint = 0.0, 0, [], False
    reset_rng, reset_seed = None, config.seed
    obs, _ = env.reset(seed=config.seed)
    if state is not None:
        agent.load_state_dict(state["agent"])
        start, episode = state["step"], state["episode"]
        partial = state.get("episode_state")
        if partial is not None:
            obs = _replay_episode(env, partial, config.seed, out)
            ep_return, ep_len = partial["ep_return"], partial["ep_len"]
            actions = [np.asarray(a) for a in partial["actions"]]
            due_checkpoint, reset_rng, reset_seed = partial["due_checkpoint"], partial["reset_rng"], None
            if reset_rng is None:
                reset_seed = config.seed
        else:
            env.unwrapped.np_random.bit_generator.state = state["env_rng"]
            reset_rng, reset_seed = state["env_rng"], None
            obs, _ = env.reset()
        torch.set_rng_state(state["torch_rng"])
        if state.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
    if commit is not None:
        commit()
    train_log = _TrainLog(state.get("log_state") if state is not None else None)
    metrics_path = out / METRICS
    metrics_file = open(metrics_path, "a")
    writer = _tensorboard_writer_class()(str(out / "tensorboard"), purge_step=start or None) if tensorboard else None

    def log(step: int, kind: str, **values) -> None:
        metrics_file.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        metrics_file.flush()
        if writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.add_scalar(f"{kind}/{k}", v, step)

    def checkpoint(step: int, unfinished: bool) -> None:
        metrics_file.flush()
        os.fsync(metrics_file.fileno())  # the logs up to a checkpoint are on disk before it
        episode_state = None
        if unfinished:
            episode_state = {"obs": np.asarray(obs), "ep_return": ep_return, "ep_len": ep_len,
                             "actions": [np.asarray(a) for a in actions], "reset_rng": reset_rng,
                             "due_checkpoint": due_checkpoint}
            if reset_seed is not None:
                episode_state["reset_rng"] = None
        save_checkpoint(out, agent, step, env.unwrapped.np_random.bit_generator.state, episode, plugin,
                        run=settings, episode_state=episode_state, log_state=train_log.state())

    last_eval = None
    bar = tqdm(range(start + 1, total_steps + 1), initial=start, total=total_steps, disable=not progress,
               desc=f"{algo} {config.env_id} seed {config.seed}", dynamic_ncols=True)
    try:
        for step in bar:
            act = agent.act(obs)
            next_obs, rew, term, trunc, _ = env.step(act)
            actions.append(np.array(act, copy=True))
            agent.observe(obs, act, rew, next_obs, term)
            obs = next_obs
            ep_return += float(rew)
            ep_len += 1
            metrics = agent.update(step)
            if metrics:
                train_log.add(metrics)
            if step % LOG_EVERY == 0:
                record = train_log.record(step, start)
                if record is not None:
                    log(step, "train", **record)
            if callback is not None:
                callback(step, metrics)
            if step % eval_every == 0:
                returns = evaluate(agent, config.env_id, eval_episodes, seed=config.seed + 10_000)
                last_eval = float(np.mean(returns))
                log(step, "eval", mean_return=last_eval, returns=returns)
            if step % checkpoint_every == 0:
                due_checkpoint = True
            if term or trunc:
                episode += 1
                log(step, "episode", episode_return=ep_return, episode_length=ep_len)
                bar.set_postfix(ep_return=f"{ep_return:.1f}", eval=None if last_eval is None else f"{last_eval:.1f}")
                ep_return, ep_len, actions = 0.0, 0, []
                if due_checkpoint or step == total_steps:
                    checkpoint(step, unfinished=False)
                    due_checkpoint = False
                reset_rng, reset_seed = env.unwrapped.np_random.bit_generator.state, None
                obs, _ = env.reset()
        if ep_len and start < total_steps:  # the run ended mid-episode: checkpoint the unfinished episode
            checkpoint(total_steps, unfinished=True)
        returns = evaluate(agent, config.env_id, eval_episodes, seed=config.seed + 10_000)
        log(total_steps, "final", mean_return=float(np.mean(returns)), std_return=float(np.std(returns)),
            returns=returns, wall_s=round(train_log.wall(), 3))
    except NonFiniteError as e:
        raise NonFiniteError(f"{e}; the last checkpoint in {out} was kept") from None
    except FloatingPointError as e:
        raise NonFiniteError(f"{e}; the last checkpoint in {out} was kept") from None
    except OSError as e:  # appending to metrics.jsonl (a full disk, say)
        raise os_error(e, metrics_path, f"; the last checkpoint in {out} was kept") from None
    finally:
        try:
            metrics_file.close()
        except OSError:  # a full disk fails the flush again: the error being raised says so, with the file
            pass
        if writer is not None:
            writer.close()
        bar.close()
        env.close()
    return agent
