"""Push-T turns (datasets/pusht_symmetry.py): a turned episode is what the simulator itself produces from the turned
start under the turned goal, its keypoints, image and goal observation are consistent, and the store records it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gym_pusht")

from fm_policy.datasets.errors import DatasetError
from fm_policy.datasets.policy_data import DataConfig, build_policy_data
from fm_policy.datasets.pusht_symmetry import turn_goal_pose, turn_pusht_episode, turn_pusht_store
from fm_policy.datasets.replay_buffer import ReplayBuffer
from fm_policy.envs import goal_keypoint_obs, make_env
from fm_policy.envs.pusht import DEFAULT_GOAL_POSE, block_keypoints, reset_state_for_pose


def _pushing_episode(goal_pose=None, steps: int = 60) -> dict[str, np.ndarray]:
    """A real episode: the block starts overlapping the goal and the agent drives through it (so there are contacts
    and the coverage changes), recorded as the collector does."""
    env = make_env("pusht", **({} if goal_pose is None else {"goal_pose": goal_pose}))
    _, info = env.reset(options={"reset_to_state": reset_state_for_pose([150.0, 200.0], [250.0, 230.0, 1.1])})
    path = np.linspace([150.0, 200.0], [330.0, 250.0], steps)  # a slow sweep through the block, clear of the walls
    rows: dict[str, list] = {"state": [], "keypoint": [], "action": [], "coverage": []}
    for action in path:
        state = np.concatenate([info["agent_pos"], info["block_pose"]])
        rows["state"].append(state)
        rows["keypoint"].append(block_keypoints(info["block_pose"]))
        rows["action"].append(action)
        _, _, _, _, info = env.step(action)
        rows["coverage"].append(info["coverage"])
    env.close()
    return {k: np.asarray(v, dtype=np.float32 if k != "coverage" else np.float64) for k, v in rows.items()}


def _replay(episode: dict[str, np.ndarray], goal_pose) -> tuple[np.ndarray, np.ndarray]:
    """Open-loop replay from the episode's first state: block poses and coverages."""
    env = make_env("pusht", goal_pose=goal_pose)
    s = episode["state"][0].astype(np.float64)
    _, info = env.reset(options={"reset_to_state": reset_state_for_pose(s[:2], s[2:5])})
    poses, coverage = [], []
    for action in episode["action"]:
        _, _, _, _, info = env.step(action)
        poses.append(info["block_pose"])
        coverage.append(info["coverage"])
    env.close()
    return np.asarray(poses), np.asarray(coverage)


def test_turned_goal_is_the_turned_t_in_place() -> None:
    x, y, angle = turn_goal_pose(DEFAULT_GOAL_POSE)
    assert (x, y) == (256.0, 256.0) and math.isclose(angle, math.pi / 4 - math.pi)
    np.testing.assert_allclose(turn_goal_pose(turn_goal_pose([190.0, 310.0, -1.0])), [190.0, 310.0, -1.0])
    np.testing.assert_allclose(turn_goal_pose([300.0, 256.0, 0.0], 1), [256.0, 300.0, math.pi / 2])  # x toward y
    np.testing.assert_allclose(turn_goal_pose(turn_goal_pose([190.0, 310.0, -1.0], 1), 3), [190.0, 310.0, -1.0])
    with pytest.raises(ValueError, match="quarter_turns"):
        turn_goal_pose(DEFAULT_GOAL_POSE, 4)


