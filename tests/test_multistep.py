"""MultiStepWrapper on a tiny counting env (generic Dict env) and on the real Push-T env."""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
import pytest
from fm_policy.envs import MultiStepWrapper
from gymnasium import spaces


class CountingEnv(gym.Env):
    """obs = {"count": [t], "pos": last action}, reward = t; terminates when t reaches `terminate_at`."""

    def __init__(self, terminate_at: int | None = None, max_episode_steps: int | None = None):
        self.observation_space = spaces.Dict(
            {"count": spaces.Box(0, 1000, (1,), np.int64), "pos": spaces.Box(-1.0, 1.0, (2,), np.float32)}
        )
        self.action_space = spaces.Box(-1.0, 1.0, (2,), np.float32)
        self.terminate_at = terminate_at
        if max_episode_steps is not None:
            self.max_episode_steps = max_episode_steps
        self.t = 0
        self.n_step_calls = 0
        self._buf = {"count": np.zeros(1, np.int64), "pos": np.zeros(2, np.float32)}

    def _obs(self, pos: Any) -> dict[str, np.ndarray]:
        self._buf["count"][0] = self.t  # deliberately reuses its buffers: the wrapper must copy
        self._buf["pos"][:] = pos
        return self._buf

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self.t = 0
        return self._obs(np.zeros(2)), {}

    def step(self, action):
        self.t += 1
        self.n_step_calls += 1
        terminated = self.terminate_at is not None and self.t >= self.terminate_at
        return self._obs(action), float(self.t), terminated, False, {"t": self.t}


def _chunk(n: int, start: float = 0.0) -> np.ndarray:
    return np.stack([np.full(2, start + 0.1 * i, np.float32) for i in range(n)])


def test_spaces_and_padding_after_reset() -> None:
    env = MultiStepWrapper(CountingEnv(), n_obs_steps=3, n_action_steps=4)
    assert env.observation_space["count"].shape == (3, 1)
    assert env.observation_space["pos"].shape == (3, 2) and env.observation_space["pos"].dtype == np.float32
    assert env.action_space.shape == (4, 2)
    obs, _ = env.reset(seed=0)
    assert env.observation_space.contains(obs)
    np.testing.assert_array_equal(obs["count"][:, 0], [0, 0, 0])
    obs, *_ = env.step(_chunk(1, 0.5))
    np.testing.assert_array_equal(obs["count"][:, 0], [0, 0, 1])  # padding shifts out as real frames come in


def test_chunk_execution_history_and_reward() -> None:
    inner = CountingEnv()
    env = MultiStepWrapper(inner, n_obs_steps=2, n_action_steps=4)
    env.reset()
    obs, reward, terminated, truncated, info = env.step(_chunk(4))
    assert inner.n_step_calls == 4 and info["n_steps_executed"] == 4 and info["t"] == 4
    np.testing.assert_array_equal(obs["count"][:, 0], [3, 4])
    np.testing.assert_allclose(obs["pos"], _chunk(4)[2:])
    assert reward == 4.0 and info["rewards"] == [1.0, 2.0, 3.0, 4.0]
    assert not terminated and not truncated and env.elapsed_steps == 4
    summed = MultiStepWrapper(CountingEnv(), 2, 4, reward_agg="sum")
    summed.reset()
    assert summed.step(_chunk(3))[1] == 6.0


def test_early_stop_on_termination() -> None:
    inner = CountingEnv(terminate_at=3)
    env = MultiStepWrapper(inner, n_obs_steps=2, n_action_steps=8)
    env.reset()
    _, _, terminated, truncated, info = env.step(_chunk(8))
    assert terminated and not truncated
    assert info["n_steps_executed"] == 3 and inner.n_step_calls == 3
    with pytest.raises(RuntimeError, match="reset"):
        env.step(_chunk(8))


def test_truncation_counts_single_steps() -> None:
    env = MultiStepWrapper(CountingEnv(max_episode_steps=10), n_obs_steps=2, n_action_steps=4)
    assert env.max_episode_steps == 10  # default taken from the inner env
    env.reset()
    results = [env.step(_chunk(4)) for _ in range(3)]
    assert [r[3] for r in results] == [False, False, True]
    assert [r[4]["n_steps_executed"] for r in results] == [4, 4, 2]
    assert env.elapsed_steps == 10
    env.reset()  # a reset starts a new count
    assert env.step(_chunk(4))[4]["n_steps_executed"] == 4
    override = MultiStepWrapper(CountingEnv(max_episode_steps=10), 2, 4, max_episode_steps=5)
    override.reset()
    override.step(_chunk(4))
    assert override.step(_chunk(4))[4]["n_steps_executed"] == 1


def test_rejects_bad_chunks_and_envs() -> None:
    env = MultiStepWrapper(CountingEnv(), n_obs_steps=2, n_action_steps=4)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(_chunk(4))
    env.reset()
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(2))
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((4, 3)))
    with pytest.raises(TypeError, match="Dict"):
        MultiStepWrapper(gym.make("CartPole-v1"), 2, 4)
    with pytest.raises(ValueError, match="n_obs_steps"):
        MultiStepWrapper(CountingEnv(), 0, 4)


def test_pusht_padding_early_stop_and_truncation() -> None:
    pytest.importorskip("gym_pusht")
    from fm_policy.envs import PushTEnv
    from fm_policy.envs.pusht import reset_state_for_pose

    env = MultiStepWrapper(PushTEnv(obs_mode="state,keypoints", max_episode_steps=5), n_obs_steps=2, n_action_steps=8)
    assert env.max_episode_steps == 5
    obs, _ = env.reset(seed=0)
    assert obs["state"].shape == (2, 5) and obs["keypoints"].shape == (2, 20)
    np.testing.assert_array_equal(obs["state"][0], obs["state"][1])
    assert env.observation_space.contains(obs)

    # block exactly on the goal: the first step succeeds, the other 7 actions are dropped
    goal_state = reset_state_for_pose((40.0, 40.0), env.unwrapped.goal_pose)
    env.reset(options={"reset_to_state": goal_state})
    obs, reward, terminated, truncated, info = env.step(np.full((8, 2), 40.0))
    assert terminated and info["is_success"] and info["n_steps_executed"] == 1 and reward == 1.0

    # truncation at the inner limit (5 single steps) inside a chunk of 8
    env.reset(seed=1)
    obs, _, terminated, truncated, info = env.step(np.full((8, 2), 256.0))
    assert truncated and not terminated and info["n_steps_executed"] == 5
    np.testing.assert_array_equal(obs["state"][1, :2], info["agent_pos"].astype(np.float32))
