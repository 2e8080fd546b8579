"""Continuous-control gymnasium environments for the SAC / MBPO / VMBPO trainers.

:func:`make_continuous_env` is the one place where action scaling happens: every env it
returns has the action space ``Box(-1, 1)``, and a ``RescaleAction`` wrapper maps an
action in [-1, 1] affinely onto the task's own bounds (e.g. Pendulum's torque in
[-2, 2]). Policies therefore always act in [-1, 1] (a tanh-squashed Gaussian needs no
further scaling); learned dynamics models and replay buffers see the [-1, 1] actions.
``RescaleAction`` does not clip, so an action outside [-1, 1] is extrapolated linearly
and then clipped, or not, by the task itself.

The envs are also wrapped in :class:`FiniteObservation`, which raises
``FloatingPointError`` on a NaN / inf action, observation or reward instead of letting
it reach a replay buffer.

:func:`termination_fn_for` gives, for the tasks with known termination rules, a function
of ``(obs, act, next_obs)`` that reproduces the env's ``terminated`` flag from the
observation alone, for model rollouts (MBPO's "static" termination functions, checked
here against the gymnasium v4 / v5 sources).
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Callable
from typing import Any

# Headless MuJoCo: only ever consulted if someone renders, but it must be set before
# mujoco creates a GL context. Respect a user's choice.
os.environ.setdefault("MUJOCO_GL", "egl")

import gymnasium as gym
import numpy as np
from gymnasium import spaces
from gymnasium.envs.registration import parse_env_id
from gymnasium.wrappers import RescaleAction

TerminationFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


class FiniteObservation(gym.Wrapper):
    """Raises ``FloatingPointError`` (naming the env, episode and step) when an action,
    observation or reward is not finite. Step 0 is the observation from ``reset``."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        self._name = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
        self._episode = -1
        self._t = 0

    def _fail(self, what: str, value: Any) -> None:
        raise FloatingPointError(
            f"environment {self._name!r}: non-finite {what} at step {self._t} of episode "
            f"{self._episode}: {value!r}"
        )

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        self._episode += 1
        self._t = 0
        if not np.all(np.isfinite(obs)):
            self._fail("observation (from reset)", obs)
        return obs, info

    def step(self, action):
        self._t += 1
        if not np.all(np.isfinite(action)):
            self._fail("action", action)
        obs, reward, terminated, truncated, info = self.env.step(action)
        if not np.all(np.isfinite(obs)):
            self._fail("observation", obs)
        if not np.isfinite(reward):
            self._fail("reward", reward)
        return obs, reward, terminated, truncated, info


def _resolve_id(env_id: str) -> str:
    """Imports the module of a ``"module:EnvId"`` id (as ``gym.make`` does) and checks
    that the id is registered, suggesting close matches when it is not."""
    if not isinstance(env_id, str):
        raise TypeError(f"env_id must be a string, got {type(env_id).__name__}")
    if ":" in env_id:
        module, env_id = env_id.split(":", 1)
        importlib.import_module(module)
    if env_id not in gym.registry:
        matches = difflib.get_close_matches(env_id, list(gym.registry), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(repr(m) for m in matches)}?" if matches else ""
        raise ValueError(f"unknown environment id {env_id!r}{hint}")
    return env_id


