"""Algorithms defined outside pplrl: registration, plugin files and modules, entry points.

A plugin is a ``.py`` file or an importable module that defines an :class:`~pplrl.algorithms.base.Agent`
subclass and registers it under a CLI name::

    from pplrl.algorithms import SAC, SACConfig, register

    @register("tiny-sac")
    class TinySAC(SAC):
        Config = SACConfig

    pplrl train tiny-sac --plugin my_algos.py      # or --plugin my_package.algos

Runs record the plugin (``config.json`` and the checkpoint), so ``pplrl eval``, ``pplrl train
--resume`` and ``pplrl diagnose`` load it again unasked. Installed packages can instead declare
entry points in the group ``pplrl.algorithms`` (``name = "pkg.module:AgentClass"`` registers the
class under ``name``; ``name = "pkg.module"`` imports a module that registers with the decorator);
they are loaded only when a name is not already known.

The registry itself is the dict :data:`ALGORITHMS`, re-exported as ``pplrl.algorithms.ALGORITHMS``.
Nothing here imports the shipped algorithms at import time (``pplrl.algorithms`` imports this
module), they are imported on first use.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import traceback
import types
from pathlib import Path

ENTRY_POINT_GROUP = "pplrl.algorithms"

ALGORITHMS: dict[str, type] = {}
"""CLI name -> Agent subclass; the same dict as ``pplrl.algorithms.ALGORITHMS``."""

# what register() did, by the module that defined the class: replayed when a plugin module that
# is already imported is loaded again after its names were dropped from the registry
_REGISTRATIONS: dict[str, dict[str, type]] = {}
# synthetic module name -> absolute path, for plugin files loaded by path
_FILE_MODULES: dict[str, str] = {}
# classes registered from entry points (found again through the entry points; no plugin to record)
_ENTRY_POINT_CLASSES: set[type] = set()


class PluginError(ValueError):
    """A plugin file, module or entry point that cannot be loaded."""


class UnknownAlgorithmError(ValueError):
    """An algorithm name that no shipped algorithm, plugin or entry point registers."""


def _registry() -> dict[str, type]:
    import pplrl.algorithms  # noqa: F401  (registers the shipped algorithms on first use)

    return ALGORITHMS


def _qualname(cls) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def check_agent_class(cls) -> type:
    """``cls`` if it is an Agent subclass with a dataclass ``Config``; a ValueError saying what is
    missing otherwise."""
    from pplrl.algorithms.base import Agent

    if not isinstance(cls, type) or not issubclass(cls, Agent):
        raise ValueError(f"{cls!r} is not an algorithm: it must be a subclass of pplrl.algorithms.base.Agent")
    config = getattr(cls, "Config", None)
    if not (isinstance(config, type) and dataclasses.is_dataclass(config)):
        raise ValueError(f"algorithm {_qualname(cls)} needs a dataclass Config class attribute "
                         f"(e.g. `Config = SACConfig`), got {config!r}")
    return cls


def register(name: str):
    """Class decorator: register an Agent subclass under the CLI name ``name`` (and set its
    ``algo`` to it). Registering the same class again is a no-op; a name already taken by a
    different class raises ValueError."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"an algorithm name must be a non-empty string without surrounding spaces, got {name!r}")

    def decorator(cls):
        check_agent_class(cls)
        registry = _registry()
        taken = registry.get(name)
        if taken is not None and taken is not cls:
            raise ValueError(f"algorithm name {name!r} is already registered to {_qualname(taken)}; cannot register "
                             f"{_qualname(cls)} under it (choose another name with @register(NAME))")
        cls.algo = name
        registry[name] = cls
        _REGISTRATIONS.setdefault(cls.__module__, {})[name] = cls
        return cls

    return decorator


def _replay(module_name: str) -> None:
    """Register again what ``module_name`` (or its submodules) registered when it was executed."""
    for mod, entries in list(_REGISTRATIONS.items()):
        if mod == module_name or mod.startswith(module_name + "."):
            for name, cls in list(entries.items()):
                if ALGORITHMS.get(name) is not cls:
                    register(name)(cls)


def is_file_spec(spec: str) -> bool:
    """Whether a plugin spec names a file (``.py`` or a path) rather than a dotted module."""
    return spec.endswith(".py") or "/" in spec or os.sep in spec or bool(os.altsep and os.altsep in spec)


def record_spec(spec: str | None) -> str | None:
    """The plugin spec as a run records it: a file path made absolute (kept as given when it is
    already absolute), a module name as given."""
    if spec is None:
        return None
    if is_file_spec(spec):
        path = Path(spec).expanduser()
        return spec if path.is_absolute() else str(path.resolve())
    return spec


def _module_name_for(path: Path) -> str:
    stem = re.sub(r"\W", "_", path.stem) or "plugin"
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    return f"pplrl_plugin_{stem}_{digest}"


def _cause(e: BaseException, file: str | None = None) -> str:
    where = ""
    if file is not None and not isinstance(e, SyntaxError):
        frames = [f for f in traceback.extract_tb(e.__traceback__) if f.filename == file]
        if frames:
            where = f" (line {frames[-1].lineno})"
    message = " ".join(str(e).split())
    return f"{type(e).__name__}: {message}{where}" if message else f"{type(e).__name__}{where}"


def _drop_registrations(module_name: str) -> None:
    for name, cls in _REGISTRATIONS.pop(module_name, {}).items():
        if ALGORITHMS.get(name) is cls:
            del ALGORITHMS[name]


