"""MBPO-style baseline: the same SAC, trained on branched rollouts of a learned
probabilistic dynamics ensemble (Janner et al. 2019).

The ensemble is the Pyro model of prior dynamics p_theta (beta-VMBPO eq. 10, see
:class:`models.dynamics.GaussianEnsemble`), fitted by SVI every ``model_train_freq``
environment steps on all real data; then ``rollout_batch_size`` states drawn from
the real buffer are rolled ``rollout_length`` steps with the current policy through
random elite members into the model buffer; SAC updates draw ``real_ratio`` of each
batch from real data and the rest from model data.

Defaults follow the beta-VMBPO paper's App. C.2 where a CPU budget allows (ensemble
7 x 4x200, 5 elites, rollout length 1, 5 model epochs, model every 250 steps); the
paper's 100,000 rollouts and 20 updates per step are scaled down (5,000 and 10) so
a Pendulum run fits on two cores; override them with ``--set``.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from pplrl.algorithms.sac import SAC, SACConfig
from models.dynamics import MAX_LOGVAR, MIN_LOGVAR, GaussianEnsemble
from pplrl.envs.continuous import termination_fn_for
from pplrl.replay import Batch, ReplayBuffer, branched_rollouts, sample_mixed

_names = itertools.count()


@dataclass
class MBPOConfig(SACConfig):
    gradient_steps: int = 10
    """SAC updates per environment step (paper: 20)"""
    model_train_freq: int = 250
    model_epochs: int = 5
    model_min_updates: int = 400
    """at least this many SVI steps per model fit: 5 epochs of a small early buffer are
    a few dozen steps and leave the model badly underfit (measured: reward RMSE 1.5 vs
    0.19 on Pendulum); mbrl-lib's MBPO trains to hold-out convergence instead"""
    ensemble_size: int = 7
    num_elites: int = 5
    model_hidden: tuple[int, ...] = (200, 200, 200, 200)
    rollout_batch_size: int = 5000
    """start states per model rollout phase (paper: 100,000)"""
    rollout_length: int = 1
    real_ratio: float = 0.05
    model_buffer_size: int = 100_000
    model_min_logvar: float = MIN_LOGVAR
    """initial lower bound of the models' log-variance (mbrl-lib's -10: a std floor of
    e^-5 = 6.7e-3 on each target [s' - s, r], which are not rescaled). Lower it where a state
    changes by less than that per step: Mountain Car's velocity changes by ~1.7e-3, and
    with -10 the fitted p_theta's velocity change was off by +2.4e-3 on average
    (``experiments/mountain_car_optimism.py`` uses -20)"""

    def validate(self) -> None:
        super().validate()
        for name in ("model_train_freq", "model_epochs", "rollout_batch_size", "model_buffer_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.model_min_updates < 0:
            raise ValueError(f"model_min_updates must be >= 0, got {self.model_min_updates}")
        if self.rollout_length <= 0:
            raise ValueError(f"rollout length must be > 0, got {self.rollout_length}")
        if not self.model_min_logvar < MAX_LOGVAR:
            raise ValueError(f"model_min_logvar must be < {MAX_LOGVAR} (the upper bound), got {self.model_min_logvar}")
        if not 0.0 <= self.real_ratio <= 1.0:
            raise ValueError(f"real_ratio must lie in [0, 1], got {self.real_ratio}")


class MBPO(SAC):
    algo = "mbpo"
    Config = MBPOConfig

    def __init__(self, config: MBPOConfig, obs_dim: int, act_dim: int):
        super().__init__(config, obs_dim, act_dim)
        self.ensemble = GaussianEnsemble(obs_dim, act_dim, ensemble_size=config.ensemble_size,
                                         num_elites=config.num_elites, hidden=config.model_hidden,
                                         min_logvar=config.model_min_logvar, name=f"mbpo{next(_names)}.dynamics")
        self.model_replay = ReplayBuffer(obs_dim, act_dim, config.model_buffer_size)
        self.termination_fn = termination_fn_for(config.env_id)
        self.last_model_fit: dict = {}
        self.last_model_seed: int | None = None

    def sample_batch(self) -> Batch:
        return sample_mixed(self.replay, self.model_replay, self.config.batch_size, self.config.real_ratio, self.rng)

    def model_epochs(self, n: int, min_updates: int | None = None, min_epochs: int | None = None) -> int:
        """Epochs for a fit on ``n`` transitions: ``min_epochs`` (model_epochs), or more to reach
        ``min_updates`` SVI steps (model_min_updates)."""
        c = self.config
        steps_per_epoch = max(1, math.ceil(0.8 * n / 256))
        min_updates = c.model_min_updates if min_updates is None else min_updates
        return max(c.model_epochs if min_epochs is None else min_epochs, math.ceil(min_updates / steps_per_epoch))

    def fit_model(self) -> dict:
        data = self.replay.all()
        self.last_model_seed = int(self.rng.integers(2**31))  # split and bootstrap of this fit
        info = self.ensemble.fit(data.obs, data.act, data.next_obs, data.rew, epochs=self.model_epochs(len(data)),
                                 seed=self.last_model_seed)
        self.last_model_fit = info
        return info

    def rollout(self) -> int:
        start = self.replay.sample(self.config.rollout_batch_size, self.rng).obs.numpy()

        def policy_fn(obs):
            return self.policy.act(torch.as_tensor(obs)).numpy()

        def model_step(obs, act):
            next_obs, rew, _ = self.ensemble.predict(torch.as_tensor(obs), torch.as_tensor(act))
            return next_obs.numpy(), rew.numpy()

        data = branched_rollouts(start, policy_fn, model_step, self.config.rollout_length, self.termination_fn)
        self.model_replay.add_batch(**data)
        return len(data["obs"])

    def update(self, step: int) -> dict[str, float]:
        c = self.config
        if self.steps_seen < max(c.learning_starts, c.batch_size):
            return {}
        model_metrics = {}
        if step % c.model_train_freq == 0 or len(self.model_replay) == 0:
            info = self.fit_model()
            n = self.rollout()
            elite_mse = float(np.mean([info["holdout_mse"][i] for i in info["elites"]]))
            model_metrics = {"model_train_loss": info["train_loss"][-1], "model_holdout_mse": elite_mse,
                             "model_rollouts": n}
        metrics = super().update(step)
        return {**metrics, **model_metrics}

    def state_dict(self) -> dict:
        state = super().state_dict()
        optim = self.ensemble._optim  # (key, torch optimiser) under module_local_params
        state.update({"ensemble": self.ensemble.state_dict(), "model_replay": self.model_replay.state_dict(),
                      "ensemble_optim": None if optim is None else (optim[0], optim[1].state_dict())})
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ensemble.load_state_dict(state["ensemble"])
        self.model_replay.load_state_dict(state["model_replay"])
        if state["ensemble_optim"] is not None:
            key, optim_state = state["ensemble_optim"]
            self.ensemble._step_function(key[1], key[2])  # creates the optimiser for that setting
            self.ensemble._optim[1].load_state_dict(optim_state)
