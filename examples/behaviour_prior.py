"""A KL-regularised actor against a learned behaviour prior: pi is fitted to the replay's
actions (behaviour cloning) and by the ELBO, the temperature by a dual on KL(q || pi).

    pplrl train behaviour-prior --plugin examples/behaviour_prior.py --env Pendulum-v1
"""

from dataclasses import dataclass

import pyro

from guides.continuous import GaussianPolicy
from models.sites import optimality, sample
from pplrl.algorithms import register
from pplrl.algorithms.off_policy import ActorCritic, ActorCriticConfig, Dual


def model(obs, prior, critic, scale, policy=None):
    """a ~ pi(.|x), the behaviour prior; p(O = 1 | x, a) = exp(scale * Q(x, a))."""
    with pyro.plate("states", obs.shape[0]):
        a = sample("a", 0, prior(obs), term="kl_behaviour")
        optimality(0, critic(obs, a), scale)


def guide(obs, prior, critic, scale, policy=None):
    """a ~ q(.|x), the policy."""
    with pyro.plate("states", obs.shape[0]):
        sample("a", 0, policy(obs), term="kl_behaviour")


@dataclass
class BehaviourPriorConfig(ActorCriticConfig):
    kl_target: float = 1.0
    """KL(q || pi) per state, in nats, that the temperature's dual aims at"""


@register("behaviour-prior")
class BehaviourPrior(ActorCritic):
    Config = BehaviourPriorConfig
    model, guide = staticmethod(model), staticmethod(guide)

    def make_prior(self):
        return GaussianPolicy(self.obs_dim, self.act_dim, -1.0, 1.0, self.config.hidden)

    def temperature(self):
        return Dual("kl_behaviour", self.config.kl_target)

    def prior_loss(self, batch):
        """Behaviour cloning: -E_D[log pi(a|x)] on the replay's actions."""
        return -self.prior(batch.obs).log_prob(batch.act).mean()
