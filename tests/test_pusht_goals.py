"""Goal-aware Push-T: the `goal` observation, goal sets chosen by reset seed, the `goal` key of stores (collected, or
derived for stores without one such as diffusion_policy's human demos), and a goal-aware policy from collection
through training to a harness rollout under the same goal set."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("gym_pusht")

from fm_policy.datasets.errors import DatasetError
from fm_policy.datasets.policy_data import DataConfig, build_policy_data, load_policy_arrays
from fm_policy.datasets.replay_buffer import ReplayBuffer
from fm_policy.envs import PushTEnv, env_kwargs_for_obs_keys, goal_keypoint_obs, make_env
from fm_policy.envs.pusht import DEFAULT_GOAL_POSE, reset_state_for_pose
from fm_policy.envs.pusht_spec import parse_goals

from fm_policy.cli import main
from fm_policy.errors import UserError

CUSTOM_GOAL = (190.0, 310.0, -1.0)
GOALS = [[256.0, 256.0, math.pi / 4], list(CUSTOM_GOAL), [300.0, 200.0, 0.3]]


@pytest.mark.parametrize("goal_pose", [None, CUSTOM_GOAL])
def test_goal_observation_is_the_goal_pose_as_keypoints(goal_pose) -> None:
    env = PushTEnv(obs_mode="keypoints,goal", goal_pose=goal_pose)
    expected_pose = DEFAULT_GOAL_POSE if goal_pose is None else goal_pose
    np.testing.assert_allclose(env.goal_pose, expected_pose)
    obs, info = env.reset(seed=2)
    assert set(obs) == {"keypoints", "goal"} and obs["goal"].shape == (18,) and obs["goal"].dtype == np.float32
    np.testing.assert_array_equal(obs["goal"], goal_keypoint_obs(env.goal_pose).astype(np.float32))
    np.testing.assert_allclose(info["goal_pose"], expected_pose)
    assert env.observation_space.contains(obs)
    obs2, *_ = env.step([200.0, 200.0])
    np.testing.assert_array_equal(obs2["goal"], obs["goal"])  # constant within an episode
    # same frame and order as the block keypoints: a block resting on its goal shows keypoints == goal
    obs, info = env.reset(options={"reset_to_state": reset_state_for_pose((40.0, 40.0), expected_pose)})
    assert info["is_success"]
    np.testing.assert_allclose(obs["keypoints"][:18], obs["goal"], atol=1e-3)


def test_policy_keys_select_the_goal_mode() -> None:
    assert env_kwargs_for_obs_keys("pusht", ["keypoints", "goal"]) == {"obs_mode": "keypoints,goal"}
    env = make_env("pusht", **env_kwargs_for_obs_keys("pusht", ["goal", "image", "agent_pos"]))
    obs, _ = env.reset(seed=0)
    assert set(obs) == {"image", "agent_pos", "goal"}


def test_goal_set_is_chosen_deterministically_from_the_seed() -> None:
    a, b = PushTEnv(obs_mode="state,goal", goal_poses=GOALS), PushTEnv(obs_mode="goal", goal_poses=GOALS)
    with pytest.raises(RuntimeError, match="chosen at reset"):
        a.goal_pose  # noqa: B018
    np.testing.assert_allclose(a.goal_poses, GOALS)
    for seed in (0, 1, 2, 3, 7, 100001):
        obs, info = a.reset(seed=seed)
        expected = GOALS[seed % len(GOALS)]
        assert a.goal_index_for_seed(seed) == seed % len(GOALS)
        np.testing.assert_allclose(a.goal_pose, expected)
        np.testing.assert_allclose(info["goal_pose"], expected)  # the sim's coverage / success use it
        np.testing.assert_allclose(a.sim.goal_pose, expected)
        np.testing.assert_array_equal(obs["goal"], goal_keypoint_obs(expected).astype(np.float32))
        np.testing.assert_array_equal(b.reset(seed=seed)[0]["goal"], obs["goal"])  # another env, same seed
    # success is measured against the episode's goal: a block placed on goal 2 succeeds in a seed-2 episode only
    on_goal_2 = {"reset_to_state": reset_state_for_pose((40.0, 40.0), GOALS[2])}
    assert a.reset(seed=2, options=on_goal_2)[1]["is_success"]
    assert not a.reset(seed=0, options=on_goal_2)[1]["is_success"]
    a.reset()  # no seed: a goal of the set, from the env's RNG
    assert any(np.allclose(a.goal_pose, g) for g in GOALS)


def test_bad_goal_options_are_clear(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cases = [
        ({"goal_poses": []}, "non-empty list"),
        ({"goal_poses": "256,256,0"}, "non-empty list"),
        ({"goal_poses": [[256, 256, 0], [1, 2]]}, r"goal_poses\[1\] must be 3 finite numbers"),
        ({"goal_poses": [[256, 256, float("nan")]]}, r"goal_poses\[0\] must be 3 finite"),
        ({"goal_poses": [[700, 256, 0]]}, r"goal_poses\[0\] .*workspace"),
        ({"goal_pose": [256, 256, 0], "goal_poses": [[256, 256, 0]]}, "not both"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UserError, match=message):
            make_env("pusht", **kwargs)
    assert parse_goals("1,2,3; 4,5,6;") == [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]]
    for text in ("", ";", "1,2,3;4,5"):
        with pytest.raises(ValueError, match="goal"):
            parse_goals(text)
    out = str(tmp_path / "x.zarr")
    with pytest.raises(SystemExit) as exit_info:  # a malformed value is argparse's usage error
        main(["collect", "--goals", "256,256,0;1,2", "--out", out])
    assert exit_info.value.code == 2 and "expected 3 numbers X,Y,ANGLE" in capsys.readouterr().err
    assert main(["collect", "--goals", "256,256,0;900,2,0", "--out", out, "--episodes", "1"]) == 2
    assert "goal_poses[1]" in capsys.readouterr().err


def _human_like_store(path: Path, attrs: dict | None = None) -> str:
    """diffusion_policy's Push-T field layout (state, keypoint, action) with no `goal` key."""
    buffer = ReplayBuffer.create(str(path), attrs=attrs)
    rng = np.random.default_rng(0)
    for _ in range(2):
        state = rng.uniform(100, 400, (12, 5)).astype(np.float32)
        keypoint = rng.uniform(100, 400, (12, 9, 2)).astype(np.float32)
        buffer.add_episode({"state": state, "keypoint": keypoint, "action": state[:, :2].copy()})
    return str(path)


