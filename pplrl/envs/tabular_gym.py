"""Gymnasium environments over :class:`pplrl.tabular.TabularMDP` tables."""

from __future__ import annotations

import gymnasium as gym
from gymnasium import spaces

from pplrl.tabular import TabularMDP


class TabularEnv(gym.Env):
    """Samples a :class:`TabularMDP`. ``env.unwrapped.mdp`` gives the exact tables to
    the solvers. Reaching a terminal state ends the episode; ``max_episode_steps``
    (set at registration) truncates it."""

    metadata = {"render_modes": ["ansi"]}

    def __init__(self, mdp: TabularMDP, render_mode: str | None = None):
        self.mdp = mdp
        self.observation_space = spaces.Discrete(mdp.n_states)
        self.action_space = spaces.Discrete(mdp.n_actions)
        self.render_mode = render_mode
        self._state = None

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._state = int(self.np_random.choice(self.mdp.n_states, p=self.mdp.p0))
        return self._state, {}

    def step(self, action):
        if self._state is None:
            raise RuntimeError("call reset() before step()")
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not in {self.action_space}")
        s, a = self._state, int(action)
        s2 = int(self.np_random.choice(self.mdp.n_states, p=self.mdp.P[s, a]))
        reward = float(self.mdp.R[s, a, s2])
        self._state = s2
        return s2, reward, bool(self.mdp.terminal[s2]), False, {}

    def render(self):
        names = self.mdp.state_names
        return f"state {names[self._state] if names else self._state}"


def _make(factory_name: str):
    def make(**kwargs):
        from pplrl.envs import tabular_envs

        return TabularEnv(getattr(tabular_envs, factory_name)(**kwargs))

    return make


ENV_IDS = {
    "pplrl/RiskyArm-v0": ("risky_arm", 10),
    "pplrl/CliffGridworld-v0": ("cliff_gridworld", 100),
    "pplrl/VirelCounterexample-v0": ("virel_counterexample", 200),
}


def register_tabular_envs() -> None:
    for env_id, (factory, max_steps) in ENV_IDS.items():
        if env_id not in gym.registry:
            gym.register(env_id, entry_point=_make(factory), max_episode_steps=max_steps)
