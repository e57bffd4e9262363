"""Environments by name, so configs and the CLI say `env: pusht` instead of importing classes.

Factories import their env module lazily: each simulator is an optional extra (`pip install fm-policy[pusht]`,
`[kitchen]`, `[robomimic]`), and listing or building one env must not require the others to be installed.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import gymnasium as gym

EnvFactory = Callable[..., gym.Env]

_REGISTRY: dict[str, EnvFactory] = {}


def register_env(name: str, factory: EnvFactory, *, overwrite: bool = False) -> None:
    """Register `factory(**kwargs) -> gym.Env` under `name`; re-registering a name needs `overwrite=True`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"env name must be a non-empty str, got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory for env '{name}' must be callable, got {factory!r}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"env '{name}' is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def available_envs() -> list[str]:
    return sorted(_REGISTRY)


def make_env(name: str, **kwargs: Any) -> gym.Env:
    """Build the env registered as `name` with the factory's keyword arguments."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown env '{name}'; available: {', '.join(available_envs()) or '(none)'}")
    return factory(**kwargs)


def _make_pusht(**kwargs: Any) -> gym.Env:
    from .pusht import PushTEnv

    return PushTEnv(**kwargs)


register_env("pusht", _make_pusht)
