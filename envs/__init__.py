"""Simulation environments (Dict observations), the action-chunk wrapper and the env registry.

Push-T names and `MultiStepWrapper` are imported lazily (PEP 562): gym-pusht is an optional extra, and
`from fm_policy.envs import make_env` must work for a Kitchen-only install; importing the registry (which the CLI does
to build its parser from the env specs) must not even import gymnasium.
"""

from __future__ import annotations

from typing import Any

from .registry import available_envs, env_kwargs_for_obs_keys, env_spec, make_env, register_env, unregister_env
from .spec import DerivedKey, EnvOption, EnvSpec, ExpertCollection

_PUSHT_EXPORTS = ("PushTEnv", "block_keypoints", "goal_keypoint_obs", "lowdim_keypoint_obs")

__all__ = [
    "DerivedKey", "EnvOption", "EnvSpec", "ExpertCollection", "MultiStepWrapper", "available_envs",
    "env_kwargs_for_obs_keys", "env_spec", "make_env", "register_env", "unregister_env", *_PUSHT_EXPORTS,
]


def __getattr__(name: str) -> Any:
    if name == "MultiStepWrapper":
        from .multistep import MultiStepWrapper

        return MultiStepWrapper
    if name in _PUSHT_EXPORTS:
        from . import pusht

        return getattr(pusht, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
