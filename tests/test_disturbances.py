"""Disturbed rollouts: observation noise, shoves, perturbed initial noise (fm_policy.eval.disturbances), on real
Push-T with scripted policies."""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar

import gymnasium as gym
import numpy as np
import pytest
import torch

pytest.importorskip("gym_pusht")

from fm_policy.envs import PushTEnv, register_env
from fm_policy.envs.pusht import T_CENTER_OF_GRAVITY, reset_state_for_pose
from fm_policy.envs.registry import unregister_env
from fm_policy.eval.disturbances import Disturbance
from fm_policy.eval.harness import EvalReport, evaluate
from fm_policy.eval.report import write_report
from gymnasium import spaces

from fm_policy.cli import main
from fm_policy.errors import UserError

# ---------------------------------------------------------------------------------------------------------------
# Scripted policies that record what they receive
# ---------------------------------------------------------------------------------------------------------------


class FixedTarget:
    """Ignores its observations (so a noisy and a clean run follow the same trajectory) and records them."""

    n_obs_steps = 2
    n_action_steps = 4

    def __init__(self, key: str = "keypoints") -> None:
        self.key = key
        self.seen: list[np.ndarray] = []

    def reset(self) -> None:
        pass

    def predict_action_chunk(self, obs, num_steps=None, noise=None):
        self.seen.append(obs[self.key].numpy().copy())
        return torch.full((obs[self.key].shape[0], self.n_action_steps, 2), 256.0)


class HoldStill:
    """Targets the agent's own position: nothing moves unless shoved. Records the `state` it sees."""

    n_obs_steps = 1
    n_action_steps = 4

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def reset(self) -> None:
        pass

    def predict_action_chunk(self, obs, num_steps=None, noise=None):
        self.seen.append(obs["state"][:, -1].numpy().astype(np.float64))
        return obs["state"][:, -1:, :2].repeat(1, self.n_action_steps, 1)


class NoiseRecorder:
    """Has a `noise_shape`, so the harness draws (and perturbs) its initial noise; records what it gets."""

    n_obs_steps = 1
    n_action_steps = 4
    noise_shape = (8, 2)

    def __init__(self) -> None:
        self.noises: list[tuple[int | None, torch.Tensor]] = []

    def reset(self) -> None:
        pass

    def predict_action_chunk(self, obs, num_steps=None, noise=None):
        if noise is None:  # the harness's untimed warm-up call
            noise = torch.zeros(obs["state"].shape[0], *self.noise_shape)
        else:
            self.noises.append((num_steps, noise.clone()))
        return obs["state"][:, -1:, 2:4] + 20.0 * noise[:, : self.n_action_steps]


KW: dict[str, Any] = {"n_episodes": 2, "max_episode_steps": 16, "progress": False}


def _cog(state: np.ndarray) -> np.ndarray:
    """World centre of gravity of the block from a `state` row (origin x, y, angle)."""
    cx, cy = T_CENTER_OF_GRAVITY
    a = state[4]
    return state[2:4] + np.array([math.cos(a) * cx - math.sin(a) * cy, math.sin(a) * cx + math.cos(a) * cy])


