"""pplrl: reinforcement learning as probabilistic programs in Pyro.

Framework pieces live here (ELBOs, exact tabular solvers, learners, environments,
diagnostics); Pyro models are in the top-level package ``models`` and guides in
``guides``.
"""

__version__ = "0.1.0"
