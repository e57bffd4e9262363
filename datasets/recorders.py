"""Episode recorders: run an expert in a simulator and return the episode as time-aligned arrays.

A recorder is what `collect` runs inside each worker process. It owns one env and one expert for its whole life (built
lazily in the worker, never in the parent: MuJoCo-based envs must not fork a GL context), and turns
(env seed, planner seed) into an `Episode` deterministically, which is what makes collection reproducible.

Step alignment (diffusion_policy's): row t holds the observation seen before action t, action t, and what executing
action t produced (`n_contacts`).

Recorders are found through the env's spec (`EnvSpec.collection`, see `fm_policy.envs.spec`), which imports the
recorder class lazily; a recorder for a new env can live anywhere, e.g. next to the env's spec.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol

import numpy as np
from fm_policy.envs.registry import env_spec, expert_collection

from fm_policy.errors import UserError
from fm_policy.versions import package_versions


@dataclass
class Episode:
    data: dict[str, np.ndarray]
    success: bool
    steps: int
    final_score: float  # env-specific progress measure (Push-T: coverage)


class EpisodeRecorder(Protocol):
    def record(self, env_seed: int, planner_seed: int) -> Episode: ...

    def dataset_attrs(self) -> dict[str, Any]:
        """How the data is made (env id and versions, observation modes, expert settings): stored in the zarr."""
        ...


class PushTRecorder:
    """Push-T with the push-primitive planning expert. Stored keys follow diffusion_policy's Push-T zarr:
    `state` (5) always (it is also what `reset_to_state` replays), `keypoint` (9, 2) for the `keypoints` mode,
    `img` (96, 96, 3) uint8 for the `image` mode, `action` (2), `n_contacts` (1), plus `goal` (18) always: the
    episode's goal as the env's `goal` observation, so every store can train a goal-aware policy and a multi-goal
    store (`goal_poses`) says which goal each episode had. The `goal` mode is accepted and changes nothing.

    `action_noise` > 0 (px) collects DART-style: the env executes the expert's target plus Gaussian noise of that
    standard deviation, while `action` stores the expert's own target and `executed_action` what ran (replays use
    it). The expert re-plans from the perturbed states, so the demos show recoveries a noise-free expert never
    needs -- the states a policy's own errors lead to."""

    KEY_FOR_MODE = {"state": "state", "keypoints": "keypoint", "image": "img", "goal": "goal"}

    def __init__(self, obs_modes: Sequence[str] = ("state", "keypoints"), max_steps: int = 300,
                 action_noise: float = 0.0, **env_kwargs: Any):
        from fm_policy.datasets.experts.pusht import PushTExpert, PushTExpertConfig
        from fm_policy.envs import make_env

        unknown = set(obs_modes) - set(self.KEY_FOR_MODE)
        if unknown:
            raise UserError(f"unknown Push-T observation modes {sorted(unknown)}; choose from {list(self.KEY_FOR_MODE)}")
        self.obs_modes = tuple(m for m in self.KEY_FOR_MODE if m in obs_modes)
        # the env always observes `state`: it is stored for every mode
        env_modes = tuple(dict.fromkeys(("state", *self.obs_modes)))
        self.env = make_env("pusht", obs_mode=",".join(env_modes), max_episode_steps=max_steps, **env_kwargs)
        self.env_kwargs = dict(env_kwargs)
        self.max_steps = max_steps
        if not (np.isfinite(action_noise) and action_noise >= 0):
            raise UserError(f"action_noise must be a finite number of pixels >= 0, got {action_noise!r}")
        self.action_noise = float(action_noise)
        self.expert_config = PushTExpertConfig()
        self.expert = PushTExpert(self.expert_config, seed=0)

    def record(self, env_seed: int, planner_seed: int) -> Episode:
        from fm_policy.envs import block_keypoints, goal_keypoint_obs

        obs, info = self.env.reset(seed=env_seed)
        self.expert.reset(planner_seed)
        goal = goal_keypoint_obs(self.env.goal_pose).astype(np.float32)  # the goal is fixed within an episode
        rows: dict[str, list[np.ndarray]] = {"state": [], "action": [], "n_contacts": [], "goal": []}
        noise = np.random.default_rng([env_seed, planner_seed]) if self.action_noise else None
        if noise is not None:
            rows["executed_action"] = []
        if "keypoints" in self.obs_modes:
            rows["keypoint"] = []
        if "image" in self.obs_modes:
            rows["img"] = []
        success = False
        for _ in range(self.max_steps):
            # float32 is what the store holds; executing the cast action keeps stored actions replayable exactly
            action = self.expert.act(self.env.sim).astype(np.float32)
            rows["state"].append(obs["state"])
            if "keypoint" in rows:
                rows["keypoint"].append(block_keypoints(info["block_pose"]).astype(np.float32))
            if "img" in rows:
                rows["img"].append(obs["image"])
            rows["goal"].append(goal)
            executed = action
            if noise is not None:
                executed = (action + noise.normal(0.0, self.action_noise, 2)).astype(np.float32)
                rows["executed_action"].append(executed)
            obs, _, terminated, truncated, info = self.env.step(executed)
            rows["action"].append(action)
            rows["n_contacts"].append(np.array([info["n_contacts"]], dtype=np.float32))
            success = bool(info["is_success"])
            if terminated or truncated:
                break
        data = {k: np.stack(v) for k, v in rows.items()}
        return Episode(data=data, success=success, steps=len(data["action"]), final_score=float(info["coverage"]))

    def dataset_attrs(self) -> dict[str, Any]:
        goals = self.env.goal_poses
        return {
            "env": "pusht",
            "env_id": "gym_pusht/PushT-v0",
            "env_versions": package_versions(env_spec("pusht").packages),
            "env_kwargs": self.env_kwargs,
            # goal_pose: the store's one goal (None for a goal set); goal_poses: every goal an episode can have
            "goal_pose": [float(v) for v in goals[0]] if len(goals) == 1 else None,
            "goal_poses": [[float(v) for v in g] for g in goals],
            "obs_modes": list(self.obs_modes),
            "max_steps": self.max_steps,
            "expert": {"name": "PushTExpert (push-primitive planner)", "config": asdict(self.expert_config),
                       "action_noise": self.action_noise},
        }


