"""Typed configs: dataclasses, filled from YAML files and `key=value` command-line overrides.

OmegaConf does the merging and type checking (a well-kept library for exactly this); this module adds what users
need on top: one error type whose message says which file or override holds the bad key and what the valid keys
are, and lookup of the configs shipped in `configs/` by name.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from importlib import resources
from typing import Any, TypeVar

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fm_policy.errors import UserError

T = TypeVar("T")


class ConfigError(UserError):
    """A config file or override is wrong; the message names the source, the key and the problem."""


def _valid_keys(config: DictConfig, dotted: str) -> list[str]:
    """Keys at the level of `dotted` in `config`, for error messages."""
    parent = dotted.rsplit(".", 1)[0] if "." in dotted else ""
    node = OmegaConf.select(config, parent) if parent else config
    return [str(k) for k in node.keys()] if isinstance(node, DictConfig) else []


def _merge(base: DictConfig, other: Any, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(base, other)
    except OmegaConfBaseException as exc:
        key = getattr(exc, "full_key", None) or ""
        message = str(exc).splitlines()[0]
        valid = _valid_keys(base, key) if key and " not in " in message else []
        hint = f"; valid keys here: {', '.join(valid)}" if valid else ""
        raise ConfigError(f"{source}: key '{key}': {message}{hint}") from None


def resolve_config_path(name_or_path: str) -> str:
    """A path to a YAML file, or the name of a config shipped in `configs/` (with or without '.yaml')."""
    if os.path.exists(name_or_path):
        return name_or_path
    name = name_or_path if name_or_path.endswith(".yaml") else f"{name_or_path}.yaml"
    shipped = resources.files("fm_policy.configs") / os.path.basename(name)
    if shipped.is_file():
        return str(shipped)
    available = sorted(p.name[:-5] for p in resources.files("fm_policy.configs").iterdir() if p.name.endswith(".yaml"))
    raise ConfigError(f"config '{name_or_path}' is neither a file nor a shipped config; shipped: {', '.join(available)}")


def _read_yaml(path: str) -> DictConfig:
    try:
        loaded = OmegaConf.load(path)
    except Exception as exc:  # YAML syntax errors come in several types
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"{path}: expected a mapping of sections (run_dir, data, policy, ...), got a list")
    return loaded


def _parse_override(override: str) -> DictConfig:
    if "=" not in override:
        raise ConfigError(f"override '{override}' must look like key=value (e.g. optim.lr=3e-4)")
    return OmegaConf.from_dotlist([override])


def peek_config_value(path: str | None, overrides: Sequence[str], dotted: str) -> Any:
    """The value of `dotted` after the file and the overrides, read before any schema is applied.

    Polymorphic sections need it: the class that types `policy` depends on `policy.type`, which may come from the
    file or from an override."""
    raw = _read_yaml(resolve_config_path(path)) if path is not None else OmegaConf.create({})
    for override in overrides:
        raw = OmegaConf.merge(raw, _parse_override(override))
    return OmegaConf.select(raw, dotted, default=None)


def load_config(schema: type[T], path: str | None = None, overrides: Sequence[str] = (),
                defaults: T | None = None) -> T:
    """Defaults of `schema` (or the instance `defaults`, e.g. with a section of a chosen subclass), then the YAML
    file at `path`, then `key=value` overrides (dotted keys for nesting)."""
    config = OmegaConf.structured(defaults if defaults is not None else schema)
    if path is not None:
        path = resolve_config_path(path)
        config = _merge(config, _read_yaml(path), path)
    for override in overrides:
        config = _merge(config, _parse_override(override), f"override '{override}'")
    try:
        return OmegaConf.to_object(config)  # type: ignore[return-value]
    except OmegaConfBaseException as exc:
        raise ConfigError(f"{path or 'config'}: {str(exc).splitlines()[0]}") from None


def config_to_yaml(config: Any) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(config))


def config_from_dict(schema: type[T], values: dict[str, Any], source: str) -> T:
    """Rebuild a config saved as a plain dict (e.g. a checkpoint's config.json), with the same checks."""
    merged = _merge(OmegaConf.structured(schema), OmegaConf.create(values), source)
    return OmegaConf.to_object(merged)  # type: ignore[return-value]
