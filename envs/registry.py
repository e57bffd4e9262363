"""Environments by name, so configs and the CLI say `env: pusht` instead of importing classes.

Each env is one `EnvSpec` (`envs/spec.py`) defined in a light module next to its env (`pusht_spec.py`,
`kitchen_spec.py`, `robomimic_spec.py`) and registered in `_register_builtin_envs` below; the functions here are thin
readers of the registered specs, so the collector, the CLI, the dataset loader and the harness never switch on env
names. Spec modules import their simulator lazily: each simulator is an optional extra (`pip install
fm-policy[pusht]`, `[kitchen]`, `[robomimic]`), and listing or building one env must not require the others to be
installed (nor, for listing, any of them). A wrong env name, a misspelt env kwarg or an env without an expert is a
`UserError` (the CLI prints it as one line); a spec that contradicts another is a plain ValueError (a bug in code).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fm_policy.errors import UserError

from .spec import DerivedKey, EnvFactory, EnvMetrics, EnvOption, EnvSpec, ExpertCollection, ObsKwargs

if TYPE_CHECKING:
    import gymnasium as gym

__all__ = [
    "EnvMetrics", "EnvSpec", "all_env_specs", "available_envs", "dataset_key_recipes", "env_kwargs_for_obs_keys",
    "env_metrics", "env_options", "env_spec", "expert_collection", "make_env", "register_env", "unregister_env",
]

_SPECS: dict[str, EnvSpec] = {}  # insertion order = registration order: help texts list envs in that order


def register_env(
    spec: EnvSpec | str, factory: EnvFactory | None = None, *, overwrite: bool = False,
    obs_kwargs: ObsKwargs | None = None, metrics: EnvMetrics | None = None,
) -> EnvSpec:
    """Register `spec`; re-registering a name needs `overwrite=True`. Returns the registered spec.

    `register_env(name, factory, obs_kwargs=..., metrics=...)` is shorthand for a spec with only those fields (an env
    to evaluate in, with no expert, options or dataset recipes), kept for scripts and tests that register a factory.
    A spec whose CLI options or dataset-key recipes contradict another env's is refused here, at registration, so
    the CLI and the dataset loader can merge all specs without ambiguity.
    """
    if isinstance(spec, EnvSpec):
        if factory is not None or obs_kwargs is not None or metrics is not None:
            raise TypeError("register_env(spec) takes the factory, obs_kwargs and metrics from the spec itself")
    else:
        spec = EnvSpec(name=spec, make=factory, obs_kwargs=obs_kwargs, metrics=metrics)  # type: ignore[arg-type]
    if spec.name in _SPECS and not overwrite:
        raise ValueError(f"env '{spec.name}' is already registered (pass overwrite=True to replace it)")
    _check_consistent(spec, [s for s in _SPECS.values() if s.name != spec.name])
    _SPECS[spec.name] = spec
    return spec


def _check_consistent(spec: EnvSpec, others: list[EnvSpec]) -> None:
    """Flags shared with other envs must mean the same kwarg and parser (one argparse argument serves them all), and
    a dataset key may have one recipe only (the loader uses the union of all envs' recipes)."""
    for other in others:
        for command in ("collect", "eval"):
            theirs = {o.flag: o for o in other.options_for(command)}
            for option in spec.options_for(command):
                if option.flag in theirs and not option.same_declaration(theirs[option.flag]):
                    raise ValueError(
                        f"env '{spec.name}' declares {command} option {option.flag} differently from env "
                        f"'{other.name}' (kwarg, parser or choices); use another flag"
                    )
        for kind, mine, theirs in (("derived", spec.derived_keys, other.derived_keys),
                                   ("renamed", spec.renamed_keys, other.renamed_keys)):
            clash = sorted(k for k in set(mine) & set(theirs) if mine[k] != theirs[k])
            if clash:
                raise ValueError(
                    f"env '{spec.name}' defines dataset key(s) {clash} ({kind}) differently from env '{other.name}'; "
                    "dataset-key recipes are shared by all envs, so use another key name"
                )


def unregister_env(name: str) -> EnvSpec:
    """Remove env `name` and return its spec (tests and plugins that register temporary envs clean up with it)."""
    spec = env_spec(name)
    del _SPECS[name]
    return spec


def env_spec(name: str) -> EnvSpec:
    """The spec registered as `name`; an unknown name is an error that lists the registered ones."""
    spec = _SPECS.get(name)
    if spec is None:
        raise UserError(f"unknown env '{name}'; available: {', '.join(available_envs()) or '(none)'}")
    return spec


def all_env_specs() -> list[EnvSpec]:
    """Every registered spec, in registration order."""
    return list(_SPECS.values())


def available_envs() -> list[str]:
    """Registered env names, sorted."""
    return sorted(_SPECS)


def make_env(name: str, **kwargs: Any) -> gym.Env:
    """Build the env registered as `name` with the factory's keyword arguments."""
    spec = env_spec(name)
    try:
        return spec.make(**kwargs)
    except TypeError as exc:  # a misspelt or foreign keyword (config eval.env_kwargs, --env-kwarg): say which env
        if "unexpected keyword argument" not in str(exc):
            raise
        raise UserError(f"env '{name}' does not take the argument(s) given in {sorted(kwargs)}: {exc}") from exc


def env_kwargs_for_obs_keys(name: str, obs_keys: list[str]) -> dict[str, Any]:
    """Factory kwargs under which env `name` emits `obs_keys` (empty if the env has a single observation layout)."""
    hook = env_spec(name).obs_kwargs
    return hook(list(obs_keys)) if hook else {}


def env_metrics(name: str) -> EnvMetrics | None:
    """The env's extra evaluation metrics hook, or None if it has only the generic score / success."""
    return env_spec(name).metrics


def expert_collection(name: str) -> ExpertCollection:
    """How `fm-policy collect` records env `name`; an env without a scripted expert is an error listing those with
    one."""
    collection = env_spec(name).collection
    if collection is None:
        with_expert = sorted(s.name for s in _SPECS.values() if s.collection is not None)
        raise UserError(f"no expert recorder for env '{name}'; available: {with_expert}")
    return collection


def env_options(command: str) -> dict[str, tuple[EnvOption, list[str]]]:
    """`flag -> (declaration, envs declaring it)` for `fm-policy <command>`, over all registered envs in registration
    order: the CLI adds one argument per flag (`register_env` guarantees the declarations agree)."""
    out: dict[str, tuple[EnvOption, list[str]]] = {}
    for spec in _SPECS.values():
        for option in spec.options_for(command):
            out.setdefault(option.flag, (option, []))[1].append(spec.name)
    return out


def dataset_key_recipes() -> tuple[dict[str, DerivedKey], dict[str, str]]:
    """`(derived, renamed)`: the dataset-key recipes of all registered envs, merged.

    The union, not the recipes of "the store's env", because a store need not say which env it came from
    (diffusion_policy's Push-T zarr has no attributes); `register_env` refuses conflicting recipes, so the union is
    unambiguous. A stored key of the requested name always wins over a recipe (see `fm_policy.datasets.policy_data`).
    """
    derived: dict[str, DerivedKey] = {}
    renamed: dict[str, str] = {}
    for spec in _SPECS.values():
        derived.update(spec.derived_keys)
        renamed.update(spec.renamed_keys)
    return derived, renamed


def _register_builtin_envs() -> None:
    """The one place built-in envs are registered: a new simulator adds its spec module and one line here."""
    from .kitchen_spec import SPEC as KITCHEN
    from .pusht_spec import SPEC as PUSHT
    from .robomimic_spec import SPECS as ROBOMIMIC

    for spec in (PUSHT, KITCHEN, *ROBOMIMIC):
        register_env(spec)


_register_builtin_envs()
