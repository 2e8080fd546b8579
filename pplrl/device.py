"""Where an agent's tensors live: the ``device`` config field (``cpu``, ``cuda``, ``auto``).

An agent whose device is not the CPU runs every public method (its ``__init__`` included)
inside ``with torch.device(device):`` (:func:`pplrl.algorithms.base.module_local`), so every
tensor it creates without naming a device, its networks' parameters, ``torch.zeros``,
``torch.as_tensor`` of a numpy array, a sampled batch, lands there. The replay buffers stay
numpy arrays in host memory (the cheapest place for a million transitions that are read 256
at a time); a sampled batch is created on the device. On the CPU no context is entered, so
CPU runs pay nothing for this (the device mode intercepts every torch call).
"""

from __future__ import annotations

import contextlib
import functools

import torch

DEVICES = ("cpu", "cuda", "auto")


@functools.lru_cache(maxsize=None)
def resolve_device(name: str) -> torch.device:
    """``cpu``; ``cuda`` or ``cuda:N`` (a ValueError naming the problem without a CUDA GPU);
    ``auto``: CUDA when a GPU is present, else the CPU."""
    name = str(name).strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} asked for, but torch sees no CUDA GPU on this machine "
                             "(use device=cpu or device=auto)")
        dev = torch.device(name)
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device {name!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s)")
        return dev
    raise ValueError(f"device must be one of {', '.join(DEVICES)} (or cuda:N), got {name!r}")


def device_context(name: str | None):
    """``with torch.device(...)`` for a non-CPU device, a no-op for the CPU (or ``None``)."""
    if name is None or name == "cpu":
        return contextlib.nullcontext()
    dev = resolve_device(name)
    return contextlib.nullcontext() if dev.type == "cpu" else dev


def denormals_flushed() -> bool:
    """Whether float arithmetic here flushes subnormal numbers (below 1.2e-38 in float32) to
    zero, as ``torch.set_flush_denormal(True)`` makes it (torch has no getter for the flag)."""
    return torch.tensor([1e-39]).mul(1.0).item() == 0.0


@contextlib.contextmanager
def flushing_denormals():
    """Flush subnormal floats to zero inside the block (``torch.set_flush_denormal``, the CPU's
    FTZ/DAZ flags; no effect on a GPU or a CPU without them), then restore the flag as it was.

    Why the runner trains inside it: weights that weight decay pulls towards zero, and Adam's
    moments of their tiny gradients, end up subnormal, and an x86 CPU multiplies subnormal
    operands many times slower. A model-based run's ensembles collect them: after 10k Hopper-v5
    steps about 5 % of MBPO's model weights (1–9 % by layer) were subnormal, and an update at
    a model-fit step ran 10x slower than with them flushed (``experiments/bench_denormals.py``;
    README, Status, Speed). What flushing changes is below 1.2e-38: numbers that vanish beside
    any normal float they are added to."""
    before = denormals_flushed()
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(before)


__all__ = ["DEVICES", "denormals_flushed", "device_context", "flushing_denormals", "resolve_device"]
