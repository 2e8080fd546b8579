"""Finite MDPs and exact dynamic-programming solvers for RL-as-inference.

Everything here is plain NumPy in float64: these are the ground truths the Pyro
inference code is tested against.

Conventions
-----------
* ``P[s, a, s']`` is the transition kernel p(s'|s, a), ``R[s, a, s']`` the reward
  earned on that transition (a reward that depends on ``(s, a)`` only is the
  special case ``R[s, a, :] = r(s, a)``).
* Terminal states are absorbing with zero reward, so every value is 0 there.
* ``scale`` multiplies rewards inside the optimality likelihood
  p(O=1 | s, a, s') = exp(scale * R): ``scale = eta`` in VMBPO (000_…, eq. 2),
  ``scale = 1 / beta`` in beta-VMBPO (001_…, eq. 5). Use :func:`reward_scale`.
* Discounting is termination with probability 1 - gamma (VMBPO footnote 1): see
  :meth:`TabularMDP.with_termination`. A transition's reward is earned only if the
  transition happens, so termination pre-empts the reward of that step.

Soft backups (VMBPO eqs. 9-11, beta-VMBPO eqs. 2-5), written with log-sum-exp::

    Q(s, a) = log sum_s' p(s'|s,a) exp(scale * R(s,a,s') + V(s'))      (9) / (5)
    V(s)    = log sum_a  pi(a|s)   exp(Q(s, a))                       (Prop. 1) / (2)

Closed-form variational distributions (VMBPO eqs. 14-16)::

    q_d(s'|s,a) = p(s'|s,a) exp(scale * R(s,a,s') + V(s') - Q(s,a))
    q_c(a|s)    = pi(a|s) exp(Q(s,a) - V(s))
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy.special import logsumexp

ATOL_DISTRIBUTION = 1e-8


def reward_scale(eta: float | None = None, beta: float | None = None) -> float:
    """The factor multiplying rewards in the optimality likelihood.

    Exactly one of ``eta`` (VMBPO temperature, factor ``eta * r``) or ``beta``
    (risk parameter of beta-VMBPO, factor ``r / beta``) may be given; neither means 1.
    """
    if eta is not None and beta is not None:
        raise ValueError("give either eta (factor eta*r) or beta (factor r/beta), not both")
    if eta is not None:
        check_positive("eta", eta)
        return float(eta)
    if beta is not None:
        check_positive("beta", beta)
        return 1.0 / float(beta)
    return 1.0


def check_positive(name: str, value: float) -> None:
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def check_gamma(gamma: float) -> None:
    if not np.isfinite(gamma) or not (0.0 < gamma <= 1.0):
        raise ValueError(f"gamma must lie in (0, 1], got {gamma!r}")


def check_horizon(horizon: int | None) -> None:
    if horizon is not None and (int(horizon) != horizon or horizon <= 0):
        raise ValueError(f"horizon must be a positive integer, got {horizon!r}")


def _check_policy(pi: np.ndarray, n_states: int, n_actions: int, name: str = "policy") -> np.ndarray:
    pi = np.asarray(pi, dtype=np.float64)
    if pi.shape != (n_states, n_actions):
        raise ValueError(f"{name} must have shape {(n_states, n_actions)}, got {pi.shape}")
    if np.any(pi < 0) or not np.allclose(pi.sum(-1), 1.0, atol=1e-6):
        raise ValueError(f"{name} rows must be probability distributions over actions")
    return pi


@dataclass(frozen=True)
class TabularMDP:
    """A finite MDP with its tables, validated on construction."""

    P: np.ndarray
    R: np.ndarray
    p0: np.ndarray
    terminal: np.ndarray
    state_names: Sequence[str] | None = None
    action_names: Sequence[str] | None = None
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        P = np.asarray(self.P, dtype=np.float64)
        R = np.asarray(self.R, dtype=np.float64)
        p0 = np.asarray(self.p0, dtype=np.float64)
        terminal = np.asarray(self.terminal, dtype=bool)
        if P.ndim != 3 or P.shape[0] != P.shape[2]:
            raise ValueError(f"P must have shape [S, A, S], got {P.shape}")
        S, A, _ = P.shape
        if R.shape == (S, A):
            R = np.repeat(R[:, :, None], S, axis=2)
        if R.shape != (S, A, S):
            raise ValueError(f"R must have shape [S, A] or [S, A, S] = {(S, A, S)}, got {R.shape}")
        if not np.all(np.isfinite(R)):
            raise ValueError("R must be finite")
        if np.any(P < 0) or not np.allclose(P.sum(-1), 1.0, atol=ATOL_DISTRIBUTION):
            bad = np.argwhere(~np.isclose(P.sum(-1), 1.0, atol=ATOL_DISTRIBUTION) | np.any(P < 0, -1))
            raise ValueError(
                "transition table P is not a distribution over next states at (s, a) = "
                f"{[tuple(map(int, b)) for b in bad[:5]]}"
            )
        if p0.shape != (S,) or np.any(p0 < 0) or not np.isclose(p0.sum(), 1.0, atol=ATOL_DISTRIBUTION):
            raise ValueError("p0 must be a probability distribution over the S states")
        if terminal.shape != (S,):
            raise ValueError(f"terminal must be a boolean mask of shape {(S,)}")
        for s in np.flatnonzero(terminal):
            if not np.allclose(P[s, :, s], 1.0) or np.any(R[s] != 0):
                raise ValueError(f"terminal state {s} must be absorbing with zero reward")
        object.__setattr__(self, "P", P)
        object.__setattr__(self, "R", R)
        object.__setattr__(self, "p0", p0)
        object.__setattr__(self, "terminal", terminal)

    @property
    def n_states(self) -> int:
        return self.P.shape[0]

    @property
    def n_actions(self) -> int:
        return self.P.shape[1]

    @property
    def expected_reward(self) -> np.ndarray:
        """r(s, a) = E_{s'~p}[R(s, a, s')], shape [S, A]."""
        return np.einsum("ijk,ijk->ij", self.P, self.R)

    def uniform_policy(self) -> np.ndarray:
        return np.full((self.n_states, self.n_actions), 1.0 / self.n_actions)

    def with_termination(self, gamma: float) -> "TabularMDP":
        """Discounting as termination (VMBPO footnote 1).

        Adds one absorbing state ``"end"``; from every non-terminal state each action
        leads there with probability ``1 - gamma`` (reward 0) and to ``s'`` with
        probability ``gamma * p(s'|s, a)`` (reward ``R(s, a, s')``).
        """
        check_gamma(gamma)
        S, A = self.n_states, self.n_actions
        P = np.zeros((S + 1, A, S + 1))
        R = np.zeros((S + 1, A, S + 1))
        live = ~self.terminal
        P[:S, :, :S] = self.P
        P[:S, :, :S][live] *= gamma
        P[:S, :, S][live] = 1.0 - gamma
        P[S, :, S] = 1.0
        R[:S, :, :S] = self.R
        names = None if self.state_names is None else [*self.state_names, "end"]
        return TabularMDP(P, R, np.append(self.p0, 0.0), np.append(self.terminal, True),
                          names, self.action_names, {**self.meta, "gamma": gamma})


# ----------------------------------------------------------------------------------
# Soft backups
# ----------------------------------------------------------------------------------

def soft_q(mdp: TabularMDP, V: np.ndarray, scale: float) -> np.ndarray:
    """Q(s,a) = log E_{s'~p}[exp(scale R(s,a,s') + V(s'))]  (VMBPO eq. 9, beta eq. 5)."""
    with np.errstate(divide="ignore"):
        logP = np.log(mdp.P)
    return logsumexp(logP + scale * mdp.R + V[None, None, :], axis=-1)


def soft_v(Q: np.ndarray, pi: np.ndarray) -> np.ndarray:
    """V(s) = log E_{a~pi}[exp Q(s,a)]  (VMBPO Prop. 1, beta eq. 2)."""
    with np.errstate(divide="ignore"):
        return logsumexp(Q + np.log(pi), axis=-1)


def closed_form_dynamics(mdp: TabularMDP, V: np.ndarray, Q: np.ndarray, scale: float) -> np.ndarray:
    """q_d^V(s'|s,a) = p(s'|s,a) exp(scale R + V(s') - Q(s,a))  (VMBPO eqs. 14, 16)."""
    with np.errstate(divide="ignore"):
        logP = np.log(mdp.P)
    return np.exp(logP + scale * mdp.R + V[None, None, :] - Q[:, :, None])


def closed_form_policy(pi: np.ndarray, Q: np.ndarray) -> np.ndarray:
    """q_c^Q(a|s) = pi(a|s) exp Q(s,a) / E_pi[exp Q(s, .)]  (VMBPO eqs. 15-16)."""
    with np.errstate(divide="ignore"):
        logits = np.log(pi) + Q
    return np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))


