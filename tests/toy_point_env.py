"""A toy environment defined outside the package: a point on a line that must reach its goal, with a scripted
expert, an env-specific option, a derived dataset key and its own metric, all declared in one `EnvSpec`. Shared by
the tests that register environments and policy types from outside (tests/test_env_spec.py,
tests/test_policy_types.py)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
from fm_policy.datasets.recorders import Episode
from fm_policy.envs import DerivedKey, EnvOption, EnvSpec, ExpertCollection, make_env
from fm_policy.eval.metrics import mean_ci
from gymnasium import spaces

NAME = "toy/point1d"
SPEED = 0.1  # position change per step at full action


class PointEnv(gym.Env):
    """A point on [-1, 1] that must reach `goal`: state = (position, goal), action = velocity in [-1, 1].

    Success (terminating) within 0.02 of the goal; reward = 1 - distance / 2, so the harness's score (the max reward)
    measures how close an episode got. The start position is drawn from the reset seed."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, goal: float = 0.5, max_episode_steps: int = 40) -> None:
        self.observation_space = spaces.Dict({"state": spaces.Box(-1.0, 1.0, (2,), np.float32)})
        self.action_space = spaces.Box(-1.0, 1.0, (1,), np.float32)
        self.goal = float(goal)
        self.max_episode_steps = int(max_episode_steps)
        self.x = 0.0
        self.t = 0

    def _obs(self) -> dict[str, np.ndarray]:
        return {"state": np.array([self.x, self.goal], dtype=np.float32)}

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None):
        super().reset(seed=seed)
        self.x, self.t = float(self.np_random.uniform(-1.0, 1.0)), 0
        return self._obs(), {"is_success": False}

    def step(self, action: Any):
        self.x = float(np.clip(self.x + SPEED * float(np.clip(np.asarray(action).reshape(-1)[0], -1, 1)), -1, 1))
        self.t += 1
        distance = abs(self.x - self.goal)
        success = distance < 0.02
        return self._obs(), 1.0 - distance / 2, success, self.t >= self.max_episode_steps, {"is_success": success}


def expert_action(state: np.ndarray) -> np.ndarray:
    """Proportional controller toward the goal, the scripted expert and the rolled-out policy alike."""
    return np.clip((state[..., 1:2] - state[..., 0:1]) / SPEED, -1.0, 1.0).astype(np.float32)


class PointRecorder:
    """The scripted expert for `collect`: stores `state` and `action` per step."""

    def __init__(self, obs_modes: Sequence[str] = ("state",), max_steps: int = 40, goal: float = 0.5) -> None:
        if set(obs_modes) != {"state"}:
            raise ValueError(f"the point env stores only 'state', got {list(obs_modes)}")
        self.env = make_env(NAME, goal=goal, max_episode_steps=max_steps)
        self.goal, self.max_steps = goal, max_steps

    def record(self, env_seed: int, planner_seed: int) -> Episode:
        obs, info = self.env.reset(seed=env_seed)
        rows: dict[str, list[np.ndarray]] = {"state": [], "action": []}
        for _ in range(self.max_steps):
            action = expert_action(obs["state"])
            rows["state"].append(obs["state"])
            rows["action"].append(action)
            obs, reward, terminated, truncated, info = self.env.step(action)
            if terminated or truncated:
                break
        data = {k: np.stack(v) for k, v in rows.items()}
        return Episode(data=data, success=bool(info["is_success"]), steps=len(data["action"]), final_score=reward)

    def dataset_attrs(self) -> dict[str, Any]:
        return {"env": NAME, "env_kwargs": {"goal": self.goal}, "obs_modes": ["state"], "max_steps": self.max_steps}


def _obs_kwargs(obs_keys: list[str]) -> dict[str, Any]:
    if set(obs_keys) - {"state"}:
        raise ValueError(f"the point env observes ['state'], not {obs_keys}")
    return {}


def _metrics(episodes: list[Any], env_kwargs: dict[str, Any]) -> dict[str, Any]:
    return {"mean_steps": mean_ci([e.steps for e in episodes])}


def _offset(arrays: Mapping[str, np.ndarray]) -> np.ndarray:
    return arrays["state"][..., 1:2] - arrays["state"][..., 0:1]


SPEC = EnvSpec(
    name=NAME,
    description="a point on a line that must reach its goal (test env)",
    make=PointEnv,
    obs_kwargs=_obs_kwargs,
    metrics=_metrics,
    collection=ExpertCollection(recorder=PointRecorder, obs=("state",), max_steps=40, obs_help="state"),
    derived_keys={"goal_offset": DerivedKey(sources=("state",), build=_offset)},
    options=(EnvOption("--point-goal", "goal", float, help="where the point must go (default 0.5)"),),
)
