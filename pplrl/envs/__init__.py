"""Environments: the papers' tabular MDPs (registered with gymnasium on import)."""

from pplrl.envs.tabular_envs import cliff_gridworld, random_mdp, risky_arm, virel_counterexample
from pplrl.envs.tabular_gym import ENV_IDS, TabularEnv, register_tabular_envs

register_tabular_envs()

__all__ = ["ENV_IDS", "TabularEnv", "cliff_gridworld", "random_mdp", "risky_arm", "virel_counterexample"]