# ---------------------------------------------------------------------------------------------------------------
# The spec
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"obs_noise": -0.1}, "obs_noise must be finite and >= 0"),
    ({"obs_noise": math.nan}, "obs_noise must be finite"),
    ({"shove_block": 5.0}, "need a shove_step"),
    ({"shove_step": -1, "shove_block": 5.0}, "shove_step must be an int >= 0"),
    ({"shove_step": 3, "shove_angle": -0.2}, "shove_angle must be finite and >= 0"),
    ({"init_noise_scale": -1.0}, "init_noise_scale"),
    ({"init_noise_offset": -1.0}, "init_noise_offset"),
    ({"obs_noise": 1.0, "obs_noise_keys": ("state",), "obs_noise_scale": {"image": 1.0}}, "does not perturb"),
    ({"seed": -3}, "seed must be an int >= 0"),
])
def test_bad_values_are_user_errors(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(UserError, match=match):
        Disturbance(**kwargs)


def test_dict_round_trip_and_activity() -> None:
    d = Disturbance(obs_noise=1.5, obs_noise_scale={"state": [1, 1, 1, 1, 0.01]}, shove_step=5, shove_block=10.0,
                    init_noise_scale=0.5, seed=3)
    assert Disturbance.from_dict(json.loads(json.dumps(d.to_dict()))) == d
    assert d.obs_noise_scale == {"state": (1.0, 1.0, 1.0, 1.0, 0.01)}
    assert d.env_side_active and d.init_noise_active and not d.is_null
    assert Disturbance(shove_step=100).is_null  # a shove step with nothing to move: a sweep's zero point
    with pytest.raises(UserError, match="unknown disturbance field"):
        Disturbance.from_dict({"obs_sigma": 1.0})


# ---------------------------------------------------------------------------------------------------------------
# PushTEnv.shove
# ---------------------------------------------------------------------------------------------------------------


def test_pusht_shove_moves_bodies_exactly() -> None:
    env = PushTEnv(obs_mode=("state", "keypoints"))
    _, before = env.reset(seed=100000)
    obs, after = env.shove(block_offset=(12.0, -7.0), agent_offset=(0.0, 9.0))
    np.testing.assert_allclose(after["block_pose"] - before["block_pose"], [12.0, -7.0, 0.0], atol=1e-9)
    np.testing.assert_allclose(after["agent_pos"] - before["agent_pos"], [0.0, 9.0], atol=1e-9)
    np.testing.assert_allclose(obs["state"][2:4], after["block_pose"][:2], atol=1e-3)  # observation follows
    assert env.elapsed_steps == 0 and np.all(after["agent_vel"] == 0)

    # rotation: about the centre of gravity, which then moves by exactly the offset
    cog = _cog(np.r_[0, 0, after["block_pose"]])
    _, rotated = env.shove(block_offset=(5.0, 5.0), block_rotation=0.4)
    assert rotated["block_pose"][2] == pytest.approx(after["block_pose"][2] + 0.4, abs=1e-12)
    np.testing.assert_allclose(_cog(np.r_[0, 0, rotated["block_pose"]]) - cog, [5.0, 5.0], atol=1e-9)

    # the episode goes on from the shoved state, the block at rest
    for _ in range(3):
        _, _, _, _, info = env.step(rotated["agent_pos"])
    np.testing.assert_allclose(info["block_pose"], rotated["block_pose"], atol=1e-6)


def test_pusht_shove_refuses_unsafe_displacements() -> None:
    env = PushTEnv()
    # block origin at (256, 256), angle 0: the stem reaches y = 376; agent just below it
    env.reset(seed=0, options={"reset_to_state": reset_state_for_pose((256.0, 420.0), (256.0, 256.0, 0.0))})
    assert env.shove_problem(block_offset=(0.0, 40.0)) is not None
    assert "touch the agent" in env.shove_problem(block_offset=(0.0, 40.0))
    assert "leave the workspace" in env.shove_problem(block_offset=(300.0, 0.0))
    assert "agent would leave" in env.shove_problem(agent_offset=(0.0, 200.0))
    assert env.shove_problem(block_offset=(0.0, -40.0)) is None
    with pytest.raises(UserError, match="touch the agent"):
        env.shove(block_offset=(0.0, 40.0))
    with pytest.raises(UserError, match="block_offset must be 2 finite numbers"):
        env.shove(block_offset=(math.nan, 0.0))


# ---------------------------------------------------------------------------------------------------------------
# Observation noise in the harness
# ---------------------------------------------------------------------------------------------------------------


def test_obs_noise_reaches_policy_with_std_and_is_paired() -> None:
    sigma = 2.0
    clean_policy, noisy_policy = FixedTarget(), FixedTarget()
    kw = dict(KW, max_episode_steps=40, num_steps=(1, 2))
    clean = evaluate(clean_policy, "pusht", {"obs_mode": "keypoints"}, **kw)
    noisy = evaluate(noisy_policy, "pusht", {"obs_mode": "keypoints"}, disturbance=Disturbance(obs_noise=sigma),
                     **kw)
    # rewards come from the true state, and a policy that ignores its observations acts the same
    assert [e.max_reward for e in noisy.episodes] == pytest.approx([e.max_reward for e in clean.episodes], abs=1e-9)
    diffs = [n - c for n, c in zip(noisy_policy.seen, clean_policy.seen, strict=True)]
    calls = (len(diffs) - 1) // 2  # warm-up, the calls of setting 1, then those of setting 2
    per_setting = [np.stack(diffs[1:calls + 1]), np.stack(diffs[calls + 1:])]
    assert per_setting[0].shape == per_setting[1].shape
    # same noise for an episode under every setting (to float32 rounding of noisy minus clean)
    np.testing.assert_allclose(per_setting[0], per_setting[1], atol=1e-4)
    frames = per_setting[0][:, :, -1]  # the newest frame of each call
    assert frames.std() == pytest.approx(sigma, rel=0.15) and abs(frames.mean()) < 0.3 * sigma
    assert not np.array_equal(frames[:, 0], frames[:, 1])  # episodes draw their own noise


def test_obs_noise_independent_of_batching_and_scaled_per_key() -> None:
    dist = Disturbance(obs_noise=1.0, obs_noise_scale={"state": [1, 1, 1, 1, 0]}, seed=7)
    one, two = FixedTarget("state"), FixedTarget("state")
    evaluate(one, "pusht", disturbance=dist, n_envs=1, **KW)
    evaluate(two, "pusht", disturbance=dist, n_envs=2, **KW)
    # batching: n_envs=1 runs episode 0 then 1; n_envs=2 runs both at once
    seq = np.concatenate([s[:, -1] for s in one.seen[1:]])
    paired = np.concatenate([s[[0], -1] for s in two.seen[1:]] + [s[[1], -1] for s in two.seen[1:]])
    np.testing.assert_allclose(seq, paired, atol=1e-4)
    clean = FixedTarget("state")
    evaluate(clean, "pusht", n_envs=1, **KW)
    diff = np.concatenate([s[:, -1] for s in one.seen[1:]]) - np.concatenate([s[:, -1] for s in clean.seen[1:]])
    assert np.all(diff[:, 4] == 0) and np.all(diff[:, :4] != 0)  # scale 0 on the angle, 1 on positions


def test_obs_noise_leaves_images_unless_named() -> None:
    seen: list[dict[str, np.ndarray]] = []

    class ImagePolicy(FixedTarget):
        def predict_action_chunk(self, obs, num_steps=None, noise=None):
            seen.append({k: v.numpy().copy() for k, v in obs.items()})
            return torch.full((obs["image"].shape[0], self.n_action_steps, 2), 256.0)

    kw: dict[str, Any] = {"n_episodes": 1, "max_episode_steps": 4, "progress": False}
    evaluate(ImagePolicy(), "pusht", {"obs_mode": "image"}, **kw)
    evaluate(ImagePolicy(), "pusht", {"obs_mode": "image"}, disturbance=Disturbance(obs_noise=3.0), **kw)
    evaluate(ImagePolicy(), "pusht", {"obs_mode": "image"},
             disturbance=Disturbance(obs_noise=3.0, obs_noise_keys=("image",)), **kw)
    clean, floats, images = seen[0], seen[2], seen[4]  # each run: warm-up, then one call
    np.testing.assert_array_equal(floats["image"], clean["image"])
    assert not np.array_equal(floats["agent_pos"], clean["agent_pos"])
    assert images["image"].dtype == np.uint8 and not np.array_equal(images["image"], clean["image"])
    np.testing.assert_array_equal(images["agent_pos"], clean["agent_pos"])
    with pytest.raises(UserError, match="not observation keys"):
        evaluate(ImagePolicy(), "pusht", {"obs_mode": "image"},
                 disturbance=Disturbance(obs_noise=1.0, obs_noise_keys=("state",)), **kw)
    with pytest.raises(UserError, match="has 3 values"):
        evaluate(ImagePolicy(), "pusht", {"obs_mode": "image"},
                 disturbance=Disturbance(obs_noise=1.0, obs_noise_scale={"agent_pos": [1, 2, 3]}), **kw)


# ---------------------------------------------------------------------------------------------------------------
# Shove in the harness
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("angle", [0.0, 0.3])
def test_shove_moves_block_by_distance_at_step(angle: float) -> None:
    policy, unshoved = HoldStill(), HoldStill()
    dist = Disturbance(shove_step=8, shove_block=30.0, shove_angle=angle)
    report = evaluate(policy, "pusht", disturbance=dist, **KW)
    evaluate(unshoved, "pusht", **KW)  # the same episodes without the shove (a block may settle off a wall first)
    for row, episode in enumerate(report.settings[0].episodes):
        # one setting: observations after 0, 4, 8, 12 env steps (seen[0] is the warm-up call)
        states = [c[row] for c in policy.seen[1:5]]
        plain = [c[row] for c in unshoved.seen[1:5]]
        np.testing.assert_allclose(states[:2], plain[:2], atol=1e-4)  # nothing changes before the shove ...
        moved = _cog(states[2]) - _cog(plain[2])  # ... and the observation after step 8 shows it
        assert np.linalg.norm(moved) == pytest.approx(30.0, abs=1e-3)
        turned = (states[2][4] - plain[2][4] + math.pi) % (2 * math.pi) - math.pi  # state angles are mod 2 pi
        assert abs(turned) == pytest.approx(angle, abs=1e-5)
        shove = episode.shove
        assert shove["applied"] and shove["step"] == 8 and abs(shove["block_rotation"]) == angle
        np.testing.assert_allclose(moved, shove["block_offset"], atol=1e-3)
    again = HoldStill()
    evaluate(again, "pusht", disturbance=dist, num_steps=(3,), **KW)
    np.testing.assert_allclose(np.stack(again.seen[1:]), np.stack(policy.seen[1:]), atol=1e-4)  # same every setting


def test_shove_agent_and_impossible_shove() -> None:
    policy = HoldStill()
    report = evaluate(policy, "pusht", disturbance=Disturbance(shove_step=4, shove_agent=25.0), **KW)
    for row, episode in enumerate(report.settings[0].episodes):
        moved = policy.seen[2][row][:2] - policy.seen[1][row][:2]  # observations after 0 and 4 env steps (held)
        assert np.linalg.norm(moved) == pytest.approx(25.0, abs=1e-3)
        np.testing.assert_allclose(moved, episode.shove["agent_offset"], atol=1e-3)
    with pytest.raises(UserError, match="no episode could take the shove"):
        evaluate(HoldStill(), "pusht", disturbance=Disturbance(shove_step=4, shove_block=600.0), **KW)


def test_a_shove_one_state_cannot_take_is_recorded_and_the_rest_run() -> None:
    """A shove that fits some states but not one (the block near a wall) skips that episode's shove with the
    reason instead of aborting the whole evaluation; the episodes that can take it are shoved."""
    from fm_policy.eval.disturbances import check_shoves_applied

    ok = type("E", (), {"shove": {"step": 4, "applied": True}})()
    refused = type("E", (), {"shove": {"step": 4, "applied": False, "reason": "no safe direction"}})()
    dist = Disturbance(shove_step=4, shove_block=40.0)
    check_shoves_applied([ok, refused], dist)  # mixed: a result, not an error
    with pytest.raises(UserError, match="no safe direction"):
        check_shoves_applied([refused, refused], dist)


def test_shove_after_episode_end_is_recorded_as_not_applied() -> None:
    report = evaluate(HoldStill(), "pusht", disturbance=Disturbance(shove_step=50, shove_block=5.0), **KW)
    assert all(e.shove == {"step": 50, "applied": False} for e in report.episodes)


class PlainEnv(gym.Env):
    """A one-key env without shove support."""

    metadata: ClassVar[dict[str, Any]] = {"render_modes": []}

    def __init__(self, max_episode_steps: int = 5) -> None:
        self.observation_space = spaces.Dict({"state": spaces.Box(-1e6, 1e6, (5,), np.float32)})
        self.action_space = spaces.Box(-1e6, 1e6, (2,), np.float32)
        self.max_episode_steps = max_episode_steps

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return {"state": np.zeros(5, np.float32)}, {}

    def step(self, action):
        return {"state": np.zeros(5, np.float32)}, 0.0, False, False, {}


def test_shove_on_env_without_support_is_a_clear_error() -> None:
    register_env("disturbance_plain", PlainEnv, overwrite=True)
    try:
        with pytest.raises(UserError, match="shove is not supported for env 'disturbance_plain'"):
            evaluate(HoldStill(), "disturbance_plain", disturbance=Disturbance(shove_step=2, shove_block=1.0), **KW)
        # observation noise works on any Dict-observation env
        report = evaluate(HoldStill(), "disturbance_plain", disturbance=Disturbance(obs_noise=0.1), **KW)
        assert report.env_info["disturbance"]["obs_noise"] == 0.1
    finally:
        unregister_env("disturbance_plain")


# ---------------------------------------------------------------------------------------------------------------
# Initial noise, zero disturbance, report, CLI
# ---------------------------------------------------------------------------------------------------------------


def test_init_noise_scale_and_offset() -> None:
    base, scaled, offset = NoiseRecorder(), NoiseRecorder(), NoiseRecorder()
    kw = dict(KW, num_steps=(1, 2))
    evaluate(base, "pusht", **kw)
    evaluate(scaled, "pusht", disturbance=Disturbance(init_noise_scale=1.5), **kw)
    evaluate(offset, "pusht", disturbance=Disturbance(init_noise_offset=3.0), **kw)
    for (ns_a, a), (ns_b, b) in zip(base.noises, scaled.noises, strict=True):
        assert ns_a == ns_b and torch.equal(b, a * 1.5)
    offsets = [b - a for (_, a), (_, b) in zip(base.noises, offset.noises, strict=True)]
    for d in offsets:
        torch.testing.assert_close(d.flatten(1).norm(dim=1), torch.full((2,), 3.0), atol=1e-4, rtol=0)
        torch.testing.assert_close(d, offsets[0], atol=1e-5, rtol=0)  # one offset per episode, every call/setting
    assert not torch.allclose(offsets[0][0], offsets[0][1])  # and episodes differ

    with pytest.raises(UserError, match="need a policy with a `noise_shape`"):
        evaluate(HoldStill(), "pusht", disturbance=Disturbance(init_noise_scale=0.5), **KW)


def _rows(report: EvalReport) -> list[tuple]:
    return [(e.num_steps, e.seed, e.success, e.steps, e.n_chunks, e.max_reward, e.final_coverage)
            for e in report.episodes]


def test_zero_disturbance_is_no_disturbance() -> None:
    plain, zero = NoiseRecorder(), NoiseRecorder()
    a = evaluate(plain, "pusht", **KW)
    b = evaluate(zero, "pusht", disturbance=Disturbance(obs_noise=0.0, shove_step=5, init_noise_scale=1.0), **KW)
    assert [r[:-2] for r in _rows(a)] == [r[:-2] for r in _rows(b)]
    np.testing.assert_allclose([r[-2:] for r in _rows(a)], [r[-2:] for r in _rows(b)], atol=1e-9)
    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(plain.noises, zero.noises, strict=True))
    assert a.env_info["disturbance"] is None and b.env_info["disturbance"]["shove_step"] == 5


