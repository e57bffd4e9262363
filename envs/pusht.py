"""Push-T (gym-pusht 0.1.8) behind a Dict-observation gymnasium API with a configurable goal.

Why a wrapper and not gym-pusht directly:
- every policy in this package reads Dict observations with fixed keys (`state`, `keypoints`, `image`,
  `agent_pos`), while gym-pusht returns a bare array or differently named dicts depending on `obs_type`;
- diffusion_policy's low-dim Push-T observation (9 T keypoints + agent, 20-D) does not exist in gym-pusht (its
  `environment_state` is the 8 polygon vertices), so the keypoints are computed here, from ONE frozen local map that
  the dataset collector also uses (`block_keypoints`), so stored and live observations match bit for bit;
- gym-pusht hard-codes the goal pose in `_setup()`, which reruns on every reset; a Push-T variant needs another goal
  for coverage, reward, success and the drawn goal region alike (`PushTSim`), and a multi-goal task a goal per
  episode (`goal_poses`, chosen from the reset seed) that a goal-aware policy can see (`obs_mode` "goal");
- actions are validated: gym-pusht silently integrates NaN into the physics and never clips.

The true simulator stays reachable as `PushTEnv.sim` (a `gym_pusht.envs.pusht.PushTEnv` subclass) because the
planning expert reads the agent velocity and the exact block pose from it.
"""

from __future__ import annotations

import os

os.environ.setdefault("SDL_VIDEODRIVER", "dummy")  # headless pygame; must precede the gym_pusht/pygame import
os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import math  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from gym_pusht.envs.pusht import PushTEnv as _GymPushTEnv  # noqa: E402
from gymnasium import spaces  # noqa: E402

from fm_policy.errors import UserError

from .actions import checked_action  # noqa: E402

WORKSPACE_SIZE = 512.0
"""Side of the square workspace in pixels; actions and positions live in [0, 512]."""
DEFAULT_GOAL_POSE = (256.0, 256.0, math.pi / 4)
"""gym-pusht's (and diffusion_policy's) goal: (x, y, angle) of the T's body origin."""
SUCCESS_THRESHOLD = 0.95
"""Success = coverage (goal-T area covered by the block / T area) strictly above this."""
T_CENTER_OF_GRAVITY = (0.0, 45.0)
"""The T's centre of gravity in its local frame; pymunk rotates the body about it, not about the origin."""
OBS_MODES = ("state", "keypoints", "image", "goal")
N_SUBSTEPS = 10
"""Physics substeps per env step (100 Hz physics, 10 Hz control)."""

# The 9 block keypoints in the T's local frame (pixels; origin = middle of the top edge of the bar, +y along the
# stem). These are exactly the points diffusion_policy's PushTKeypointsEnv uses: its
# `genenerate_keypoint_manager_params()` calls `PymunkKeypointManager.create_from_pusht_env(n_block_kps=9, seed=0)`,
# which renders the T at pose (256, 300, 0), takes every non-white pixel (outline included, hence the points at
# y = -1.x), runs farthest-point sampling from a random start pixel drawn with `np.random.default_rng(0)` and adds a
# U(0, 1) jitter from the same generator. `derive_block_local_keypoints()` below reruns that procedure with
# gym-pusht's identical drawing code and reproduces these values (checked by a test); an independent public
# re-implementation lists the same numbers to 6 decimals. Frozen here so nothing depends on pygame's rasteriser.
BLOCK_LOCAL_KEYPOINTS = np.array(
    [
        [9.269786713763871, 90.04097352393619],
        [-60.983472364471474, -1.1867297607997276],
        [60.91275557727772, -1.3933642242328201],
        [-0.2705034390160016, 25.54362499146542],
        [-14.064927576212233, 122.81585355412153],
        [39.002738500170146, 32.857404276587566],
        [-39.966414424694534, 32.729655446429945],
        [-16.82434437939744, 62.86317892234989],
        [23.54146122024909, -1.7002881094626152],
    ],
    dtype=np.float64,
)
BLOCK_LOCAL_KEYPOINTS.setflags(write=False)
N_BLOCK_KEYPOINTS = len(BLOCK_LOCAL_KEYPOINTS)
KEYPOINT_OBS_DIM = 2 * N_BLOCK_KEYPOINTS + 2


