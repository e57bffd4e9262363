"""Franka Kitchen: env wrapper, scripted expert, p_n metrics, harness hook and demo collection (real MuJoCo)."""

from __future__ import annotations

import math

import numpy as np
import pytest

pytest.importorskip("gymnasium_robotics")

from fm_policy.datasets.collect import CollectConfig, collect  # noqa: E402
from fm_policy.datasets.replay_buffer import ReplayBuffer  # noqa: E402
from fm_policy.envs import env_kwargs_for_obs_keys, make_env  # noqa: E402
from fm_policy.envs.kitchen import ALL_TASKS, KitchenEnv, kitchen_metrics, parse_tasks  # noqa: E402
from fm_policy.envs.registry import env_metrics  # noqa: E402


@pytest.fixture(scope="module")
def env() -> KitchenEnv:
    e = make_env("kitchen", tasks=["slide cabinet"])
    yield e
    e.close()


def test_spaces_and_real_steps(env: KitchenEnv) -> None:
    assert env.observation_space["state"].shape == (59,)
    assert env.action_space.shape == (9,) and env.max_episode_steps == 280
    obs, info = env.reset(seed=0)
    assert obs["state"].dtype == np.float32 and obs["state"].shape == (59,)
    assert info["n_completed"] == 0 and info["n_tasks"] == 1 and info["completed/slide cabinet"] is False
    first = obs["state"]
    kept = first.copy()
    for _ in range(3):
        obs, reward, terminated, truncated, info = env.step(np.zeros(9, dtype=np.float32))
        assert reward == 0.0 and not terminated and not truncated
    np.testing.assert_array_equal(first, kept)  # observations are copies, never rewritten by later steps
    assert env.elapsed_steps == 3
    with pytest.raises(ValueError, match="shape"):
        env.step(np.zeros(7))
    with pytest.raises(ValueError, match="finite"):
        env.step(np.full(9, np.nan))


def test_step_limit_and_task_parsing() -> None:
    short = KitchenEnv(tasks="microwave,kettle", max_episode_steps=2)
    short.reset(seed=1)
    assert short.step(np.zeros(9))[3] is False and short.step(np.zeros(9))[3] is True
    short.close()
    assert parse_tasks(None) == ALL_TASKS
    assert parse_tasks("kettle, microwave") == ("kettle", "microwave")
    with pytest.raises(ValueError, match="unknown Kitchen task"):
        parse_tasks(["microwave", "oven door"])
    with pytest.raises(ValueError, match="distinct"):
        parse_tasks(["kettle", "kettle"])
    assert env_kwargs_for_obs_keys("kitchen", ["state"]) == {}
    with pytest.raises(ValueError, match="observes"):
        env_kwargs_for_obs_keys("kitchen", ["image"])


def test_expert_completes_a_task(env: KitchenEnv) -> None:
    from fm_policy.datasets.experts.kitchen import run_expert_episode

    result = run_expert_episode(env, planner_seed=0, env_seed=0)
    assert result["success"] and result["completed"] == ["slide cabinet"]
    assert result["steps"] < 120
    assert env.data.qpos[19] > 0.07  # the env's own completion threshold for the slide cabinet


def test_kitchen_metrics() -> None:
    counts = [0, 1, 2, 4, 4]
    m = kitchen_metrics(counts, {"tasks": ["microwave", "kettle", "light switch", "slide cabinet"]})
    assert [m[f"p{n}"].value for n in range(1, 5)] == [0.8, 0.6, 0.4, 0.4]
    assert m["mean_tasks"].value == pytest.approx(2.2) and m["mean_score"].value == pytest.approx(0.55)
    assert m["p1"].method == "wilson" and m["p1"].lo < 0.8 < m["p1"].hi
    assert "p5" not in m
    seven = kitchen_metrics([7, 7], {"tasks": None})  # tasks=None: all seven, as diffusion_policy scores it
    assert "p5" not in kitchen_metrics([4], None)  # no tasks kwarg: the env's default four-task sequence
    assert seven["p7"].value == 1.0 and seven["mean_score"].value == 1.0
    with pytest.raises(ValueError, match="integers"):
        kitchen_metrics([5], {"tasks": ["kettle"]})


