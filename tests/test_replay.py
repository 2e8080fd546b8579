import numpy as np
import pytest
import torch

from pplrl.replay import Batch, ReplayBuffer, branched_rollouts, sample_mixed


def _transition(i, obs_dim=3, act_dim=2):
    """A transition whose every field encodes its index i."""
    return (np.full(obs_dim, i, dtype=np.float32), np.full(act_dim, -i, dtype=np.float32),
            float(i) / 2, np.full(obs_dim, i + 0.5, dtype=np.float32), i % 3 == 0)


def _filled(n, capacity, obs_dim=3, act_dim=2):
    buf = ReplayBuffer(obs_dim, act_dim, capacity)
    for i in range(n):
        buf.add(*_transition(i, obs_dim, act_dim))
    return buf


def test_add_and_all_round_trip():
    buf = _filled(5, capacity=10)
    assert len(buf) == 5
    b = buf.all()
    assert isinstance(b, Batch) and len(b) == 5
    for i in range(5):
        obs, act, rew, next_obs, term = _transition(i)
        assert torch.equal(b.obs[i], torch.from_numpy(obs))
        assert torch.equal(b.act[i], torch.from_numpy(act))
        assert b.rew[i].item() == rew
        assert torch.equal(b.next_obs[i], torch.from_numpy(next_obs))
        assert b.done[i].item() == float(term)
    assert all(t.dtype == torch.float32 for t in (b.obs, b.act, b.rew, b.next_obs, b.done))
    # the batch does not alias the storage
    b.obs[0] = 99.0
    assert buf.all().obs[0, 0].item() == 0.0


def test_ring_wraps_around_keeping_newest_in_order():
    buf = _filled(13, capacity=5)
    assert len(buf) == 5
    assert buf.all().obs[:, 0].tolist() == [8, 9, 10, 11, 12]
    # add_batch wrapping across the end of storage, and larger than the capacity
    buf.add_batch(*(np.stack(x) for x in zip(*(_transition(i) for i in range(13, 16)))))
    assert buf.all().obs[:, 0].tolist() == [11, 12, 13, 14, 15]
    buf.add_batch(*(np.stack(x) for x in zip(*(_transition(i) for i in range(20, 27)))))
    assert buf.all().obs[:, 0].tolist() == [22, 23, 24, 25, 26]
    assert buf.all().done.tolist() == [float(i % 3 == 0) for i in range(22, 27)]


def test_sample_shapes_and_contents():
    buf = _filled(7, capacity=10)
    b = buf.sample(64, np.random.default_rng(0))
    assert b.obs.shape == (64, 3) and b.next_obs.shape == (64, 3) and b.act.shape == (64, 2)
    assert b.rew.shape == (64,) and b.done.shape == (64,)
    idx = b.obs[:, 0]
    assert set(idx.tolist()) <= set(range(7))
    assert torch.equal(b.act[:, 0], -idx) and torch.equal(b.rew, idx / 2)
    assert torch.equal(b.done, (idx % 3 == 0).float())
    # same rng seed, same sample
    b2 = buf.sample(64, np.random.default_rng(0))
    assert torch.equal(b.obs, b2.obs)


def test_state_dict_round_trip_is_exact():
    rng = np.random.default_rng(1)
    buf = ReplayBuffer(4, 2, capacity=6)
    for _ in range(9):  # wrapped
        buf.add(rng.normal(size=4), rng.normal(size=2), rng.normal(), rng.normal(size=4), rng.random() < 0.3)
    state = buf.state_dict()
    other = ReplayBuffer(4, 2, capacity=6)
    other.load_state_dict(state)
    assert len(other) == len(buf)
    for k in ("obs", "act", "rew", "next_obs", "done"):
        assert np.array_equal(getattr(other, k), getattr(buf, k))
        assert torch.equal(getattr(other.all(), k), getattr(buf.all(), k))
    # both continue identically: same next write slot and same samples
    for b in (buf, other):
        b.add(np.ones(4), np.ones(2), 1.0, np.ones(4), False)
    assert torch.equal(buf.all().obs, other.all().obs)
    assert torch.equal(buf.sample(32, np.random.default_rng(3)).rew, other.sample(32, np.random.default_rng(3)).rew)
    # the state dict is a copy, and also loads from torch tensors (weights_only checkpoints)
    state["obs"][:] = 0.0
    assert not np.all(buf.obs == 0.0)
    tensors = {k: torch.from_numpy(v) if isinstance(v, np.ndarray) else v for k, v in buf.state_dict().items()}
    third = ReplayBuffer(4, 2, capacity=6)
    third.load_state_dict(tensors)
    assert torch.equal(third.all().next_obs, buf.all().next_obs)
    # partially filled buffers too
    part = _filled(3, capacity=6, obs_dim=4)
    fresh = ReplayBuffer(4, 2, capacity=6)
    fresh.load_state_dict(part.state_dict())
    assert len(fresh) == 3 and torch.equal(fresh.all().obs, part.all().obs)


def test_load_state_dict_rejects_mismatch():
    state = _filled(3, capacity=6).state_dict()
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(3, 2, capacity=7).load_state_dict(state)
    with pytest.raises(ValueError, match="obs_dim"):
        ReplayBuffer(4, 2, capacity=6).load_state_dict(state)
    bad = dict(state, obs=state["obs"][:2])
    with pytest.raises(ValueError, match="obs"):
        ReplayBuffer(3, 2, capacity=6).load_state_dict(bad)


