"""VMBPO, VMBPO-MFE and beta-VMBPO: one implementation, three presets.

Papers: VMBPO (000_…, Sec. 5, Algorithms 1-2, App. B-D) and beta-VMBPO (001_…,
Sec. 3, App. C-D, Algorithm 1). All three maximise the same ELBO (VMBPO eq. 4 =
beta-VMBPO eq. 7 with beta = 1/eta) over a variational policy q_c and variational
dynamics q_d; they differ in how the E-step estimates its pieces. The shared code:

* **units.** Critics live in reward units. With ``scale = eta`` (VMBPO) or ``1/beta``
  (beta-VMBPO) the paper's soft values are ``scale * Q``; beta-VMBPO's "stable
  critic" (App. C.3) is exactly this choice, and VMBPO with eta = 1 is the same
  thing with ``scale = 1``. So ``beta = 1`` fixed gives VMBPO's losses (a test
  checks it).
* **step 1, q_d** (:meth:`VariationalAgent.dynamics_weights`): a second
  :class:`models.dynamics.GaussianEnsemble`, fitted by the weighted likelihood of
  VMBPO eq. (19) / beta eq. (11), weights ``exp(scale (r + gamma V'(x') - Q'(x, a)))``
  computed in log space and, for beta-VMBPO, with the scaled TD error clamped to
  (-4, 4) (App. C.1). The weighted likelihood is the ensemble's Pyro model under
  ``poutine.scale``; SVI with the empty guide maximises it.
* **step 2, log q_d/p** (:meth:`VariationalAgent.log_ratio`): VMBPO's network nu by
  the f-divergence dual (eqs. 20-21, ``log_ratio="nu"``), or beta-VMBPO's difference
  of the two ensembles' elite-mixture log-densities (``log_ratio="ensembles"``).
* **step 3, critic** (:meth:`VariationalAgent.critic_loss`): twin Q on model samples
  (x from D_env, a ~ q_c, x' ~ q_d, r from the prior model): target
  ``r + gamma V'(x') - (1/scale) log q_d/p`` (eq. 23 / eq. 12 in App. C.3's form;
  ``critic_log_ratio=False`` drops the log term as beta-VMBPO's App. C.1 does). V' is
  a V network fitted by eq. (24) (VMBPO) or the implicit soft value
  ``E_{a~q_c}[Q'(x', a) - (1/scale) log q_c/pi]`` (beta-VMBPO).
  VMBPO-MFE (``e_step="model_free"``) instead fits Q on real data with the
  exponential-TD loss (eq. 39), ``(exp(scale (Q - r - gamma V'(x'))) - 1)^2``, and V by
  eq. (40). Its Algorithm 2 has no dynamics model, so none is fitted by default
  (``fit_dynamics=True`` refits p_theta and q_d every ``model_train_freq`` steps, for the log).
* **step 4, actor**: the ELBO of :func:`models.actor.actor_model` with the prior
  policy pi and optimality factor ``scale * Q`` against the guide q_c (eq. 25 /
  eq. 13), computed by Pyro (:class:`pplrl.elbo.ReparamOptimalityELBO`). Q is the online
  critic, as in VMBPO's eq. 25, for every agent by default; beta's eq. 13 reads the
  target Q' (``actor_critic='target'``).
* **M-step**: pi <- q_c (eq. 26 solved by copying; beta eq. 14's hard update), or the
  regularised MAP of eq. (27) (``m_step="map"``).
* **dual beta** (beta eq. 9): ``J(beta) = beta (epsilon - KL(q_d || p))``, KL the
  batch estimate from the two ensembles; as Algorithm 1 schedules it, one plain gradient
  step on beta per environment step, after that step's E-step updates, on their mean KL
  (``beta_update``; 'adam_log' is the earlier Adam on log beta at every update), beta
  clamped to [beta_min, beta_max] (beta_max = 1e7, App. C.4).

Numerics: exponentiated TD errors are formed as ``exp(logit)`` with the logit
clamped where the papers clamp; elsewhere (unclamped weights, exp(nu), the exp-TD
critic without a clamp) a logit above ``max_log_weight`` (default 30) stops training
with a :class:`pplrl.diagnostics.NonFiniteError` naming the term and the step.

What keeps VMBPO and VMBPO-MFE stable on Pendulum (eta = 1, rewards down to -16 per
step, so TD errors of tens of nats), each the default of every preset (measurements:
docs/notes.md, 'vmbpo: stabilisers'):

* the TD clamp (-4, 4) in the q_d weights -- beta paper App. C.1, which describes the
  authors' VMBPO re-implementation; without it q_d is fitted to a handful of transitions;
* nu bounded softly to (-8, 8) = twice the clamp (the range of log q_d/p for a q_d
  tilted by a clamped TD, see ``nu_clip``) and fitted against prior-model samples
  x' ~ p_theta rather than the deterministic real x' (against which log q_d/p is
  unbounded); both are this implementation's;
* VMBPO-MFE's exp-TD loss continued by its tangent beyond the clamp (:func:`exp_td_loss`;
  the loss explodes without it; App. D reports this instability);
* log q_c/pi evaluated at one point for both densities (:meth:`policy_log_ratio`);
* SAC's entropy regulariser (beta paper App. C.1): after pi <- q_c the KL term has no
  gradient, and without it q_c collapsed to a deterministic policy (``entropy_regularizer``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F

from guides.actor import actor_guide
from models.actor import actor_model
from models.dynamics import GaussianEnsemble
from pplrl.algorithms.model_based import EnsembleConfig, elite_holdout_mse, fit_on_replay, policy_rollouts
from pplrl.algorithms.sac import SAC, SACConfig
from pplrl.diagnostics import NonFiniteError, importance_weight_diagnostics
from pplrl.envs.continuous import termination_fn_for
from pplrl.nets import VNetwork, adam, frozen, mlp, polyak_update, target_copy
from pplrl.replay import Batch, ReplayBuffer, sample_mixed

#: what both VMBPO papers' schedules share (VMBPO App. C and Table 4, beta App. C.2): the
#: ``preset=paper`` settings of every VMBPO-family config (VMBPOConfig.preset)
PAPER_SCHEDULE = {"gradient_steps": 20, "learning_starts": 5000, "model_lr": 3e-4, "exploration_noise": 1.0,
                  "exploration_decay": 0.999, "exploration_min": 0.025}


@dataclass
class VMBPOConfig(EnsembleConfig, SACConfig):
    """Shared settings; the presets (:class:`VMBPOMFEConfig`, :class:`BetaVMBPOConfig`) fix the variant."""

    gradient_steps: int = 10
    """E-step updates per environment step (papers: 20, VMBPO App. C / beta App. C.2)"""

    eta: float = 1.0
    """VMBPO temperature: optimality factor eta * r (ignored when use_beta)"""
    use_beta: bool = False
    """scale rewards by 1/beta (beta-VMBPO) instead of eta"""
    beta_init: float = 1.0
    learn_beta: bool = False
    epsilon_kl: float = 0.1
    """KL constraint of the dual on beta (beta paper App. C.2: 0.1; App. C.4: "for environments
    with deterministic dynamics the KL term should be tight at zero. In practice this never
    happens ... epsilon = 10 was sufficient for our more simple environments"). On Pendulum-v1
    the fitted ensembles' KL stays above 0.1, so beta only rises; the Pendulum benchmark uses 10
    (measurements: docs/notes.md, 'vmbpo: epsilon_kl')"""
    beta_lr: float = 3e-4
    """step size of the dual on beta (beta_update; the beta paper's Fig. 8 tries 0.1 to 3e-4)"""
    beta_update: str = "algorithm1"
    """'algorithm1': beta <- beta - beta_lr * dJ/dbeta = beta - beta_lr (epsilon - KL), one plain
    gradient step on beta per environment step, after the step's E-step updates, with KL their
    mean estimate (beta paper Algorithm 1, line "beta <- beta - grad J(beta)"; eq. 9).
    'adam_log': Adam on log beta after every E-step update (pplrl before; Adam's normalised
    step moves log beta by about beta_lr per update whatever the constraint's slack, so at 2
    updates per step beta fell 100 -> ~1.6 in 10k steps, into VMBPO's regime)"""
    beta_min: float = 1e-3
    beta_max: float = 1e7
    td_clamp: float | None = 4.0
    """clamp of the scaled TD error in the q_d weights (beta paper App. C.1: 4, the authors'
    VMBPO re-implementation on which beta-VMBPO is built; None: unclamped as in VMBPO eq. 19);
    VMBPO-MFE's exp-TD critic continues its loss linearly beyond it (:func:`exp_td_loss`)"""
    exp_td_temperature: float = 1.0
    """tau of VMBPO-MFE's exp-TD critic: loss ``(exp(tau u) - 1)^2 / tau^2``, u = scale (Q - y);
    1 is eq. (39), tau -> 0 the squared TD error. The VMBPO paper (Sec. 6, footnote 3, after
    Borkar 2002) names this temperature as the remedy for the exp-TD instability. For a
    deterministic transition every tau has the same minimiser Q = y; for a stochastic one
    the minimiser depends on tau (tau -> 0: the mean of y). The clamp applies to tau u"""
    exp_td_form: str = "eq39"
    """the exp-TD critic loss of a model-free E-step: 'eq39', ``(exp(u) - 1)^2`` as printed
    (:func:`exp_td_loss`; its fixed point for stochastic targets is risk-averse), or 'linex',
    ``exp(-u) + u - 1`` (:func:`linex_td_loss`; fixed point the soft value, not in the paper)"""
    nu_clip: float | None = 8.0
    """soft bound c of the log-ratio network: nu = c tanh(raw / c). With the TD clamp c_td the
    target log q_d/p = clamped TD - log E_p[exp(clamped TD)] lies in (-2 c_td, 2 c_td), so
    c = 2 c_td = 8 bounds nothing the clamped q_d can reach; None: unbounded"""
    nu_reference: str = "model"
    """samples of p in nu's dual (eq. 21): 'real' next states from D (the paper), or 'model'
    x' ~ p_theta(.|x, a) (the prior model of beta eq. 10; on deterministic tasks log q_d/p_real
    is unbounded)"""
    nu_actions: str = "replay"
    """the (x, a) at which nu's dual (eq. 21) is fitted: 'replay', the real batch's (x, a), with
    x' ~ q_d and (reference 'model') x' ~ p_theta drawn for them (two model passes of their own
    per update); 'policy', eq. 21's E as written: the critic's own model samples of the same
    update (x ~ D, a ~ q_c, x' ~ q_d), the 'model' reference's x' ~ p_theta from the same pass
    as the critic's reward, so nu is fitted where the critic's target reads it and costs no
    model pass (9 % of an update; the same ratio estimate and returns on 3 seeds; measurements:
    docs/notes.md, 'vmbpo: nu_actions')"""
    max_log_weight: float = 30.0
    """unclamped exponent above this stops training with a clear error"""
    log_ratio: str = "nu"
    """'nu' (VMBPO step 2 network, eq. 21) or 'ensembles' (log q_phi - log p_theta, exact for
    the models held). The default stays the paper's nu, measured (docs/notes.md, "the TD clamp
    and nu"): nu does not estimate the ratio (about 0 nats against an exact KL of ~4), and with
    the exact ratio VMBPO does not learn Pendulum-v1 in 5k steps (3 seeds, mean -1098.0, against
    nu's 10-seed -131.3), so 'ensembles' would make the default agent one that does not learn.
    VMBPO's Pendulum results therefore rest on its critic carrying almost no KL penalty."""
    critic_log_ratio: bool = True
    value_network: bool = True
    """fit V by eq. (24)/(40); False: implicit soft value from Q' (beta-VMBPO)"""
    e_step: str = "model_based"
    """'model_based' (VMBPO) or 'model_free' (VMBPO-MFE, exp-TD critic on real data)"""
    fit_dynamics: bool = True
    """fit p_theta (eq. 10) and q_d (step 1) every ``model_train_freq`` steps. Only a model-free
    E-step may turn it off: VMBPO-MFE's Algorithm 2 (App. D) has no dynamics model, its q_d
    is implied by the exp-TD critic, and nothing in its loop reads the fitted ones (the M-step
    copies q_c or fits pi on replay states); with True they are fitted only for the logged
    KL(q_d || p) and hold-out error"""
    m_step: str = "copy"
    """'copy' (pi <- q_c) or 'map' (eq. 27)"""
    m_step_every: int = 1
    """E-step updates per M-step"""
    map_lambda: float = 1.0
    map_steps: int = 1
    q_d_warm_start: bool = True
    """start every step-1 fit of q_d from p_theta's weights, refitted just before on the same
    split and bootstrap, and fit only ``q_d_min_updates`` steps, instead of continuing q_d's own
    last fit for model_min_updates (the papers do not say how q_d is initialised). Cheaper; on
    Pendulum-v1 the KL floor of beta paper App. C.4 remains (see ``epsilon_kl``; measurements:
    docs/notes.md, 'vmbpo: q_d_warm_start')"""
    q_d_elite_score: str = "weighted_nll"
    """how q_d's elites are chosen after each fit: 'weighted_nll', by the hold-out likelihood
    weighted by exp(scale * TD), the criterion q_d is fitted on (step 1, eq. 19 / beta eq. 11);
    'mse', by the unweighted hold-out error of the mean (mbrl-lib's), which favours the members
    that the tilt moved least (pplrl before). p_theta's elites follow the same criterion
    (unweighted), so that under flat weights q_d keeps p's members"""
    q_d_min_updates: int = 100
    """SVI steps of a warm-started q_d fit (at least one epoch); a cold fit uses model_min_updates"""
    real_ratio: float = 0.0
    """share of each critic batch that keeps its real transition instead of the model sample
    (MBPO's real_ratio; the VMBPO papers use model samples only, 0)"""
    model_samples: str = "fresh"
    """where the critic's model transitions come from. 'fresh': drawn for every E-step update
    from the current q_c and q_d (VMBPO Algorithm 1, line 15). 'buffer': beta-VMBPO's Algorithm 1,
    after each model fit ``model_rollouts`` one-step rollouts (x ~ D_env, a ~ q_c, x' ~ q_d,
    r ~ p_theta) go into a first-in-first-out model buffer of ``model_buffer_size`` that the
    updates sample (App. C.2: 100,000 rollouts, 400,000 tuples, so a batch mixes the last four
    fits' q_c and q_d). 'buffer' draws the model once per fit instead of twice per update
    (measurements: docs/notes.md, 'VMBPO family: model_samples')"""
    model_rollouts: int = 100_000
    """one-step rollouts per model fit with model_samples='buffer' (beta App. C.2)"""
    model_buffer_size: int = 400_000
    """the model buffer's capacity with model_samples='buffer' (beta App. C.2)"""
    actor_critic: str = "online"
    """the critic the actor's ELBO reads (step 4): 'online', Q_psi (VMBPO eq. 25), or 'target', the
    Polyak-averaged Q' (beta-VMBPO eq. 13; beta-VMBPO's ``preset=paper`` takes it). The default is
    VMBPO's reading for every agent of the family, beta-VMBPO included: a deviation from beta's
    eq. 13, and the behaviour before this option (the rule for new config fields). On six trained
    beta-VMBPO agents (5k steps) the two readings' actor gradients have median cosine 0.90 (0.27
    at worst over 20 batches; experiments/beta_critic_roles.py); what that does to learning is
    not measured. q_d's weights (step 1) read the target Q' for every agent
    (VMBPO eq. 19), where beta's eq. 11 has the online Q_psi; there the readings agree (log-weights
    correlate 0.97, 0.02 nats apart on average, the same ESS), so no option"""
    sticking_the_landing: bool = True
    """actor gradient without the zero-mean score term (guides.actor.StickingTheLanding):
    with pi <- q_c every step the KL term's value is 0 but its score gradient, weighted by
    1/scale, is pure noise"""
    exploration_noise: float = 0.0
    """std of Gaussian noise added to pi's actions in the environment after learning_starts,
    decayed by ``exploration_decay`` per env step down to ``exploration_min`` (VMBPO paper
    Table 4: N(0, 1), decay 0.999, minimum 0.025); 0 = none"""
    exploration_decay: float = 0.999
    exploration_min: float = 0.025
    entropy_regularizer: bool = True
    """add SAC's auto-tuned entropy bonus to critic and actor (beta paper App. C.1 found
    it helps exploration); the KL to the prior is zero-gradient right after pi <- q_c, so
    without it q_c collapses to a deterministic policy (measurements: docs/notes.md,
    'vmbpo: entropy_regularizer')"""

    preset: str = "default"
    """'default' (this machine's budget: the settings above) or 'paper', the schedule of both
    VMBPO papers: 20 E-step updates per env step (VMBPO App. C, beta App. C.2), 5,000
    warm-up steps, model learning rate 3e-4, and VMBPO's Table 4 exploration noise N(0, 1)
    decayed by 0.999 per step to 0.025. VMBPO's and VMBPO-MFE's also take Table 4's
    actor-critic mini-batch of 64 and networks of 2 hidden layers of 200 (actor, critic, and
    here nu and V, which Table 4 does not list); beta-VMBPO's keeps its App. C.2 networks of 256
    (the batch is 256, MBPO's: App. C.2 gives none), samples its critic from its Algorithm
    1's model buffer (``model_samples='buffer'``, App. C.2's 100,000 rollouts and 400,000
    tuples) and its actor reads the target critic (eq. 13, ``actor_critic='target'``). Not
    taken from Table 4: its learning rates, swept per environment (critic 1e-3, 5e-4, 2e-4;
    actor 5e-4, 2e-4, 1e-4) without saying which won where, so ``lr`` stays 3e-4;
    its "Number of Expert Networks 2" and "Temperature 0.99995", which the text does not
    define. ``--set preset=paper`` applies these first; other ``--set`` keys override them"""

    presets: ClassVar[dict[str, dict]] = {"paper": {**PAPER_SCHEDULE, "batch_size": 64, "hidden": (200, 200)}}

    def validate(self) -> None:
        super().validate()
        if self.preset not in ("default", *self.presets):
            raise ValueError(f"preset must be one of default, {', '.join(self.presets)}; got {self.preset!r}")
        if not 0.0 <= self.real_ratio <= 1.0:
            raise ValueError(f"real_ratio must lie in [0, 1], got {self.real_ratio}")
        if not np.isfinite(self.eta) or self.eta <= 0:
            raise ValueError(f"eta must be > 0, got {self.eta}")
        if not np.isfinite(self.beta_init) or self.beta_init <= 0:
            raise ValueError(f"beta init must be > 0, got {self.beta_init}")
        if self.epsilon_kl < 0:
            raise ValueError(f"epsilon must be >= 0, got {self.epsilon_kl}")
        if not 0 < self.beta_min <= self.beta_max:
            raise ValueError("need 0 < beta_min <= beta_max")
        if self.beta_update not in ("algorithm1", "adam_log"):
            raise ValueError(f"beta_update must be 'algorithm1' or 'adam_log', got {self.beta_update!r}")
        if not np.isfinite(self.beta_lr) or self.beta_lr <= 0:
            raise ValueError(f"beta_lr must be > 0, got {self.beta_lr}")
        if self.td_clamp is not None and self.td_clamp <= 0:
            raise ValueError("td_clamp must be > 0 or None")
        if not np.isfinite(self.exp_td_temperature) or self.exp_td_temperature <= 0:
            raise ValueError(f"exp_td_temperature must be > 0, got {self.exp_td_temperature}")
        if self.nu_clip is not None and self.nu_clip <= 0:
            raise ValueError("nu_clip must be > 0 or None")
        if self.exp_td_form not in ("eq39", "linex"):
            raise ValueError(f"exp_td_form must be 'eq39' or 'linex', got {self.exp_td_form!r}")
        if self.nu_reference not in ("real", "model"):
            raise ValueError(f"nu_reference must be 'real' or 'model', got {self.nu_reference!r}")
        if self.nu_actions not in ("replay", "policy"):
            raise ValueError(f"nu_actions must be 'replay' or 'policy', got {self.nu_actions!r}")
        if self.nu_actions == "policy" and self.real_ratio >= 1.0 and self.log_ratio == "nu":
            raise ValueError("nu_actions='policy' fits nu on the critic's model samples; real_ratio=1 leaves none")
        if self.model_samples not in ("fresh", "buffer"):
            raise ValueError(f"model_samples must be 'fresh' or 'buffer', got {self.model_samples!r}")
        if self.model_samples == "buffer" and self.nu_actions == "policy" and self.log_ratio == "nu" \
                and self.e_step == "model_based":
            raise ValueError("nu_actions='policy' fits nu on the critic's model samples, and with "
                             "model_samples='buffer' their x' come from earlier fits' q_d: use nu_actions='replay'")
        for name in ("model_rollouts", "model_buffer_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.actor_critic not in ("online", "target"):
            raise ValueError(f"actor_critic must be 'online' or 'target', got {self.actor_critic!r}")
        if self.log_ratio not in ("nu", "ensembles"):
            raise ValueError(f"log_ratio must be 'nu' or 'ensembles', got {self.log_ratio!r}")
        if self.e_step not in ("model_based", "model_free"):
            raise ValueError(f"e_step must be 'model_based' or 'model_free', got {self.e_step!r}")
        if not self.fit_dynamics and self.e_step == "model_based":
            raise ValueError("fit_dynamics=False needs e_step='model_free': a model-based E-step samples the models")
        if self.m_step not in ("copy", "map"):
            raise ValueError(f"m_step must be 'copy' or 'map', got {self.m_step!r}")
        if self.exploration_noise < 0 or self.exploration_min < 0 or not 0 < self.exploration_decay <= 1:
            raise ValueError("exploration_noise and exploration_min must be >= 0, exploration_decay in (0, 1]")
        if self.q_d_elite_score not in ("weighted_nll", "mse"):
            raise ValueError(f"q_d_elite_score must be 'weighted_nll' or 'mse', got {self.q_d_elite_score!r}")
        if self.q_d_min_updates < 0:
            raise ValueError(f"q_d_min_updates must be >= 0, got {self.q_d_min_updates}")
        if self.m_step_every <= 0 or self.map_steps <= 0 or self.map_lambda < 0:
            raise ValueError("m_step_every and map_steps must be > 0, map_lambda >= 0")


def exp_td_loss(u: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """Per-sample exponential-TD loss ``(exp(u) - 1)^2`` of VMBPO eq. (39), u = scale (Q - y).

    With ``clip = c`` the loss is continued beyond ``|u| > c`` by its tangent at the
    boundary, ``f(c) + f'(c) (u - c)`` with ``f'(u) = 2 expm1(u) exp(u)`` (the same on the
    negative side): convex, continuously differentiable, the same minimiser (u = 0) and
    gradients bounded by ``|f'(c)|`` -- the TD clamp of beta-VMBPO's App. C.1 applied so that
    it keeps a gradient (a Huber-style extension; a plain clamp would stop Q moving once
    far off). ``clip=None``: the plain loss (computed with expm1)."""
    if clip is None:
        return torch.expm1(u).square()
    inside = u.clamp(-clip, clip)
    f = torch.expm1(inside).square()
    slope = 2 * torch.expm1(inside) * inside.exp()
    return f + slope * (u - inside)


def linex_td_loss(u: torch.Tensor, clip: float | None = None) -> torch.Tensor:
    """Per-sample linex loss ``exp(-u) + u - 1`` of u = k (Q - y), k = tau * scale: the
    exp-TD loss whose minimiser is the soft value. ``E[exp(k (y - Q)) - k (y - Q) - 1]`` is
    minimised where ``E exp(k (y - Q)) = 1``, i.e. ``Q = (1/k) log E exp(k y)`` (VMBPO eq. 9's
    log-expectation at tau = 1, m + k s^2 / 2 for y ~ N(m, s^2)), where eq. (39)'s
    ``(exp(u) - 1)^2`` has the risk-averse ``m - 1.5 k s^2`` (docs/notes.md, 'vmbpo-mfe:
    eq. 39's fixed point'); to second order it is ``u^2 / 2``, so tau -> 0 is again the
    squared TD. Not in the paper. ``clip = c`` continues it beyond ``|u| > c`` by its tangent
    (``f'(u) = 1 - exp(-u)``), as :func:`exp_td_loss`."""
    if clip is None:
        return torch.expm1(-u) + u
    inside = u.clamp(-clip, clip)
    return torch.expm1(-inside) + inside + (1 - torch.exp(-inside)) * (u - inside)


class VariationalAgent(SAC):
    """The VMBPO family: SAC's critic, temperature and actor ELBO, and two ensembles it
    holds, the prior dynamics p_theta (eq. 10) and the variational q_d; adds nu, V, the
    prior policy and beta."""

    algo = "vmbpo-family"
    Config = VMBPOConfig

    def __init__(self, config: VMBPOConfig, obs_dim: int, act_dim: int):
        super().__init__(config, obs_dim, act_dim)
        c = config
        # p_theta and q_d exist only where they are fitted (VMBPO-MFE's Algorithm 2 holds none)
        self.ensemble = c.make_ensemble(obs_dim, act_dim, "vmbpo.p_theta") if c.fit_dynamics else None
        self.termination_fn = termination_fn_for(c.env_id)
        self.last_model_fit: dict = {}
        self.last_model_seed: int | None = None
        # q_c is self.policy (SAC's); pi is the prior policy, a copy that acts in the env
        self.prior_policy = copy.deepcopy(self.policy)
        for p in self.prior_policy.parameters():
            p.requires_grad_(False)
        self.q_dynamics = c.make_ensemble(obs_dim, act_dim, "vmbpo.q_d") if c.fit_dynamics else None
        self.q_dynamics_fitted = False
        # nu (eq. 21) only where it is the log-ratio (VMBPO); beta-VMBPO reads the ensembles and
        # VMBPO-MFE has no q_d. Checkpoints from before this held an untrained nu there; loading
        # drops it (it never entered a loss, so resuming is unchanged).
        self.nu = mlp(2 * obs_dim + act_dim, 1, c.hidden) if self.uses_nu else None
        self.nu_opt = adam(self.nu.parameters(), lr=c.lr) if self.uses_nu else None
        self.value = VNetwork(obs_dim, c.hidden)
        self.value_target = target_copy(self.value)
        self.value_opt = adam(self.value.parameters(), lr=c.lr)
        # float64: Algorithm 1's steps on beta are ~1e-3 of it, below float32's resolution over 1e4 steps
        self.log_beta = torch.tensor(float(np.log(c.beta_init)), dtype=torch.float64, requires_grad=True)
        self.beta_opt = adam([self.log_beta], lr=c.beta_lr)
        self.map_opt = adam(self.prior_policy.parameters(), lr=c.lr)
        # beta Algorithm 1's model buffer (model_samples='buffer'), refilled after each fit
        self.model_buffer = ReplayBuffer(obs_dim, act_dim, c.model_buffer_size) \
            if c.model_samples == "buffer" and c.e_step == "model_based" else None
        self.e_steps = 0
        self.last_kl = float("nan")

    # -- units ------------------------------------------------------------------------
    @property
    def beta(self) -> float:
        return float(self.log_beta.detach().exp())

    @property
    def scale(self) -> float:
        """eta (VMBPO) or 1/beta (beta-VMBPO): soft values are scale * (reward-unit values)."""
        return 1.0 / self.beta if self.config.use_beta else self.config.eta

    def _check_exponent(self, logit: torch.Tensor, name: str, step: int) -> None:
        """Stop, naming the term and the step, before exp() of a diverging exponent."""
        logit = logit.detach()
        if not torch.all(torch.isfinite(logit)) or torch.any(logit > self.config.max_log_weight):
            raise NonFiniteError(f"exponentiated term {name} diverged at step {step}: max exponent "
                                 f"{float(logit.max()):.3g} > {self.config.max_log_weight}")

    def _exp_weight(self, logit: torch.Tensor, name: str, step: int) -> torch.Tensor:
        """exp(logit) after :meth:`_check_exponent` (the paper's TD clamp is applied by the caller)."""
        self._check_exponent(logit, name, step)
        return logit.exp()

    # -- acting: the prior policy pi acts (Algorithm 1, line 4) ---------------------------
    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        if not deterministic and self.steps_seen < self.config.learning_starts:
            return self.random_warmup_action()
        a = self.prior_policy.act(torch.as_tensor(obs, dtype=torch.float32)[None], deterministic)[0].cpu().numpy()
        sigma = self.exploration_std()
        if not deterministic and sigma > 0:
            a = np.clip(a + sigma * self.rng.standard_normal(self.act_dim), -1.0, 1.0).astype(np.float32)
        return a

    def exploration_std(self) -> float:
        """max(exploration_min, exploration_noise * decay^(steps since learning_starts)), or 0."""
        c = self.config
        if c.exploration_noise <= 0:
            return 0.0
        t = max(0, self.steps_seen - c.learning_starts)
        return max(c.exploration_min, c.exploration_noise * c.exploration_decay ** t)

    # -- values -----------------------------------------------------------------------------
    def policy_log_ratio(self, obs: torch.Tensor, q=None,
                         prior=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A sample a ~ q_c(.|x), log q_c(a|x) / pi(a|x) and log q_c(a|x); ``q`` and ``prior`` are
        q_c's and pi's distributions on ``obs`` where the caller has them. (Both densities read
        the sample's own pre-squash value, :class:`pplrl.distributions.TanhNormal`, so pi = q_c
        gives 0; a cache in q_c alone once made this ratio 1.7e4 nats; docs/notes.md,
        'distributions: TanhNormal cache'.)"""
        d = self.policy(obs) if q is None else q
        a = d.sample()
        log_q = d.log_prob(a)
        return a, log_q - (self.prior_policy(obs) if prior is None else prior).log_prob(a), log_q

    def soft_value_target(self, obs: torch.Tensor) -> torch.Tensor:
        """V'(x) in reward units: the target V network, or E_{a~q_c}[Q'(x,a) - (1/scale) log q_c/pi]."""
        with torch.no_grad():
            if self.config.value_network:
                return self.value_target(obs)
            a, ratio, log_q = self.policy_log_ratio(obs)
            v = self.critic_target.min(obs, a) - ratio / self.scale
            return v - self.alpha * log_q if self.config.entropy_regularizer else v

    # -- prior dynamics p_theta (eq. 10) ---------------------------------------------------
    def fit_model(self) -> dict:
        """p_theta on the real replay; the fit's split and bootstrap seed is kept for q_d's warm start."""
        # p_theta's elites by the criterion q_d's are chosen by (unweighted here), so that with flat
        # weights q_d, warm-started from p, keeps p's members and KL(q_d || p) stays ~0
        score = "weighted_nll" if self.config.q_d_elite_score == "weighted_nll" else "mse"
        self.last_model_fit, self.last_model_seed = fit_on_replay(self.ensemble, self.replay, self.config, self.rng,
                                                                  elite_score=score)
        return self.last_model_fit

    # -- step 1: variational dynamics ------------------------------------------------------
    def dynamics_log_weights(self, batch: Batch) -> torch.Tensor:
        """scale (r + gamma (1 - d) V'(x') - Q'(x, a)), clamped to (-td_clamp, td_clamp) if set.
        The target Q' as in VMBPO eq. (19), for beta-VMBPO too, whose eq. (11) has the online
        Q_psi: a deviation, measured to change nothing here (VMBPOConfig.actor_critic)."""
        with torch.no_grad():
            td = batch.rew + self.config.gamma * (1 - batch.done) * self.soft_value_target(batch.next_obs) \
                - self.critic_target.min(batch.obs, batch.act)
            logit = self.scale * td
            if self.config.td_clamp is not None:
                logit = logit.clamp(-self.config.td_clamp, self.config.td_clamp)
            return logit

    def dynamics_weights(self, batch: Batch, step: int) -> torch.Tensor:
        """exp(scale (r + gamma (1 - d) V'(x') - Q'(x, a))), VMBPO eq. (19) / beta eq. (11)."""
        return self._exp_weight(self.dynamics_log_weights(batch), "q_d weight exp(TD)", step)

    def replay_log_weights(self, data: Batch | None = None) -> torch.Tensor:
        """:meth:`dynamics_log_weights` over the whole replay (or ``data``), in chunks of 4,096."""
        data = self.replay.all() if data is None else data
        return torch.cat([self.dynamics_log_weights(Batch(*(t[i:i + 4096] for t in (
            data.obs, data.act, data.rew, data.next_obs, data.done)))) for i in range(0, len(data.obs), 4096)])

    def fit_variational_dynamics(self, step: int) -> dict:
        data = self.replay.all()
        log_w = self.replay_log_weights(data)
        if not torch.all(torch.isfinite(log_w)):
            raise NonFiniteError(f"q_d weight exp(TD) is not finite at step {step}")
        # the fit only needs weights up to a constant: exp(log_w - max) never overflows
        weights = torch.exp(log_w - log_w.max())
        if self.config.q_d_warm_start and self.last_model_seed is not None:
            # p_theta's weights, and its fit's split, normaliser and bootstrap (same seed, same
            # replay), so q_d starts where p is and sees the same inputs (see q_d_warm_start for
            # what this does and does not do to the KL floor)
            self.q_dynamics.copy_from(self.ensemble)
            epochs = self.config.fit_epochs(len(data), self.config.q_d_min_updates, min_epochs=1)
            seed = self.last_model_seed
        else:
            epochs, seed = self.config.fit_epochs(len(data)), int(self.rng.integers(2**31))
        info = self.q_dynamics.fit(data.obs, data.act, data.next_obs, data.rew, epochs=epochs, lr=self.config.model_lr,
                                   weights=weights, seed=seed, elite_score=self.config.q_d_elite_score)
        self.q_dynamics_fitted = True
        real = self.replay.sample(self.config.batch_size, self.rng)
        kl = self.batch_kl(real.obs, real.act, ensembles=True)
        psis = importance_weight_diagnostics(log_w)  # how many transitions the q_d fit rests on
        return {"q_d_train_loss": info["train_loss"][-1], "q_d_weight_max": float(weights.max()),
                "q_d_weight_mean": float(weights.mean()), "kl_dynamics_ensembles": kl,
                "q_d_weight_khat": psis["khat"], "q_d_weight_ess_frac": psis["ess_frac"]}

    # -- step 2: log-likelihood ratio ------------------------------------------------------------
    def ensemble_log_density(self, ensemble: GaussianEnsemble, obs, act, next_obs) -> torch.Tensor:
        """log of the elites' equal-weight mixture density of x' (reward marginalised)."""
        return ensemble.elite_mixture_log_density(obs, act, next_obs)

    def nu_value(self, obs, act, next_obs) -> torch.Tensor:
        """nu(x'|x, a), softly bounded to (-nu_clip, nu_clip) by c tanh(raw / c) when set."""
        raw = self.nu(torch.cat([obs, act, next_obs], -1)).squeeze(-1)
        c = self.config.nu_clip
        return raw if c is None else c * torch.tanh(raw / c)

    def log_ratio(self, obs, act, next_obs) -> torch.Tensor:
        """Estimate of log q_d(x'|x,a) / p(x'|x,a)."""
        if self.config.log_ratio == "nu":
            return self.nu_value(obs, act, next_obs)
        with torch.no_grad():
            return self.ensemble_log_density(self.q_dynamics, obs, act, next_obs) \
                - self.ensemble_log_density(self.ensemble, obs, act, next_obs)

    def nu_loss(self, q_side: tuple, p_side: tuple, step: int) -> torch.Tensor:
        """-(E_{x'~q_d}[nu] - E_{x'~p}[exp nu]), the f-divergence dual (VMBPO eq. 21), on
        ``q_side`` = (x, a, x' ~ q_d) and ``p_side`` = (x, a, x' ~ p): p_theta's samples
        (``nu_reference='model'``) or real transitions ('real')."""
        nu_q = self.nu_value(*q_side)
        nu_p = self.nu_value(*p_side)
        return -(nu_q.mean() - self._exp_weight(nu_p, "exp(nu)", step).mean())

    def nu_samples(self, real: Batch, reference: str, model: tuple | None = None) -> tuple[tuple, tuple]:
        """The two sides of eq. 21 for one update (``nu_actions``): at the critic's model samples
        ``model`` = (its Batch, p_theta's x' for it) when 'policy' (drawn here when not given),
        else at the real batch's (x, a) with fresh draws of q_d and p_theta."""
        if self.config.nu_actions == "policy":
            batch, prior_next = self.model_samples(real) if model is None else model
            m = self.real_rows(batch.obs.shape[0])  # the rows after these are model samples
            x, a = batch.obs[m:], batch.act[m:]
            q_side = (x, a, batch.next_obs[m:])
            p_side = (x, a, prior_next) if reference == "model" else (real.obs, real.act, real.next_obs)
            return q_side, p_side
        with torch.no_grad():
            model_next, _, _ = self.q_dynamics.predict(real.obs, real.act)
            prior_next = self.ensemble.predict(real.obs, real.act)[0] if reference == "model" else real.next_obs
        return (real.obs, real.act, model_next), (real.obs, real.act, prior_next)

    def nu_update(self, real: Batch, step: int, reference: str | None = None,
                  model: tuple | None = None) -> dict[str, float]:
        """One gradient step of nu on eq. 21 (:meth:`nu_samples`; ``reference`` defaults to
        ``nu_reference``); returns the loss."""
        reference = self.config.nu_reference if reference is None else reference
        loss = self.nu_loss(*self.nu_samples(real, reference, model), step)
        metrics = self.checked(step, nu_loss=loss)
        self.gradient_step(self.nu_opt, loss)
        return metrics

    # -- model samples ----------------------------------------------------------------------
    def real_rows(self, batch_size: int) -> int:
        """How many leading rows of a critic batch keep their real transition (``real_ratio``)."""
        return round(self.config.real_ratio * batch_size)

    def model_samples(self, real: Batch, q=None) -> tuple[Batch, torch.Tensor]:
        """x from D_env, a ~ q_c, x' ~ q_d, r ~ p_theta (beta Algorithm 1); the first
        ``real_ratio`` of the rows keep the real (a, r, x', done) of ``real`` instead. Also
        returns p_theta's own x' for the model rows (the same pass as r), which nu's dual reads
        (``nu_actions='policy'``).

        Each model row runs through one sampled elite of each ensemble
        (:meth:`~models.dynamics.GaussianEnsemble.elite_rows`, the batch split over the
        elites), the same per-row distribution as a full pass with a per-row draw at 1 / E of
        its cost. ``q``: q_c's distribution on ``real.obs``, if already computed (the actions are
        drawn from it, no gradient)."""
        obs = real.obs
        with torch.no_grad():
            act = (self.policy(obs) if q is None else q).sample()
            n_real = self.real_rows(obs.shape[0])
            m_obs, m_act = obs[n_real:], act[n_real:]
            next_obs, _, _ = self.q_dynamics.predict(m_obs, m_act)
            prior_next, rew, _ = self.ensemble.predict(m_obs, m_act)
            done = torch.zeros_like(rew)
            if self.termination_fn is not None:
                done = torch.as_tensor(self.termination_fn(*(t.cpu().numpy() for t in (m_obs, m_act, next_obs))),
                                       dtype=torch.float32)
            if n_real:
                act = torch.cat([real.act[:n_real], m_act])
                rew, next_obs, done = (torch.cat([r[:n_real], m]) for r, m in (
                    (real.rew, rew), (real.next_obs, next_obs), (real.done, done)))
        return Batch(obs, act, rew, next_obs, done), prior_next

    def fill_model_buffer(self) -> int:
        """beta Algorithm 1's rollouts (model_samples='buffer'): ``model_rollouts`` states from
        D_env, a ~ q_c, x' ~ q_d, r ~ p_theta, one step, into the model buffer (``done`` by the
        env's termination function where it has one); returns how many were added."""
        def model_step(obs, act):
            return self.q_dynamics.predict(obs, act)[0], self.ensemble.predict(obs, act)[1]

        data = policy_rollouts(self.policy, model_step, self.replay, self.rng, self.config.model_rollouts, 1,
                               self.termination_fn)
        self.model_buffer.add_batch(**data)
        return len(data["obs"])

    def batch_log_ratio(self, batch: Batch) -> torch.Tensor | None:
        """log q_d/p on a model batch where the critic uses it (:attr:`critic_needs_log_ratio`;
        None otherwise); the elite mixtures' densities are computed only for the ensembles'."""
        if not self.critic_needs_log_ratio:
            return None
        with torch.no_grad():
            return self.log_ratio(batch.obs, batch.act, batch.next_obs)

    @property
    def uses_nu(self) -> bool:
        """Whether the agent holds and trains nu: VMBPO's model-based E-step with ``log_ratio='nu'``."""
        return self.config.e_step == "model_based" and self.config.log_ratio == "nu"

    @property
    def critic_needs_log_ratio(self) -> bool:
        """Whether every E-step update needs log q_d/p on its model batch: the critic's target has
        it (eq. 23), or the dual on beta steps after every update ('adam_log')."""
        c = self.config
        return c.e_step == "model_based" and (c.critic_log_ratio or (c.learn_beta and c.beta_update == "adam_log"))

    def kl_estimate(self) -> float:
        """KL(q_d || p) = E_{x ~ D, a ~ q_c, x' ~ q_d}[log q_d/p] on one fresh batch: the dual's KL
        (beta eq. 9) and the logged ``kl_dynamics`` when no update computed the log-ratio."""
        with torch.no_grad():
            obs = self.replay.sample(self.config.batch_size, self.rng).obs
            return self.batch_kl(obs, self.policy(obs).sample())

    def batch_kl(self, obs: torch.Tensor, act: torch.Tensor, ensembles: bool = False) -> float:
        """KL(q_d || p) on a batch: the mean of log q_d/p at x' ~ q_d(.|obs, act), by the agent's
        :meth:`log_ratio` or (``ensembles``) by the two ensembles' elite mixtures."""
        with torch.no_grad():
            next_obs, _, _ = self.q_dynamics.predict(obs, act)
            if not ensembles:
                return float(self.log_ratio(obs, act, next_obs).mean())
            return float((self.ensemble_log_density(self.q_dynamics, obs, act, next_obs)
                          - self.ensemble_log_density(self.ensemble, obs, act, next_obs)).mean())

    # -- step 3: critic ---------------------------------------------------------------------
    def critic_td_target(self, batch: Batch, log_ratio: torch.Tensor | None) -> torch.Tensor:
        """r + gamma (1 - d) V'(x') - (1/scale) log q_d/p  (eq. 23; beta eq. 12, App. C.3)."""
        y = batch.rew + self.config.gamma * (1 - batch.done) * self.soft_value_target(batch.next_obs)
        if log_ratio is not None and self.config.critic_log_ratio:
            y = y - log_ratio / self.scale
        return y

    def critic_loss(self, batch: Batch, log_ratio: torch.Tensor | None, step: int) -> torch.Tensor:
        q1, q2 = self.critic(batch.obs, batch.act)
        if self.config.e_step == "model_free":
            # eq. (39): (exp(tau scale (Q - r - gamma V'(x'))) - 1)^2 / tau^2 on real transitions,
            # continued linearly beyond the TD clamp when td_clamp is set (exp_td_loss)
            # (or the linex loss, exp_td_form='linex', whose exponent is -logit)
            y = self.critic_td_target(batch, None)
            tau = self.config.exp_td_temperature
            linex = self.config.exp_td_form == "linex"
            loss = torch.zeros(())
            for q in (q1, q2):
                logit = tau * self.scale * (q - y)
                if self.config.td_clamp is None:
                    self._check_exponent(-logit if linex else logit, "exp-TD critic", step)
                per_sample = (linex_td_loss if linex else exp_td_loss)(logit, self.config.td_clamp)
                loss = loss + per_sample.mean() / tau ** 2
            return loss
        y = self.critic_td_target(batch, log_ratio)
        return F.mse_loss(q1, y) + F.mse_loss(q2, y)

    def value_loss(self, obs: torch.Tensor, q=None, prior=None) -> torch.Tensor:
        """(V(x) - [Q(x,a) - (1/scale) log q_c(a|x)/pi(a|x)])^2, a ~ q_c (eqs. 24, 40); with the
        entropy regulariser the target also has SAC's - alpha log q_c(a|x) (as the implicit V).
        ``q``, ``prior``: q_c's and pi's distributions on ``obs``, if already computed."""
        with torch.no_grad():
            a, ratio, log_q = self.policy_log_ratio(obs, q, prior)
            target = self.critic.min(obs, a) - ratio / self.scale
            if self.config.entropy_regularizer:
                target = target - self.alpha * log_q
        return F.mse_loss(self.value(obs), target)

    # -- step 4: actor ----------------------------------------------------------------------
    def actor_loss(self, obs: torch.Tensor, q=None, prior=None) -> tuple[torch.Tensor, dict[str, float]]:
        """-ELBO / (B scale) of actor_model (prior pi, factor scale * Q) vs q_c: eq. (25) / eq. (13).
        ``q`` (differentiable) and ``prior``: q_c's and pi's distributions on ``obs``, if already
        computed (:meth:`e_step_update` computes them once for the value step and this one)."""
        # q_c's distribution on the batch, computed once: the guide samples from it and the
        # entropy bonus takes its own sample from it (one policy forward and backward, not two)
        d = self.policy(obs) if q is None else q
        prior_policy = self.prior_policy if prior is None else (lambda _obs: prior)
        critic = self.critic_target if self.config.actor_critic == "target" else self.critic  # eq. 13's Q' / eq. 25's Q
        with frozen(*self.actor_frozen_modules()):  # (the target critic never requires gradients)
            loss = self.actor_elbo.differentiable_loss(actor_model, actor_guide, obs, prior_policy, critic.min,
                                                       self.scale, policy=lambda _obs: d,
                                                       sticking_the_landing=self.config.sticking_the_landing)
        loss = loss / (obs.shape[0] * self.scale)
        if self.config.entropy_regularizer:  # + alpha E_q[log q], on its own reparameterised sample
            self._log_q = d.log_prob(d.rsample())
            loss = loss + self.alpha * self._log_q.mean()
        return loss, self.actor_elbo.last_terms

    # -- M-step ---------------------------------------------------------------------------
    def m_step(self, obs: torch.Tensor) -> float:
        if self.config.m_step == "copy":
            self.prior_policy.load_state_dict(self.policy.state_dict())
            return 0.0
        # eq. (27): max E_{a~q_c}[log pi(a|x)] - lambda KL(pi_old || pi)
        old = copy.deepcopy(self.prior_policy)
        for p in self.prior_policy.parameters():
            p.requires_grad_(True)
        loss = torch.zeros(())
        for _ in range(self.config.map_steps):
            with torch.no_grad():
                a = self.policy(obs).sample()
                d_old = old(obs)
                a_old = d_old.sample()
            d_new = self.prior_policy(obs)
            kl = (d_old.log_prob(a_old) - d_new.log_prob(a_old)).mean()
            loss = -d_new.log_prob(a).mean() + self.config.map_lambda * kl
            self.gradient_step(self.map_opt, loss)
        for p in self.prior_policy.parameters():
            p.requires_grad_(False)
        return float(loss.detach())

    # -- dual on beta ---------------------------------------------------------------------
    def dual_beta_loss(self, kl: float) -> torch.Tensor:
        """beta (epsilon - KL(q_d || p))  (beta eq. 9); descent raises beta when KL > epsilon."""
        return self.log_beta.exp() * (self.config.epsilon_kl - kl)

    def update_beta(self, kl: float) -> None:
        """One step of the dual (eq. 9) on the KL estimate ``kl``, beta clamped to
        [beta_min, beta_max] (App. C.4's 1e7): a plain gradient step on beta
        (``beta_update='algorithm1'``) or an Adam step on log beta ('adam_log')."""
        c = self.config
        if c.beta_update == "algorithm1":
            beta = self.beta - c.beta_lr * (c.epsilon_kl - kl)  # dJ/dbeta = epsilon - KL
            beta = min(max(beta, c.beta_min), c.beta_max)
            with torch.no_grad():
                self.log_beta.fill_(float(np.log(beta)))
            return
        loss = self.dual_beta_loss(kl)
        self.gradient_step(self.beta_opt, loss)
        with torch.no_grad():
            self.log_beta.clamp_(float(np.log(c.beta_min)), float(np.log(c.beta_max)))

    # -- the loop -------------------------------------------------------------------------
    def update(self, step: int) -> dict[str, float]:
        c = self.config
        if self.steps_seen < max(c.learning_starts, c.batch_size):
            return {}
        out: dict[str, float] = {}
        if c.fit_dynamics and (step % c.model_train_freq == 0 or not self.q_dynamics_fitted):
            # every model_train_freq steps: p_theta by eq. (10), then q_d by step 1 (eq. 19/11);
            # VMBPO-MFE only with fit_dynamics=True (its Algorithm 2 has no model; for the log)
            info = self.fit_model()
            out["model_holdout_mse"] = elite_holdout_mse(info)
            out.update(self.fit_variational_dynamics(step))
            if self.model_buffer is not None:
                out["model_rollouts"] = self.fill_model_buffer()
        kls = []
        for _ in range(c.gradient_steps):
            metrics = self.e_step_update(step)
            out.update(metrics)
            if "kl_dynamics" in metrics:
                kls.append(metrics["kl_dynamics"])
            self.e_steps += 1
            if self.e_steps % c.m_step_every == 0:
                out["m_step_loss"] = self.m_step(self.replay.sample(c.batch_size, self.rng).obs)
        if not kls and c.e_step == "model_based":
            # no update computed log q_d/p (beta-VMBPO's critic has no log term): one estimate
            # per env step, on a fresh batch, for the dual and the log
            self.last_kl = self.kl_estimate()
            kls = [self.last_kl]
            out["kl_dynamics"] = self.last_kl
        kls = [k for k in kls if np.isfinite(k)]
        if c.learn_beta and c.beta_update == "algorithm1" and kls:
            self.update_beta(float(np.mean(kls)))  # Algorithm 1: once per environment step
            out["beta"] = self.beta
        if c.learn_beta:
            out["epsilon_kl"] = c.epsilon_kl
        return out

    def e_step_update(self, step: int) -> dict[str, float]:
        c = self.config
        real = self.replay.sample(c.batch_size, self.rng)
        metrics: dict[str, float] = {}
        # step 2 (VMBPO): nu by the f-divergence dual, before the critic's target reads it; at the
        # real batch's (x, a) before the model samples are drawn (the random streams of 'replay'
        # are those of pplrl before nu_actions existed), or on those samples ('policy')
        nu = self.uses_nu
        if nu and c.nu_actions == "replay":
            metrics.update(self.nu_update(real, step))
        # the critic's samples: the model buffer's (beta Algorithm 1), fresh model samples, or
        # real data (model-free); q is q_c on their states, computed once: the fresh samples'
        # actions, then (the critic and nu steps change neither policy) the value target's and
        # the actor's distribution
        if self.model_buffer is not None:
            batch = sample_mixed(self.replay, self.model_buffer, c.batch_size, c.real_ratio, self.rng)
            q = self.policy(batch.obs)
        else:
            q = self.policy(real.obs)
            batch, prior_next = self.model_samples(real, q) if c.e_step == "model_based" else (real, None)
            if nu and c.nu_actions == "policy":
                metrics.update(self.nu_update(real, step, model=(batch, prior_next)))
        log_ratio = self.batch_log_ratio(batch)  # None where the critic does not read it
        # step 3: critic
        critic_loss = self.critic_loss(batch, log_ratio, step)
        metrics.update(self.checked(step, critic_loss=critic_loss))
        self.gradient_step(self.critic_opt, critic_loss)
        # pi on the batch's states, once for the value target and the actor (the value step
        # changes neither policy)
        with torch.no_grad():
            prior = self.prior_policy(batch.obs)
        if c.value_network:
            value_loss = self.value_loss(batch.obs, q, prior)
            metrics.update(self.checked(step, value_loss=value_loss))
            self.gradient_step(self.value_opt, value_loss)
        # step 4: actor (Pyro ELBO)
        actor_loss, terms = self.actor_loss(batch.obs, q, prior)
        metrics.update(self.checked(step, actor_loss=actor_loss))
        self.gradient_step(self.actor_opt, actor_loss)
        if c.entropy_regularizer and c.autotune_alpha:
            alpha_loss = -self.log_alpha * (float(self._log_q.detach().mean()) + self.target_entropy)
            self.gradient_step(self.alpha_opt, alpha_loss)
            metrics["alpha"] = float(self.alpha)
        # KL(q_d || p) = E_{x'~q_d}[log q_d/p]: the mean of the log-ratio estimate on the model
        # samples (model-based E-step); VMBPO-MFE has no model samples here and logs it at fits
        if log_ratio is not None:
            self.last_kl = float(log_ratio.mean())
            if c.learn_beta and c.beta_update == "adam_log":
                self.update_beta(self.last_kl)
        polyak_update(self.critic, self.critic_target, c.tau)
        polyak_update(self.value, self.value_target, c.tau)
        B = batch.obs.shape[0]
        metrics.update({"beta": self.beta, **self.elbo_metrics(terms, B)})
        if log_ratio is not None:
            metrics["kl_dynamics"] = self.last_kl
        return metrics

    # -- checkpoints ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        if self.ensemble is not None:
            state.update({"ensemble": self.ensemble.state_dict(), "ensemble_optim": self.ensemble.optimizer_state(),
                          "q_dynamics": self.q_dynamics.state_dict(),
                          "q_dynamics_optim": self.q_dynamics.optimizer_state()})
        state.update({
            "prior_policy": self.prior_policy.state_dict(),
            "q_dynamics_fitted": self.q_dynamics_fitted, "value": self.value.state_dict(),
            "value_target": self.value_target.state_dict(), "value_opt": self.value_opt.state_dict(),
            "log_beta": self.log_beta.detach().clone(), "beta_opt": self.beta_opt.state_dict(),
            "map_opt": self.map_opt.state_dict(), "e_steps": self.e_steps, "last_kl": self.last_kl})
        if self.nu is not None:
            state.update({"nu": self.nu.state_dict(), "nu_opt": self.nu_opt.state_dict()})
        if self.model_buffer is not None:
            state["model_buffer"] = self.model_buffer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        if self.ensemble is not None:
            self.ensemble.load_state_dict(state["ensemble"])
            self.ensemble.load_optimizer_state(state["ensemble_optim"])
            self.q_dynamics.load_state_dict(state["q_dynamics"])
            self.q_dynamics.load_optimizer_state(state["q_dynamics_optim"])
        self.prior_policy.load_state_dict(state["prior_policy"])
        self.q_dynamics_fitted = state["q_dynamics_fitted"]
        if self.nu is not None:
            self.nu.load_state_dict(state["nu"])
            self.nu_opt.load_state_dict(state["nu_opt"])
        self.value.load_state_dict(state["value"])
        self.value_target.load_state_dict(state["value_target"])
        self.value_opt.load_state_dict(state["value_opt"])
        with torch.no_grad():
            self.log_beta.copy_(state["log_beta"])
        self.beta_opt.load_state_dict(state["beta_opt"])
        self.map_opt.load_state_dict(state["map_opt"])
        self.e_steps, self.last_kl = state["e_steps"], state["last_kl"]
        if self.model_buffer is not None:
            self.model_buffer.load_state_dict(state["model_buffer"])


@dataclass
class VMBPOMFEConfig(VMBPOConfig):
    e_step: str = "model_free"
    fit_dynamics: bool = False
    """Algorithm 2 has no dynamics model (see VMBPOConfig.fit_dynamics); True fits p_theta and
    q_d for the log only, at about 4 ms per update on Pendulum-v1 (experiments/bench_update.py)"""
    m_step_every: int = 250
    exp_td_temperature: float = 0.01
    """0.01, not eq. (39)'s tau = 1 (the temperature of VMBPO Sec. 6, footnote 3): at tau 1 a Q
    above its target is pulled down far harder than one below it is pushed up (measurements:
    docs/notes.md, 'vmbpo-mfe: exp_td_temperature')"""


@dataclass
class BetaVMBPOConfig(VMBPOConfig):
    """beta paper App. C.2 defaults: beta init 100, epsilon 0.1, TD clamp 4; App. C.1: no
    log term in the critic; Sec. 3.3: V implicit in Q'."""

    use_beta: bool = True
    beta_init: float = 100.0
    learn_beta: bool = True
    td_clamp: float | None = 4.0
    log_ratio: str = "ensembles"
    critic_log_ratio: bool = False
    value_network: bool = False
    entropy_regularizer: bool = True

    #: the papers' schedule (VMBPOConfig.preset) with App. C.2's networks, Algorithm 1's model buffer
    #: and eq. 13's target critic in the actor
    presets: ClassVar[dict[str, dict]] = {"paper": {**PAPER_SCHEDULE, "model_samples": "buffer",
                                                    "actor_critic": "target"}}


class VMBPO(VariationalAgent):
    """VMBPO (Algorithm 1): eta = 1, nu network, V network, pi <- q_c."""

    algo = "vmbpo"
    Config = VMBPOConfig


class VMBPOMFE(VariationalAgent):
    """VMBPO-MFE (Algorithm 2): exp-TD critic on real data, no dynamics model (``fit_dynamics``)."""

    algo = "vmbpo-mfe"
    Config = VMBPOMFEConfig


class BetaVMBPO(VariationalAgent):
    """beta-VMBPO (Algorithm 1 of 001_…): dual beta, ensemble log-ratio, clamped TD, implicit V."""

    algo = "beta-vmbpo"
    Config = BetaVMBPOConfig
