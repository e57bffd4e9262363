"""Environments by name, so configs and the CLI say `env: pusht` instead of importing classes.

Factories import their env module lazily: each simulator is an optional extra (`pip install fm-policy[pusht]`,
`[kitchen]`, `[robomimic]`), and listing or building one env must not require the others to be installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym

EnvFactory = Callable[..., gym.Env]

ObsKwargs = Callable[[list[str]], dict[str, Any]]

_REGISTRY: dict[str, EnvFactory] = {}
_OBS_KWARGS: dict[str, ObsKwargs] = {}


def register_env(
    name: str, factory: EnvFactory, *, obs_kwargs: ObsKwargs | None = None, overwrite: bool = False
) -> None:
    """Register `factory(**kwargs) -> gym.Env` under `name`; re-registering a name needs `overwrite=True`.

    `obs_kwargs(obs_keys)` returns the factory kwargs that make the env emit those observation keys, so a saved
    policy can be evaluated without the user restating its observation mode.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"env name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for env '{name}' must be callable, got {factory!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"env '{name}' is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory
    if obs_kwargs is not None:
        _OBS_KWARGS[name] = obs_kwargs


def available_envs() -> list[str]:
    return sorted(_REGISTRY)


def make_env(name: str, **kwargs: Any) -> gym.Env:
    """Build the env registered as `name` with the factory's keyword arguments."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown env '{name}'; available: {', '.join(available_envs()) or '(none)'}")
    return factory(**kwargs)


def env_kwargs_for_obs_keys(name: str, obs_keys: list[str]) -> dict[str, Any]:
    """Factory kwargs under which env `name` emits `obs_keys` (empty if the env has a single observation layout)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown env '{name}'; available: {', '.join(available_envs()) or '(none)'}")
    hook = _OBS_KWARGS.get(name)
    return hook(list(obs_keys)) if hook else {}


def _make_pusht(**kwargs: Any) -> gym.Env:
    from .pusht import PushTEnv

    return PushTEnv(**kwargs)


def _pusht_obs_kwargs(obs_keys: list[str]) -> dict[str, Any]:
    from .pusht import obs_mode_for_keys

    return {"obs_mode": obs_mode_for_keys(obs_keys)}


register_env("pusht", _make_pusht, obs_kwargs=_pusht_obs_kwargs)
