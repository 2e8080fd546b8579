"""Learning baselines on tabular MDPs: Q-learning, tabular VMBPO and tabular
beta-VMBPO with dual descent on beta (beta-VMBPO paper, Sec. 3.1 eq. 9 and Sec. 6.1).

Each learner interacts with a :class:`pplrl.envs.TabularEnv` and returns a
:class:`LearningCurve`: at every checkpoint the exact expected return (from p0,
over ``eval_horizon`` steps, by dynamic programming on the true tables) of the policy
the agent would deploy, so the curves carry no evaluation noise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from pplrl import tabular as tb
from pplrl.envs.tabular_gym import TabularEnv


@dataclass
class LearningCurve:
    steps: list[int] = field(default_factory=list)
    returns: list[float] = field(default_factory=list)
    extras: dict[str, list[float]] = field(default_factory=dict)

    def add(self, step: int, ret: float, **extras: float) -> None:
        self.steps.append(step)
        self.returns.append(ret)
        for k, v in extras.items():
            self.extras.setdefault(k, []).append(float(v))


def _expected_return(mdp: tb.TabularMDP, policy: np.ndarray, horizon: int) -> float:
    return float(mdp.p0 @ tb.policy_evaluation(mdp, policy, horizon=horizon))


def q_learning(env: TabularEnv, total_steps: int, *, alpha: float = 0.5, epsilon: float = 0.1,
               gamma: float = 1.0, eval_every: int = 250, eval_horizon: int = 100,
               max_episode_steps: int = 100, seed: int = 0) -> LearningCurve:
    """Watkins' Q-learning with epsilon-greedy exploration; evaluates the greedy policy."""
    tb.check_gamma(gamma)
    mdp, rng = env.mdp, np.random.default_rng(seed)
    Q = np.zeros((mdp.n_states, mdp.n_actions))
    curve = LearningCurve()
    s, _ = env.reset(seed=seed)
    t_ep = 0
    for step in range(1, total_steps + 1):
        greedy = np.flatnonzero(Q[s] == Q[s].max())
        a = int(rng.integers(mdp.n_actions)) if rng.random() < epsilon else int(rng.choice(greedy))
        s2, r, term, _, _ = env.step(a)
        target = r + (0.0 if term else gamma * Q[s2].max())
        Q[s, a] += alpha * (target - Q[s, a])
        s, t_ep = s2, t_ep + 1
        if term or t_ep >= max_episode_steps:
            s, _ = env.reset()
            t_ep = 0
        if step % eval_every == 0:
            curve.add(step, _expected_return(mdp, np.eye(mdp.n_actions)[Q.argmax(-1)], eval_horizon))
    return curve


@dataclass
class EmpiricalModel:
    """Counts-based estimate p_hat, r_hat with a Dirichlet(prior_count / S) prior, so
    unexplored transitions are uniform (the optimism VMBPO's q_d can exploit)."""

    n_states: int
    n_actions: int
    prior_count: float = 1.0
    reward_init: float = 0.0

    def __post_init__(self):
        self.counts = np.zeros((self.n_states, self.n_actions, self.n_states))
        self.reward_sum = np.zeros_like(self.counts)

    def update(self, s: int, a: int, r: float, s2: int) -> None:
        self.counts[s, a, s2] += 1
        self.reward_sum[s, a, s2] += r

    def mdp(self, true: tb.TabularMDP) -> tb.TabularMDP:
        P = (self.counts + self.prior_count / self.n_states) / (self.counts.sum(-1, keepdims=True) + self.prior_count)
        R = np.where(self.counts > 0, self.reward_sum / np.maximum(self.counts, 1), self.reward_init)
        term = true.terminal  # which states end an episode is observed on arrival
        P[term] = 0.0
        P[term, :, term.nonzero()[0]] = 0.0
        for s in np.flatnonzero(term):
            P[s, :, s] = 1.0
            R[s] = 0.0
        return tb.TabularMDP(P, R, true.p0, term)


def tabular_vmbpo(env: TabularEnv, total_steps: int, *, beta: float = 1.0, learn_beta: bool = False,
                  epsilon_kl: float = 0.1, beta_lr: float = 1.0, beta_max: float = 1e7, beta_min: float = 1e-2,
                  update_every: int = 50, policy_floor: float = 0.01, eval_every: int = 250,
                  eval_horizon: int = 100, max_episode_steps: int = 100, prior_count: float = 1.0,
                  seed: int = 0) -> LearningCurve:
    """Tabular (beta-)VMBPO: model learning, exact E-step, M-step pi <- q_c, dual beta.

    Every ``update_every`` steps: fit p_hat (counts); E-step = exact soft value
    iteration on p_hat with factor r/beta and prior pi (VMBPO Sec. 4.2), giving q_c*
    and q_d* (eqs. 14-16); M-step = hard update pi <- q_c* (beta paper eq. 14), mixed
    with ``policy_floor`` of uniform so that pi keeps full support (the KL to it stays
    finite and the agent keeps exploring). With ``learn_beta`` the dual variable
    follows eq. (9), J(beta) = beta (epsilon - KL(q_d || p_hat)): gradient descent
    beta <- beta - beta_lr (epsilon - KL), clamped to [beta_min, beta_max] (beta_max =
    1e7 as App. C.4). KL is averaged over the visited (s, a). ``beta = 1`` with
    ``learn_beta=False`` is tabular VMBPO. The agent acts with the prior policy pi
    (beta paper Algorithm 1); evaluation uses its greedy version.
    """
    tb.check_positive("beta", beta)
    if epsilon_kl < 0:
        raise ValueError(f"epsilon must be >= 0, got {epsilon_kl}")
    mdp, rng = env.mdp, np.random.default_rng(seed)
    model = EmpiricalModel(mdp.n_states, mdp.n_actions, prior_count)
    pi = mdp.uniform_policy()
    curve = LearningCurve()
    s, _ = env.reset(seed=seed)
    t_ep = 0
    kl = 0.0
    for step in range(1, total_steps + 1):
        a = int(rng.choice(mdp.n_actions, p=pi[s]))
        s2, r, term, _, _ = env.step(a)
        model.update(s, a, r, s2)
        s, t_ep = s2, t_ep + 1
        if term or t_ep >= max_episode_steps:
            s, _ = env.reset()
            t_ep = 0
        if step % update_every == 0:
            m_hat = model.mdp(mdp)
            sol = tb.soft_value_iteration(m_hat, pi, 1.0 / beta, horizon=eval_horizon)
            q_c, q_d = sol.q_c[0], sol.q_d[0]
            seen = model.counts.sum(-1) > 0
            kl = float(tb.kl_categorical(q_d, m_hat.P)[seen].mean())
            if learn_beta:
                beta = float(np.clip(beta - beta_lr * (epsilon_kl - kl), beta_min, beta_max))
            pi = (1 - policy_floor) * q_c + policy_floor / mdp.n_actions
        if step % eval_every == 0:
            greedy = np.eye(mdp.n_actions)[pi.argmax(-1)]
            curve.add(step, _expected_return(mdp, greedy, eval_horizon), beta=beta, kl_dynamics=kl)
    return curve
