"""MBPO: SAC on ensemble rollouts; its runs checkpoint and resume like SAC's."""

import numpy as np
import pytest
import torch
from experiments_loader import interrupted_and_resumed, records

from pplrl.algorithms import MBPO, default_config
from pplrl.runner import train

TINY = dict(hidden=(32, 32), batch_size=32, learning_starts=100, gradient_steps=1, model_train_freq=100,
            model_epochs=1, model_min_updates=0, ensemble_size=3, num_elites=2, model_hidden=(32, 32),
            rollout_batch_size=64, model_buffer_size=2000)


def tiny(**kw):
    return default_config("mbpo", **{**TINY, **kw})


def test_model_rollouts_fill_the_model_buffer_and_batches_mix():
    agent = MBPO(tiny(real_ratio=0.25), 3, 1)
    rng = np.random.default_rng(0)
    for _ in range(200):
        o = rng.normal(size=3).astype(np.float32)
        a = rng.uniform(-1, 1, 1).astype(np.float32)
        agent.observe(o, a, float(-o @ o), o + 0.1 * a.sum(), False)
    metrics = agent.update(200)
    assert len(agent.model_replay) == 64 and "model_holdout_mse" in metrics and np.isfinite(metrics["critic_loss"])
    assert sorted(agent.ensemble.elite_idx.tolist()) == sorted(agent.last_model_fit["elites"])
    batch = agent.sample_batch()
    assert batch.obs.shape == (32, 3)


def test_mbpo_resume_equals_uninterrupted(tmp_path):
    full = train("mbpo", tiny(), tmp_path / "full", 600, eval_every=200, eval_episodes=1, checkpoint_every=200,
                 progress=False)

    kept, resumed = interrupted_and_resumed("mbpo", tiny(), tmp_path / "cut", 600, eval_every=200,
                                            eval_episodes=1, checkpoint_every=200, progress=False)
    assert kept == 400  # the last checkpoint is kept
    for p1, p2 in zip(full.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(p1, p2)
    for p1, p2 in zip(full.ensemble.parameters(), resumed.ensemble.parameters()):
        assert torch.equal(p1, p2)
    assert records(tmp_path / "full" / "metrics.jsonl") == records(tmp_path / "cut" / "metrics.jsonl")


def test_mbpo_bad_input():
    with pytest.raises(ValueError, match="rollout length"):
        MBPO(tiny(rollout_length=0), 3, 1)
    with pytest.raises(ValueError, match="real_ratio"):
        MBPO(tiny(real_ratio=1.5), 3, 1)
    with pytest.raises(ValueError, match="model_min_logvar"):
        MBPO(tiny(model_min_logvar=1.0), 3, 1)


def test_model_min_logvar_reaches_both_ensembles():
    """The floor of the models' log-variance is a setting; VMBPO's q_d shares p_theta's."""
    from pplrl.algorithms import VMBPO

    assert torch.all(MBPO(tiny(), 3, 1).ensemble.min_logvar == -10.0)  # mbrl-lib's default
    shared = {k: v for k, v in TINY.items() if k not in ("rollout_batch_size", "model_buffer_size")}
    cfg = default_config("vmbpo", **{**shared, "model_min_logvar": -20.0})
    agent = VMBPO(cfg, 3, 1)
    for ens in (agent.ensemble, agent.q_dynamics):
        assert torch.all(ens.min_logvar == -20.0)


def test_vmbpo_holds_its_ensembles_and_no_model_buffer():
    """The VMBPO family holds p_theta and q_d as members; it has no rollout machinery
    (no model buffer to allocate or checkpoint), unlike MBPO."""
    from pplrl.algorithms import MBPO as _MBPO
    from pplrl.algorithms import VMBPO

    shared = {k: v for k, v in TINY.items() if k not in ("rollout_batch_size", "model_buffer_size")}
    agent = VMBPO(default_config("vmbpo", **shared), 3, 1)
    assert not isinstance(agent, _MBPO) and not hasattr(agent, "model_replay")
    assert "model_replay" not in agent.state_dict() and "ensemble" in agent.state_dict()
