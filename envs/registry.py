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

EnvMetrics = Callable[[list[Any], dict[str, Any]], dict[str, Any]]
"""`metrics(episodes, env_kwargs) -> {name: Estimate}`: env-specific aggregates of the harness's `EpisodeResult`s
(Kitchen: p_1..p_K and the mean number of completed tasks), computed next to the generic score / success."""

_REGISTRY: dict[str, EnvFactory] = {}
_OBS_KWARGS: dict[str, ObsKwargs] = {}
_METRICS: dict[str, EnvMetrics] = {}


def register_env(
    name: str, factory: EnvFactory, *, obs_kwargs: ObsKwargs | None = None, overwrite: bool = False,
    metrics: EnvMetrics | None = None,
) -> None:
    """Register `factory(**kwargs) -> gym.Env` under `name`; re-registering a name needs `overwrite=True`.

    `obs_kwargs(obs_keys)` returns the factory kwargs that make the env emit those observation keys, so a saved
    policy can be evaluated without the user restating its observation mode. `metrics` (optional) adds env-specific
    evaluation metrics (see `EnvMetrics`).
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
    if metrics is not None:
        _METRICS[name] = metrics


def available_envs() -> list[str]:
    return sorted(_REGISTRY)


def make_env(name: str, **kwargs: Any) -> gym.Env:
    """Build the env registered as `name` with the factory's keyword arguments."""
    factory = _REGISTRY.get(name)
    if factory is None:
        raise ValueError(f"unknown env '{name}'; available: {', '.join(available_envs()) or '(none)'}")
    try:
        return factory(**kwargs)
    except TypeError as exc:  # a misspelt or foreign keyword (config eval.env_kwargs, --env-kwarg): say which env
        if "unexpected keyword argument" not in str(exc):
            raise
        raise ValueError(f"env '{name}' does not take the argument(s) given in {sorted(kwargs)}: {exc}") from exc


def env_kwargs_for_obs_keys(name: str, obs_keys: list[str]) -> dict[str, Any]:
    """Factory kwargs under which env `name` emits `obs_keys` (empty if the env has a single observation layout)."""
    if name not in _REGISTRY:
        raise ValueError(f"unknown env '{name}'; available: {', '.join(available_envs()) or '(none)'}")
    hook = _OBS_KWARGS.get(name)
    return hook(list(obs_keys)) if hook else {}


def env_metrics(name: str) -> EnvMetrics | None:
    """The env's extra evaluation metrics hook, or None if it has only the generic score / success."""
    return _METRICS.get(name)


def _make_pusht(**kwargs: Any) -> gym.Env:
    from .pusht import PushTEnv

    return PushTEnv(**kwargs)


def _pusht_obs_kwargs(obs_keys: list[str]) -> dict[str, Any]:
    from .pusht import obs_mode_for_keys

    return {"obs_mode": obs_mode_for_keys(obs_keys)}


register_env("pusht", _make_pusht, obs_kwargs=_pusht_obs_kwargs)


def _make_kitchen(**kwargs: Any) -> gym.Env:
    from .kitchen import KitchenEnv

    return KitchenEnv(**kwargs)


def _kitchen_obs_kwargs(obs_keys: list[str]) -> dict[str, Any]:
    from .kitchen import check_obs_keys

    check_obs_keys(obs_keys)
    return {}


def _kitchen_metrics(episodes: list[Any], env_kwargs: dict[str, Any]) -> dict[str, Any]:
    from .kitchen import kitchen_metrics

    return kitchen_metrics([e.total_reward for e in episodes], env_kwargs)


register_env("kitchen", _make_kitchen, obs_kwargs=_kitchen_obs_kwargs, metrics=_kitchen_metrics)


def _robomimic_factory(task: str) -> EnvFactory:
    def make(**kwargs: Any) -> gym.Env:
        from .robomimic import RobomimicEnv

        return RobomimicEnv(task=task, **kwargs)

    return make


def _robomimic_obs_kwargs(obs_keys: list[str]) -> dict[str, Any]:
    from .robomimic import obs_kwargs_for_keys

    return obs_kwargs_for_keys(obs_keys)


for _task in ("lift", "can", "square"):  # robosuite Lift, PickPlaceCan, NutAssemblySquare through robomimic
    register_env(f"robomimic/{_task}", _robomimic_factory(_task), obs_kwargs=_robomimic_obs_kwargs)
