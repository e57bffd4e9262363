"""`fm-policy collect`: real Push-T expert episodes into zarr; reproducible across workers, safe on interruption."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from fm_policy.datasets import collect as collect_module
from fm_policy.datasets.collect import CollectConfig, collect
from fm_policy.datasets.replay_buffer import ReplayBuffer
from fm_policy.envs import goal_keypoint_obs
from fm_policy.envs.pusht import DEFAULT_GOAL_POSE

from fm_policy.cli import main

pytestmark = pytest.mark.slow
SEED = 3  # env seeds 3, 4, 5: the expert solves them in ~100 steps each


def _arrays(path: str) -> dict[str, np.ndarray]:
    with ReplayBuffer.open(path) as buffer:
        out = {f"data/{k}": v for k, v in buffer.load().items()}
        out.update({f"meta/{k}": np.asarray(buffer.meta[k][:]) for k in buffer.meta.array_keys()})
        return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("ref") / "pusht.zarr")
    collect(CollectConfig(episodes=2, out=out, seed=SEED, obs=("state", "keypoints", "image")), progress=False)
    return out


def test_store_layout_and_attributes(reference):
    with ReplayBuffer.open(reference) as buffer:
        assert buffer.n_episodes == 2
        assert buffer.keys == ["action", "goal", "img", "keypoint", "n_contacts", "state"]
        np.testing.assert_array_equal(buffer.array("goal")[:], np.tile(goal_keypoint_obs(DEFAULT_GOAL_POSE),
                                                                       (buffer.n_steps, 1)).astype(np.float32))
        assert buffer.array("img").dtype == np.uint8 and buffer.array("img").shape[1:] == (96, 96, 3)
        assert buffer.array("keypoint").shape[1:] == (9, 2)
        np.testing.assert_array_equal(buffer.meta["env_seed"][:], [SEED, SEED + 1])
        attrs = buffer.attrs
        assert attrs["fm_policy_collect"]["complete"] is True
        assert attrs["source"]["env_id"] == "gym_pusht/PushT-v0"
        assert attrs["source"]["env_versions"]["gym-pusht"] == "0.1.8"
        assert attrs["source"]["expert"]["config"], "expert settings are recorded"
        assert attrs["source"]["obs_modes"] == ["state", "keypoints", "image"]
        assert attrs["source"]["goal_poses"] == [list(DEFAULT_GOAL_POSE)]


def test_stored_actions_replay_the_episode(reference):
    """Actions are stored as executed: replaying them from the stored start reaches success again."""
    from fm_policy.envs import make_env

    episode = ReplayBuffer.open(reference).get_episode(0)
    env = make_env("pusht", obs_mode="state")
    obs, _ = env.reset(seed=SEED)
    np.testing.assert_array_equal(obs["state"], episode["state"][0])
    for t, action in enumerate(episode["action"]):
        np.testing.assert_allclose(obs["state"], episode["state"][t], atol=1e-3)
        obs, _, terminated, _, info = env.step(action)
    assert terminated and info["is_success"]


def test_bitwise_identical_with_two_workers(reference, tmp_path):
    out = str(tmp_path / "two_workers.zarr")
    collect(CollectConfig(episodes=2, out=out, seed=SEED, workers=2, obs=("state", "keypoints", "image")),
            progress=False)
    ref, got = _arrays(reference), _arrays(out)
    assert ref.keys() == got.keys()
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_interrupted_collection_never_looks_complete_and_resumes(reference, tmp_path, monkeypatch):
    out = str(tmp_path / "interrupted.zarr")
    config = CollectConfig(episodes=2, out=out, seed=SEED, obs=("state", "keypoints", "image"))
    real = collect_module._run_candidate

    def killed_on_second(index, seed, max_retries):
        if index == 1:
            raise KeyboardInterrupt
        return real(index, seed, max_retries)

    monkeypatch.setattr(collect_module, "_run_candidate", killed_on_second)
    with pytest.raises(KeyboardInterrupt, match="1 episodes are committed"):
        collect(config, progress=False)
    assert not (tmp_path / "interrupted.zarr").exists()
    partial = ReplayBuffer.open(out + ".partial")
    assert partial.n_episodes == 1 and partial.attrs["fm_policy_collect"]["complete"] is False
    # as if killed in the middle of the next append: a data array runs past the last commit
    import zarr

    zarr.open_group(out + ".partial", mode="a")["data/action"].resize((partial.n_steps + 5, 2))

    monkeypatch.setattr(collect_module, "_run_candidate", real)
    collect(config, progress=False)
    ref, got = _arrays(reference), _arrays(out)
    for key in ref:
        np.testing.assert_array_equal(got[key], ref[key], err_msg=key)


def test_cli_errors_are_one_line(tmp_path, reference, capsys):
    assert main(["collect", "--episodes", "1", "--out", reference, "--no-progress"]) == 2
    assert "already exists" in capsys.readouterr().err
    assert main(["collect", "--episodes", "1", "--out", str(tmp_path / "x.zarr"), "--obs", "lidar"]) == 2
    assert "unknown Push-T observation modes ['lidar']" in capsys.readouterr().err
    assert main(["dataset", "info", str(tmp_path / "missing.zarr")]) == 2
    assert "no such file or directory" in capsys.readouterr().err


def test_dataset_info_describes_the_store(reference, capsys):
    assert main(["dataset", "info", reference]) == 0
    text = capsys.readouterr().out
    for expected in ("episodes   2", "img", "96, 96, 3)", "uint8", "blosc", "keypoint", "statistics", "gym_pusht"):
        assert expected in text
    assert main(["dataset", "info", reference, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["keys"]["action"]["shape"][1:] == [2] and len(summary["keys"]["action"]["stats"]["min"]) == 2


def test_plain_zarr_reads_the_store_without_fm_policy(reference):
    """What a diffusion_policy user's code sees: zarr alone, the data/ + meta/episode_ends layout."""
    script = f"""
import sys, zarr, numpy as np
root = zarr.open_group({reference!r}, mode="r")
ends = root["meta"]["episode_ends"][:]
assert ends.dtype == np.int64 and len(ends) == 2
for key in ("action", "state", "keypoint", "img", "n_contacts"):
    assert root["data"][key].shape[0] == ends[-1], key
assert not any(name.startswith("fm_policy") for name in sys.modules)
print("ok", int(ends[-1]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok")


def test_open_loop_replay_reproduces_the_store_and_catches_a_tampered_one(reference, tmp_path, capsys):
    """`fm-policy dataset replay`: a collected store replays exactly and every episode succeeds again; the same
    episodes with actions nudged 25 px diverge, and the report says where. A store without its env is refused."""
    from fm_policy.eval.demo_replay import replay_store

    from fm_policy.errors import UserError

    good = replay_store(reference)
    assert good.env == "pusht" and [e.success for e in good.episodes] == [True, True]
    assert max(e.gap_max for e in good.episodes) < 1e-3 and all(e.diverged_at is None for e in good.episodes)

    with ReplayBuffer.open(reference) as buffer:
        tampered = ReplayBuffer.create(tmp_path / "tampered.zarr", attrs=buffer.attrs)
        bare = ReplayBuffer.create(tmp_path / "bare.zarr")
        for i in range(buffer.n_episodes):
            ep = buffer.get_episode(i, ["state", "action"])
            bare.add_episode(ep)
            ep["action"] = ep["action"] + np.float32(25.0)
            tampered.add_episode(ep)
    bad = replay_store(str(tmp_path / "tampered.zarr"))
    assert all(e.diverged_at is not None and e.diverged_at < 10 for e in bad.episodes)
    assert min(e.gap_max for e in bad.episodes) > 5.0

    with pytest.raises(UserError, match="--env pusht"):
        replay_store(str(tmp_path / "bare.zarr"))
    assert main(["dataset", "replay", str(tmp_path / "bare.zarr"), "--env", "pusht", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["episodes"] == 2 and report["diverged_fraction"] == 0.0


def test_dart_collection_labels_the_expert_and_replays_what_ran(tmp_path, capsys):
    """`--action-noise`: the env executes the expert's target plus noise; `action` is the expert's target, and the
    store replays exactly from `executed_action`. Bad values are usage errors."""
    from fm_policy.eval.demo_replay import replay_store

    out = str(tmp_path / "dart.zarr")
    assert main(["collect", "--env", "pusht", "--episodes", "1", "--seed", str(SEED), "--action-noise", "3",
                 "--out", out, "--no-progress"]) == 0
    with ReplayBuffer.open(out) as buffer:
        ep = buffer.get_episode(0, ["action", "executed_action"])
        noise = ep["executed_action"] - ep["action"]
        assert 1.5 < noise.std() < 4.5 and abs(noise.mean()) < 1.0
        assert buffer.attrs["source"]["expert"]["action_noise"] == 3.0
        assert "action_noise" not in buffer.attrs["source"]["env_kwargs"]  # the env itself is unchanged
    summary = replay_store(out)
    assert summary.episodes[0].success and summary.episodes[0].gap_max < 1e-3
    capsys.readouterr()
    with pytest.raises(SystemExit):
        main(["collect", "--env", "pusht", "--episodes", "1", "--action-noise", "-1", "--out", str(tmp_path / "x")])
    assert "--action-noise" in capsys.readouterr().err
