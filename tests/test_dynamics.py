"""The probabilistic dynamics ensemble (models.dynamics): the Pyro model is eq. (10) of
beta-VMBPO (001_…), SVI trains every parameter, the batched layers equal a loop over
members, a linear-Gaussian system's noise is recovered, elites exclude bad members."""

import math

import numpy as np
import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro.infer import SVI, Trace_ELBO

from models.dynamics import LOGVAR_BOUND_PENALTY, EnsembleLinear, GaussianEnsemble, Normalizer


def small_ensemble(**kwargs) -> GaussianEnsemble:
    kwargs = {"ensemble_size": 3, "num_elites": 2, "hidden": (16, 16), **kwargs}
    return GaussianEnsemble(2, 1, **kwargs)


def random_batch(shape, obs_dim=2, act_dim=1):
    obs = torch.randn(*shape, obs_dim)
    act = torch.randn(*shape, act_dim)
    return obs, act, obs + 0.3 * torch.randn(*shape, obs_dim), torch.randn(*shape)


def linear_gaussian(n: int, noise: float = 0.1):
    """s' = s + 0.5 a + N(0, noise^2), r = -s^2 (1-D state and action)."""
    obs = torch.rand(n, 1) * 4 - 2
    act = torch.rand(n, 1) * 2 - 1
    next_obs = obs + 0.5 * act + noise * torch.randn(n, 1)
    return obs, act, next_obs, -obs.squeeze(-1) ** 2


# ----------------------------------------------------------------------------- layers
def test_ensemble_linear_equals_per_member_matmul():
    layer = EnsembleLinear(4, 5, 3)
    x = torch.randn(4, 7, 5)
    expected = torch.stack([x[e] @ layer.weight[e] + layer.bias[e] for e in range(4)])
    assert torch.allclose(layer(x), expected, atol=1e-6)
    with pytest.raises(ValueError, match=r"\[4, B, 5\]"):
        layer(torch.randn(7, 5))


def test_ensemble_forward_equals_loop_over_members_of_plain_mlps():
    ens = small_ensemble(activation=torch.nn.SiLU)
    obs, act, _, _ = random_batch((3, 6))
    ens.normalizer.update(torch.randn(50, 3) * 2 + 1)
    mean, logvar = ens(obs, act)
    layers = [m for m in ens.net if isinstance(m, EnsembleLinear)]
    for e in range(3):
        h = (torch.cat([obs[e], act[e]], -1) - ens.normalizer.mean) / ens.normalizer.std
        for i, layer in enumerate(layers):
            h = h @ layer.weight[e] + layer.bias[e]
            if i < len(layers) - 1:
                h = F.silu(h)
        raw_mean, raw_logvar = h.chunk(2, -1)
        assert torch.allclose(mean[e], raw_mean, atol=1e-5)
        bounded = ens.max_logvar - F.softplus(ens.max_logvar - raw_logvar)
        bounded = ens.min_logvar + F.softplus(bounded - ens.min_logvar)
        assert torch.allclose(logvar[e], bounded, atol=1e-5)
    # a [B, ...] batch is the same batch for every member
    mean_b, logvar_b = ens(obs[0], act[0])
    assert torch.allclose(mean_b[1], ens(obs[0].expand(3, 6, 2), act[0].expand(3, 6, 1))[0][1])
    assert mean_b.shape == logvar_b.shape == (3, 6, 3)


# ---------------------------------------------------------------------- the Pyro model
def test_model_log_likelihood_is_hand_computed_gaussian_density():
    ens = small_ensemble()
    obs, act, next_obs, reward = random_batch((3, 5))
    loss = Trace_ELBO(max_plate_nesting=2).loss(ens.model, ens.guide, obs, act, next_obs, reward)

    with torch.no_grad():
        mean, logvar = ens(obs, act)
        target = torch.cat([next_obs - obs, reward.unsqueeze(-1)], -1)
        log_density = -0.5 * (math.log(2 * math.pi) + logvar + (target - mean) ** 2 / logvar.exp())
        penalty = LOGVAR_BOUND_PENALTY * (ens.max_logvar.sum() - ens.min_logvar.sum())
        expected = -log_density.sum() / 5 + penalty          # 1/B per transition, summed over members
        assert loss == pytest.approx(float(expected), rel=1e-5)
        assert torch.allclose(ens.log_prob(obs, act, next_obs, reward), log_density.sum(-1), atol=1e-5)

    trace = pyro.poutine.trace(ens.model).get_trace(obs, act, next_obs, reward)
    site = trace.nodes["target"]
    assert site["is_observed"] and site["scale"] == pytest.approx(1 / 5)
    assert site["fn"].batch_shape == (3, 5) and site["fn"].event_shape == (3,)
    assert [f.name for f in site["cond_indep_stack"]] == ["members", "data"]
    assert "logvar_bound_penalty" in trace.nodes


