"""Franka Kitchen (gymnasium-robotics `FrankaKitchen-v1`) behind the package's Dict-observation API.

Why a wrapper and not `gym.make("FrankaKitchen-v1")`:
- every policy here reads Dict observations with fixed keys; Kitchen's own observation is a nested goal dict whose
  `observation` array is reused (and rewritten) by the env, so it is copied into `{"state": float32 (59,)}`;
- task completion is the metric (diffusion_policy's p_n), so `info` carries it in a form that survives the harness's
  process boundary (`n_completed`, `is_success`, one `completed/<task>` flag per task) plus the ordered list;
- `reward` is the number of tasks completed in that step, so the sum over an episode is the task count, whatever the
  harness aggregates (the env is always built with `remove_task_when_completed=True`, which makes that hold);
- rendering uses a private `mujoco.Renderer` with shadows, reflections and skybox off: software (EGL/OSMesa) frames
  drop from ~1 s to well under 0.1 s. The renderer (a GL context) is created on the first `render()`, i.e. inside the
  process that owns the env, never in a parent that forks or spawns env workers;
- the step limit is counted here (default 280, diffusion_policy's and gymnasium-robotics'), not by a TimeLimit.

Observation `state` (59,): robot qpos 9, robot qvel 9, object qpos 21, object qvel 20, with the env's uniform
observation noise (`robot_noise_ratio` 0.01, `object_noise_ratio` 0.0005 by default; diffusion_policy's runner used
0.1 for the robot). This is the D4RL/Minari layout; it is not diffusion_policy's 60-D relay-policy-learning vector.
Action (9,): joint velocities in [-1, 1] (the env scales by 2 rad/s and integrates over dt = 0.08 s).

The simulator is reachable as `KitchenEnv.sim` (gymnasium-robotics' `KitchenEnv`): the scripted expert reads the
model's sites and joints and the true joint state from it.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")  # headless rendering; must precede the first mujoco GL import

from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import gymnasium as gym  # noqa: E402
import numpy as np  # noqa: E402
from gymnasium import spaces  # noqa: E402

from fm_policy.errors import UserError

from .actions import checked_action  # noqa: E402

ALL_TASKS: tuple[str, ...] = (
    "microwave", "kettle", "light switch", "slide cabinet", "bottom burner", "top burner", "hinge cabinet",
)
"""The seven FrankaKitchen-v1 tasks. Order: D4RL kitchen-complete's four first, then the rest."""
COMPLETE_TASKS: tuple[str, ...] = ("microwave", "kettle", "light switch", "slide cabinet")
"""D4RL's kitchen-complete sequence (and the acceptance benchmark's)."""
STATE_DIM = 59
ACTION_DIM = 9
DEFAULT_MAX_EPISODE_STEPS = 280
CONTROL_DT = 0.08
"""Seconds per env step (frame_skip 40 x 2 ms): 12.5 Hz control."""

# Camera of gymnasium-robotics' default view (franka_env.DEFAULT_CAMERA_CONFIG), repeated here because the private
# renderer below does not go through gymnasium's MujocoRenderer.
_CAMERA = {"distance": 2.2, "azimuth": 70.0, "elevation": -35.0, "lookat": (-0.2, 0.5, 2.0)}


def parse_tasks(tasks: str | Sequence[str] | None) -> tuple[str, ...]:
    """Task names from a list or a comma-separated string (`"microwave,kettle"`); None means all seven.

    Order is kept (it is the order a sequence expert follows); duplicates and unknown names are errors because a
    typo would otherwise silently shrink the benchmark.
    """
    if tasks is None:
        return ALL_TASKS
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks)
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise UserError(f"tasks must name at least one of {list(ALL_TASKS)}, got {tasks!r}")
    unknown = [n for n in names if n not in ALL_TASKS]
    if unknown:
        raise UserError(f"unknown Kitchen task(s) {unknown}; choose from {list(ALL_TASKS)}")
    if len(set(names)) != len(names):
        raise UserError(f"Kitchen tasks must be distinct, got {names}")
    return tuple(names)


def n_tasks_for(env_kwargs: dict[str, Any] | None) -> int:
    """Number of tasks an env built with `env_kwargs` scores (for p_1..p_K); no simulator import. Without a "tasks"
    kwarg the env scores its default, COMPLETE_TASKS (not all seven)."""
    tasks = (env_kwargs or {}).get("tasks", COMPLETE_TASKS)
    return len(parse_tasks(tasks))


