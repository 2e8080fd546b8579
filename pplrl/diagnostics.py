"""Training diagnostics: record per-step scalar terms, compare seeds, stop on NaN.

The pieces fit together like this::

    rec = TermRecorder()
    for step in range(n_steps):
        loss = svi.step(...)
        check_finite("loss", loss, step)          # stop early on NaN / inf
        rec.record(step, loss=loss, entropy=ent)
    rec.save_jsonl("run_seed0.jsonl")

    # later, one recorder per seed
    recs = [TermRecorder.load_jsonl(p) for p in paths]
    dt = runs_to_datatree([r.as_arrays() for r in recs], steps=recs[0].steps)
    print(format_summary(summarize(dt)))
    plot_traces(dt, "traces.png")

Seeds are stored as ArviZ *chains* and training steps as *draws*, so the
ArviZ machinery (summary, R-hat, ESS, trace plots) can be reused. Note that
these statistics then describe how well the training traces of different seeds
agree with each other; they say nothing about MCMC convergence.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import sys
import textwrap
import warnings
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

__all__ = [
    "AGREEMENT_HEADER",
    "KHAT_UNRELIABLE",
    "NonFiniteError",
    "ONE_RUN",
    "between_seed_agreement",
    "format_agreement",
    "format_relation",
    "improvement_batched",
    "mean_and_iqm",
    "probability_of_improvement",
    "stratified_bootstrap_ci",
    "term_relations",
    "importance_weight_diagnostics",
    "khat_warnings",
    "SUMMARY_HEADER",
    "TermRecorder",
    "check_finite",
    "format_summary",
    "plot_traces",
    "runs_to_datatree",
    "summarize",
]

_log = logging.getLogger(__name__)

SUMMARY_HEADER = (
    "Agreement between seeds (chains = seeds, draws = training steps); "
    "ESS and R-hat here measure between-seed agreement of training traces, "
    "NOT MCMC convergence."
)
"""First line of :func:`format_summary` output."""

_SPLIT_RHAT_NOTE = (
    "(Split R-hat also exceeds 1 when a trace still trends within a seed, "
    "e.g. a loss that is still decreasing.)"
)

_STEP_KEY = "step"


# --------------------------------------------------------------------------- #
# Recording scalar terms
# --------------------------------------------------------------------------- #
def _as_step(step: Any) -> int:
    """Validate a step number and return it as a Python int."""
    if isinstance(step, bool):
        raise ValueError(f"step must be an integer, got the bool {step!r}")
    if isinstance(step, numbers.Integral):
        return int(step)
    if isinstance(step, numbers.Real):
        value = float(step)
        if not math.isfinite(value):
            raise ValueError(f"step must be finite, got {step!r}")
        if value.is_integer():
            return int(value)
        raise ValueError(f"step must be a whole number, got {step!r}")
    raise ValueError(f"step must be an integer, got {type(step).__name__} {step!r}")


def _as_real(name: str, value: Any, step: int) -> float:
    """Validate one term value and return it as a finite Python float.

    Accepts Python/NumPy real scalars and one-element arrays or tensors
    (anything with an ``.item()`` method returning a real number).
    """
    scalar = value
    if not isinstance(scalar, numbers.Real) and hasattr(scalar, "item"):
        try:
            scalar = scalar.item()
        except (ValueError, RuntimeError) as err:  # numpy / torch multi-element
            raise ValueError(
                f"term {name!r} at step {step} must be a single real number, "
                f"got a multi-element {type(value).__name__}"
            ) from err
    if isinstance(scalar, bool) or not isinstance(scalar, numbers.Real):
        raise ValueError(
            f"term {name!r} at step {step} must be a real number, "
            f"got {type(value).__name__} {value!r}"
        )
    result = float(scalar)
    if not math.isfinite(result):
        raise ValueError(f"term {name!r} at step {step} is not finite: {result!r}")
    return result


class TermRecorder:
    """Record named scalar metrics ("terms") per training step.

    Each call to :meth:`record` stores some terms for one step; different steps
    may record different subsets of terms (e.g. an evaluation return every 100
    steps). :meth:`as_arrays` aligns them on the sorted recorded steps, filling
    missing entries with NaN.

    Values must be finite real numbers; use :func:`check_finite` before
    recording if a NaN should stop training with a clear error.
    """

    def __init__(self) -> None:
        self._rows: dict[int, dict[str, float]] = {}
        self._terms: dict[str, None] = {}  # ordered set of term names, first-seen order

    def record(self, step: int, /, **terms: float) -> None:
        """Store ``terms`` (name=value) for ``step``.

        Recording the same step again adds the new terms to that step; recording
        the same term twice for one step raises ``ValueError``.

        Raises
        ------
        ValueError
            If ``step`` is not a finite whole number, a value is not a finite
            real number, a term is named ``"step"``, or a term is recorded
            twice for the same step.
        """
        step_int = _as_step(step)
        if _STEP_KEY in terms:
            raise ValueError(f"a term may not be named {_STEP_KEY!r}: that key holds the step")
        values = {name: _as_real(name, value, step_int) for name, value in terms.items()}
        row = self._rows.setdefault(step_int, {})
        duplicates = sorted(set(row) & set(values))
        if duplicates:
            raise ValueError(f"term(s) {duplicates} already recorded for step {step_int}")
        row.update(values)
        for name in values:
            self._terms.setdefault(name, None)

    @property
    def steps(self) -> np.ndarray:
        """Sorted recorded step numbers, as an int64 array."""
        return np.array(sorted(self._rows), dtype=np.int64)

    @property
    def terms(self) -> list[str]:
        """Names of all recorded terms, in first-recorded order."""
        return list(self._terms)

    def __len__(self) -> int:
        """Number of recorded steps."""
        return len(self._rows)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(n_steps={len(self)}, terms={self.terms})"

    def as_arrays(self) -> dict[str, np.ndarray]:
        """Return ``{term: values over self.steps}``, NaN where a term is missing."""
        steps = sorted(self._rows)
        return {
            name: np.array([self._rows[s].get(name, np.nan) for s in steps], dtype=float)
            for name in self._terms
        }

    def save_jsonl(self, path: str | PathLike[str]) -> Path:
        """Write one JSON object per recorded step: ``{"step": ..., term: value, ...}``.

        Steps are written in sorted order. Returns the path written.
        """
        path = Path(path)
        with path.open("w", encoding="utf-8") as fh:
            for step in sorted(self._rows):
                obj = {_STEP_KEY: step, **self._rows[step]}
                fh.write(json.dumps(obj, allow_nan=False) + "\n")
        return path

    @classmethod
    def load_jsonl(cls, path: str | PathLike[str]) -> TermRecorder:
        """Read a file written by :meth:`save_jsonl` (blank lines are skipped).

        Raises
        ------
        ValueError
            If a line is not a JSON object with a ``"step"`` key, or holds
            invalid values (see :meth:`record`).
        """
        recorder = cls()
        path = Path(path)
        with path.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{where}: invalid JSON ({err})") from err
                if not isinstance(obj, dict) or _STEP_KEY not in obj:
                    raise ValueError(f"{where}: expected a JSON object with a {_STEP_KEY!r} key")
                step = obj.pop(_STEP_KEY)
                try:
                    recorder.record(step, **obj)
                except ValueError as err:
                    raise ValueError(f"{where}: {err}") from err
        return recorder


# --------------------------------------------------------------------------- #
# Several runs -> ArviZ DataTree
# --------------------------------------------------------------------------- #
def runs_to_datatree(
    runs: Sequence[Mapping[str, np.ndarray]],
    *,
    group: str = "posterior",
    steps: np.ndarray | None = None,
    seeds: Sequence[int] | None = None,
) -> xr.DataTree:
    """Stack several runs (e.g. seeds) of per-step traces into an ArviZ DataTree.

    Parameters
    ----------
    runs
        One mapping per run, ``{term: array}``; each array has the training
        steps on its first axis (further axes become extra dimensions). All
        runs must have the same term names. Runs of unequal length are
        truncated to the shortest one, with a ``UserWarning``.
    group
        DataTree group to store the traces in.
    steps
        Optional step numbers, used as the ``draw`` coordinate. Must have at
        least as many entries as the (truncated) runs; extra entries are
        dropped, as the runs were. Defaults to ``0, 1, 2, ...``.
    seeds
        Optional labels (e.g. seed values) used as the ``chain`` coordinate.
        Defaults to ``0, 1, 2, ...``.

    Returns
    -------
    xarray.DataTree
        ``dt[group]`` has dims ``chain`` (one per run) and ``draw`` (one per step).

    Raises
    ------
    ValueError
        On an empty ``runs``, runs with different term names, a run without
        terms or with zero steps, a term that is not an array over steps, or
        ``steps`` / ``seeds`` of the wrong length.
    """
    import arviz_base

    if len(runs) == 0:
        raise ValueError("runs is empty: need at least one run (one mapping of term -> trace)")

    term_names = list(runs[0])
    if not term_names:
        raise ValueError("run 0 has no terms")
    for i, run in enumerate(runs[1:], start=1):
        if set(run) != set(term_names):
            missing = sorted(set(term_names) - set(run))
            extra = sorted(set(run) - set(term_names))
            raise ValueError(
                f"runs have different term names: run {i} differs from run 0 "
                f"(missing {missing}, extra {extra})"
            )

    arrays = [{name: np.asarray(run[name], dtype=float) for name in term_names} for run in runs]
    for i, run in enumerate(arrays):
        for name, arr in run.items():
            if arr.ndim == 0:
                raise ValueError(
                    f"term {name!r} of run {i} is a scalar, expected an array over steps"
                )
        lengths = {name: arr.shape[0] for name, arr in run.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"terms of run {i} have different numbers of steps: {lengths}")

    run_lengths = [run[term_names[0]].shape[0] for run in arrays]
    n_draws = min(run_lengths)
    if n_draws == 0:
        raise ValueError(f"run {run_lengths.index(0)} has zero steps")
    if max(run_lengths) != n_draws:
        warnings.warn(
            f"runs have unequal lengths {run_lengths}; "
            f"truncating all to the shortest ({n_draws} steps)",
            UserWarning,
            stacklevel=2,
        )

    coords: dict[str, np.ndarray] = {}
    if steps is not None:
        steps = np.asarray(steps)
        if steps.ndim != 1 or steps.shape[0] < n_draws:
            raise ValueError(
                f"steps must be 1-D with at least {n_draws} entries, got shape {steps.shape}"
            )
        coords["draw"] = steps[:n_draws]
    if seeds is not None:
        seeds = np.asarray(seeds)
        if seeds.shape != (len(runs),):
            raise ValueError(
                f"seeds must have one entry per run ({len(runs)}), got shape {seeds.shape}"
            )
        coords["chain"] = seeds

    data = {name: np.stack([run[name][:n_draws] for run in arrays]) for name in term_names}
    attrs = {
        group: {
            "chain_meaning": "independent training runs (seeds)",
            "draw_meaning": "training steps",
        }
    }
    return arviz_base.from_dict({group: data}, coords=coords or None, attrs=attrs)


# --------------------------------------------------------------------------- #
# Summary table
# --------------------------------------------------------------------------- #
def summarize(
    dt: xr.DataTree,
    *,
    var_names: Sequence[str] | None = None,
    group: str = "posterior",
    skipna: bool = False,
) -> pd.DataFrame:
    """Summary statistics and between-seed diagnostics of the traces in ``dt``.

    Thin wrapper around :func:`arviz_stats.summary` returning unrounded numbers
    (columns ``mean, sd, eti89_lb, eti89_ub, ess_bulk, ess_tail, r_hat,
    mcse_mean, mcse_sd`` with the default ArviZ settings). With seeds as chains
    and steps as draws, R-hat and ESS measure agreement between seeds, not MCMC
    convergence. Constant traces give NaN R-hat without emitting warnings.

    Parameters
    ----------
    dt
        DataTree as built by :func:`runs_to_datatree`.
    var_names
        Terms to include; all if None.
    group
        Group of ``dt`` holding the traces.
    skipna
        Ignore NaN entries (e.g. terms not recorded at every step); with the
        default False any NaN makes that term's statistics NaN.
    """
    from arviz_stats import summary

    names = None if var_names is None else list(var_names)
    # Constant traces make R-hat 0/0; numpy would emit RuntimeWarnings for that.
    with np.errstate(invalid="ignore", divide="ignore"):
        return summary(dt, var_names=names, group=group, round_to="none", skipna=skipna)


def standard_error(values: Sequence[float]) -> float:
    """Standard error of the mean over seeds, ``std(ddof=1) / sqrt(n)``; NaN for one value."""
    x = np.asarray(values, dtype=float)
    return float(x.std(ddof=1) / np.sqrt(len(x))) if len(x) > 1 else float("nan")


def format_summary(df: pd.DataFrame, *, decimals: int = 3) -> str:
    """Render a :func:`summarize` table under a header explaining what it measures."""
    table = df.to_string(float_format=lambda x: f"{x:.{decimals}f}")
    return f"{SUMMARY_HEADER}\n{_SPLIT_RHAT_NOTE}\n{table}"


# --------------------------------------------------------------------------- #
# Trace plots
# --------------------------------------------------------------------------- #
def _import_arviz_plots() -> Any:
    """Import arviz_plots and its matplotlib backend, working around matplotlib 3.11.

    arviz-plots 0.8 accesses ``matplotlib.style.core`` at import time, which
    matplotlib 3.11 no longer imports implicitly (the module is deprecated), and
    its matplotlib backend registers a scale in a pending-deprecated way.
    Importing ``matplotlib.style.core`` first makes the import work; the
    deprecation warnings of both steps are silenced here.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", PendingDeprecationWarning)
        import matplotlib.style

        if not hasattr(matplotlib.style, "core"):
            import matplotlib.style.core
        import arviz_plots
        import arviz_plots.backend.matplotlib
    return arviz_plots


