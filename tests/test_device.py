"""The ``device`` config field (pplrl.device): where an agent's tensors live.

On this CPU-only machine the CUDA path is checked two ways: a fake accelerator (PyTorch's
``meta`` device, which allocates nothing) stands in for CUDA, and every parameter, buffer
and sampled batch an agent creates must land on it; and a real CUDA run that is skipped,
with a message, where torch sees no GPU."""

import dataclasses

import numpy as np
import pytest
import torch

from pplrl.algorithms import default_config, make_agent
from pplrl.device import denormals_flushed, device_context, flushing_denormals, resolve_device

TINY = {"hidden": (16, 16), "batch_size": 8, "learning_starts": 8}
MODEL = {"model_hidden": (8,), "ensemble_size": 3, "num_elites": 2, "model_train_freq": 50,
         "model_min_updates": 5, "rollout_batch_size": 16, "gradient_steps": 1}


def tiny_config(algo, **kw):
    cfg = default_config(algo, **TINY)
    fields = {f.name for f in dataclasses.fields(cfg)}
    return dataclasses.replace(cfg, **{k: v for k, v in {**MODEL, **kw}.items() if k in fields})


def test_resolve_device_names_and_errors(monkeypatch):
    assert resolve_device("cpu") == torch.device("cpu")
    resolve_device.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="device must be one of cpu, cuda, auto"):
        resolve_device("tpu")
    resolve_device.cache_clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    resolve_device.cache_clear()
    # the CPU enters no device mode (it would intercept every torch call)
    assert device_context("cpu").__class__.__name__ == "nullcontext"


def test_a_config_asking_for_a_missing_gpu_is_refused_before_anything_runs():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ValueError, match="device 'cuda' asked for, but torch sees no CUDA GPU"):
        make_agent("sac", tiny_config("sac", device="cuda"), 3, 1)


@pytest.mark.parametrize("algo", ["sac", "virel", "mbpo", "memb", "vmbpo", "beta-vmbpo"])
def test_every_tensor_an_agent_creates_lands_on_its_device(algo, monkeypatch):
    """With a stand-in accelerator (the meta device) every parameter and buffer of every
    module the agent holds (MEMB's learned model included), its temperatures, and a sampled
    batch are on it, while the replay stays numpy in host memory; a CPU agent's are on the CPU."""
    import pplrl.algorithms.off_policy as off_policy
    import pplrl.device as device

    meta = torch.device("meta")
    monkeypatch.setattr(device, "resolve_device", lambda name: meta if name == "cuda" else torch.device(name))
    monkeypatch.setattr(off_policy, "resolve_device", device.resolve_device)
    for name, expected in (("cuda", meta), ("cpu", torch.device("cpu"))):
        agent = make_agent(algo, tiny_config(algo, device=name), 3, 1)
        rng = np.random.default_rng(0)
        for _ in range(16):
            agent.observe(rng.normal(size=3), rng.uniform(-1, 1, 1), 0.0, rng.normal(size=3), False)
        tensors = {}
        for attr, value in vars(agent).items():
            if isinstance(value, torch.nn.Module):
                tensors.update({f"{attr}.{k}": v for k, v in value.state_dict().items()})
            elif isinstance(value, torch.Tensor):
                tensors[attr] = value
        assert len(tensors) > 10
        wrong = {k: v.device for k, v in tensors.items() if v.device != expected}
        assert not wrong, f"{algo} on {name}: not on {expected}: {wrong}"
        batch = agent.sample_batch()
        assert all(getattr(batch, f).device == expected for f in ("obs", "act", "rew", "next_obs", "done"))
        assert isinstance(agent.replay.obs, np.ndarray)


POMDP_TINY = dict(z_dim=4, h_dim=8, hidden=8, window=3, batch_size=2, learning_starts=24, horizon=2, candidates=8,
                  elites=2, particles=4, cem_iterations=1)


def small_config(algo, **kw):
    if algo in ("generative-agent", "discriminative-agent"):
        tiny = {k: v for k, v in POMDP_TINY.items() if algo == "generative-agent" or k != "horizon"}
        return dataclasses.replace(default_config(algo), **tiny, **kw)
    return tiny_config(algo, **kw)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="no CUDA GPU here: the device='cuda' training run needs one (see the meta-device test)")
