"""Policies and trainer on a tiny real zarr store: learning, save/load, exact resume, DDPM baseline, clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from fm_policy.datasets.replay_buffer import ReplayBuffer

from fm_policy.checkpoint import CheckpointError
from fm_policy.config import ConfigError
from fm_policy.factory import load_policy
from fm_policy.train import TrainConfig, load_train_config, train
from fm_policy.trainer import latest_checkpoint


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Six 40-step episodes where the action is a smooth function of the state: learnable in a few steps."""
    path = str(tmp_path_factory.mktemp("data") / "tiny.zarr")
    buffer = ReplayBuffer.create(path)
    rng = np.random.default_rng(0)
    for _ in range(6):
        start = rng.uniform(100, 400, 5)
        t = np.arange(40)[:, None]
        state = (start + 3.0 * t * np.array([1, -1, 0.5, 0.2, 0.0])).astype(np.float32)
        action = (state[:, :2] + 20.0).astype(np.float32)
        buffer.add_episode({"state": state, "action": action})
    return path


def _config(store: str, run_dir: Path, *overrides: str) -> TrainConfig:
    return load_train_config(
        None,
        [
            f"data.path={store}",
            "data.obs_keys=[state]",
            "data.val_ratio=0.2",
            f"run_dir={run_dir}",
            "policy.network.kind=mlp",
            "policy.network.hidden_dims=[64,64]",
            "policy.network.time_embed_dim=16",
            "loop.batch_size=16",
            "loop.steps=40",
            "loop.log_every=10",
            "loop.val_every=20",
            "loop.checkpoint_every=20",
            "loop.progress=false",
            "optim.lr=3e-3",
            "optim.warmup_steps=5",
            *overrides,
        ],
    )


def _loss_history(run_dir: Path) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    return [e.value for e in events.Scalars("train/loss")]


@pytest.mark.parametrize("policy_type", ["flow", "ddpm"])
def test_loss_decreases_and_checkpoint_loads(store, tmp_path, policy_type):
    run_dir = tmp_path / policy_type
    checkpoint = train(_config(store, run_dir, f"policy.type={policy_type}", "loop.steps=150"))
    losses = _loss_history(run_dir)
    assert len(losses) == 15 and losses[-1] < 0.7 * losses[0], losses
    assert (run_dir / "config.yaml").exists() and checkpoint == latest_checkpoint(run_dir)
    policy = load_policy(checkpoint / "ema")
    assert type(policy).__name__ == {"flow": "FlowPolicy", "ddpm": "DiffusionPolicy"}[policy_type]
    obs = {"state": torch.tensor(np.full((3, 2, 5), 250.0, np.float32))}
    chunk = policy.predict_action_chunk(obs, num_steps=4)
    assert chunk.shape == (3, 8, 2) and torch.isfinite(chunk).all()


def test_save_load_round_trip_gives_identical_actions(store, tmp_path):
    checkpoint = train(_config(store, tmp_path / "run"))
    policy = load_policy(checkpoint / "policy")
    policy.save_pretrained(tmp_path / "copy")
    assert sorted(p.name for p in (tmp_path / "copy").iterdir()) == [
        "config.json", "manifest.json", "model.safetensors", "normalizer.safetensors"]
    copy = load_policy(tmp_path / "copy")
    obs = {"state": torch.rand(4, 2, 5) * 300 + 100}
    noise = torch.randn(4, 16, 2)
    for steps, solver in ((1, "euler"), (4, "midpoint"), (8, "euler")):
        a = policy.predict_action_chunk(obs, num_steps=steps, solver=solver, noise=noise)
        b = copy.predict_action_chunk(obs, num_steps=steps, solver=solver, noise=noise)
        assert torch.equal(a, b)
    # the executed slice starts at n_obs_steps - 1 of the generated chunk
    full = policy.generate_chunk(obs, num_steps=2, noise=noise)
    torch.testing.assert_close(policy.predict_action_chunk(obs, num_steps=2, noise=noise), full[:, 1:9])


def test_resume_reproduces_uninterrupted_weights(store, tmp_path, monkeypatch):
    """Killed right after the step-20 checkpoint of a 40-step run, the same command resumes to the same weights."""
    from fm_policy.trainer import Trainer

    straight = train(_config(store, tmp_path / "straight"))
    save = Trainer.save_checkpoint

    def save_then_die(self):
        path = save(self)
        if self.step == 20:
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(_config(store, tmp_path / "resumed"))
    monkeypatch.setattr(Trainer, "save_checkpoint", save)
    resumed = train(_config(store, tmp_path / "resumed"))
    for part in ("policy", "ema"):
        a = load_policy(straight / part).state_dict()
        b = load_policy(resumed / part).state_dict()
        for key in a:
            assert torch.equal(a[key], b[key]), f"{part}/{key} differs after resume"


def test_resume_refuses_another_config(store, tmp_path):
    train(_config(store, tmp_path / "run", "loop.steps=20"))
    train(_config(store, tmp_path / "run", "loop.steps=30"))  # more steps: allowed
    with pytest.raises(ConfigError, match=r"differs in \['optim.lr'\]"):
        train(_config(store, tmp_path / "run", "optim.lr=1e-2"))