def _hex_color_cycle() -> list[str]:
    """Matplotlib's colour cycle as hex strings.

    matplotlib 3.11 returns RGB tuples from ``rcParams["axes.prop_cycle"]``,
    which arviz-plots 0.8 mis-reshapes; hex strings avoid that.
    """
    import matplotlib as mpl
    import matplotlib.colors as mcolors

    colors = mpl.rcParams["axes.prop_cycle"].by_key().get("color", ["C0", "C1", "C2", "C3"])
    return [mcolors.to_hex(c) for c in colors]


def _n_panels(ds: xr.Dataset, var_names: list[str]) -> int:
    """Number of panels: one per term, times the size of any non-sample dims."""
    return sum(
        int(np.prod([size for dim, size in ds[name].sizes.items() if dim not in ("chain", "draw")]))
        for name in var_names
    )


def _figsize(n_panels: int) -> tuple[float, float]:
    return (8.0, 2.2 * n_panels + 0.8)


def _trace_figure_arviz(dt: xr.DataTree, ds: xr.Dataset, var_names: list[str], group: str) -> Any:
    """Build the trace figure with arviz_plots.plot_trace; returns the matplotlib Figure."""
    arviz_plots = _import_arviz_plots()
    pc = arviz_plots.plot_trace(
        dt,
        var_names=var_names,
        group=group,
        backend="matplotlib",
        col_wrap=1,  # one panel row per term
        color=_hex_color_cycle(),
        visuals={"xlabel": False},  # per-panel x labels overlap the next title
        figure_kwargs={"figsize": _figsize(_n_panels(ds, var_names))},
    )
    fig = pc.viz["figure"].item()
    fig.set_layout_engine("constrained")  # keeps multi-line panel titles off the axes above
    fig.supxlabel("training step")
    lines = fig.axes[0].get_lines()
    if len(lines) == ds.sizes["chain"]:  # one line per seed, in chain order
        labels = [f"seed {c}" for c in ds["chain"].values]
        fig.axes[0].legend(lines, labels, fontsize="small", loc="best")
    return fig


