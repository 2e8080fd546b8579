"""``pplrl diagnose``: what a set of training runs says, read from their run folders.

The report opens with the learning curves: runs grouped by (algorithm, environment),
evaluation return against environment steps, per group the mean and the IQM over seeds
with 95 % stratified-bootstrap bands (rliable's estimators, Agarwal et al. 2021), then
the final-return table with intervals and rliable's probability of improvement between
the algorithms of one environment. Then, per group, the ELBO of the objective by its
named terms on one axis with its unit, every other logged quantity that is not a sum or
negative of another, PSIS k-hat warnings, and the between-seed agreement of end-of-run
quantities only (final returns, last losses and temperatures), never of whole curves.

The plugins the runs recorded (algorithms defined outside pplrl) are loaded first; the
summaries only read ``metrics.jsonl``, so one that no longer loads is a note in the
report, not a failure."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pplrl import diagnostics
from pplrl.runfiles import read_records
from pplrl.runner import CONFIG, METRICS

#: Train-record keys that are timing, not training quantities.
TIMING = ("wall_s", "steps_per_s")
#: ELBO report terms that pplrl's ELBOs form as sums of others (tried last, so the primitive
#: terms are the ones drawn; :func:`pplrl.diagnostics.term_relations` checks each in the data).
ELBO_TOTALS = ("elbo_log_lik", "elbo_log_marginal", "elbo_info_gain", "elbo_model_evidence", "elbo_elbo", "elbo")
#: Logged products of the ELBO and a temperature (reward units), drawn as their own panels.
ELBO_SCALED = ("elbo_tempered",)
#: Draws per seed for end-of-run statistics of train quantities: the last fifth, at least this many.
END_DRAWS = 4
GENERATIVE = ("generative-agent", "discriminative-agent")


def load_run_traces(run: Path, kind: str = "train") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Steps and per-term arrays of one run's ``metrics.jsonl`` records of ``kind``."""
    rows = [r for r in read_records(run / METRICS) if r["kind"] == kind]  # a torn last line: dropped, warned
    return _traces(rows)


