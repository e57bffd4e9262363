"""Scripted robomimic experts and `fm-policy collect --env robomimic/<task>` on the real simulator.

One seeded episode per task (1-3 CPU seconds each); the success rates over 100 seeds are a benchmark
(`python -m fm_policy.datasets.experts.robomimic --task T --episodes 100`, docs/results/robomimic.md).
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("robomimic")
pytest.importorskip("robosuite")
torch = pytest.importorskip("torch")

from fm_policy.datasets.experts.robomimic import RobomimicExpert, run_episode, wrap  # noqa: E402
from fm_policy.datasets.recorders import make_recorder  # noqa: E402
from fm_policy.datasets.replay_buffer import ReplayBuffer  # noqa: E402
from fm_policy.envs.registry import make_env  # noqa: E402
from fm_policy.envs.robomimic import STATE_KEYS, RobomimicEnv  # noqa: E402

from fm_policy.cli import main as cli_main  # noqa: E402


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)


@pytest.mark.parametrize("task", ["lift", "can", "square"])
def test_expert_solves_a_seeded_episode(task):
    env = make_env(f"robomimic/{task}")
    try:
        success, steps = run_episode(env, RobomimicExpert(task), env_seed=3, expert_seed=3)
    finally:
        env.close()
    assert success, f"{task} expert failed on seed 3 after {steps} steps"
    assert steps < 300


def test_expert_rejects_unknown_task_and_wraps_symmetric_yaws():
    with pytest.raises(ValueError, match="no scripted robomimic expert for task 'stack'"):
        RobomimicExpert("stack")
    assert wrap(np.radians(100), np.pi / 2) == pytest.approx(np.radians(10))
    assert wrap(np.radians(-170), np.pi) == pytest.approx(np.radians(10))


def test_collect_cli_stores_replayable_demos(tmp_path, capsys):
    """The collected store holds the robomimic keys, `state`, `sim_state` and robomimic's env_args; resetting to
    (env seed, first sim_state) and replaying the stored actions reproduces every stored state exactly."""
    out = tmp_path / "lift.zarr"
    assert cli_main(["collect", "--env", "robomimic/lift", "--episodes", "2", "--out", str(out), "--no-progress"]) == 0
    assert "wrote 2 episodes" in capsys.readouterr().out
    buffer = ReplayBuffer.open(out)
    assert set(buffer.keys) >= {"action", "state", "sim_state", *STATE_KEYS}
    assert buffer.array("action").shape[1] == 7 and buffer.array("state").shape[1] == 19
    source = buffer.attrs["source"]
    assert source["env"] == "robomimic/lift" and source["expert"]["name"].startswith("RobomimicExpert/lift")

    env = RobomimicEnv.from_env_args(source["env_args"], max_episode_steps=400)
    try:
        episode = buffer.get_episode(1)
        env_seed = int(buffer.meta["env_seed"][1])
        obs, _ = env.reset(seed=env_seed, options={"state": episode["sim_state"][0]})
        np.testing.assert_array_equal(obs["state"], episode["state"][0])
        for t, action in enumerate(episode["action"]):
            np.testing.assert_array_equal(env.get_state(), episode["sim_state"][t])
            obs, _, terminated, _, info = env.step(action)
        assert terminated and info["is_success"]  # the demo ends at its first successful step
    finally:
        env.close()
    from fm_policy.eval.demo_replay import replay_store

    summary = replay_store(str(out))  # the package's open-loop replay agrees on both demos
    assert summary.env == "robomimic" and all(e.success and e.gap_max == 0.0 for e in summary.episodes)


def test_recorder_rejects_unknown_observation_modes():
    with pytest.raises(ValueError, match="'state' and '<camera>_image'"):
        make_recorder("robomimic/lift", obs_modes=("state", "keypoints"))


def test_low_dim_env_renders_video_frames_lazily():
    """Videos of low-dim envs: no GL context until the first render(), then a mujoco.Renderer on `render_camera`
    that follows robosuite's model rebuild on every hard reset."""
    env = make_env("robomimic/lift", render_size=64)
    try:
        assert env._renderer is None
        env.reset(seed=0)
        first = env.render()
        assert first.shape == (64, 64, 3) and first.dtype == np.uint8 and first.std() > 0
        env.reset(seed=1)  # new model (cube re-sampled): the renderer is rebuilt for it
        assert not np.array_equal(env.render(), first)
    finally:
        env.close()
    assert env._renderer is None


def test_recorder_stores_camera_images():
    """`--obs state,agentview_image`: uint8 HWC frames stored next to the low-dim keys, one per step."""
    recorder = make_recorder("robomimic/lift", obs_modes=("state", "agentview_image"), image_size=32)
    try:
        episode = recorder.record(env_seed=4, planner_seed=4)
    finally:
        recorder.env.close()
    assert episode.success
    images = episode.data["agentview_image"]
    assert images.dtype == np.uint8 and images.shape == (episode.steps, 32, 32, 3)
    assert images[0].std() > 0 and not np.array_equal(images[0], images[-1])  # the arm moved between them
    assert recorder.dataset_attrs()["obs_modes"] == ["state", "agentview_image"]
