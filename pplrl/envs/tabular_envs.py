"""The papers' small MDPs, as tables and as gymnasium environments.

* :func:`risky_arm` -- beta-VMBPO paper (001_…), Fig. 1 caption.
* :func:`cliff_gridworld` -- beta-VMBPO paper Sec. 6.1 (after Eysenbach et al. 2022).
* :func:`virel_counterexample` -- VIREL (002_…), Sec. 2.2 and Fig. 1.
* :func:`random_mdp` -- a seeded random MDP for tests.
"""

from __future__ import annotations

import numpy as np

from pplrl.tabular import TabularMDP


def risky_arm(p_bad: float = 0.9, bad_reward: float = -10.0, safe_reward: float = -5.0) -> TabularMDP:
    """Risky-arm MDP of beta-VMBPO Fig. 1.

    From S, 'left' goes to L with reward ``safe_reward`` (-5); 'right' gives no reward
    and goes to A with probability ``p_bad`` (0.9) or to B. A and B have one effective
    action (both actions act alike) leading to C with reward ``bad_reward`` (-10) and to
    D with reward 0. L, C, D are terminal. Expected returns: left -5, right -9.
    """
    if not 0.0 < p_bad < 1.0:
        raise ValueError(f"p_bad must lie in (0, 1), got {p_bad}")
    names = ["S", "A", "B", "L", "C", "D"]
    S_, A_, B_, L_, C_, D_ = range(6)
    P = np.zeros((6, 2, 6))
    R = np.zeros((6, 2, 6))
    LEFT, RIGHT = 0, 1
    P[S_, LEFT, L_] = 1.0
    R[S_, LEFT, L_] = safe_reward
    P[S_, RIGHT, A_] = p_bad
    P[S_, RIGHT, B_] = 1.0 - p_bad
    P[A_, :, C_] = 1.0
    R[A_, :, C_] = bad_reward
    P[B_, :, D_] = 1.0
    for s in (L_, C_, D_):
        P[s, :, s] = 1.0
    p0 = np.eye(6)[S_]
    terminal = np.isin(np.arange(6), [L_, C_, D_])
    return TabularMDP(P, R, p0, terminal, names, ["left", "right"],
                      {"name": "RiskyArm", "horizon": 2})


GRID_ACTIONS = ["up", "left", "down", "right"]
_MOVES = {0: (-1, 0), 1: (0, -1), 2: (1, 0), 3: (0, 1)}


def cliff_gridworld(
    rows: int = 4,
    cols: int = 6,
    slip: float = 0.2,
    cliff_reward: float = -20.0,
    step_reward: float = -1.0,
    goal_reward: float = 0.0,
) -> TabularMDP:
    """Cliff gridworld of beta-VMBPO Sec. 6.1.

    Start at the bottom-left corner, goal (terminal) at the bottom-right, cliff cells
    between them on the bottom row. Each of the four actions (up, left, down, right)
    moves in the chosen direction with probability ``1 - slip`` and in a uniformly
    random direction (of the four) with probability ``slip``; moving into a wall
    stays put. Each move costs ``step_reward``; stepping into the cliff gives
    ``cliff_reward`` and puts the agent back on the start cell; entering the goal
    gives ``goal_reward``. State index = row * cols + col, plus the goal is terminal.
    """
    if rows < 2 or cols < 3:
        raise ValueError("the cliff gridworld needs at least 2 rows and 3 columns")
    if not 0.0 <= slip <= 1.0:
        raise ValueError(f"slip must lie in [0, 1], got {slip}")
    S = rows * cols
    start, goal = (rows - 1) * cols, rows * cols - 1
    cliff = {(rows - 1) * cols + c for c in range(1, cols - 1)}
    P = np.zeros((S, 4, S))
    R = np.zeros((S, 4, S))
    for s in range(S):
        if s == goal:
            P[s, :, s] = 1.0
            continue
        if s in cliff:  # fallen: every action returns to the start, no further reward
            P[s, :, start] = 1.0
            continue
        r, c = divmod(s, cols)
        for a in range(4):
            for d in range(4):
                prob = (1.0 - slip) * (d == a) + slip / 4.0
                dr, dc = _MOVES[d]
                nr, nc = min(max(r + dr, 0), rows - 1), min(max(c + dc, 0), cols - 1)
                s2 = nr * cols + nc
                P[s, a, s2] += prob
                R[s, a, s2] = cliff_reward if s2 in cliff else (goal_reward if s2 == goal else step_reward)
    terminal = np.zeros(S, dtype=bool)
    terminal[goal] = True
    p0 = np.eye(S)[start]
    names = [f"({r},{c})" for r in range(rows) for c in range(cols)]
    return TabularMDP(P, R, p0, terminal, names, GRID_ACTIONS,
                      {"name": "CliffGridworld", "rows": rows, "cols": cols, "cliff": sorted(cliff),
                       "start": start, "goal": goal})