@dataclass
class SoftSolution:
    """Result of an exact E-step solve.

    For a finite horizon ``H`` the arrays carry a leading time axis: ``V[t]`` for
    ``t = 0..H`` (``V[H]`` is the terminal value), ``Q[t]``, ``q_c[t]``, ``q_d[t]`` for
    ``t = 0..H-1``. For the infinite-horizon (stationary) case they do not.
    """

    V: np.ndarray
    Q: np.ndarray
    q_c: np.ndarray
    q_d: np.ndarray
    iterations: int

    def elbo_optimum(self, p0: np.ndarray) -> float:
        """max_q J(q; pi) = E_{s0~p0}[V(s0)]: VMBPO's q keeps the prior's initial
        distribution (000_…, Sec. 4), so the bound equals :meth:`log_evidence` only
        when p0 is deterministic; otherwise the gap is Jensen's."""
        V0 = self.V[0] if self.V.ndim == 2 else self.V
        return float(np.dot(p0, V0))

    def log_evidence(self, p0: np.ndarray) -> float:
        """log p_pi(O = 1) = log E_{s0~p0}[exp V(s0)]."""
        V0 = self.V[0] if self.V.ndim == 2 else self.V
        with np.errstate(divide="ignore"):
            return float(logsumexp(np.log(p0) + V0))


