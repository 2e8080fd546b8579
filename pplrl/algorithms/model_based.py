"""What the model-based agents share: the settings of the prior dynamics p_theta (a
:class:`models.dynamics.GaussianEnsemble`, beta-VMBPO eq. 10) and its fit on the real
replay. MBPO and the VMBPO family each *hold* such an ensemble; neither inherits the
other's machinery."""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from models.dynamics import MAX_LOGVAR, MIN_LOGVAR, GaussianEnsemble
from pplrl.replay import ReplayBuffer, branched_rollouts

#: distinct Pyro names for the ensembles of every agent in a process
_names = itertools.count()


@dataclass
class EnsembleConfig:
    """Settings of p_theta and its fits (beta-VMBPO App. C.2 where a CPU budget allows)."""

    model_train_freq: int = 250
    """environment steps between model fits"""
    model_epochs: int = 5
    model_min_updates: int = 400
    """at least this many SVI steps per model fit: 5 epochs of a small early buffer are a few
    dozen steps and leave the model badly underfit; mbrl-lib's MBPO trains to hold-out
    convergence instead"""
    model_lr: float = 1e-3
    """Adam's learning rate in the model fits (mbrl-lib's MBPO configuration; both VMBPO
    papers: 3e-4, the paper preset)"""
    ensemble_size: int = 7
    num_elites: int = 5
    model_hidden: tuple[int, ...] = (200, 200, 200, 200)
    model_min_logvar: float = MIN_LOGVAR
    """initial lower bound of the models' log-variance (mbrl-lib's -10: a std floor of
    e^-5 = 6.7e-3 on each target [s' - s, r], which are not rescaled); lower it where a state
    changes by less than that per step (Mountain Car's velocity: ~1.7e-3)"""

    def validate(self) -> None:
        super().validate()
        for name in ("model_train_freq", "model_epochs", "model_lr"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.model_min_updates < 0:
            raise ValueError(f"model_min_updates must be >= 0, got {self.model_min_updates}")
        if not self.model_min_logvar < MAX_LOGVAR:
            raise ValueError(f"model_min_logvar must be < {MAX_LOGVAR} (the upper bound), got {self.model_min_logvar}")

    def fit_epochs(self, n: int, min_updates: int | None = None, min_epochs: int | None = None) -> int:
        """Epochs for a fit on ``n`` transitions: ``min_epochs`` (model_epochs), or more to reach
        ``min_updates`` SVI steps (model_min_updates) at batch 256 on the 80 % training split."""
        steps_per_epoch = max(1, math.ceil(0.8 * n / 256))
        min_updates = self.model_min_updates if min_updates is None else min_updates
        return max(self.model_epochs if min_epochs is None else min_epochs, math.ceil(min_updates / steps_per_epoch))

    def make_ensemble(self, obs_dim: int, act_dim: int, role: str) -> GaussianEnsemble:
        """A fresh ensemble of these settings, named ``<role><n>`` (unique in the process)."""
        return GaussianEnsemble(obs_dim, act_dim, ensemble_size=self.ensemble_size, num_elites=self.num_elites,
                                hidden=self.model_hidden, min_logvar=self.model_min_logvar,
                                name=f"{role}{next(_names)}")


def fit_on_replay(ensemble: GaussianEnsemble, replay: ReplayBuffer, config: EnsembleConfig,
                  rng: np.random.Generator, elite_score: str = "mse") -> tuple[dict, int]:
    """Fit ``ensemble`` by eq. (10) on every real transition; returns the fit's report and
    the seed of its split and bootstrap (drawn from the agent's ``rng``). ``elite_score``:
    :meth:`models.dynamics.GaussianEnsemble.fit`'s."""
    data = replay.all()
    seed = int(rng.integers(2**31))
    info = ensemble.fit(data.obs, data.act, data.next_obs, data.rew, epochs=config.fit_epochs(len(data)), seed=seed,
                        lr=config.model_lr, elite_score=elite_score)
    return info, seed


def policy_rollouts(policy, model_step, replay: ReplayBuffer, rng: np.random.Generator, count: int, length: int,
                    termination_fn) -> dict:
    """``count`` start states drawn from ``replay``, rolled ``length`` steps with ``policy``'s
    sampled actions through ``model_step(obs, act) -> (next_obs, reward)`` (tensors), stopped
    by ``termination_fn`` (:func:`pplrl.replay.branched_rollouts`): the arrays a model buffer's
    ``add_batch`` takes. MBPO's branched rollouts and beta-VMBPO's model buffer."""
    start = replay.sample(count, rng).obs.cpu().numpy()

    def policy_fn(obs):
        return policy.act(torch.as_tensor(obs)).cpu().numpy()

    def step(obs, act):
        next_obs, rew = model_step(torch.as_tensor(obs), torch.as_tensor(act))
        return next_obs.cpu().numpy(), rew.cpu().numpy()

    return branched_rollouts(start, policy_fn, step, length, termination_fn)


def elite_holdout_mse(info: dict) -> float:
    """The elites' mean hold-out MSE of a fit report."""
    return float(np.mean([info["holdout_mse"][i] for i in info["elites"]]))


__all__ = ["EnsembleConfig", "elite_holdout_mse", "fit_on_replay", "policy_rollouts"]
