"""The CEM planner of eq. (10) on Pendulum with the true dynamics as the agent's model:
with a 12-step horizon it swings the pendulum up, with 6 steps it does not (slow, ~20 s: run
with ``pytest -m slow``); with action repeat 4 (one model step = 4 env steps, the agents'
default) 6 steps suffice (their default horizon)."""

import gymnasium as gym
import numpy as np
import pyro.distributions as dist
import pytest
import torch

from pplrl.pomdp_planning import CEMPlanner, PlannerConfig


class TruePendulum:
    """z = (theta, thetadot, r): gymnasium's Pendulum-v1 step (g = 10, m = l = 1, dt = 0.05,
    torque 2a), r the reward of the transition into z; x = (cos, sin) with small noise."""

    generative = True

    def __init__(self, repeat: int = 1):
        self.emitter = self._Emitter()
        self.repeat = repeat

    class _Emitter:
        def __call__(self, z):
            x = torch.stack([torch.cos(z[..., 0]), torch.sin(z[..., 0])], -1)
            return dist.Normal(x, 0.05).to_event(1), dist.Normal(z[..., 2], 0.1)

        def log_prob(self, z, x, r):
            px, pr = self(z)
            return px.log_prob(x) + pr.log_prob(r)

    def transition(self, z, a):
        """``repeat`` env steps under the action a (action repeat), r the sum of their rewards."""
        th, thd, u, r = z[..., 0], z[..., 1], 2 * a[..., 0].clamp(-1, 1), 0.0
        for _ in range(self.repeat):
            r = r - ((((th + np.pi) % (2 * np.pi)) - np.pi) ** 2 + 0.1 * thd ** 2 + 0.001 * u ** 2)
            thd = (thd + (15.0 * torch.sin(th) + 3.0 * u) * 0.05).clamp(-8, 8)
            th = th + thd * 0.05
        return dist.Normal(torch.stack([th, thd, r], -1), 0.01).to_event(1)

    def action_prior(self, z):
        return dist.Normal(torch.zeros(*z.shape[:-1], 1), 1.0).to_event(1)


def episode_return(horizon: int, seed: int, repeat: int = 1, action_hold: int = 1) -> float:
    planner = CEMPlanner(PlannerConfig(horizon=horizon, candidates=32, elites=4, iterations=2, particles=1,
                                       info_gain=False, action_hold=action_hold))
    env = gym.make("Pendulum-v1")
    env.reset(seed=seed)
    model, total = TruePendulum(repeat), 0.0
    for _ in range(200 // repeat):
        th, thd = env.unwrapped.state
        loc, _, _ = planner.plan(model, torch.tensor([[th, thd, 0.0]], dtype=torch.float32))
        for _ in range(repeat):
            total += float(env.step(2 * loc.numpy())[1])
    return total


@pytest.mark.slow
def test_planner_swings_up_pendulum_with_the_true_model():
    torch.manual_seed(0)
    assert episode_return(12, seed=1) > -400  # measured -128
    assert episode_return(6, seed=1) < -700  # myopic: measured about -1100


def test_planner_swings_up_pendulum_with_action_repeat_4_and_horizon_6():
    """One model step = 4 env steps: horizon 6 (24 env steps) swings up (measured -2 and
    -119 on seeds 1, 2; horizon 4 also does, -1 / -124), at a quarter of the decisions."""
    torch.manual_seed(0)
    assert episode_return(6, seed=1, repeat=4) > -400
