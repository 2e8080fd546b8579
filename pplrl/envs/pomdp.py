"""Partially observed environments for the generative POMDP agent (Marino & Yue,
003_…, Sec. 3.1): the Tiger problem with exact belief updates, and gymnasium wrappers
that turn any 1-D ``Box`` environment into a POMDP.

* :class:`TigerPOMDP` holds the Tiger tables (Kaelbling, Littman & Cassandra 1998):
  two states (tiger behind the left / right door), three actions (listen, open left,
  open right), two observations (hear left / hear right, correct with probability
  ``accuracy`` after a listen, uninformative otherwise). :meth:`TigerPOMDP.belief_update`
  is the exact Bayes filter ``b'(s') ∝ O[a, s', o] sum_s b(s) T[a, s, s']``.
  :class:`TigerEnv` samples it (``pplrl/Tiger-v0``, discrete actions).
* :class:`PartialObservation` hides observation dimensions and/or adds Gaussian
  observation noise of a chosen scale (drawn from the base env's ``np_random``, so a
  seeded env and a resumed run reproduce the noise).
* :class:`AgentView` appends the reward that arrived with the observation and an
  episode-start flag: the agent's observation is ``[x_t, r_t, first_t]`` (the paper's
  agent observes x_t *and* r_t; the flag tells a recurrent filter where an episode
  starts, since :func:`pplrl.runner.evaluate` calls ``act`` without ``observe``).

Registered ids (``make_continuous_env`` accepts them):

``pplrl/PendulumNoVel-v0``       Pendulum-v1, angular velocity hidden (obs [cos, sin, r, first])
``pplrl/PendulumNoVelNoisy-v0``  the same with observation noise of scale 0.05
``pplrl/PendulumNoisy-v0``       Pendulum-v1, all of [cos, sin, thetadot] seen with noise 0.1
``pplrl/POMDP-v0``               any env: ``gym.make("pplrl/POMDP-v0", base="Hopper-v5", hide=(5,), noise=0.1)``
``pplrl/LightDark-v0``          the light-dark domain (pplrl.envs.light_dark; obs [x, y, r, first])
``pplrl/Tiger-v0``               the Tiger problem (discrete actions; terminates on opening a door)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

# ----------------------------------------------------------------------------- Tiger
TIGER_LEFT, TIGER_RIGHT = 0, 1
LISTEN, OPEN_LEFT, OPEN_RIGHT = 0, 1, 2
HEAR_LEFT, HEAR_RIGHT = 0, 1


@dataclass(frozen=True)
class TigerPOMDP:
    """The Tiger problem's tables. ``transition()[a, s, s']``, ``emission()[a, s', o]``
    (the observation after action ``a`` lands in ``s'``), ``reward()[s, a]``.
    Opening a door resets the tiger uniformly (the classic formulation)."""

    accuracy: float = 0.85
    listen_reward: float = -1.0
    treasure_reward: float = 10.0
    tiger_reward: float = -100.0

    n_states = 2
    n_actions = 3
    n_obs = 2

    def __post_init__(self):
        if not 0.0 < self.accuracy < 1.0:
            raise ValueError(f"listening accuracy must lie in (0, 1), got {self.accuracy}")

    def transition(self) -> np.ndarray:
        T = np.empty((3, 2, 2))
        T[LISTEN] = np.eye(2)
        T[OPEN_LEFT] = T[OPEN_RIGHT] = 0.5
        return T

    def emission(self) -> np.ndarray:
        obs_probs = np.full((3, 2, 2), 0.5)
        p = self.accuracy
        obs_probs[LISTEN] = [[p, 1 - p], [1 - p, p]]
        return obs_probs

    def reward(self) -> np.ndarray:
        R = np.empty((2, 3))
        R[:, LISTEN] = self.listen_reward
        R[TIGER_LEFT, OPEN_LEFT] = R[TIGER_RIGHT, OPEN_RIGHT] = self.tiger_reward
        R[TIGER_LEFT, OPEN_RIGHT] = R[TIGER_RIGHT, OPEN_LEFT] = self.treasure_reward
        return R

    @staticmethod
    def initial_belief() -> np.ndarray:
        return np.array([0.5, 0.5])

    def belief_update(self, belief: np.ndarray, action: int, obs: int) -> np.ndarray:
        """Exact Bayes filter: ``b'(s') ∝ O[a, s', o] sum_s b(s) T[a, s, s']``."""
        belief = np.asarray(belief, dtype=float)
        if belief.shape != (2,) or np.any(belief < 0) or not np.isclose(belief.sum(), 1.0):
            raise ValueError(f"belief must be a probability vector of length 2, got {belief!r}")
        if action not in (LISTEN, OPEN_LEFT, OPEN_RIGHT) or obs not in (HEAR_LEFT, HEAR_RIGHT):
            raise ValueError(f"invalid action {action!r} or observation {obs!r}")
        pred = belief @ self.transition()[action]
        post = pred * self.emission()[action, :, obs]
        return post / post.sum()

    def beliefs(self, actions: Sequence[int], observations: Sequence[int], belief=None) -> np.ndarray:
        """Beliefs ``[T, 2]`` after each (a_{t-1}, o_t) pair, starting from ``belief``
        (default uniform)."""
        if len(actions) != len(observations):
            raise ValueError("actions and observations must have the same length")
        b = self.initial_belief() if belief is None else np.asarray(belief, dtype=float)
        out = []
        for a, o in zip(actions, observations):
            b = self.belief_update(b, int(a), int(o))
            out.append(b)
        return np.array(out).reshape(len(out), 2)


class TigerEnv(gym.Env):
    """Samples :class:`TigerPOMDP`. The observation is the heard side (0 / 1); the one
    returned by ``reset`` is uninformative (as after opening a door). Opening a door
    ends the episode (``terminate_on_open``) or resets the tiger and goes on."""

    metadata = {"render_modes": []}

    def __init__(self, accuracy: float = 0.85, terminate_on_open: bool = True):
        self.pomdp = TigerPOMDP(accuracy=accuracy)
        self.terminate_on_open = terminate_on_open
        self.observation_space = spaces.Discrete(2)
        self.action_space = spaces.Discrete(3)
        self._state: int | None = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._state = int(self.np_random.integers(2))
        return int(self.np_random.integers(2)), {"state": self._state}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        a, s = int(action), self._state
        reward = float(self.pomdp.reward()[s, a])
        s2 = int(self.np_random.choice(2, p=self.pomdp.transition()[a, s]))
        obs = int(self.np_random.choice(2, p=self.pomdp.emission()[a, s2]))
        self._state = s2
        return obs, reward, bool(a != LISTEN and self.terminate_on_open), False, {"state": s2}


# ------------------------------------------------------------------- continuous wrappers
def _check_box(env: gym.Env) -> spaces.Box:
    space = env.observation_space
    if not isinstance(space, spaces.Box) or len(space.shape) != 1:
        raise ValueError(f"a POMDP wrapper needs a 1-D Box observation space, got {space}")
    return space


class PartialObservation(gym.Wrapper):
    """Keeps the observation dimensions not in ``hide`` and adds N(0, noise^2) noise to
    what is kept. ``noise`` must be >= 0; ``hide`` must leave at least one dimension."""

    def __init__(self, env: gym.Env, hide: Sequence[int] = (), noise: float = 0.0):
        super().__init__(env)
        space = _check_box(env)
        noise = float(noise)
        if not np.isfinite(noise) or noise < 0:
            raise ValueError(f"observation noise scale must be >= 0, got {noise}")
        n = space.shape[0]
        hide = tuple(sorted({int(i) % n if -n <= int(i) < n else _bad_index(i, n) for i in hide}))
        self.keep = np.array([i for i in range(n) if i not in hide], dtype=int)
        if self.keep.size == 0:
            raise ValueError(f"hide={hide} hides every observation dimension")
        self.hide, self.noise = hide, noise
        low, high = space.low[self.keep], space.high[self.keep]
        if noise > 0:
            low, high = np.full_like(low, -np.inf), np.full_like(high, np.inf)
        self.observation_space = spaces.Box(low.astype(np.float32), high.astype(np.float32), dtype=np.float32)

    @property
    def partial(self) -> bool:
        """True when something is hidden or noisy (the env is then truly a POMDP)."""
        return bool(self.hide) or self.noise > 0

    def _view(self, obs) -> np.ndarray:
        x = np.asarray(obs, dtype=np.float32)[self.keep]
        if self.noise > 0:
            x = x + self.noise * self.env.unwrapped.np_random.standard_normal(x.shape).astype(np.float32)
        return x.astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return self._view(obs), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._view(obs), reward, terminated, truncated, info


def _bad_index(i, n):
    raise ValueError(f"cannot hide observation dimension {i} of a {n}-dimensional observation")


class AgentView(gym.Wrapper):
    """Observation ``[x_t, r_t, first_t]``: x from the wrapped env, the reward that
    arrived with it (0 after ``reset``) and 1.0 at the first step of an episode."""

    def __init__(self, env: gym.Env):
        super().__init__(env)
        space = _check_box(env)
        low = np.concatenate([space.low, [-np.inf, 0.0]]).astype(np.float32)
        high = np.concatenate([space.high, [np.inf, 1.0]]).astype(np.float32)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        obs, info = self.env.reset(seed=seed, options=options)
        return np.concatenate([obs, [0.0, 1.0]]).astype(np.float32), info

    def step(self, action):
        obs, reward, terminated, truncated, info = self.env.step(action)
        return np.concatenate([obs, [reward, 0.0]]).astype(np.float32), reward, terminated, truncated, info


@dataclass(frozen=True)
class POMDPSpec:
    """What a POMDP agent needs to know about its env's observation layout."""

    x_dim: int
    hide: tuple[int, ...]
    noise: float


def split_view(obs: np.ndarray) -> tuple[np.ndarray, float, bool]:
    """``(x_t, r_t, first_t)`` from an :class:`AgentView` observation."""
    obs = np.asarray(obs, dtype=np.float32)
    return obs[:-2], float(obs[-2]), bool(obs[-1] > 0.5)


def pomdp_spec(env: gym.Env) -> POMDPSpec:
    """The :class:`POMDPSpec` of an env built with :func:`make_pomdp_env` (through any
    outer wrappers). Raises ValueError for a fully observed env: one without
    :class:`AgentView` over a :class:`PartialObservation` that hides or perturbs something."""
    view = partial = None
    e = env
    while True:
        if isinstance(e, AgentView) and view is None:
            view = e
        if isinstance(e, PartialObservation) and partial is None:
            partial = e
        if not hasattr(e, "env"):
            break
        e = e.env
    name = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
    native = bool(getattr(env.unwrapped, "partially_observed", False))  # e.g. pplrl/LightDark-v0
    if view is None or not (native or (partial is not None and partial.partial)):
        raise ValueError(
            f"environment {name!r} is fully observed, but this agent needs a POMDP: use "
            "pplrl/PendulumNoVel-v0, pplrl/PendulumNoVelNoisy-v0, pplrl/PendulumNoisy-v0, pplrl/LightDark-v0 or "
            "pplrl/POMDP-v0 with hide=... and/or noise>0 (see pplrl.envs.pomdp)")
    if partial is None:
        return POMDPSpec(x_dim=int(view.observation_space.shape[0]) - 2, hide=(), noise=0.0)
    return POMDPSpec(x_dim=int(partial.observation_space.shape[0]), hide=partial.hide, noise=partial.noise)


def make_pomdp_env(base: str = "Pendulum-v1", hide: Sequence[int] = (), noise: float = 0.0,
                   **base_kwargs) -> gym.Env:
    """``gym.make(base)`` with ``hide`` dimensions hidden, observation noise ``noise``
    and the :class:`AgentView` ``[x, r, first]``. Also the entry point of ``pplrl/POMDP-v0``."""
    if not isinstance(base, str) or base.startswith("pplrl/POMDP"):
        raise ValueError(f"base must be the id of a fully observed env, got {base!r}")
    if float(noise) < 0:
        raise ValueError(f"observation noise scale must be >= 0, got {noise}")
    env = gym.make(base, **base_kwargs)
    try:
        return AgentView(PartialObservation(env, hide=hide, noise=noise))
    except BaseException:
        env.close()
        raise


POMDP_ENV_IDS = {
    "pplrl/PendulumNoVel-v0": dict(base="Pendulum-v1", hide=(2,), noise=0.0),
    "pplrl/PendulumNoVelNoisy-v0": dict(base="Pendulum-v1", hide=(2,), noise=0.05),
    "pplrl/PendulumNoisy-v0": dict(base="Pendulum-v1", hide=(), noise=0.1),
}


def register_pomdp_envs() -> None:
    for env_id, kwargs in POMDP_ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=make_pomdp_env, kwargs=dict(kwargs), disable_env_checker=True)
    if "pplrl/POMDP-v0" not in gym.registry:
        gym.register("pplrl/POMDP-v0", entry_point=make_pomdp_env, disable_env_checker=True)
    if "pplrl/LightDark-v0" not in gym.registry:
        gym.register("pplrl/LightDark-v0", entry_point="pplrl.envs.light_dark:make_light_dark_env",
                     disable_env_checker=True)
    if "pplrl/Tiger-v0" not in gym.registry:
        gym.register("pplrl/Tiger-v0", entry_point=TigerEnv, max_episode_steps=50)


__all__ = ["AgentView", "HEAR_LEFT", "HEAR_RIGHT", "LISTEN", "OPEN_LEFT", "OPEN_RIGHT", "POMDPSpec",
           "POMDP_ENV_IDS", "PartialObservation", "TigerEnv", "TigerPOMDP", "make_pomdp_env", "pomdp_spec",
           "register_pomdp_envs", "split_view"]
