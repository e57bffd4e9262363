"""Franka Kitchen's `EnvSpec`, without importing gymnasium-robotics or MuJoCo (see `pusht_spec.py` for why apart)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .spec import EnvOption, EnvSpec, ExpertCollection, csv_list

if TYPE_CHECKING:
    import gymnasium as gym
    from fm_policy.datasets.recorders import EpisodeRecorder

_TASK_NAMES_HELP = ("any of microwave, kettle, light switch, slide cabinet, bottom burner, top burner, hinge cabinet "
                    "(default: microwave,kettle,light switch,slide cabinet)")


def _make(**kwargs: Any) -> gym.Env:
    from .kitchen import KitchenEnv

    return KitchenEnv(**kwargs)


def _obs_kwargs(obs_keys: list[str]) -> dict[str, Any]:
    from .kitchen import check_obs_keys

    check_obs_keys(obs_keys)
    return {}


def _metrics(episodes: list[Any], env_kwargs: dict[str, Any]) -> dict[str, Any]:
    from .kitchen import kitchen_metrics

    return kitchen_metrics([e.total_reward for e in episodes], env_kwargs)


def _recorder(**kwargs: Any) -> EpisodeRecorder:
    from fm_policy.datasets.recorders import KitchenRecorder

    return KitchenRecorder(**kwargs)


SPEC = EnvSpec(
    name="kitchen",
    description="Franka Kitchen (gymnasium-robotics FrankaKitchen-v1): complete a sequence of kitchen tasks",
    make=_make,
    obs_kwargs=_obs_kwargs,
    metrics=_metrics,
    collection=ExpertCollection(recorder=_recorder, obs=("state",), max_steps=280, obs_help="state"),
    options=(
        EnvOption("--tasks", "tasks", csv_list, metavar="T1,T2,...", commands=("collect",),
                  help=f"tasks in the order the expert does them; {_TASK_NAMES_HELP}"),
        EnvOption("--task-order", "task_order", str, choices=("given", "shuffle"), commands=("collect",),
                  help="the expert follows --tasks in order (given, default) or a random order per episode"),
        EnvOption("--subset-size", "subset_size", int, commands=("collect",),
                  help="the expert does a random subset of this many of --tasks (kitchen-partial style); success = "
                       "all of that subset done"),
        EnvOption("--tasks", "tasks", csv_list, metavar="T1,T2,...", commands=("eval",),
                  help=f"tasks scored, p1..pK; {_TASK_NAMES_HELP}"),
    ),
    packages=("gymnasium-robotics", "mujoco", "gymnasium"),
)
