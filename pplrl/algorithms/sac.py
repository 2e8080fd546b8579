"""Soft actor-critic as the MaxEnt special case of the RL-as-inference ELBO.

SAC is the default :class:`pplrl.algorithms.off_policy.ActorCritic`: the model
:func:`models.actor.actor_model` with the improper uniform prior and optimality factor
Q(x, a)/alpha, the guide :func:`guides.actor.actor_guide`; the actor loss
-alpha * ELBO / B = E[alpha log q - Q] (Haarnoja et al. 2018), the critic target's soft
value E_q[Q' - alpha log q] and the dual on alpha towards the target entropy -|A| are
all derived from that pair. The variational dynamics are pinned to the real dynamics
(the critic is trained on real transitions), which is what makes this MaxEnt RL rather
than VMBPO (beta-VMBPO paper, Sec. 3.1).

Loop shape and defaults follow CleanRL's ``sac_continuous_action.py`` and
stable-baselines3's SAC (lr 3e-4, batch 256, tau 0.005, gamma 0.99, 256x256 MLPs).
"""

from __future__ import annotations

from dataclasses import dataclass

from pplrl.algorithms.off_policy import ActorCritic, ActorCriticConfig, Dual


@dataclass
class SACConfig(ActorCriticConfig):
    target_entropy: float | None = None
    """None means -action_dim"""


class SAC(ActorCritic):
    algo = "sac"
    Config = SACConfig

    @property
    def target_entropy(self) -> float:
        return -float(self.act_dim) if self.config.target_entropy is None else self.config.target_entropy

    def temperature(self) -> Dual | None:
        """A dual on the policy KL (flat prior: E[log q]) with target -target_entropy."""
        return Dual("kl_policy", -self.target_entropy) if self.config.autotune_alpha else None
