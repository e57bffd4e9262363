"""Push-T's `EnvSpec`: what the package needs to know about Push-T, without importing gym-pusht.

Kept apart from `pusht.py` because that module imports gym-pusht (pygame, pymunk) at the top, and specs are read
whenever the CLI parser is built or envs are listed.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from .spec import DerivedKey, EnvOption, EnvSpec, ExpertCollection, csv_list

if TYPE_CHECKING:
    import gymnasium as gym
    import numpy as np
    from fm_policy.datasets.recorders import EpisodeRecorder


def _make(**kwargs: Any) -> gym.Env:
    from .pusht import PushTEnv

    return PushTEnv(**kwargs)


def _obs_kwargs(obs_keys: list[str]) -> dict[str, Any]:
    from .pusht import obs_mode_for_keys

    return {"obs_mode": obs_mode_for_keys(obs_keys)}


def _recorder(**kwargs: Any) -> EpisodeRecorder:
    from fm_policy.datasets.recorders import PushTRecorder

    return PushTRecorder(**kwargs)


def _keypoints(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """diffusion_policy's 20-D low-dim observation: the 9 stored block keypoints flattened + the agent position."""
    import numpy as np

    from .pusht import lowdim_keypoint_obs

    return lowdim_keypoint_obs(arrays["keypoint"], arrays["state"][..., :2]).astype(np.float32)


def _agent_pos(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    """The image-mode low-dim key: the agent position, the first two entries of the stored `state` (float32)."""
    import numpy as np

    return np.asarray(arrays["state"][..., :2], dtype=np.float32)


def parse_goal(value: str) -> list[float]:
    """`X,Y,ANGLE` -> a Push-T goal pose (pixels, pixels, radians), as the `goal_pose` kwarg takes it."""
    try:
        goal = [float(v) for v in csv_list(value)]
    except ValueError:
        raise ValueError(f"expected X,Y,ANGLE numbers, e.g. 190,310,-1.0; got '{value}'") from None
    if len(goal) != 3:
        raise ValueError(f"expected 3 numbers X,Y,ANGLE, e.g. 190,310,-1.0; got '{value}'")
    return goal


SPEC = EnvSpec(
    name="pusht",
    description="Push-T (gym-pusht): push a T-shaped block onto its goal pose with a point agent",
    make=_make,
    obs_kwargs=_obs_kwargs,
    collection=ExpertCollection(
        recorder=_recorder, obs=("state", "keypoints"), max_steps=300, obs_help="state, keypoints, image",
    ),
    # stores keep diffusion_policy's Push-T field layout: `keypoint` (9, 2) and `img`
    # image mode: `image` (96, 96, 3) uint8 <- `img`, `agent_pos` (2,) <- `state[:, :2]` (diffusion_policy's setting)
    derived_keys={"keypoints": DerivedKey(sources=("keypoint", "state"), build=_keypoints),
                  "agent_pos": DerivedKey(sources=("state",), build=_agent_pos)},
    renamed_keys={"image": "img"},
    options=(
        EnvOption("--goal", "goal_pose", parse_goal, metavar="X,Y,ANGLE",
                  help="Push-T variant: the T's goal pose (default: gym-pusht's 256,256,0.7854)"),
    ),
    packages=("gym-pusht", "pymunk", "gymnasium"),
)