@pytest.mark.parametrize("quarter_turns", [1, 2, 3])
def test_turned_episode_is_what_the_simulator_produces(quarter_turns: int) -> None:
    episode = _pushing_episode()
    poses, coverage = _replay(episode, DEFAULT_GOAL_POSE)
    turned_goal = turn_goal_pose(DEFAULT_GOAL_POSE, quarter_turns)
    turned = turn_pusht_episode(episode, DEFAULT_GOAL_POSE, quarter_turns)
    turned_poses, turned_coverage = _replay(turned, turned_goal)
    assert coverage.max() > 0.05 and np.ptp(coverage) > 0.02  # the block overlaps the goal and is pushed around
    assert np.abs(poses[-1, :2] - poses[0, :2]).max() > 5
    # the turned replay is the turned original (1 px of wall asymmetry never touched here), coverage included
    expected = turn_pusht_episode({"state": np.concatenate([np.zeros((len(poses), 2)), poses], axis=1)},
                                  DEFAULT_GOAL_POSE, quarter_turns)["state"][:, 2:5]
    np.testing.assert_allclose(turned_poses[:, :2], expected[:, :2], atol=0.05)
    np.testing.assert_allclose(np.cos(turned_poses[:, 2] - expected[:, 2]), 1.0, atol=1e-4)
    np.testing.assert_allclose(turned_coverage, coverage, atol=1e-3)
    # stored keypoints follow the turned state in the same order; the goal observation is the turned goal's
    np.testing.assert_allclose(turned["keypoint"], block_keypoints(turned["state"][:, 2:5].astype(np.float64)),
                               atol=1e-2)
    np.testing.assert_allclose(turned["goal"][0], goal_keypoint_obs(turned_goal), atol=1e-4)
    # turning the rest of the way round gives the episode back (angles modulo 2 pi)
    back = turn_pusht_episode(turned, turned_goal, 4 - quarter_turns)
    np.testing.assert_allclose(back["action"], episode["action"], atol=1e-3)
    np.testing.assert_allclose(back["state"][:, :4], episode["state"][:, :4], atol=1e-3)
    np.testing.assert_allclose(np.cos(back["state"][:, 4] - episode["state"][:, 4]), 1.0, atol=1e-5)


def test_turned_store_records_its_goal_and_trains_a_goal_aware_policy(tmp_path: Path) -> None:
    src = tmp_path / "src.zarr"
    with ReplayBuffer.create(src) as buffer:  # attribute-less, like diffusion_policy's human store
        for _ in range(2):
            episode = _pushing_episode(steps=20)
            buffer.add_episode({k: episode[k] for k in ("state", "keypoint", "action")})
    summary = turn_pusht_store(str(src), str(tmp_path / "turned.zarr"), episodes=[1])
    assert summary["episodes"] == 1 and summary["steps"] == 20
    with ReplayBuffer.open(summary["store"]) as turned:
        source = turned.attrs["source"]
        np.testing.assert_allclose(source["goal_pose"], turn_goal_pose(DEFAULT_GOAL_POSE))
        assert source["turned_from"]["episodes"] == [1]
        assert turned.meta["source_episode"][:].tolist() == [1]
    data = build_policy_data(DataConfig(path=summary["store"], obs_keys=["keypoints", "goal"], val_ratio=0.0),
                             horizon=4, n_obs_steps=2, n_action_steps=2)
    np.testing.assert_allclose(data.arrays["goal"][0], goal_keypoint_obs(turn_goal_pose(DEFAULT_GOAL_POSE)),
                               atol=1e-4)
    with pytest.raises(DatasetError, match="episodes \\[5\\] do not exist"):
        turn_pusht_store(str(src), str(tmp_path / "bad.zarr"), episodes=[5])


@pytest.mark.parametrize("quarter_turns", [1, 2, 3])
def test_turned_image_is_the_render_of_the_turned_state(quarter_turns: int) -> None:
    """The stored 96x96 picture turns the way the world does: it matches the env's own render of the turned state to
    rasterisation noise (mean |diff| < 1 of 255), and a turn the wrong way round is far off."""
    def render(goal, agent, block) -> np.ndarray:
        env = make_env("pusht", obs_mode="image", goal_pose=goal)
        obs, _ = env.reset(options={"reset_to_state": reset_state_for_pose(agent, block)})
        env.close()
        return obs["image"]

    agent, block = [150.0, 120.0], [300.0, 200.0, 0.4]
    image = render(DEFAULT_GOAL_POSE, agent, block)
    state = np.array([[*agent, *block]])
    turned_state = turn_pusht_episode({"state": state}, DEFAULT_GOAL_POSE, quarter_turns)["state"][0]
    expected = render(turn_goal_pose(DEFAULT_GOAL_POSE, quarter_turns), turned_state[:2], turned_state[2:5])
    turned = turn_pusht_episode({"img": image[None], "state": state}, DEFAULT_GOAL_POSE, quarter_turns)["img"][0]
    assert np.abs(turned.astype(float) - expected).mean() < 1.0
    wrong = np.rot90(image, quarter_turns, axes=(0, 1)) if quarter_turns != 2 else image
    assert np.abs(wrong.astype(float) - expected).mean() > 3.0