def soft_value_iteration(
    mdp: TabularMDP,
    pi: np.ndarray | None = None,
    scale: float = 1.0,
    *,
    horizon: int | None = None,
    terminal_value: np.ndarray | None = None,
    tol: float = 1e-10,
    max_iter: int = 100_000,
) -> SoftSolution:
    """Model-free value iteration for the E-step (VMBPO Sec. 4.2, eq. 11).

    With ``horizon`` the backup runs backwards from ``terminal_value`` (default 0);
    without it, it iterates to the fixed point, which exists when every trajectory
    terminates (terminal states reachable, or :meth:`TabularMDP.with_termination`).
    """
    check_horizon(horizon)
    check_positive("scale", scale)
    pi = mdp.uniform_policy() if pi is None else _check_policy(pi, mdp.n_states, mdp.n_actions)
    V_end = np.zeros(mdp.n_states) if terminal_value is None else np.asarray(terminal_value, float)
    if horizon is not None:
        Vs, Qs = [V_end], []
        for _ in range(horizon):
            Q = soft_q(mdp, Vs[0], scale)
            Qs.insert(0, Q)
            Vs.insert(0, soft_v(Q, pi))
        V, Q = np.stack(Vs), np.stack(Qs)
        q_c = np.stack([closed_form_policy(pi, Qt) for Qt in Q])
        q_d = np.stack([closed_form_dynamics(mdp, V[t + 1], Q[t], scale) for t in range(horizon)])
        return SoftSolution(V, Q, q_c, q_d, horizon)
    V = V_end.copy()
    for it in range(1, max_iter + 1):
        Q = soft_q(mdp, V, scale)
        V_new = soft_v(Q, pi)
        if not np.all(np.isfinite(V_new)):
            raise FloatingPointError(f"soft value iteration diverged at iteration {it}")
        delta = np.max(np.abs(V_new - V))
        V = V_new
        if delta < tol:
            break
    else:
        raise RuntimeError(
            f"soft value iteration did not converge in {max_iter} iterations (last change {delta:.3g}); "
            "does every trajectory terminate? Use with_termination(gamma) or a horizon."
        )
    Q = soft_q(mdp, V, scale)
    return SoftSolution(V, Q, closed_form_policy(pi, Q), closed_form_dynamics(mdp, V, Q, scale), it)