@dataclass(frozen=True)
class KitchenConfig:
    """All knobs of `KitchenEnv`; `tasks` is normalised to a tuple."""

    tasks: str | Sequence[str] | None = COMPLETE_TASKS
    max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS
    robot_noise_ratio: float = 0.01
    object_noise_ratio: float = 0.0005
    terminate_on_tasks_completed: bool = True
    render_size: int = 256
    task_tuple: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_tuple", parse_tasks(self.tasks))
        object.__setattr__(self, "tasks", self.task_tuple)
        for name in ("max_episode_steps", "render_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"{name} must be a positive int, got {value!r}")
        for name in ("robot_noise_ratio", "object_noise_ratio"):
            value = getattr(self, name)
            if not np.isfinite(value) or value < 0:
                raise UserError(f"{name} must be a finite number >= 0, got {value!r}")


class KitchenEnv(gym.Env):
    """FrankaKitchen-v1 with `{"state": (59,) float32}` observations, task-completion info and a step limit.

    `info` after reset and every step: `n_completed` (int), `is_success` (all tasks done), `completed/<task>` (bool
    per configured task), `completed_tasks` (list, completion order), `step_completions` (list), `n_tasks`.
    Terminated when every configured task is done (unless `terminate_on_tasks_completed=False`); truncated after
    `max_episode_steps` steps.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": round(1 / CONTROL_DT)}

    def __init__(
        self,
        tasks: str | Sequence[str] | None = COMPLETE_TASKS,
        max_episode_steps: int = DEFAULT_MAX_EPISODE_STEPS,
        robot_noise_ratio: float = 0.01,
        object_noise_ratio: float = 0.0005,
        terminate_on_tasks_completed: bool = True,
        render_size: int = 256,
        render_mode: str | None = "rgb_array",
    ):
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"KitchenEnv only renders 'rgb_array' frames, got render_mode={render_mode!r}")
        self.config = KitchenConfig(
            tasks=tasks, max_episode_steps=max_episode_steps, robot_noise_ratio=robot_noise_ratio,
            object_noise_ratio=object_noise_ratio, terminate_on_tasks_completed=terminate_on_tasks_completed,
            render_size=render_size,
        )
        try:
            import contextlib
            import io

            # gymnasium-robotics 1.4.2 prints a notice about the *Adroit* envs' rewards to stderr on import; it has
            # nothing to do with Kitchen and would otherwise appear once in every worker process's output
            with contextlib.redirect_stderr(io.StringIO()):
                from gymnasium_robotics.envs.franka_kitchen.kitchen_env import KitchenEnv as _Sim
        except ImportError as err:  # pragma: no cover - depends on the install
            raise ImportError(
                "Franka Kitchen needs the kitchen extra: pip install 'fm-policy[kitchen]' "
                "(gymnasium-robotics 1.4.x and mujoco>=3.3,<3.10)"
            ) from err
        # The sim is built without a render mode: its own MujocoRenderer would open a GL context with shadows and
        # reflections on; frames come from the private renderer in `render()`.
        self.sim = _Sim(
            tasks_to_complete=list(self.config.task_tuple),
            terminate_on_tasks_completed=terminate_on_tasks_completed,
            remove_task_when_completed=True,
            object_noise_ratio=object_noise_ratio,
            robot_noise_ratio=robot_noise_ratio,
        )
        self.render_mode = "rgb_array"
        self.observation_space = spaces.Dict(
            {"state": spaces.Box(-np.inf, np.inf, shape=(STATE_DIM,), dtype=np.float32)}
        )
        self.action_space = spaces.Box(-1.0, 1.0, shape=(ACTION_DIM,), dtype=np.float32)
        self._elapsed_steps: int | None = None
        self._completed: list[str] = []
        self._renderer: Any = None

    # -- properties ------------------------------------------------------------------------------------------------

    @property
    def tasks(self) -> tuple[str, ...]:
        return self.config.task_tuple

    @property
    def n_tasks(self) -> int:
        return len(self.config.task_tuple)

    @property
    def max_episode_steps(self) -> int:
        """Read by `MultiStepWrapper` as its default step limit."""
        return self.config.max_episode_steps

    @property
    def elapsed_steps(self) -> int:
        return 0 if self._elapsed_steps is None else self._elapsed_steps

    @property
    def completed_tasks(self) -> list[str]:
        return list(self._completed)

    @property
    def model(self) -> Any:
        """The MuJoCo model (`mujoco.MjModel`) of the kitchen scene."""
        return self.sim.model

    @property
    def data(self) -> Any:
        """The live `mujoco.MjData` (true, noise-free state)."""
        return self.sim.data

    # -- gymnasium API ---------------------------------------------------------------------------------------------

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """The initial state is the same for every seed (FrankaKitchen has no initial-state randomisation); the
        seed drives the observation noise only."""
        super().reset(seed=seed)
        if options:
            raise ValueError(f"KitchenEnv.reset takes no options, got {sorted(options)}")
        obs, _ = self.sim.reset(seed=seed)
        self._elapsed_steps = 0
        self._completed = []
        return self._observe(obs), self._info([])

    def step(self, action: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._elapsed_steps is None:
            raise RuntimeError("KitchenEnv.step() called before reset()")
        act = self._validate_action(action)
        obs, _, terminated, _, sim_info = self.sim.step(act)
        self._elapsed_steps += 1
        new = [t for t in sim_info.get("step_task_completions", []) if t not in self._completed]
        self._completed.extend(new)
        truncated = self._elapsed_steps >= self.config.max_episode_steps
        return self._observe(obs), float(len(new)), bool(terminated), truncated, self._info(new)

    def render(self) -> np.ndarray:
        """RGB frame (render_size, render_size, 3) uint8 from gymnasium-robotics' default viewpoint."""
        if self._elapsed_steps is None:
            raise RuntimeError("KitchenEnv.render() called before reset()")
        import mujoco

        if self._renderer is None:
            size = self.config.render_size
            model = self.sim.model
            # the offscreen framebuffer must hold the frame; the kitchen model's default is 640x480
            model.vis.global_.offwidth = max(int(model.vis.global_.offwidth), size)
            model.vis.global_.offheight = max(int(model.vis.global_.offheight), size)
            self._renderer = mujoco.Renderer(model, height=size, width=size)
            self._camera = mujoco.MjvCamera()
            self._camera.type = mujoco.mjtCamera.mjCAMERA_FREE
            self._camera.distance = _CAMERA["distance"]
            self._camera.azimuth = _CAMERA["azimuth"]
            self._camera.elevation = _CAMERA["elevation"]
            self._camera.lookat[:] = _CAMERA["lookat"]
        self._renderer.update_scene(self.sim.data, camera=self._camera)
        flags = self._renderer.scene.flags
        for flag in (mujoco.mjtRndFlag.mjRND_SHADOW, mujoco.mjtRndFlag.mjRND_REFLECTION,
                     mujoco.mjtRndFlag.mjRND_SKYBOX):
            flags[flag] = 0
        return np.ascontiguousarray(self._renderer.render())

    def close(self) -> None:
        if self._renderer is not None:
            self._renderer.close()
            self._renderer = None
        self.sim.close()

    # -- internals -------------------------------------------------------------------------------------------------

    @staticmethod
    def _validate_action(action: Any) -> np.ndarray:
        return checked_action(action, ACTION_DIM, "KitchenEnv", "joint velocities", -1.0, 1.0)

    @staticmethod
    def _observe(obs: dict[str, Any]) -> dict[str, np.ndarray]:
        # a float32 copy: the sim hands out arrays it may rewrite on the next step
        return {"state": np.array(obs["observation"], dtype=np.float32, copy=True)}

    def _info(self, new: list[str]) -> dict[str, Any]:
        info: dict[str, Any] = {
            "n_completed": len(self._completed),
            "n_tasks": self.n_tasks,
            "is_success": len(self._completed) == self.n_tasks,
            "completed_tasks": list(self._completed),
            "step_completions": list(new),
        }
        for task in self.tasks:
            info[f"completed/{task}"] = task in self._completed
        return info


def check_obs_keys(obs_keys: Sequence[str]) -> None:
    """Kitchen observes `state` only; a policy asking for anything else was trained on another env."""
    unknown = [k for k in obs_keys if k != "state"]
    if unknown:
        raise UserError(f"Franka Kitchen has no observation keys {unknown}; it observes ['state'] (59-D)")


def kitchen_metrics(task_counts: Sequence[float], env_kwargs: dict[str, Any] | None = None) -> dict[str, Any]:
    """diffusion_policy's Kitchen metrics from per-episode completed-task counts, with 95% intervals.

    `p<n>` (n = 1..K, K = number of configured tasks) = fraction of episodes completing at least n tasks (Wilson
    interval); `mean_tasks` = mean number of completed tasks (bootstrap interval); `mean_score` = mean_tasks / K
    (diffusion_policy's `test/mean_score` for K = 7). Returns `fm_policy.eval.metrics.Estimate`s.
    """
    from fm_policy.eval.metrics import mean_ci, rate_ci

    counts = np.asarray(list(task_counts), dtype=np.float64)
    k = n_tasks_for(env_kwargs)
    if np.any(counts < 0) or np.any(counts > k) or np.any(counts != np.round(counts)):
        raise ValueError(f"task counts must be integers in [0, {k}], got {counts.tolist()}")
    out: dict[str, Any] = {f"p{n}": rate_ci(counts >= n) for n in range(1, k + 1)}
    out["mean_tasks"] = mean_ci(counts)
    out["mean_score"] = mean_ci(counts / k)
    return out