def test_shared_batch_broadcasts_to_every_member():
    ens = small_ensemble()
    obs, act, next_obs, reward = random_batch((5,))
    elbo = Trace_ELBO(max_plate_nesting=2)
    shared = elbo.loss(ens.model, ens.guide, obs, act, next_obs, reward)
    per_member = elbo.loss(ens.model, ens.guide, *(x.expand(3, *x.shape) for x in (obs, act, next_obs, reward)))
    assert shared == pytest.approx(per_member, rel=1e-6)
    assert ens.log_prob(obs, act, next_obs, reward.unsqueeze(-1)).shape == (3, 5)
    assert ens.sample_member_dist(obs, act).batch_shape == (3, 5, 3)


def test_one_svi_step_moves_every_parameter_of_every_member():
    ens = small_ensemble(ensemble_size=2, num_elites=1)
    before = {name: p.detach().clone() for name, p in ens.named_parameters()}
    svi = SVI(ens.model, ens.guide, pyro.optim.Adam({"lr": 1e-2}), Trace_ELBO(max_plate_nesting=2))
    svi.step(*random_batch((2, 8)))
    assert set(pyro.get_param_store().keys()) == {f"dynamics.{name}" for name in before}
    for name, p in ens.named_parameters():
        change = (p.detach() - before[name]).abs()
        if name.startswith("net."):           # [E, ...]: each member has its own slice
            assert all(change[e].max() > 0 for e in range(2)), name
        else:
            assert change.max() > 0, name


def test_fit_moves_every_parameter_with_and_without_module_local_params():
    data = random_batch((200,))
    ens = small_ensemble()
    before = {name: p.detach().clone() for name, p in ens.named_parameters()}
    ens.fit(*data, epochs=1, batch_size=64)
    assert all(not torch.equal(p.detach(), before[name]) for name, p in ens.named_parameters())

    pyro.clear_param_store()
    with pyro.settings.context(module_local_params=True):
        local = small_ensemble(name="local")
        before = {name: p.detach().clone() for name, p in local.named_parameters()}
        local.fit(*data, epochs=1, batch_size=64)
        assert all(not torch.equal(p.detach(), before[name]) for name, p in local.named_parameters())
    assert len(pyro.get_param_store()) == 0


def test_fit_refuses_to_train_through_another_modules_param_store_entries():
    data = random_batch((100,))
    small_ensemble().fit(*data, epochs=1)
    with pytest.raises(RuntimeError, match="same name"):
        small_ensemble().fit(*data, epochs=1)
    small_ensemble(name="variational_dynamics").fit(*data, epochs=1)   # its own names: fine


# -------------------------------------------------------------------------- learning
def test_fit_recovers_linear_gaussian_noise_and_mean():
    ens = GaussianEnsemble(1, 1, ensemble_size=3, num_elites=2, hidden=(32, 32))
    out = ens.fit(*linear_gaussian(2000), epochs=40, lr=3e-3, seed=0)
    assert out["train_loss"][-1] < out["train_loss"][0]
    assert out["num_train"] == 1600 and out["num_holdout"] == 400 and len(out["holdout_mse"]) == 3

    obs = torch.linspace(-1.5, 1.5, 31).unsqueeze(-1).repeat(5, 1)
    act = torch.linspace(-0.8, 0.8, 5).repeat_interleave(31).unsqueeze(-1)
    with torch.no_grad():
        elite_std = ens.sample_member_dist(obs, act).stddev[ens.elite_idx, :, 0].mean(0)
    assert float(elite_std.mean()) == pytest.approx(0.1, rel=0.3)
    assert ((elite_std > 0.06) & (elite_std < 0.2)).all()
    _, reward_mean, info = ens.predict(obs, act, deterministic=True)
    delta_error, reward_error = info["mean"][:, 0] - 0.5 * act[:, 0], reward_mean + obs[:, 0] ** 2
    assert delta_error.square().mean().sqrt() < 0.04 and delta_error.abs().max() < 0.1
    assert reward_error.square().mean().sqrt() < 0.06 and reward_error.abs().max() < 0.2

    # sampled transitions spread like the true noise
    next_obs, _, info = ens.predict(obs.repeat(20, 1), act.repeat(20, 1))
    residual = next_obs - obs.repeat(20, 1) - 0.5 * act.repeat(20, 1)
    assert float(residual.std()) == pytest.approx(0.1, rel=0.3)
    assert set(info["member"].tolist()) <= set(ens.elite_idx.tolist())