def test_corrupt_checkpoint_is_reported_and_skipped(store, tmp_path):
    run_dir = tmp_path / "run"
    train(_config(store, run_dir))
    newest = latest_checkpoint(run_dir)
    weights = newest / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])  # truncated, as by a disk-full copy
    for directory in (newest / "policy", newest / "ema"):  # the checkpoint's manifest covers both
        with pytest.raises(CheckpointError, match="policy/model.safetensors' has .* bytes, the manifest says"):
            load_policy(directory)
    assert latest_checkpoint(run_dir).name == "step_20"  # falls back to the previous complete checkpoint


def test_bad_config_keys_and_values_are_clear(store, tmp_path):
    with pytest.raises(ConfigError, match=r"key 'optim.learning_rate'.*valid keys here: lr, betas"):
        _config(store, tmp_path, "optim.learning_rate=1")
    with pytest.raises(ConfigError, match="policy.type 'gan' is unknown"):
        train(_config(store, tmp_path / "x", "policy.type=gan"))
    with pytest.raises(ConfigError, match="exceeds horizon 16"):
        train(_config(store, tmp_path / "x", "policy.n_action_steps=16"))
    with pytest.raises(Exception, match=r"needs data keys \['keypoint'\]"):
        train(_config(store, tmp_path / "x", "data.obs_keys=[keypoints]"))


def test_observation_errors_and_select_action_queue(store, tmp_path):
    policy = load_policy(train(_config(store, tmp_path / "run", "loop.steps=20")) / "ema")
    with pytest.raises(ValueError, match=r"observation 'state' has shape \(2, 2, 4\); expected \(batch, 2, 5\)"):
        policy.predict_action_chunk({"state": torch.zeros(2, 2, 4)})
    with pytest.raises(ValueError, match=r"lacks keys \['state'\]"):
        policy.predict_action_chunk({"keypoints": torch.zeros(2, 2, 20)})
    nan_obs = torch.full((1, 2, 5), 200.0)
    nan_obs[0, 1, 3] = float("nan")
    with pytest.raises(ValueError, match="'state' contains NaN"):
        policy.predict_action_chunk({"state": nan_obs})
    # select_action: one planning call serves n_action_steps control steps
    calls = []
    original = policy.predict_action_chunk
    policy.predict_action_chunk = lambda obs, num_steps=None: calls.append(obs) or original(obs, num_steps)
    policy.reset()
    for _ in range(9):
        action = policy.select_action({"state": torch.full((1, 5), 200.0)})
        assert action.shape == (1, 2)
    assert len(calls) == 2 and calls[0]["state"].shape == (1, 2, 5)


def test_train_policy_cli(store, tmp_path, capsys):
    from fm_policy.cli import main

    run_dir = tmp_path / "cli"
    overrides = [f"data.path={store}", "data.obs_keys=[state]", f"run_dir={run_dir}", "policy.network.kind=mlp",
                 "policy.network.hidden_dims=[32]", "loop.steps=4", "loop.batch_size=8", "loop.progress=false"]
    assert main(["train", "--config", "pusht_state_flow_cpu", *overrides]) == 0
    assert "checkpoint:" in capsys.readouterr().out
    assert main(["train", "--config", "pusht_state_flow_cpu", "optim.lrr=1"]) == 2
    assert "Did you mean" in capsys.readouterr().err
    assert main(["train", "--config", "no_such_config"]) == 2
    assert "shipped: " in capsys.readouterr().err


def test_eval_cli_on_real_pusht(store, tmp_path, capsys):
    """A saved policy rolls out in the real Push-T env through `fm-policy eval` (2 episodes, 2 settings)."""
    from fm_policy.cli import main

    checkpoint = train(_config(store, tmp_path / "run", "loop.steps=10"))
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(checkpoint / "ema"), "--episodes", "2", "--num-steps", "1,2",
                 "--env-kwarg", "max_episode_steps=20", "--out", str(out), "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "| num_steps | score [95% CI] | success [95% CI]" in text
    report = json.loads((out / "eval.json").read_text())
    assert [s["num_steps"] for s in report["settings"]] == [1, 2]
    assert all(len(s["episodes"]) == 2 for s in report["settings"])
    assert report["env_info"]["env_kwargs"] == {"obs_mode": "state", "max_episode_steps": 20}  # YAML-typed int
    assert all(e["steps"] <= 20 for s in report["settings"] for e in s["episodes"])
    assert (out / "eval.png").stat().st_size > 0
    assert main(["eval", "--checkpoint", str(tmp_path / "nothing")]) == 2
    assert "no such directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["eval", "--checkpoint", str(tmp_path / "empty")]) == 2
    assert "not a saved policy" in capsys.readouterr().err


def test_periodic_rollout_evaluation_logs_to_tensorboard(store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = tmp_path / "run"
    train(_config(store, run_dir, "loop.steps=10", "loop.eval_every=10", "loop.eval_episodes=1",
                  "loop.eval_num_steps=[1]"))
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    assert {"eval/score_steps1", "eval/success_steps1"} <= set(events.Tags()["scalars"])
    sessions = json.loads((run_dir / "training_sessions.json").read_text())
    assert sessions[-1]["steps"] == [0, 10] and sessions[-1]["parameters"] > 0
