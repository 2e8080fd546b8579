"""The algorithms pplrl trains, by CLI name; more come from plugins (:mod:`pplrl.plugins`)."""

from __future__ import annotations

from pplrl.algorithms.base import Agent, apply_overrides, with_preset
from pplrl.algorithms.generative_agent import DiscriminativeAgent, GenerativeAgent
from pplrl.algorithms.mbpo import MBPO, MBPOConfig
from pplrl.algorithms.memb import MEMB
from pplrl.algorithms.sac import SAC, SACConfig
from pplrl.algorithms.virel import VIREL, VIRELBeta
from pplrl.algorithms.vmbpo import VMBPO, VMBPOMFE, BetaVMBPO
from pplrl.plugins import ALGORITHMS, agent_class, register, resolve

for _shipped in (SAC, MBPO, VMBPO, VMBPOMFE, BetaVMBPO, VIREL, VIRELBeta, MEMB, GenerativeAgent, DiscriminativeAgent):
    ALGORITHMS.setdefault(_shipped.algo, _shipped)
del _shipped


def make_agent(algo: str | type[Agent], config, obs_dim: int, act_dim: int) -> Agent:
    """An agent of ``algo`` (a registered name, see :func:`pplrl.plugins.resolve`, or an Agent class)."""
    return agent_class(algo)(config, obs_dim, act_dim)


def default_config(algo: str | type[Agent], **overrides):
    """The algorithm's config: its defaults, then the paper's per-environment settings
    where the config class has them (``Config.env_defaults(env_id)``), then ``overrides``."""
    import dataclasses

    cls = agent_class(algo).Config
    config = cls()
    env_defaults = getattr(cls, "env_defaults", None)
    if env_defaults is not None:
        config = dataclasses.replace(config, **env_defaults(overrides.get("env_id", config.env_id)))
    if "preset" in overrides:  # the preset's settings first, the other overrides over them
        overrides = dict(overrides)
        config = with_preset(config, overrides.pop("preset"))
    return dataclasses.replace(config, **overrides)


__all__ = ["ALGORITHMS", "Agent", "BetaVMBPO", "DiscriminativeAgent", "GenerativeAgent", "MBPO", "VMBPO", "VMBPOMFE",
           "MEMB", "VIREL", "VIRELBeta", "MBPOConfig", "SAC", "SACConfig", "apply_overrides", "default_config",
           "make_agent", "register", "resolve", "with_preset"]