def test_elite_selection_excludes_corrupted_members():
    data = linear_gaussian(600)
    ens = GaussianEnsemble(1, 1, ensemble_size=6, num_elites=3, hidden=(16, 16))
    ens.fit(*data, epochs=10, lr=3e-3, seed=1)
    with torch.no_grad():                                     # shift the predicted means of 1 and 3
        ens.net[-1].bias[1, :, :2] += 2.0
        ens.net[-1].bias[3, :, :2] -= 5.0
        ens.net[0].weight[4] = math.nan                       # a diverged member
    mse = ens.select_elites(*linear_gaussian(300))
    assert set(ens.elite_idx.tolist()) == {0, 2, 5}
    assert torch.isnan(mse[4]) and min(mse[1], mse[3]) > mse[[0, 2, 5]].max()
    assert torch.equal(mse[ens.elite_idx], mse[[0, 2, 5]].sort().values)   # best first
    _, _, info = ens.predict(*data[:2])
    assert set(info["member"].tolist()) <= {0, 2, 5}


def test_soft_logvar_bounds():
    ens = small_ensemble()
    obs, act, _, _ = random_batch((3, 4))
    lo, hi = ens.min_logvar.detach(), ens.max_logvar.detach()
    with torch.no_grad():
        for raw in (1e4, -1e4, -4.0):
            ens.net[-1].weight.zero_()
            ens.net[-1].bias[..., 3:] = raw
            _, logvar = ens(obs, act)
            assert (logvar >= lo).all() and (logvar <= hi + F.softplus(lo - hi) + 1e-6).all()
            inside = {1e4: hi, -1e4: lo}.get(raw, torch.full((3,), raw))   # ~identity well inside
            assert torch.allclose(logvar, inside.expand_as(logvar), atol=0.05)


def test_bad_input_raises_value_error_naming_the_problem():
    ens = small_ensemble()
    obs, act, next_obs, reward = random_batch((10,))
    with pytest.raises(ValueError, match="empty"):
        ens.fit(obs[:0], act[:0], next_obs[:0], reward[:0])
    with pytest.raises(ValueError, match="different numbers"):
        ens.fit(obs, act[:9], next_obs, reward)
    with pytest.raises(ValueError, match=r"obs must have shape \[N, 2\]"):
        ens.fit(torch.randn(10, 3), act, next_obs, reward)
    with pytest.raises(ValueError, match="reward must have shape"):
        ens.fit(obs, act, next_obs, torch.randn(10, 2))
    bad = reward.clone()
    bad[3] = math.nan
    with pytest.raises(ValueError, match="reward has 1 non-finite"):
        ens.fit(obs, act, next_obs, bad)
    bad_act = act.clone()
    bad_act[0] = math.inf
    with pytest.raises(ValueError, match="act has 1 non-finite"):
        ens.fit(obs, bad_act, next_obs, reward)
    with pytest.raises(ValueError, match="holdout"):
        ens.fit(obs, act, next_obs, reward, holdout=1.0)
    with pytest.raises(ValueError, match="num_elites"):
        GaussianEnsemble(2, 1, ensemble_size=3, num_elites=4)
    with pytest.raises(ValueError, match="act must have shape"):
        ens.predict(obs, torch.randn(10, 2))


# ------------------------------------------------------------ normaliser, state, predict
def test_normalizer_running_statistics_and_state_dict():
    norm = Normalizer(3)
    x = torch.randn(500, 3) * torch.tensor([1.0, 5.0, 0.0]) + torch.tensor([2.0, -1.0, 4.0])
    assert torch.equal(norm.normalize(x), x)                  # identity before any update
    norm.update(x[:123])
    norm.update(x[123:])
    assert torch.allclose(norm.mean, x.mean(0), atol=1e-5)
    assert torch.allclose(norm.var, x.var(0, unbiased=False), atol=1e-4)
    z = norm.normalize(x)
    assert torch.allclose(z[:, :2].std(0, unbiased=False), torch.ones(2), atol=1e-4)
    assert torch.allclose(z[:, 2], torch.zeros(500))          # constant column: centred, std 1

    ens = small_ensemble()
    ens.fit(*random_batch((200,)), epochs=1)
    state = ens.state_dict()
    assert {"normalizer.mean", "normalizer.var", "normalizer.count", "elite_idx"} <= set(state)
    pyro.clear_param_store()
    copy = small_ensemble()
    copy.load_state_dict(state)
    obs, act, _, _ = random_batch((7,))
    (next_a, reward_a, info_a), (next_b, reward_b, info_b) = (
        m.predict(obs, act, deterministic=True) for m in (ens, copy))
    assert torch.equal(next_a, next_b) and torch.equal(reward_a, reward_b)
    assert torch.equal(info_a["var"], info_b["var"]) and torch.equal(copy.elite_idx, ens.elite_idx)


