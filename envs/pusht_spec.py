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


def store_goal_pose(attrs: Mapping[str, Any]) -> list[float]:
    """The one goal (x, y, angle) a Push-T store's demos share: the one the collector recorded (`source.goal_pose`),
    else gym-pusht's default (256, 256, pi/4), the goal of diffusion_policy's human demos, whose store has no
    attributes. A store that records several goals, or another env, has no single goal, so it is refused (UserError)
    rather than given a wrong one."""
    from fm_policy.errors import UserError

    from .pusht import DEFAULT_GOAL_POSE

    source = attrs.get("source") if isinstance(attrs.get("source"), Mapping) else {}
    env = source.get("env")
    if env not in (None, "pusht"):
        raise UserError(f"the store is not a Push-T store (env '{env}'), so it has no Push-T goal")
    poses = source.get("goal_poses")
    if poses is not None and len(poses) > 1:
        raise UserError(f"the store was collected with {len(poses)} goals (goal_poses), so the goal of each step is "
                        "unknown")
    return [float(v) for v in (source.get("goal_pose") or (poses[0] if poses else None) or DEFAULT_GOAL_POSE)]


def _goal(arrays: Mapping[str, np.ndarray], attrs: Mapping[str, Any]) -> np.ndarray:
    """The `goal` observation for a store that does not hold one: the store's one goal (`store_goal_pose`), for
    every step."""
    import numpy as np

    from fm_policy.errors import UserError

    from .pusht import goal_keypoint_obs

    try:
        goal = store_goal_pose(attrs)
    except UserError as exc:
        raise UserError(f"no `goal` key stored, and {exc}; recollect it (collected stores now hold `goal`)") from None
    row = goal_keypoint_obs(np.asarray(goal, dtype=np.float64)).astype(np.float32)
    return np.tile(row, (len(arrays["state"]), 1))


def parse_goal(value: str) -> list[float]:
    """`X,Y,ANGLE` -> a Push-T goal pose (pixels, pixels, radians), as the `goal_pose` kwarg takes it."""
    try:
        goal = [float(v) for v in csv_list(value)]
    except ValueError:
        raise ValueError(f"expected X,Y,ANGLE numbers, e.g. 190,310,-1.0; got '{value}'") from None
    if len(goal) != 3:
        raise ValueError(f"expected 3 numbers X,Y,ANGLE, e.g. 190,310,-1.0; got '{value}'")
    return goal


def parse_goals(value: str) -> list[list[float]]:
    """`X,Y,A;X,Y,A;...` -> a Push-T goal set (the `goal_poses` kwarg): one goal per episode, chosen by env seed."""
    poses = [p for p in (part.strip() for part in value.split(";")) if p]
    if not poses:
        raise ValueError(f"expected goals X,Y,ANGLE separated by ';', e.g. '256,256,0.785;190,310,-1.0'; got '{value}'")
    try:
        return [parse_goal(p) for p in poses]
    except ValueError as exc:
        raise ValueError(f"in goal set '{value}' (goals separated by ';'): {exc}") from None


def parse_action_noise(value: str) -> float:
    import math

    try:
        sigma = float(value)
    except ValueError:
        raise ValueError(f"expected a number of pixels, got '{value}'") from None
    if not math.isfinite(sigma) or sigma < 0:
        raise ValueError(f"must be a finite number of pixels >= 0, got {value}")
    return sigma


SPEC = EnvSpec(
    name="pusht",
    description="Push-T (gym-pusht): push a T-shaped block onto its goal pose with a point agent",
    make=_make,
    obs_kwargs=_obs_kwargs,
    collection=ExpertCollection(
        recorder=_recorder, obs=("state", "keypoints"), max_steps=300, obs_help="state, keypoints, image, goal",
    ),
    # stores keep diffusion_policy's Push-T field layout: `keypoint` (9, 2) and `img`
    # image mode: `image` (96, 96, 3) uint8 <- `img`, `agent_pos` (2,) <- `state[:, :2]` (diffusion_policy's setting)
    # `goal` (18,) is stored by the collector; stores without it (human demos) get their one recorded/default goal
    derived_keys={"keypoints": DerivedKey(sources=("keypoint", "state"), build=_keypoints),
                  "agent_pos": DerivedKey(sources=("state",), build=_agent_pos),
                  "goal": DerivedKey(sources=("state",), build=_goal, uses_attrs=True)},
    renamed_keys={"image": "img"},
    options=(
        EnvOption("--goal", "goal_pose", parse_goal, metavar="X,Y,ANGLE",
                  help="Push-T variant: the T's goal pose (default: gym-pusht's 256,256,0.7854)"),
        EnvOption("--action-noise", "action_noise", parse_action_noise, metavar="PX", commands=("collect",),
                  help="DART-style collection: Gaussian noise (std, px) added to the executed action; `action` keeps "
                       "the expert's target, `executed_action` what ran (default 0)"),
        EnvOption("--goals", "goal_poses", parse_goals, metavar="'X,Y,A;X,Y,A;...'",
                  help="Push-T goal set: each episode's goal is goal number (env seed mod count); add the `goal` "
                       "observation key to let a policy see it"),
    ),
    packages=("gym-pusht", "pymunk", "gymnasium"),
)