def _trace_figure_matplotlib(ds: xr.Dataset, var_names: list[str]) -> Any:
    """Build the trace figure with plain matplotlib; returns the Figure."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(
        len(var_names),
        1,
        sharex=True,
        squeeze=False,
        figsize=_figsize(len(var_names)),
        layout="constrained",
    )
    x = ds["draw"].values
    for ax, name in zip(axes[:, 0], var_names):
        da = ds[name]
        for i, chain in enumerate(ds["chain"].values):
            # (draw, everything else): extra dims become extra lines of the same colour
            y = da.sel(chain=chain).transpose("draw", ...).values.reshape(len(x), -1)
            labels = [f"seed {chain}"] + ["_nolegend_"] * (y.shape[1] - 1)
            ax.plot(x, y, lw=1.0, color=f"C{i % 10}", label=labels)
        ax.set_title(name)
    axes[0, 0].legend(fontsize="small", loc="best")
    fig.supxlabel("training step")
    return fig


def plot_traces(
    dt: xr.DataTree,
    path: str | PathLike[str],
    *,
    var_names: Sequence[str] | None = None,
    group: str = "posterior",
    use_arviz_plots: bool = True,
) -> Path:
    """Save trace plots of ``dt[group]`` as a PNG and return the path.

    One panel row per term, one line per seed (chain), x = training step (the
    ``draw`` coordinate). Uses :func:`arviz_plots.plot_trace`; if that fails
    (arviz-plots / matplotlib incompatibilities) or ``use_arviz_plots`` is
    False, falls back to plain matplotlib (the failure is logged). Works
    headless (``MPLBACKEND=Agg``); the figure is closed after saving.

    Raises
    ------
    ValueError
        If ``var_names`` is empty or names a term not in ``dt[group]``.
    """
    import matplotlib.pyplot as plt

    path = Path(path)
    ds = dt[group].to_dataset()
    names = list(ds.data_vars) if var_names is None else list(var_names)
    unknown = [n for n in names if n not in ds.data_vars]
    if unknown:
        raise ValueError(f"unknown term(s) {unknown}; available: {list(ds.data_vars)}")
    if not names:
        raise ValueError("no terms to plot")

    fig = None
    if use_arviz_plots:
        figs_before = set(plt.get_fignums())
        try:
            fig = _trace_figure_arviz(dt, ds, names, group)
        except Exception as err:
            _log.warning(
                "arviz_plots trace plot failed (%s: %s); falling back to plain matplotlib",
                type(err).__name__,
                err,
            )
            for num in set(plt.get_fignums()) - figs_before:  # close half-built figures
                plt.close(num)
    if fig is None:
        fig = _trace_figure_matplotlib(ds, names)
    try:
        fig.savefig(path, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


# --------------------------------------------------------------------------- #
# NaN guard
# --------------------------------------------------------------------------- #
#: Pareto k-hat above which an importance-weighted estimate is unreliable (Vehtari, Simpson,
#: Gelman, Yao and Gabry 2024, "Pareto smoothed importance sampling", JMLR 25(72), Sec. 3: the
#: threshold for moderate sample sizes; above it the weights' variance is effectively infinite).
KHAT_UNRELIABLE = 0.7


def importance_weight_diagnostics(log_weights: Any) -> dict[str, float]:
    """How far an estimate built from the weights ``exp(log_weights)`` can be trusted:

    * ``khat``: the Pareto shape k-hat of the weights' upper tail, from ArviZ's PSIS
      (``arviz_stats`` ``psislw``); above :data:`KHAT_UNRELIABLE` = 0.7 the estimate rests on a
      handful of weights and its error is not what the sample size suggests;
    * ``ess``: the effective sample size of the self-normalised (raw, unsmoothed) weights,
      ``1 / sum_i w_i^2`` with ``sum_i w_i = 1``, and ``ess_frac`` = ess / n.

    Log-space throughout (the weights of exp(scale * TD) overflow long before k-hat says so). A
    flat upper tail (many weights equal, e.g. at a clamp) is bounded: k-hat is reported as 0.
    Fewer than 25 weights leave PSIS a tail of under 5 to fit: k-hat is NaN (not estimated)."""
    from arviz_stats.base.array import array_stats

    lw = np.asarray(log_weights.detach().cpu() if hasattr(log_weights, "detach") else log_weights, dtype=float)
    lw = lw.reshape(-1)
    if lw.size < 2 or not np.all(np.isfinite(lw)):
        raise ValueError(f"importance weight diagnostics need at least 2 finite log-weights, got {lw.size} "
                         f"({int(np.sum(~np.isfinite(lw)))} not finite)")
    w = np.exp(lw - lw.max())
    w /= w.sum()
    ess = float(1.0 / np.sum(w ** 2))
    with warnings.catch_warnings():  # ArviZ warns when k-hat is high: that is what we report
        warnings.simplefilter("ignore")
        try:
            _, khat = array_stats.psislw(lw)
        except ValueError as e:
            if "tail values are the same" in str(e):  # a flat tail, e.g. weights at the TD clamp
                khat = 0.0  # bounded weights: the tail's shape is <= 0, reported as 0
            elif "n_draws_tail must be at least" in str(e):  # too few weights to fit a tail
                khat = float("nan")
            else:
                raise
    return {"khat": float(khat), "ess": ess, "ess_frac": ess / lw.size}


def khat_warnings(run: str, steps: Sequence[int], traces: Mapping[str, Sequence[float]]) -> list[str]:
    """One line per ``*_khat`` trace of a run that ever exceeds :data:`KHAT_UNRELIABLE`."""
    out = []
    for name, values in sorted(traces.items()):
        if not name.endswith("khat"):
            continue
        v = np.asarray(values, dtype=float)
        bad = np.isfinite(v) & (v > KHAT_UNRELIABLE)
        if bad.any():
            i = int(np.nanargmax(v))
            out.append(f"warning: {run}: {name} > {KHAT_UNRELIABLE} (unreliable importance weights) in "
                       f"{int(bad.sum())} of {int(np.isfinite(v).sum())} records; max {v[i]:.2f} at step {steps[i]}")
    return out


class NonFiniteError(FloatingPointError):
    """A training term became NaN or infinite."""


def check_finite(name: str, value: Any, step: int) -> None:
    """Raise :class:`NonFiniteError` if ``value`` contains NaN or inf.

    ``value`` may be a Python/NumPy number, a NumPy array, or a torch tensor
    (any device; gradients are ignored). Finite values pass silently.
    """
    if type(value) is float:  # the common case (a loss as a float): no array round trip
        if math.isfinite(value):
            return
        value = np.float64(value)
    torch = sys.modules.get("torch")  # a tensor implies torch is already imported
    if torch is not None and isinstance(value, torch.Tensor):
        values = value.detach()
        if not (values.is_floating_point() or values.is_complex()):
            return  # integer and bool tensors are always finite
        n_nan = int(torch.isnan(values).sum())
        n_inf = int(torch.isinf(values).sum())
        size = values.numel()
    else:
        values = np.asarray(value)
        if values.dtype == bool or np.issubdtype(values.dtype, np.integer):
            return
        if not np.issubdtype(values.dtype, np.inexact):
            raise TypeError(
                f"check_finite({name!r}) needs a number, array or tensor, "
                f"got {type(value).__name__}"
            )
        n_nan = int(np.isnan(values).sum())
        n_inf = int(np.isinf(values).sum())
        size = values.size
    if n_nan or n_inf:
        if size == 1:
            detail = f"value {values.item()}"
        else:
            detail = f"{n_nan} NaN and {n_inf} inf among {size} elements"
        raise NonFiniteError(f"non-finite term {name!r} at step {step}: {detail}")


# --------------------------------------------------------------------------- #
# Across seeds: rliable's estimators with stratified-bootstrap intervals
# --------------------------------------------------------------------------- #
#: Bootstrap resamples for the learning-curve bands and for the final-return table.
CURVE_REPS = 2000
TABLE_REPS = 10000


def stratified_bootstrap_ci(scores: Any, func: Any, *, reps: int = TABLE_REPS, size: float = 0.95,
                            seed: int = 0, batched: Any = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Point estimate and percentile interval of ``func(scores)`` by rliable's stratified bootstrap.

    ``scores`` is ``(runs, tasks)``, as rliable takes it; each resample draws the runs of every
    task with replacement, independently per task (rliable's ``StratifiedBootstrap`` without task
    resampling), and the interval is the percentile interval of ``reps`` resamples (rliable's
    default ``method="percentile"``). This is rliable's bootstrap written out because
    ``rliable.library`` needs ``arch<8``, and arch 7 does not import under pandas 3; the estimators
    (:func:`rliable.metrics.aggregate_iqm`, ...) are rliable's own. Seeded by ``seed``, without
    touching NumPy's global random state. ``batched``, if given, computes ``func`` of all resamples
    at once (``(reps, runs, tasks) -> (reps, k)``) and must agree with it. Returns
    ``(point, low, high)`` as arrays of ``func``'s output shape."""
    x = np.asarray(scores, dtype=float)
    if x.ndim != 2 or x.shape[0] < 1:
        raise ValueError(f"scores must be (runs, tasks) with at least one run, got shape {x.shape}")
    point = np.atleast_1d(np.asarray(func(x), dtype=float))
    n, m = x.shape
    idx = np.random.default_rng(seed).integers(0, n, size=(reps, n, m))
    resamples = x[idx, np.arange(m)]  # (reps, runs, tasks): task j's runs drawn from task j only
    if batched is not None:
        stats = np.asarray(batched(resamples), dtype=float).reshape(reps, -1)
    else:
        stats = np.stack([np.atleast_1d(np.asarray(func(r), dtype=float)) for r in resamples])
    tail = 50.0 * (1.0 - size)
    low, high = np.percentile(stats, [tail, 100.0 - tail], axis=0)
    return point, low, high


