"""Replay buffers and MBPO-style model rollouts.

The pieces fit together like this (MBPO, Janner et al. 2019)::

    real = ReplayBuffer(obs_dim, act_dim, capacity=1_000_000)
    model = ReplayBuffer(obs_dim, act_dim, capacity=400_000)
    real.add(obs, act, rew, next_obs, terminated)          # one env step

    start = real.sample(400, rng).obs.numpy()              # branch from real states
    model.add_batch(**branched_rollouts(start, policy_np, model_step_np, length=1,
                                        termination_fn=termination_fn_for(env_id)))
    batch = sample_mixed(real, model, 256, real_ratio=0.05, rng=rng)  # for the agent

Storage is numpy (float32); :class:`Batch` holds torch float32 tensors. ``done`` is the
environment's *terminated* flag only: a time-limit truncation is not a terminal state
and must still be bootstrapped, so it is never stored as done.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import numpy as np
import torch

_FIELDS = ("obs", "act", "rew", "next_obs", "done")


@dataclass
class Batch:
    """A batch of transitions as float32 tensors.

    Shapes: ``obs``, ``next_obs`` ``(B, obs_dim)``; ``act`` ``(B, act_dim)``; ``rew`` and
    ``done`` ``(B,)``. ``done`` is 1.0 where the transition *terminated* (not truncated).
    """

    obs: torch.Tensor
    act: torch.Tensor
    rew: torch.Tensor
    next_obs: torch.Tensor
    done: torch.Tensor

    def __len__(self) -> int:
        return int(self.obs.shape[0])

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: getattr(self, f.name).to(device) for f in fields(self)})

    @classmethod
    def from_numpy(cls, obs, act, rew, next_obs, done) -> Batch:
        """Copies the arrays into new float32 tensors (never aliases the inputs)."""
        arrays = dict(obs=obs, act=act, rew=rew, next_obs=next_obs, done=done)
        return cls(**{k: torch.tensor(np.asarray(v), dtype=torch.float32) for k, v in arrays.items()})


def _check_finite(name: str, x: np.ndarray) -> None:
    if not np.all(np.isfinite(x)):
        bad = int(np.size(x) - np.count_nonzero(np.isfinite(x)))
        raise ValueError(f"{name} has {bad} non-finite value(s) (NaN or inf)")


def _as_float_array(name: str, x: Any, shape: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be numeric, got {type(x).__name__}") from e
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    _check_finite(name, arr)
    # Values finite in float64 may overflow float32 storage.
    out = arr.astype(np.float32)
    _check_finite(f"{name} (as float32)", out)
    return out


def _as_done_array(name: str, x: Any, shape: tuple[int, ...]) -> np.ndarray:
    arr = np.asarray(x)
    if arr.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {arr.shape}")
    if arr.dtype != np.bool_:
        try:
            arr = arr.astype(np.float64)
        except (TypeError, ValueError) as e:
            raise ValueError(f"{name} must be boolean (or 0/1), got dtype {arr.dtype}") from e
        if not np.all((arr == 0.0) | (arr == 1.0)):
            raise ValueError(f"{name} must be boolean (or 0/1); got values other than 0 and 1")
    return arr.astype(np.float32)


class ReplayBuffer:
    """A fixed-capacity ring buffer of transitions ``(obs, act, rew, next_obs, terminated)``.

    When full, new transitions overwrite the oldest. Everything is validated on the way
    in (shapes and finiteness); stored as float32.
    """

    def __init__(self, obs_dim: int, act_dim: int, capacity: int):
        for name, v in (("obs_dim", obs_dim), ("act_dim", act_dim), ("capacity", capacity)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        self.obs_dim, self.act_dim, self.capacity = int(obs_dim), int(act_dim), int(capacity)
        self.obs = np.zeros((self.capacity, self.obs_dim), dtype=np.float32)
        self.act = np.zeros((self.capacity, self.act_dim), dtype=np.float32)
        self.rew = np.zeros((self.capacity,), dtype=np.float32)
        self.next_obs = np.zeros((self.capacity, self.obs_dim), dtype=np.float32)
        self.done = np.zeros((self.capacity,), dtype=np.float32)
        self._ptr = 0  # next slot to write
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def __repr__(self) -> str:
        return (f"ReplayBuffer(obs_dim={self.obs_dim}, act_dim={self.act_dim}, "
                f"capacity={self.capacity}, size={self._size})")

    # ----------------------------------------------------------------- writing
    def add(self, obs, act, rew, next_obs, terminated) -> None:
        """Stores one transition. ``terminated`` is the env's terminated flag (not truncated)."""
        self.add_batch(
            _as_float_array("obs", obs, (self.obs_dim,))[None],
            _as_float_array("act", act, (self.act_dim,))[None],
            _as_float_array("rew", rew, ())[None],
            _as_float_array("next_obs", next_obs, (self.obs_dim,))[None],
            _as_done_array("terminated", terminated, ())[None],
        )

    def add_batch(self, obs, act, rew, next_obs, done) -> None:
        """Stores ``n`` transitions given as arrays with leading dimension ``n`` (e.g. the
        output of :func:`branched_rollouts`). If ``n`` exceeds the capacity only the last
        ``capacity`` transitions are kept."""
        obs_arr = np.asarray(obs)
        if obs_arr.ndim != 2:
            raise ValueError(f"obs must have shape (n, {self.obs_dim}), got {obs_arr.shape}")
        n = obs_arr.shape[0]
        data = {
            "obs": _as_float_array("obs", obs_arr, (n, self.obs_dim)),
            "act": _as_float_array("act", act, (n, self.act_dim)),
            "rew": _as_float_array("rew", rew, (n,)),
            "next_obs": _as_float_array("next_obs", next_obs, (n, self.obs_dim)),
            "done": _as_done_array("done", done, (n,)),
        }
        if n == 0:
            return
        if n > self.capacity:
            data = {k: v[n - self.capacity:] for k, v in data.items()}
            n = self.capacity
        idx = (self._ptr + np.arange(n)) % self.capacity
        for k, v in data.items():
            getattr(self, k)[idx] = v
        self._ptr = int((self._ptr + n) % self.capacity)
        self._size = min(self._size + n, self.capacity)

    def clear(self) -> None:
        self._ptr = 0
        self._size = 0

    # ----------------------------------------------------------------- reading
    def sample(self, batch_size: int, rng: np.random.Generator) -> Batch:
        """``batch_size`` transitions drawn uniformly with replacement."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if self._size == 0:
            raise ValueError("cannot sample from an empty ReplayBuffer")
        idx = rng.integers(0, self._size, size=int(batch_size))
        return Batch.from_numpy(*(getattr(self, k)[idx] for k in _FIELDS))

    def _ordered_indices(self) -> np.ndarray:
        """Storage indices of the stored transitions, oldest first."""
        if self._size < self.capacity:
            return np.arange(self._size)
        return (self._ptr + np.arange(self.capacity)) % self.capacity

    def all(self) -> Batch:
        """Every stored transition, in insertion order (oldest first)."""
        idx = self._ordered_indices()
        return Batch.from_numpy(*(getattr(self, k)[idx] for k in _FIELDS))

    # ------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Numpy copies of the stored rows plus the ring pointer and size.

        Only the filled rows are saved. ``load_state_dict`` also accepts the arrays as
        CPU torch tensors, so a checkpoint may convert them for ``torch.load(weights_only=True)``.
        """
        return {
            "obs_dim": self.obs_dim,
            "act_dim": self.act_dim,
            "capacity": self.capacity,
            "ptr": self._ptr,
            "size": self._size,
            **{k: getattr(self, k)[: self._size].copy() for k in _FIELDS},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        missing = {"obs_dim", "act_dim", "capacity", "ptr", "size", *_FIELDS} - set(state)
        if missing:
            raise ValueError(f"replay state_dict is missing {sorted(missing)}")
        for k in ("obs_dim", "act_dim", "capacity"):
            if int(state[k]) != getattr(self, k):
                raise ValueError(f"replay state_dict has {k}={int(state[k])}, this buffer has {getattr(self, k)}")
        size, ptr = int(state["size"]), int(state["ptr"])
        if not 0 <= size <= self.capacity:
            raise ValueError(f"replay state_dict size {size} is outside [0, {self.capacity}]")
        if not 0 <= ptr < self.capacity or (size < self.capacity and ptr != size):
            raise ValueError(f"replay state_dict ptr {ptr} is inconsistent with size {size}")
        shapes = {"obs": (size, self.obs_dim), "act": (size, self.act_dim), "rew": (size,),
                  "next_obs": (size, self.obs_dim), "done": (size,)}
        arrays = {}
        for k, shape in shapes.items():
            v = state[k]
            v = v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
            if v.shape != shape:
                raise ValueError(f"replay state_dict field {k} has shape {v.shape}, expected {shape}")
            if v.dtype != np.float32:
                raise ValueError(f"replay state_dict field {k} has dtype {v.dtype}, expected float32")
            _check_finite(f"replay state_dict field {k}", v)
            arrays[k] = v
        for k, v in arrays.items():
            buf = getattr(self, k)
            buf[:] = 0.0
            buf[:size] = v
        self._size, self._ptr = size, ptr


def sample_mixed(real: ReplayBuffer, model: ReplayBuffer, batch_size: int, real_ratio: float,
                 rng: np.random.Generator) -> Batch:
    """MBPO's agent batch: ``round(batch_size * real_ratio)`` transitions from ``real``, the
    rest from ``model``; all from ``real`` while ``model`` is empty. Real rows come first."""
    if not 0.0 <= float(real_ratio) <= 1.0:
        raise ValueError(f"real_ratio must be in [0, 1], got {real_ratio!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if (real.obs_dim, real.act_dim) != (model.obs_dim, model.act_dim):
        raise ValueError(f"real buffer has (obs_dim, act_dim)=({real.obs_dim}, {real.act_dim}) but model "
                         f"buffer has ({model.obs_dim}, {model.act_dim})")
    n_real = batch_size if len(model) == 0 else int(round(batch_size * float(real_ratio)))
    n_model = batch_size - n_real
    if n_model == 0:
        return real.sample(batch_size, rng)
    if n_real == 0:
        return model.sample(batch_size, rng)
    a, b = real.sample(n_real, rng), model.sample(n_model, rng)
    return Batch(**{k: torch.cat([getattr(a, k), getattr(b, k)]) for k in _FIELDS})


def branched_rollouts(
    start_obs: np.ndarray,
    policy_fn: Callable[[np.ndarray], np.ndarray],
    model_step_fn: Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]],
    length: int,
    termination_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """MBPO's ``length``-step model rollouts branched from real states.

    Each step: ``act = policy_fn(obs)`` (``(n, act_dim)``); ``next_obs, rew =
    model_step_fn(obs, act)`` (``(n, obs_dim)``, ``(n,)``); ``done = termination_fn(obs,
    act, next_obs)`` (``(n,)`` bool; all False without one). Done rows are recorded and
    not continued. Returns the transitions of all steps concatenated, as a dict with keys
    ``obs, act, rew, next_obs`` (float32) and ``done`` (bool), ready for
    :meth:`ReplayBuffer.add_batch`. Non-finite policy or model outputs raise ValueError.
    """
    if isinstance(length, bool) or not isinstance(length, (int, np.integer)) or length <= 0:
        raise ValueError(f"rollout length must be a positive integer, got {length!r}")
    obs = np.asarray(start_obs, dtype=np.float32)
    if obs.ndim != 2 or obs.shape[0] == 0:
        raise ValueError(f"start_obs must have shape (n, obs_dim) with n > 0, got {obs.shape}")
    _check_finite("start_obs", obs)
    n0, obs_dim = obs.shape
    out: dict[str, list[np.ndarray]] = {k: [] for k in _FIELDS}
    act_dim = None
    for t in range(int(length)):
        n = obs.shape[0]
        act = np.asarray(policy_fn(obs), dtype=np.float32)
        if act.ndim != 2 or act.shape[0] != n or (act_dim is not None and act.shape[1] != act_dim):
            want = f"({n}, {act_dim if act_dim is not None else 'act_dim'})"
            raise ValueError(f"policy_fn returned shape {act.shape} at rollout step {t}, expected {want}")
        act_dim = act.shape[1]
        _check_finite(f"policy action at rollout step {t}", act)
        result = model_step_fn(obs, act)
        if not isinstance(result, tuple) or len(result) != 2:
            raise ValueError("model_step_fn must return a tuple (next_obs, rew)")
        next_obs = np.asarray(result[0], dtype=np.float32)
        rew = np.asarray(result[1], dtype=np.float32)
        if rew.shape == (n, 1):
            rew = rew[:, 0]
        if next_obs.shape != (n, obs_dim):
            raise ValueError(f"model next_obs has shape {next_obs.shape} at rollout step {t}, expected {(n, obs_dim)}")
        if rew.shape != (n,):
            raise ValueError(f"model reward has shape {rew.shape} at rollout step {t}, expected {(n,)}")
        _check_finite(f"model next_obs at rollout step {t}", next_obs)
        _check_finite(f"model reward at rollout step {t}", rew)
        if termination_fn is None:
            done = np.zeros(n, dtype=bool)
        else:
            done = np.asarray(termination_fn(obs, act, next_obs))
            if done.shape == (n, 1):
                done = done[:, 0]
            if done.shape != (n,):
                raise ValueError(f"termination_fn returned shape {done.shape} at rollout step {t}, expected {(n,)}")
            done = done.astype(bool)
        for k, v in zip(_FIELDS, (obs, act, rew, next_obs, done)):
            out[k].append(v)
        obs = next_obs[~done]
        if obs.shape[0] == 0:
            break
    return {k: np.concatenate(v) for k, v in out.items()}
