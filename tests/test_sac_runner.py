"""SAC as an ELBO, runs, checkpoints, resume, bad input."""

import json

import numpy as np
import pyro
import pytest
import torch
from experiments_loader import interrupted_and_resumed, records

from pplrl.algorithms import SAC, SACConfig, apply_overrides, default_config
from pplrl.cli import main as cli
from pplrl.diagnostics import NonFiniteError
from pplrl.nets import TwinQ, polyak_update, target_copy
from pplrl.replay import Batch
from pplrl.runner import RunError, agent_from_checkpoint, evaluate, load_checkpoint, train

TINY = dict(hidden=(32, 32), batch_size=32, learning_starts=50)


def tiny(**kw):
    return default_config("sac", **{**TINY, **kw})


def test_actor_elbo_equals_hand_computed_sac_loss():
    """-alpha ELBO / B from the Pyro model/guide = mean(alpha log q(a|x) - min Q(x, a))
    with the same reparameterised sample."""
    agent = SAC(tiny(init_alpha=0.3), 3, 1)
    obs = torch.randn(16, 3)
    pyro.set_rng_seed(5)
    loss, terms = agent.actor_loss(obs)
    pyro.set_rng_seed(5)
    d = agent.policy(obs)
    a = d.rsample()
    expected = (0.3 * d.log_prob(a) - agent.critic.min(obs, a)).mean()
    assert float(loss.detach()) == pytest.approx(float(expected.detach()), rel=1e-5)
    assert terms["kl_policy"] / 16 == pytest.approx(float(d.log_prob(a).mean().detach()), rel=1e-5)
    # and the gradient reaches the policy
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in agent.policy.parameters())


@pytest.mark.parametrize("algo", ["sac", "vmbpo", "memb"])
def test_actor_loss_computes_no_gradient_for_the_critic_and_the_same_for_the_actor(algo):
    """The actor's loss reads the critic (and MEMB's model) frozen (pplrl.nets.frozen): its
    backward leaves their parameters without gradient, gives the policy the gradient it gets
    when they are not frozen, and they require gradients again afterwards."""
    from pplrl.algorithms import make_agent

    agent = make_agent(algo, default_config(algo, **TINY), 3, 1)
    frozen_modules = agent.actor_frozen_modules()
    assert agent.critic in frozen_modules and (algo != "memb" or agent.world_model in frozen_modules)
    obs = torch.randn(16, 3)

    def policy_grads(freeze: bool):
        for m in (agent.policy, *frozen_modules):
            m.zero_grad(set_to_none=True)
        original = agent.actor_frozen_modules
        if not freeze:
            agent.actor_frozen_modules = lambda: []
        try:
            pyro.set_rng_seed(3)
            agent.actor_loss(obs)[0].backward()
        finally:
            agent.actor_frozen_modules = original
        return [p.grad.clone() for p in agent.policy.parameters()]

    unfrozen = policy_grads(False)
    assert any(p.grad is not None for m in frozen_modules for p in m.parameters())  # the check can fail
    frozen = policy_grads(True)
    assert all(p.grad is None and p.requires_grad for m in frozen_modules for p in m.parameters())
    for a, b in zip(frozen, unfrozen):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert any(g.abs().sum() > 0 for g in frozen)


def test_polyak_update():
    net = TwinQ(2, 1, (8,))
    tgt = target_copy(net)
    before = [p.clone() for p in tgt.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    polyak_update(net, tgt, 0.1)
    for b, p, t in zip(before, net.parameters(), tgt.parameters()):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * p)
        assert not t.requires_grad
    with pytest.raises(ValueError, match="tau"):
        polyak_update(net, tgt, 0.0)


def test_critic_target_value_by_hand():
    agent = SAC(tiny(init_alpha=0.5), 3, 1)
    b = Batch.from_numpy(np.zeros((4, 3)), np.zeros((4, 1)), np.array([1, 2, 3, 4.0]), np.ones((4, 3)),
                         np.array([0, 0, 1, 0.0]))
    pyro.set_rng_seed(1)
    torch.manual_seed(1)
    y = agent.critic_target_value(b)
    torch.manual_seed(1)
    d = agent.policy(b.next_obs)
    a2 = d.rsample()
    v = agent.critic_target.min(b.next_obs, a2) - 0.5 * d.log_prob(a2)
    torch.testing.assert_close(y, b.rew + 0.99 * (1 - b.done) * v)