def test_report_records_disturbance(tmp_path) -> None:
    dist = Disturbance(obs_noise=0.5, shove_step=4, shove_block=10.0, seed=2)
    report = evaluate(HoldStill(), "pusht", disturbance=dist, **KW)
    paths = write_report(report, tmp_path / "out")
    data = json.loads(paths["json"].read_text())
    assert data["env_info"]["disturbance"] == dist.to_dict()
    assert Disturbance.from_dict(data["env_info"]["disturbance"]) == dist
    assert all(ep["shove"]["applied"] for ep in data["settings"][0]["episodes"])
    assert EvalReport.from_json(paths["json"]).to_json() == report.to_json()
    assert "- disturbance: observation noise std 0.5" in paths["markdown"].read_text()


def test_workers_see_the_same_disturbance() -> None:
    dist = Disturbance(obs_noise=1.0, shove_step=4, shove_block=10.0)
    one, two = HoldStill(), HoldStill()
    a = evaluate(one, "pusht", disturbance=dist, **KW)
    b = evaluate(two, "pusht", disturbance=dist, workers=2, **KW)
    np.testing.assert_allclose(np.stack(one.seen), np.stack(two.seen), atol=1e-4)
    assert [e.shove for e in a.episodes] == [e.shove for e in b.episodes]


