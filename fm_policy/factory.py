"""Policy types by name: the one place that maps a config's `type` to its config class and policy class.

    from fm_policy.factory import make_policy, load_policy, register_policy_type

Built-in types are registered by module path and imported only when first asked for (the DDPM baseline pulls in
diffusers' schedulers; nothing else should pay for that). A type from outside the package registers its class:

    @register_policy_type
    class MyPolicy(BasePolicy):
        name = "mine"
        config_class = MyPolicyConfig
        ...

after which `train-policy` configs with `policy: {type: mine}`, `load_policy`, the harness, `fm-policy serve` and
export work with it. Everything else asks the class (`policy.solvers`, `supports_fused_export`, ...), never the name.
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fm_policy.checkpoint import CheckpointError, verify_checkpoint_dir
from fm_policy.config import ConfigError, config_from_dict
from fm_policy.policy import CONFIG_FILE, BasePolicy, PolicyConfig, fit_normalizer

_BUILTIN: dict[str, str] = {
    "flow": "fm_policy.flow_policy:FlowPolicy",
    "ddpm": "fm_policy.ddpm_policy:DiffusionPolicy",
    "flow_residual": "fm_policy.residual_policy:ResidualFlowPolicy",
}
_TYPES: dict[str, type[BasePolicy] | str] = dict(_BUILTIN)


def register_policy_type(policy_cls: type[BasePolicy], *, overwrite: bool = False) -> type[BasePolicy]:
    """Register a `BasePolicy` subclass under its `name` (usable as a class decorator)."""
    if not (isinstance(policy_cls, type) and issubclass(policy_cls, BasePolicy)):
        raise TypeError(f"a policy type must be a BasePolicy subclass, got {policy_cls!r}")
    name = policy_cls.name
    if not name or not isinstance(name, str):
        raise ValueError(f"{policy_cls.__name__}.name must be a non-empty str")
    if not issubclass(policy_cls.config_class, PolicyConfig):
        raise TypeError(f"{policy_cls.__name__}.config_class must subclass PolicyConfig")
    if policy_cls.config_class().type != name:
        raise ValueError(f"{policy_cls.config_class.__name__}().type is '{policy_cls.config_class().type}', "
                         f"but {policy_cls.__name__}.name is '{name}': the config's default type must be the name")
    current = _TYPES.get(name)
    if current is not None and current is not policy_cls and not overwrite:
        raise ValueError(f"policy type '{name}' is already registered (pass overwrite=True to replace it)")
    _TYPES[name] = policy_cls
    return policy_cls


def unregister_policy_type(name: str) -> None:
    """Forget a registered type (a built-in falls back to its own module); for tests and plugins."""
    _TYPES.pop(name, None)
    if name in _BUILTIN:
        _TYPES[name] = _BUILTIN[name]


def available_policy_types() -> list[str]:
    return sorted(_TYPES)


def policy_class(name: str) -> type[BasePolicy]:
    """The policy class registered as `name` (imported on first use for built-ins)."""
    entry = _TYPES.get(name)
    if entry is None:
        raise ConfigError(f"policy type '{name}' is unknown; choose one of {available_policy_types()}")
    if isinstance(entry, str):
        module, attr = entry.split(":")
        entry = getattr(importlib.import_module(module), attr)
        if entry.name != name:  # a built-in's module and its name disagree: a bug, not a user error
            raise RuntimeError(f"{entry.__name__}.name is '{entry.name}', registered as '{name}'")
        _TYPES[name] = entry
    return entry


def policy_config_class(name: str) -> type[PolicyConfig]:
    return policy_class(name).config_class


def policy_config_from_dict(values: Mapping[str, Any], source: str,
                            meta: Mapping[str, Any] | None = None) -> PolicyConfig:
    """A saved policy config (config.json's "policy") as its type's config object, with the usual key checks.

    `meta` is the whole config.json: a file without "format" is the flat layout of fm-policy 0.1.0, which the
    type's `migrate_v1` turns into the current fields, so checkpoints trained before the change still load."""
    values = dict(values)
    name = values.get("type", "")
    if not name:
        raise CheckpointError(f"{source}: the policy config names no type")
    try:
        config_cls = policy_config_class(name)
    except ConfigError:
        raise CheckpointError(f"{source}: unknown policy type '{name}'; registered types: "
                              f"{available_policy_types()} (a type from a plugin must be registered before loading)"
                              ) from None
    if meta is not None and "format" not in meta:
        values = config_cls.migrate_v1(values, meta)
    return config_from_dict(config_cls, values, source)


def read_policy_config(directory: str | os.PathLike) -> PolicyConfig:
    """The policy config of a saved policy directory, after checking its seal (if it has one)."""
    directory = Path(directory)
    if not directory.is_dir():
        raise CheckpointError(f"{directory}: no such directory (a checkpoint still being written appears only "
                              "when complete)")
    for sealed in (directory, directory.parent):  # a policy saved alone, or inside a training checkpoint
        if (sealed / "manifest.json").exists():
            verify_checkpoint_dir(sealed)
            break
    try:
        meta = json.loads((directory / CONFIG_FILE).read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no {CONFIG_FILE}; not a saved policy") from None
    except ValueError as exc:
        raise CheckpointError(f"{directory}/{CONFIG_FILE}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("policy"), dict):
        raise CheckpointError(f"{directory}/{CONFIG_FILE}: has no 'policy' section; not a saved policy")
    if meta.get("format", 1) > 2:
        raise CheckpointError(f"{directory}/{CONFIG_FILE}: config format {meta['format']} is newer than this "
                              "fm-policy understands; upgrade fm-policy")
    return policy_config_from_dict(meta["policy"], f"{directory}/{CONFIG_FILE}", meta)


def policy_config_as(config: PolicyConfig, name: str, **changes: Any) -> PolicyConfig:
    """`config`'s shared fields (horizons, network, normalisation, shapes) under policy type `name`'s config class,
    that type's own fields at their defaults (unless given in `changes`): e.g. the DDPM baseline on the same network
    and data as a flow policy. `solver` becomes the new type's default unless it is one the new type accepts."""
    import copy
    import dataclasses

    target = policy_config_class(name)
    shared = {f.name for f in dataclasses.fields(PolicyConfig)} - {"type"}
    values = {k: copy.deepcopy(getattr(config, k)) for k in shared}
    if values["solver"] not in policy_class(name).solvers:
        del values["solver"]
    return target(**{**values, **changes})


def make_policy(config: PolicyConfig, arrays: Mapping[str, np.ndarray], obs_keys: Sequence[str]) -> BasePolicy:
    """Build a policy for training: shapes and normaliser come from the training arrays."""
    policy_cls = policy_class(config.type)
    config.validate()
    config.obs_shapes = {k: list(arrays[k].shape[1:]) for k in obs_keys}
    config.action_dim = int(arrays["action"].shape[-1])
    return policy_cls(config, fit_normalizer(config, arrays))


def load_policy(directory: str | os.PathLike, device: str | torch.device = "cpu") -> BasePolicy:
    """Load any saved policy, of whichever registered type it was saved as."""
    return BasePolicy.from_pretrained(directory, device)


__all__ = [
    "available_policy_types",
    "load_policy",
    "make_policy",
    "policy_class",
    "policy_config_as",
    "policy_config_class",
    "policy_config_from_dict",
    "read_policy_config",
    "register_policy_type",
    "unregister_policy_type",
]