def test_predict_shapes_reproducibility_and_mixture_moments():
    ens = small_ensemble(ensemble_size=4, num_elites=3)
    ens.fit(*random_batch((200,)), epochs=1, seed=0)
    obs, act, _, _ = random_batch((9,))
    first = ens.predict(obs, act, generator=torch.Generator().manual_seed(3))
    second = ens.predict(obs, act, generator=torch.Generator().manual_seed(3))
    next_obs, reward, info = first
    assert next_obs.shape == (9, 2) and reward.shape == (9,) and info["var"].shape == (9, 3)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])

    next_obs, reward, info = ens.predict(obs, act, deterministic=True)
    with torch.no_grad():
        mean, logvar = ens(obs, act)
    elite_mean, elite_var = mean[ens.elite_idx], logvar[ens.elite_idx].exp()
    assert torch.allclose(info["mean"], elite_mean.mean(0))
    assert torch.allclose(info["var"], elite_var.mean(0) + elite_mean.var(0, unbiased=False))
    assert torch.allclose(next_obs, obs + info["mean"][:, :2]) and torch.allclose(reward, info["mean"][:, 2])
    assert (info["member"] == -1).all()


def test_split_batch_rows_are_their_members_full_pass_outputs():
    """elite_rows runs each row through one elite only; that row's (mean, logvar) is exactly the
    chosen member's output of the full pass, every elite gets a balanced block, and the
    elites-only mixture density equals the full pass's."""
    ens = small_ensemble(ensemble_size=5, num_elites=3)
    ens.fit(*random_batch((200,)), epochs=1, seed=0)
    obs, act, next_obs, _ = random_batch((10,))
    with torch.no_grad():
        full_mean, full_logvar = ens(obs, act)
        mean, logvar, member = ens.elite_rows(obs, act, torch.Generator().manual_seed(0))
    rows = torch.arange(10)
    torch.testing.assert_close(mean, full_mean[member, rows])
    torch.testing.assert_close(logvar, full_logvar[member, rows])
    counts = torch.bincount(member, minlength=5)[ens.elite_idx]
    assert counts.sum() == 10 and counts.max() - counts.min() <= 1  # 4 slots per elite, 2 padded
    torch.testing.assert_close(ens.elite_mixture_log_density(obs, act, next_obs),
                               ens.elite_log_density(obs, next_obs, full_mean, full_logvar))
    assert ens.predict(obs[:0], act[:0])[0].shape == (0, 2)  # an empty batch passes through


def test_split_batch_sample_has_the_per_row_draws_mean_and_variance():
    """The speed issue's check: over many draws, the split-batch sample of a row (predict) has
    the mean and variance of the earlier per-row draw over the full pass (step_from): the
    elite mixture's mean and total variance, within Monte Carlo error."""
    torch.manual_seed(0)
    ens = small_ensemble(ensemble_size=5, num_elites=3)
    ens.fit(*random_batch((200,)), epochs=1, seed=0)
    obs, act, _, _ = random_batch((4,))
    n = 20_000
    obs_n, act_n = obs.repeat(n, 1), act.repeat(n, 1)
    with torch.no_grad():
        new_next, new_rew, _ = ens.predict(obs_n, act_n, generator=torch.Generator().manual_seed(1))
        old_next, old_rew, _ = ens.step_from(obs_n, *ens(obs_n, act_n), generator=torch.Generator().manual_seed(2))
        _, _, exact = ens.predict(obs, act, deterministic=True)
    for next_obs, rew in ((new_next, new_rew), (old_next, old_rew)):
        sample = torch.cat([next_obs - obs_n, rew.unsqueeze(-1)], -1).view(n, 4, 3)
        se_mean = (exact["var"] / n).sqrt()
        assert ((sample.mean(0) - exact["mean"]).abs() < 5 * se_mean).all()
        # the variance of a sample variance is about 2 var^2 / n for near-Gaussian mixtures
        assert ((sample.var(0) - exact["var"]).abs() < 5 * exact["var"] * math.sqrt(3.0 / n)).all()