def block_keypoints(block_pose: np.ndarray | Sequence[float]) -> np.ndarray:
    """World positions (..., 9, 2) of the block keypoints for block pose(s) (..., 3) = (x, y, angle).

    The pose is the pymunk body's origin and angle (`info["block_pose"]`, or `block.position` / `block.angle`),
    not the centre of gravity. Vectorised over leading dims so a collector can convert a whole episode at once; the
    env calls this same function, so stored and live keypoints are identical.
    """
    pose = np.asarray(block_pose, dtype=np.float64)
    if pose.shape[-1:] != (3,):
        raise ValueError(f"block_pose must have shape (..., 3) = (x, y, angle), got shape {pose.shape}")
    cos = np.cos(pose[..., 2])[..., None]
    sin = np.sin(pose[..., 2])[..., None]
    lx, ly = BLOCK_LOCAL_KEYPOINTS[:, 0], BLOCK_LOCAL_KEYPOINTS[:, 1]
    x = cos * lx - sin * ly + pose[..., 0, None]
    y = sin * lx + cos * ly + pose[..., 1, None]
    return np.stack([x, y], axis=-1)


def lowdim_keypoint_obs(keypoint: np.ndarray, agent_pos: np.ndarray) -> np.ndarray:
    """diffusion_policy's 20-D low-dim Push-T observation: [kp0_x, kp0_y, ..., kp8_x, kp8_y, agent_x, agent_y].

    keypoint (..., 9, 2) and agent_pos (..., 2) share their leading dims; the result is (..., 20) in their common
    dtype (the env casts to float32).
    """
    keypoint = np.asarray(keypoint)
    agent_pos = np.asarray(agent_pos)
    if keypoint.shape[-2:] != (N_BLOCK_KEYPOINTS, 2):
        raise ValueError(f"keypoint must have shape (..., {N_BLOCK_KEYPOINTS}, 2), got {keypoint.shape}")
    if agent_pos.shape[-1:] != (2,) or agent_pos.shape[:-1] != keypoint.shape[:-2]:
        raise ValueError(
            f"agent_pos must have shape {keypoint.shape[:-2] + (2,)} to match keypoint {keypoint.shape}, "
            f"got {agent_pos.shape}"
        )
    flat = keypoint.reshape(keypoint.shape[:-2] + (2 * N_BLOCK_KEYPOINTS,))
    return np.concatenate([flat, agent_pos.astype(flat.dtype, copy=False)], axis=-1)


def reset_state_for_pose(agent_pos: Sequence[float], block_pose: Sequence[float]) -> np.ndarray:
    """The `reset_to_state` vector that puts the block at exactly `block_pose` (origin x, y, angle).

    gym-pusht's `reset_to_state` keeps the legacy order (position, then angle); since pymunk rotates about the centre
    of gravity (0, 45), the origin then lands away from `state[2:4]` unless the angle is 0. This inverts that: the
    requested origin minus the CoG offset at angle 0 (where the body sits after `_setup`), plus the offset rotated.
    """
    x, y, angle = (float(v) for v in block_pose)
    cx, cy = T_CENTER_OF_GRAVITY
    cos, sin = math.cos(angle), math.sin(angle)
    bx = x - cx + (cos * cx - sin * cy)
    by = y - cy + (sin * cx + cos * cy)
    return np.array([float(agent_pos[0]), float(agent_pos[1]), bx, by, angle], dtype=np.float64)


