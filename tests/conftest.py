import numpy as np
import pyro
import pytest
import torch

# The suite's tensors are small: one intra-op thread avoids OpenMP oversubscription
# (which slows everything down many-fold when other processes share the 2 cores).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def clean_pyro():
    """Every test starts with an empty param store, a fixed seed and validation on."""
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    np.random.seed(0)
    pyro.enable_validation(True)
    yield
    pyro.clear_param_store()


def as_torch(mdp):
    return torch.tensor(mdp.P), torch.tensor(mdp.R), torch.tensor(mdp.uniform_policy())


@pytest.fixture
def clean_registry():
    """Restores the algorithm registry and forgets plugin modules after a test that registers."""
    import sys

    from pplrl.algorithms import ALGORITHMS

    saved = dict(ALGORITHMS)
    yield
    ALGORITHMS.clear()
    ALGORITHMS.update(saved)
    for name in [m for m in sys.modules if m.startswith("pplrl_plugin_")]:
        del sys.modules[name]
