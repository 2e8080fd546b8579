"""Active Variational EM (003_…, App. B, Algorithm 1): the generative and the
discriminative POMDP agents.

Per environment step (``act``): **E-step** — state inference, the amortised filter
q(z_t | z_{t-1}, a_{t-1}, x_t, r_t) (:class:`guides.pomdp.FilteringGuide`), then action
inference, q(a_t) by planning under the agent's own model (eq. 10,
:class:`pplrl.pomdp_planning.CEMPlanner`) starting from the amortised q(a_t | z_t)
(:class:`guides.pomdp.ActionPosterior`), or the consolidated prior p_a(a_t | z_t) alone
when ``plan=False``; **interaction** — a_t ~ q(a_t), clipped to [-1, 1]. Per update
(``update``): **learning** on windows of T steps from the replay — the bound
(eq. 8 generative, eq. 6 discriminative; :class:`pplrl.elbo.POMDPELBO` on
:func:`models.pomdp.pomdp_model` / :func:`guides.pomdp.pomdp_guide`) trains the guide
(amortised E-step) and the model (M-step) with separate optimisers; its KL(q(a_t) ||
p_a(a_t | z_t)) term trains the action prior toward the planner (consolidation).
The bound's marginal -log p(x_t, r_t | z_<t) is an upper estimate (the guide's z_t among K
prior proposals, :mod:`pplrl.infogain`), so the logged ``elbo_elbo`` is a lower bound and
``elbo_info_gain`` a lower estimate of the gain (<= log(K+1) per step). The learning loss is
eq. 8 plus (1 - ``marginal_weight``) log p(x, r | z_<t): eq. 8 alone (weight 1) does not ask
the model to predict x and r (with the exact marginal, info_gain - kl_z = -KL(q || posterior),
maximal for a model whose z ignores x), so the default 0 reads the paper's objective as
eq. 8 for inference and planning plus the evidence for the model (measurements:
experiments/eq8_model_fit.py). The planner's information gain is belief-level: pooled over
``particles`` samples of q(s_t) and ``ensemble`` transition heads, with common random
numbers across candidates (:mod:`pplrl.pomdp_planning`).
A critic Q(z, a) (SARSA on the executed actions, in reward units) bootstraps the bound
beyond the planning horizon; the discriminative agent, which has no model to roll out,
plans with horizon 0 on it, and its critic's gradient shapes its encoder.

Choices that are not in the paper (each a config field, see the fields' docstrings;
measurements on velocity-hidden Pendulum: the 'generative agent' sections of docs/notes.md): the
RSSM state s_t = [h_t, z_t] (models.pomdp); fixed emitter scales (``x_scale``,
``r_scale``); optional free nats and overshooting in the model loss; the critic's
SARSA(lambda) target; piecewise-constant warm-up actions (``warmup_hold``) and an
exploration floor (``explore_scale``) on the executed action; action repeat
(``action_repeat``: one decision, one model step, per k environment steps, rewards summed)
and several updates per decision (``gradient_steps``), which are what made the agent
learn the task.

Observations come from a POMDP view ``[x_t, r_t, first_t]`` (:mod:`pplrl.envs.pomdp`);
a fully observed env raises. Acting carries the filter's state through the whole episode
(one update per decision, from zeros at ``first_t``), one stream for training and one
for deterministic evaluation; each stored step keeps the state before it, and training
windows start from it (R2D2's stored state, Kapturowski et al. 2019; not in the paper), so the
filter is trained on the states it acts from.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from guides.pomdp import ActionPosterior, FilteringGuide, pomdp_guide
from models.pomdp import POMDPModel, Window, check_samples, check_window, pomdp_model
from models.sites import site
from pplrl.algorithms.base import Agent, check_pyro_validation
from pplrl.device import resolve_device
from pplrl.diagnostics import importance_weight_diagnostics
from pplrl.elbo import POMDPELBO
from pplrl.envs.continuous import make_continuous_env
from pplrl.envs.pomdp import pomdp_spec, split_view
from pplrl.nets import mlp, polyak_update, target_copy
from pplrl.pomdp_planning import CEMPlanner, PlannerConfig

#: q(a) stored for uniformly random warm-up actions: the moment-matched Gaussian of U(-1, 1)
UNIFORM_SCALE = float(np.sqrt(1.0 / 3.0))


@dataclass
class GenerativeAgentConfig:
    env_id: str = "pplrl/PendulumNoVel-v0"
    """a POMDP env id (pplrl.envs.pomdp); fully observed envs are refused"""
    seed: int = 0
    z_dim: int = 8
    h_dim: int = 64
    hidden: int = 64
    window: int = 8
    """T, steps per training window"""
    batch_size: int = 16
    """windows per update"""
    lr_model: float = 3e-3
    """Adam step of the model (M-step). 3e-3, not 1e-3 (not in the paper): offline refits predict
    better and learn the actions' effect sooner (measurements: docs/notes.md, 'generative agent: lr_model')"""
    lr_guide: float = 3e-3
    """Adam step of the filter (amortised E-step); as ``lr_model``"""
    lr_critic: float = 1e-3
    x_scale: float = 0.1
    """fixed std of p_a(x_t | s_t) (0: learned; not in the paper, see models.pomdp.Emitter)"""
    r_scale: float = 1.0
    """fixed std of p_a(r_t | s_t) (0: learned)"""
    free_nats: float = 0.0
    """PlaNet's free nats on KL(q(z_t) || p(z_t)) in the loss (pplrl.elbo.POMDPELBO; 0: the bound)"""
    temperature: float = 1.0
    """optimality log-likelihood r / temperature (eq. 3)"""
    info_gain_samples: int = 8
    """K, prior proposals of log p(x_t, r_t | z_<t) in the bound, with the guide's z_t among them
    (pplrl.infogain.contrastive_log_marginal: an upper estimate, so the logged eq. 8 stays a bound)"""
    weight_diagnostics_every: int = 100
    """env steps between PSIS checks of the bound's K-sample marginal: its likelihood weights
    p(x_t, r_t | z) at the window's last step, z ~ p(z_t | z_<t), redrawn 256 times for 8
    windows; logs ``marginal_weight_khat`` (the largest Pareto k-hat) and
    ``marginal_weight_ess_frac`` (the mean ESS / draws); 0: off. It does not touch the
    training random streams (the torch RNG state is restored)."""
    marginal_weight: float = 0.0
    """weight w of -log p(x, r | z_<t) in the learning loss: the loss is -(eq. 8) - (1 - w) log p(x, r | z_<t).
    1: eq. 8 as written (a bound on log p(O) alone; its model gradient does not ask the model to
    predict x, r, since with the exact marginal info_gain - kl_z = -KL(q || posterior));
    0: eq. 8 + log p(x, r | z_<t), i.e. reward + the sequential-VAE bound on log p(x, r), the
    model-fitting reading (default). The reported elbo is always eq. 8 (measurements: the
    'eq. 8 as written' notes entry, experiments/eq8_model_fit.py)"""
    plan: bool = True
    """plan (eq. 10) at every step; False acts with the consolidated prior alone"""
    plan_info_gain: bool = True
    """the mutual-information term in the planning objective"""
    horizon: int = 6
    """model steps (decisions) planned ahead; with action repeat 4, 6 (24 env steps) suffice for
    the Pendulum swing-up (measurements: docs/notes.md, 'generative agent: horizon')"""
    candidates: int = 64
    elites: int = 8
    cem_iterations: int = 3
    particles: int = 16
    """samples of q(s_t) the planner scores each candidate on: the belief (issue 19: >= 16 so
    the belief-level information gain, at most log(particles), can rank candidates)"""
    plan_info_gain_mode: str = "belief"
    """'belief': the gain pooled over the particles and ensemble members; 'transition': per
    particle (the earlier planner; pplrl.pomdp_planning)"""
    plan_info_gain_weight: float = 1.0
    """scale of the information gain in the planning score (1: eq. 10)"""
    plan_info_gain_samples: int = 4
    """K prior draws per particle of the 'transition' mode"""
    ensemble: int = 1
    """M transition heads (the model's epistemic uncertainty; not in the paper; models.pomdp.Transition)"""
    marginal_anneal: int = 0
    """updates over which the loss's marginal weight rises linearly from 0 to ``marginal_weight``
    (the paper's suggested annealing, Sec. 4, Bowman et al. 2016; 0: none)"""
    action_hold: int = 1
    """CEM perturbations held for this many steps (pplrl.pomdp_planning.PlannerConfig)"""
    gamma: float = 0.99
    overshooting: int = 0
    """D > 0 adds open-loop prediction of x, r up to D steps from each filtered z_t (under
    the executed actions) to the model loss, as PlaNet's overshooting; not part of the
    paper's bound (0: the bound only). Off: it did not help at the default settings and costs
    time per update (measurements: docs/notes.md, 'generative agent: overshooting')"""
    amortised_action: bool = True
    """start planning from an amortised q(a_t | z_t) trained toward the planner's output"""
    critic: bool = True
    """learn Q(s, a) to bootstrap beyond the horizon"""
    critic_lambda: float = 0.9
    """lambda of the critic's SARSA(lambda) target within a window (0: one-step SARSA)"""
    tau: float = 0.01
    learning_starts: int = 200
    """uniformly random steps before learning and planning"""
    explore_scale: float = 0.3
    """training actions are drawn from N(q's mean, max(q's scale, explore_scale)) (not in the
    paper; PlaNet's exploration noise 0.3): the planner's elite spread alone is too little to
    show the model the effect of actions it does not yet predict (docs/notes.md, 'generative
    agent: explore_scale'). q(a) itself is stored unchanged for consolidation"""
    warmup_hold: int = 3
    """each warm-up action is a uniform draw held for this many decisions (12 env steps at
    the default action repeat 4) (piecewise-constant random torques; not in the paper; 1:
    i.i.d. uniform): i.i.d. torques average out within a few steps on Pendulum, and the
    learned transition then ignored the actions (docs/notes.md, 'generative agent: warmup_hold')"""
    action_repeat: int = 4
    """k: each decision's action is executed for k environment steps and the agent sees
    the k-th observation with the sum of the k rewards (PlaNet's action repeat, 2-8 there;
    not in the paper). One model step is then k environment steps: ``window``, ``horizon``,
    ``action_hold``, ``warmup_hold``, ``update_every`` and ``gamma`` count decisions, while
    ``learning_starts`` and the runner's steps count environment steps. The episode's last
    block may be shorter (truncation, termination). 1: every step is a decision. 4: with 1
    the learned model underestimated the effect of actions and the agent did not learn
    (measurements: docs/notes.md, 'generative agent: action_repeat')"""
    gradient_steps: int = 4
    """updates per learning step. 4, not 1 (not in the paper): the model's open-loop
    predictions improve with the number of updates, not the data (measurements: docs/notes.md,
    'generative agent: gradient_steps')"""
    update_every: int = 1
    """learn every this many decisions (gradient_steps updates each time)"""
    buffer_size: int = 100_000
    generative: bool = True
    device: str = "cpu"
    """where the agent's networks and sampled windows live: 'cpu', 'cuda' (or 'cuda:N'), or 'auto'
    (CUDA when a GPU is present); the sequence replay stays in host memory (pplrl.device)"""
    pyro_validation: str = "first"
    """Pyro's and torch's checks in ``update``: 'first' (the first update that trains, then
    off), 'always', 'never' (pplrl.algorithms.base.validated_update)"""

    def validate(self) -> None:
        resolve_device(self.device)
        check_pyro_validation(self.pyro_validation)
        check_window(self.window)
        check_samples(self.info_gain_samples)
        check_samples(self.plan_info_gain_samples)
        if isinstance(self.action_repeat, bool) or not isinstance(self.action_repeat, int) or self.action_repeat < 1:
            raise ValueError(f"action_repeat must be an integer >= 1, got {self.action_repeat!r}")
        for name in ("z_dim", "h_dim", "hidden", "warmup_hold", "batch_size", "lr_model", "lr_guide", "lr_critic",
                     "temperature", "gradient_steps", "update_every", "buffer_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.learning_starts < 0:
            raise ValueError("learning_starts must be >= 0")
        if self.buffer_size < self.window:
            raise ValueError("buffer_size must hold at least one window")
        if not 0 < self.tau <= 1 or not 0 < self.gamma <= 1:
            raise ValueError("tau and gamma must lie in (0, 1]")
        if not 0 <= self.critic_lambda <= 1:
            raise ValueError(f"critic_lambda must lie in [0, 1], got {self.critic_lambda}")
        if self.x_scale < 0 or self.r_scale < 0 or self.free_nats < 0 or self.explore_scale < 0:
            raise ValueError("x_scale, r_scale, free_nats and explore_scale must be >= 0 (x/r scales: 0 = learned)")
        if isinstance(self.weight_diagnostics_every, bool) or not isinstance(self.weight_diagnostics_every, int) \
                or self.weight_diagnostics_every < 0:
            raise ValueError(f"weight_diagnostics_every must be an integer >= 0, got {self.weight_diagnostics_every!r}")
        if self.marginal_weight < 0:
            raise ValueError("marginal_weight must be >= 0")
        if isinstance(self.ensemble, bool) or not isinstance(self.ensemble, int) or self.ensemble < 1:
            raise ValueError(f"ensemble must be an integer >= 1, got {self.ensemble!r}")
        if isinstance(self.marginal_anneal, bool) or not isinstance(self.marginal_anneal, int) \
                or self.marginal_anneal < 0:
            raise ValueError(f"marginal_anneal must be an integer >= 0, got {self.marginal_anneal!r}")
        if self.overshooting < 0:
            raise ValueError("overshooting must be >= 0")
        if not self.generative and self.plan and self.horizon > 0:
            raise ValueError("the discriminative agent has no model to plan with: set horizon=0 (or plan=false)")
        self.planner_config().validate()

    def planner_config(self) -> PlannerConfig:
        return PlannerConfig(horizon=self.horizon, candidates=self.candidates, elites=self.elites,
                             iterations=self.cem_iterations, particles=self.particles,
                             info_gain=self.plan_info_gain and self.generative,
                             info_gain_samples=self.plan_info_gain_samples, temperature=self.temperature,
                             info_gain_mode=self.plan_info_gain_mode, info_gain_weight=self.plan_info_gain_weight,
                             gamma=self.gamma, action_hold=self.action_hold)


@dataclass
class DiscriminativeAgentConfig(GenerativeAgentConfig):
    generative: bool = False
    horizon: int = 0
    """no model: the planner only ranks a_t by log p_a(a_t | z_t) + Q(z_t, a_t) / temperature"""
    plan_info_gain: bool = False


class SequenceReplay:
    """Per-step storage of one stream of episodes, sampled as windows of T consecutive
    steps that never cross an episode start or the write pointer (circular buffer)."""

    FIELDS = ("x", "r", "first", "a_prev", "act", "qa_loc", "qa_scale", "rew", "done", "s_prev")

    def __init__(self, x_dim: int, a_dim: int, capacity: int, s_dim: int = 0):
        self.capacity, self.ptr, self.size = int(capacity), 0, 0
        shapes = {"x": (x_dim,), "r": (), "first": (), "a_prev": (a_dim,), "act": (a_dim,), "qa_loc": (a_dim,),
                  "qa_scale": (a_dim,), "rew": (), "done": (), "s_prev": (s_dim,)}
        self.data = {k: np.zeros((self.capacity, *shapes[k]), dtype=np.float32) for k in self.FIELDS}

    def __len__(self) -> int:
        return self.size

    def add(self, **step) -> None:
        """One step; ``s_prev`` (the acting filter's state before it) defaults to zeros."""
        for k in self.FIELDS:
            if k in step:
                self.data[k][self.ptr] = step[k]
            else:
                self.data[k][self.ptr] = 0.0
        self.ptr = (self.ptr + 1) % self.capacity
        self.size = min(self.size + 1, self.capacity)

    def valid_starts(self, T: int) -> np.ndarray:
        if self.size < T:
            return np.zeros(0, dtype=int)
        if self.size < self.capacity:
            starts = np.arange(0, self.size - T + 1)
        else:  # the oldest element sits at ptr; a window must not run past ptr - 1
            starts = (self.ptr + np.arange(0, self.capacity - T + 1)) % self.capacity
        idx = (starts[:, None] + np.arange(1, T)[None]) % self.capacity
        ok = ~(self.data["first"][idx] > 0.5).any(1) if T > 1 else np.ones(len(starts), bool)
        return starts[ok]

    def sample(self, B: int, T: int, rng: np.random.Generator) -> Window | None:
        starts = self.valid_starts(T)
        if len(starts) == 0:
            return None
        idx = (rng.choice(starts, size=B)[:, None] + np.arange(T)[None]) % self.capacity
        d = {k: torch.as_tensor(v[idx]) for k, v in self.data.items()}
        s0 = d["s_prev"][:, 0] if d["s_prev"].shape[-1] > 0 else None
        return Window(x=d["x"], r=d["r"], a_prev=d["a_prev"], qa_loc=d["qa_loc"], qa_scale=d["qa_scale"],
                      act=d["act"], rew=d["rew"], done=d["done"], s0=s0)

    def state_dict(self) -> dict:
        return {"ptr": self.ptr, "size": self.size, "data": {k: v.copy() for k, v in self.data.items()}}

    def load_state_dict(self, state: dict) -> None:
        self.ptr, self.size = state["ptr"], state["size"]
        for k in self.FIELDS:
            self.data[k][...] = state["data"].get(k, 0.0)  # checkpoints before s_prev: zeros


class QNetwork(torch.nn.Module):
    def __init__(self, z_dim: int, a_dim: int, hidden: int):
        super().__init__()
        self.net = mlp(z_dim + a_dim, 1, (hidden, hidden))

    def forward(self, z: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
        return self.net(torch.cat([z, a], -1)).squeeze(-1)


class FilterStream:
    """One stream of interaction (training or evaluation): the filter's state s_{t-1} of
    the current episode (carried step by step from the episode start), the last executed
    action, and, within an action-repeat block, the environment steps left to repeat it
    and the rewards seen so far."""

    def __init__(self):
        self.state: torch.Tensor | None = None
        self.a_prev: torch.Tensor | None = None
        self.repeat_left = 0
        self.reward_sum = 0.0

    def state_dict(self) -> dict:
        return {"state": self.state, "a_prev": self.a_prev, "repeat_left": self.repeat_left,
                "reward_sum": self.reward_sum}

    def load_state_dict(self, d: dict) -> None:
        self.state, self.a_prev, self.repeat_left, self.reward_sum = (d["state"], d["a_prev"], d["repeat_left"],
                                                                       d["reward_sum"])

    def begin_episode(self, act_dim: int) -> FilterStream:
        """Reset to an episode's start: no filter state yet, a zero previous action (what
        :meth:`GenerativeAgent.act` does on an episode's first observation); returns self."""
        self.state, self.a_prev, self.repeat_left, self.reward_sum = None, torch.zeros(act_dim), 0, 0.0
        return self


class GenerativeAgent(Agent):
    algo = "generative-agent"
    Config = GenerativeAgentConfig

    def __init__(self, config: GenerativeAgentConfig, obs_dim: int, act_dim: int):
        config.validate()
        env = make_continuous_env(config.env_id)
        try:
            spec = pomdp_spec(env)
        finally:
            env.close()
        if obs_dim != spec.x_dim + 2:
            raise ValueError(f"obs_dim {obs_dim} does not match the POMDP view of {config.env_id} ({spec.x_dim} + 2)")
        if config.generative != type(self).Config().generative:
            raise ValueError(f"{self.algo} needs generative={type(self).Config().generative}")
        self.config, self.obs_dim, self.act_dim, self.x_dim = config, obs_dim, act_dim, spec.x_dim
        torch.manual_seed(config.seed)
        self.rng = np.random.default_rng(config.seed)
        c = config
        self.model = POMDPModel(self.x_dim, act_dim, c.z_dim, c.hidden, generative=c.generative, h_dim=c.h_dim,
                                x_scale=c.x_scale or None, r_scale=c.r_scale or None, ensemble=c.ensemble)
        self.guide = FilteringGuide(self.x_dim, act_dim, c.z_dim, c.h_dim, c.hidden)
        s_dim = self.model.s_dim
        self.action_guide = ActionPosterior(s_dim, act_dim, c.hidden) if c.amortised_action else None
        self.action_guide_opt = (torch.optim.Adam(self.action_guide.parameters(), lr=c.lr_guide)
                                 if c.amortised_action else None)
        self.critic = QNetwork(s_dim, act_dim, c.hidden) if c.critic else None
        self.critic_target = target_copy(self.critic) if c.critic else None
        self.model_opt = torch.optim.Adam(self.model.parameters(), lr=c.lr_model)
        self.guide_opt = torch.optim.Adam(self.guide.parameters(), lr=c.lr_guide)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=c.lr_critic) if c.critic else None
        self.elbo = POMDPELBO(generative=c.generative, marginal_weight=c.marginal_weight, free_nats=c.free_nats)
        self.planner = CEMPlanner(c.planner_config())
        self.replay = SequenceReplay(self.x_dim, act_dim, c.buffer_size, s_dim=self.model.s_dim)
        self.streams = {"train": FilterStream(), "eval": FilterStream()}
        self.pending: dict | None = None
        self.pending_steps = 0
        self.steps_seen = 0
        self.decisions = 0
        self.updates = 0  # learning steps so far (the marginal weight's annealing)
        self.diagnosed_block = -1  # the last block of weight_diagnostics_every env steps whose weights were checked
        self.fresh = False
        self.warmup_action: np.ndarray | None = None
        self.last_plan: dict[str, float] = {}

    # -- E-step and interaction -------------------------------------------------------
    def value_fn(self):
        return None if self.critic is None else self.critic

    def infer_action(self, z_particles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(a_t): the planner's, or the consolidated prior's at the particles' mean."""
        if self.config.plan:
            init = None
            if self.action_guide is not None:
                qa = self.action_guide(z_particles.mean(0))
                init = (qa.mean, qa.stddev)
            loc, scale, info = self.planner.plan(self.model, z_particles, self.value_fn(), init)
            self.last_plan = info
            return loc, scale
        p = self.model.action_prior(z_particles.mean(0))
        return p.mean, p.stddev

    def filter_step(self, stream: FilterStream, x, r, deterministic: bool):
        """q(s_t) from the stream's s_{t-1} (the whole episode so far, one update per
        decision; zeros at the episode start), a_{t-1} and (x_t, r_t); the stream's state
        becomes a sample of it (its mean when deterministic). Training windows start from
        the same stored states (``Window.s0``), so the filter meets the states it acts on."""
        s_prev = stream.state if stream.state is not None else self.guide.initial_state(())
        qs = self.guide.step(self.model, s_prev, stream.a_prev, torch.as_tensor(x), torch.tensor(float(r)))
        stream.state = qs.mean if deterministic else qs.sample()
        return qs, s_prev

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        x, r, first = split_view(obs)
        s = self.streams["eval" if deterministic else "train"]
        if first or s.a_prev is None:
            s.begin_episode(self.act_dim)
        if s.repeat_left > 0:  # within an action-repeat block: hold the action, add up the rewards
            s.repeat_left -= 1
            s.reward_sum += r
            return s.a_prev.cpu().numpy().astype(np.float32)
        if not deterministic and self.pending is not None:  # the last block was cut short by truncation
            self._store()
        r, s.reward_sum = s.reward_sum + r, 0.0
        a_prev = s.a_prev
        with torch.no_grad():
            qz, s_prev = self.filter_step(s, x, r, deterministic)
            if not deterministic and self.steps_seen < self.config.learning_starts:
                a = torch.as_tensor(self.held_uniform_action(self.decisions, self.config.warmup_hold))
                loc, scale = torch.zeros(self.act_dim), torch.full((self.act_dim,), UNIFORM_SCALE)
            else:
                # the belief's particles in evaluation too: the planner's information gain is a property
                # of the belief's spread (its mean alone would carry none)
                particles = qz.sample((self.config.particles,))
                loc, scale = self.infer_action(particles)
                noise = torch.zeros(self.act_dim) if deterministic else torch.as_tensor(
                    self.rng.standard_normal(self.act_dim), dtype=torch.float32)
                a = loc + scale.clamp_min(self.config.explore_scale) * noise
        a = a.clamp(-1.0, 1.0)
        s.a_prev = a
        s.repeat_left = self.config.action_repeat - 1
        if not deterministic:
            self.pending = dict(x=x, r=r, first=float(first), a_prev=a_prev.cpu().numpy(), act=a.cpu().numpy(),
                                qa_loc=loc.cpu().numpy(), qa_scale=scale.cpu().numpy(), rew=0.0, done=0.0,
                                s_prev=s_prev.cpu().numpy())
            self.pending_steps = 0
        return a.cpu().numpy().astype(np.float32)

    def observe(self, obs, act, rew, next_obs, terminated: bool) -> None:
        """Adds the step's reward to the current decision's; the decision goes to the replay
        when its block of ``action_repeat`` steps is complete or the episode terminates."""
        if self.pending is None:
            raise RuntimeError("observe() without a preceding act() on the training stream")
        self.pending["rew"] += float(rew)
        self.pending["done"] = float(terminated)
        self.pending_steps += 1
        self.steps_seen += 1
        if terminated or self.pending_steps == self.config.action_repeat:
            self._store()

    def _store(self) -> None:
        self.replay.add(**self.pending)
        self.pending = None
        self.decisions += 1
        self.fresh = True

    # -- learning (M-step, amortised E-step, consolidation, critic) --------------------
    def update(self, step: int) -> dict[str, float]:
        c = self.config
        fresh, self.fresh = self.fresh, False  # learn once per decision, after it was stored
        if not fresh or self.steps_seen < max(c.learning_starts, 1) or self.decisions % c.update_every:
            return {}
        out: dict[str, float] = {}
        for _ in range(c.gradient_steps):
            window = self.replay.sample(c.batch_size, c.window, self.rng)
            if window is None:
                return {}
            out = self.learn(window, step)
        return out

    def critic_targets(self, s_next: torch.Tensor, window: Window) -> torch.Tensor:
        """SARSA(lambda) targets ``[B, T-1]`` for Q(s_t, a_t), t < T-1, from the executed
        actions in the window: G_t = rew_t + gamma (1 - done_t) ((1 - lambda) Q'(s_{t+1}, a_{t+1})
        + lambda G_{t+1}), G_{T-1} = Q'(s_{T-1}, a_{T-1}) (Q' the Polyak target). lambda = 0 is
        one-step SARSA; larger lambda propagates reward through the window per update
        (n-step returns), which matters because a one-step target with tau = 0.01 needs
        ~10^4 updates to carry the reward 100 steps back."""
        c = self.config
        q_next = self.critic_target(s_next, window.act[:, 1:])  # Q'(s_{t+1}, a_{t+1}), t = 0..T-2
        G = q_next[:, -1]
        out = []
        for t in range(q_next.shape[1] - 1, -1, -1):
            boot = (q_next[:, t] if t == q_next.shape[1] - 1
                    else (1 - c.critic_lambda) * q_next[:, t] + c.critic_lambda * G)
            G = window.rew[:, t] + c.gamma * (1 - window.done[:, t]) * boot
            out.append(G)
        return torch.stack(out[::-1], 1)

    def learn(self, window: Window, step: int) -> dict[str, float]:
        c = self.config
        B, T = window.shape
        if c.marginal_anneal:
            self.elbo.marginal_weight = c.marginal_weight * min(1.0, self.updates / c.marginal_anneal)
        self.updates += 1
        loss = self.elbo.differentiable_loss(pomdp_model, pomdp_guide, self.model, self.guide, window,
                                             temperature=c.temperature, K=c.info_gain_samples) / T
        terms = self.elbo.last_terms
        critic_loss = torch.zeros(())
        if self.critic is not None and T > 1:
            z = torch.stack([self.elbo.last_latents[site("z", t)] for t in range(T)], 1)  # the guide's samples
            if c.generative:
                z = z.detach()
            q = self.critic(z[:, :-1], window.act[:, :-1])
            with torch.no_grad():
                target = self.critic_targets(z[:, 1:].detach(), window)
            critic_loss = F.mse_loss(q, target)
        overshoot = torch.zeros(())
        if c.overshooting > 0 and c.generative and T > 1:
            zk = torch.stack([self.elbo.last_latents[site("z", t)] for t in range(T)], 1)
            for k in range(1, min(c.overshooting, T - 1) + 1):  # zk[:, t] predicts step t + k
                zk = self.model.transition(zk[:, :-1], window.a_prev[:, k:]).rsample()
                overshoot = overshoot + self.model.emitter.log_prob(zk, window.x[:, k:], window.r[:, k:]).mean()
            overshoot = overshoot / min(c.overshooting, T - 1)
            loss = loss - overshoot
        action_guide_loss = torch.zeros(())
        if self.action_guide is not None:  # KL(q_plan(a_t) || q_amortised(a_t | z_t)), z detached
            z_all = torch.stack([self.elbo.last_latents[site("z", t)] for t in range(T)], 1).detach()
            q_plan = torch.distributions.Normal(window.qa_loc, window.qa_scale)
            q_amort = self.action_guide(z_all).base_dist
            action_guide_loss = torch.distributions.kl_divergence(q_plan, q_amort).sum(-1).mean()
        out = self.checked(step, loss=loss, critic_loss=critic_loss, action_guide_kl=action_guide_loss)
        self.model_opt.zero_grad()
        self.guide_opt.zero_grad()
        if self.action_guide_opt is not None:
            self.action_guide_opt.zero_grad()
        if self.critic_opt is not None:
            self.critic_opt.zero_grad()
        (loss + critic_loss + action_guide_loss).backward()
        self.model_opt.step()
        self.guide_opt.step()
        if self.action_guide_opt is not None:
            self.action_guide_opt.step()
        if self.critic_opt is not None:
            self.critic_opt.step()
            polyak_update(self.critic, self.critic_target, c.tau)
        if c.generative and c.weight_diagnostics_every and step // c.weight_diagnostics_every != self.diagnosed_block:
            self.diagnosed_block = step // c.weight_diagnostics_every  # the first update of each block
            out.update(self.marginal_weight_diagnostics(window))
        per_step = {f"elbo_{k}": v / T for k, v in terms.items()}
        if c.overshooting > 0:
            out["overshooting_log_lik"] = float(overshoot.detach())
        out.update(per_step)
        out["marginal_weight"] = self.elbo.marginal_weight
        out.update({f"plan_{k}": v for k, v in self.last_plan.items()})
        return out

    @torch.no_grad()
    def marginal_weight_diagnostics(self, window: Window, draws: int = 256, windows: int = 8) -> dict[str, float]:
        """PSIS of the weights behind the bound's estimate of log p(x_t, r_t | z_<t)
        (:func:`models.pomdp.log_marginal_estimate`, K = ``info_gain_samples``) at the
        window's last step: ``draws`` fresh samples of the same proposal, the model's prior
        p(z_t | z_{t-1}, a_{t-1}) at the guide's z_{t-1} from the last ELBO pass, for the first
        ``windows`` windows. k-hat is a property of the weights' distribution, so a large
        sample estimates what the K-sample estimate rests on; above 0.7 a few weights carry
        it. Restores the torch RNG state, so training is unchanged."""
        B, T = window.shape
        n = min(windows, B)
        prev = self.elbo.last_latents[site("z", T - 2)][:n] if T > 1 else None
        x, r = window.x[:n, T - 1], window.r[:n, T - 1]
        # the CPU's RNG, and the GPU's where the window lives there
        with torch.random.fork_rng(devices=[x.device.index or 0] if x.device.type == "cuda" else []):
            prior = self.model.z_prior(T - 1, prev, window.a_prev[:n, T - 1], x, r)
            log_w = self.model.emitter.log_prob(prior.sample((draws,)), x, r)  # [draws, n]
        stats = [importance_weight_diagnostics(log_w[:, i]) for i in range(n)]
        return {"marginal_weight_khat": max(d["khat"] for d in stats),
                "marginal_weight_ess_frac": float(np.mean([d["ess_frac"] for d in stats]))}

    # -- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = {"model": self.model.state_dict(), "guide": self.guide.state_dict(),
                 "model_opt": self.model_opt.state_dict(), "guide_opt": self.guide_opt.state_dict(),
                 "replay": self.replay.state_dict(), "rng": self.rng.bit_generator.state,
                 "steps_seen": self.steps_seen, "decisions": self.decisions, "warmup_action": self.warmup_action,
                 "pending": None if self.pending is None else dict(self.pending), "pending_steps": self.pending_steps,
                 "diagnosed_block": self.diagnosed_block, "updates": self.updates,
                 "train_stream": self.streams["train"].state_dict()}
        if self.action_guide is not None:
            state.update(action_guide=self.action_guide.state_dict(),
                         action_guide_opt=self.action_guide_opt.state_dict())
        if self.critic is not None:
            state.update(critic=self.critic.state_dict(), critic_target=self.critic_target.state_dict(),
                         critic_opt=self.critic_opt.state_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.guide.load_state_dict(state["guide"])
        self.model_opt.load_state_dict(state["model_opt"])
        self.guide_opt.load_state_dict(state["guide_opt"])
        self.replay.load_state_dict(state["replay"])
        self.rng.bit_generator.state = state["rng"]
        self.steps_seen = state["steps_seen"]
        self.decisions = state.get("decisions", state["steps_seen"])
        self.diagnosed_block = state.get("diagnosed_block", -1)
        self.updates = state.get("updates", 0)
        held = state.get("warmup_action", state.get("warm_action"))  # older checkpoints: warm_action, float64
        self.warmup_action = None if held is None else np.asarray(held, dtype=np.float32)
        if self.action_guide is not None:
            self.action_guide.load_state_dict(state["action_guide"])
            self.action_guide_opt.load_state_dict(state["action_guide_opt"])
        if self.critic is not None:
            self.critic.load_state_dict(state["critic"])
            self.critic_target.load_state_dict(state["critic_target"])
            self.critic_opt.load_state_dict(state["critic_opt"])
        self.streams = {"train": FilterStream(), "eval": FilterStream()}
        if state.get("train_stream") is not None:  # the episode's filter state: a resumed episode continues it
            self.streams["train"].load_state_dict(state["train_stream"])
        # a block cut short by the end of a run is stored at the next (episode-start) act
        self.pending, self.pending_steps, self.fresh = state.get("pending"), state.get("pending_steps", 0), False


class DiscriminativeAgent(GenerativeAgent):
    algo = "discriminative-agent"
    Config = DiscriminativeAgentConfig


__all__ = ["DiscriminativeAgent", "DiscriminativeAgentConfig", "GenerativeAgent", "GenerativeAgentConfig",
           "FilterStream", "SequenceReplay"]