@pytest.mark.parametrize("storage", ["memory", "stream"])
def test_store_without_goal_key_derives_its_single_goal(tmp_path: Path, storage: str) -> None:
    def goals_of(path: str) -> np.ndarray:
        data = build_policy_data(DataConfig(path=path, obs_keys=["keypoints", "goal"], val_ratio=0.0,
                                            storage=storage), horizon=4, n_obs_steps=2, n_action_steps=2)
        return np.asarray(data.arrays["goal"][np.arange(24)])

    human = _human_like_store(tmp_path / "human.zarr")  # no attributes at all: gym-pusht's default goal
    np.testing.assert_array_equal(goals_of(human), np.tile(goal_keypoint_obs(DEFAULT_GOAL_POSE), (24, 1))
                                  .astype(np.float32))
    # an older collected store records its one goal
    older = _human_like_store(tmp_path / "older.zarr", {"source": {"env": "pusht", "goal_pose": list(CUSTOM_GOAL)}})
    np.testing.assert_allclose(goals_of(older)[5], goal_keypoint_obs(CUSTOM_GOAL), atol=1e-4)
    # several goals and no per-step record, or another env's store: refused, naming the store and key
    several = _human_like_store(tmp_path / "several.zarr", {"source": {"env": "pusht", "goal_pose": None,
                                                                      "goal_poses": GOALS}})
    with pytest.raises(DatasetError, match=r"several.zarr, key 'goal': .*3 goals"):
        goals_of(several)
    other = _human_like_store(tmp_path / "other.zarr", {"source": {"env": "kitchen"}})
    with pytest.raises(DatasetError, match="env 'kitchen'"):
        goals_of(other)


@pytest.mark.slow
def test_goal_aware_policy_collect_train_eval(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Two expert demos under a two-goal set (env seeds 4 and 5 get goals 0 and 1), a tiny policy on
    `[keypoints, goal]`, and `fm-policy eval` with the same `--goals`."""
    from fm_policy.factory import load_policy
    from fm_policy.train import load_train_config, train

    goals_text = f"256,256,{math.pi / 4!r};190,310,-1.0"
    goals = parse_goals(goals_text)
    store = str(tmp_path / "goals.zarr")
    assert main(["collect", "--env", "pusht", "--goals", goals_text, "--episodes", "2", "--seed", "4",
                 "--out", store, "--no-progress"]) == 0
    capsys.readouterr()
    with ReplayBuffer.open(store) as buffer:
        assert "goal" in buffer.keys and buffer.array("goal").shape[1:] == (18,)
        assert buffer.attrs["source"]["goal_poses"] == goals and buffer.attrs["source"]["goal_pose"] is None
        assert buffer.attrs["fm_policy_collect"]["generation"]["env_kwargs"] == {"goal_poses": goals}
        assert buffer.attrs["fm_policy_collect"]["skipped_env_seeds"] == []  # the expert solved both goals
        np.testing.assert_array_equal(buffer.meta["env_seed"][:], [4, 5])
        for episode, seed in enumerate((4, 5)):
            stored = buffer.get_episode(episode)["goal"]
            np.testing.assert_array_equal(stored, np.tile(goal_keypoint_obs(goals[seed % 2]), (len(stored), 1))
                                          .astype(np.float32))
        arrays = load_policy_arrays(buffer, ["keypoints", "goal"])  # the stored key, not the recipe
        np.testing.assert_array_equal(arrays["goal"], buffer.array("goal")[:])

    config = load_train_config(None, [
        f"data.path={store}", "data.obs_keys=[keypoints,goal]", "data.val_ratio=0.0", f"run_dir={tmp_path / 'run'}",
        "policy.network.kind=mlp", "policy.network.hidden_dims=[32,32]", "policy.network.time_embed_dim=16",
        "policy.horizon=8", "policy.n_action_steps=4", "loop.batch_size=16", "loop.steps=5", "loop.log_every=5",
        "loop.val_every=0", "loop.checkpoint_every=5", "loop.progress=false", "optim.warmup_steps=1",
    ])
    checkpoint = train(config) / "ema"
    assert load_policy(checkpoint).obs_shapes["goal"] == (18,)

    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(checkpoint), "--episodes", "2", "--num-steps", "1", "--goals",
                 goals_text, "--env-kwarg", "max_episode_steps=12", "--out", str(out), "--no-progress"]) == 0
    report = json.loads((out / "eval.json").read_text())
    assert report["env_info"]["env_kwargs"] == {"obs_mode": "keypoints,goal", "goal_poses": goals,
                                                "max_episode_steps": 12}
    episodes = report["settings"][0]["episodes"]
    assert [e["seed"] for e in episodes] == [100000, 100001] and all(e["steps"] <= 12 for e in episodes)
