"""The robomimic tasks' `EnvSpec`s (`robomimic/lift`, `/can`, `/square`), without importing robosuite or MuJoCo.

One spec per task because configs and `--env` name the task; the specs share everything but the task name.
"""

from __future__ import annotations

from functools import partial
from typing import TYPE_CHECKING, Any

from .spec import EnvSpec, ExpertCollection

if TYPE_CHECKING:
    import gymnasium as gym
    from fm_policy.datasets.recorders import EpisodeRecorder

TASK_DESCRIPTIONS: dict[str, str] = {
    "lift": "robomimic Lift (robosuite): pick up a cube",
    "can": "robomimic PickPlaceCan (robosuite): move a can into its bin",
    "square": "robomimic NutAssemblySquare (robosuite): fit the square nut onto its peg",
}
"""The tasks with a scripted expert; `envs/robomimic.py`'s `TASKS` maps them to robosuite env names."""


def _make(task: str, **kwargs: Any) -> gym.Env:
    from .robomimic import RobomimicEnv

    return RobomimicEnv(task=task, **kwargs)


def _obs_kwargs(obs_keys: list[str]) -> dict[str, Any]:
    from .robomimic import obs_kwargs_for_keys

    return obs_kwargs_for_keys(obs_keys)


def _recorder(task: str, **kwargs: Any) -> EpisodeRecorder:
    from fm_policy.datasets.recorders import RobomimicRecorder

    return RobomimicRecorder(task, **kwargs)


SPECS: tuple[EnvSpec, ...] = tuple(
    EnvSpec(
        name=f"robomimic/{task}",
        description=description,
        make=partial(_make, task),
        obs_kwargs=_obs_kwargs,
        collection=ExpertCollection(recorder=partial(_recorder, task), obs=("state",), max_steps=400,
                                    obs_help="state and <camera>_image, e.g. agentview_image"),
        packages=("robosuite", "robomimic", "mujoco"),
    )
    for task, description in TASK_DESCRIPTIONS.items()
)