def _traces(rows: list[dict]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    keys = sorted({k for r in rows for k, v in r.items()
                   if k not in ("step", "kind") and isinstance(v, (int, float)) and not isinstance(v, bool)})
    steps = np.array([r["step"] for r in rows])
    return steps, {k: np.array([r.get(k, np.nan) for r in rows], dtype=float) for k in keys}


def load_recorded_plugins(runs: list[Path]) -> list[str]:
    """Load the plugin each run's ``config.json`` records (each one once) and check that its
    algorithm resolves; returns a one-line note per run whose plugin or algorithm does not load."""
    from pplrl.plugins import resolve

    notes, outcome = [], {}
    for run in runs:
        try:
            saved = json.loads((run / CONFIG).read_text())
            key = (saved.get("algo"), saved.get("plugin")) if isinstance(saved, dict) else (None, None)
        except (ValueError, OSError) as e:
            notes.append(f"note: {run / CONFIG} is unreadable ({type(e).__name__}: {e}); its metrics are summarised")
            continue
        if key not in outcome:
            outcome[key] = None
            if isinstance(key[0], str):
                try:
                    resolve(*key)
                except (ValueError, TypeError) as e:  # PluginError and UnknownAlgorithmError are ValueErrors
                    outcome[key] = " ".join(str(e).split())
        if outcome[key] is not None:
            notes.append(f"note: {run}: {outcome[key]}; its metrics are summarised anyway")
    return notes


# --------------------------------------------------------------------------- #
# Runs and groups
# --------------------------------------------------------------------------- #
@dataclass
class Run:
    """One run folder: its (algorithm, environment, seed) and its records by kind."""

    path: Path
    algo: str
    env: str
    seed: object
    records: list[dict] = field(repr=False)

    @classmethod
    def load(cls, path: Path) -> Run:
        try:
            saved = json.loads((path / CONFIG).read_text())
        except (ValueError, OSError):
            saved = {}
        saved = saved if isinstance(saved, dict) else {}
        config = saved.get("config") if isinstance(saved.get("config"), dict) else {}
        return cls(path, str(saved.get("algo", "?")), str(config.get("env_id", "?")), config.get("seed", "?"),
                   read_records(path / METRICS))

    def rows(self, kind: str) -> list[dict]:
        """Records of ``kind``, one per step (the last, as a resumed run may repeat a step)."""
        by_step = {r["step"]: r for r in self.records if r.get("kind") == kind and "step" in r}
        return [by_step[s] for s in sorted(by_step)]

    def eval_curve(self) -> dict[int, float]:
        return {r["step"]: float(r["mean_return"]) for r in self.rows("eval") if _finite(r.get("mean_return"))}

    def final(self) -> tuple[int, float, list[float], str] | None:
        """(step, mean return, episode returns, source) of the final evaluation: the ``final``
        record when the run wrote one, else its last ``eval`` record."""
        for kind, source in (("final", "final"), ("eval", "last eval")):
            rows = [r for r in self.rows(kind) if _finite(r.get("mean_return"))]
            if rows:
                r = rows[-1]
                returns = [float(x) for x in r.get("returns", []) if _finite(x)] or [float(r["mean_return"])]
                return int(r["step"]), float(r["mean_return"]), returns, source
        return None

    def train(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        return _traces(self.rows("train"))


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _groups(runs: list[Run]) -> dict[tuple[str, str], list[Run]]:
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault((run.algo, run.env), []).append(run)
    return dict(sorted(groups.items()))


def _label(key: tuple[str, str]) -> str:
    return f"{key[0]} on {key[1]}"


def _seeds(n: int) -> str:
    return f"{n} seed{'s' if n != 1 else ''}"


# --------------------------------------------------------------------------- #
# 1. Learning curves and final returns
# --------------------------------------------------------------------------- #
def learning_curves(runs: list[Run]) -> dict[int, dict[str, tuple[float, float, float]]]:
    """Per evaluation step: ``{"n": seeds, "mean": (point, low, high), "iqm": (...)}`` over the
    runs that evaluated at that step (intervals NaN where only one did)."""
    curves = [r.eval_curve() for r in runs]
    out = {}
    for step in sorted(set().union(*curves)):
        values = [c[step] for c in curves if step in c]
        est = diagnostics.mean_and_iqm(values, reps=diagnostics.CURVE_REPS, seed=step)
        out[step] = {"n": len(values), **est}
    return out


def plot_learning_curves(groups: dict[tuple[str, str], list[Run]], path: Path) -> Path | None:
    """Save :func:`learning_curve_figure` to ``path`` (None: no evaluation records)."""
    return _save(learning_curve_figure(groups), path)


def _save(fig, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    if fig is None:
        return None
    try:
        fig.savefig(path, dpi=100)
    finally:
        plt.close(fig)
    return path


def learning_curve_figure(groups: dict[tuple[str, str], list[Run]]):
    """Evaluation return against environment steps: one row per environment, the mean (left)
    and the IQM (right) over seeds of each algorithm with its 95 % stratified-bootstrap band
    (none for one seed)."""
    import matplotlib.pyplot as plt

    envs = sorted({env for _, env in groups})
    curves = {key: learning_curves(runs) for key, runs in groups.items()}
    if not any(curves.values()):
        return None
    fig, axes = plt.subplots(len(envs), 2, squeeze=False, figsize=(11, 3.6 * len(envs)), layout="constrained")
    for row, env in zip(axes, envs):
        algos = [key for key in groups if key[1] == env]
        for i, key in enumerate(algos):
            c = curves[key]
            if not c:
                continue
            steps = np.array(sorted(c))
            n = len(groups[key])
            label = f"{key[0]} ({_seeds(n)}{': no interval' if n == 1 else ''})"
            for ax, stat in zip(row, ("mean", "iqm")):
                point = np.array([c[s][stat][0] for s in steps])
                low = np.array([c[s][stat][1] for s in steps])
                high = np.array([c[s][stat][2] for s in steps])
                ax.plot(steps, point, color=f"C{i % 10}", marker="o", ms=3, label=label)
                if np.isfinite(low).any():
                    ax.fill_between(steps, low, high, color=f"C{i % 10}", alpha=0.2, lw=0)
        for ax, stat in zip(row, ("mean", "IQM")):
            ax.set_title(f"{env}: {stat} over seeds, 95 % stratified-bootstrap band", fontsize="medium")
            ax.set_xlabel("environment steps")
            ax.set_ylabel("evaluation return (sum of rewards per episode)")
            ax.legend(fontsize="small", loc="best")
            ax.grid(alpha=0.3)
    return fig


def _ci(est: tuple[float, float, float]) -> str:
    point, low, high = est
    return f"{point:.1f} [{low:.1f}, {high:.1f}]" if math.isfinite(low) else f"{point:.1f}"


def final_returns(groups: dict[tuple[str, str], list[Run]]) -> tuple[list[str], dict[tuple[str, str], list[float]]]:
    """The final-return table (text lines) and each group's per-seed final mean returns."""
    scores, lines = {}, []
    rows = [("algorithm", "environment", "seeds", "env steps", "mean [95% CI]", "IQM [95% CI]", "from")]
    for key, runs in groups.items():
        finals = [f for f in (r.final() for r in runs) if f is not None]
        if not finals:
            continue
        scores[key] = [f[1] for f in finals]
        est = diagnostics.mean_and_iqm(scores[key])
        steps = sorted({f[0] for f in finals})
        step_text = str(steps[0]) if len(steps) == 1 else f"{steps[0]}-{steps[-1]}"
        sources = "/".join(sorted({f[3] for f in finals}))
        if len(finals) == 1:
            rows.append((*key, "1", step_text, f"{est['mean'][0]:.1f}", "one seed: no interval", sources))
        else:
            rows.append((*key, str(len(finals)), step_text, _ci(est["mean"]), _ci(est["iqm"]), sources))
    if len(rows) == 1:
        return ["final return: no run has an evaluation record"], scores
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.append("final evaluation return per run (sum of rewards per episode, mean over the evaluation's episodes);")
    lines.append(f"over seeds: mean and IQM (rliable) with 95 % stratified-bootstrap intervals "
                 f"({diagnostics.TABLE_REPS} resamples)")
    lines.extend("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)
    return lines, scores


def improvement_lines(scores: dict[tuple[str, str], list[float]]) -> list[str]:
    """rliable's probability of improvement between each pair of algorithms on one environment."""
    lines = []
    for env in sorted({env for _, env in scores}):
        algos = sorted(a for a, e in scores if e == env)
        for i, x in enumerate(algos):
            for y in algos[i + 1:]:
                sx, sy = scores[(x, env)], scores[(y, env)]
                if min(len(sx), len(sy)) < 2:
                    lines.append(f"  {env}: {x} vs {y}: needs two seeds of each ({len(sx)} and {len(sy)})")
                    continue
                p, low, high = diagnostics.probability_of_improvement(sx, sy)
                lines.append(f"  {env}: P({x} > {y}) = {p:.2f} [{low:.2f}, {high:.2f}] "
                             f"({len(sx)} vs {len(sy)} seeds)")
    if lines:
        lines.insert(0, "probability of improvement (rliable): P(a seed of X ends with a higher final return than "
                        "a seed of Y), ties half, 95 % CI")
    return lines


# --------------------------------------------------------------------------- #
# 2. The ELBO by its named terms, and the other quantities
# --------------------------------------------------------------------------- #
@dataclass
class TrainTerms:
    """A group's train quantities split into what is drawn and what follows from it."""

    total: str | None  # the ELBO
    parts: dict[str, int]  # its terms with their signs, when it is their signed sum
    elbo_terms: list[str]  # every independent ELBO term
    others: list[str]  # independent non-ELBO quantities (losses, temperatures, k-hat, ...)
    relations: dict[str, dict[str, int]]  # everything not drawn: name -> signed parts


def split_terms(columns: dict[str, np.ndarray]) -> TrainTerms:
    """Which train quantities are drawn: relations found in the data by
    :func:`pplrl.diagnostics.term_relations`, ELBO terms first and the totals last."""
    names = [n for n in columns if n not in TIMING]
    elbo = [n for n in names if n == "elbo" or n.startswith("elbo_")]
    totals = [n for n in ELBO_TOTALS if n in elbo]
    terms = sorted(n for n in elbo if n not in totals and n not in ELBO_SCALED)
    rest = sorted(n for n in names if n not in elbo or n in ELBO_SCALED)
    independent, relations = diagnostics.term_relations(columns, terms + totals + rest)
    total = "elbo" if "elbo" in columns else ("elbo_elbo" if "elbo_elbo" in columns else None)
    parts = relations.pop(total, None) if total else None
    drawn_terms = [n for n in independent if n in terms or n in totals]
    if total in drawn_terms:
        drawn_terms.remove(total)
    return TrainTerms(total, parts or {}, drawn_terms, [n for n in independent if n in rest], relations)


def _unit(name: str) -> str:
    if name.endswith("khat"):
        return "Pareto k-hat (> 0.7: unreliable)"
    if name.endswith("ess_frac"):
        return "ESS / samples"
    if name in ("alpha", "beta", "temperature"):
        return "temperature (reward units per nat)"
    if name == "elbo_tempered" or name == "soft_value":
        return "reward units per state"
    if name == "critic_loss":
        return "squared reward units"
    if name == "actor_loss":
        return "reward units (-temperature x ELBO)"
    return name


def elbo_unit(algo: str) -> str:
    return "nats per time step" if algo in GENERATIVE else "nats per state"


def elbo_notes(algo: str, env: str, mean_first: dict[str, float], mean_last: dict[str, float]) -> list[str]:
    """What the ELBO's unit means, and why it falls on a task with negative rewards."""
    if algo in GENERATIVE:
        notes = ["log-likelihoods and KLs in nats per time step of the window; reward enters scaled by the "
                 "inverse temperature"]
    else:
        notes = ["elbo_reward = E_q[Q(x, a)] x inverse temperature (1/alpha for SAC-style agents, eta or 1/beta "
                 "for VMBPO): the critic's value in reward units, scaled; temperature x elbo is in reward units "
                 "(= -actor_loss for SAC)"]
    r0, r1 = mean_first.get("elbo_reward"), mean_last.get("elbo_reward")
    if r0 is not None and r1 is not None and r1 < min(r0, 0.0):
        where = "Pendulum's rewards lie in [-16.3, 0] per step, so " if "Pendulum" in env else ""
        notes.append(f"elbo_reward fell from {r0:.3g} to {r1:.3g}: {where}the critic is learning negative values; "
                     "a falling ELBO here is the critic's scale, not worse inference")
    return notes


def _mean_over_seeds(traces: list[tuple[np.ndarray, dict[str, np.ndarray]]], value) -> tuple[np.ndarray, np.ndarray]:
    """Steps common to every seed and the mean over seeds of ``value(traces_dict)`` there."""
    common = sorted(set.intersection(*(set(s.tolist()) for s, _ in traces)))
    if not common:
        return np.zeros(0), np.zeros(0)
    rows = []
    for steps, t in traces:
        idx = np.searchsorted(steps, common)
        rows.append(value(t)[idx])
    with np.errstate(invalid="ignore"):
        return np.array(common), np.nanmean(np.stack(rows), axis=0) if len(rows) > 1 else rows[0]


def training_figure(key: tuple[str, str], traces: list[tuple[np.ndarray, dict[str, np.ndarray]]],
                    split: TrainTerms, notes: Sequence[str] = (), seeds: Sequence[object] | None = None):
    """The ELBO's signed terms and total on one axis (mean over seeds), then one panel per other
    independent quantity (one line per seed). Every axis is labelled with its unit."""
    import textwrap

    import matplotlib.pyplot as plt

    seeds = list(seeds) if seeds is not None else list(range(len(traces)))
    panels = (["__elbo__"] if split.total else []) + [n for n in split.elbo_terms if n not in split.parts]
    panels += split.others
    if not panels:
        return None
    fig, axes = plt.subplots(len(panels), 1, squeeze=False, sharex=True, figsize=(9, 1.2 + 2.4 * len(panels)),
                             layout="constrained")
    unit = elbo_unit(key[0])
    for ax, name in zip(axes[:, 0], panels):
        if name == "__elbo__":
            parts = split.parts or {n: 1 for n in split.elbo_terms}
            for i, (part, c) in enumerate(parts.items()):
                x, y = _mean_over_seeds(traces, lambda t, p=part, c=c: c * t[p])
                ax.plot(x, y, color=f"C{i % 10}", label=f"{'+' if c > 0 else '-'} {part}")
            x, y = _mean_over_seeds(traces, lambda t: t[split.total])
            ax.plot(x, y, color="black", lw=2, label=f"= {split.total}" if split.parts else f"{split.total} (total)")
            what = diagnostics.format_relation(split.total, split.parts) if split.parts else \
                f"{split.total} and its terms (not their signed sum)"
            title = [f"{_label(key)}: {what}, mean over {_seeds(len(traces))}"]
            title += [line for note in notes for line in textwrap.wrap(note, 120)]
            ax.set_title("\n".join(title), fontsize="small", loc="left")
            ax.set_ylabel(f"ELBO ({unit})")
            ax.axhline(0.0, color="grey", lw=0.5)
        else:
            for i, (steps, t) in enumerate(traces):
                first = name == next(p for p in panels if p != "__elbo__")
                ax.plot(steps, t[name], color=f"C{i % 10}", lw=1, label=f"seed {seeds[i]}" if first else None)
            ax.set_title(name, fontsize="small", loc="left")
            ax.set_ylabel(f"{unit}" if name.startswith("elbo_") and name not in ELBO_SCALED else _unit(name))
            if name.endswith("khat"):  # PSIS: above this line the weighted estimate rests on a few weights
                ax.axhline(diagnostics.KHAT_UNRELIABLE, color="red", ls="--", lw=0.8, label="k-hat 0.7")
        ax.grid(alpha=0.3)
        ax.set_xlabel("environment steps")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="x-small", loc="best")
    return fig


def elbo_lines(key: tuple[str, str], traces, split: TrainTerms) -> tuple[list[str], list[str]]:
    """Text of a group's ELBO: the relation, unit, notes and a first/last table of its terms."""
    if split.total is None and not split.elbo_terms:
        return [], []
    shown = list(split.parts or split.elbo_terms) + ([split.total] if split.total else [])
    shown += [n for n in split.elbo_terms if n not in shown]
    first, last = {}, {}
    for name in shown:
        vals = [t[name][np.isfinite(t[name])] for _, t in traces]
        vals = [v for v in vals if len(v)]
        if vals:
            first[name] = float(np.mean([v[0] for v in vals]))
            last[name] = float(np.mean([v[-max(1, len(v) // 10):].mean() for v in vals]))
    notes = elbo_notes(key[0], key[1], first, last)
    what = diagnostics.format_relation(split.total, split.parts) if split.total and split.parts else \
        "its terms" + (f" ({split.total} is not their signed sum)" if split.total else "")
    lines = [f"ELBO of {_label(key)} ({_seeds(len(traces))}): {what}; unit: {elbo_unit(key[0])}"]
    lines += [f"  {n}" for n in notes]
    width = max(len(n) for n in shown)
    lines.append(f"  {'term'.ljust(width)}  {'first record':>12}  {'end of run':>12}   (mean over seeds; end of run = "
                 f"mean of the last tenth of the train records)")
    lines += [f"  {n.ljust(width)}  {first[n]:12.4g}  {last[n]:12.4g}" for n in shown if n in first]
    return lines, notes


# --------------------------------------------------------------------------- #
# 4. Between-seed agreement of end-of-run quantities
# --------------------------------------------------------------------------- #
def _end_of_run(name: str) -> bool:
    return name.endswith("_loss") or name in ("alpha", "beta", "temperature", "epsilon_omega")


def agreement_lines(key: tuple[str, str], runs: list[Run], traces, split: TrainTerms) -> list[str]:
    """Between-seed agreement of the final return and the end-of-run losses and temperatures;
    one line saying there is nothing to compare for one run."""
    if len(runs) < 2:
        return [f"between seeds, {_label(key)}: {diagnostics.ONE_RUN}"]
    draws: dict[str, list] = {}
    finals = [f for f in (r.final() for r in runs) if f is not None]
    if len(finals) > 1:
        draws["final_return (episodes)"] = [f[2] for f in finals]
    for name in split.others:
        if _end_of_run(name):
            per_seed = [t[name][np.isfinite(t[name])] for _, t in traces if name in t]
            draws[f"{name} (last records)"] = [v[-max(END_DRAWS, len(v) // 5):] for v in per_seed]
    df = diagnostics.between_seed_agreement(draws, unordered=["final_return (episodes)"])
    if df.empty:
        return [f"between seeds, {_label(key)}: fewer than two runs with records: no between-seed statistics"]
    return [f"between seeds, {_label(key)} ({_seeds(len(runs))}):", diagnostics.format_agreement(df)]


# --------------------------------------------------------------------------- #
def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.-]+", "-", text).strip("-")


def find_runs(folders: Sequence[Path]) -> list[Path]:
    runs = sorted({p.parent for f in folders for p in Path(f).rglob(CONFIG) if (p.parent / METRICS).exists()})
    if not runs:
        raise FileNotFoundError(f"no run folders (with {CONFIG} and {METRICS}) under "
                                f"{', '.join(str(f) for f in folders)}")
    return runs


def diagnose(folder: Path | Sequence[Path], plot: Path | None = None) -> str:
    """The report on every run folder below ``folder`` (one path or several); figures go to
    ``plot`` (default ``FOLDER/diagnostics.png``: the learning curves) and, per group,
    ``<plot stem>_train_<algorithm>_<environment>.png``."""
    folders = [Path(folder)] if isinstance(folder, (str, Path)) else [Path(f) for f in folder]
    paths = find_runs(folders)
    notes = load_recorded_plugins(paths)
    runs = [Run.load(p) for p in paths]
    groups = _groups(runs)
    target = Path(plot) if plot else folders[0] / "diagnostics.png"
    target.parent.mkdir(parents=True, exist_ok=True)

    text = [f"pplrl diagnose: {len(runs)} run{'s' if len(runs) != 1 else ''} in {len(groups)} group"
            f"{'s' if len(groups) != 1 else ''} (algorithm on environment): "
            + "; ".join(f"{_label(k)}, {_seeds(len(v))}" for k, v in groups.items())]
    curves = plot_learning_curves(groups, target)
    if curves:
        text.append(f"learning curves: {curves}")
        text.append("  evaluation return against environment steps; per group the mean and the IQM over seeds with "
                    f"95 % stratified-bootstrap bands ({diagnostics.CURVE_REPS} resamples); one seed: the line alone")
    else:
        text.append("learning curves: no evaluation records")
    table, scores = final_returns(groups)
    text += table + improvement_lines(scores)
    for run in runs:  # importance weights that an estimate cannot rest on (PSIS k-hat > 0.7)
        text.extend(diagnostics.khat_warnings(str(run.path), *run.train()))
    text += notes

    for key, group in groups.items():
        traces = [t for t in (r.train() for r in group) if len(t[0])]
        text.append("")
        if not traces:
            text.append(f"{_label(key)}: no train records")
            continue
        names = set.intersection(*(set(t) for _, t in traces))
        pooled = {n: np.concatenate([t[n] for _, t in traces]) for n in sorted(names)}
        split = split_terms(pooled)
        lines, elbo_note = elbo_lines(key, traces, split)
        text += lines
        if split.relations:
            text.append("  not drawn (follow from the drawn terms in every record): "
                        + "; ".join(diagnostics.format_relation(n, p) for n, p in split.relations.items()))
        if split.others:
            ends = []
            for name in split.others:
                vals = [t[name][np.isfinite(t[name])] for _, t in traces]
                vals = [v[-max(1, len(v) // 10):].mean() for v in vals if len(v)]
                ends.append(f"{name} {np.mean(vals):.4g}" if vals else name)
            text.append("  other quantities drawn, end of run (mean over seeds of the last tenth of the records): "
                        + ", ".join(ends))
        if "steps_per_s" in names:
            speed = [t["steps_per_s"][np.isfinite(t["steps_per_s"])] for _, t in traces]
            speed = [s[-1] for s in speed if len(s)]
            if speed:
                text.append(f"  speed: {np.mean(speed):.0f} env steps/s at the end of the run (mean over seeds)")
        figure = target.with_name(f"{target.stem}_train_{_slug(key[0])}_{_slug(key[1])}{target.suffix or '.png'}")
        seeds = [r.seed for r in group if len(r.train()[0])]
        drawn = _save(training_figure(key, traces, split, elbo_note, seeds), figure)
        if drawn:
            text.append(f"  training figure: {drawn}")
        text += agreement_lines(key, group, traces, split)
    return "\n".join(text)
