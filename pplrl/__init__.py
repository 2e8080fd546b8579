"""pplrl: reinforcement learning as probabilistic programs in Pyro.

Framework pieces live here (ELBOs, exact tabular solvers, learners, environments,
diagnostics); Pyro models are in the top-level package ``models`` and guides in
``guides``.
"""

__version__ = "0.1.0"

# Imported on first use, so that ``import pplrl`` stays cheap (no torch or Pyro).
_LAZY = {"verify": "pplrl.verification", "VerificationReport": "pplrl.verification",
         "VerificationRow": "pplrl.verification"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted([*globals(), *_LAZY])