@pytest.mark.parametrize(("flags", "match"), [
    (["--obs-noise", "-0.01"], "obs_noise must be finite and >= 0"),
    (["--shove-block", "20"], "need a shove_step"),
    (["--shove-step", "10", "--shove-angle", "-1"], "shove_angle"),
])
def test_cli_rejects_bad_disturbances(flags: list[str], match: str, capsys, tmp_path) -> None:
    # checked before the checkpoint is loaded: this one does not exist
    assert main(["eval", "--checkpoint", str(tmp_path / "none"), *flags]) == 2
    assert match in capsys.readouterr().err


def test_cli_builds_disturbance(monkeypatch, tmp_path) -> None:
    got: dict[str, Any] = {}

    def fake_eval_checkpoint(checkpoint, **kwargs):
        got.update(kwargs)
        raise UserError("stop here")

    monkeypatch.setattr("fm_policy.eval.run.eval_checkpoint", fake_eval_checkpoint)
    main(["eval", "--checkpoint", str(tmp_path), "--obs-noise", "0.01", "--obs-noise-scale", "state=1,1,1,1,0",
          "--shove-step", "100", "--shove-block", "20", "--shove-agent", "0", "--shove-angle", "0.3",
          "--init-noise-scale", "1.0", "--init-noise-offset", "0.0", "--disturbance-seed", "4"])
    assert got["disturbance"] == Disturbance(obs_noise=0.01, obs_noise_scale={"state": (1, 1, 1, 1, 0)},
                                             shove_step=100, shove_block=20.0, shove_angle=0.3, seed=4)
    main(["eval", "--checkpoint", str(tmp_path)])
    assert got["disturbance"] is None