def mean_and_iqm(scores: Any, *, reps: int = TABLE_REPS, seed: int = 0) -> dict[str, tuple[float, float, float]]:
    """``{"mean": (point, low, high), "iqm": (...)}`` of ``scores`` (runs, or (runs, tasks)) with
    95 % stratified-bootstrap intervals; rliable's ``aggregate_mean`` and ``aggregate_iqm``. With
    one run the interval is (nan, nan): one seed says nothing about another."""
    import scipy.stats
    from rliable import metrics

    x = np.asarray(scores, dtype=float)
    x = x.reshape(-1, 1) if x.ndim == 1 else x

    def both(s: np.ndarray) -> np.ndarray:
        return np.array([metrics.aggregate_mean(s), metrics.aggregate_iqm(s)])

    def both_batched(b: np.ndarray) -> np.ndarray:  # the same two, for (reps, runs, tasks) at once
        flat = b.reshape(len(b), -1)
        return np.stack([b.mean(axis=1).mean(axis=1), scipy.stats.trim_mean(flat, 0.25, axis=1)], axis=1)

    if x.shape[0] < 2:
        p = both(x)
        return {"mean": (float(p[0]), math.nan, math.nan), "iqm": (float(p[1]), math.nan, math.nan)}
    p, lo, hi = stratified_bootstrap_ci(x, both, reps=reps, seed=seed, batched=both_batched)
    return {k: (float(p[i]), float(lo[i]), float(hi[i])) for i, k in enumerate(("mean", "iqm"))}


