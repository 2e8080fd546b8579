"""Environments: the papers' tabular MDPs (registered with gymnasium on import) and
continuous-control environments by gymnasium id (actions rescaled to [-1, 1])."""

from pplrl.envs.continuous import FiniteObservation, env_dims, make_continuous_env, termination_fn_for
from pplrl.envs.pomdp import (
    AgentView,
    PartialObservation,
    TigerEnv,
    TigerPOMDP,
    make_pomdp_env,
    pomdp_spec,
    register_pomdp_envs,
)
from pplrl.envs.tabular_envs import cliff_gridworld, random_mdp, risky_arm, virel_counterexample
from pplrl.envs.tabular_gym import ENV_IDS, TabularEnv, register_tabular_envs

register_tabular_envs()
register_pomdp_envs()

__all__ = ["AgentView", "PartialObservation", "TigerEnv", "TigerPOMDP", "make_pomdp_env", "pomdp_spec", "ENV_IDS",
           "FiniteObservation", "TabularEnv", "env_dims", "make_continuous_env", "termination_fn_for",
           "cliff_gridworld", "random_mdp", "risky_arm", "virel_counterexample"]
