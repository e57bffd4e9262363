"""`EnvSpec`: everything one environment contributes to the package, declared in one place.

Why one record per env: the facts about an env (how to build it, which kwargs make it emit a policy's observation
keys, its extra metrics, its scripted expert, its collection defaults, how its dataset fields become observation keys,
and its env-specific command-line options) used to be spread over the registry, the recorders, the collector, the CLI
and the dataset loader, each switching on env names. With a spec, those modules read the registered specs generically,
and adding a simulator is one new module that defines a spec plus one `register_env(spec)` call.

This module is light on purpose (no gymnasium, numpy or simulator import): building the CLI parser reads every spec,
and listing envs must not import gym-pusht, MuJoCo or robosuite. Specs therefore refer to their env module, recorder
and recipes through small functions that import lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # type names only: importing them would pull in gymnasium / numpy at CLI start
    import gymnasium as gym
    import numpy as np
    from fm_policy.datasets.recorders import EpisodeRecorder

EnvFactory = Callable[..., "gym.Env"]
"""`make(**kwargs) -> gym.Env`: builds the env; envs of this package accept `max_episode_steps`."""

ObsKwargs = Callable[[list[str]], dict[str, Any]]
"""`obs_kwargs(obs_keys) -> factory kwargs` under which the env emits those observation keys, so a saved policy is
evaluated without restating its observation mode. Raises ValueError for keys the env never emits."""

EnvMetrics = Callable[[list[Any], dict[str, Any]], dict[str, Any]]
"""`metrics(episodes, env_kwargs) -> {name: Estimate}`: env-specific aggregates of the harness's `EpisodeResult`s
(Kitchen: p_1..p_K and the mean number of completed tasks), computed next to the generic score / success."""

RecorderFactory = Callable[..., "EpisodeRecorder"]
"""`recorder(obs_modes=..., max_steps=..., **kwargs) -> EpisodeRecorder` (see `fm_policy.datasets.recorders`); the
kwargs are the collect command's env options and `CollectConfig.env_kwargs`."""


def csv_list(value: str) -> list[str]:
    """`"a, b,c"` -> `["a", "b", "c"]`: the parser of list-valued options (`--tasks`, `--obs`). A list, not a tuple,
    because parsed values are stored in zarr attributes (JSON) and compared with them when a collection resumes."""
    items = [v.strip() for v in value.split(",") if v.strip()]
    if not items:
        raise ValueError("expected a comma-separated list, e.g. state,keypoints")
    return items


@dataclass(frozen=True)
class EnvOption:
    """An env-specific command-line option, declared as data so `fm-policy collect` / `eval` add and apply it
    without knowing the env.

    `parse(text) -> value` raises ValueError with a readable message for bad input (the CLI shows it as a usage
    error). The parsed value is passed as `kwarg`: to the expert recorder for `collect` (and stored with the
    dataset), to the env factory for `eval`. Options with the same flag in several specs (the three robomimic tasks)
    must declare the same kwarg, parser and choices; `register_env` checks this. Giving an option with an env that
    does not declare it is an error naming the envs that do.
    """

    flag: str
    kwarg: str
    parse: Callable[[str], Any]
    help: str
    metavar: str | None = None
    choices: tuple[str, ...] | None = None
    commands: tuple[str, ...] = ("collect", "eval")

    def __post_init__(self) -> None:
        if not self.flag.startswith("--") or len(self.flag) < 3:
            raise ValueError(f"option flag must look like --name, got {self.flag!r}")
        if not self.kwarg.isidentifier():
            raise ValueError(f"option {self.flag}: kwarg must be a Python identifier, got {self.kwarg!r}")
        unknown = set(self.commands) - {"collect", "eval"}
        if unknown or not self.commands:
            raise ValueError(f"option {self.flag}: commands must be among ('collect', 'eval'), got {self.commands}")

    @property
    def dest(self) -> str:
        """argparse attribute for this flag, prefixed so it never collides with a core flag's."""
        return "env_option_" + self.flag.lstrip("-").replace("-", "_")

    def same_declaration(self, other: EnvOption) -> bool:
        """Whether two specs' declarations of one flag can share one argparse argument."""
        return (self.kwarg, self.parse, self.choices) == (other.kwarg, other.parse, other.choices)