def test_short_run_writes_everything_and_is_reproducible(tmp_path):
    kw = dict(eval_every=200, eval_episodes=1, checkpoint_every=200, progress=False)
    a1 = train("sac", tiny(), tmp_path / "a", 400, **kw)
    a2 = train("sac", tiny(), tmp_path / "b", 400, **kw)
    for run in ("a", "b"):
        assert {p.name for p in (tmp_path / run).iterdir()} >= {"config.json", "metrics.jsonl", "checkpoint.pt"}
    evals = [[json.loads(line)["mean_return"] for line in (tmp_path / r / "metrics.jsonl").read_text().splitlines()
              if json.loads(line)["kind"] == "eval"] for r in ("a", "b")]
    assert len(evals[0]) == 2 and evals[0] == evals[1]
    for p1, p2 in zip(a1.policy.parameters(), a2.policy.parameters()):
        assert torch.equal(p1, p2)
    # checkpoint round trip: the loaded agent acts exactly like the trained one
    loaded, state = agent_from_checkpoint(tmp_path / "a", "sac")
    assert state["step"] == 400
    obs = np.array([0.1, -0.2, 0.3], dtype=np.float32)
    np.testing.assert_array_equal(loaded.act(obs, True), a1.act(obs, True))
    assert evaluate(loaded, "Pendulum-v1", 1, seed=3) == evaluate(a1, "Pendulum-v1", 1, seed=3)


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path):
    full = train("sac", tiny(), tmp_path / "full", 600, eval_every=200, eval_episodes=1, checkpoint_every=200,
                 progress=False)

    kept, resumed = interrupted_and_resumed("sac", tiny(), tmp_path / "cut", 600, eval_every=200,
                                            eval_episodes=1, checkpoint_every=200, progress=False)
    assert kept == 400  # the last checkpoint is kept
    for p1, p2 in zip(full.policy.parameters(), resumed.policy.parameters()):
        assert torch.equal(p1, p2)
    assert records(tmp_path / "full" / "metrics.jsonl") == records(tmp_path / "cut" / "metrics.jsonl")


def test_resume_with_a_different_config_names_the_keys(tmp_path):
    """resume=True with a config unlike the saved one raises (it used to pick the saved one
    silently); the saved config itself, or None, resumes."""
    train("sac", tiny(), tmp_path, 200, eval_every=200, eval_episodes=1, checkpoint_every=200, progress=False)
    with pytest.raises(ValueError, match=r"different config \(batch_size: saved 32, given 64, lr: saved"):
        train("sac", tiny(lr=1e-3, batch_size=64), tmp_path, 300, resume=True, eval_every=200, eval_episodes=1,
              progress=False)
    assert load_checkpoint(tmp_path, "sac")["step"] == 200  # nothing was touched
    agent = train("sac", None, tmp_path, 250, resume=True, eval_every=200, eval_episodes=1, progress=False)
    assert agent.config == tiny()
    train("sac", tiny(), tmp_path, 300, resume=True, eval_every=200, eval_episodes=1, progress=False)


def test_a_run_from_before_a_config_field_existed_resumes(tmp_path):
    """A run folder whose config (config.json and checkpoint) lacks a field added since resumes
    with the current defaults (a new field defaults to the behaviour before it); a given config
    that sets the field otherwise is still refused, naming it."""
    from pplrl.runner import write_checkpoint

    train("sac", tiny(), tmp_path, 200, eval_every=200, eval_episodes=1, checkpoint_every=200, progress=False)
    recorded = json.loads((tmp_path / "config.json").read_text())
    del recorded["config"]["pyro_validation"]  # as written by pplrl before the field
    (tmp_path / "config.json").write_text(json.dumps(recorded))
    state = load_checkpoint(tmp_path, "sac")
    del state["config"]["pyro_validation"]
    write_checkpoint(tmp_path, state)
    with pytest.raises(ValueError, match=r"pyro_validation: saved 'first', given 'always'"):
        train("sac", tiny(pyro_validation="always"), tmp_path, 300, resume=True, eval_every=200, eval_episodes=1,
              progress=False)
    agent = train("sac", tiny(), tmp_path, 300, resume=True, eval_every=200, eval_episodes=1, progress=False)
    assert agent.config == tiny() and load_checkpoint(tmp_path, "sac")["step"] == 300
    # that resume's checkpoint records the field, config.json still lacks it: they still agree
    assert "pyro_validation" in load_checkpoint(tmp_path, "sac")["config"]
    train("sac", None, tmp_path, 400, resume=True, eval_every=200, eval_episodes=1, progress=False)
    assert load_checkpoint(tmp_path, "sac")["step"] == 400
    # ... but a field that config.json lacks and the checkpoint sets otherwise than its default is refused
    state = load_checkpoint(tmp_path, "sac")
    state["config"]["pyro_validation"] = "never"
    write_checkpoint(tmp_path, state)
    with pytest.raises(RunError, match=r"differs from the checkpoint's config \(pyro_validation"):
        train("sac", None, tmp_path, 500, resume=True, eval_every=200, eval_episodes=1, progress=False)