def probability_of_improvement(x: Any, y: Any, *, reps: int = TABLE_REPS, seed: int = 0) -> tuple[float, float, float]:
    """rliable's probability of improvement P(X > Y) (a run of X scores higher than a run of Y,
    ties counted half; Mann-Whitney U / (n_x n_y), averaged over tasks) with the 95 % interval of
    rliable's ``StratifiedIndependentBootstrap``: the runs of X and of Y resampled independently.
    ``x``, ``y``: runs, or (runs, tasks). The interval is (nan, nan) unless both have two runs."""
    from rliable import metrics

    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    x, y = (a.reshape(-1, 1) if a.ndim == 1 else a for a in (x, y))
    point = float(metrics.probability_of_improvement(x, y))
    if min(len(x), len(y)) < 2:
        return point, math.nan, math.nan
    rng = np.random.default_rng(seed)
    bx = x[rng.integers(0, len(x), size=(reps, *x.shape)), np.arange(x.shape[1])]
    by = y[rng.integers(0, len(y), size=(reps, *y.shape)), np.arange(y.shape[1])]
    low, high = np.percentile(improvement_batched(bx, by), [2.5, 97.5])
    return point, float(low), float(high)


def improvement_batched(bx: np.ndarray, by: np.ndarray) -> np.ndarray:
    """rliable's ``probability_of_improvement`` of each resample ``(bx[r], by[r])`` at once, for
    ``bx`` (reps, runs_x, tasks) and ``by`` (reps, runs_y, tasks): the Mann-Whitney U of "greater"
    over n_x n_y is the fraction of pairs with x > y, ties counted half."""
    gt = bx[:, :, None, :] > by[:, None, :, :]
    eq = bx[:, :, None, :] == by[:, None, :, :]
    return (gt + 0.5 * eq).mean(axis=(1, 2)).mean(axis=1)


