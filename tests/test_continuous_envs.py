import gymnasium as gym
import numpy as np
import pytest
from gymnasium import spaces

from pplrl.envs.continuous import FiniteObservation, env_dims, make_continuous_env, termination_fn_for


class _BlowsUp(gym.Env):
    """A 2-D continuous env whose observation (or reward) turns NaN at step ``bad_step``.
    The NaN comes after the first step so gymnasium's passive checker (which inspects only
    the first reset and step) does not warn about it first."""

    def __init__(self, bad_step: int = 3, bad: str = "obs"):
        self.observation_space = spaces.Box(-np.inf, np.inf, shape=(2,), dtype=np.float64)
        self.action_space = spaces.Box(-5.0, 5.0, shape=(1,), dtype=np.float32)
        self.bad_step, self.bad, self.t = bad_step, bad, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.zeros(2), {}

    def step(self, action):
        self.t += 1
        obs = np.full(2, float(action[0]))
        reward = 0.0
        if self.t == self.bad_step:
            if self.bad == "obs":
                obs[1] = np.nan
            else:
                reward = float("inf")
        return obs, reward, False, False, {}


_TEST_ID = "pplrl_test/BlowsUp-v0"
if _TEST_ID not in gym.registry:
    gym.register(_TEST_ID, entry_point=_BlowsUp, max_episode_steps=50)


def test_pendulum_actions_in_unit_box_map_to_torque_bounds():
    env = make_continuous_env("Pendulum-v1", seed=0)
    assert env.action_space.low.tolist() == [-1.0] and env.action_space.high.tolist() == [1.0]
    assert env_dims(env) == (3, 1)
    env.reset(seed=0)
    for a, torque in ((1.0, 2.0), (-1.0, -2.0), (0.5, 1.0), (0.0, 0.0)):
        env.step(np.array([a], dtype=np.float32))
        assert env.unwrapped.last_u == pytest.approx(torque)
    env.close()


def test_seed_makes_resets_reproducible():
    obs = [make_continuous_env("Pendulum-v1", seed=7).reset()[0] for _ in range(2)]
    np.testing.assert_array_equal(obs[0], obs[1])


def test_mountain_car_continuous_makes():
    env = make_continuous_env("MountainCarContinuous-v0", seed=0)
    assert env_dims(env) == (2, 1)
    obs, *_ = env.step(env.action_space.sample())
    assert obs.shape == (2,)


def test_unknown_id_suggests_close_matches():
    with pytest.raises(ValueError, match=r"unknown environment id 'Hoper-v5'.*did you mean.*'Hopper-v5'"):
        make_continuous_env("Hoper-v5")
    with pytest.raises(ValueError, match=r"unknown environment id 'NoSuchThing-v0'$"):
        make_continuous_env("NoSuchThing-v0")


def test_discrete_actions_rejected():
    with pytest.raises(ValueError, match=r"Discrete\(2\).*continuous actions"):
        make_continuous_env("CartPole-v1")
    with pytest.raises(ValueError, match="continuous actions"):
        make_continuous_env("pplrl/RiskyArm-v0")


def test_non_finite_observation_raises():
    env = make_continuous_env(_TEST_ID, seed=0)
    assert isinstance(env, FiniteObservation)
    env.step(np.array([1.0]))
    env.step(np.array([1.0]))
    with pytest.raises(FloatingPointError, match=r"'pplrl_test/BlowsUp-v0'.*observation at step 3"):
        env.step(np.array([1.0]))


def test_non_finite_reward_and_action_raise():
    env = make_continuous_env(_TEST_ID, seed=0, bad_step=2, bad="reward")
    env.step(np.array([0.0]))
    with pytest.raises(FloatingPointError, match="reward at step 2"):
        env.step(np.array([0.0]))
    env.reset()
    with pytest.raises(FloatingPointError, match="action at step 1"):
        env.step(np.array([np.nan]))


def test_custom_env_action_rescaling():
    env = make_continuous_env(_TEST_ID, seed=0, bad_step=-1)
    obs, *_ = env.step(np.array([1.0], dtype=np.float32))
    np.testing.assert_allclose(obs, [5.0, 5.0])  # action 1 -> upper bound 5
    obs, *_ = env.step(np.array([-0.5], dtype=np.float32))
    np.testing.assert_allclose(obs, [-2.5, -2.5])


def test_hopper_makes_and_steps():
    env = make_continuous_env("Hopper-v5", seed=0)
    assert env_dims(env) == (11, 3)
    assert np.all(env.action_space.low == -1.0) and np.all(env.action_space.high == 1.0)
    obs, _ = env.reset()
    obs2, reward, terminated, truncated, _ = env.step(env.action_space.sample())
    assert obs2.shape == (11,) and np.isfinite(reward)
    env.close()


def _check_agreement(env_id, episodes, max_steps, seed=0, **kwargs):
    """Random-action rollouts: termination_fn_for(env_id) must reproduce `terminated`."""
    env = make_continuous_env(env_id, seed=seed, **kwargs)
    fn = termination_fn_for(env_id, **kwargs)
    n_terminated = 0
    for ep in range(episodes):
        obs, _ = env.reset(seed=seed + ep)
        for _ in range(max_steps):
            act = env.action_space.sample()
            next_obs, _, terminated, truncated, _ = env.step(act)
            assert bool(fn(obs, act, next_obs)) == terminated
            # batched call agrees as well
            both = fn(np.stack([obs, obs]), np.stack([act, act]), np.stack([next_obs, next_obs]))
            assert both.tolist() == [terminated] * 2
            n_terminated += terminated
            if terminated or truncated:
                break
            obs = next_obs
    env.close()
    return n_terminated


def test_hopper_termination_fn_agrees_with_env():
    assert _check_agreement("Hopper-v5", episodes=5, max_steps=1000) == 5  # random Hopper falls


@pytest.mark.parametrize("env_id", ["Walker2d-v5", "InvertedPendulum-v5", "InvertedDoublePendulum-v5"])
def test_other_termination_fns_agree_with_env(env_id):
    assert _check_agreement(env_id, episodes=3, max_steps=1000) == 3


@pytest.mark.parametrize("env_id", ["Ant-v5", "Humanoid-v5"])
def test_termination_fns_agree_short(env_id):
    _check_agreement(env_id, episodes=2, max_steps=200)


def test_termination_fn_kwargs_and_unknown_ids():
    for env_id in ("Pendulum-v1", "HalfCheetah-v5", "Swimmer-v5", "Reacher-v5"):
        assert termination_fn_for(env_id) is None
    assert termination_fn_for("Hopper-v5", terminate_when_unhealthy=False) is None
    # a custom healthy range is honoured
    fn = termination_fn_for("Hopper-v5", healthy_z_range=(0.0, float("inf")))
    next_obs = np.zeros(11)
    next_obs[0] = 0.5
    assert not fn(None, None, next_obs) and termination_fn_for("Hopper-v5")(None, None, next_obs)
    with pytest.raises(ValueError, match="exclude_current_positions_from_observation"):
        termination_fn_for("Hopper-v5", exclude_current_positions_from_observation=False)
    with pytest.raises(ValueError, match="no termination function known for 'CartPole-v1'"):
        termination_fn_for("CartPole-v1")
    with pytest.raises(ValueError, match="no termination function known"):
        termination_fn_for("Hopper-v9")