def test_nan_loss_stops_with_step_and_name_and_keeps_checkpoint(tmp_path, monkeypatch):
    original = SAC.critic_target_value

    def poisoned(self, batch):  # the critic's target blows up from step 250 on
        y = original(self, batch)
        return y * float("nan") if self.steps_seen >= 250 else y

    monkeypatch.setattr(SAC, "critic_target_value", poisoned)
    with pytest.raises(NonFiniteError, match=r"critic_loss.*step 250.*checkpoint.*kept"):
        train("sac", tiny(), tmp_path, 400, eval_every=200, eval_episodes=1, checkpoint_every=200, progress=False)
    assert load_checkpoint(tmp_path)["step"] == 200
    assert (tmp_path / "metrics.jsonl").stat().st_size > 0


def test_checked_losses_raise_on_nan():
    with pytest.raises(NonFiniteError, match="actor_loss.*7"):
        SAC.checked(7, actor_loss=torch.tensor(float("nan")))


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="unknown environment id"):
        train("sac", tiny(env_id="Pendulum-v99"), tmp_path / "x", 10, progress=False)
    with pytest.raises(ValueError, match="continuous actions"):
        train("sac", tiny(env_id="CartPole-v1"), tmp_path / "y", 10, progress=False)
    with pytest.raises(ValueError, match="unknown algorithm"):
        train("nope", tiny(), tmp_path / "z", 10, progress=False)
    with pytest.raises(ValueError, match="gamma"):
        SAC(tiny(gamma=1.5), 3, 1)
    with pytest.raises(ValueError, match="unknown config key"):
        apply_overrides(SACConfig(), ["lrr=3"])
    assert apply_overrides(SACConfig(), ["lr=0.001", "hidden=64,64", "target_entropy=none"]).hidden == (64, 64)
    # a folder that already holds a run is not overwritten
    train("sac", tiny(), tmp_path / "run", 200, eval_every=200, eval_episodes=1, checkpoint_every=200, progress=False)
    before = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(RunError, match="already holds a run"):
        train("sac", tiny(), tmp_path / "run", 200, progress=False)
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == before
    # a checkpoint from another algorithm, and a corrupt one
    with pytest.raises(RunError, match="written by algorithm 'sac'"):
        load_checkpoint(tmp_path / "run", expected_algo="mbpo")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(RunError, match="no checksum header"):
        load_checkpoint(tmp_path / "bad")


def test_cli_train_eval_diagnose(tmp_path, capsys):
    args = ["--steps", "200", "--quiet", "--eval-every", "200", "--eval-episodes", "1", "--checkpoint-every", "200",
            "--set", "hidden=16,16", "batch_size=16", "learning_starts=50"]
    for seed in (0, 1):
        out = str(tmp_path / f"s{seed}")
        assert cli(["train", "sac", "--env", "Pendulum-v1", "--seed", str(seed), "--out", out, *args]) == 0
    assert "final evaluation return" in capsys.readouterr().out
    assert cli(["eval", str(tmp_path / "s0"), "--episodes", "1"]) == 0
    assert "mean return" in capsys.readouterr().out
    assert cli(["diagnose", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "Agreement between seeds" in out and "critic_loss" in out
    assert cli(["train", "sac", "--env", "NoSuchEnv-v0", "--out", str(tmp_path / "e"), "--steps", "10", "--quiet"]) == 2
    assert "unknown environment id" in capsys.readouterr().err


@pytest.mark.parametrize("algo", ["sac", "vmbpo"])
def test_warmup_actions_are_held_and_resume_mid_block(algo):
    """warmup_hold=k: the uniform warm-up action is redrawn every k env steps and held in
    between; a checkpoint taken mid-block resumes the same actions; k=1 is the old i.i.d. stream."""
    from pplrl.algorithms import default_config, make_agent

    def agent(hold, seed=3):
        cfg = default_config(algo, seed=seed, learning_starts=20, warmup_hold=hold, hidden=(8, 8))
        return make_agent(algo, cfg, 3, 1)

    def run(a, n, start=0):
        acts = []
        for t in range(start, start + n):
            acts.append(float(a.act(np.zeros(3, np.float32))[0]))
            a.steps_seen += 1  # what observe() counts; the replay is not needed here
        return acts

    held = run(agent(4), 20)
    assert all(held[i] == held[i - i % 4] for i in range(20))  # constant within each block of 4
    blocks = held[::4]
    assert len(set(blocks)) == 5 and all(-1 <= x <= 1 for x in blocks)
    assert run(agent(1), 5) == pytest.approx(np.random.default_rng(3).uniform(-1, 1, 5).astype(np.float32).tolist())
    # interrupted after 6 steps (mid-block), restored into a fresh agent: the same actions
    a = agent(4)
    first = run(a, 6)
    b = agent(4, seed=99)
    b.load_state_dict(a.state_dict())
    assert first + run(b, 14, start=6) == held
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="warmup_hold"):
            default_config(algo, warmup_hold=bad).validate()