def _policy_value_backup(mdp, pi, q_c, V, scale, model_based):
    """One application of T_{q_c} (eq. 6 model-based, eq. 10 model-free)."""
    if model_based:
        # inner max over q_d solved by (14), then evaluated explicitly as in (6)
        Qv = soft_q(mdp, V, scale)
        q_d = closed_form_dynamics(mdp, V, Qv, scale)
        with np.errstate(divide="ignore", invalid="ignore"):
            log_ratio = np.where(q_d > 0, np.log(q_d) - np.log(mdp.P), 0.0)
        Q = np.einsum("ijk,ijk->ij", q_d, scale * mdp.R + V[None, None, :] - log_ratio)
    else:
        Q = soft_q(mdp, V, scale)
    with np.errstate(divide="ignore", invalid="ignore"):
        log_ratio_c = np.where(q_c > 0, np.log(q_c) - np.log(pi), 0.0)
    return np.sum(q_c * (Q - log_ratio_c), axis=-1), Q


def soft_policy_iteration(
    mdp: TabularMDP,
    pi: np.ndarray | None = None,
    scale: float = 1.0,
    *,
    model_based: bool = True,
    tol: float = 1e-10,
    max_iter: int = 1_000,
    eval_iter: int = 100_000,
) -> SoftSolution:
    """Model-based or model-free policy iteration for the E-step (VMBPO Sec. 4.2).

    Policy evaluation iterates T_{q_c} to its fixed point, computing q_d by (14) at
    every inner step (model-based) or using the log-sum-exp form (10) (model-free);
    improvement applies (15). q_d* comes from (14) at convergence.
    """
    check_positive("scale", scale)
    pi = mdp.uniform_policy() if pi is None else _check_policy(pi, mdp.n_states, mdp.n_actions)
    q_c = pi.copy()
    V = np.zeros(mdp.n_states)
    for k in range(1, max_iter + 1):
        for _ in range(eval_iter):
            V_new, _ = _policy_value_backup(mdp, pi, q_c, V, scale, model_based)
            done = np.max(np.abs(V_new - V)) < tol
            V = V_new
            if done:
                break
        else:
            raise RuntimeError("policy evaluation did not converge; does every trajectory terminate?")
        Q = soft_q(mdp, V, scale)
        q_c_new = closed_form_policy(pi, Q)
        if np.max(np.abs(q_c_new - q_c)) < tol:
            q_c = q_c_new
            break
        q_c = q_c_new
    V = soft_v(Q, pi)
    return SoftSolution(V, Q, q_c, closed_form_dynamics(mdp, V, Q, scale), k)


