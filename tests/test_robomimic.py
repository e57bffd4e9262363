"""Robomimic env wrapper and hdf5 converter on the real simulator (robosuite 1.4.1 through robomimic 0.3.0).

The hdf5 file is written here in robomimic's layout from real env steps (random actions), so the converter is tested
on what robomimic itself records: flattened MuJoCo states, low-dim observations under robomimic's key names, env_args.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("robomimic")
pytest.importorskip("robosuite")
h5py = pytest.importorskip("h5py")
torch = pytest.importorskip("torch")

from fm_policy.datasets.convert_robomimic import convert_robomimic  # noqa: E402
from fm_policy.datasets.errors import DatasetError  # noqa: E402
from fm_policy.datasets.replay_buffer import ReplayBuffer  # noqa: E402
from fm_policy.envs.registry import available_envs, make_env  # noqa: E402
from fm_policy.envs.robomimic import STATE_KEYS, RobomimicEnv, state_vector  # noqa: E402

from fm_policy.cli import main as cli_main  # noqa: E402

N_EPISODES, EPISODE_STEPS = 4, 24


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # 2 shared cores: more threads only contend


@pytest.fixture(scope="module")
def lift() -> RobomimicEnv:
    env = make_env("robomimic/lift", max_episode_steps=30)
    yield env
    env.close()


@pytest.fixture(scope="module")
def robomimic_hdf5(lift, tmp_path_factory) -> Path:
    """A small robomimic-layout file: a few short random-action Lift episodes plus a `mask/train` filter."""
    path = tmp_path_factory.mktemp("robomimic") / "low_dim.hdf5"
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        data = f.create_group("data")
        total = 0
        for i in range(N_EPISODES):
            obs, _ = lift.reset(seed=100 + i)
            rows: dict[str, list] = {"actions": [], "states": [], "rewards": [], "dones": []}
            obs_rows: dict[str, list] = {k: [] for k in STATE_KEYS}
            for t in range(EPISODE_STEPS):
                action = rng.uniform(-1, 1, 7)
                rows["states"].append(lift.get_state())
                for k in STATE_KEYS:
                    obs_rows[k].append(obs[k])
                obs, reward, *_ = lift.step(action)
                rows["actions"].append(action)
                rows["rewards"].append(reward)
                rows["dones"].append(float(t == EPISODE_STEPS - 1))
            demo = data.create_group(f"demo_{i}")
            demo.attrs["num_samples"] = EPISODE_STEPS
            demo.attrs["model_file"] = lift.get_model_xml()  # robomimic keeps each demo's scene XML
            for key, values in rows.items():
                demo.create_dataset(key, data=np.asarray(values))
            for key, values in obs_rows.items():
                demo.create_dataset(f"obs/{key}", data=np.asarray(values, dtype=np.float64))
            total += EPISODE_STEPS
        data.attrs["total"] = total
        data.attrs["env_args"] = json.dumps(lift.sim_env.serialize())
        f.create_dataset("mask/train", data=np.array([b"demo_0", b"demo_2", b"demo_3"]))
    return path


def test_registered_and_spaces(lift):
    assert {"robomimic/lift", "robomimic/can", "robomimic/square"} <= set(available_envs())
    space = lift.observation_space
    assert space["state"].shape == (19,)  # Lift object 10 + eef pos 3 + eef quat 4 + gripper 2
    assert {"state", *STATE_KEYS} == set(space.spaces)
    assert lift.action_space.shape == (7,)
    obs, info = lift.reset(seed=0)
    assert info == {"is_success": False}
    for _ in range(5):
        obs, reward, terminated, truncated, info = lift.step(lift.action_space.sample())
        assert space.contains(obs) and not terminated and not truncated
        np.testing.assert_array_equal(obs["state"], state_vector(obs))
    with pytest.raises(ValueError, match="shape"):
        lift.step(np.zeros(3))


def test_seeded_reset_and_reset_to_state_are_deterministic(lift):
    first, _ = lift.reset(seed=7)
    again, _ = lift.reset(seed=7)
    np.testing.assert_array_equal(first["state"], again["state"])
    other, _ = lift.reset(seed=8)
    assert not np.allclose(first["object"], other["object"])  # placements are randomised per seed

    lift.reset(seed=3)
    actions = np.random.default_rng(1).uniform(-1, 1, (6, 7))
    for a in actions[:2]:
        lift.step(a)
    # mj_step leaves body positions one substep behind qpos; forward() (which reset-to-state also runs) syncs them
    lift.robosuite_env.sim.forward()
    saved, model, saved_obs = lift.get_state(), lift.get_model_xml(), lift.sim_env.get_observation()
    lift.reset(seed=99)  # somewhere else entirely
    restored, _ = lift.reset(options={"state": saved, "model": model})
    np.testing.assert_allclose(lift.get_state(), saved)
    np.testing.assert_allclose(restored["state"], state_vector(saved_obs), atol=1e-6)
    # From a restored state and scene the same actions give the same trajectory. (Not quite the trajectory of the
    # original run: robosuite's gripper and controller keep state outside the MuJoCo state, so open-loop replay from
    # mid-episode drifts by millimetres. Without the model XML, Lift's cube size is re-sampled on reset.)
    first = [lift.step(a)[0]["state"] for a in actions[2:]]
    lift.reset(seed=5)
    lift.reset(options={"state": saved, "model": model})
    second = [lift.step(a)[0]["state"] for a in actions[2:]]
    np.testing.assert_allclose(np.array(first), np.array(second), atol=1e-6)
    with pytest.raises(ValueError, match="entries"):
        lift.reset(options={"state": saved[:-1]})


def test_truncates_at_step_limit(lift):
    lift.reset(seed=0)
    truncated = False
    for step in range(30):
        *_, truncated, _ = lift.step(np.zeros(7))
        assert truncated == (step == 29)


def test_convert_open_replay_and_train(robomimic_hdf5, tmp_path, lift):
    out = tmp_path / "lift.zarr"
    convert_robomimic(robomimic_hdf5, out, progress=False).close()
    with ReplayBuffer.open(out, required_keys=["state", "action"]) as buffer:
        assert buffer.n_episodes == N_EPISODES and buffer.n_steps == N_EPISODES * EPISODE_STEPS
        assert {"action", "state", "sim_state", "reward", "done", *STATE_KEYS} == set(buffer.keys)
        assert buffer.attrs["env_args"] == json.dumps(lift.sim_env.serialize())
        episode = buffer.get_episode(1)
        assert episode["state"].shape == (EPISODE_STEPS, 19) and episode["state"].dtype == np.float32
        np.testing.assert_array_equal(episode["state"], state_vector(episode))
        # the env rebuilt from the stored env_args and reset to a stored state reproduces the stored observation
        obs, _ = lift.reset(options={"state": episode["sim_state"][5]})
        # (to within the ~1 mm by which observations recorded after mj_step lag the state: see the test above)
        np.testing.assert_allclose(obs["state"], episode["state"][5], atol=5e-3)
        assert list(np.asarray(buffer.meta["demo_index"])) == [0, 1, 2, 3]

    from fm_policy.train import load_train_config, train

    config = load_train_config(None, [
        f"data.path={out}", "data.obs_keys=[state]", "data.val_ratio=0.25", f"run_dir={tmp_path / 'run'}",
        "policy.network.kind=mlp", "policy.network.hidden_dims=[32,32]", "policy.network.time_embed_dim=8",
        "loop.batch_size=8", "loop.steps=4", "loop.log_every=2", "loop.val_every=4", "loop.checkpoint_every=4",
        "loop.progress=false",
    ])
    checkpoint = train(config)
    assert checkpoint.exists()


def test_filter_and_cli(robomimic_hdf5, tmp_path, capsys):
    out = tmp_path / "train.zarr"
    assert cli_main(["convert", "robomimic", str(robomimic_hdf5), str(out), "--filter", "train", "--quiet",
                     "--obs-keys", ",".join(STATE_KEYS)]) == 0
    assert "3 episodes" in capsys.readouterr().out
    with ReplayBuffer.open(out) as buffer:
        assert list(np.asarray(buffer.meta["demo_index"])) == [0, 2, 3]
        assert buffer.attrs["robomimic_filter"] == "train"
    assert cli_main(["convert", "robomimic", str(robomimic_hdf5), str(out), "--quiet"]) == 2  # exists, no overwrite
    assert "already exists" in capsys.readouterr().err
    with pytest.raises(DatasetError, match="no filter 'valid'"):
        convert_robomimic(robomimic_hdf5, tmp_path / "x.zarr", filter_key="valid", progress=False)


def _malformed(path: Path, case: str) -> None:
    with h5py.File(path, "w") as f:
        if case == "no_data":
            f.create_group("stuff")
            return
        demo = f.create_group("data/demo_0")
        demo.create_dataset("obs/robot0_eef_pos", data=np.zeros((5, 3)))
        if case == "no_actions":
            demo.create_dataset("states", data=np.zeros((5, 32)))
        elif case == "length_mismatch":
            demo.create_dataset("actions", data=np.zeros((6, 7)))


@pytest.mark.parametrize(("case", "message"), [
    ("no_data", "no 'data' group"),
    ("no_actions", "has no 'actions'"),
    ("length_mismatch", "has 5 steps but 'actions' has 6"),
])
def test_malformed_files_raise_clear_errors(tmp_path, case, message):
    path = tmp_path / f"{case}.hdf5"
    _malformed(path, case)
    out = tmp_path / "out.zarr"
    with pytest.raises(DatasetError, match=message):
        convert_robomimic(path, out, progress=False)
    assert not out.exists()  # a failed conversion leaves nothing that looks like a store


def test_not_hdf5(tmp_path):
    path = tmp_path / "junk.hdf5"
    path.write_text("not hdf5")
    with pytest.raises(DatasetError, match="not a readable hdf5"):
        convert_robomimic(path, tmp_path / "out.zarr", progress=False)


def test_image_keys_convert_as_uint8(tmp_path):
    """Image observations stay uint8 HWC (robomimic's image.hdf5 layout); no state key without all low-dim keys."""
    path = tmp_path / "image.hdf5"
    with h5py.File(path, "w") as f:
        for i, n in enumerate((5, 3)):
            demo = f.create_group(f"data/demo_{i}")
            demo.create_dataset("actions", data=np.zeros((n, 7)))
            demo.create_dataset("obs/agentview_image", data=np.full((n, 84, 84, 3), i, np.uint8))
            demo.create_dataset("obs/robot0_eef_pos", data=np.zeros((n, 3)))
    with convert_robomimic(path, tmp_path / "image.zarr", progress=False) as buffer:
        assert set(buffer.keys) == {"action", "agentview_image", "robot0_eef_pos"}
        images = buffer.array("agentview_image")
        assert images.dtype == np.uint8 and images.shape == (8, 84, 84, 3)
        assert int(images[7, 0, 0, 0]) == 1 and "env_args" not in buffer.attrs


# -- absolute actions (rotation-6d) --------------------------------------------------------------------------------


def test_rot6d_round_trip_and_pytorch3d_layout():
    from fm_policy.datasets.rotations import (
        axis_angle_to_rot6d,
        matrix_to_rot6d,
        rot6d_to_axis_angle,
        rot6d_to_matrix,
    )
    from scipy.spatial.transform import Rotation

    rotations = Rotation.random(200, random_state=0)
    matrices = rotations.as_matrix().reshape(10, 20, 3, 3)  # leading dims are kept
    rot6d = matrix_to_rot6d(matrices)
    assert rot6d.shape == (10, 20, 6)
    np.testing.assert_array_equal(rot6d[3, 4], matrices[3, 4, :2, :].ravel())  # first two rows, as pytorch3d
    np.testing.assert_allclose(rot6d_to_matrix(rot6d), matrices, atol=1e-12)
    rotvec = rotations.as_rotvec().reshape(10, 20, 3)
    back = rot6d_to_axis_angle(axis_angle_to_rot6d(rotvec))
    angle = (Rotation.from_rotvec(back.reshape(-1, 3)) * rotations.inv()).magnitude()
    assert back.shape == (10, 20, 3) and angle.max() < 1e-9
    # an unnormalised, non-orthogonal 6d vector (a policy's output) still gives a proper rotation
    noisy = rot6d_to_matrix(3.0 * rot6d + np.random.default_rng(0).normal(scale=0.1, size=rot6d.shape))
    np.testing.assert_allclose(noisy @ np.swapaxes(noisy, -1, -2), np.broadcast_to(np.eye(3), noisy.shape),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.det(noisy), 1.0, atol=1e-12)
    with pytest.raises(ValueError, match="parallel"):
        rot6d_to_matrix([1.0, 0, 0, 2.0, 0, 0])


@pytest.fixture(scope="module")
def lift_abs() -> RobomimicEnv:
    env = make_env("robomimic/lift", abs_actions=True, max_episode_steps=30)
    yield env
    env.close()


def test_abs_action_env_space_and_validation(lift_abs):
    assert lift_abs.action_space.shape == (10,)
    lift_abs.reset(seed=0)  # a hard reset rebuilds the robots: the controller must still take absolute goals
    assert all(not robot.controller.use_delta for robot in lift_abs.robosuite_env.robots)
    with pytest.raises(ValueError, match=r"shape \(10,\)"):
        lift_abs.step(np.zeros(7))
    with pytest.raises(ValueError, match="finite"):
        lift_abs.step(np.r_[np.nan, np.zeros(9)])
    with pytest.raises(ValueError, match="invalid rotation-6d"):
        lift_abs.step(np.zeros(10))


def test_convert_abs_actions_and_replay(robomimic_hdf5, tmp_path, lift_abs, capsys):
    """The converted absolute actions, replayed open loop in an abs-action env from each demo's first state,
    reproduce the recorded (delta-action) end-effector trajectory."""
    from fm_policy.datasets.rotations import rot6d_to_matrix
    from scipy.spatial.transform import Rotation

    out = tmp_path / "abs.zarr"
    assert cli_main(["convert", "robomimic", str(robomimic_hdf5), str(out), "--abs-actions", "--quiet"]) == 0
    assert "action_delta" in capsys.readouterr().out
    deviations = []
    with ReplayBuffer.open(out, required_keys=["state", "action", "action_delta"]) as buffer:
        assert buffer.attrs["action_space"] == "osc_pose_abs_rot6d"
        with h5py.File(robomimic_hdf5) as f:
            deltas = [np.asarray(f[f"data/demo_{i}/actions"]) for i in range(N_EPISODES)]
            models = [f[f"data/demo_{i}"].attrs["model_file"] for i in range(N_EPISODES)]
        for i in range(N_EPISODES):
            episode = buffer.get_episode(i)
            action, delta = episode["action"], episode["action_delta"]
            assert action.shape == (EPISODE_STEPS, 10) and action.dtype == np.float32
            np.testing.assert_array_equal(delta, deltas[i].astype(np.float32))
            np.testing.assert_array_equal(action[:, 9], delta[:, 6])  # gripper unchanged
            # the goal is the end-effector pose of the step's state moved by the scaled delta (OSC_POSE: 5 cm and
            # 0.5 rad per unit, rotation applied in the world frame)
            sim, site = lift_abs.robosuite_env.sim, lift_abs.robosuite_env.robots[0].eef_site_id
            for t in range(EPISODE_STEPS):
                sim.set_state_from_flattened(episode["sim_state"][t])
                sim.forward()
                np.testing.assert_allclose(action[t, :3], sim.data.site_xpos[site] + 0.05 * delta[t, :3], atol=1e-6)
                goal = Rotation.from_rotvec(0.5 * delta[t, 3:6]).as_matrix() @ sim.data.site_xmat[site].reshape(3, 3)
                np.testing.assert_allclose(rot6d_to_matrix(action[t, 3:9]), goal, atol=1e-6)
            # replay from the demo's first state and scene (Lift's cube size is re-sampled on every hard reset):
            # eef after step t against the recorded observation before step t + 1
            lift_abs.reset(options={"state": episode["sim_state"][0], "model": models[i]})
            replayed = np.array([lift_abs.step(a)[0]["robot0_eef_pos"] for a in action[:-1]])
            deviations.append(np.linalg.norm(replayed - episode["robot0_eef_pos"][1:], axis=1).max())
    # measured 0.22-0.45 mm; the residual is simulator state that robomimic's flattened states do not hold
    # (docs/results/robomimic.md). Replaying the *delta* actions the same way drifts by 5-8 mm.
    assert max(deviations) < 2e-3, deviations


@pytest.mark.parametrize(("case", "message"), [
    ("no_env_args", "no env_args"),
    ("no_states", "have no 'states'"),
])
def test_abs_actions_need_env_args_and_states(tmp_path, lift, case, message):
    path = tmp_path / f"{case}.hdf5"
    with h5py.File(path, "w") as f:
        demo = f.create_group("data/demo_0")
        demo.create_dataset("actions", data=np.zeros((5, 7)))
        demo.create_dataset("obs/robot0_eef_pos", data=np.zeros((5, 3)))
        if case == "no_states":
            f["data"].attrs["env_args"] = json.dumps(lift.sim_env.serialize())
    out = tmp_path / "out.zarr"
    with pytest.raises(DatasetError, match=message):
        convert_robomimic(path, out, abs_actions=True, progress=False)
    assert not out.exists()