def make_continuous_env(env_id: str, *, seed: int | None = None, **kwargs) -> gym.Env:
    """Makes the gymnasium env ``env_id`` (e.g. ``"Hopper-v5"``, ``"Pendulum-v1"``,
    ``"MountainCarContinuous-v0"``) with a flat ``Box`` observation space and actions in
    [-1, 1] (see the module docstring). ``kwargs`` go to ``gymnasium.make``.

    With ``seed`` the env is reset once with that seed and its action and observation
    spaces are seeded, so later ``reset()`` calls (without a seed) are reproducible.

    Raises ValueError for an unknown id (with close matches), a non-``Box`` (e.g.
    discrete) action space, an action space with infinite bounds, or an observation space
    that is not a 1-D ``Box``; ImportError when the env's extra dependencies are missing.
    """
    env_id = _resolve_id(env_id)
    try:
        env = gym.make(env_id, **kwargs)
    except (ImportError, gym.error.DependencyNotInstalled) as e:
        raise ImportError(
            f"cannot make {env_id!r}: a dependency is missing ({e}); MuJoCo tasks need "
            "'gymnasium[mujoco]' (mujoco and imageio), Box2D tasks 'gymnasium[box2d]'"
        ) from e
    try:
        act_space, obs_space = env.action_space, env.observation_space
        if not isinstance(act_space, spaces.Box):
            raise ValueError(
                f"{env_id!r} has action space {act_space}, but this algorithm needs continuous "
                "actions (a gymnasium Box action space)"
            )
        if len(act_space.shape) != 1 or not (np.all(np.isfinite(act_space.low))
                                              and np.all(np.isfinite(act_space.high))):
            raise ValueError(
                f"{env_id!r} has action space {act_space}; a 1-D Box with finite bounds is needed "
                "to rescale actions to [-1, 1]"
            )
        if not isinstance(obs_space, spaces.Box) or len(obs_space.shape) != 1:
            raise ValueError(
                f"{env_id!r} has observation space {obs_space}; this algorithm needs a 1-D Box "
                "observation space (flatten or wrap the env first)"
            )
        low = np.full(act_space.shape, -1.0, dtype=act_space.dtype)
        high = np.full(act_space.shape, 1.0, dtype=act_space.dtype)
        env = FiniteObservation(RescaleAction(env, low, high))
    except BaseException:
        env.close()
        raise
    if seed is not None:
        env.reset(seed=seed)
        env.action_space.seed(seed)
        env.observation_space.seed(seed)
    return env


def env_dims(env: gym.Env) -> tuple[int, int]:
    """``(obs_dim, act_dim)`` of an env with flat Box observation and action spaces."""
    obs_space, act_space = env.observation_space, env.action_space
    for what, space in (("observation", obs_space), ("action", act_space)):
        if not isinstance(space, spaces.Box) or len(space.shape) != 1:
            raise ValueError(f"{what} space {space} is not a 1-D Box")
    return int(obs_space.shape[0]), int(act_space.shape[0])


# ----------------------------------------------------------------------------- termination
# Observation layouts assume gymnasium's default exclude_current_positions_from_observation
# (True): for Hopper / Walker2d obs = [qpos[1:], clip(qvel, -10, 10)], so obs[0] is the torso
# height z and obs[1] its angle; for Ant / Humanoid obs starts with qpos[2:], so obs[0] is z.


def _hopper(z_range=(0.7, float("inf")), angle_range=(-0.2, 0.2), state_range=(-100.0, 100.0)) -> TerminationFn:
    # gymnasium checks state_vector()[2:] = [qpos[2:], qvel] against state_range; the
    # observation only has clipped velocities (|v| <= 10), so a true |qvel| > 100 (which
    # the env would terminate on) is invisible here. MBPO's static function does the same.
    def termination_fn(obs, act, next_obs):
        next_obs = np.asarray(next_obs)
        z, angle, state = next_obs[..., 0], next_obs[..., 1], next_obs[..., 1:]
        healthy = (
            np.all(np.isfinite(next_obs), axis=-1)
            & np.all((state_range[0] < state) & (state < state_range[1]), axis=-1)
            & (z_range[0] < z) & (z < z_range[1])
            & (angle_range[0] < angle) & (angle < angle_range[1])
        )
        return ~healthy

    return termination_fn


def _walker2d(z_range=(0.8, 2.0), angle_range=(-1.0, 1.0)) -> TerminationFn:
    def termination_fn(obs, act, next_obs):
        next_obs = np.asarray(next_obs)
        z, angle = next_obs[..., 0], next_obs[..., 1]
        healthy = ((z_range[0] < z) & (z < z_range[1])
                   & (angle_range[0] < angle) & (angle < angle_range[1]))
        return ~healthy

    return termination_fn


def _ant(z_range=(0.2, 1.0)) -> TerminationFn:
    def termination_fn(obs, act, next_obs):
        next_obs = np.asarray(next_obs)
        z = next_obs[..., 0]
        healthy = np.all(np.isfinite(next_obs), axis=-1) & (z_range[0] <= z) & (z <= z_range[1])
        return ~healthy

    return termination_fn


def _humanoid(z_range=(1.0, 2.0)) -> TerminationFn:
    def termination_fn(obs, act, next_obs):
        z = np.asarray(next_obs)[..., 0]
        return ~((z_range[0] < z) & (z < z_range[1]))

    return termination_fn


def _inverted_pendulum() -> TerminationFn:
    # obs = [cart x, pole angle, velocities]
    def termination_fn(obs, act, next_obs):
        next_obs = np.asarray(next_obs)
        return ~np.all(np.isfinite(next_obs), axis=-1) | (np.abs(next_obs[..., 1]) > 0.2)

    return termination_fn


