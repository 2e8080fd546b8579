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

from dataclasses import dataclass

from pplrl.algorithms.model_based import EnsembleConfig, elite_holdout_mse, fit_on_replay, policy_rollouts
from pplrl.algorithms.sac import SAC, SACConfig
from pplrl.envs.continuous import termination_fn_for
from pplrl.replay import Batch, ReplayBuffer, sample_mixed


@dataclass
class MBPOConfig(EnsembleConfig, SACConfig):
    gradient_steps: int = 10
    """SAC updates per environment step (paper: 20)"""
    rollout_batch_size: int = 5000
    """start states per model rollout phase (paper: 100,000)"""
    rollout_length: int = 1
    real_ratio: float = 0.05
    model_buffer_size: int = 100_000

    def validate(self) -> None:
        super().validate()
        for name in ("rollout_batch_size", "model_buffer_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.rollout_length <= 0:
            raise ValueError(f"rollout length must be > 0, got {self.rollout_length}")
        if not 0.0 <= self.real_ratio <= 1.0:
            raise ValueError(f"real_ratio must lie in [0, 1], got {self.real_ratio}")


class MBPO(SAC):
    """SAC on a mix of real transitions and branched rollouts of the ensemble it holds."""

    algo = "mbpo"
    Config = MBPOConfig

    def __init__(self, config: MBPOConfig, obs_dim: int, act_dim: int):
        super().__init__(config, obs_dim, act_dim)
        self.ensemble = config.make_ensemble(obs_dim, act_dim, "mbpo.p_theta")
        self.model_replay = ReplayBuffer(obs_dim, act_dim, config.model_buffer_size)
        self.termination_fn = termination_fn_for(config.env_id)
        self.last_model_fit: dict = {}

    def sample_batch(self) -> Batch:
        return sample_mixed(self.replay, self.model_replay, self.config.batch_size, self.config.real_ratio, self.rng)

    def fit_model(self) -> dict:
        self.last_model_fit, _ = fit_on_replay(self.ensemble, self.replay, self.config, self.rng)
        return self.last_model_fit

    def rollout(self) -> int:
        c = self.config
        data = policy_rollouts(self.policy, lambda obs, act: self.ensemble.predict(obs, act)[:2], self.replay,
                               self.rng, c.rollout_batch_size, c.rollout_length, self.termination_fn)
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
            model_metrics = {"model_train_loss": info["train_loss"][-1], "model_holdout_mse": elite_holdout_mse(info),
                             "model_rollouts": n}
        metrics = super().update(step)
        return {**metrics, **model_metrics}

    def state_dict(self) -> dict:
        return {**super().state_dict(), "ensemble": self.ensemble.state_dict(),
                "ensemble_optim": self.ensemble.optimizer_state(), "model_replay": self.model_replay.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.ensemble.load_state_dict(state["ensemble"])
        self.ensemble.load_optimizer_state(state["ensemble_optim"])
        self.model_replay.load_state_dict(state["model_replay"])