def virel_counterexample(k1: int = 4, k2: int = 10) -> TabularMDP:
    """VIREL's MERL counterexample (002_…, Sec. 2.2, Fig. 1), deterministic.

    Reading taken (the text has a typo, ``p(s1|s0, a2)``): from ``s0`` action ``a1``
    (index 0) leads to ``s1`` with reward 0 and ``a2`` (index 1) leads to ``s2`` with
    reward 1. In ``s1`` the ``k1`` actions ``a1^i`` lead to ``s1^i``; every ``s1^i``
    leads to ``s5``; ``s2 -> s3 -> s4 -> s5`` and ``s5 -> ... -> s_{5+k2}`` (terminal)
    regardless of the action. Only those choices are real: ``meta["action_mask"]``
    marks the valid actions per state (2 in ``s0``, ``k1`` in ``s1``, one elsewhere);
    invalid actions act like action 0 so the tables stay well formed.
    """
    if int(k1) != k1 or k1 < 1:
        raise ValueError(f"k1 must be a positive integer, got {k1!r}")
    if int(k2) != k2 or k2 < 1:
        raise ValueError(f"k2 must be a positive integer, got {k2!r}")
    k1, k2 = int(k1), int(k2)
    A = max(2, k1)
    names = ["s0", "s1", "s2", "s3", "s4"] + [f"s1^{i + 1}" for i in range(k1)] + [f"s{5 + j}" for j in range(k2 + 1)]
    idx = {n: i for i, n in enumerate(names)}
    S = len(names)
    nxt = np.zeros((S, A), dtype=int)
    R = np.zeros((S, A, S))
    mask = np.zeros((S, A), dtype=bool)
    mask[:, 0] = True
    nxt[idx["s0"], 0], nxt[idx["s0"], 1:] = idx["s1"], idx["s2"]
    mask[idx["s0"], 1] = True
    R[idx["s0"], 1:, idx["s2"]] = 1.0
    nxt[idx["s0"], 2:] = idx["s1"]  # invalid actions act like a1
    R[idx["s0"], 2:, idx["s2"]] = 0.0
    for i in range(A):
        nxt[idx["s1"], i] = idx[f"s1^{min(i, k1 - 1) + 1}"] if i < k1 else idx["s1^1"]
    mask[idx["s1"], :k1] = True
    nxt[idx["s2"]], nxt[idx["s3"]], nxt[idx["s4"]] = idx["s3"], idx["s4"], idx["s5"]
    for i in range(k1):
        nxt[idx[f"s1^{i + 1}"]] = idx["s5"]
    for j in range(k2):
        nxt[idx[f"s{5 + j}"]] = idx[f"s{6 + j}"]
    last = idx[f"s{5 + k2}"]
    nxt[last] = last
    P = np.zeros((S, A, S))
    P[np.arange(S)[:, None], np.arange(A)[None, :], nxt] = 1.0
    terminal = np.zeros(S, dtype=bool)
    terminal[last] = True
    actions = ["a1", "a2"] + [f"a{i}" for i in range(3, A + 1)]
    return TabularMDP(P, R, np.eye(S)[0], terminal, names, actions,
                      {"name": "VirelCounterexample", "k1": k1, "k2": k2, "action_mask": mask})


def random_mdp(n_states: int = 5, n_actions: int = 3, *, seed: int = 0, n_terminal: int = 1,
               sparsity: float = 0.3) -> TabularMDP:
    """A seeded random MDP: Dirichlet transitions with some zero entries, Gaussian
    rewards per transition, ``n_terminal`` absorbing terminal states."""
    rng = np.random.default_rng(seed)
    S, A = n_states, n_actions
    P = rng.dirichlet(np.ones(S), size=(S, A))
    P = np.where(rng.random((S, A, S)) < sparsity, 0.0, P)
    P[np.arange(S), :, (np.arange(S) + 1) % S] += 1e-3  # keep every row non-empty
    P /= P.sum(-1, keepdims=True)
    R = rng.normal(size=(S, A, S))
    terminal = np.zeros(S, dtype=bool)
    terminal[S - n_terminal:] = True
    for s in np.flatnonzero(terminal):
        P[s] = 0.0
        P[s, :, s] = 1.0
        R[s] = 0.0
    p0 = np.zeros(S)
    p0[: S - n_terminal] = rng.dirichlet(np.ones(S - n_terminal))
    return TabularMDP(P, R, p0, terminal, meta={"name": f"RandomMDP-{seed}"})