def _inverted_double_pendulum() -> TerminationFn:
    # obs = [x, sin q1, sin q2, cos q1, cos q2, ...]; both poles 0.6 long on a cart at
    # height 0, so the tip height is y = 0.6 cos q1 + 0.6 cos(q1 + q2); terminated iff y <= 1.
    def termination_fn(obs, act, next_obs):
        next_obs = np.asarray(next_obs)
        s1, s2, c1, c2 = (next_obs[..., i] for i in (1, 2, 3, 4))
        y = 0.6 * c1 + 0.6 * (c1 * c2 - s1 * s2)
        return y <= 1.0

    return termination_fn


def _mountain_car_continuous(goal_velocity: float = 0.0) -> TerminationFn:
    # obs = [position, velocity]; the goal is position >= 0.45 with velocity >= goal_velocity.
    def termination_fn(obs, act, next_obs):
        next_obs = np.asarray(next_obs)
        return (next_obs[..., 0] >= 0.45) & (next_obs[..., 1] >= goal_velocity)

    return termination_fn


# name -> (supported versions, factory or None = never terminates, {env kwarg: factory kwarg})
_TERMINATION: dict[str, tuple[tuple[int, ...], Callable[..., TerminationFn] | None, dict[str, str]]] = {
    "Hopper": ((4, 5), _hopper, {"healthy_z_range": "z_range", "healthy_angle_range": "angle_range",
                                 "healthy_state_range": "state_range"}),
    "Walker2d": ((4, 5), _walker2d, {"healthy_z_range": "z_range", "healthy_angle_range": "angle_range"}),
    "Ant": ((4, 5), _ant, {"healthy_z_range": "z_range"}),
    "Humanoid": ((4, 5), _humanoid, {"healthy_z_range": "z_range"}),
    "InvertedPendulum": ((4, 5), _inverted_pendulum, {}),
    "InvertedDoublePendulum": ((4, 5), _inverted_double_pendulum, {}),
    "MountainCarContinuous": ((0,), _mountain_car_continuous, {"goal_velocity": "goal_velocity"}),
    "HalfCheetah": ((4, 5), None, {}),
    "Swimmer": ((4, 5), None, {}),
    "Reacher": ((4, 5), None, {}),
    "Pusher": ((4, 5), None, {}),
    "HumanoidStandup": ((4, 5), None, {}),
    "Pendulum": ((1,), None, {}),
}

# env kwargs that change the observation layout the termination functions rely on
_LAYOUT_KWARGS = ("exclude_current_positions_from_observation",)


def termination_fn_for(env_id: str, **env_kwargs) -> TerminationFn | None:
    """The termination function of ``env_id`` for model rollouts, or None when the task
    never terminates (only truncates): Pendulum, HalfCheetah, Swimmer, Reacher, Pusher,
    HumanoidStandup.

    The function maps ``(obs, act, next_obs)`` arrays with leading batch dimensions to a
    bool array of ``terminated`` flags (a function of ``next_obs`` only). Pass the kwargs
    given to :func:`make_continuous_env`: ``terminate_when_unhealthy=False`` gives None,
    custom ``healthy_*_range`` / ``goal_velocity`` are honoured, and kwargs that change
    the observation layout raise ValueError. Unknown ids raise ValueError rather than
    silently returning "never terminates".
    """
    if ":" in env_id:
        env_id = env_id.split(":", 1)[1]
    try:
        namespace, name, version = parse_env_id(env_id)
    except gym.error.Error as e:
        raise ValueError(f"malformed environment id {env_id!r}: {e}") from e
    entry = _TERMINATION.get(name) if namespace is None else None
    if entry is None or version not in entry[0]:
        known = ", ".join(f"{n}-v{v}" for n, (vs, _, _) in _TERMINATION.items() for v in vs)
        raise ValueError(f"no termination function known for {env_id!r}; known: {known}")
    _, factory, kwarg_map = entry
    for k in _LAYOUT_KWARGS:
        if k in env_kwargs and env_kwargs[k] is not True:
            raise ValueError(f"termination_fn_for({env_id!r}) assumes the default {k}=True, got {env_kwargs[k]!r}")
    if factory is None or env_kwargs.get("terminate_when_unhealthy", True) is False:
        return None
    return factory(**{kwarg_map[k]: v for k, v in env_kwargs.items() if k in kwarg_map})


__all__ = ["FiniteObservation", "env_dims", "make_continuous_env", "termination_fn_for"]