def derive_block_local_keypoints(n_keypoints: int = N_BLOCK_KEYPOINTS, seed: int = 0) -> np.ndarray:
    """Recompute the local keypoint map with diffusion_policy's procedure (kept for provenance and a test).

    Renders the T alone at (256, 300, 0) with gym-pusht's DrawOptions, collects the local coordinates of all
    non-white pixels in row-major order, draws the start pixel with `default_rng(seed).choice`, runs farthest-point
    sampling and adds U(0, 1) jitter from the same generator.
    """
    import pygame
    import pymunk
    from gym_pusht.envs.pymunk_override import DrawOptions

    space = pymunk.Space()
    body, _ = _GymPushTEnv.add_tee(space, (256, 300), 0)
    screen = pygame.Surface((512, 512))
    screen.fill(pygame.Color("white"))
    space.debug_draw(DrawOptions(screen))
    img = pygame.surfarray.array3d(screen).transpose(1, 0, 2)
    rows, cols = np.nonzero((img != 255).any(axis=-1))
    local = np.stack([cols, rows], axis=-1).astype(np.float64) - np.asarray(body.position)  # angle is 0

    rng = np.random.default_rng(seed)
    chosen = [int(rng.choice(len(local)))]
    min_dist = np.linalg.norm(local - local[chosen[0]], axis=-1)
    for _ in range(n_keypoints - 1):
        nxt = int(np.argmax(min_dist))
        chosen.append(nxt)
        min_dist = np.minimum(min_dist, np.linalg.norm(local - local[nxt], axis=-1))
    return local[chosen] + rng.uniform(0, 1, size=(n_keypoints, 2))


GOAL_OBS_DIM = 2 * N_BLOCK_KEYPOINTS
_T_REACH = float(np.ceil(np.linalg.norm(BLOCK_LOCAL_KEYPOINTS, axis=1).max()))
"""Farthest keypoint from the T's origin (px): goal keypoints lie within this of a goal origin in the workspace."""


def goal_keypoint_obs(goal_pose: np.ndarray | Sequence[float]) -> np.ndarray:
    """The `goal` observation (..., 18): the 9 block keypoints placed at the goal pose(s) (..., 3), flattened.

    Why keypoints and not (x, y, cos, sin): they are in the frame, units and order of the first 18 entries of the
    `keypoints` observation, so "how far is the block from its goal" is a per-entry difference of two inputs on the
    same scale, there is no angle wrap-around, and every dimension is a pixel coordinate spanning a comparable
    range, so per-dimension min-max / z-score normalisation treats them alike (a pose would mix two pixel dims with
    two unit-circle dims, and the network would have to learn the T's geometry to compare it with the block's
    keypoints). A constant goal (single-goal data) is a constant input, which the normaliser only centres.
    """
    kp = block_keypoints(goal_pose)
    return kp.reshape(kp.shape[:-2] + (GOAL_OBS_DIM,))


def _validated_goal(goal_pose: Sequence[float] | None, name: str = "goal_pose") -> np.ndarray | None:
    if goal_pose is None:
        return None
    try:
        goal = np.asarray(goal_pose, dtype=np.float64)
    except (TypeError, ValueError):
        goal = None
    if goal is None or goal.shape != (3,) or not np.all(np.isfinite(goal)):
        raise UserError(f"{name} must be 3 finite numbers (x, y, angle), got {goal_pose!r}")
    if not (0.0 <= goal[0] <= WORKSPACE_SIZE and 0.0 <= goal[1] <= WORKSPACE_SIZE):
        raise UserError(f"{name} {goal_pose!r}: x and y must lie in the workspace [0, {WORKSPACE_SIZE:g}]")
    return goal


def _validated_goal_set(goal_poses: Any) -> tuple[tuple[float, float, float], ...] | None:
    """`goal_poses` -> a non-empty tuple of validated (x, y, angle) tuples, or None."""
    if goal_poses is None:
        return None
    if isinstance(goal_poses, (str, bytes)) or not isinstance(goal_poses, (Sequence, np.ndarray)) \
            or len(goal_poses) == 0:
        raise UserError(f"goal_poses must be a non-empty list of (x, y, angle) poses, e.g. "
                        f"[[256, 256, 0.785], [190, 310, -1.0]]; got {goal_poses!r}")
    goals = [_validated_goal(g, name=f"goal_poses[{i}]") for i, g in enumerate(goal_poses)]
    return tuple(tuple(float(v) for v in g) for g in goals)  # type: ignore[union-attr]