class KitchenRecorder:
    """Franka Kitchen with the scripted IK expert. Stored keys: `state` (59) float32 (the env's noisy observation,
    what a policy sees), `action` (9) float32, `completed` (K) float32: which of the K configured tasks are done after
    action t (in the order of `tasks`). Success = every task the expert planned is done (all of `tasks` unless a
    `subset_size` is set); the env's own completion info decides, so failed demos never enter the store."""

    def __init__(self, obs_modes: Sequence[str] = ("state",), max_steps: int = 280,
                 tasks: Sequence[str] | str | None = None, task_order: str = "given", subset_size: int | None = None,
                 **env_kwargs: Any):
        from fm_policy.datasets.experts.kitchen import KitchenExpert, KitchenExpertConfig
        from fm_policy.envs import make_env
        from fm_policy.envs.kitchen import COMPLETE_TASKS, parse_tasks

        unknown = set(obs_modes) - {"state"}
        if unknown:
            raise UserError(f"Franka Kitchen stores only the 'state' observation, got {sorted(unknown)}")
        self.tasks = parse_tasks(COMPLETE_TASKS if tasks is None else tasks)
        self.env = make_env("kitchen", tasks=list(self.tasks), max_episode_steps=max_steps, **env_kwargs)
        self.env_kwargs = dict(env_kwargs)
        self.max_steps = max_steps
        self.expert_config = KitchenExpertConfig(task_order=task_order, subset_size=subset_size)
        self.expert = KitchenExpert(self.env, self.expert_config)

    def record(self, env_seed: int, planner_seed: int) -> Episode:
        obs, info = self.env.reset(seed=env_seed)
        plan = self.expert.reset(planner_seed, self.tasks)
        rows: dict[str, list[np.ndarray]] = {"state": [], "action": [], "completed": []}
        for _ in range(self.max_steps):
            action = self.expert.act(obs["state"])  # float32: the stored action is exactly the executed one
            rows["state"].append(obs["state"])
            obs, _, terminated, truncated, info = self.env.step(action)
            rows["action"].append(action)
            rows["completed"].append(np.array([info[f"completed/{t}"] for t in self.tasks], dtype=np.float32))
            done_plan = all(info[f"completed/{t}"] for t in plan)
            # a subset plan never triggers the env's all-tasks termination: stop once its tasks are done
            if terminated or truncated or (done_plan and self.expert.finished):
                break
        data = {k: np.stack(v) for k, v in rows.items()}
        success = all(info[f"completed/{t}"] for t in plan)
        return Episode(data=data, success=success, steps=len(data["action"]), final_score=float(info["n_completed"]))

    def dataset_attrs(self) -> dict[str, Any]:
        return {
            "env": "kitchen",
            "env_id": "FrankaKitchen-v1",
            "env_versions": package_versions(env_spec("kitchen").packages),
            "env_kwargs": self.env_kwargs,
            "tasks": list(self.tasks),
            "obs_modes": ["state"],
            "max_steps": self.max_steps,
            "expert": self.expert.describe(),
        }


