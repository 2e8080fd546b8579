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
import warnings
from collections.abc import Mapping, Sequence
from os import PathLike
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import xarray as xr

__all__ = [
    "KHAT_UNRELIABLE",
    "NonFiniteError",
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
    flat upper tail (many weights equal, e.g. at a clamp) is bounded: k-hat is reported as 0."""
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
        except ValueError as e:  # "All tail values are the same": a flat tail, e.g. weights at the TD clamp
            if "tail values are the same" not in str(e):
                raise
            khat = 0.0  # bounded weights: the tail's shape is <= 0, reported as 0
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
