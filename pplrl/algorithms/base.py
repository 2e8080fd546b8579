"""What every pplrl agent provides, and how configs are built and overridden."""

from __future__ import annotations

import dataclasses
import functools
import threading
import types
import typing
from typing import Any

import numpy as np
import pyro
import torch

from pplrl.device import device_context
from pplrl.diagnostics import check_finite


def _config_device(args) -> str | None:
    """The ``device`` field of the agent's config (``args[0].config``, or the config passed to
    ``__init__`` as ``args[1]``); None when it has none."""
    config = getattr(args[0], "config", None) if args else None
    if config is None and len(args) > 1:
        config = args[1]
    return getattr(config, "device", None)


def module_local(method):
    """Run ``method`` with ``pyro.settings module_local_params=True``: the agent's
    PyroModules keep their own parameters (Pyro's recommendation for nn.Module-based
    code), so target networks, copies and several agents in one process never share
    parameters by name through the global param store, and optimisers are plain
    torch optimisers whose state checkpoints by module. An agent whose config's
    ``device`` is not the CPU also runs it under ``with torch.device(device)``
    (:mod:`pplrl.device`): every tensor it creates lands there.

    A method called from inside another agent method of the same device runs directly:
    the context is already set (an SAC update makes ~19 such nested calls, and entering
    the two contexts each time cost ~0.3 ms of a ~14 ms update)."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        device = _config_device(args)
        outer = getattr(_ACTIVE, "device", _OUTSIDE)
        if outer == device and pyro.settings.get("module_local_params"):
            return method(*args, **kwargs)
        _ACTIVE.device = device
        try:
            with pyro.settings.context(module_local_params=True), device_context(device):
                return method(*args, **kwargs)
        finally:
            _ACTIVE.device = outer

    return wrapper


#: the device of the agent method running on this thread (:func:`module_local`)
_ACTIVE = threading.local()
_OUTSIDE = object()


#: values of the ``pyro_validation`` config field
PYRO_VALIDATION = ("first", "always", "never")


def check_pyro_validation(value) -> None:
    """ValueError unless ``value`` is one of :data:`PYRO_VALIDATION`."""
    if value not in PYRO_VALIDATION:
        raise ValueError(f"pyro_validation must be one of {', '.join(PYRO_VALIDATION)}; got {value!r}")


def validated_update(method):
    """Run an agent's ``update`` under Pyro's validation as its config's ``pyro_validation``
    says: ``'always'``, ``'never'``, or ``'first'`` (on until an update has trained, i.e.
    returned metrics, then off). Pyro's validation (``pyro.validation_enabled``) also
    switches torch's distribution argument checks; Pyro's docs recommend turning it off for
    mature models "to speed up inference". pplrl's own checks (model/guide site match,
    finite losses) do not depend on it. A config without the field keeps Pyro's global
    setting."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        mode = getattr(getattr(self, "config", None), "pyro_validation", None)
        if mode is None:
            return method(self, *args, **kwargs)
        on = mode == "always" or (mode == "first" and not getattr(self, "_pyro_validated", False))
        with pyro.validation_enabled(on):
            out = method(self, *args, **kwargs)
        if out:
            self._pyro_validated = True
        return out

    return wrapper


class Agent:
    """An off-policy agent driven by :func:`pplrl.runner.train`.

    Every public method of a subclass runs under :func:`module_local` (applied in
    ``__init_subclass__``), so agents never touch Pyro's global param store.

    Subclasses set ``algo`` (the CLI name) and ``Config`` (a dataclass), and implement
    :meth:`act`, :meth:`observe` and :meth:`update`; :meth:`state_dict` must hold
    everything needed to continue training bit for bit (networks, optimisers, replay,
    the agent's RNG).
    """

    algo: str = ""
    Config: type = object
    warmup_action: np.ndarray | None = None  # the held random warm-up action (held_uniform_action)

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        for name, value in list(vars(cls).items()):
            if callable(value) and not isinstance(value, (staticmethod, classmethod, type)) and (
                    not name.startswith("_") or name == "__init__"):
                setattr(cls, name, module_local(validated_update(value) if name == "update" else value))

    def act(self, obs: np.ndarray, deterministic: bool = False) -> np.ndarray:
        raise NotImplementedError

    def observe(self, obs, act, rew, next_obs, terminated: bool) -> None:
        raise NotImplementedError

    def update(self, step: int) -> dict[str, float]:
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError

    @staticmethod
    def gradient_step(optimiser: torch.optim.Optimizer, loss: torch.Tensor) -> None:
        """One optimiser step on ``loss``: zero the gradients, backpropagate, step."""
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()

    def held_uniform_action(self, count: int, hold: int) -> np.ndarray:
        """A uniform action on [-1, 1]^act_dim from ``self.rng``, redrawn when ``count`` is a
        multiple of ``hold`` (or none is held yet) and held in between: every agent's
        random warm-up with its ``warmup_hold`` setting. ``count`` is what the hold counts
        (env steps for the actor-critics, decisions for the generative agent); the held
        action is ``self.warmup_action``, which the agent's checkpoint keeps."""
        if self.warmup_action is None or count % hold == 0:
            self.warmup_action = self.rng.uniform(-1.0, 1.0, self.act_dim).astype(np.float32)
        return self.warmup_action.copy()

    @staticmethod
    def elbo_metrics(terms: dict[str, float], batch: int) -> dict[str, float]:
        """Every term of an ELBO report (:attr:`pplrl.elbo.OptimalityELBO.last_terms`), per
        state of a batch of ``batch``: ``elbo`` and ``elbo_<term>`` for whatever terms the
        model declares, so logs and ``pplrl diagnose`` show a new objective's terms unasked."""
        return {k if k == "elbo" else f"elbo_{k}": v / batch for k, v in terms.items()}

    @staticmethod
    def checked(step: int, **losses: torch.Tensor) -> dict[str, float]:
        """Floats of the losses, stopping with the step and the loss name on NaN/inf."""
        out = {}
        for name, value in losses.items():
            v = float(value.detach()) if torch.is_tensor(value) else float(value)
            check_finite(name, v, step)
            out[name] = v
        return out