class RobomimicRecorder:
    """A robomimic task (Lift / PickPlaceCan / NutAssemblySquare) with its scripted waypoint expert.

    Stored keys: the robomimic low-dim observations under their robomimic names (`object`, `robot0_eef_pos`,
    `robot0_eef_quat`, `robot0_gripper_qpos`) and their concatenation `state`, `<camera>_image` (uint8 HWC) for
    image modes such as `agentview_image`, `action` (7) float32 OSC_POSE deltas, and `sim_state` (float64): the
    flattened MuJoCo state before action t. Replaying: `env.reset(seed=<meta/env_seed>, options={"state": s})`
    rebuilds the episode's exact scene (the seed re-draws the same geometry, e.g. Lift's cube size) and restores
    `s`. The store's `env_args` attribute is robomimic's, so `RobomimicEnv.from_env_args` rebuilds the simulator, as
    for converted robomimic datasets.
    """

    def __init__(self, task: str, obs_modes: Sequence[str] = ("state",), max_steps: int = 400,
                 image_size: int = 84, **env_kwargs: Any):
        from fm_policy.datasets.experts.robomimic import RobomimicExpert
        from fm_policy.envs import make_env
        from fm_policy.envs.robomimic import STATE_KEYS, obs_kwargs_for_keys

        modes = tuple(dict.fromkeys(obs_modes))
        bad = [m for m in modes if m != "state" and not m.endswith("_image")]
        if bad:
            raise UserError(f"robomimic observation modes are 'state' and '<camera>_image' (e.g. agentview_image); "
                             f"got {bad}")
        self.image_keys = tuple(m for m in modes if m.endswith("_image"))
        self.keys = (*STATE_KEYS, "state", *self.image_keys)
        self.task = task
        self.env = make_env(f"robomimic/{task}", max_episode_steps=max_steps, image_size=image_size,
                            **obs_kwargs_for_keys(self.image_keys), **env_kwargs)
        self.env_kwargs = dict(env_kwargs, image_size=image_size)
        self.max_steps = max_steps
        self.expert = RobomimicExpert(task)

    def record(self, env_seed: int, planner_seed: int) -> Episode:
        obs, info = self.env.reset(seed=env_seed)
        self.expert.reset(self.env, planner_seed)
        rows: dict[str, list[np.ndarray]] = {k: [] for k in (*self.keys, "sim_state", "action")}
        for _ in range(self.max_steps):
            action = self.expert.act(obs)  # float32: the stored action is exactly the executed one
            rows["sim_state"].append(self.env.get_state())
            for key in self.keys:
                rows[key].append(obs[key])
            obs, _, terminated, truncated, info = self.env.step(action)
            rows["action"].append(action)
            if terminated or truncated:
                break
        data = {k: np.stack(v) for k, v in rows.items()}
        success = bool(info["is_success"])
        return Episode(data=data, success=success, steps=len(data["action"]), final_score=float(success))

    def dataset_attrs(self) -> dict[str, Any]:
        import json

        env_args = self.env.sim_env.serialize()  # robomimic's own env metadata, as its hdf5 datasets store it
        return {
            "env": f"robomimic/{self.task}",
            "env_args": json.dumps(env_args, default=str),
            "env_versions": package_versions(env_spec(f"robomimic/{self.task}").packages),
            "env_kwargs": self.env_kwargs,
            "obs_modes": ["state", *self.image_keys],
            "max_steps": self.max_steps,
            "expert": self.expert.describe(),
        }


def make_recorder(env: str, **kwargs: Any) -> EpisodeRecorder:
    """The recorder that env `env`'s spec declares (`EnvSpec.collection`), built with `kwargs`."""
    return expert_collection(env).recorder(**kwargs)
