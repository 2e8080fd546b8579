"""``pplrl diagnose`` on synthetic run folders: learning curves with rliable intervals, the
final-return table and probability of improvement, the ELBO drawn by its independent terms
with units, and between-seed statistics only where there is more than one seed."""

from __future__ import annotations

import itertools
import json

import matplotlib
import numpy as np
import pytest
from matplotlib.collections import PolyCollection
from rliable import metrics

from pplrl import diagnose as dg
from pplrl import diagnostics

EVAL_STEPS = (100, 200, 300, 400)


def write_run(folder, algo, seed, *, finals, evals, final_record=True, n_train=30, rng=None, timing=True):
    """A run folder as the runner writes it: config.json and metrics.jsonl with SAC-shaped train
    records (elbo = elbo_reward - elbo_kl_policy, entropy = -elbo_kl_policy), eval records and a
    final record."""
    rng = rng or np.random.default_rng(seed)
    folder.mkdir(parents=True)
    cfg = {"algo": algo, "plugin": None, "config": {"env_id": "Pendulum-v1", "seed": seed}, "steps": 400, "run": {}}
    (folder / "config.json").write_text(json.dumps(cfg))
    rows = []
    for i in range(n_train):
        step = 10 * (i + 1) + 100
        reward = -0.5 * i + rng.normal()
        kl = -0.6 + 0.1 * rng.normal()
        alpha = 1.0 - 0.01 * i
        row = {"step": step, "kind": "train", "critic_loss": 50.0 / (i + 1) + rng.random(), "alpha": alpha,
               "elbo_reward": reward, "elbo_kl_policy": kl, "elbo": reward - kl, "entropy": -kl,
               "actor_loss": -alpha * (reward - kl), "elbo_kl_initial": 0.0}
        if timing:
            row.update({"wall_s": 0.01 * step, "steps_per_s": 100.0})
        rows.append(row)
    for step, value in zip(EVAL_STEPS, evals):
        rows.append({"step": step, "kind": "eval", "mean_return": value, "returns": [value - 1.0, value + 1.0]})
    if final_record:
        rows.append({"step": 400, "kind": "final", "mean_return": float(np.mean(finals)), "returns": list(finals)})
    rows.sort(key=lambda r: r["step"])
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


SAC_FINAL = {0: [-200.0, -190.0, -210.0, -205.0], 1: [-300.0, -310.0, -290.0, -295.0],
             2: [-150.0, -160.0, -155.0, -145.0]}
MBPO_LAST_EVAL = {0: -400.0, 1: -350.0}


@pytest.fixture
def runs(tmp_path):
    """sac: 3 seeds with final records; mbpo: 2 seeds without (their last eval counts);
    virel: one seed."""
    for seed, finals in SAC_FINAL.items():
        write_run(tmp_path / f"sac-{seed}", "sac", seed, finals=finals, evals=[-900, -600, -400, -999])
    for seed, last in MBPO_LAST_EVAL.items():
        write_run(tmp_path / f"mbpo-{seed}", "mbpo", seed, finals=[0.0], evals=[-1000, -800, -500 + seed, last],
                  final_record=False)
    write_run(tmp_path / "one" / "virel-0", "virel", 0, finals=[-700.0, -710.0], evals=[-1200, -900, -800, -750])
    return tmp_path