class _Still:
    """Zero joint velocities: the robot holds still and completes nothing."""

    n_obs_steps = 2
    n_action_steps = 4

    def reset(self) -> None:
        pass

    def predict_action_chunk(self, obs, num_steps=None, noise=None):
        import torch

        assert obs["state"].shape[1:] == (2, 59)
        return torch.zeros(obs["state"].shape[0], self.n_action_steps, 9)


def test_harness_reports_kitchen_metrics() -> None:
    from fm_policy.eval.harness import EvalReport, evaluate
    from fm_policy.eval.report import _markdown

    kwargs = {"tasks": ["microwave", "kettle", "light switch", "slide cabinet"]}
    report = evaluate(_Still(), "kitchen", kwargs, n_episodes=2, max_episode_steps=8, progress=False)
    setting = report.settings[0]
    assert sorted(setting.metrics) == ["mean_score", "mean_tasks", "p1", "p2", "p3", "p4"]
    assert setting.metrics["p1"].value == 0.0 and setting.metrics["mean_tasks"].value == 0.0
    assert [e.steps for e in setting.episodes] == [8, 8]
    again = EvalReport.from_json(report.to_json())  # metrics survive the JSON round trip
    assert again.settings[0].metrics["p4"].n == 2
    assert "p4 [95% CI]" in _markdown(report)
    assert env_metrics("pusht") is None  # Push-T keeps its generic metrics only


def test_collect_writes_a_store(tmp_path) -> None:
    out = str(tmp_path / "kitchen.zarr")
    summary = collect(
        CollectConfig(env="kitchen", episodes=1, out=out, obs=("state",), max_steps=120,
                      env_kwargs={"tasks": ["light switch"]}),
        progress=False,
    )
    assert summary["episodes"] == 1 and summary["skipped_env_seeds"] == []
    with ReplayBuffer.open(out) as buffer:
        assert buffer.keys == ["action", "completed", "state"]
        ep = buffer.get_episode(0)
        assert ep["state"].shape[1:] == (59,) and ep["action"].shape[1:] == (9,)
        assert ep["completed"][-1].tolist() == [1.0] and ep["completed"][0].tolist() == [0.0]
        attrs = buffer.attrs
        assert attrs["source"]["env_id"] == "FrankaKitchen-v1" and attrs["source"]["tasks"] == ["light switch"]
        assert attrs["source"]["expert"]["config"]["task_order"] == "given"
        assert attrs["fm_policy_collect"]["complete"] is True
    # the stored actions are the executed ones: replaying them with the same env seed completes the task again
    replay = KitchenEnv(tasks=["light switch"])
    obs, _ = replay.reset(seed=0)
    np.testing.assert_array_equal(obs["state"], ep["state"][0])
    for action in ep["action"]:
        obs, _, terminated, _, info = replay.step(action)
    assert terminated and info["is_success"]
    replay.close()
    from fm_policy.eval.demo_replay import replay_store

    summary = replay_store(out)  # the package's open-loop replay agrees: bit for bit, task done again
    assert summary.env == "kitchen" and summary.episodes[0].success and summary.episodes[0].gap_max == 0.0


def test_cli_kitchen_options_are_checked(tmp_path, capsys) -> None:
    from fm_policy.cli import main

    code = main(["collect", "--env", "pusht", "--tasks", "kettle", "--episodes", "1", "--out",
                 str(tmp_path / "x.zarr")])
    assert code == 2 and "only apply to --env kitchen" in capsys.readouterr().err


def test_render_frame(env: KitchenEnv) -> None:
    env.reset(seed=0)
    try:
        frame = env.render()
    except Exception as exc:  # noqa: BLE001  # pragma: no cover - GL backends raise assorted error types
        pytest.skip(f"no headless GL here: {exc}")
    assert frame.shape == (256, 256, 3) and frame.dtype == np.uint8 and not math.isclose(frame.std(), 0.0)


def test_task_count_follows_the_env_default():
    """p1..pK are counted against the tasks the env scores: its default is the four-task sequence, not all seven."""
    from fm_policy.envs.kitchen import COMPLETE_TASKS, n_tasks_for

    assert n_tasks_for({}) == n_tasks_for(None) == len(COMPLETE_TASKS) == 4
    assert n_tasks_for({"tasks": "microwave,kettle"}) == 2
    assert n_tasks_for({"tasks": None}) == 7
