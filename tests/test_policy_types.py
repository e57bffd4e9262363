"""Policy types: one config class per type, the factory, checkpoints from before the per-type configs, and a
policy type registered from outside the package working through train, save, load, evaluate and serve."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fm_policy.checkpoint import CheckpointError
from fm_policy.config import ConfigError
from fm_policy.ddpm_policy import DiffusionPolicy, DiffusionPolicyConfig
from fm_policy.factory import (
    available_policy_types,
    load_policy,
    make_policy,
    policy_class,
    policy_config_as,
    register_policy_type,
    unregister_policy_type,
)
from fm_policy.flow_matching import flow_matching_loss
from fm_policy.flow_policy import FlowPolicy, FlowPolicyConfig
from fm_policy.policy import BasePolicy, PolicyConfig
from fm_policy.residual_policy import ResidualFlowPolicy

torch.set_num_threads(1)
FORMAT1 = Path(__file__).parent / "data" / "format1"


@pytest.mark.parametrize("name,cls", [("flow", FlowPolicy), ("ddpm", DiffusionPolicy),
                                      ("flow_residual", ResidualFlowPolicy)])
def test_checkpoints_saved_before_per_type_configs_load_and_act_the_same(name, cls, tmp_path):
    """tests/data/format1 was written by fm-policy 0.1.0 (one flat PolicyConfig for every type, the residual's
    config beside it); it loads into the per-type configs and generates the same chunks (to float rounding: the
    reference was computed with another thread count)."""
    expected = json.loads((FORMAT1 / "expected.json").read_text())
    policy = load_policy(FORMAT1 / name)
    assert type(policy) is cls and type(policy.config) is cls.config_class
    obs = {"state": torch.tensor(expected["obs"], dtype=torch.float32)}
    noise = torch.tensor(expected["noise"], dtype=torch.float32)
    torch.testing.assert_close(policy.generate_chunk(obs, noise=noise),
                               torch.tensor(expected["chunks"][name], dtype=torch.float32), rtol=1e-5, atol=1e-3)
    if name == "ddpm":
        assert policy.config.solver == "ddim"
    # saved again, it is a current-format checkpoint with the same behaviour
    policy.save_pretrained(tmp_path / "again")
    meta = json.loads((tmp_path / "again" / "config.json").read_text())
    assert meta["format"] == 2 and "diffusion_sampler" not in meta["policy"]
    assert torch.equal(load_policy(tmp_path / "again").generate_chunk(obs, noise=noise),
                       policy.generate_chunk(obs, noise=noise))


def test_each_type_has_its_own_config_and_capabilities():
    assert {"flow", "ddpm", "flow_residual"} <= set(available_policy_types())
    assert policy_class("ddpm").config_class is DiffusionPolicyConfig
    assert FlowPolicy.supports_fused_export and not DiffusionPolicy.supports_fused_export
    assert "dopri5" in FlowPolicy.solvers and "dopri5" not in FlowPolicy.fixed_cost_solvers
    assert DiffusionPolicyConfig().solver == "ddim" and FlowPolicyConfig().solver == "euler"
    assert not hasattr(FlowPolicyConfig(), "num_train_timesteps") and not hasattr(DiffusionPolicyConfig(), "time_sampling")
    with pytest.raises(ConfigError, match="unknown; choose one of"):
        policy_class("nope")
    ddpm = policy_config_as(FlowPolicyConfig(horizon=8, n_action_steps=4, network={"kind": "mlp"}), "ddpm")
    assert type(ddpm) is DiffusionPolicyConfig and ddpm.horizon == 8 and ddpm.solver == "ddim"
    with pytest.raises(ConfigError, match="does not match the config class"):
        FlowPolicyConfig(type="ddpm").validate()


def test_from_pretrained_honours_the_class_it_is_called_on(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {"state": rng.normal(size=(100, 3)).astype(np.float32), "action": rng.normal(size=(100, 2)).astype(np.float32)}
    config = DiffusionPolicyConfig(horizon=8, n_action_steps=4, network={"kind": "mlp", "hidden_dims": [8]})
    make_policy(config, arrays, ["state"]).save_pretrained(tmp_path / "ddpm")
    assert type(DiffusionPolicy.from_pretrained(tmp_path / "ddpm")) is DiffusionPolicy
    assert type(BasePolicy.from_pretrained(tmp_path / "ddpm")) is DiffusionPolicy
    with pytest.raises(CheckpointError, match="'ddpm' policy .* not a FlowPolicy"):
        FlowPolicy.from_pretrained(tmp_path / "ddpm")


def test_training_config_is_typed_by_policy_type(tmp_path):
    from fm_policy.train import load_train_config

    config = load_train_config(None, ["policy.type=ddpm", "policy.solver=ddpm", "policy.num_train_timesteps=50"])
    assert type(config.policy) is DiffusionPolicyConfig and config.policy.num_train_timesteps == 50
    with pytest.raises(ConfigError, match="time_sampling"):  # a flow-only key on a DDPM policy
        load_train_config(None, ["policy.type=ddpm", "policy.time_sampling=beta"])
    with pytest.raises(ConfigError, match="policy type 'nope' is unknown"):
        load_train_config(None, ["policy.type=nope"])
    # the U-Net settings of a shipped config give way when an override switches the network kind
    config = load_train_config("pusht_keypoints_flow_cpu", ["policy.network.kind=mlp"])
    rng = np.random.default_rng(0)
    arrays = {"keypoints": rng.normal(size=(100, 20)).astype(np.float32),
              "action": rng.normal(size=(100, 2)).astype(np.float32)}
    policy = make_policy(config.policy, arrays, ["keypoints"])
    assert policy.config.network["kind"] == "mlp" and "down_dims" not in policy.config.network
    config = load_train_config(None, ["policy.network.kind=mlp", "policy.network.widths=[3]"])
    with pytest.raises(ConfigError, match="widths"):
        make_policy(config.policy, arrays, ["keypoints"])


# ------------------------------------------------------------------------------------------------ a plugin type
@dataclass
class ChunkRegressorConfig(PolicyConfig):
    """A deterministic regressor of the whole chunk: the simplest thing a user might add as a policy type."""

    type: str = "test_chunk_regressor"
    solver: str = "direct"
    num_inference_steps: int = 1
    network: dict[str, Any] = field(default_factory=lambda: {"kind": "mlp", "hidden_dims": [32], "time_embed_dim": 8})


class ChunkRegressor(BasePolicy):
    name = "test_chunk_regressor"
    config_class = ChunkRegressorConfig
    solvers = ("direct",)
    fixed_cost_solvers = ("direct",)

    def _zeros(self, batch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (batch, self.config.horizon, self.config.action_dim)
        return torch.zeros(shape, device=like.device), torch.zeros(batch, device=like.device)

    def _loss(self, actions: torch.Tensor, cond: torch.Tensor, mask: torch.Tensor | None) -> dict[str, torch.Tensor]:
        return {"loss": flow_matching_loss(self.net(*self._zeros(len(actions), cond), cond), actions, mask)}

    def _sample(self, cond: torch.Tensor, num_steps: int, solver: str | None,
                noise: torch.Tensor | None) -> torch.Tensor:
        return self.net(*self._zeros(len(cond), cond), cond)


@pytest.fixture
def chunk_regressor():
    register_policy_type(ChunkRegressor)
    yield ChunkRegressor
    unregister_policy_type(ChunkRegressor.name)


def test_a_policy_type_and_an_env_from_outside_collect_train_load_evaluate_and_serve(chunk_regressor, tmp_path):
    """The acceptance test of the extension points: a policy type and an environment, both defined outside the
    package (this file and tests/toy_point_env.py) and registered at run time, go through the whole data path:
    `fm-policy collect` -> store -> `train()` -> checkpoint -> `load_policy` -> harness -> policy server."""
    from fm_policy.envs import register_env, unregister_env
    from fm_policy.eval.run import evaluate_policy
    from toy_point_env import NAME, SPEC

    from fm_policy.cli import main
    from fm_policy.deploy.client import PolicyClient
    from fm_policy.deploy.server import PolicyServer, ServerConfig, ServerThread
    from fm_policy.train import load_train_config, train

    register_env(SPEC)
    try:
        store = tmp_path / "point.zarr"
        assert main(["collect", "--env", NAME, "--episodes", "30", "--out", str(store), "--point-goal", "0.3"]) == 0
        config = load_train_config(None, [
            f"data.path={store}", "data.obs_keys=[state]", "data.val_ratio=0.25", f"run_dir={tmp_path / 'run'}",
            "policy.type=test_chunk_regressor", "policy.horizon=8", "policy.n_action_steps=4",
            "loop.batch_size=16", "loop.steps=150", "loop.log_every=50", "loop.val_every=0",
            "loop.checkpoint_every=150", "loop.progress=false", "optim.lr=3e-3", "optim.warmup_steps=5",
        ])
        policy = load_policy(train(config) / "ema")
        assert type(policy) is ChunkRegressor
        report = evaluate_policy(policy, NAME, {"goal": 0.3}, n_episodes=4, progress=False)
        assert report.settings[0].n_episodes == 4 and report.settings[0].score.value > 0.8  # it learned to go
        obs = {"state": np.array([[0.0, 0.3], [0.1, 0.3]], dtype=np.float32)}
        expected = policy.predict_action_chunk({"state": torch.from_numpy(obs["state"])[None]})[0].numpy()
        with ServerThread(PolicyServer(policy, ServerConfig(port=0, log_every=0))) as running, \
                PolicyClient(running.url) as client:
            assert client.spec.policy_type == "test_chunk_regressor" and client.spec.solver == "direct"
            served = client.infer(obs).actions
        np.testing.assert_array_equal(served[: policy.n_action_steps], expected)
    finally:
        unregister_env(NAME)
    with pytest.raises(ValueError, match="already registered"):
        register_policy_type(type("Other", (ChunkRegressor,), {}))
