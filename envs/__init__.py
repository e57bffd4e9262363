"""Simulation environments (Dict observations), the action-chunk wrapper and the env registry.

Push-T names are imported lazily (PEP 562): gym-pusht is an optional extra, and `from fm_policy.envs import make_env`
must work for a Kitchen-only install.
"""

from __future__ import annotations

from typing import Any

from .multistep import MultiStepWrapper
from .registry import available_envs, env_kwargs_for_obs_keys, make_env, register_env

_PUSHT_EXPORTS = ("PushTEnv", "block_keypoints", "lowdim_keypoint_obs")

__all__ = ["MultiStepWrapper", "available_envs", "env_kwargs_for_obs_keys", "make_env", "register_env", *_PUSHT_EXPORTS]


def __getattr__(name: str) -> Any:
    if name in _PUSHT_EXPORTS:
        from . import pusht

        return getattr(pusht, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
