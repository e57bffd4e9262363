"""PushTEnv against the real gym-pusht simulator: spaces, keypoints, seeding, custom goal, action checks, registry."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("gym_pusht")

from fm_policy.envs import PushTEnv, available_envs, block_keypoints, lowdim_keypoint_obs, make_env  # noqa: E402
from fm_policy.envs.pusht import (  # noqa: E402
    BLOCK_LOCAL_KEYPOINTS,
    DEFAULT_GOAL_POSE,
    derive_block_local_keypoints,
    reset_state_for_pose,
)
from fm_policy.envs.registry import register_env  # noqa: E402

CUSTOM_GOAL = (300.0, 200.0, 0.3)
EXPECTED = {
    "state": {"state": ((5,), np.float32)},
    "keypoints": {"keypoints": ((20,), np.float32)},
    "image": {"image": ((96, 96, 3), np.uint8), "agent_pos": ((2,), np.float32)},
    "goal": {"goal": ((18,), np.float32)},
}


def _random_actions(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).uniform(100, 400, size=(n, 2)).astype(np.float32)


@pytest.mark.parametrize("mode", ["state", "keypoints", "image", "goal", "state,keypoints,image,goal"])
def test_spaces_shapes_dtypes(mode: str) -> None:
    env = PushTEnv(obs_mode=mode)
    expected = {k: v for m in mode.split(",") for k, v in EXPECTED[m].items()}
    assert set(env.observation_space.spaces) == set(expected)
    assert env.action_space.shape == (2,) and env.action_space.dtype == np.float32
    obs, info = env.reset(seed=1)
    for _ in range(2):
        assert set(obs) == set(expected)
        for key, (shape, dtype) in expected.items():
            assert obs[key].shape == shape and obs[key].dtype == dtype, key
            assert env.observation_space[key].shape == shape and env.observation_space[key].dtype == dtype
        assert env.observation_space.contains(obs)
        obs, reward, terminated, truncated, info = env.step(np.array([256.0, 256.0]))
    for key in ("coverage", "is_success", "n_contacts", "block_pose", "agent_pos"):
        assert key in info
    assert 0.0 <= reward <= 1.0 and not truncated


def test_obs_mode_forms_and_errors() -> None:
    assert PushTEnv(obs_mode=["image", "state"]).obs_modes == ("state", "image")
    assert PushTEnv(obs_mode=" keypoints , state").obs_modes == ("state", "keypoints")
    with pytest.raises(ValueError, match="obs_mode"):
        PushTEnv(obs_mode="pixels")
    with pytest.raises(ValueError, match="goal_pose"):
        PushTEnv(goal_pose=(1.0, 2.0))


def test_state_and_keypoint_obs_match_helpers() -> None:
    env = PushTEnv(obs_mode="state,keypoints")
    obs, info = env.reset(seed=3)
    for action in [None, *_random_actions(5, seed=3)]:
        if action is not None:
            obs, _, _, _, info = env.step(action)
        expected = lowdim_keypoint_obs(block_keypoints(info["block_pose"]), info["agent_pos"]).astype(np.float32)
        np.testing.assert_array_equal(obs["keypoints"], expected)
        pose = info["block_pose"]
        state = np.array([*info["agent_pos"], pose[0], pose[1], pose[2] % (2 * math.pi)], dtype=np.float32)
        np.testing.assert_array_equal(obs["state"], state)


def test_block_keypoints_transform_matches_pymunk_and_layout() -> None:
    env = PushTEnv()
    _, info = env.reset(seed=5)
    kp = block_keypoints(info["block_pose"])
    # same frame convention as the simulator (body origin, counter-clockwise angle)
    via_pymunk = np.array([env.sim.block.local_to_world(tuple(p)) for p in BLOCK_LOCAL_KEYPOINTS])
    np.testing.assert_allclose(kp, via_pymunk, atol=1e-9)
    # vectorised over leading dims; layout = 9 (x, y) pairs then the agent
    poses = np.array([[[10.0, 20.0, 0.0], [100.0, 50.0, 1.0]]])  # (1, 2, 3)
    kps = block_keypoints(poses)
    assert kps.shape == (1, 2, 9, 2)
    np.testing.assert_allclose(kps[0, 0], BLOCK_LOCAL_KEYPOINTS + [10.0, 20.0])
    agent = np.array([[[1.0, 2.0], [3.0, 4.0]]])
    low = lowdim_keypoint_obs(kps, agent)
    assert low.shape == (1, 2, 20)
    np.testing.assert_array_equal(low[0, 1, :18], kps[0, 1].reshape(-1))
    np.testing.assert_array_equal(low[0, 1, 18:], [3.0, 4.0])
    with pytest.raises(ValueError):
        lowdim_keypoint_obs(kps, agent[0, 0])


def test_local_keypoints_reproduce_diffusion_policy_procedure() -> None:
    np.testing.assert_allclose(derive_block_local_keypoints(), BLOCK_LOCAL_KEYPOINTS, atol=1e-9)


def test_seeding_is_bitwise_reproducible() -> None:
    actions = _random_actions(15, seed=7)

    def rollout(env: PushTEnv, seed: int) -> list[bytes]:
        obs, info = env.reset(seed=seed)
        out = [obs["state"].tobytes(), info["block_pose"].tobytes()]
        for a in actions:
            obs, reward, _, _, info = env.step(a)
            out += [obs["state"].tobytes(), info["block_pose"].tobytes(), np.float64(reward).tobytes()]
        return out

    env_a, env_b = PushTEnv(), PushTEnv()
    first = rollout(env_a, 123)
    assert first == rollout(env_b, 123)  # a fresh env
    assert first == rollout(env_a, 123)  # the same env reused
    assert first[0] != rollout(env_b, 124)[0]


def test_custom_goal_changes_coverage_success_and_drawing() -> None:
    custom, default = PushTEnv(goal_pose=CUSTOM_GOAL, render_size=512), PushTEnv(render_size=512)
    on_custom = {"reset_to_state": reset_state_for_pose((40.0, 40.0), CUSTOM_GOAL)}
    _, info_c = custom.reset(options=on_custom)
    _, info_d = default.reset(options=on_custom)
    np.testing.assert_allclose(info_c["block_pose"], CUSTOM_GOAL, atol=1e-9)
    np.testing.assert_allclose(info_c["goal_pose"], CUSTOM_GOAL)
    assert info_c["coverage"] > 0.999 and info_c["is_success"]
    assert info_d["coverage"] < 0.9 and not info_d["is_success"]
    _, reward_c, terminated_c, _, _ = custom.step([40.0, 40.0])
    _, reward_d, terminated_d, _, _ = default.step([40.0, 40.0])
    assert terminated_c and reward_c == 1.0
    assert not terminated_d and reward_d < 1.0

    # the drawn goal region follows the goal: centroid of the light-green pixels = goal origin + R(angle) @ (0, c)
    # (c = area centroid of the T along its axis); block parked in a corner so it hides nothing
    away = {"reset_to_state": reset_state_for_pose((470.0, 470.0), (90.0, 400.0, 0.0))}
    c_local = (120 * 30 * 15 + 30 * 90 * 75) / (120 * 30 + 30 * 90)
    for env, goal in ((custom, CUSTOM_GOAL), (default, DEFAULT_GOAL_POSE)):
        env.reset(options=away)
        frame = env.render()
        assert frame.shape == (512, 512, 3) and frame.dtype == np.uint8
        ys, xs = np.nonzero(np.all(frame == (144, 238, 144), axis=-1))
        expected = np.array([goal[0] - math.sin(goal[2]) * c_local, goal[1] + math.cos(goal[2]) * c_local])
        np.testing.assert_allclose([xs.mean(), ys.mean()], expected, atol=2.0)


def test_reset_to_state_passthrough_keeps_legacy_order() -> None:
    env = PushTEnv()
    state = [100.0, 120.0, 250.0, 260.0, 1.0]
    obs, info = env.reset(options={"reset_to_state": state})
    np.testing.assert_allclose(info["agent_pos"], state[:2])
    assert info["block_pose"][2] == pytest.approx(1.0)
    # position is set before the angle, so the rotation about the CoG (0, 45) moves the origin (documented quirk)
    assert np.linalg.norm(info["block_pose"][:2] - state[2:4]) > 10
    with pytest.raises(ValueError, match="reset_to_state"):
        env.reset(options={"reset_to_state": [1.0, 2.0]})
    with pytest.raises(ValueError, match="only the option"):
        env.reset(options={"reset_to": state})


def test_invalid_actions_raise_and_out_of_range_is_clipped() -> None:
    env = PushTEnv()
    with pytest.raises(RuntimeError, match="reset"):
        env.step([1.0, 2.0])
    env.reset(seed=0)
    with pytest.raises(ValueError, match="nan"):
        env.step(np.array([np.nan, 10.0]))
    with pytest.raises(ValueError, match="finite"):
        env.step([np.inf, 10.0])
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        env.step([1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros((1, 2)))
    env.step(np.array([-50.0, 900.0], dtype=np.float32))
    np.testing.assert_array_equal(env.sim._last_action, [0.0, 512.0])


def test_truncation_at_max_episode_steps() -> None:
    env = PushTEnv(max_episode_steps=3)
    env.reset(seed=0)
    flags = [env.step([256.0, 256.0])[3] for _ in range(3)]
    assert flags == [False, False, True]


def test_registry() -> None:
    assert "pusht" in available_envs()
    env = make_env("pusht", obs_mode="keypoints", max_episode_steps=10)
    assert isinstance(env, PushTEnv) and env.max_episode_steps == 10
    with pytest.raises(ValueError, match="pusht"):
        make_env("no-such-env")
    with pytest.raises(ValueError, match=r"env 'pusht' does not take .*'obs_mod'"):
        make_env("pusht", obs_mod="keypoints")
    with pytest.raises(ValueError, match="already registered"):
        register_env("pusht", PushTEnv)
