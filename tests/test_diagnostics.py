"""Tests for pplrl.diagnostics: term recording, seed DataTrees, summaries, plots, NaN guard."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest

from pplrl.diagnostics import (
    SUMMARY_HEADER,
    NonFiniteError,
    TermRecorder,
    check_finite,
    format_summary,
    plot_traces,
    runs_to_datatree,
    standard_error,
    summarize,
)


def _normal_runs(n_seeds: int, n_steps: int, *, shifts=None, seed: int = 0) -> list[dict]:
    """``n_seeds`` runs of i.i.d. N(shift, 1) traces for terms "loss" and "entropy"."""
    rng = np.random.default_rng(seed)
    shifts = np.zeros(n_seeds) if shifts is None else np.asarray(shifts, dtype=float)
    return [
        {
            "loss": shift + rng.normal(size=n_steps),
            "entropy": 2.0 + 0.1 * rng.normal(size=n_steps),
        }
        for shift in shifts
    ]


# --------------------------------------------------------------------------- #
# TermRecorder
# --------------------------------------------------------------------------- #
def test_recorder_arrays_fill_missing_with_nan():
    rec = TermRecorder()
    rec.record(0, loss=1.0, entropy=0.5)
    rec.record(1, loss=np.float32(0.75))
    rec.record(2, loss=0.5, entropy=0.25, eval_return=10)

    np.testing.assert_array_equal(rec.steps, [0, 1, 2])
    arrays = rec.as_arrays()
    assert list(arrays) == ["loss", "entropy", "eval_return"]
    np.testing.assert_allclose(arrays["loss"], [1.0, 0.75, 0.5])
    np.testing.assert_allclose(arrays["entropy"], [0.5, np.nan, 0.25])
    np.testing.assert_allclose(arrays["eval_return"], [np.nan, np.nan, 10.0])


def test_recorder_jsonl_round_trip(tmp_path):
    rec = TermRecorder()
    rec.record(10, loss=1.5, entropy=0.25)
    rec.record(0, loss=2.0)  # out of order: stored sorted by step
    rec.record(20, entropy=0.125)
    path = rec.save_jsonl(tmp_path / "run.jsonl")

    lines = path.read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"step": 0, "loss": 2.0},
        {"step": 10, "loss": 1.5, "entropy": 0.25},
        {"step": 20, "entropy": 0.125},
    ]

    loaded = TermRecorder.load_jsonl(path)
    np.testing.assert_array_equal(loaded.steps, rec.steps)
    original, restored = rec.as_arrays(), loaded.as_arrays()
    assert set(original) == set(restored)
    for name in original:
        np.testing.assert_array_equal(restored[name], original[name])


def test_recorder_accepts_one_element_tensor():
    torch = pytest.importorskip("torch")
    rec = TermRecorder()
    rec.record(0, loss=torch.tensor(0.5))
    assert rec.as_arrays()["loss"][0] == 0.5


@pytest.mark.parametrize("bad", [math.nan, math.inf, "1.0", None, 1 + 2j, np.array([1.0, 2.0])])
def test_recorder_rejects_bad_term_values(bad):
    rec = TermRecorder()
    with pytest.raises(ValueError, match="loss"):
        rec.record(3, loss=bad)
    assert len(rec) == 0  # nothing stored on failure


@pytest.mark.parametrize("bad_step", [math.nan, math.inf, 1.5, "3"])
def test_recorder_rejects_bad_steps(bad_step):
    with pytest.raises(ValueError, match="step"):
        TermRecorder().record(bad_step, loss=1.0)


def test_recorder_rejects_duplicate_term_and_reserved_name():
    rec = TermRecorder()
    rec.record(0, loss=1.0)
    rec.record(0, entropy=2.0)  # a different term for the same step is fine
    with pytest.raises(ValueError, match="already recorded"):
        rec.record(0, loss=3.0)
    with pytest.raises(ValueError, match="step"):
        rec.record(1, step=1.0)


def test_load_jsonl_reports_bad_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"step": 0, "loss": 1.0}\n{"loss": 2.0}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2"):
        TermRecorder.load_jsonl(path)


# --------------------------------------------------------------------------- #
# runs_to_datatree
# --------------------------------------------------------------------------- #
def test_datatree_dims_and_values():
    runs = _normal_runs(n_seeds=3, n_steps=40)
    steps = np.arange(40) * 5
    dt = runs_to_datatree(runs, steps=steps)

    post = dt["posterior"]
    assert post.sizes["chain"] == 3
    assert post.sizes["draw"] == 40
    assert set(post.data_vars) == {"loss", "entropy"}
    np.testing.assert_array_equal(post["draw"].values, steps)
    for chain, run in enumerate(runs):
        for name, trace in run.items():
            np.testing.assert_array_equal(post[name].isel(chain=chain).values, trace)


def test_datatree_from_recorders_with_seed_labels():
    recorders = []
    for seed in (7, 11):
        rec = TermRecorder()
        for step in range(0, 30, 10):
            rec.record(step, loss=float(seed + step))
        recorders.append(rec)

    dt = runs_to_datatree(
        [r.as_arrays() for r in recorders], steps=recorders[0].steps, seeds=[7, 11], group="train"
    )
    ds = dt["train"]
    np.testing.assert_array_equal(ds["chain"].values, [7, 11])
    np.testing.assert_array_equal(ds["draw"].values, [0, 10, 20])
    np.testing.assert_array_equal(ds["loss"].sel(chain=11).values, [11.0, 21.0, 31.0])


def test_datatree_truncates_unequal_runs_with_warning():
    runs = [{"loss": np.arange(10.0)}, {"loss": np.arange(7.0)}, {"loss": np.arange(9.0)}]
    with pytest.warns(UserWarning, match="truncating"):
        dt = runs_to_datatree(runs, steps=np.arange(10) * 2)
    assert dt["posterior"].sizes["draw"] == 7
    np.testing.assert_array_equal(dt["posterior"]["draw"].values, np.arange(7) * 2)
    np.testing.assert_array_equal(dt["posterior"]["loss"].isel(chain=0).values, np.arange(7.0))


def test_datatree_rejects_empty_runs():
    with pytest.raises(ValueError, match="empty"):
        runs_to_datatree([])


def test_datatree_rejects_mismatched_term_names():
    runs = [{"loss": np.zeros(5), "entropy": np.zeros(5)}, {"loss": np.zeros(5), "kl": np.zeros(5)}]
    with pytest.raises(ValueError, match="different term names"):
        runs_to_datatree(runs)


def test_datatree_rejects_short_steps():
    with pytest.raises(ValueError, match="steps"):
        runs_to_datatree([{"loss": np.zeros(5)}], steps=np.arange(3))


# --------------------------------------------------------------------------- #
# summarize / format_summary
# --------------------------------------------------------------------------- #
def test_summary_mean_matches_numpy():
    rng = np.random.default_rng(1)
    runs = [{"loss": 3.0 + 0.1 * rng.normal(size=200)} for _ in range(4)]
    df = summarize(runs_to_datatree(runs))

    all_values = np.stack([run["loss"] for run in runs])
    assert df.loc["loss", "mean"] == pytest.approx(all_values.mean(), rel=1e-12)
    assert df.loc["loss", "sd"] == pytest.approx(all_values.std(), rel=0.02)
    assert {"mean", "sd", "ess_bulk", "r_hat"} <= set(df.columns)


def test_rhat_near_one_for_agreeing_seeds_and_large_for_shifted_seed():
    agreeing = summarize(runs_to_datatree(_normal_runs(4, 500, seed=2)))
    assert agreeing.loc["loss", "r_hat"] == pytest.approx(1.0, abs=0.02)
    assert agreeing.loc["entropy", "r_hat"] == pytest.approx(1.0, abs=0.02)

    shifted = summarize(runs_to_datatree(_normal_runs(4, 500, shifts=[0, 0, 0, 10], seed=2)))
    assert shifted.loc["loss", "r_hat"] > 1.1
    assert shifted.loc["entropy", "r_hat"] == pytest.approx(1.0, abs=0.02)  # not shifted


def test_summary_var_names_and_constant_trace_are_warning_free():
    runs = [{"loss": np.ones(50), "entropy": np.linspace(0, 1, 50)} for _ in range(2)]
    df = summarize(runs_to_datatree(runs), var_names=["loss"])  # warnings are errors in pytest
    assert list(df.index) == ["loss"]
    assert df.loc["loss", "mean"] == 1.0


def test_format_summary_has_header_and_table():
    df = summarize(runs_to_datatree(_normal_runs(2, 50)))
    text = format_summary(df)
    first_line = text.splitlines()[0]
    assert first_line == SUMMARY_HEADER
    assert "NOT MCMC convergence" in first_line
    assert "chains = seeds" in first_line and "draws = training steps" in first_line
    assert "r_hat" in text and "loss" in text and "entropy" in text


# --------------------------------------------------------------------------- #
# plot_traces
# --------------------------------------------------------------------------- #
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("use_arviz_plots", [True, False])
def test_plot_traces_writes_png(tmp_path, caplog, use_arviz_plots):
    import matplotlib.pyplot as plt

    dt = runs_to_datatree(_normal_runs(3, 30), steps=np.arange(30) * 10)
    with caplog.at_level(logging.WARNING, logger="pplrl.diagnostics"):
        out = plot_traces(dt, tmp_path / "traces.png", use_arviz_plots=use_arviz_plots)
    assert "falling back" not in caplog.text  # the arviz_plots path really worked

    assert out == tmp_path / "traces.png"
    data = out.read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 1000
    assert plt.get_fignums() == []  # figure closed


def test_plot_traces_var_names_and_unknown_term(tmp_path):
    dt = runs_to_datatree(_normal_runs(2, 20))
    out = plot_traces(dt, tmp_path / "loss.png", var_names=["loss"])
    assert out.stat().st_size > 0
    with pytest.raises(ValueError, match="unknown"):
        plot_traces(dt, tmp_path / "x.png", var_names=["nope"])


# --------------------------------------------------------------------------- #
# check_finite
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("value", [0.0, -3.5, 7, np.float32(1e30), np.ones(3), np.array(2.0)])
def test_check_finite_passes_finite_values(value):
    check_finite("loss", value, step=4)


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, np.array([1.0, np.nan])])
def test_check_finite_raises_on_nan_or_inf(value):
    with pytest.raises(NonFiniteError, match=r"'loss' at step 12"):
        check_finite("loss", value, step=12)


def test_check_finite_with_tensors():
    torch = pytest.importorskip("torch")
    check_finite("elbo", torch.tensor([1.0, 2.0], requires_grad=True), step=0)
    check_finite("count", torch.tensor([1, 2]), step=0)
    with pytest.raises(NonFiniteError, match=r"'elbo' at step 5.*1 NaN and 1 inf"):
        check_finite("elbo", torch.tensor([1.0, float("nan"), float("inf")]), step=5)


def test_non_finite_error_is_floating_point_error():
    assert issubclass(NonFiniteError, FloatingPointError)
    with pytest.raises(FloatingPointError):
        check_finite("loss", float("nan"), step=0)


def test_standard_error_over_seeds():
    # values 1, 2, 6: mean 3, sample variance (4 + 1 + 9) / 2 = 7, se sqrt(7 / 3)
    assert standard_error([1.0, 2.0, 6.0]) == pytest.approx(math.sqrt(7 / 3))
    assert math.isnan(standard_error([5.0]))


# --------------------------------------------------------------------------- #
# rliable estimates across seeds, term relations, end-of-run agreement
# --------------------------------------------------------------------------- #
def test_mean_and_iqm_are_rliables_with_the_stratified_bootstrap_interval():
    from rliable import metrics

    from pplrl.diagnostics import mean_and_iqm

    scores = np.array([-300.0, -150.0, -200.0, -900.0, -180.0, -210.0, -220.0, -190.0])
    est = mean_and_iqm(scores, reps=4000)
    assert est["mean"][0] == pytest.approx(metrics.aggregate_mean(scores[:, None]))
    assert est["iqm"][0] == pytest.approx(metrics.aggregate_iqm(scores[:, None]))
    # two runs {0, 1}: a resample's mean is 0, 1/2 or 1 (prob 1/4, 1/2, 1/4): 95 % interval [0, 1]
    two = mean_and_iqm([0.0, 1.0], reps=4000)
    assert two["mean"] == pytest.approx((0.5, 0.0, 1.0))
    # one run: the point, no interval
    one = mean_and_iqm([3.0])
    assert one["iqm"][0] == 3.0 and math.isnan(one["iqm"][1]) and math.isnan(one["mean"][2])


def test_batched_interval_equals_rliables_estimators_on_each_resample():
    from rliable import metrics

    from pplrl.diagnostics import mean_and_iqm, stratified_bootstrap_ci

    scores = np.random.default_rng(0).normal(size=(7, 1))
    both = lambda s: np.array([metrics.aggregate_mean(s), metrics.aggregate_iqm(s)])  # noqa: E731
    _, lo, hi = stratified_bootstrap_ci(scores, both, reps=300, seed=5)
    est = mean_and_iqm(scores, reps=300, seed=5)
    assert (est["mean"][1], est["iqm"][1]) == pytest.approx(tuple(lo))
    assert (est["mean"][2], est["iqm"][2]) == pytest.approx(tuple(hi))


def test_probability_of_improvement_is_rliables():
    from rliable import metrics

    from pplrl.diagnostics import improvement_batched, probability_of_improvement

    x, y = np.array([3.0, 1.0, 2.0, 2.0]), np.array([2.0, 0.0, 1.0])
    p, lo, hi = probability_of_improvement(x, y)
    assert p == pytest.approx(metrics.probability_of_improvement(x[:, None], y[:, None]))
    assert p == pytest.approx((3 + 1.5 + 2.5 + 2.5) / 12)  # per x: pairs with x > y, ties half
    assert 0.0 <= lo <= p <= hi <= 1.0
    rng = np.random.default_rng(1)
    bx, by = rng.integers(0, 4, size=(20, 4, 2)).astype(float), rng.integers(0, 4, size=(20, 3, 2)).astype(float)
    np.testing.assert_allclose(improvement_batched(bx, by),
                               [metrics.probability_of_improvement(a, b) for a, b in zip(bx, by)])
    assert probability_of_improvement([5.0, 6.0], [1.0, 2.0])[1:] == (1.0, 1.0)  # every resample: X better
    assert math.isnan(probability_of_improvement([5.0], [1.0, 2.0])[1])


def test_term_relations_finds_negatives_sums_and_zeros():
    from pplrl.diagnostics import format_relation, term_relations

    rng = np.random.default_rng(0)
    reward, kl, loss = rng.normal(size=(3, 40))
    cols = {"elbo_kl_policy": kl, "elbo_reward": reward, "loss": loss, "entropy": -kl, "zero": np.zeros(40),
            "near": reward + kl + 1e-2 * rng.normal(size=40), "elbo": reward - kl}
    independent, relations = term_relations(cols)
    assert independent == ["elbo_kl_policy", "elbo_reward", "loss", "near"]
    assert relations == {"entropy": {"elbo_kl_policy": -1}, "zero": {},
                         "elbo": {"elbo_reward": 1, "elbo_kl_policy": -1}}
    assert format_relation("elbo", relations["elbo"]) == "elbo = elbo_reward - elbo_kl_policy"
    assert format_relation("entropy", relations["entropy"]) == "entropy = -elbo_kl_policy"
    # a quantity logged in some records only (a model fit every other record) hides no relation
    sparse = {f"m{i}": np.where(np.arange(40) % 2 == 0, rng.normal(size=40), np.nan) for i in range(25)}
    cols2 = {"elbo_kl_policy": kl, "elbo_reward": reward, **sparse, "elbo": reward - kl}
    assert term_relations(cols2)[1] == {"elbo": {"elbo_reward": 1, "elbo_kl_policy": -1}}
    # too few rows to tell a relation from a fit: nothing is called derived
    few = {k: v[:2] for k, v in cols.items() if k in ("elbo_kl_policy", "elbo_reward", "elbo")}
    assert term_relations(few)[1] == {}


def test_between_seed_agreement_flags_a_disagreeing_seed_and_says_one_run():
    from pplrl.diagnostics import ONE_RUN, between_seed_agreement, format_agreement

    rng = np.random.default_rng(2)
    same = [rng.normal(size=50) for _ in range(4)]
    shifted = [*same[:3], same[3] + 10.0]
    df = between_seed_agreement({"same": same, "shifted": shifted, "short": [[1.0, 2.0], [1.5, 2.5]]},
                                unordered=["same"])
    assert df.loc["same", "r_hat"] == pytest.approx(1.0, abs=0.03)
    assert df.loc["shifted", "r_hat"] > 1.5
    assert df.loc["same", "ess"] <= 200 and df.loc["shifted", "ess"] < df.loc["same", "ess"]
    assert df.loc["shifted", "between_sd"] == pytest.approx(np.std([s.mean() for s in shifted], ddof=1))
    assert math.isnan(df.loc["short", "r_hat"]) and df.loc["short", "draws"] == 2
    text = format_agreement(df)
    assert text.startswith("Agreement between seeds at the end of training") and "nan" not in text
    assert "R-hat and ESS need at least 4 draws per seed" in text
    assert between_seed_agreement({"x": [[1.0, 2.0, 3.0, 4.0]]}).empty  # one seed
    assert format_agreement(between_seed_agreement({"x": [[1.0, 2.0]]})) == ONE_RUN