class PushTSim(_GymPushTEnv):
    """gym-pusht's env with a configurable goal pose.

    gym-pusht assigns `self.goal_pose` in `_setup()` (run by every reset) and reads it for coverage, reward, success,
    `info["goal_pose"]` and the drawn goal region, so overriding it right after `_setup()` changes all of them. Keeping
    the override in a subclass (not a post-reset patch) means a planner that builds a private copy with
    `type(env.sim)(goal_pose=...)` or re-runs `_setup()` gets the same goal.
    """

    def __init__(self, *args: Any, goal_pose: Sequence[float] | None = None, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.custom_goal_pose = _validated_goal(goal_pose)

    def _setup(self) -> None:
        super()._setup()
        if self.custom_goal_pose is not None:
            self.goal_pose = self.custom_goal_pose.copy()


OBS_KEYS_BY_MODE: dict[str, tuple[str, ...]] = {
    "state": ("state",),
    "keypoints": ("keypoints",),
    "image": ("image", "agent_pos"),
    "goal": ("goal",),
}


def obs_mode_for_keys(obs_keys: Sequence[str]) -> str:
    """The `obs_mode` whose observations include every key in `obs_keys` (e.g. a policy's inputs)."""
    unknown = [k for k in obs_keys if not any(k in keys for keys in OBS_KEYS_BY_MODE.values())]
    if unknown:
        valid = sorted({k for keys in OBS_KEYS_BY_MODE.values() for k in keys})
        raise UserError(f"Push-T has no observation keys {unknown}; it observes {valid}")
    return ",".join(mode for mode, keys in OBS_KEYS_BY_MODE.items() if any(k in obs_keys for k in keys))


def _parse_obs_mode(obs_mode: str | Sequence[str]) -> tuple[str, ...]:
    names = obs_mode.split(",") if isinstance(obs_mode, str) else list(obs_mode)
    names = [n.strip() for n in names if n.strip()]
    unknown = [n for n in names if n not in OBS_MODES]
    if unknown or not names:
        raise UserError(
            f"obs_mode must be one or more of {OBS_MODES} (str, comma-separated, or list), got {obs_mode!r}"
        )
    return tuple(m for m in OBS_MODES if m in names)  # canonical order, duplicates dropped


@dataclass(frozen=True)
class PushTConfig:
    """All knobs of `PushTEnv`; `obs_mode` is normalised to a tuple in canonical order.

    `goal_pose` fixes one goal; `goal_poses` is a goal set, one goal per episode chosen from the reset seed
    (`goal_poses[seed % len(goal_poses)]`: deterministic, and consecutive seeds, as collection and evaluation use,
    cycle through the set evenly). At most one of the two may be given.
    """

    obs_mode: str | Sequence[str] = "state"
    goal_pose: tuple[float, float, float] | None = None  # None = gym-pusht's (256, 256, pi/4)
    goal_poses: Sequence[Sequence[float]] | None = None  # a goal set; normalised to a tuple of 3-tuples
    max_episode_steps: int = 300
    image_size: int = 96  # side of the `image` observation
    render_size: int = 256  # side of `render()` frames (videos)
    render_action: bool = False  # draw the last action marker in `render()` (never in observations)
    obs_modes: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "obs_modes", _parse_obs_mode(self.obs_mode))
        goal = _validated_goal(self.goal_pose)
        object.__setattr__(self, "goal_pose", None if goal is None else tuple(float(v) for v in goal))
        object.__setattr__(self, "goal_poses", _validated_goal_set(self.goal_poses))
        if self.goal_pose is not None and self.goal_poses is not None:
            raise UserError("give either goal_pose (one goal) or goal_poses (a goal per episode), not both")
        for name in ("max_episode_steps", "image_size", "render_size"):
            value = getattr(self, name)
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"{name} must be a positive int, got {value!r}")