@pytest.mark.parametrize("algo, extra", [("sac", {}), ("beta-vmbpo", {}), ("generative-agent", {}),
                                         ("beta-vmbpo", {"model_samples": "buffer", "model_rollouts": 500})])
def test_cuda_training_resumes_bit_for_bit(algo, extra, tmp_path):
    """On a GPU: a short run on device=cuda trains (finite metrics, parameters on the GPU) and
    a run resumed from its checkpoint ends where the uninterrupted one ends (beta-VMBPO also with
    its model buffer, whose rollouts go through the GPU and are kept in host memory)."""
    import json

    from pplrl.runner import train

    cfg = small_config(algo, device="cuda", **({} if algo == "generative-agent" else {"model_train_freq": 40}),
                       **extra)
    full, half = tmp_path / "full", tmp_path / "half"
    train(algo, cfg, full, 120, eval_every=60, eval_episodes=1, checkpoint_every=60, progress=False)
    train(algo, cfg, half, 60, eval_every=60, eval_episodes=1, checkpoint_every=60, progress=False)
    train(algo, cfg, half, 120, eval_every=60, eval_episodes=1, checkpoint_every=60, progress=False, resume=True)
    rows = [[json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines()] for d in (full, half)]
    evals = [[r["mean_return"] for r in rs if r["kind"] == "eval"] for rs in rows]
    assert evals[0] == evals[1]
    assert all(np.isfinite(r.get("critic_loss", 0.0)) for r in rows[0])


@pytest.mark.parametrize("algo", ["generative-agent", "discriminative-agent"])
def test_pomdp_agents_create_their_tensors_on_their_device(algo, monkeypatch):
    """The POMDP agents take the same field: with the stand-in accelerator every parameter
    and buffer, and a sampled training window, are on it; the sequence replay stays numpy."""
    import pplrl.algorithms.generative_agent as generative
    import pplrl.device as device

    meta = torch.device("meta")
    monkeypatch.setattr(device, "resolve_device", lambda name: meta if name == "cuda" else torch.device(name))
    monkeypatch.setattr(generative, "resolve_device", device.resolve_device)
    for name, expected in (("cuda", meta), ("cpu", torch.device("cpu"))):
        cfg = small_config(algo, device=name)
        agent = make_agent(algo, cfg, 4, 1)  # PendulumNoVel: x = (cos, sin), the view adds 2
        rng = np.random.default_rng(0)
        for t in range(8):
            agent.replay.add(x=rng.normal(size=2), r=0.0, first=float(t == 0), a_prev=np.zeros(1),
                             act=rng.uniform(-1, 1, 1), qa_loc=np.zeros(1), qa_scale=np.ones(1))
        tensors = {}
        for attr, value in vars(agent).items():
            if isinstance(value, torch.nn.Module):
                tensors.update({f"{attr}.{k}": v for k, v in value.state_dict().items()})
        assert len(tensors) > 10
        wrong = {k: v.device for k, v in tensors.items() if v.device != expected}
        assert not wrong, f"{algo} on {name}: not on {expected}: {wrong}"
        with device.device_context(name):
            window = agent.replay.sample(2, 3, rng)
        assert window.x.device == expected and window.act.device == expected
        assert isinstance(agent.replay.data["x"], np.ndarray)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="device must be one of"):
        make_agent(algo, dataclasses.replace(default_config(algo), device="tpu"), 4, 1)


def test_flushing_denormals_reads_subnormal_operands_as_zero_and_restores_the_flag():
    tiny = torch.finfo(torch.float32).tiny
    w = torch.full((4, 4), tiny / 8)  # subnormal, as weight decay leaves a dead unit's weights
    assert 0 < w[0, 0].item() < tiny and not denormals_flushed()
    assert (w @ torch.ones(4, 4)).abs().sum().item() > 0
    with flushing_denormals():
        assert denormals_flushed()
        assert (w @ torch.ones(4, 4)).abs().sum().item() == 0.0
        with flushing_denormals():  # nested: the inner block restores the outer block's flag
            pass
        assert denormals_flushed()
    assert not denormals_flushed() and (w @ torch.ones(4, 4)).abs().sum().item() > 0