@dataclass(frozen=True)
class DerivedKey:
    """A policy observation key built from stored dataset fields (Push-T's `keypoints` from `keypoint` + `state`),
    because stores keep the field layout of the data they came from (diffusion_policy's) while policies read the
    env's observation keys."""

    sources: tuple[str, ...]
    build: Callable[..., np.ndarray]
    uses_attrs: bool = False
    """True: `build(arrays, attrs)` also gets the store's root attributes, for a value the fields do not hold but
    the store records (Push-T's `goal` from the collector's recorded goal); False: `build(arrays)`."""


@dataclass(frozen=True)
class ExpertCollection:
    """How `fm-policy collect` records expert demonstrations in this env.

    `recorder` is called inside each collection worker (never at import or registration: it builds the simulator);
    `obs` and `max_steps` are the collect defaults when `--obs` / `--max-steps` are not given; `obs_help` lists the
    observation modes the recorder accepts, for `--obs`'s help text.
    """

    recorder: RecorderFactory
    obs: tuple[str, ...] = ("state",)
    max_steps: int = 300
    obs_help: str = "state"


def _frozen(mapping: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(mapping))


@dataclass(frozen=True)
class EnvSpec:
    """Everything an environment contributes; register it with `fm_policy.envs.register_env(spec)`.

    name: registry name used by configs and `--env` (e.g. `pusht`, `robomimic/lift`).
    make: `make(**kwargs) -> gym.Env`; import the simulator inside it, not at module level.
    description: one line for listings and help texts.
    obs_kwargs: see `ObsKwargs`; None means the env has a single observation layout.
    metrics: see `EnvMetrics`; None means only the generic score / success.
    collection: the scripted expert and collect defaults; None means `fm-policy collect` does not support the env.
    derived_keys / renamed_keys: dataset-key recipes, observation key -> how to build it from stored fields, and
        observation key -> stored key for plain renames (Push-T: `image` <- `img`). `fm_policy.datasets.policy_data`
        uses the union over all registered specs, so a key name may be defined by one recipe only (`register_env`
        refuses a conflicting one).
    options: env-specific CLI options (see `EnvOption`).
    packages: distributions whose versions define the simulator; expert stores and eval reports record them.
    """

    name: str
    make: EnvFactory
    description: str = ""
    obs_kwargs: ObsKwargs | None = None
    metrics: EnvMetrics | None = None
    collection: ExpertCollection | None = None
    derived_keys: Mapping[str, DerivedKey] = field(default_factory=dict)
    renamed_keys: Mapping[str, str] = field(default_factory=dict)
    options: tuple[EnvOption, ...] = ()
    packages: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ValueError(f"env name must be a non-empty str, got {self.name!r}")
        if not callable(self.make):
            raise TypeError(f"factory for env '{self.name}' must be callable, got {self.make!r}")
        # read-only views: a registered spec is shared by every reader and must not change under them
        object.__setattr__(self, "derived_keys", _frozen(self.derived_keys))
        object.__setattr__(self, "renamed_keys", _frozen(self.renamed_keys))
        object.__setattr__(self, "options", tuple(self.options))
        object.__setattr__(self, "packages", tuple(self.packages))
        for command in ("collect", "eval"):
            flags = [o.flag for o in self.options_for(command)]
            if len(flags) != len(set(flags)):
                raise ValueError(f"env '{self.name}' declares a flag twice for {command}: {flags}")
        if any("collect" in o.commands for o in self.options) and self.collection is None:
            raise ValueError(f"env '{self.name}' declares collect options but no expert collection")

    def options_for(self, command: str) -> tuple[EnvOption, ...]:
        """The options this env adds to `fm-policy <command>` (`collect` or `eval`)."""
        return tuple(o for o in self.options if command in o.commands)
