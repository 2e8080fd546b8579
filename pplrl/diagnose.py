"""``pplrl diagnose``: ArviZ summaries of training runs, seeds as chains.

The plugins the runs recorded (algorithms defined outside pplrl) are loaded first; the
summaries only read ``metrics.jsonl``, so one that no longer loads is a note in the
report, not a failure."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pplrl import diagnostics
from pplrl.runfiles import read_records
from pplrl.runner import CONFIG, METRICS


def load_run_traces(run: Path, kind: str = "train") -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Steps and per-term arrays of one run's ``metrics.jsonl`` records of ``kind``."""
    rows = [r for r in read_records(run / METRICS) if r["kind"] == kind]  # a torn last line: dropped, warned
    keys = sorted({k for r in rows for k, v in r.items() if k not in ("step", "kind") and isinstance(v, (int, float))})
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


def diagnose(folder: Path, plot: Path | None = None) -> str:
    runs = sorted(p.parent for p in Path(folder).rglob(CONFIG) if (p.parent / METRICS).exists())
    if not runs:
        raise FileNotFoundError(f"no run folders (with {CONFIG} and {METRICS}) under {folder}")
    text = load_recorded_plugins(runs)
    for run in runs:  # importance weights that an estimate cannot rest on (PSIS k-hat > 0.7)
        text.extend(diagnostics.khat_warnings(str(run), *load_run_traces(run, "train")))
    for kind in ("train", "eval"):
        traces = [load_run_traces(r, kind) for r in runs]
        traces = [(s, t) for s, t in traces if len(s) > 1]
        if not traces:
            continue
        n = min(len(s) for s, _ in traces)
        names = sorted(set.intersection(*(set(t) for _, t in traces)))
        dt = diagnostics.runs_to_datatree([{k: t[k][:n] for k in names} for _, t in traces], steps=traces[0][0][:n])
        text.append(f"== {kind} records, {len(traces)} runs: {', '.join(str(r) for r in runs)}")
        text.append(diagnostics.format_summary(diagnostics.summarize(dt, skipna=True)))
        target = (plot or Path(folder) / "diagnostics.png")
        target = target.with_name(f"{target.stem}_{kind}{target.suffix}")
        diagnostics.plot_traces(dt, target)
        text.append(f"trace plots: {target}")
    return "\n".join(text)
