"""pplrl/LightDark-v0 (Platt et al. 2010): the registered POMDP, its noise field, and that
going to the light pays (scripted belief-space baselines)."""

import gymnasium as gym
import numpy as np
import pytest

import pplrl.envs  # noqa: F401  (registers the ids)
from pplrl.envs import make_continuous_env, pomdp_spec
from pplrl.envs.light_dark import LightDarkBelief, LightDarkEnv, scripted_episode, scripted_return
from pplrl.envs.pomdp import split_view


def test_registered_id_is_a_pomdp_with_the_agent_view():
    env = make_continuous_env("pplrl/LightDark-v0")
    spec = pomdp_spec(env)
    assert spec.x_dim == 2
    obs, _ = env.reset(seed=3)
    x, r, first = split_view(obs)
    assert x.shape == (2,) and r == 0.0 and first
    steps = 0
    while True:
        obs, rew, term, trunc, _ = env.step(np.zeros(2, np.float32))
        steps += 1
        assert split_view(obs)[1] == pytest.approx(rew) and not term
        if trunc:
            break
    assert steps == 30


def test_observation_noise_is_small_only_in_the_light():
    env = LightDarkEnv()
    env.reset(seed=0)
    for px, expect in ((4.0, 0.05), (3.0, 0.55), (2.0, 2.05), (0.0, 4.0)):
        env.p = np.array([px, 1.0])
        xs = np.array([env._observe() for _ in range(4000)])
        assert xs.std(0).mean() == pytest.approx(expect, rel=0.06)
        assert float(env.sigma(env.p)) == pytest.approx(expect)


def test_belief_filter_localises_in_the_light_and_not_in_the_dark():
    env = LightDarkEnv()
    b = LightDarkBelief(env)
    b.mean = np.array([4.0, 2.0])
    for _ in range(3):
        b.update(np.array([4.0, 2.0]))
    assert np.sqrt(b.var) < 0.05
    b = LightDarkBelief(env)
    b.mean = np.array([0.0, 0.0])
    for _ in range(3):
        b.update(np.zeros(2))
    assert np.sqrt(b.var) > 0.8


def test_going_to_the_light_pays():
    """200 seeded episodes each: the light-seeking scripted policy earns far more than the
    direct one (measured 11.44 +- 0.59 vs 0.15 +- 0.41), and it visits the light."""
    light, light_se = scripted_return("light")
    direct, direct_se = scripted_return("direct")
    print(f"\nlight {light:.2f} +- {light_se:.2f}   direct {direct:.2f} +- {direct_se:.2f}")
    assert light - direct > 5 * np.hypot(light_se, direct_se) and light > 8
    _, path = scripted_episode(LightDarkEnv(), "light", seed=0)
    assert path[:, 0].max() > 3.4  # the detour (sigma < 0.25 there)
    _, path = scripted_episode(LightDarkEnv(), "direct", seed=0)
    assert path[:, 0].max() < 3.0


def test_bad_input():
    with pytest.raises(ValueError, match="direct"):
        scripted_episode(LightDarkEnv(), "wander", seed=0)
    with pytest.raises(ValueError, match="goal_radius"):
        LightDarkEnv(goal_radius=0.0)
    assert isinstance(gym.make("pplrl/LightDark-v0").observation_space, gym.spaces.Box)


def test_known_model_planning_experiment_smoke(tmp_path):
    from experiments_loader import load_experiment

    exp = load_experiment("light_dark_known_model")
    out = exp.main(["--episodes", "2", "--candidates", "16", "--horizon", "3", "--particles", "16",
                    "--filter-particles", "64", "--out", str(tmp_path / "k.json")])
    rows = out["rows"]
    assert len(rows["planner + information gain"]["returns"]) == 2
    assert len(rows["planner, reward only"]["paths"][0]) == 31
    assert "paired difference" in out["table"] and (tmp_path / "k.png").stat().st_size > 0