def field_docs(config_class) -> dict[str, str]:
    """The attribute docstrings of a config dataclass's fields (the string literal under a
    field, as tyro and Sphinx read them), the most derived class's winning."""
    import ast
    import inspect
    import textwrap

    docs: dict[str, str] = {}
    for klass in reversed(config_class.__mro__):
        try:
            body = ast.parse(textwrap.dedent(inspect.getsource(klass))).body[0].body
        except (OSError, TypeError, IndexError, AttributeError, SyntaxError):
            continue
        for node, after in zip(body, body[1:]):
            if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and isinstance(after, ast.Expr) \
                    and isinstance(after.value, ast.Constant) and isinstance(after.value.value, str):
                docs[node.target.id] = " ".join(after.value.value.split())
    return docs


def describe_config(config) -> str:
    """Every field of the dataclass instance ``config``: ``--set`` key, type, default, docstring."""
    hints = typing.get_type_hints(type(config))
    docs = field_docs(type(config))
    lines = []
    for f in dataclasses.fields(config):
        typ = getattr(hints.get(f.name), "__name__", None) or str(hints.get(f.name)).replace("typing.", "")
        value = getattr(config, f.name)
        shown = ",".join(map(str, value)) if isinstance(value, tuple) else value
        lines.append(f"  {f.name}={shown}  ({typ})")
        if f.name in docs:
            lines.append(f"      {docs[f.name]}")
    return "\n".join(lines)


def with_preset(config, name: str):
    """A copy of ``config`` with the named preset's settings (``Config.presets[name]``) and
    ``preset=name``; ``"default"`` is the class's defaults for those settings. ValueError
    naming the presets there are, for a config without presets or an unknown name."""
    presets = getattr(type(config), "presets", None)
    if not presets or not any(f.name == "preset" for f in dataclasses.fields(config)):
        raise ValueError(f"{type(config).__name__} has no presets")
    if name == "default":
        defaults = type(config)()
        keys = {k for values in presets.values() for k in values}
        return dataclasses.replace(config, preset=name, **{k: getattr(defaults, k) for k in keys})
    if name not in presets:
        raise ValueError(f"unknown preset {name!r} for {type(config).__name__}; known: default, {', '.join(presets)}")
    return dataclasses.replace(config, preset=name, **presets[name])


def apply_overrides(config, overrides: dict[str, str] | list[str]):
    """A copy of the dataclass ``config`` with ``key=value`` strings applied, each
    value parsed by the field's type. Unknown keys and unparsable values raise.
    ``preset=NAME`` (configs with presets) applies that preset's settings first, whatever its
    place among the overrides, so the other overrides win over it."""
    if isinstance(overrides, list):
        pairs = {}
        for item in overrides:
            if "=" not in item:
                raise ValueError(f"config override {item!r} is not of the form key=value")
            k, v = item.split("=", 1)
            pairs[k.strip()] = v.strip()
        overrides = pairs
    fields = {f.name: f for f in dataclasses.fields(config)}
    hints = typing.get_type_hints(type(config))
    changes = {}
    for key, raw in overrides.items():
        if key not in fields:
            raise ValueError(f"unknown config key {key!r} for {type(config).__name__}; known: {sorted(fields)}")
        changes[key] = _parse(raw, hints[key], key)
    if "preset" in changes:
        config = with_preset(config, changes.pop("preset"))
    return dataclasses.replace(config, **changes)


def _parse(raw: str, typ, key: str):
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if raw.lower() == "none" and type(None) in args:
            return None
        typ = next(a for a in args if a is not type(None))
        origin, args = typing.get_origin(typ), typing.get_args(typ)
    try:
        if typ is bool:
            if raw.lower() in ("1", "true", "yes"):
                return True
            if raw.lower() in ("0", "false", "no"):
                return False
            raise ValueError(raw)
        if origin is tuple:
            return tuple(int(x) for x in raw.strip("()[] ").split(",") if x.strip())
        return typ(raw)
    except (TypeError, ValueError):
        raise ValueError(f"cannot parse {raw!r} as {typ} for config key {key!r}") from None
