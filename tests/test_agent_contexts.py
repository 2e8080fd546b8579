"""The contexts every agent method runs in (pplrl.algorithms.base): module-local params,
the device, and Pyro's validation as ``pyro_validation`` says."""

from dataclasses import dataclass

import pyro
import pytest
import torch

from pplrl.algorithms import SACConfig
from pplrl.algorithms.base import Agent


@dataclass
class ProbeConfig:
    pyro_validation: str = "first"
    device: str = "cpu"


class Probe(Agent):
    algo = "probe"
    Config = ProbeConfig

    def __init__(self, config):
        self.config = config
        self.seen: list[tuple[bool, bool]] = []

    def update(self, step):
        # Pyro's validation and torch's distribution argument checks, as the update sees them
        self.seen.append((pyro.infer.is_validation_enabled(), torch.distributions.Distribution._validate_args))
        return {"loss": 1.0} if step > 0 else {}  # step 0: nothing trained yet

    def outer(self, fail: bool = False):
        return self.inner(fail), pyro.settings.get("module_local_params")

    def inner(self, fail: bool):
        if fail:
            raise RuntimeError("inner failed")
        return pyro.settings.get("module_local_params")


@pytest.mark.parametrize("mode, expected", [
    ("first", [True, True, False, False]),  # on until an update has trained (step 1), then off
    ("always", [True] * 4),
    ("never", [False] * 4),
])
def test_pyro_validation_modes(mode, expected):
    agent = Probe(ProbeConfig(pyro_validation=mode))
    with pyro.validation_enabled(True):
        for step in (0, 1, 2, 3):
            agent.update(step)
        assert pyro.infer.is_validation_enabled()  # restored after each update
    assert [pyro_on for pyro_on, _ in agent.seen] == expected
    assert [torch_on for _, torch_on in agent.seen] == expected  # torch's checks follow Pyro's


def test_a_config_without_the_field_keeps_the_global_setting():
    agent = Probe(object())
    with pyro.validation_enabled(False):
        agent.update(1)
    with pyro.validation_enabled(True):
        agent.update(1)
    assert [v for v, _ in agent.seen] == [False, True]


def test_bad_pyro_validation_is_one_clear_error():
    with pytest.raises(ValueError, match="pyro_validation must be one of first, always, never; got 'sometimes'"):
        SACConfig(pyro_validation="sometimes").validate()


@pytest.mark.parametrize("fail", [False, True])
def test_nested_agent_calls_keep_then_restore_the_context(fail):
    agent = Probe(ProbeConfig())
    assert not pyro.settings.get("module_local_params")
    if fail:
        with pytest.raises(RuntimeError, match="inner failed"):
            agent.outer(fail=True)
    else:
        assert agent.outer() == (True, True)  # the nested call runs inside the outer's context
    assert not pyro.settings.get("module_local_params")  # and both are gone afterwards
    assert agent.inner(False)  # a fresh outermost call sets it again
