"""An environment registered from outside the package (one `EnvSpec`, no edit of core modules) works end to end:
`fm-policy collect` with its own CLI option, the dataset loader with its own key recipe, and the rollout harness
with its own metric. Also the registry's refusals (duplicate names, conflicting options) and its error messages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import pytest
import torch
from fm_policy.datasets.collect import env_collect_defaults
from fm_policy.datasets.policy_data import load_policy_arrays
from fm_policy.datasets.replay_buffer import ReplayBuffer
from fm_policy.envs import (
    EnvOption,
    EnvSpec,
    available_envs,
    env_spec,
    make_env,
    register_env,
    unregister_env,
)
from fm_policy.eval.run import evaluate_policy
from toy_point_env import NAME, SPEC, PointEnv, expert_action

from fm_policy.cli import main


@pytest.fixture()
def point_env() -> Iterator[str]:
    register_env(SPEC)
    try:
        yield NAME
    finally:
        unregister_env(NAME)
    assert NAME not in available_envs()


class ProportionalPolicy:
    """Just enough of a policy for the harness (`ChunkPolicy`) and `evaluate_policy` (`obs_shapes`)."""

    n_obs_steps = 1
    n_action_steps = 4
    obs_shapes: ClassVar[dict[str, tuple[int, ...]]] = {"state": (2,)}

    def reset(self) -> None:
        pass

    def predict_action_chunk(self, obs, num_steps=None, noise=None):
        action = torch.from_numpy(expert_action(obs["state"][:, -1].numpy()))  # (B, 1)
        return action[:, None, :].expand(-1, self.n_action_steps, -1)


def test_collect_writes_a_store_with_the_env_option(point_env: str, tmp_path: Path) -> None:
    out = str(tmp_path / "point.zarr")
    code = main(["collect", "--env", point_env, "--point-goal", "0.3", "--episodes", "3", "--out", out,
                 "--no-progress"])
    assert code == 0
    with ReplayBuffer.open(out, required_keys=("state", "action")) as buffer:
        assert buffer.n_episodes == 3 and buffer.keys == ["action", "state"]
        assert buffer.attrs["fm_policy_collect"]["complete"] is True
        assert buffer.attrs["fm_policy_collect"]["generation"]["env_kwargs"] == {"goal": 0.3}
        assert buffer.attrs["fm_policy_collect"]["generation"]["max_steps"] == 40  # the spec's default
        assert buffer.attrs["source"]["env"] == point_env
        state = buffer.array("state")[:]
        np.testing.assert_allclose(state[:, 1], 0.3)  # the option reached the recorder and the env
        # the env's own dataset-key recipe is found through its spec
        arrays = load_policy_arrays(buffer, ["goal_offset"])
        np.testing.assert_allclose(arrays["goal_offset"][:, 0], state[:, 1] - state[:, 0])


def test_env_options_belong_to_their_env(point_env: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = str(tmp_path / "x.zarr")
    assert main(["collect", "--env", "pusht", "--point-goal", "0.3", "--out", out]) == 2
    assert f"--point-goal only apply to --env {point_env}" in capsys.readouterr().err
    assert main(["collect", "--env", point_env, "--goal", "1,2,3", "--out", out]) == 2
    assert "--goal only apply to --env pusht" in capsys.readouterr().err
    assert main(["collect", "--env", "no/such", "--out", out]) == 2
    assert "unknown env 'no/such'; available: " in (err := capsys.readouterr().err) and point_env in err
    with pytest.raises(ValueError, match=f"env '{point_env}' does not take"):
        make_env(point_env, gaol=0.3)


def test_eval_command_passes_the_env_option(point_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from fm_policy.eval import run

    seen: dict[str, Any] = {}

    def fake_eval_checkpoint(checkpoint: str, **kwargs: Any):
        seen.update(kwargs)
        (tmp_path / "r.md").write_text("report\n")
        return None, {"markdown": tmp_path / "r.md", "json": tmp_path / "r.json", "plot": tmp_path / "r.png"}

    monkeypatch.setattr(run, "eval_checkpoint", fake_eval_checkpoint)
    assert main(["eval", "--checkpoint", "ckpt", "--env", point_env, "--point-goal", "-0.25", "--no-progress"]) == 0
    assert seen["env"] == point_env and seen["env_kwargs"] == {"goal": -0.25}


def test_harness_rolls_out_on_the_env(point_env: str) -> None:
    report = evaluate_policy(ProportionalPolicy(), env=point_env, env_kwargs={"goal": -0.4}, n_episodes=2,
                             progress=False)
    setting = report.settings[0]
    assert [e.seed for e in setting.episodes] == [100000, 100001]
    assert setting.success.value == 1.0 and all(e.terminated for e in setting.episodes)
    assert setting.metrics["mean_steps"].n == 2  # the env's own metric hook ran
    assert report.env_info["env"] == point_env


def test_registry_refuses_duplicates_and_conflicts(point_env: str) -> None:
    assert env_spec(point_env) is SPEC
    with pytest.raises(ValueError, match="already registered"):
        register_env(SPEC)
    clash = EnvSpec(name="toy/other", make=PointEnv,
                    options=(EnvOption("--point-goal", "target", float, help="x", commands=("eval",)),))
    with pytest.raises(ValueError, match="declares eval option --point-goal differently"):
        register_env(clash)
    with pytest.raises(ValueError, match="dataset key"):
        register_env(EnvSpec(name="toy/other", make=PointEnv, renamed_keys={"image": "rgb"}))
    assert "toy/other" not in available_envs()
    register_env(EnvSpec(name="toy/other", make=PointEnv))  # an env to evaluate in, with no expert
    try:
        with pytest.raises(ValueError, match=f"no expert recorder for env 'toy/other'; available: .*'{point_env}'"):
            env_collect_defaults("toy/other")
    finally:
        unregister_env("toy/other")


def test_envs_command_lists_registered_specs_with_descriptions(point_env, capsys):
    assert main(["envs"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "pusht" in lines and "[scripted expert]" in lines["pusht"]
    assert "a point on a line" in lines[point_env] and "[scripted expert]" in lines[point_env]
