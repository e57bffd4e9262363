"""Observation history + action-chunk execution, the way diffusion_policy's `MultiStepWrapper` does it.

A chunked policy conditions on the last `n_obs_steps` observations and emits `n_action_steps` actions at once; this
wrapper turns a single-step Dict-observation env into exactly that interface, so rollout code is the same for Push-T,
Kitchen and Robomimic. Semantics kept from diffusion_policy because policies trained on its data expect them:
- after reset the history is padded by repeating the first observation;
- a chunk runs action by action and stops as soon as the episode terminates or is truncated (the rest is dropped);
- the chunk's reward is the max over executed steps (Push-T's score is the max coverage-reward), done flags are OR-ed;
- the step limit counts single env steps, not chunks.
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from fm_policy.errors import UserError

RewardAgg = Literal["max", "sum", "mean"]
_REDUCERS = {"max": max, "sum": sum, "mean": lambda rs: sum(rs) / len(rs)}


def _stacked_box(space: spaces.Space, n: int, key: str) -> spaces.Box:
    if not isinstance(space, spaces.Box):
        raise TypeError(f"MultiStepWrapper stacks Box sub-spaces only; observation key '{key}' is {space}")
    return spaces.Box(
        low=np.repeat(space.low[None], n, axis=0), high=np.repeat(space.high[None], n, axis=0), dtype=space.dtype
    )


def _inner_step_limit(env: gym.Env) -> int | None:
    """The inner env's `max_episode_steps` attribute (PushTEnv, ...) or, failing that, its registered spec's."""
    try:
        limit = env.get_wrapper_attr("max_episode_steps")
    except AttributeError:
        limit = None
    if limit is None and env.spec is not None:
        limit = env.spec.max_episode_steps
    return None if limit is None else int(limit)


class MultiStepWrapper(gym.Wrapper):
    """`step(action_chunk)` with a (n_action_steps, *action_shape) chunk; observations stacked to (n_obs_steps, ...).

    Works for any env whose observation space is a `Dict` of `Box`es. `max_episode_steps=None` takes the inner env's
    limit (attribute or spec); the wrapper then truncates on its own count too, so a limit lower than the inner env's
    also works. `info` is the last executed step's info plus `n_steps_executed` (and `rewards`, the per-step list,
    for callers that want another aggregate than `reward_agg`).
    """

    def __init__(
        self,
        env: gym.Env,
        n_obs_steps: int,
        n_action_steps: int,
        max_episode_steps: int | None = None,
        reward_agg: RewardAgg = "max",
    ):
        super().__init__(env)
        for name, value in (("n_obs_steps", n_obs_steps), ("n_action_steps", n_action_steps)):
            if not isinstance(value, (int, np.integer)) or value < 1:
                raise UserError(f"{name} must be a positive int, got {value!r}")
        if reward_agg not in _REDUCERS:
            raise UserError(f"reward_agg must be one of {sorted(_REDUCERS)}, got {reward_agg!r}")
        if not isinstance(env.observation_space, spaces.Dict):
            raise TypeError(f"MultiStepWrapper needs a Dict observation space, got {env.observation_space}")
        if not isinstance(env.action_space, spaces.Box):
            raise TypeError(f"MultiStepWrapper needs a Box action space, got {env.action_space}")
        self.n_obs_steps = int(n_obs_steps)
        self.n_action_steps = int(n_action_steps)
        self.reward_agg = reward_agg
        self.max_episode_steps = int(max_episode_steps) if max_episode_steps is not None else _inner_step_limit(env)
        self.observation_space = spaces.Dict(
            {key: _stacked_box(sub, self.n_obs_steps, key) for key, sub in env.observation_space.spaces.items()}
        )
        self.action_space = _stacked_box(env.action_space, self.n_action_steps, "action")
        self._history: deque[dict[str, np.ndarray]] | None = None
        self._elapsed_steps = 0
        self._episode_over = False

    @property
    def elapsed_steps(self) -> int:
        """Single env steps executed since the last reset."""
        return self._elapsed_steps

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        obs, info = self.env.reset(seed=seed, options=options)
        first = self._copy(obs)
        self._history = deque([first] * self.n_obs_steps, maxlen=self.n_obs_steps)
        self._elapsed_steps = 0
        self._episode_over = False
        return self._stacked(), info

    def step(self, action_chunk: Any) -> tuple[dict[str, np.ndarray], float, bool, bool, dict[str, Any]]:
        if self._history is None:
            raise RuntimeError("MultiStepWrapper.step() called before reset()")
        if self._episode_over:
            raise RuntimeError("MultiStepWrapper.step() called after the episode ended; call reset()")
        chunk = self._validate_chunk(action_chunk)

        rewards: list[float] = []
        terminated = truncated = False
        info: dict[str, Any] = {}
        for action in chunk:
            obs, reward, term, trunc, info = self.env.step(action)
            self._elapsed_steps += 1
            self._history.append(self._copy(obs))
            rewards.append(float(reward))
            terminated = terminated or bool(term)
            truncated = truncated or bool(trunc)
            if self.max_episode_steps is not None and self._elapsed_steps >= self.max_episode_steps:
                truncated = True
            if terminated or truncated:
                break
        self._episode_over = terminated or truncated
        info = dict(info)
        info["n_steps_executed"] = len(rewards)
        info["rewards"] = rewards
        return self._stacked(), float(_REDUCERS[self.reward_agg](rewards)), terminated, truncated, info

    def _validate_chunk(self, action_chunk: Any) -> np.ndarray:
        """A (k, *action_shape) array, k >= 1: diffusion_policy also runs whatever length it is given."""
        chunk = np.asarray(action_chunk)
        action_shape = self.env.action_space.shape
        if chunk.ndim != len(action_shape) + 1 or chunk.shape[1:] != action_shape or chunk.shape[0] < 1:
            expected = ", ".join(["n_actions", *map(str, action_shape)])
            raise ValueError(
                f"MultiStepWrapper.step expects an action chunk of shape ({expected}) (nominally n_actions = "
                f"n_action_steps = {self.n_action_steps}), got shape {chunk.shape}"
            )
        return chunk

    @staticmethod
    def _copy(obs: dict[str, Any]) -> dict[str, np.ndarray]:
        # own copies: an inner env that reuses its output buffers must not rewrite the history
        return {key: np.array(value, copy=True) for key, value in obs.items()}

    def _stacked(self) -> dict[str, np.ndarray]:
        assert self._history is not None
        return {key: np.stack([frame[key] for frame in self._history]) for key in self.observation_space.spaces}