# --------------------------------------------------------------------------- #
# Which logged terms are sums or negatives of others
# --------------------------------------------------------------------------- #
def term_relations(columns: Mapping[str, Sequence[float]], order: Sequence[str] | None = None, *,
                   rtol: float = 1e-4) -> tuple[list[str], dict[str, dict[str, int]]]:
    """Split logged terms into independent ones and those that are signed sums of them.

    The columns are taken in ``order`` (default: as given); each is tested, on the rows where it is
    finite, against an integer combination of the independent columns kept so far that are finite
    there (the
    least-squares coefficients, rounded): if ``|column - combination| <= rtol * (1 + sum|parts|)``
    on every row it is a relation (``entropy = -kl_policy``, ``elbo = reward - kl_policy``), else it
    joins the independent columns. A column that is zero on every row is the empty sum. Put a
    total after its parts in ``order``: the first of two related columns is the one kept.

    Returns ``(independent, relations)``, ``relations[name] = {part: coefficient}``."""
    names = list(columns) if order is None else [n for n in order if n in columns]
    data = {n: np.asarray(columns[n], dtype=float).reshape(-1) for n in names}
    independent: list[str] = []
    relations: dict[str, dict[str, int]] = {}
    for name in names:
        rows = np.isfinite(data[name])  # the rows that logged it, and the kept columns logged there
        y = data[name][rows]
        if len(y) and not np.any(y):
            relations[name] = {}
            continue
        basis = [n for n in independent if np.all(np.isfinite(data[n][rows]))]
        if basis and len(y) > len(basis) + 1:  # enough rows that a fit is not automatic
            a = np.stack([data[n][rows] for n in basis], axis=1)
            coef = np.rint(np.linalg.lstsq(a, y, rcond=None)[0])
            scale = 1.0 + np.abs(a * coef).sum(axis=1)
            if np.any(coef) and np.all(np.abs(a @ coef - y) <= rtol * scale):
                parts = [(n, int(c)) for n, c in zip(basis, coef) if c]
                relations[name] = dict(sorted(parts, key=lambda nc: nc[1] < 0))  # added terms first
                continue
        independent.append(name)
    return independent, relations


