"""Check a user's model/guide pair against exact dynamic programming on a tabular MDP.

:func:`verify` trains the pair with ``pyro.infer.SVI`` on the ELBO of the objective it
claims to be and compares what SVI reaches with what the papers say the optimum is:

* the ELBO: VMBPO's J(q; pi) (000_…, eq. 4) with ``eta``, or beta-VMBPO's
  risk-sensitive bound E_q[sum_t r_t] - beta KL(q || p_pi) (001_…, eq. 7) with ``beta``;
* its maximum, E_{x0~p0}[V_0(x0)] (times beta for eq. 7), where V is the soft value of
  the same model computed backwards over the horizon: Q = log E_p[exp(scale r + V')],
  V = log E_pi[exp Q] with scale = eta (VMBPO eqs. 9-11) or 1/beta (beta-VMBPO
  eqs. 2, 5); the bound equals the log evidence (beta-VMBPO eq. 6) when p0 is a point mass;
* the optimal variational policy and dynamics in closed form, q_c* = pi exp(Q - V) and
  q_d* = p exp(scale r + V' - Q) (VMBPO eqs. 14-16; beta-VMBPO eq. 4 with r / beta).

``from pplrl import verify`` imports this module on first use only.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.infer import SVI
from pyro.poutine.util import site_is_subsample

from models.trajectory import tabular_environment
from pplrl import tabular as tb
from pplrl.elbo import OptimalityELBO, RiskSensitiveELBO

#: default tolerances, copied from the shipped SVI-vs-DP tests (tests/test_elbo_agreement.py):
#: ``elbo`` is absolute in the ELBO's units for |optimum| <= 1 and relative above;
#: ``q_c`` / ``q_d`` bound the largest absolute probability difference where compared
DEFAULT_TOL = MappingProxyType({"elbo": 2e-3, "q_c": 2e-2, "q_d": 2e-2})

#: q_c(.|s) at step t is compared where the optimal q* visits s at t with probability
#: above this; q_d(.|s, a) where q* visits s and takes a with probability above it.
#: "Positive" up to round-off: Adam's steps do not shrink with the gradient, so SVI
#: converges on every entry whose gradient is well above Adam's eps (1e-8)
DEFAULT_SUPPORT = 1e-6

#: particles for the final ELBO estimate when some guide site is not enumerated
MC_PARTICLES = 256

ELBO_ROW, QC_ROW, QD_ROW = "elbo optimum", "q_c", "q_d"


@dataclass(frozen=True)
class VerificationRow:
    """One compared quantity: the value SVI reached, the DP value, and the tolerance.
    For a table (q_c, q_d) the values are those at the entry that differs most
    (``where`` names it)."""

    quantity: str
    svi: float
    dp: float
    tol: float
    where: str = ""

    @property
    def diff(self) -> float:
        return abs(self.svi - self.dp)

    @property
    def ok(self) -> bool:
        return bool(np.isfinite(self.diff) and self.diff <= self.tol)


@dataclass
class VerificationReport:
    """What :func:`verify` found: one :class:`VerificationRow` per compared quantity.

    ``passed`` is True when every row agrees; ``str(report)`` is an aligned table ending
    in a PASS/FAIL line that names the quantities that disagree; :meth:`assert_passed`
    raises AssertionError with that text. ``terms`` is the final ELBO's term report
    (:attr:`pplrl.elbo.OptimalityELBO.last_terms`), ``solution`` the DP solution
    (:class:`pplrl.tabular.SoftSolution`, scaled units), ``losses`` the SVI losses.
    """

    rows: list[VerificationRow]
    title: str = ""
    notes: list[str] = field(default_factory=list)
    terms: dict[str, float] = field(default_factory=dict)
    losses: list[float] = field(default_factory=list, repr=False)
    solution: tb.SoftSolution | None = field(default=None, repr=False)

    @property
    def failed(self) -> list[str]:
        """The quantities that disagree with the DP solution."""
        return [row.quantity for row in self.rows if not row.ok]

    @property
    def passed(self) -> bool:
        return bool(self.rows) and not self.failed

    @property
    def summary(self) -> str:
        if not self.rows:
            return "FAIL: nothing was compared"
        if self.failed:
            return f"FAIL: {_listed(self.failed)} with the DP solution"
        return f"PASS: {_listed([row.quantity for row in self.rows], 'agree')} with the DP solution"

    def __str__(self) -> str:
        header = ("quantity", "SVI", "DP", "|diff|", "tol", "ok", "where")
        table = [header] + [(r.quantity, f"{r.svi:.6g}", f"{r.dp:.6g}", f"{r.diff:.3g}", f"{r.tol:.3g}",
                             "ok" if r.ok else "FAIL", r.where) for r in self.rows]
        widths = [max(len(line[i]) for line in table) for i in range(len(header))]
        lines = [self.title] if self.title else []
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip() for line in table]
        lines += [f"note: {note}" for note in self.notes]
        lines.append(self.summary)
        return "\n".join(lines)

    def assert_passed(self) -> "VerificationReport":
        """Raise AssertionError with the report's text unless it passed; return self."""
        if not self.passed:
            raise AssertionError(str(self))
        return self

    raise_on_failure = assert_passed


