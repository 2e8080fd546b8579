"""Runs: training with progress bar, periodic deterministic evaluation, metrics in a
line-per-record file, the resolved config, checkpoints and resume.

Layout of a run folder::

    config.json       algorithm name + resolved config + the plugin that defines the algorithm (or None)
    metrics.jsonl     one JSON record per line: {"step", "kind": "train"|"eval"|"episode", ...}
    checkpoint.pt     everything needed to continue (written atomically)

Checkpoints are written at episode boundaries (the first one after every
``checkpoint_every`` steps), so resuming restarts a fresh episode exactly as the
uninterrupted run did: same seed and config give the same evaluation returns, and a
run interrupted (Ctrl-C, a crash, NaN) and resumed ends where an uninterrupted one
ends. On interruption the last checkpoint and the logs up to it are kept.

Algorithms defined outside pplrl (:mod:`pplrl.plugins`) are named by a plugin file or
module; the run records it, and resuming or loading the checkpoint loads it again.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from pplrl.algorithms import make_agent
from pplrl.algorithms.base import Agent
from pplrl.diagnostics import NonFiniteError
from pplrl.envs.continuous import make_continuous_env
from pplrl.plugins import PluginError, plugin_of, record_spec, resolve

CHECKPOINT = "checkpoint.pt"
CONFIG = "config.json"
METRICS = "metrics.jsonl"
FORMAT_VERSION = 1


class RunError(RuntimeError):
    """A run folder or checkpoint that cannot be used."""


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def evaluate(agent: Agent, env_id: str, episodes: int, seed: int) -> list[float]:
    """Deterministic-policy returns on a separate environment, seeded ``seed + i``."""
    if episodes <= 0:
        raise ValueError(f"episodes must be > 0, got {episodes}")
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


def _write_json(path: Path, obj) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save_checkpoint(out: Path, agent: Agent, step: int, env_rng_state, episode: int, plugin: str | None = None) -> None:
    state = {"format": FORMAT_VERSION, "algo": agent.algo, "plugin": plugin, "config": dataclasses.asdict(agent.config),
             "obs_dim": agent.obs_dim, "act_dim": agent.act_dim, "step": step, "episode": episode,
             "agent": agent.state_dict(), "env_rng": env_rng_state,
             "torch_rng": torch.get_rng_state(), "numpy_rng": np.random.get_state(), "python_rng": random.getstate()}
    tmp = out / (CHECKPOINT + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, out / CHECKPOINT)


def load_checkpoint(path: Path, expected_algo: str | None = None) -> dict:
    path = Path(path)
    file = path / CHECKPOINT if path.is_dir() else path
    if not file.exists():
        raise RunError(f"no checkpoint at {file}")
    try:
        state = torch.load(file, weights_only=False)
    except Exception as e:
        raise RunError(f"checkpoint {file} is corrupt or unreadable: {type(e).__name__}: {e}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT_VERSION or "algo" not in state:
        raise RunError(f"checkpoint {file} is not a pplrl checkpoint (format {FORMAT_VERSION})")
    if expected_algo is not None and state["algo"] != expected_algo:
        raise RunError(f"checkpoint {file} was written by algorithm {state['algo']!r}, not {expected_algo!r}")
    return state


def config_from_dict(cls: type[Agent], fields: dict):
    """``cls.Config`` from a saved (JSON) config: lists back to tuples; keys the config class does
    not have (or lacks) are a RunError."""
    try:
        return cls.Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    except TypeError as e:
        raise RunError(f"the saved config does not fit {cls.__name__}.Config of algorithm {cls.algo!r}: {e}") from None


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
    config = config_from_dict(Agent_, state["config"])
    agent = Agent_(config, state["obs_dim"], state["act_dim"])
    agent.load_state_dict(state["agent"])
    return agent, state


def _read_metrics(path: Path, up_to_step: int) -> list[str]:
    if not path.exists():
        return []
    return [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= up_to_step]


def train(algo: str | type[Agent], config, out: Path | str, total_steps: int, *, eval_every: int = 1000,
          eval_episodes: int = 5, checkpoint_every: int = 1000, resume: bool = False, progress: bool = True,
          callback: Callable[[int, dict], None] | None = None, plugin: str | None = None) -> Agent:
    """Train ``algo`` with ``config`` for ``total_steps`` environment steps into ``out``.

    ``algo`` is a registered name or an Agent class (registered under its ``algo`` if it is
    not yet); ``plugin`` (a ``.py`` file or a module name) is loaded first and recorded in the
    run, so that resuming and :func:`agent_from_checkpoint` load it again. Without ``plugin``
    the run records the plugin file or module that defines the class, if any.

    ``resume=True`` continues the run in ``out`` from its checkpoint with the config saved
    there; ``config`` must then equal it (or be None), else a ValueError names the keys
    that differ. It loads the plugin the run recorded unless ``plugin`` is given."""
    out = Path(out)
    if total_steps <= 0:
        raise ValueError(f"steps must be > 0, got {total_steps}")
    if eval_every <= 0 or checkpoint_every <= 0:
        raise ValueError("eval_every and checkpoint_every must be > 0")
    recorded = json.loads((out / CONFIG).read_text()) if resume and (out / CONFIG).is_file() else {}
    if plugin is not None:
        cls, plugin = resolve(algo, plugin), record_spec(plugin)
    elif recorded.get("plugin") is not None:  # resuming a plugin's run: load it again (a class needs no loading)
        cls = resolve(algo) if isinstance(algo, type) else resolve_recorded(algo, recorded["plugin"], out / CONFIG)
        plugin = recorded["plugin"]
    else:
        cls = resolve(algo)
        plugin = plugin_of(cls)
    algo = cls.algo
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        state = load_checkpoint(out, algo)
        saved = json.loads((out / CONFIG).read_text())["config"]
        if config is not None:
            given = json.loads(json.dumps(dataclasses.asdict(config)))  # tuples as lists, as saved
            differing = sorted(k for k in saved.keys() | given.keys() if saved.get(k) != given.get(k))
            if differing:
                details = ", ".join(f"{k}: saved {saved.get(k)!r}, given {given.get(k)!r}" for k in differing)
                raise ValueError(f"cannot resume {out} with a different config ({details}); pass the saved "
                                 f"config (or None) to resume, or train into a new folder")
        config = config_from_dict(cls, saved)
        if recorded and recorded.get("plugin") != plugin:  # a plugin given anew (moved, say): record it
            _write_json(out / CONFIG, {**recorded, "plugin": plugin})
    else:
        if (out / CHECKPOINT).exists() or (out / METRICS).exists():
            raise RunError(f"{out} already holds a run; use --resume to continue it or choose another --out")
        _write_json(out / CONFIG, {"algo": algo, "plugin": plugin, "config": dataclasses.asdict(config),
                                   "steps": total_steps})

    env = make_continuous_env(config.env_id)
    obs_dim, act_dim = env.observation_space.shape[0], env.action_space.shape[0]
    seed_everything(config.seed)
    agent = make_agent(cls, config, obs_dim, act_dim)
    start, episode = 0, 0
    obs, _ = env.reset(seed=config.seed)
    if resume:
        agent.load_state_dict(state["agent"])
        start, episode = state["step"], state["episode"]
        torch.set_rng_state(state["torch_rng"])
        np.random.set_state(state["numpy_rng"])
        random.setstate(state["python_rng"])
        env.unwrapped.np_random.bit_generator.state = state["env_rng"]
        obs, _ = env.reset()
        kept = _read_metrics(out / METRICS, start)
        (out / METRICS).write_text("".join(line + "\n" for line in kept))
    metrics_file = open(out / METRICS, "a")

    def log(step: int, kind: str, **values) -> None:
        metrics_file.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        metrics_file.flush()

    ep_return, ep_len, last_eval = 0.0, 0, None
    due_checkpoint = False
    bar = tqdm(range(start + 1, total_steps + 1), initial=start, total=total_steps, disable=not progress,
               desc=f"{algo} {config.env_id} seed {config.seed}", dynamic_ncols=True)
    try:
        for step in bar:
            act = agent.act(obs)
            next_obs, rew, term, trunc, _ = env.step(act)
            agent.observe(obs, act, rew, next_obs, term)
            obs = next_obs
            ep_return += float(rew)
            ep_len += 1
            metrics = agent.update(step)
            if metrics and step % 100 == 0:
                log(step, "train", **metrics)
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
                ep_return, ep_len = 0.0, 0
                if due_checkpoint or step == total_steps:
                    save_checkpoint(out, agent, step, env.unwrapped.np_random.bit_generator.state, episode, plugin)
                    due_checkpoint = False
                obs, _ = env.reset()
        if ep_len:  # the run ended mid-episode: checkpoint its final state anyway
            save_checkpoint(out, agent, total_steps, env.unwrapped.np_random.bit_generator.state, episode, plugin)
    except NonFiniteError as e:
        raise NonFiniteError(f"{e}; the last checkpoint in {out} was kept") from None
    finally:
        metrics_file.close()
        bar.close()
        env.close()
    return agent