def format_relation(name: str, parts: Mapping[str, int]) -> str:
    """``"elbo = elbo_reward - elbo_kl_policy"`` (``"x = 0"`` for the empty sum)."""
    if not parts:
        return f"{name} = 0"
    text = []
    for i, (part, c) in enumerate(parts.items()):
        sign = ("-" if c < 0 else "") if i == 0 else (" - " if c < 0 else " + ")
        text.append(f"{sign}{'' if abs(c) == 1 else f'{abs(c)} '}{part}")
    return f"{name} = {''.join(text)}"


# --------------------------------------------------------------------------- #
# Between-seed agreement of end-of-run quantities
# --------------------------------------------------------------------------- #
ONE_RUN = "one run: no between-seed statistics"

AGREEMENT_HEADER = (
    "Agreement between seeds at the end of training (chains = seeds; draws = the final evaluation's "
    "episode returns, or a quantity's last train records). between_sd: spread of the seeds' means; "
    "within_sd: spread within a seed. R-hat (ArviZ: rank-normalised split R-hat of train records; the "
    "unsplit R-hat of episode returns, which have no order) near 1: the seeds ended at the same level; "
    "above 1.01: they did not (different "
    "final policies, or a quantity still trending). ESS: what the pooled draws are worth as "
    "independent draws, at most the number of draws. This is NOT MCMC convergence."
)