def load_plugin(spec: str) -> types.ModuleType:
    """Load a plugin: a path to a ``.py`` file or a dotted module name. Loading the same plugin
    again returns the same module (and registers again what it registered, should the names have
    been dropped from the registry). Failures are a one-line :class:`PluginError`."""
    if not isinstance(spec, str) or not spec.strip():
        raise PluginError(f"a plugin is a .py file or a module name, got {spec!r}")
    _registry()
    if is_file_spec(spec):
        path = Path(spec).expanduser().resolve()
        if not path.is_file():
            raise PluginError(f"plugin {spec!r}: no such file {path}")
        name = _module_name_for(path)
        if name in sys.modules:
            _replay(name)
            return sys.modules[name]
        module_spec = importlib.util.spec_from_file_location(name, path)
        if module_spec is None or module_spec.loader is None:
            raise PluginError(f"plugin {spec!r}: {path} cannot be loaded as a Python module")
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[name] = module  # before exec: dataclasses and pickling look the module up
        _FILE_MODULES[name] = str(path)
        try:
            module_spec.loader.exec_module(module)
        except Exception as e:
            sys.modules.pop(name, None)
            _FILE_MODULES.pop(name, None)
            _drop_registrations(name)
            raise PluginError(f"plugin {spec!r} failed to load: {_cause(e, str(path))}") from None
        return module
    if not all(part.isidentifier() for part in spec.split(".")):
        raise PluginError(f"plugin {spec!r} is neither a .py file nor a dotted module name")
    already = spec in sys.modules
    try:
        module = importlib.import_module(spec)
    except Exception as e:
        raise PluginError(f"cannot import plugin module {spec!r}: {_cause(e)}") from None
    if already:
        _replay(spec)
    return module


def _entry_points():
    return importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def load_entry_points() -> list[str]:
    """Load every entry point of the group ``pplrl.algorithms``: one whose value is an Agent class
    is registered under the entry point's name, one whose value is a module is imported (it
    registers with :func:`register`). Returns the names of the entry points loaded; a broken one
    is a :class:`PluginError` naming it."""
    registry = _registry()
    loaded = []
    for ep in _entry_points():
        label = f"entry point {ep.name!r} ({ep.value}) in group {ENTRY_POINT_GROUP!r}"
        try:
            obj = ep.load()
        except Exception as e:
            raise PluginError(f"{label} failed to load: {_cause(e)}") from None
        if isinstance(obj, types.ModuleType):
            _replay(obj.__name__)
        elif isinstance(obj, type):
            try:
                if registry.get(ep.name) is not obj:
                    register(ep.name)(obj)
            except ValueError as e:
                raise PluginError(f"{label}: {e}") from None
            _ENTRY_POINT_CLASSES.add(obj)
        else:
            raise PluginError(f"{label} is neither an Agent subclass nor a module: {obj!r}")
        loaded.append(ep.name)
    return loaded


def _unknown(algo, plugin: str | None) -> UnknownAlgorithmError:
    known = ", ".join(sorted(ALGORITHMS)) or "none"
    note = f" (plugin {plugin} was loaded and did not register it)" if plugin is not None else ""
    return UnknownAlgorithmError(f"unknown algorithm {algo!r}; known: {known}{note}")


def resolve(algo, plugin: str | None = None) -> type:
    """The Agent class of ``algo``: a registered name, after loading ``plugin`` (if given) and, when
    the name is still unknown, the entry points; an unknown name is an
    :class:`UnknownAlgorithmError`. A class is checked and registered under its ``algo`` if it is
    not yet."""
    registry = _registry()
    if plugin is not None:
        load_plugin(plugin)
    if isinstance(algo, type):
        check_agent_class(algo)
        if not algo.algo:
            raise ValueError(f"algorithm {_qualname(algo)} has no name: set its `algo` attribute or decorate it "
                             f"with @register(NAME)")
        if registry.get(algo.algo) is not algo:
            register(algo.algo)(algo)
        return algo
    if not isinstance(algo, str):
        raise TypeError(f"an algorithm is a name or an Agent subclass, got {algo!r}")
    if algo not in registry:
        load_entry_points()
    if algo not in registry:
        raise _unknown(algo, plugin)
    return registry[algo]


def agent_class(algo) -> type:
    """``algo`` as an Agent class: a class is only checked (not registered), a name is resolved."""
    if isinstance(algo, type):
        return check_agent_class(algo)
    return resolve(algo)


def plugin_of(cls) -> str | None:
    """The plugin spec that defines ``cls``, for a run to record when none was given: the file of a
    plugin loaded by path, or the importable module outside pplrl that defines it; None for the
    shipped algorithms, entry points' classes and classes defined in ``__main__``."""
    module = cls.__module__
    if module in _FILE_MODULES:
        return _FILE_MODULES[module]
    if cls in _ENTRY_POINT_CLASSES or module == "__main__" or module == "pplrl" or module.startswith("pplrl."):
        return None
    if module.startswith("pplrl_plugin_"):  # a plugin file module this process did not load by path
        return None
    return module


__all__ = ["ALGORITHMS", "ENTRY_POINT_GROUP", "PluginError", "UnknownAlgorithmError", "agent_class",
           "check_agent_class", "is_file_spec", "load_entry_points", "load_plugin", "plugin_of", "record_spec",
           "register", "resolve"]
