"""Tabular learners and the gymnasium environments."""

import gymnasium as gym
import numpy as np
import pytest

import pplrl.envs  # noqa: F401  (registers the environment ids)
from pplrl import tabular as tb
from pplrl.envs import TabularEnv, cliff_gridworld, risky_arm
from pplrl.tabular_learning import EmpiricalModel, q_learning, tabular_vmbpo


@pytest.mark.parametrize("env_id", ["pplrl/RiskyArm-v0", "pplrl/CliffGridworld-v0", "pplrl/VirelCounterexample-v0"])
def test_registered_envs_follow_their_tables(env_id):
    env = gym.make(env_id)
    mdp = env.unwrapped.mdp
    s, _ = env.reset(seed=0)
    assert mdp.p0[s] > 0
    for _ in range(50):
        a = env.action_space.sample()
        s2, r, term, trunc, _ = env.step(a)
        assert mdp.P[s, a, s2] > 0 and r == mdp.R[s, a, s2]
        s = s2
        if term or trunc:
            s, _ = env.reset()


def test_risky_arm_sampled_frequencies():
    env = TabularEnv(risky_arm())
    env.reset(seed=1)
    hits = []
    for _ in range(4000):
        env.reset()
        s2, *_ = env.step(1)
        hits.append(s2 == 1)
    assert np.mean(hits) == pytest.approx(0.9, abs=0.02)


def test_bad_env_input():
    with pytest.raises(gym.error.Error):
        gym.make("pplrl/NoSuchEnv-v0")
    env = TabularEnv(risky_arm())
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)
    env.reset(seed=0)
    with pytest.raises(ValueError, match="action"):
        env.step(5)


def test_empirical_model_converges_to_true_dynamics():
    mdp = cliff_gridworld()
    model = EmpiricalModel(mdp.n_states, mdp.n_actions)
    rng = np.random.default_rng(0)
    for _ in range(20000):
        s, a = 13, int(rng.integers(4))
        s2 = rng.choice(mdp.n_states, p=mdp.P[s, a])
        model.update(s, a, mdp.R[s, a, s2], s2)
    np.testing.assert_allclose(model.mdp(mdp).P[13], mdp.P[13], atol=0.02)


def test_q_learning_improves_on_cliff():
    mdp = cliff_gridworld()
    curve = q_learning(TabularEnv(mdp), 4000, seed=0, eval_every=500)
    assert max(curve.returns[-3:]) > curve.returns[0] + 20


def test_dual_descent_moves_beta_with_the_kl_constraint():
    """eq. (9): beta rises while KL(q_d || p) > epsilon and falls while it is below."""
    mdp = cliff_gridworld()
    tight = tabular_vmbpo(TabularEnv(mdp), 500, beta=1.0, learn_beta=True, epsilon_kl=1e-4, seed=0,
                          eval_every=50, update_every=50)
    assert tight.extras["kl_dynamics"][0] > 1e-4
    assert tight.extras["beta"][0] > 1.0 and np.all(np.diff(tight.extras["beta"]) >= 0)
    loose = tabular_vmbpo(TabularEnv(mdp), 500, beta=5.0, learn_beta=True, epsilon_kl=50.0, seed=0,
                          eval_every=50, update_every=50)
    assert loose.extras["beta"][-1] < 5.0 and np.all(np.diff(loose.extras["beta"]) <= 0)


def test_fixed_beta_is_vmbpo_and_beta_vmbpo_reaches_safer_return():
    mdp = cliff_gridworld()
    vm = tabular_vmbpo(TabularEnv(mdp), 3000, beta=1.0, seed=0)
    assert set(vm.extras["beta"]) == {1.0}
    bv = tabular_vmbpo(TabularEnv(mdp), 3000, beta=1.0, learn_beta=True, seed=0)
    assert bv.extras["beta"][-1] > 2.0
    V_star, _ = tb.value_iteration(mdp)
    assert bv.returns[-1] >= vm.returns[-1] - 1e-9
    assert bv.returns[-1] > V_star[18] - 5.0


def test_learner_bad_input():
    env = TabularEnv(cliff_gridworld())
    with pytest.raises(ValueError, match="beta"):
        tabular_vmbpo(env, 10, beta=0.0)
    with pytest.raises(ValueError, match="epsilon"):
        tabular_vmbpo(env, 10, epsilon_kl=-1.0)
    with pytest.raises(ValueError, match="gamma"):
        q_learning(env, 10, gamma=1.5)