def test_report_opens_with_the_figure_and_gives_rliable_intervals(runs):
    report = dg.diagnose(runs)
    lines = report.splitlines()
    assert lines[1] == f"learning curves: {runs / 'diagnostics.png'}" and (runs / "diagnostics.png").exists()

    # the final-return table: the final record's mean return per seed, mean and IQM over seeds
    sac = [float(np.mean(v)) for v in SAC_FINAL.values()]
    est = diagnostics.mean_and_iqm(sac)
    assert est["mean"][0] == pytest.approx(metrics.aggregate_mean(np.array(sac)[:, None]))
    assert est["iqm"][0] == pytest.approx(metrics.aggregate_iqm(np.array(sac)[:, None]))
    row = next(line for line in lines if line.strip().startswith("sac "))
    lo, hi = est["mean"][1:]
    assert f"{est['mean'][0]:.1f} [{lo:.1f}, {hi:.1f}]" in row and row.rstrip().endswith("final")
    mbpo_row = next(line for line in lines if line.strip().startswith("mbpo "))
    assert f"{np.mean(list(MBPO_LAST_EVAL.values())):.1f} [" in mbpo_row and mbpo_row.rstrip().endswith("last eval")
    virel_row = next(line for line in lines if line.strip().startswith("virel "))
    assert "one seed: no interval" in virel_row and "-705.0" in virel_row

    # probability of improvement between the two algorithms with two seeds or more
    p, plo, phi = diagnostics.probability_of_improvement(list(MBPO_LAST_EVAL.values()), sac)
    assert p == pytest.approx(metrics.probability_of_improvement(np.array(list(MBPO_LAST_EVAL.values()))[:, None],
                                                                 np.array(sac)[:, None]))
    assert f"P(mbpo > sac) = {p:.2f} [{plo:.2f}, {phi:.2f}] (2 vs 3 seeds)" in report
    assert "mbpo vs virel: needs two seeds of each (2 and 1)" in report

    # honest summaries: one run says so; no NaN anywhere; no average over checkpoints
    assert "between seeds, virel on Pendulum-v1: one run: no between-seed statistics" in report
    assert "nan" not in report.lower()
    assert "Agreement between seeds" in report and "critic_loss (last records)" in report
    assert "final_return (episodes)" in report
    assert "-725" not in report  # the mean of virel's eval checkpoints is not a result

    # the ELBO: its relation found in the data, the unit, why it falls; derived terms named, not drawn
    assert "ELBO of sac on Pendulum-v1 (3 seeds): elbo = elbo_reward - elbo_kl_policy; unit: nats per state" in report
    assert "not drawn" in report and "entropy = -elbo_kl_policy" in report and "elbo_kl_initial = 0" in report
    assert "the critic is learning negative values" in report
    assert "speed: 100 env steps/s" in report
    assert "other quantities drawn, end of run (mean over seeds of the last tenth of the records): actor_loss" in report
    assert (runs / "diagnostics_train_sac_Pendulum-v1.png").exists()


def test_learning_curves_are_rliable_estimates_with_bands_only_across_seeds(runs):
    groups = dg._groups([dg.Run.load(p) for p in dg.find_runs([runs])])
    curve = dg.learning_curves(groups[("sac", "Pendulum-v1")])
    assert sorted(curve) == list(EVAL_STEPS)
    values = [-600.0] * 3
    assert curve[200]["mean"][0] == pytest.approx(metrics.aggregate_mean(np.array(values)[:, None]))
    assert curve[200]["n"] == 3 and curve[200]["mean"][1:] == pytest.approx((-600.0, -600.0))

    fig = dg.learning_curve_figure(groups)
    try:
        assert len(fig.axes) == 2
        for ax in fig.axes:
            assert ax.get_xlabel() == "environment steps"
            assert "return" in ax.get_ylabel() and "per episode" in ax.get_ylabel()
            labels = [line.get_label() for line in ax.get_lines()]
            assert labels == ["mbpo (2 seeds)", "sac (3 seeds)", "virel (1 seed: no interval)"]
            assert len([c for c in ax.collections if isinstance(c, PolyCollection)]) == 2  # no band for one seed
        mean_ax = fig.axes[0]
        sac_line = mean_ax.get_lines()[1]
        np.testing.assert_allclose(sac_line.get_ydata(), [-900, -600, -400, -999])
    finally:
        matplotlib.pyplot.close(fig)