def risk_sensitive_value_iteration(
    mdp: TabularMDP, scale: float = 1.0, *, tol: float = 1e-10, max_iter: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """Optimal exponential-utility control: the fixed point of EM on the E-step.

    Alternating the E-step (closed-form q_c*) with the M-step pi <- q_c* drives pi to
    a deterministic policy maximising (1/scale) log E[exp(scale * return)] (beta paper
    eq. 6 with scale = 1/beta). Its values obey ``Q = log E_p[exp(scale R + V')]`` and
    ``V = max_a Q``. Returns (V, Q) in scaled units; as scale -> 0 the greedy policy
    tends to the risk-neutral optimal one.
    """
    check_positive("scale", scale)
    V = np.zeros(mdp.n_states)
    for _ in range(max_iter):
        Q = soft_q(mdp, V, scale)
        V_new = Q.max(-1)
        if np.max(np.abs(V_new - V)) < tol:
            return V_new, soft_q(mdp, V_new, scale)
        V = V_new
    raise RuntimeError("risk-sensitive value iteration did not converge; does every trajectory terminate?")


def value_iteration(
    mdp: TabularMDP, *, horizon: int | None = None, tol: float = 1e-10, max_iter: int = 100_000
) -> tuple[np.ndarray, np.ndarray]:
    """Risk-neutral optimal values: Q*(s,a) = E_p[R + V*(s')], V* = max_a Q*. Returns (V, Q)."""
    check_horizon(horizon)
    V = np.zeros(mdp.n_states)
    n = horizon if horizon is not None else max_iter
    for it in range(n):
        Q = np.einsum("ijk,ijk->ij", mdp.P, mdp.R + V[None, None, :])
        V_new = Q.max(-1)
        delta = np.max(np.abs(V_new - V))
        V = V_new
        if horizon is None and delta < tol:
            break
    else:
        if horizon is None:
            raise RuntimeError("value iteration did not converge; does every trajectory terminate?")
    return V, Q


def policy_evaluation(mdp: TabularMDP, policy: np.ndarray, *, horizon: int | None = None,
                      tol: float = 1e-10, max_iter: int = 100_000) -> np.ndarray:
    """Expected return V^pi(s) of a stationary policy under the true dynamics
    (over ``horizon`` steps if given, else until termination)."""
    check_horizon(horizon)
    policy = _check_policy(policy, mdp.n_states, mdp.n_actions)
    r = mdp.expected_reward
    V = np.zeros(mdp.n_states)
    if horizon is not None:
        for _ in range(horizon):
            V = np.sum(policy * (r + np.einsum("ijk,k->ij", mdp.P, V)), -1)
        return V
    for _ in range(max_iter):
        V_new = np.sum(policy * (r + np.einsum("ijk,k->ij", mdp.P, V)), -1)
        if np.max(np.abs(V_new - V)) < tol:
            return V_new
        V = V_new
    raise RuntimeError("policy evaluation did not converge; does every trajectory terminate?")


def kl_categorical(q: np.ndarray, p: np.ndarray) -> np.ndarray:
    """KL(q || p) over the last axis, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(q > 0, q * (np.log(q) - np.log(p)), 0.0)
    return terms.sum(-1)


def greedy_path(mdp: TabularMDP, policy: np.ndarray, dynamics: np.ndarray | None = None,
                start: int | None = None, max_len: int = 100) -> list[int]:
    """Most likely state sequence from ``start``: argmax action, then argmax next state."""
    dyn = mdp.P if dynamics is None else dynamics
    s = int(np.argmax(mdp.p0)) if start is None else start
    path = [s]
    for _ in range(max_len):
        if mdp.terminal[s]:
            break
        a = int(np.argmax(policy[s]))
        s = int(np.argmax(dyn[s, a]))
        if s in path:  # a loop: the path never terminates
            path.append(s)
            break
        path.append(s)
    return path


# ----------------------------------------------------------------------------------
# Discounted MaxEnt (MERL) and VIREL's Boltzmann fixed point
# ----------------------------------------------------------------------------------

def _valid_actions(mdp: TabularMDP, action_mask: np.ndarray | None) -> np.ndarray:
    if action_mask is None:
        return np.ones((mdp.n_states, mdp.n_actions), dtype=bool)
    mask = np.asarray(action_mask, dtype=bool)
    if mask.shape != (mdp.n_states, mdp.n_actions) or not mask.any(-1).all():
        raise ValueError(f"action_mask must be boolean of shape {(mdp.n_states, mdp.n_actions)} "
                         "with at least one valid action per state")
    return mask


def _masked_softmax(logits: np.ndarray, mask: np.ndarray) -> np.ndarray:
    logits = np.where(mask, logits, -np.inf)
    return np.exp(logits - logsumexp(logits, axis=-1, keepdims=True))


def virel_em(mdp: TabularMDP, gamma: float, lam: float, *, lr: float = 0.5, iters: int = 2000,
             action_mask: np.ndarray | None = None) -> dict:
    """VIREL's EM on a tabular MDP with the temperature it prescribes (002_…, Sec. 3, eq. 5):
    epsilon = lam * the mean squared Bellman residual of the current critic, not a constant.

    Each iteration, as the agent does per update (``pplrl.algorithms.virel``, temperature
    'residual'): the residual of the critic under the current Boltzmann policy,
    ``delta = T^pi Q - Q`` (T^pi Q = E_p[R + gamma E_pi Q(s', .)]), gives
    ``epsilon = lam * mean(delta^2)`` over the valid (state, action) pairs of live states;
    the M-step moves the critic a fraction ``lr`` of the way to its target,
    ``Q <- Q + lr delta`` (an expected TD step); the E-step sets pi = softmax(Q / epsilon).
    As the critic converges the residual and so epsilon go to 0 and pi becomes greedy in
    Q* (Theorems 1-2), with no constant temperature to pick. Returns the trajectory
    (``epsilon``, ``pi`` per iteration) and the final ``Q``, ``pi``. A residual of exactly 0
    is a greedy policy."""
    check_gamma(gamma)
    check_positive("lam", lam)
    if not 0 < lr <= 1:
        raise ValueError(f"lr must lie in (0, 1], got {lr}")
    mask = _valid_actions(mdp, action_mask)
    live = ~mdp.terminal
    pairs = mask & live[:, None]
    Q = np.zeros((mdp.n_states, mdp.n_actions))
    pi = _masked_softmax(np.zeros_like(Q), mask)  # uniform before the first residual
    epsilons, policies = [], []
    for _ in range(iters):
        V = np.where(live, np.sum(np.where(mask, pi * Q, 0.0), -1), 0.0)
        delta = np.einsum("ijk,ijk->ij", mdp.P, mdp.R + gamma * V[None, None, :]) - Q
        eps = lam * float(np.mean(delta[pairs] ** 2))
        Q = Q + lr * delta
        if eps > 0:
            pi = _masked_softmax(Q / eps, mask)
        else:  # exact convergence: the limit of softmax(Q / eps) as eps -> 0
            greedy = np.where(mask, Q, -np.inf)
            pi = (greedy == greedy.max(-1, keepdims=True)).astype(float)
            pi /= pi.sum(-1, keepdims=True)
        epsilons.append(eps)
        policies.append(pi)
    return {"epsilon": np.array(epsilons), "pi": np.array(policies), "Q": Q, "final_pi": pi}


def maxent_value_iteration(mdp: TabularMDP, temperature: float, gamma: float, *,
                           action_mask: np.ndarray | None = None, tol: float = 1e-12,
                           max_iter: int = 100_000) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Discounted maximum-entropy RL (MERL, VIREL 002_… Sec. 2.2, J_merl with constant c)::

        Q(s, a) = E_p[R + gamma V(s')],   V(s) = c log sum_{a valid} exp(Q(s, a) / c),
        pi(a|s) = exp((Q(s, a) - V(s)) / c).

    (Entropy bonus c H(pi(.|s)) over the valid actions, discounted like rewards.)
    Returns (V, Q, pi)."""
    check_positive("temperature", temperature)
    check_gamma(gamma)
    mask = _valid_actions(mdp, action_mask)
    live = ~mdp.terminal
    V = np.zeros(mdp.n_states)
    for _ in range(max_iter):
        Q = np.einsum("ijk,ijk->ij", mdp.P, mdp.R + gamma * V[None, None, :])
        V_new = np.where(live, temperature * logsumexp(np.where(mask, Q / temperature, -np.inf), axis=-1), 0.0)
        if np.max(np.abs(V_new - V)) < tol:
            V = V_new
            break
        V = V_new
    else:
        raise RuntimeError("MaxEnt value iteration did not converge; is gamma < 1 or does every trajectory end?")
    Q = np.einsum("ijk,ijk->ij", mdp.P, mdp.R + gamma * V[None, None, :])
    return V, Q, _masked_softmax(Q / temperature, mask)


def boltzmann_fixed_point(mdp: TabularMDP, epsilon: float, gamma: float, *,
                          action_mask: np.ndarray | None = None, tol: float = 1e-12,
                          max_iter: int = 100_000) -> tuple[np.ndarray, np.ndarray]:
    """VIREL's Boltzmann policy at a fixed temperature (002_…, eq. 3 with the operator
    T^{pi_omega}): Q = E_p[R + gamma E_{pi}[Q(s', .)]] with pi = softmax(Q / epsilon) over
    the valid actions — the action-value of the Boltzmann policy itself, with no
    entropy bonus. As epsilon -> 0 this is Q* and pi the greedy policy (Theorems 1–2).
    Returns (Q, pi)."""
    check_positive("epsilon", epsilon)
    check_gamma(gamma)
    mask = _valid_actions(mdp, action_mask)
    live = ~mdp.terminal
    Q = np.zeros((mdp.n_states, mdp.n_actions))
    for _ in range(max_iter):
        pi = _masked_softmax(Q / epsilon, mask)
        V = np.where(live, np.sum(np.where(mask, pi * Q, 0.0), -1), 0.0)
        Q_new = np.einsum("ijk,ijk->ij", mdp.P, mdp.R + gamma * V[None, None, :])
        if np.max(np.abs(Q_new - Q)) < tol:
            Q = Q_new
            break
        Q = Q_new
    else:
        raise RuntimeError("Boltzmann fixed-point iteration did not converge")
    return Q, _masked_softmax(Q / epsilon, mask)