def _listed(names: list[str], verb: str = "disagree") -> str:
    return f"{', '.join(names)} {verb}{'s' if len(names) == 1 else ''}"


def _bad(message: str) -> ValueError:
    return ValueError(f"verify: {message}")


def _check_tol(tol) -> dict[str, float]:
    if isinstance(tol, Mapping):
        unknown = sorted(set(tol) - set(DEFAULT_TOL))
        if unknown:
            raise _bad(f"tol has unknown keys {unknown}; the keys are {sorted(DEFAULT_TOL)}")
        out = {**DEFAULT_TOL, **tol}
    else:
        out = dict.fromkeys(DEFAULT_TOL, tol)
    for key, value in out.items():
        try:
            ok = math.isfinite(value) and value >= 0
        except TypeError:
            ok = False
        if not ok:
            raise _bad(f"tolerance {key!r} must be a finite number >= 0, got {value!r}")
    return {k: float(v) for k, v in out.items()}


def _initial(initial, mdp: tb.TabularMDP):
    """(what the environment gets, DP weights w with optimum w @ V_0, visitation d_0)."""
    S = mdp.n_states
    if initial is None:
        return dist.Categorical(probs=torch.tensor(mdp.p0)), mdp.p0, mdp.p0
    if isinstance(initial, dist.Categorical):
        p0 = initial.probs.detach().cpu().numpy().astype(np.float64)
        if p0.shape != (S,):
            raise _bad(f"initial must be a Categorical over the {S} states, got batch/event shape {p0.shape}")
        return initial, p0, p0
    values = torch.as_tensor(initial)
    if not values.dtype.is_floating_point:  # start states: a plate, the ELBO sums over them
        starts = values.reshape(-1).long()
        if values.dim() != 1 or len(starts) == 0 or (starts < 0).any() or (starts >= S).any():
            raise _bad(f"initial start states must be a non-empty 1-d tensor of state indices in [0, {S})")
        counts = np.bincount(starts.numpy(), minlength=S).astype(np.float64)
        return starts, counts, counts / counts.sum()
    p0 = values.detach().cpu().numpy().astype(np.float64)
    if p0.shape != (S,) or np.any(p0 < 0) or not np.isclose(p0.sum(), 1.0, atol=1e-8):
        raise _bad(f"initial must be a probability vector over the {S} states, integer start states, "
                   "or a Categorical")
    return dist.Categorical(probs=torch.tensor(p0)), p0, p0


def _guide_table(guide, name: str, horizon: int, shape: tuple[int, ...]) -> np.ndarray | None:
    method = getattr(guide, name, None)
    if not callable(method):
        return None
    table = torch.as_tensor(method()).detach().cpu().numpy().astype(np.float64)
    if table.shape == shape:
        table = table[None]
    if table.shape[1:] != shape or not (table.shape[0] == 1 or table.shape[0] >= horizon):
        raise _bad(f"guide.{name}() has shape {table.shape}; expected [T, {', '.join(map(str, shape))}] "
                   f"with T = 1 (stationary) or T >= horizon = {horizon}")
    return np.broadcast_to(table, (horizon,) + shape) if table.shape[0] == 1 else table[:horizon]


def _compare(quantity, table, optimum, mask, tol, label) -> VerificationRow:
    """Largest |table - optimum| over the entries where ``mask`` holds (broadcast over the last axis)."""
    if not mask.any():
        return VerificationRow(quantity, float("nan"), float("nan"), tol, "nothing to compare")
    diff = np.where(np.isnan(table), np.inf, np.abs(table - optimum))  # a NaN in the guide's table fails
    diff = np.where(mask[..., None], diff, -np.inf)
    idx = np.unravel_index(int(np.argmax(diff)), diff.shape)
    return VerificationRow(quantity, float(table[idx]), float(optimum[idx]), tol, label(idx))


def _namer(names, prefix):
    return (lambda i: str(names[i])) if names is not None else (lambda i: f"{prefix}{i}")


def _enumerated(guide, env, horizon, kwargs) -> bool:
    """Whether every sample site of the guide is marked for parallel enumeration."""
    trace = pyro.poutine.trace(guide).get_trace(env, horizon, **kwargs)
    sites = [s for s in trace.nodes.values()
             if s["type"] == "sample" and not s["is_observed"] and not site_is_subsample(s)]
    return bool(sites) and all((s.get("infer") or {}).get("enumerate") == "parallel" for s in sites)