def _box(low: float | np.ndarray, high: float | np.ndarray, shape: tuple[int, ...], dtype: type) -> spaces.Box:
    return spaces.Box(
        low=np.broadcast_to(np.asarray(low, dtype), shape), high=np.broadcast_to(np.asarray(high, dtype), shape),
        dtype=dtype,
    )


def _observation_space(modes: tuple[str, ...], image_size: int) -> spaces.Dict:
    ws = WORKSPACE_SIZE
    subspaces: dict[str, spaces.Space] = {}
    if "state" in modes:
        subspaces["state"] = _box([0, 0, 0, 0, 0], [ws, ws, ws, ws, 2 * np.pi], (5,), np.float32)
    if "keypoints" in modes:
        subspaces["keypoints"] = _box(0.0, ws, (KEYPOINT_OBS_DIM,), np.float32)
    if "image" in modes:
        subspaces["image"] = _box(0, 255, (image_size, image_size, 3), np.uint8)
        subspaces["agent_pos"] = _box(0.0, ws, (2,), np.float32)
    if "goal" in modes:
        subspaces["goal"] = _box(-_T_REACH, ws + _T_REACH, (GOAL_OBS_DIM,), np.float32)
    return spaces.Dict(subspaces)


class PushTEnv(gym.Env):
    """Push-T with Dict observations, validated/clipped actions, a configurable goal and a step limit.

    Observation keys (union over `obs_mode`): `state` (5,) float32 [agent_x, agent_y, block_x, block_y,
    block_angle mod 2pi]; `keypoints` (20,) float32 (`lowdim_keypoint_obs`); `image` (S, S, 3) uint8 plus `agent_pos`
    (2,) float32; `goal` (18,) float32, the episode's goal as keypoints (`goal_keypoint_obs`). Goal: `goal_pose`, or
    one of `goal_poses` per episode, chosen from the reset seed (see `PushTConfig`). Action: absolute agent target
    (x, y) in [0, 512]^2. Reward = clip(coverage / 0.95, 0, 1); terminated on success (coverage > 0.95); truncated
    after `max_episode_steps` steps.
    `info`: coverage, is_success, n_contacts, n_contact_points, block_pose (origin x, y, raw angle), agent_pos,
    agent_vel, goal_pose.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(
        self,
        obs_mode: str | Sequence[str] = "state",
        goal_pose: tuple[float, float, float] | None = None,
        goal_poses: Sequence[Sequence[float]] | None = None,
        max_episode_steps: int = 300,
        image_size: int = 96,
        render_size: int = 256,
        render_action: bool = False,
        render_mode: str | None = "rgb_array",
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"PushTEnv only renders 'rgb_array' frames, got render_mode={render_mode!r}")
        self.config = PushTConfig(
            obs_mode=obs_mode, goal_pose=goal_pose, goal_poses=goal_poses, max_episode_steps=max_episode_steps,
            image_size=image_size,
            render_size=render_size, render_action=render_action,
        )
        self.render_mode = "rgb_array"
        # obs_type="state": the sim's own per-step observation is then just a cheap array we ignore; images are
        # rendered here, once per step, only when asked for.
        self.sim = PushTSim(
            obs_type="state", render_mode="rgb_array", goal_pose=self.config.goal_pose,
            observation_width=image_size, observation_height=image_size,
            visualization_width=render_size, visualization_height=render_size,
        )
        self.observation_space = _observation_space(self.config.obs_modes, image_size)
        self.action_space = spaces.Box(low=0.0, high=WORKSPACE_SIZE, shape=(2,), dtype=np.float32)
        self._elapsed_steps: int | None = None  # None until the first reset
        self._episode_goal: np.ndarray | None = None  # the goal drawn at the last reset (goal set only)

    @property
    def obs_modes(self) -> tuple[str, ...]:
        return self.config.obs_modes

    @property
    def max_episode_steps(self) -> int:
        """Read by `MultiStepWrapper` as its default step limit."""
        return self.config.max_episode_steps

    @property
    def goal_poses(self) -> np.ndarray:
        """The goals this env can draw, (K, 3): the goal set, or the one fixed goal."""
        if self.config.goal_poses is not None:
            return np.array(self.config.goal_poses, dtype=np.float64)
        goal = self.config.goal_pose if self.config.goal_pose is not None else DEFAULT_GOAL_POSE
        return np.array([goal], dtype=np.float64)

    @property
    def goal_pose(self) -> np.ndarray:
        """The current episode's goal (x, y, angle); with a goal set it is chosen by `reset`."""
        if self.config.goal_poses is None:
            return self.goal_poses[0]
        if self._episode_goal is None:
            raise RuntimeError("PushTEnv.goal_pose: with goal_poses the goal is chosen at reset(); call reset() first")
        return self._episode_goal.copy()

    def goal_index_for_seed(self, seed: int) -> int:
        """Index into `goal_poses` of the goal an episode reset with `seed` gets (0 for a single goal)."""
        return int(seed) % len(self.goal_poses)

    @property
    def elapsed_steps(self) -> int:
        return 0 if self._elapsed_steps is None else self._elapsed_steps

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Random initial state from the sim's seeded RNG, or `options={"reset_to_state": [ax, ay, bx, by, angle]}`.

        With `goal_poses` the episode's goal is `goal_poses[seed % K]` (`goal_index_for_seed`), or drawn from the
        env's RNG when no seed is given. `reset_to_state` uses gym-pusht's legacy order (see `reset_state_for_pose`
        to hit an exact block pose), which is what replaying diffusion_policy's recorded states needs.
        """
        super().reset(seed=seed)
        sim_options = None
        if options:
            unknown = set(options) - {"reset_to_state"}
            if unknown:
                raise ValueError(f"PushTEnv.reset supports only the option 'reset_to_state', got {sorted(unknown)}")
            state = options.get("reset_to_state")
            if state is not None:
                state = np.asarray(state, dtype=np.float64)
                if state.shape != (5,) or not np.all(np.isfinite(state)):
                    raise ValueError(
                        f"reset_to_state must be 5 finite numbers [agent_x, agent_y, block_x, block_y, block_angle], "
                        f"got {options['reset_to_state']!r}"
                    )
                sim_options = {"reset_to_state": state}
        if self.config.goal_poses is not None:
            goals = self.goal_poses
            index = self.goal_index_for_seed(seed) if seed is not None else int(self.np_random.integers(len(goals)))
            self._episode_goal = goals[index]
            self.sim.custom_goal_pose = goals[index].copy()  # read by the sim's _setup() during its reset
        self.sim.reset(seed=seed, options=sim_options)
        self._elapsed_steps = 0
        coverage = float(self.sim._get_coverage())
        return self._observe(), self._info(coverage)

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._elapsed_steps is None:
            raise RuntimeError("PushTEnv.step() called before reset()")
        target = self._validate_action(action)
        _, reward, terminated, _, sim_info = self.sim.step(target)
        self._elapsed_steps += 1
        truncated = self._elapsed_steps >= self.config.max_episode_steps
        return self._observe(), float(reward), bool(terminated), truncated, self._info(float(sim_info["coverage"]))

    def render(self) -> np.ndarray:
        """RGB frame (render_size, render_size, 3) uint8 for videos; the action marker only if `render_action`."""
        self._require_reset("render")
        size = self.config.render_size
        return np.ascontiguousarray(
            self.sim._get_img(self.sim._draw(), width=size, height=size, render_action=self.config.render_action)
        )

    def close(self) -> None:
        self.sim.close()

    # -- disturbances (robustness rollouts: fm_policy.eval.disturbances) ---------------------------------------------

    SHOVE_INTERIOR = (7.0, 504.0)
    """Free interior of gym-pusht's walls (segments at 5 and 506, radius 2): shoved bodies must stay inside it."""
    SHOVE_MARGIN = 1.0
    """Clearance (pixels) a shoved block keeps from the walls and from the agent, so pymunk never starts a step with
    interpenetrating shapes (it would resolve them with a violent impulse)."""

    def shove_problem(
        self, block_offset: Sequence[float] = (0.0, 0.0), block_rotation: float = 0.0,
        agent_offset: Sequence[float] = (0.0, 0.0),
    ) -> str | None:
        """Why `shove(...)` with these arguments would be unsafe (a body leaving the walls' interior, the block
        landing on the agent), or None. Pure: the simulator is not touched."""
        self._require_reset("shove_problem")
        cog, angle, agent = self._shoved_poses(block_offset, block_rotation, agent_offset)
        lo, hi = self.SHOVE_INTERIOR
        m = self.SHOVE_MARGIN
        polygons = self._block_polygons(cog, angle)
        corners = np.concatenate(polygons)
        if corners.min() < lo + m or corners.max() > hi - m:
            return f"the block would leave the workspace (corner at {corners.min():.1f}..{corners.max():.1f})"
        if agent.min() < lo or agent.max() > hi:
            return f"the agent would leave the workspace (at {agent[0]:.1f}, {agent[1]:.1f})"
        radius = max(float(getattr(s, "radius", 0.0)) for s in self.sim.agent.shapes)
        gap = min(_point_polygon_distance(agent, poly) for poly in polygons) - radius
        if gap < m:
            return f"the block would touch the agent (gap {gap:.1f} px)"
        return None

    def shove(
        self, block_offset: Sequence[float] = (0.0, 0.0), block_rotation: float = 0.0,
        agent_offset: Sequence[float] = (0.0, 0.0),
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Displace the bodies between two steps, the disturbance of a robustness rollout; returns (obs, info).

        The block is rotated by `block_rotation` (radians) about its centre of gravity, then moved by `block_offset`
        (pixels), so its centre of gravity moves by exactly the offset (and its origin too when the rotation is 0);
        the agent is moved by `agent_offset`. Moved bodies come to rest (zero velocity), since a shove is a
        displacement, not an impulse. A zero offset / rotation leaves that body untouched. Raises UserError when
        `shove_problem` finds the result unsafe; the step counter and the goal are unchanged.
        """
        problem = self.shove_problem(block_offset, block_rotation, agent_offset)
        if problem is not None:
            raise UserError(f"PushTEnv.shove: {problem}")
        cog, angle, agent = self._shoved_poses(block_offset, block_rotation, agent_offset)
        space = self.sim.space
        if np.any(np.asarray(block_offset, dtype=np.float64) != 0) or block_rotation != 0:
            block = self.sim.block
            local_cog = np.asarray(block.center_of_gravity, dtype=np.float64)
            cos, sin = math.cos(angle), math.sin(angle)
            origin = cog - np.array([cos * local_cog[0] - sin * local_cog[1], sin * local_cog[0] + cos * local_cog[1]])
            block.angle = angle  # pymunk keeps the centre of gravity fixed while rotating ...
            block.position = (float(origin[0]), float(origin[1]))  # ... and sets the origin under the new angle
            block.velocity = (0.0, 0.0)
            block.angular_velocity = 0.0
            space.reindex_shapes_for_body(block)
        if np.any(np.asarray(agent_offset, dtype=np.float64) != 0):
            self.sim.agent.position = (float(agent[0]), float(agent[1]))
            self.sim.agent.velocity = (0.0, 0.0)
            space.reindex_shapes_for_body(self.sim.agent)
        return self._observe(), self._info(float(self.sim._get_coverage()))

    def _shoved_poses(
        self, block_offset: Sequence[float], block_rotation: float, agent_offset: Sequence[float]
    ) -> tuple[np.ndarray, float, np.ndarray]:
        """(block centre of gravity in the world, block angle, agent position) after the shove."""
        offsets = []
        for name, value in (("block_offset", block_offset), ("agent_offset", agent_offset)):
            arr = np.asarray(value, dtype=np.float64)
            if arr.shape != (2,) or not np.all(np.isfinite(arr)):
                raise UserError(f"PushTEnv.shove: {name} must be 2 finite numbers (dx, dy), got {value!r}")
            offsets.append(arr)
        if not math.isfinite(float(block_rotation)):
            raise UserError(f"PushTEnv.shove: block_rotation must be finite, got {block_rotation!r}")
        block = self.sim.block
        cog = np.asarray(block.local_to_world(block.center_of_gravity), dtype=np.float64) + offsets[0]
        agent = np.asarray(self.sim.agent.position, dtype=np.float64) + offsets[1]
        return cog, float(block.angle) + float(block_rotation), agent

    def _block_polygons(self, cog: np.ndarray, angle: float) -> list[np.ndarray]:
        """World vertices of each convex piece of the T with its centre of gravity at `cog` and angle `angle`."""
        block = self.sim.block
        local_cog = np.asarray(block.center_of_gravity, dtype=np.float64)
        rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
        return [
            (np.asarray([tuple(v) for v in shape.get_vertices()], dtype=np.float64) - local_cog) @ rot.T + cog
            for shape in block.shapes
        ]

    # -- internals -------------------------------------------------------------------------------------------------

    def _require_reset(self, what: str) -> None:
        if self._elapsed_steps is None:
            raise RuntimeError(f"PushTEnv.{what}() called before reset()")

    @staticmethod
    def _validate_action(action: Any) -> np.ndarray:
        return checked_action(action, 2, "PushTEnv", "target (x, y)", 0.0, WORKSPACE_SIZE)

    def _block_pose(self) -> np.ndarray:
        block = self.sim.block
        return np.array([block.position.x, block.position.y, block.angle], dtype=np.float64)

    def _observe(self) -> dict[str, np.ndarray]:
        agent = np.array(self.sim.agent.position, dtype=np.float64)
        obs: dict[str, np.ndarray] = {}
        if "state" in self.obs_modes:
            pose = self._block_pose()
            obs["state"] = np.array([agent[0], agent[1], pose[0], pose[1], pose[2] % (2 * np.pi)], dtype=np.float32)
        if "keypoints" in self.obs_modes:
            obs["keypoints"] = lowdim_keypoint_obs(block_keypoints(self._block_pose()), agent).astype(np.float32)
        if "image" in self.obs_modes:
            size = self.config.image_size
            img = self.sim._get_img(self.sim._draw(), width=size, height=size, render_action=False)
            obs["image"] = np.ascontiguousarray(img, dtype=np.uint8)
            obs["agent_pos"] = agent.astype(np.float32)
        if "goal" in self.obs_modes:
            obs["goal"] = goal_keypoint_obs(self.sim.goal_pose).astype(np.float32)
        return {key: obs[key] for key in self.observation_space.spaces}

    def _info(self, coverage: float) -> dict[str, Any]:
        # gym-pusht's own `n_contacts` divides by 1000 instead of the 10 substeps (a bug), so it is recomputed here
        # the way diffusion_policy does: contacts per substep, rounded up.
        n_points = int(self.sim.n_contact_points)
        return {
            "coverage": coverage,
            "is_success": coverage > SUCCESS_THRESHOLD,
            "n_contacts": int(math.ceil(n_points / N_SUBSTEPS)),
            "n_contact_points": n_points,
            "block_pose": self._block_pose(),
            "agent_pos": np.array(self.sim.agent.position, dtype=np.float64),
            "agent_vel": np.array(self.sim.agent.velocity, dtype=np.float64),
            "goal_pose": np.array(self.sim.goal_pose, dtype=np.float64),
        }


def _point_polygon_distance(point: np.ndarray, polygon: np.ndarray) -> float:
    """Distance from `point` to the convex `polygon` (vertices in order, either winding); 0 inside."""
    edges = np.roll(polygon, -1, axis=0) - polygon
    rel = point - polygon
    cross = edges[:, 0] * rel[:, 1] - edges[:, 1] * rel[:, 0]
    if np.all(cross >= 0) or np.all(cross <= 0):
        return 0.0
    t = np.clip(np.einsum("ij,ij->i", rel, edges) / np.einsum("ij,ij->i", edges, edges), 0.0, 1.0)
    return float(np.min(np.linalg.norm(rel - t[:, None] * edges, axis=1)))