def test_validation_errors():
    with pytest.raises(ValueError, match="capacity"):
        ReplayBuffer(3, 2, capacity=0)
    buf = ReplayBuffer(3, 2, capacity=4)
    with pytest.raises(ValueError, match="empty"):
        buf.sample(4, np.random.default_rng(0))
    with pytest.raises(ValueError, match="obs must have shape"):
        buf.add(np.zeros(4), np.zeros(2), 0.0, np.zeros(3), False)
    with pytest.raises(ValueError, match="act must have shape"):
        buf.add(np.zeros(3), np.zeros(3), 0.0, np.zeros(3), False)
    with pytest.raises(ValueError, match="next_obs.*non-finite"):
        buf.add(np.zeros(3), np.zeros(2), 0.0, np.array([0.0, np.nan, 0.0]), False)
    with pytest.raises(ValueError, match="rew.*non-finite"):
        buf.add(np.zeros(3), np.zeros(2), np.inf, np.zeros(3), False)
    with pytest.raises(ValueError, match="act.*non-finite"):
        buf.add_batch(np.zeros((2, 3)), np.array([[0, 0], [np.nan, 0]]), np.zeros(2), np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(ValueError, match="done"):
        buf.add_batch(np.zeros((2, 3)), np.zeros((2, 2)), np.zeros(2), np.zeros((2, 3)), np.array([0.0, 0.5]))
    assert len(buf) == 0  # nothing half-written
    with pytest.raises(ValueError, match="batch_size"):
        _filled(2, 4).sample(0, np.random.default_rng(0))


def test_sample_mixed_ratios():
    real = ReplayBuffer(1, 1, capacity=100)
    model = ReplayBuffer(1, 1, capacity=100)
    real.add_batch(np.ones((50, 1)), np.zeros((50, 1)), np.zeros(50), np.ones((50, 1)), np.zeros(50))
    rng = np.random.default_rng(0)
    # model buffer empty: all real
    b = sample_mixed(real, model, 40, real_ratio=0.25, rng=rng)
    assert len(b) == 40 and torch.all(b.obs == 1.0)
    model.add_batch(-np.ones((50, 1)), np.zeros((50, 1)), np.zeros(50), -np.ones((50, 1)), np.zeros(50))
    for ratio, n_real in ((0.25, 10), (0.05, 2), (0.0, 0), (1.0, 40)):
        b = sample_mixed(real, model, 40, real_ratio=ratio, rng=rng)
        assert len(b) == 40
        assert int((b.obs == 1.0).sum()) == n_real
        assert int((b.obs == -1.0).sum()) == 40 - n_real
    with pytest.raises(ValueError, match="real_ratio"):
        sample_mixed(real, model, 40, real_ratio=1.5, rng=rng)
    with pytest.raises(ValueError, match="obs_dim"):
        sample_mixed(real, ReplayBuffer(2, 1, 10), 40, real_ratio=0.5, rng=rng)


def _linear_model(obs, act):
    """x' = x + a (obs_dim = act_dim = 1 after padding), r = -x^2."""
    return obs + act, -(obs[:, 0] ** 2)


def test_branched_rollouts_toy_linear_model():
    start = np.array([[0.0], [10.0], [-3.0]], dtype=np.float32)
    out = branched_rollouts(start, lambda o: np.ones((len(o), 1)), _linear_model, length=4)
    assert set(out) == {"obs", "act", "rew", "next_obs", "done"}
    assert out["obs"].shape == (12, 1) and out["act"].shape == (12, 1) and out["rew"].shape == (12,)
    assert not out["done"].any()
    # step-major order: step t holds the 3 trajectories' states start + t
    np.testing.assert_array_equal(out["obs"][:, 0], np.concatenate([start[:, 0] + t for t in range(4)]))
    np.testing.assert_array_equal(out["next_obs"], out["obs"] + 1.0)
    np.testing.assert_array_equal(out["rew"], -(out["obs"][:, 0] ** 2))
    # directly storable
    buf = ReplayBuffer(1, 1, capacity=100)
    buf.add_batch(**out)
    assert len(buf) == 12


def test_branched_rollouts_stop_done_trajectories():
    start = np.array([[0.0], [2.0], [5.0]], dtype=np.float32)

    def term(obs, act, next_obs):
        return next_obs[:, 0] >= 4.0

    out = branched_rollouts(start, lambda o: np.ones((len(o), 1)), _linear_model, length=5, termination_fn=term)
    # trajectory from 5 ends at step 0, from 2 at step 1 (reaches 4), from 0 at step 3
    starts_seen = out["obs"][:, 0].tolist()
    assert starts_seen == [0.0, 2.0, 5.0, 1.0, 3.0, 2.0, 3.0]
    assert out["done"].tolist() == [False, False, True, False, True, False, True]
    # every trajectory done: the rollout stops early
    assert len(out["done"]) == 7


def test_branched_rollouts_errors():
    start = np.zeros((2, 1), dtype=np.float32)
    policy = lambda o: np.ones((len(o), 1))  # noqa: E731
    with pytest.raises(ValueError, match="length"):
        branched_rollouts(start, policy, _linear_model, length=0)
    with pytest.raises(ValueError, match="policy_fn"):
        branched_rollouts(start, lambda o: np.ones(len(o)), _linear_model, length=1)
    with pytest.raises(ValueError, match="next_obs.*non-finite"):
        branched_rollouts(start, policy, lambda o, a: (o * np.nan, o[:, 0]), length=1)