def verify(model, guide, mdp: tb.TabularMDP, *, horizon: int, eta: float | None = None, beta: float | None = None,
           steps: int = 400, lr: float = 0.1, seed: int = 0, tol: float | Mapping[str, float] = DEFAULT_TOL,
           initial=None, prior_policy=None, support: float = DEFAULT_SUPPORT) -> VerificationReport:
    """Train ``model``/``guide`` by SVI on a tabular MDP and compare with exact DP.

    ``model`` and ``guide`` have the signature of :func:`models.trajectory.trajectory_model`
    and :class:`guides.tabular.TabularGuide`: ``(env, horizon, *, eta=None, beta=None)``,
    ``env`` the :class:`models.trajectory.AgentEnvironment` that
    :func:`models.trajectory.tabular_environment` builds from ``mdp.P``, ``mdp.R``, the
    prior policy (``prior_policy`` [S, A], default uniform) and the initial states.

    Exactly one of ``eta`` or ``beta`` names the objective:

    * ``eta``: :class:`pplrl.elbo.OptimalityELBO`, VMBPO's J(q; pi) (000_…, eq. 4) with
      optimality factors exp(eta r), in scaled units;
    * ``beta``: :class:`pplrl.elbo.RiskSensitiveELBO`, beta-VMBPO's
      E_q[sum r] - beta KL(q || p_pi) (001_…, eq. 7) with factors exp(r / beta)
      (eq. 5), in reward units.

    SVI (Adam, ``lr``) runs ``steps`` steps from a **cleared param store** and
    ``pyro.set_rng_seed(seed)``; the trained parameters stay in the store afterwards.
    The DP side is :func:`pplrl.tabular.soft_value_iteration` with ``scale = eta`` or
    ``1/beta`` over ``horizon`` steps from V_H = 0 -- the soft backup of the trajectory
    model (VMBPO eqs. 9-11; beta-VMBPO eqs. 2, 5) -- and its closed-form q_c*, q_d*
    (VMBPO eqs. 14-16; beta-VMBPO eq. 4 with rewards r / beta).

    Rows of the report (``tol`` overrides :data:`DEFAULT_TOL`, as one number for all
    rows or a mapping with keys ``elbo``, ``q_c``, ``q_d``):

    * ``elbo optimum``: the ELBO after training against max_q = E_{x0~p0}[V_0(x0)]
      (times beta for eq. 7; the sum over the start states when ``initial`` gives
      them). The ELBO is evaluated exactly when every guide site is enumerated (the
      shipped tabular guide), else by the mean of :data:`MC_PARTICLES` particles.
      Tolerance ``tol["elbo"] * max(1, |optimum|)``.
    * ``q_c`` and ``q_d``, when the guide has ``q_c()`` ([T, S, A] or [S, A]) and
      ``q_d()`` ([T, S, A, S] or [S, A, S]) methods returning probability tables (T = 1
      is a stationary guide, compared with q* at every step): the largest absolute
      difference from q_c*, q_d*, taken **not over all states** but over the steps and
      states the optimal q* reaches with positive probability: q_c(.|s) at step t where
      q* visits s at t with probability > ``support`` (default 1e-6), q_d(.|s, a) where
      it visits s and takes a with probability > ``support``. Elsewhere the ELBO does
      not depend on q (its gradient there is proportional to that probability), so no
      objective pins q down there.

    ``initial``: None (``mdp.p0``), a probability vector over the states, a
    :class:`pyro.distributions.Categorical`, or an integer tensor of start states (the
    model then runs one trajectory per start in a plate, as in the bootstrapped tests).

    Raises ValueError (one line, starting ``verify:``) for bad input: eta and beta both
    or neither given, a non-positive eta or beta, horizon not an integer >= 1, ``mdp``
    not a :class:`pplrl.tabular.TabularMDP`, bad steps/lr/tol/initial/prior, a guide
    table of the wrong shape, and model and guide sites that do not match (the ELBO's
    message naming the sites, passed through).
    """
    if not isinstance(mdp, tb.TabularMDP):
        raise _bad(f"mdp must be a pplrl.tabular.TabularMDP, got {type(mdp).__name__}")
    if isinstance(horizon, bool) or not isinstance(horizon, (int, np.integer)) or horizon < 1:
        raise _bad(f"horizon must be an integer >= 1, got {horizon!r}")
    horizon = int(horizon)
    if (eta is None) == (beta is None):
        raise _bad("give exactly one of eta (VMBPO, factor eta*r) or beta (beta-VMBPO, factor r/beta), "
                   f"got eta={eta!r}, beta={beta!r}")
    try:
        scale = tb.reward_scale(eta, beta)
    except (ValueError, TypeError) as err:
        raise _bad(str(err)) from None
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise _bad(f"steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(lr, numbers.Real) and math.isfinite(lr) and lr > 0):
        raise _bad(f"lr must be a finite number > 0, got {lr!r}")
    if not (isinstance(support, numbers.Real) and 0 <= support < 1):
        raise _bad(f"support must be a number in [0, 1), got {support!r}")
    tols = _check_tol(tol)
    S, A = mdp.n_states, mdp.n_actions
    if prior_policy is None:
        pi = mdp.uniform_policy()
    else:
        pi = np.asarray(torch.as_tensor(prior_policy).detach().cpu(), dtype=np.float64)
        if pi.shape != (S, A) or np.any(pi < 0) or not np.allclose(pi.sum(-1), 1.0, atol=1e-6):
            raise _bad(f"prior_policy must be a [{S}, {A}] table of distributions over actions")
    init, weights, d0 = _initial(initial, mdp)

    # -- SVI on the user's pair ---------------------------------------------------------
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    env = tabular_environment(torch.tensor(mdp.P), torch.tensor(mdp.R), torch.tensor(pi), init)
    kwargs = {"eta": float(eta)} if eta is not None else {"beta": float(beta)}
    make_elbo = (lambda **kw: OptimalityELBO(**kw)) if eta is not None else (lambda **kw: RiskSensitiveELBO(beta, **kw))
    elbo = make_elbo()
    svi = SVI(model, guide, pyro.optim.Adam({"lr": float(lr)}), elbo)
    notes, losses = [], []
    try:
        for step in range(int(steps)):
            loss = svi.step(env, horizon, **kwargs)
            losses.append(float(loss))
            if not math.isfinite(loss):
                notes.append(f"SVI stopped at step {step}: the loss is {loss}")
                break
        exact = _enumerated(guide, env, horizon, kwargs)
        final = elbo if exact else make_elbo(num_particles=MC_PARTICLES)
        terms = final.terms(model, guide, env, horizon, **kwargs)
    except ValueError as err:  # Pyro appends the trace shapes on further lines: keep the message
        raise _bad((str(err).strip().splitlines() or [repr(err)])[0].strip()) from None
    if not exact:
        notes.append(f"the guide is not fully enumerated: the final ELBO is a {MC_PARTICLES}-particle estimate")

    # -- the DP solution ----------------------------------------------------------------
    solution = tb.soft_value_iteration(mdp, pi, scale, horizon=horizon)
    factor = float(beta) if beta is not None else 1.0
    optimum = factor * float(weights @ solution.V[0])
    rows = [VerificationRow(ELBO_ROW, float(terms.get("elbo", float("nan"))), optimum,
                            tols["elbo"] * max(1.0, abs(optimum)))]

    state, action = _namer(mdp.state_names, "s"), _namer(mdp.action_names, "a")
    visit = [d0]
    for t in range(horizon - 1):
        visit.append(np.einsum("s,sa,sak->k", visit[-1], solution.q_c[t], solution.q_d[t]))
    visit = np.stack(visit)  # [T, S]: state marginals under q*
    q_c = _guide_table(guide, "q_c", horizon, (S, A))
    if q_c is not None:
        rows.append(_compare(QC_ROW, q_c, solution.q_c, visit > support, tols["q_c"],
                             lambda i: f"t={i[0]} s={state(i[1])} a={action(i[2])}"))
    q_d = _guide_table(guide, "q_d", horizon, (S, A, S))
    if q_d is not None:
        rows.append(_compare(QD_ROW, q_d, solution.q_d, visit[..., None] * solution.q_c > support, tols["q_d"],
                             lambda i: f"t={i[0]} s={state(i[1])} a={action(i[2])} s'={state(i[3])}"))
    missing = [name for name, table in ((QC_ROW, q_c), (QD_ROW, q_d)) if table is None]
    if missing:
        notes.append(f"{' and '.join(missing)} not compared: the guide has no {'/'.join(m + '()' for m in missing)}")

    objective = f"RiskSensitiveELBO(beta={beta:g}) (beta-VMBPO eq. 7)" if beta is not None else \
        f"OptimalityELBO(eta={eta:g}) (VMBPO eq. 4)"
    name = mdp.meta.get("name", "TabularMDP")
    title = (f"verify {getattr(model, '__name__', type(model).__name__)} / "
             f"{getattr(guide, '__name__', type(guide).__name__)} on {name}, horizon {horizon}, {objective}, "
             f"{len(losses)} SVI steps (lr {lr:g}, seed {seed})")
    return VerificationReport(rows, title, notes, terms, losses, solution)


__all__ = ["DEFAULT_SUPPORT", "DEFAULT_TOL", "MC_PARTICLES", "VerificationReport", "VerificationRow", "verify"]