def between_seed_agreement(draws: Mapping[str, Sequence[Sequence[float]]], *,
                           unordered: Sequence[str] = ()) -> pd.DataFrame:
    """One row per quantity of ``draws[name]`` = one sequence of draws per seed (equal lengths are
    not needed: each seed is cut to the shortest). Columns: ``seeds``, ``draws`` (per seed),
    ``mean``, ``between_sd`` (sd of the seed means), ``within_sd`` (pooled sd within seeds),
    ``r_hat`` and ``ess`` (ArviZ's rank-normalised R-hat and bulk ESS, ESS capped at the number of
    draws; NaN with fewer than 4 draws per seed, which ArviZ needs). Names in ``unordered`` (draws
    without an order, e.g. evaluation episodes) use the R-hat of the unsplit chains."""
    from arviz_stats.base.array import array_stats

    out = {}
    for name, per_seed in draws.items():
        seqs = [np.asarray(s, dtype=float) for s in per_seed]
        seqs = [s[np.isfinite(s)] for s in seqs]
        n = min((len(s) for s in seqs), default=0)
        if len(seqs) < 2 or n < 1:
            continue
        x = np.stack([s[-n:] for s in seqs])
        means = x.mean(axis=1)
        row = {"seeds": len(seqs), "draws": n, "mean": float(x.mean()), "between_sd": float(means.std(ddof=1)),
               "within_sd": float(np.sqrt(x.var(axis=1, ddof=1).mean())) if n > 1 else math.nan,
               "r_hat": math.nan, "ess": math.nan}
        if n >= 4 and np.ptp(x) > 0:
            with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
                warnings.simplefilter("ignore", RuntimeWarning)
                method = "identity" if name in unordered else "rank"
                row["r_hat"] = float(array_stats.rhat(x, chain_axis=0, draw_axis=1, method=method))
                row["ess"] = min(float(array_stats.ess(x, chain_axis=0, draw_axis=1, method="bulk")), float(x.size))
        out[name] = row
    return pd.DataFrame.from_dict(out, orient="index",
                                  columns=["seeds", "draws", "mean", "between_sd", "within_sd", "r_hat", "ess"])


def format_agreement(df: pd.DataFrame, *, decimals: int = 3) -> str:
    """Render :func:`between_seed_agreement` under a header saying what it measures;
    :data:`ONE_RUN` when there is nothing across seeds to compare."""
    if df.empty:
        return ONE_RUN
    header = "\n".join(textwrap.wrap(AGREEMENT_HEADER, 110))
    table = df.to_string(float_format=lambda x: f"{x:.{decimals}f}", na_rep="-")
    note = ("(-: R-hat and ESS need at least 4 draws per seed)"
            if df[["r_hat", "ess"]].isna().any().any() else "")
    return "\n".join(t for t in (header, table, note) if t)
