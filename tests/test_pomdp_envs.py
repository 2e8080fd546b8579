"""POMDP environments: Tiger's exact belief, hidden-velocity and noisy wrappers, bad input."""

import gymnasium as gym
import numpy as np
import pytest

from pplrl.envs import make_continuous_env
from pplrl.envs.pomdp import (
    HEAR_LEFT,
    HEAR_RIGHT,
    LISTEN,
    OPEN_LEFT,
    AgentView,
    PartialObservation,
    TigerPOMDP,
    make_pomdp_env,
    pomdp_spec,
    split_view,
)


def test_tiger_belief_update_by_hand():
    pom = TigerPOMDP()
    b1 = pom.belief_update(pom.initial_belief(), LISTEN, HEAR_LEFT)
    np.testing.assert_allclose(b1, [0.85, 0.15])
    b2 = pom.belief_update(b1, LISTEN, HEAR_LEFT)
    np.testing.assert_allclose(b2[0], 0.85 ** 2 / (0.85 ** 2 + 0.15 ** 2))
    np.testing.assert_allclose(pom.belief_update(b2, LISTEN, HEAR_RIGHT), b1)  # opposite evidence cancels
    np.testing.assert_allclose(pom.belief_update(b2, OPEN_LEFT, HEAR_LEFT), [0.5, 0.5])  # opening resets
    bs = pom.beliefs([LISTEN] * 3, [HEAR_LEFT, HEAR_LEFT, HEAR_RIGHT])
    np.testing.assert_allclose(bs[-1], b1)


def test_tiger_env_samples_the_tables():
    env = gym.make("pplrl/Tiger-v0")
    obs, info = env.reset(seed=0)
    heard, n = 0, 2000
    for _ in range(n):
        o, r, term, trunc, info = env.step(LISTEN)
        assert r == -1.0 and not term
        heard += int(o == info["state"])
        if trunc:
            env.reset()
    assert abs(heard / n - 0.85) < 0.03
    _, r, term, _, info = env.step(OPEN_LEFT)
    assert term and r in (10.0, -100.0)
    with pytest.raises(ValueError):
        TigerPOMDP(accuracy=1.5)


def test_pendulum_without_velocity_view():
    base = gym.make("Pendulum-v1")
    env = make_continuous_env("pplrl/PendulumNoVel-v0")
    assert env.observation_space.shape == (4,)
    o_env, _ = env.reset(seed=3)
    o_base, _ = base.reset(seed=3)
    x, r, first = split_view(o_env)
    np.testing.assert_allclose(x, o_base[:2], rtol=1e-6)
    assert first and r == 0.0
    a = np.array([0.5], dtype=np.float32)
    o_env, rew, *_ = env.step(a)
    o_base, rew_base, *_ = base.step(2 * a)  # actions rescaled from [-1, 1]
    x, r, first = split_view(o_env)
    np.testing.assert_allclose(x, o_base[:2], rtol=1e-5)
    assert not first and r == pytest.approx(rew) and rew == pytest.approx(rew_base)
    assert pomdp_spec(env).hide == (2,) and pomdp_spec(env).x_dim == 2


def test_observation_noise_has_the_chosen_scale_and_is_seeded():
    env = make_pomdp_env("Pendulum-v1", noise=0.3)
    clean = PartialObservation(gym.make("Pendulum-v1"))
    diffs = []
    for seed in range(300):
        o, _ = env.reset(seed=seed)
        c, _ = clean.reset(seed=seed)
        diffs.append(o[:3] - c)
    assert np.std(diffs) == pytest.approx(0.3, rel=0.1)
    o1, _ = env.reset(seed=7)
    o2, _ = env.reset(seed=7)
    np.testing.assert_array_equal(o1, o2)
    noisy = gym.make("pplrl/POMDP-v0", base="Pendulum-v1", noise=0.1)
    assert pomdp_spec(noisy).noise == 0.1


def test_bad_input():
    with pytest.raises(ValueError, match=">= 0"):
        make_pomdp_env("Pendulum-v1", noise=-0.1)
    with pytest.raises(ValueError, match=">= 0"):
        PartialObservation(gym.make("Pendulum-v1"), noise=-1.0)
    with pytest.raises(ValueError, match="every"):
        PartialObservation(gym.make("Pendulum-v1"), hide=(0, 1, 2))
    with pytest.raises(ValueError, match="cannot hide"):
        PartialObservation(gym.make("Pendulum-v1"), hide=(5,))
    with pytest.raises(ValueError, match="fully observed"):
        pomdp_spec(make_continuous_env("Pendulum-v1"))
    with pytest.raises(ValueError, match="fully observed"):  # wrapped, but nothing hidden or noisy
        pomdp_spec(AgentView(PartialObservation(gym.make("Pendulum-v1"))))
    with pytest.raises(ValueError):
        TigerPOMDP().belief_update([0.5, 0.6], LISTEN, HEAR_LEFT)


class _GridObservation(gym.Env):
    """Continuous actions, a 2-D (image-like) Box observation: not a flat vector."""
    observation_space = gym.spaces.Box(-1.0, 1.0, (2, 2), dtype=np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), dtype=np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros((2, 2), np.float32), {}

    def step(self, action):
        return np.zeros((2, 2), np.float32), 0.0, False, False, {}


def test_a_pomdp_without_a_flat_box_observation_gets_one_clear_line(tmp_path, capsys):
    from pplrl.cli import main

    gym.register("pplrl-test/GridObservation-v0", entry_point=_GridObservation, max_episode_steps=5)
    with pytest.raises(ValueError, match="needs a 1-D Box observation space"):
        make_continuous_env("pplrl-test/GridObservation-v0")
    rc = main(["train", "generative-agent", "--env", "pplrl-test/GridObservation-v0", "--steps", "10",
               "--out", str(tmp_path / "g"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "1-D Box observation space" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "g").exists()  # nothing written for a run that cannot start