def test_training_figure_draws_only_independent_panels_with_units(runs):
    groups = dg._groups([dg.Run.load(p) for p in dg.find_runs([runs])])
    traces = [r.train() for r in groups[("sac", "Pendulum-v1")]]
    pooled = {n: np.concatenate([t[n] for _, t in traces]) for n in traces[0][1]}
    split = dg.split_terms(pooled)
    assert split.total == "elbo" and split.parts == {"elbo_reward": 1, "elbo_kl_policy": -1}
    assert split.relations == {"entropy": {"elbo_kl_policy": -1}, "elbo_kl_initial": {}}
    assert "wall_s" not in split.others and "steps_per_s" not in split.others

    fig = dg.training_figure(("sac", "Pendulum-v1"), traces, split, ["a note"], seeds=[0, 1, 2])
    try:
        elbo_ax, *others = fig.axes
        assert elbo_ax.get_ylabel() == "ELBO (nats per state)" and "a note" in elbo_ax.get_title(loc="left")
        lines = {ln.get_label(): np.asarray(ln.get_ydata()) for ln in elbo_ax.get_lines() if ln.get_label()[0] != "_"}
        assert set(lines) == {"+ elbo_reward", "- elbo_kl_policy", "= elbo"}
        np.testing.assert_allclose(lines["+ elbo_reward"] + lines["- elbo_kl_policy"], lines["= elbo"], atol=1e-9)
        titles = [ax.get_title(loc="left") for ax in others]
        assert titles == ["actor_loss", "alpha", "critic_loss"]  # no entropy, elbo terms or timing panels
        for ax in fig.axes:
            assert ax.get_xlabel() == "environment steps" and ax.get_ylabel()
        assert others[2].get_ylabel() == "squared reward units"
        # no panel is the negative or the sum of others (seed 0's line of each panel)
        first = [np.asarray(ax.get_lines()[0].get_ydata()) for ax in others]
        for a, b in itertools.combinations(first, 2):
            assert not np.allclose(a, b) and not np.allclose(a, -b)
        for i, j, k in itertools.permutations(range(len(first)), 3):
            assert not np.allclose(first[i], first[j] + first[k]) and not np.allclose(first[i], first[j] - first[k])
    finally:
        matplotlib.pyplot.close(fig)


def test_one_run_report(tmp_path):
    write_run(tmp_path / "r", "sac", 0, finals=[-100.0, -120.0], evals=[-500, -400, -300, -200], timing=False)
    report = dg.diagnose(tmp_path / "r", tmp_path / "plots" / "d.png")
    assert "one seed: no interval" in report
    assert "between seeds, sac on Pendulum-v1: one run: no between-seed statistics" in report
    assert "probability of improvement" not in report and "nan" not in report.lower()
    assert (tmp_path / "plots" / "d.png").exists() and (tmp_path / "plots" / "d_train_sac_Pendulum-v1.png").exists()


def test_several_folders_and_no_eval_records(tmp_path):
    for name in ("a", "b"):
        write_run(tmp_path / name / "run", "sac", 0 if name == "a" else 1, finals=[-1.0, -2.0], evals=[])
        lines = (tmp_path / name / "run" / "metrics.jsonl").read_text().splitlines()
        (tmp_path / name / "run" / "metrics.jsonl").write_text(
            "".join(line + "\n" for line in lines if '"final"' not in line))
    report = dg.diagnose([tmp_path / "a", tmp_path / "b"])
    assert "2 runs in 1 group" in report and "learning curves: no evaluation records" in report
    assert "final return: no run has an evaluation record" in report
    assert "between seeds, sac on Pendulum-v1 (2 seeds):" in report
    with pytest.raises(FileNotFoundError, match="no run folders"):
        dg.diagnose(tmp_path / "nothing-here")


def test_report_keeps_the_khat_warnings(tmp_path):
    write_run(tmp_path / "r", "vmbpo", 0, finals=[-1.0, -2.0], evals=[-5, -4, -3, -2])
    path = tmp_path / "r" / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    for i, r in enumerate(r for r in rows if r["kind"] == "train"):
        r["q_d_weight_khat"] = 0.2 if i < 20 else 0.9
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = dg.diagnose(tmp_path)
    assert "q_d_weight_khat > 0.7 (unreliable importance weights) in 10 of 30 records; max 0.90" in report


def test_khat_is_drawn_over_training_against_the_unreliable_line(tmp_path):
    write_run(tmp_path / "r", "vmbpo", 0, finals=[-1.0, -2.0], evals=[-5, -4, -3, -2])
    steps, traces = dg.load_run_traces(tmp_path / "r")
    traces["q_d_weight_khat"] = np.linspace(0.1, 1.0, len(steps))
    split = dg.split_terms(traces)
    fig = dg.training_figure(("vmbpo", "Pendulum-v1"), [(steps, traces)], split)
    ax = next(a for a in fig.axes if a.get_title(loc="left") == "q_d_weight_khat")
    assert ax.get_ylabel() == "Pareto k-hat (> 0.7: unreliable)"
    assert any(np.allclose(line.get_ydata(), diagnostics.KHAT_UNRELIABLE) for line in ax.get_lines())
    matplotlib.pyplot.close(fig)