def test_weighted_likelihood_elites_keep_the_member_that_fits_the_tilt():
    """q_d's elites: on data where 90 % of the targets sit at 0 and 10 % at 1, member 0
    (predicting 0) has the lower hold-out MSE, but with weights that put 95 % of the mass on
    the targets at 1 (a tilt exp(scale * TD)), member 1 (predicting 1) has the lower
    weighted negative log-likelihood, the criterion the weighted fit optimises."""
    ens = GaussianEnsemble(1, 1, ensemble_size=2, num_elites=1, hidden=(8,))
    n = 100
    obs, act = torch.zeros(n, 1), torch.zeros(n, 1)
    high = torch.arange(n) < 10
    target = high.float()  # the delta of the state and the reward alike
    mean = torch.stack([torch.zeros(n, 2), torch.ones(n, 2)])  # [E, B, obs_dim + 1]
    logvar = torch.full_like(mean, math.log(0.25))
    ens.forward = lambda o, a: (mean[:, : o.shape[0]], logvar[:, : o.shape[0]])
    next_obs, reward = obs + target[:, None], target
    ens.select_elites(obs, act, next_obs, reward)
    assert ens.elite_idx.tolist() == [0]
    weights = torch.where(high, 95.0 / 10, 5.0 / 90)
    nll = ens.select_elites_by_likelihood(obs, act, next_obs, reward, weights)
    assert ens.elite_idx.tolist() == [1]
    # by hand: per target dimension, -log N(y; m, 0.5) = 0.5 log(2 pi 0.25) + (y - m)^2 / 0.5
    const = 2 * 0.5 * math.log(2 * math.pi * 0.25)
    expected = [const + 2 * (0.95 * 1.0) / 0.5, const + 2 * (0.05 * 1.0) / 0.5]
    np.testing.assert_allclose(nll.numpy(), expected, rtol=1e-6)


def test_fit_with_weighted_nll_elites_ranks_by_the_weighted_criterion():
    torch.manual_seed(0)
    ens = GaussianEnsemble(2, 1, ensemble_size=4, num_elites=2, hidden=(16,))
    rng = np.random.default_rng(0)
    obs = torch.tensor(rng.normal(size=(400, 2)), dtype=torch.float32)
    act = torch.tensor(rng.uniform(-1, 1, size=(400, 1)), dtype=torch.float32)
    next_obs, reward = obs + 0.1 * act, -(obs ** 2).sum(-1)
    weights = torch.tensor(rng.exponential(size=400), dtype=torch.float32)
    info = ens.fit(obs, act, next_obs, reward, epochs=2, weights=weights, seed=1, elite_score="weighted_nll")
    hold = torch.randperm(400, generator=torch.Generator().manual_seed(1))[:80]
    nll = ens.member_weighted_nll(obs[hold], act[hold], next_obs[hold], reward[hold], weights[hold])
    assert info["elites"] == torch.argsort(nll)[:2].tolist()
    with pytest.raises(ValueError, match="elite_score"):
        ens.fit(obs, act, next_obs, reward, epochs=1, elite_score="best")


def test_elite_weight_cache_follows_every_change():
    """The cached elite weights are rebuilt after an optimiser step (fused Adam included),
    a load_state_dict, a change of elites; predictions always use the current weights."""
    from pplrl.nets import adam

    torch.manual_seed(0)
    ens = GaussianEnsemble(3, 1, ensemble_size=4, num_elites=2, hidden=(8,))
    obs, act = torch.randn(6, 3), torch.randn(6, 1)
    x = ens.normalizer(torch.cat([obs, act], -1)).expand(2, 6, 4)

    def fresh():
        return ens.forward_members(x, ens.elite_idx)

    def cached():
        with torch.no_grad():
            return ens._forward_weights(x, ens.elite_weights())

    assert ens.elite_weights() is ens.elite_weights()  # nothing changed: the same gather
    for change in ("adam", "load", "elites"):
        before = ens.elite_weights()
        if change == "adam":
            opt = adam(ens.parameters(), lr=0.1)
            ens(obs, act)[0].sum().backward()
            opt.step()
        elif change == "load":
            other = GaussianEnsemble(3, 1, ensemble_size=4, num_elites=2, hidden=(8,))
            ens.load_state_dict(other.state_dict())
        else:
            ens.elite_idx.copy_(torch.tensor([3, 1]))
        assert ens.elite_weights() is not before, change
        for a, b in zip(cached(), fresh()):
            assert torch.equal(a, b), change
    # with gradients on, elite_rows gathers the weights afresh, so gradients reach the parameters
    mean, _, _ = ens.elite_rows(obs, act)
    mean.sum().backward()
    assert ens.net[0].weight.grad is not None and ens.net[0].weight.grad[ens.elite_idx].abs().sum() > 0
